"""Generation-based evaluation on Natural-Instructions tasks: ROUGE-L and exact match, with baselines.

Used by `recipes/evaluate.py` (any local HF causal LM, optionally with a peft adapter), by the
fine-tune recipe at the end of training, and by `tune generate`.

    preds = generate_predictions(model, tokenizer, prompts, batch_size=8, max_new_tokens=64)
    results = evaluate_tasks(model, tokenizer, pairs, PromptConfig())   # pairs: [(NITask, NIInstance)]
    print(format_table(results))

Scoring follows Super-NaturalInstructions: per instance, the best ROUGE-L F-measure (x100) and exact
match (x100) over its references (`tune/metrics`). Results hold two overall means: over instances
(every instance of every task weighs the same; the number SNI reports) and over tasks (every task
weighs the same). Two baselines are scored on the same instances: "copy demo" predicts the output of
the task's first positive example, and "copy input" predicts the instance's input.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch

from tune.errors import ConfigError, DataError
from tune.hf import (check_adapter_dir, check_model_dir, check_vocab, context_length, load_model,  # noqa: F401
                     load_tokenizer, resolve_dtype)
from tune.generate import TextStreamer

METRIC_KEYS = ("rougeL", "exact_match", "copy_demo_rougeL", "copy_demo_exact_match",
               "copy_input_rougeL", "copy_input_exact_match")


# ---------------------------------------------------------------------------------------- generation

def prompt_token_limit(model, max_new_tokens: int, max_prompt_tokens: int | None = None) -> int | None:
    """The most prompt tokens to keep: `max_prompt_tokens`, and for a model with a fixed context no more
    than context - max_new_tokens (None: no limit)."""
    limit = context_length(model)
    if limit is not None:
        room = limit - max_new_tokens
        if room < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                              f"{limit}-token context; use max_new_tokens < {limit}")
        max_prompt_tokens = room if max_prompt_tokens is None else min(max_prompt_tokens, room)
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    return max_prompt_tokens


def special_ids(model, tokenizer) -> tuple[int, list[int]]:
    """(pad id, eos ids) for generate(): the tokenizer's eos plus any the model's generation config adds;
    pad falls back to the (first) eos."""
    eos_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for extra in model_eos if isinstance(model_eos, list) else [model_eos]:
        if extra is not None and extra not in eos_ids:
            eos_ids.append(extra)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    if pad_id is None:
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an eos token; "
                        "set pad_token in its tokenizer_config.json")
    return pad_id, eos_ids


def prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt as the fine-tune recipe builds them (data_prep.natural_instructions): the text
    without special tokens, with the bos token first for tokenizers that add one (Llama-style); a prompt
    with no tokens at all starts from the bos (or eos) token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if getattr(tokenizer, "add_bos_token", False) and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids  # not twice: a chat template may write the bos itself
    if not ids:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise DataError("an empty prompt needs a bos or eos token to start from; the tokenizer has neither")
        ids = [start]
    return ids


def truncate_left(ids: list[int], limit: int | None, tokenizer=None) -> list[int]:
    """The last `limit` ids (keeping a leading bos token in place)."""
    if limit is None or len(ids) <= limit:
        return ids
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids[0] == bos and getattr(tokenizer, "add_bos_token", False) and limit > 1:
        return [bos] + ids[len(ids) - limit + 1:]
    return ids[len(ids) - limit:]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), padded on the LEFT so every row's last token is its prompt's last token."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
    return input_ids, attention_mask


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


class _StopAtNewline:
    """Stopping criterion: a row is done once its generated text (leading whitespace aside) holds a newline."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


def _generate(model, tokenizer, prompts, batch_size, max_new_tokens, device, stop_at_newline, max_prompt_tokens,
              log=None, stop_ids=()) -> tuple[list[str], int]:
    from transformers import StoppingCriteriaList

    if batch_size < 1 or max_new_tokens < 1:
        raise ConfigError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    device = torch.device(device) if device is not None else _model_device(model)
    max_prompt_tokens = prompt_token_limit(model, max_new_tokens, max_prompt_tokens)
    pad_id, eos_ids = special_ids(model, tokenizer)
    eos_ids = eos_ids + [i for i in stop_ids if i not in eos_ids]  # e.g. a chat template's end-of-turn token

    was_training = model.training
    predictions: list[str | None] = [None] * len(prompts)
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    n_truncated = sum(len(ids) > max_prompt_tokens for ids in encoded) if max_prompt_tokens else 0
    encoded = [truncate_left(ids, max_prompt_tokens, tokenizer) for ids in encoded]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # similar lengths share a batch
    try:
        model.eval()
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in index], pad_id)
            prompt_length = input_ids.shape[1]
            stopping = StoppingCriteriaList([_StopAtNewline(tokenizer, prompt_length)]) if stop_at_newline else None
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     temperature=None, top_k=None, top_p=None,
                                     pad_token_id=pad_id, eos_token_id=eos_ids or None, output_scores=False,
                                     output_logits=False, return_dict_in_generate=False,
                                     stopping_criteria=stopping)
            texts = tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)
            for i, text in zip(index, texts):
                text = text.strip()
                predictions[i] = text.split("\n", 1)[0].strip() if stop_at_newline else text
            done = min(start + batch_size, len(order))
            if log and (done == len(order) or done * 10 // len(order) > start * 10 // len(order)):
                log(f"generated {done}/{len(order)}")  # about every 10%
    finally:
        model.train(was_training)
    return predictions, n_truncated


def generate_predictions(model, tokenizer, prompts: list[str], batch_size: int = 8, max_new_tokens: int = 64,
                         device=None, stop_at_newline: bool = False, max_prompt_tokens: int | None = None,
                         log=None, stop_ids=()) -> list[str]:
    """Greedy continuations of `prompts`, batched with left padding; only the new text, stripped.

    Works for HF causal LMs and peft-wrapped ones. Prompts longer than `max_prompt_tokens` (and, for a
    model with a fixed context, longer than context - max_new_tokens) lose tokens from the LEFT, so the
    instance input and "Output:" survive. `stop_at_newline` ends each continuation at its first line
    break (after leading whitespace): for base models that would go on with the next few-shot example.
    Prompts are tokenized as the fine-tune recipe tokenizes them (`prompt_ids`) and padded here, so the
    tokenizer is never modified (a tokenizer without a pad token pads with its eos token); the model's
    train/eval mode is restored afterwards. `stop_ids`: token ids that end a continuation besides eos (a chat
    template's end-of-turn token: RunData.formatter.end_of_turn in recipes/finetune.py).
    """
    return _generate(model, tokenizer, prompts, batch_size, max_new_tokens, device, stop_at_newline,
                     max_prompt_tokens, log, stop_ids=stop_ids)[0]


def sample_completions(model, tokenizer, examples: list[tuple[str, list[str]]], max_new_tokens: int,
                       batch_size: int = 8, stop_ids=()) -> list[dict]:
    """Greedy completions of a few held-out examples, (prompt text, reference strings) each, by `model` as it
    stands (generate_predictions: the same prompts and decoding as evaluation): [{"prompt", "reference",
    "prediction"}], the reference being the example's first. What the engine writes to samples.jsonl and the
    trackers at every evaluation. `stop_ids`: token ids that end a completion besides eos (generate_predictions)."""
    predictions = generate_predictions(model, tokenizer, [prompt for prompt, _ in examples], batch_size=batch_size,
                                       max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    return [{"prompt": prompt, "reference": references[0] if references else "", "prediction": prediction}
            for (prompt, references), prediction in zip(examples, predictions)]


def spread_over_groups(pairs: list, n: int, group=lambda pair: pair[0].name) -> list:
    """The first `n` of `pairs` taken one group at a time (the first pair of each group, then the second, ...), so a
    few samples show several tasks rather than one."""
    rank, seen = [], {}
    for i, pair in enumerate(pairs):
        key = group(pair)
        rank.append((seen.get(key, 0), i))
        seen[key] = seen.get(key, 0) + 1
    return [pairs[i] for _, i in sorted(rank)[:n]]


# ---------------------------------------------------------------------------------------- evaluation

def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def score(predictions: list[str], references: list[list[str]]) -> dict[str, list[float]]:
    """Per-instance ROUGE-L and exact match (x100) through the shipped `evaluate` modules."""
    from tune.metrics import load_metric

    if not predictions:
        return {"rougeL": [], "exact_match": []}
    references = [list(r) for r in references]
    return {"rougeL": load_metric("rouge_l").compute(predictions=predictions, references=references)["scores"],
            "exact_match": load_metric("exact_match").compute(predictions=predictions, references=references)["scores"]}


def fit_prompt(tokenizer, task, instance_input: str, prompt_cfg, limit: int | None) -> tuple[str, bool]:
    """The instance's prompt, with demonstrations dropped (negatives first, then the last positive) until it
    fits `limit` tokens, as the fine-tune recipe fits its training prompts. Returns (prompt, demos dropped).
    A prompt still too long is cut from the left later, by generate_predictions."""
    from data_prep.natural_instructions import encode_prompt

    n_pos = min(prompt_cfg.num_pos, len(task.positive_examples))
    n_neg = min(prompt_cfg.num_neg, len(task.negative_examples))
    text = encode_prompt(task, instance_input, prompt_cfg, num_pos=n_pos, num_neg=n_neg)
    dropped = False
    while limit is not None and n_pos + n_neg > 0 and len(prompt_ids(tokenizer, text)) > limit:
        n_neg, n_pos = (n_neg - 1, n_pos) if n_neg else (n_neg, n_pos - 1)
        text = encode_prompt(task, instance_input, prompt_cfg, num_pos=n_pos, num_neg=n_neg)
        dropped = True
    return text, dropped


def evaluate_tasks(model, tokenizer, pairs, prompt_cfg=None, batch_size: int = 8, max_new_tokens: int = 64,
                   device=None, max_prompt_tokens: int | None = None, stop_at_newline: bool = False,
                   log=None) -> dict:
    """Generate for every (NITask, NIInstance) pair and score it; a JSON-able dict of results.

    Prompts that do not fit the model's context (or `max_prompt_tokens`) first lose demonstrations
    (`fit_prompt`), then tokens from the left.

    {"n_tasks", "n_instances", "n_prompts_fewer_demos", "n_prompts_truncated", "generation_s",
     "prompt": {...}, "generation": {...},
     "tasks": {name: {"n", "rougeL", "exact_match", "copy_demo_rougeL", ...}},
     "overall": {"mean_over_instances": {...}, "mean_over_tasks": {...}},
     "predictions": [{"task", "id", "prediction", "references"}], "example_prompts": {name: prompt}}
    """
    from data_prep.natural_instructions import PromptConfig

    prompt_cfg = prompt_cfg if prompt_cfg is not None else PromptConfig()
    pairs = list(pairs)
    limit = prompt_token_limit(model, max_new_tokens, max_prompt_tokens)
    prompts, n_fewer_demos = [], 0
    for task, instance in pairs:
        text, dropped = fit_prompt(tokenizer, task, instance.input, prompt_cfg, limit)
        prompts.append(text)
        n_fewer_demos += dropped
    start = time.perf_counter()
    predictions, n_truncated = _generate(model, tokenizer, prompts, batch_size, max_new_tokens, device,
                                         stop_at_newline, max_prompt_tokens, log)
    elapsed = time.perf_counter() - start
    references = [list(instance.outputs) for _, instance in pairs]
    copy_demo = [task.positive_examples[0].output if task.positive_examples else "" for task, _ in pairs]
    copy_input = [instance.input for _, instance in pairs]
    scored = _scored([task.name for task, _ in pairs], [instance.id for _, instance in pairs], prompts, predictions,
                     references, {"copy_demo_": copy_demo, "copy_input_": copy_input}, METRIC_KEYS)
    return _laid_out(scored, {
        "n_prompts_fewer_demos": n_fewer_demos,
        "n_prompts_truncated": n_truncated,
        "generation_s": round(elapsed, 3),
        "prompt": asdict(prompt_cfg) if is_dataclass(prompt_cfg) else dict(vars(prompt_cfg)),
        "generation": {"batch_size": batch_size, "max_new_tokens": max_new_tokens,
                       "max_prompt_tokens": max_prompt_tokens, "stop_at_newline": stop_at_newline, "greedy": True},
    })


def _laid_out(scored: dict, settings: dict) -> dict:
    """The results dict in its documented key order: counts, `settings`, then the scores."""
    return {"n_tasks": scored["n_tasks"], "n_instances": scored["n_instances"], **settings,
            **{k: scored[k] for k in ("tasks", "overall", "predictions", "example_prompts")}}


def _scored(groups: list[str], ids: list[str], prompts: list[str], predictions: list[str],
            references: list[list[str]], baselines: dict[str, list[str]], keys) -> dict:
    """The scored part of evaluate_tasks' / evaluate_examples' results: counts, per-group rows, both overall means,
    the predictions and each group's first prompt (before any cut from the left). `baselines`: key prefix ->
    the baseline's predictions; `keys`: the metric keys, in table order."""
    per_instance = {}
    for prefix, preds in (("", predictions), *baselines.items()):
        for key, values in score(preds, references).items():
            per_instance[prefix + key] = values
    tasks: dict[str, dict] = {}
    for i, group in enumerate(groups):
        tasks.setdefault(group, {"n": 0, **{k: [] for k in keys}})
        tasks[group]["n"] += 1
        for key in keys:
            tasks[group][key].append(per_instance[key][i])
    for row in tasks.values():
        for key in keys:
            row[key] = _mean(row[key])
    example_prompts: dict[str, str] = {}
    for group, text in zip(groups, prompts):
        example_prompts.setdefault(group, text)
    return {
        "n_tasks": len(tasks),
        "n_instances": len(groups),
        "tasks": tasks,
        "overall": {
            "mean_over_instances": {k: _mean(per_instance[k]) for k in keys},
            "mean_over_tasks": {k: _mean(row[k] for row in tasks.values()) for k in keys},
        },
        "predictions": [{"task": group, "id": i, "prediction": pred, "references": refs}
                        for group, i, pred, refs in zip(groups, ids, predictions, references)],
        "example_prompts": example_prompts,
    }


@dataclass
class HeldOut:
    """One held-out example as evaluation, the sample completions and distillation's comparison see it, whatever the
    data kind: the prompt text exactly as the model is given it at training time (generation prompt included), its
    reference answers, its group (the NI task, or the data file's name) and id; `input` is what the copy-input
    baseline predicts."""
    prompt: str
    references: list[str]
    group: str
    id: str = ""
    input: str = ""


EXAMPLE_METRIC_KEYS = ("rougeL", "exact_match", "copy_input_rougeL", "copy_input_exact_match")


def evaluate_examples(model, tokenizer, examples: list[HeldOut], batch_size: int = 8, max_new_tokens: int = 64,
                      device=None, max_prompt_tokens: int | None = None, stop_at_newline: bool = False, log=None,
                      stop_ids=(), kind: str = "") -> dict:
    """evaluate_tasks for prompts that are already written (alpaca / prompt_completion / chat rows): greedy
    generation from each prompt (stopping at eos and at `stop_ids`, e.g. a chat template's end-of-turn token), scored
    by ROUGE-L and exact match against the references, beside the copy-input baseline. Prompts longer than the
    model's context (or `max_prompt_tokens`) lose tokens from the left. The same result layout as evaluate_tasks,
    groups in place of tasks, with "prompt": {"kind": kind} and no copy-demo baseline."""
    examples = list(examples)
    start = time.perf_counter()
    predictions, n_truncated = _generate(model, tokenizer, [e.prompt for e in examples], batch_size, max_new_tokens,
                                         device, stop_at_newline, max_prompt_tokens, log, stop_ids=stop_ids)
    elapsed = time.perf_counter() - start
    scored = _scored([e.group for e in examples], [e.id for e in examples], [e.prompt for e in examples], predictions,
                     [list(e.references) for e in examples], {"copy_input_": [e.input for e in examples]},
                     EXAMPLE_METRIC_KEYS)
    return _laid_out(scored, {
        "n_prompts_fewer_demos": 0,
        "n_prompts_truncated": n_truncated,
        "generation_s": round(elapsed, 3),
        "prompt": {"kind": kind},
        "generation": {"batch_size": batch_size, "max_new_tokens": max_new_tokens,
                       "max_prompt_tokens": max_prompt_tokens, "stop_at_newline": stop_at_newline, "greedy": True},
    })


TABLE_COLUMNS = (("ROUGE-L", "rougeL"), ("EM", "exact_match"), ("copy-demo R-L", "copy_demo_rougeL"),
                 ("copy-demo EM", "copy_demo_exact_match"), ("copy-input R-L", "copy_input_rougeL"),
                 ("copy-input EM", "copy_input_exact_match"))


def format_table(results: dict) -> str:
    """Per-task rows (task, n, then ROUGE-L and exact match of the model and of both baselines, x100) and
    both overall means."""
    columns = [(title, k) for title, k in TABLE_COLUMNS if k in results["overall"]["mean_over_instances"]]
    header = ("task", "n", *(title for title, _ in columns))
    rows = [(name, str(row["n"]), *(f"{row[k]:.2f}" for _, k in columns))
            for name, row in results["tasks"].items()]
    overall = [
        ("all: mean over instances (as SNI)", str(results["n_instances"]), results["overall"]["mean_over_instances"]),
        ("all: mean over tasks", str(results["n_tasks"]), results["overall"]["mean_over_tasks"]),
    ]
    totals = [(label, n, *(f"{o[k]:.2f}" for _, k in columns)) for label, n, o in overall]
    widths = [max(len(r[c]) for r in [header, *rows, *totals]) for c in range(len(header))]

    def line(r):
        return "  ".join(r[0].ljust(widths[0]) if c == 0 else r[c].rjust(widths[c]) for c in range(len(r)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *map(line, rows), rule, *map(line, totals)])


def write_json_atomic(path, data) -> Path:
    """Write JSON to `path` through a temporary file renamed into place (never a half-written file). Strict JSON: a
    non-finite float (an undefined metric, e.g. the correlation of constant predictions) is written as null."""
    def strict(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        return [strict(v) for v in value] if isinstance(value, (list, tuple)) else value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(strict(data), indent=2, ensure_ascii=False, allow_nan=False), encoding="utf-8")
    tmp.replace(path)
    return path


# ------------------------------------------------------------------------------------------ streaming

def generation_window(model) -> int | None:
    """How many tokens the model sees at once when `tune generate` goes past its context: its learned position
    table (GPT-2 / OpenAIGPT `n_positions`, a hard limit) or the context it was trained on (RoPE models'
    `max_position_embeddings`: longer inputs run, but at positions it never saw). None: no declared context."""
    return context_length(model)


class _KeepOpen:
    """A streamer whose end() is left to the caller: generation goes on after HF generate() returns."""

    def __init__(self, streamer):
        self.streamer = streamer

    def put(self, value):
        self.streamer.put(value)

    def end(self):
        pass


def stream_generate(model, ids: list[int], max_new_tokens: int, streamer, pad_id: int, eos_ids: list[int],
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> list[int]:
    """Continue one prompt (`ids`) by up to `max_new_tokens` tokens, streamed to `streamer` (HF put/end protocol,
    e.g. PrintStreamer); returns prompt + new ids. Stops early at an eos id. temperature 0 is greedy; top_k 0
    and top_p 1 are off.

    HF generate() (with its KV cache) runs while prompt + new tokens fit the model's context
    (`generation_window`: a learned position table, or a RoPE model's trained context). Then it goes on with a
    sliding window, as nanoGPT samples: each further token is predicted from the last `window` tokens only (at
    positions 0..window-1, the ones it was trained on), and sampled by `tune.generate.sample_next_token`
    (temperature, then top-k, then top-p, as generate() applies them).
    """
    from tune.generate import sample_next_token

    device = _model_device(model)
    table = generation_window(model)
    sample = temperature > 0
    prompt_length, ids = len(ids), list(ids)
    fit = max_new_tokens if table is None else min(max_new_tokens, table - len(ids))
    if fit > 0:
        hf_streamer = streamer if fit == max_new_tokens else _KeepOpen(streamer)
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([ids], device=device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 max_new_tokens=fit, do_sample=sample, num_beams=1,
                                 temperature=temperature if sample else None, top_k=top_k if sample else None,
                                 top_p=top_p if sample else None, pad_token_id=pad_id,
                                 eos_token_id=eos_ids or None, streamer=hf_streamer)
        ids = out[0].tolist()
        if fit == max_new_tokens:
            return ids
        if ids[-1] in eos_ids:
            streamer.end()
            return ids
    else:
        streamer.put(torch.tensor([ids]))  # the prompt, as generate() hands it over first
    with torch.inference_mode():
        while len(ids) - prompt_length < max_new_tokens:
            logits = model(input_ids=torch.tensor([ids[-table:]], device=device)).logits[:, -1, :]
            token = int(sample_next_token(logits, temperature, top_k, top_p)[0, 0])
            ids.append(token)
            streamer.put(torch.tensor([token]))
            if token in eos_ids:
                break
    streamer.end()
    return ids


class PrintStreamer:
    """HF `generate(streamer=...)` protocol (`put(tensor)`, `end()`) printing text as it is generated.

    Built on `tune.generate.TextStreamer`, so a character split over several byte-level tokens is
    printed once complete, never as U+FFFD. The first `put` (the prompt) is skipped. `text` holds
    everything printed.
    """

    def __init__(self, tokenizer, print_fn=print, skip_prompt: bool = True):
        self.stream = TextStreamer(tokenizer)
        self.print_fn = print_fn
        self.skip_prompt = skip_prompt
        self.pieces: list[str] = []

    def _emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            self.print_fn(piece, end="", flush=True)

    def put(self, value) -> None:
        if self.skip_prompt:
            self.skip_prompt = False
            return
        if isinstance(value, torch.Tensor):
            if value.dim() > 1:
                if value.shape[0] > 1:
                    raise ValueError("PrintStreamer streams one sequence; generate with batch size 1")
                value = value[0]
            value = value.tolist()
        self._emit(self.stream.put(value if isinstance(value, list) else [value]))

    def end(self) -> None:
        self._emit(self.stream.end())

    @property
    def text(self) -> str:
        return "".join(self.pieces)
