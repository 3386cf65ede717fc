"""Knowledge distillation pieces: the frozen teacher, the tokenizer/vocabulary check, the offline top-k
teacher cache and the α·T²·KD + (1 − α)·CE loss (tune/losses.py computes the divergences).

Teacher cache: the teacher runs once over every tokenized example and stores, for each target position,
its k most likely next tokens and their log-probs (temperature 1) as safetensors:

    <cache_dir>/<key>/train.safetensors, val.safetensors   logprobs (N, k), ids (N, k) int32, offsets (n+1,) int64
    <cache_dir>/<key>/meta.json                             teacher, k, example counts

Example i owns rows offsets[i]:offsets[i+1], its target positions in order. The key hashes the teacher
directory's config and weights' sizes/mtimes, k, and the token ids of every example, so a changed teacher or
dataset never reuses a stale cache; the directory appears only once complete (written aside, then renamed).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tune.errors import ConfigError, DataError, TuneError
from tune.files import directory_written_aside
from tune.losses import IGNORE_INDEX, chunked_kd_sums, hidden_and_head, with_router_losses
from tune.packing import NIBatches, collate_packed, collate_padded, example_rows


# -- teacher --------------------------------------------------------------------------------------
def load_teacher(path, dtype: torch.dtype, quant: str = "none", device=None, attn_implementation: str = "sdpa"):
    """The teacher as a frozen HF causal LM in eval mode: in `dtype`, or 8-bit / 4-bit (nf4) via bitsandbytes.
    attn_implementation: see tune.adapters.attention_implementation (the teacher sees the student's batches)."""
    from transformers import AutoModelForCausalLM

    from tune.hf import bnb_config, check_model_dir, quiet_third_party, silence_int8_cast_message

    check_model_dir(path, "teacher.model")
    kwargs = {"dtype": dtype}
    kinds = {"8bit": "int8", "4bit": "nf4"}  # 4bit: nf4 with double quantization, computing in `dtype`
    if quant in kinds:
        kwargs["quantization_config"] = bnb_config(kinds[quant], dtype, double_quant=True)
    elif quant != "none":
        raise ConfigError(f"teacher.quant must be none, 8bit or 4bit, got {quant!r}")
    if quant == "8bit":
        silence_int8_cast_message()
    if quant != "none" and torch.cuda.is_available():
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    with quiet_third_party():  # a quantized teacher imports bitsandbytes
        teacher = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn_implementation, trust_remote_code=False,
                                                       **kwargs)
    teacher.eval().requires_grad_(False)
    if quant == "none" and device is not None:
        teacher.to(device)
    return teacher


def check_vocabularies(teacher_tokenizer, student_tokenizer, teacher_vocab: int, student_vocab: int,
                       teacher_dir, student_dir) -> int:
    """The number of token ids the two models are compared on, or a DataError before any training step.

    Distillation matches next-token distributions id by id, so both models must share one tokenizer.
    Their embedding tables may be padded to different sizes (e.g. 50257 vs 50304): they are aligned on
    the tokenizer's ids, which both tables must cover.
    """
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differing = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])
        raise DataError(f"teacher {teacher_dir} and student {student_dir} use different tokenizers ({len(t_vocab)} vs "
                        f"{len(s_vocab)} tokens, first difference {differing[0]!r}); distillation compares the two "
                        "models token id by token id, so the student must use the teacher's tokenizer (give it the "
                        "teacher directory's tokenizer when building the student, e.g. pretrain's data.tokenizer), "
                        "or set kd.cross_tokenizer=uld and compare.ce_only=false "
                        "kd.cross_tokenizer=uld to distill across tokenizers with the Universal Logit Distillation "
                        "loss (NI data)")
    n = len(teacher_tokenizer)
    for name, size, where in (("teacher", teacher_vocab, teacher_dir), ("student", student_vocab, student_dir)):
        if size < n:
            raise DataError(f"{name} {where} embeds {size} tokens but the shared tokenizer has {n}; "
                            "it was not trained with this tokenizer")
    return n


def kd_loss_fn(teacher, alpha: float, temperature: float, divergence: str, beta: float, vocab_size: int,
               chunk_size: int = 4096, cache_tail: bool = True, log_on_policy: bool = False, hidden_kd=None):
    """Engine loss: α·T²·D(teacher ‖ student) + (1 − α)·CE, summed over target tokens, with the KD and CE parts
    logged. The teacher is live (`teacher` a model) or cached (`teacher` None: the batch carries its top-k,
    compared with a tail bucket unless `cache_tail` is false: tune.losses.kd_sums). On an on-policy batch
    (OnPolicyBatches: its targets are the student's own samples) the loss is α·T²·D alone, and the extra
    `on_policy` counts its target tokens (`log_on_policy`: 0 on the other batches; logged as the on-policy share of
    the tokens). `hidden_kd`: a tune.kd_hidden.HiddenStateDistillation attached to both models (live teacher):
    + hidden_kd.weight · its loss_sum on every batch, logged as `hidden`."""
    scale = alpha * temperature ** 2

    def loss_fn(model, batch):
        hidden, head = hidden_and_head(model, batch)
        if "teacher_logprobs" in batch:
            kd, ce, n = chunked_kd_sums(hidden, head, batch["targets"], temperature, divergence, beta,
                                        cached=(batch["teacher_logprobs"], batch["teacher_ids"]), chunk_size=chunk_size,
                                        tail=cache_tail)
        else:
            if teacher is None:
                raise TuneError("the batch has no cached teacher log-probs and no teacher was loaded")
            with torch.no_grad():
                teacher_hidden, teacher_head = hidden_and_head(teacher, batch)
            kd, ce, n = chunked_kd_sums(hidden, head, batch["targets"], temperature, divergence, beta,
                                        teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                                        vocab_size=vocab_size, chunk_size=chunk_size)
        extras, hidden_term = {"kd": kd.detach(), "ce": ce.detach()}, 0
        if hidden_kd is not None:  # kd.layer_map: hidden-state distillation (tune/kd_hidden.py)
            hidden_sum = hidden_kd.loss_sum(batch["targets"] != IGNORE_INDEX)
            hidden_term, extras["hidden"] = hidden_kd.weight * hidden_sum, hidden_sum.detach()
        if "on_policy" in batch:  # the student's own samples (OnPolicyBatches): no reference to take CE against
            return with_router_losses(model, scale * kd + hidden_term, n, {**extras, "on_policy": n.float()})
        if log_on_policy:  # every batch logs it (processes reduce the same extras each step)
            extras["on_policy"] = n.float() * 0
        return with_router_losses(model, scale * kd + (1 - alpha) * ce + hidden_term, n, extras)

    return loss_fn


# -- offline cache --------------------------------------------------------------------------------
def _teacher_fingerprint(teacher_dir) -> list:
    files = sorted(Path(teacher_dir).glob("*.safetensors")) + sorted(Path(teacher_dir).glob("*.bin"))
    config = (Path(teacher_dir) / "config.json").read_text(encoding="utf-8")
    return [config, [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]


def cache_key(teacher_dir, top_k: int, splits: dict[str, Sequence[dict]], precision: str = "") -> str:
    """The teacher cache's key: the teacher directory's fingerprint, how it was loaded (`precision`, e.g.
    "torch.bfloat16/4bit": a quantized or bf16 teacher gives other log-probs), k and every example's token ids."""
    h = hashlib.sha256(json.dumps([1, _teacher_fingerprint(teacher_dir), top_k, precision]).encode())
    for name in sorted(splits):
        h.update(name.encode())
        for ex in splits[name]:
            h.update(json.dumps([list(ex["input_ids"]), list(ex["targets"])]).encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def teacher_topk(teacher, examples: Sequence[dict], top_k: int, vocab_size: int, pad_id: int, batch_size: int = 8,
                 device=None) -> dict[str, torch.Tensor]:
    """Top-k log-probs (temperature 1, over the shared vocabulary) of the teacher at every target position."""
    device = device or next(teacher.parameters()).device
    logprobs, ids, offsets = [], [], [0]
    for start in range(0, len(examples), batch_size):
        chunk = example_rows(examples, range(start, min(start + batch_size, len(examples))))
        batch = {k: v.to(device) for k, v in collate_padded(chunk, pad_id).items()}
        hidden, head = hidden_and_head(teacher, batch)
        for row, ex in enumerate(chunk):
            mask = batch["targets"][row] != IGNORE_INDEX
            logits = head(hidden[row][mask]).float()[:, :vocab_size]
            values, indices = torch.log_softmax(logits, -1).topk(min(top_k, vocab_size), dim=-1)
            logprobs.append(values.cpu())
            ids.append(indices.to(torch.int32).cpu())
            offsets.append(offsets[-1] + int(mask.sum()))
    k = min(top_k, vocab_size)
    return {"logprobs": torch.cat(logprobs) if logprobs else torch.zeros(0, k),
            "ids": torch.cat(ids) if ids else torch.zeros(0, k, dtype=torch.int32),
            "offsets": torch.tensor(offsets, dtype=torch.int64)}


def build_teacher_cache(teacher_dir, teacher, splits: dict[str, Sequence[dict]], cache_dir, top_k: int,
                        vocab_size: int, pad_id: int, log=print, precision: str = "") -> Path:
    """Run the teacher once over every split and store its top-k; reuse a complete cache with the same key
    (cache_key)."""
    from safetensors.torch import save_file

    final = Path(cache_dir) / cache_key(teacher_dir, top_k, splits, precision)
    if (final / "meta.json").is_file():
        log(f"teacher cache: reusing {final}; {cache_size_line(final)}")
        return final
    if teacher is None:
        raise ConfigError(f"no complete teacher cache at {final} and no teacher to build it")
    with directory_written_aside(final, lambda path: (path / "meta.json").is_file()) as tmp:
        for name, examples in splits.items():
            log(f"teacher cache: running the teacher over {len(examples)} {name} examples (top-{top_k})")
            save_file(teacher_topk(teacher, examples, top_k, vocab_size, pad_id), str(tmp / f"{name}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"teacher": str(teacher_dir), "top_k": top_k, "vocab_size": vocab_size,
                                                   "examples": {n: len(e) for n, e in splits.items()}}, indent=2))
    log(f"teacher cache: wrote {final}; {cache_size_line(final)}")
    return final


def cache_size_line(cache: Path) -> str:
    """The size of a teacher cache: target tokens, bytes on disk and bytes per target token (top k log-probs in
    fp32 and ids in int32: 8·k bytes, plus the per-example offsets and the file headers)."""
    from safetensors import safe_open

    files = sorted(Path(cache).glob("*.safetensors"))
    tokens = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            tokens += int(f.get_slice("ids").get_shape()[0])
    size = sum(f.stat().st_size for f in files)
    return (f"{tokens:,} target tokens, {size / 2**20:,.1f} MiB on disk, "
            f"{size / max(tokens, 1):,.0f} bytes per target token")


def load_teacher_cache(path, name: str, n_examples: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    data = load_file(str(Path(path) / f"{name}.safetensors"))
    if len(data["offsets"]) != n_examples + 1:
        raise DataError(f"{path}/{name}.safetensors holds {len(data['offsets']) - 1} examples, the data has "
                        f"{n_examples}; delete the cache directory and run again")
    return data


class CachedTeacherBatches(NIBatches):
    """NIBatches whose batches also carry the cached teacher top-k for their target positions (row-major order)."""

    def __init__(self, *args, train_cache: dict, val_cache: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.caches = {id(self.train): train_cache, id(self.val): val_cache}

    def _collate(self, examples: list[dict], units: list[list[int]]) -> dict:
        batch = super()._collate(examples, units)
        cache = self.caches[id(examples)]
        order = [int(i) for unit in units for i in unit]  # packing lays a unit's examples out in this order
        rows = torch.cat([torch.arange(int(cache["offsets"][i]), int(cache["offsets"][i + 1])) for i in order])
        if rows.numel() != int((batch["targets"] != IGNORE_INDEX).sum()):
            raise DataError("teacher cache does not match the tokenized data (target counts differ); "
                            "delete the cache directory and run again")
        batch["teacher_logprobs"], batch["teacher_ids"] = cache["logprobs"][rows], cache["ids"][rows]
        return batch



# -- on-policy distillation (GKD) -------------------------------------------------------------------
def prompt_of(example: dict) -> list[int]:
    """The prompt of a tokenized NI example: its first `prompt_len` input_ids (the NI tokenization records it; with
    data.mask_prompt=false the prompt's tokens are targets too), else the input_ids up to the one that predicts the
    first target token."""
    if example.get("prompt_len"):
        return [int(i) for i in list(example["input_ids"])[:int(example["prompt_len"])]]
    targets = list(example["targets"])
    first = next((t for t, y in enumerate(targets) if y != IGNORE_INDEX), None)
    if first is None:
        raise DataError("an NI example has no target token, so it has no prompt to complete")
    return [int(i) for i in list(example["input_ids"])[:first + 1]]


def completion_example(prompt: list[int], completion: list[int]) -> dict:
    """A tokenized example whose targets are `completion` after `prompt` (as the NI tokenization lays out the
    reference answer): input_ids = (prompt + completion)[:-1], targets -100 on the prompt's positions but the last.
    An empty completion gives no target."""
    sequence = prompt + completion
    return {"input_ids": sequence[:-1], "targets": [IGNORE_INDEX] * (len(prompt) - 1) + completion}


class OnPolicyBatches(NIBatches):
    """NIBatches for on-policy / generalized knowledge distillation (GKD, Agarwal et al. 2024, "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes").

    With probability `lmbda` a step is on-policy: each of its micro-batches is replaced by the student's own
    completions of the micro-batch's prompts (sampled at `temperature`, at most `max_new_tokens` each and never past
    `max_length` tokens in all, stopping at `eos_id`), one right-padded row per prompt, targets = the sampled tokens;
    the loss then scores them against the teacher on those tokens (kd_loss_fn: the KD term only, the tokens are no
    references). Otherwise the step is the ordinary (off-policy) one, so lmbda = 0 is plain KD.

    Reproducible: whether step s is on-policy depends on (seed, s) only; the samples of micro-batch m of step s on
    (seed, s, m) and the weights at the start of step s (m indexes the step's global batch, so any number of
    processes draws the same samples). The engine must not prepare batches ahead (Engine.prefetch = False): the
    student generates them. `autocast` (a context factory, e.g. accelerator.autocast) wraps the generation;
    `synced`: every process runs the same number of decoding steps (DDP processes stay in step).
    The batches carry `on_policy` (a 0-d tensor, 1) so the loss can tell them apart.
    """

    def __init__(self, *args, student, lmbda: float, temperature: float, max_new_tokens: int, eos_id: int | None,
                 vocab_size: int, autocast=None, synced: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.student, self.lmbda, self.temperature, self.max_new_tokens = student, lmbda, temperature, max_new_tokens
        self.eos_id, self.vocab_size, self.autocast, self.synced = eos_id, vocab_size, autocast, synced

    def on_policy(self, step: int) -> bool:
        return self.lmbda > 0 and float(np.random.default_rng([self.seed, step, 0x6B64]).random()) < self.lmbda

    def step_batches(self, step: int, rank: int, world: int) -> list[dict]:
        if not self.on_policy(step):
            return super().step_batches(step, rank, world)
        return [self.sample(step, m, units) for m, units in self.micro_batch_units(step, rank, world)]

    def sample(self, step: int, m: int, units: list[np.ndarray]) -> dict:
        """Micro-batch m of step `step` with the student's completions in place of the references."""
        import contextlib

        from tune.generate import sample_completions

        indices = [int(i) for u in units for i in u]
        if hasattr(self.train, "column_names") and "prompt_len" in self.train.column_names:
            rows = self.train.select_columns(["input_ids", "prompt_len"])[indices]
            prompts = [list(ids[:n]) for ids, n in zip(rows["input_ids"], rows["prompt_len"])]
        else:
            prompts = [prompt_of(ex) for ex in example_rows(self.train, indices)]
        device = next(self.student.parameters()).device
        generator = torch.Generator(device=device)
        generator.manual_seed(int(np.random.SeedSequence([self.seed, step, m]).generate_state(1)[0]))
        budgets = [min(self.max_new_tokens, self.max_length + 1 - len(p)) for p in prompts]
        was_training = self.student.training
        self.student.eval()
        try:
            with self.autocast() if self.autocast is not None else contextlib.nullcontext():
                completions = sample_completions(self.student, prompts, budgets, self.temperature, self.eos_id,
                                                 self.pad_id, generator, vocab_size=self.vocab_size,
                                                 synced=self.synced)
        finally:
            self.student.train(was_training)
        batch = collate_padded([completion_example(p, c) for p, c in zip(prompts, completions)], self.pad_id)
        batch["on_policy"] = torch.ones(())
        return batch


# -- cross-tokenizer distillation (kd.cross_tokenizer=uld) ----------------------------------------------
def pair_examples(student_set, teacher_set, split: str = "train"):
    """The examples both tokenizations kept, as (student examples, teacher examples, number dropped): the same
    instance at the same index on both sides, in the student set's order.

    Each set holds one tokenization of the same instances (in the same order), minus those too long for
    data.max_length with that tokenizer; an instance missing from either is dropped from both, so the pairs never
    shift. Examples are matched on (task, id). ``datasets.Dataset`` inputs come back as index selections of
    themselves (nothing copied); lists of dicts as lists. DataError if an example key repeats within a set."""
    def keys(examples, side: str) -> dict:
        if hasattr(examples, "column_names"):
            pairs = zip(examples["task"], examples["id"])
        else:
            pairs = ((ex["task"], ex["id"]) for ex in examples)
        index = {}
        for i, key in enumerate(pairs):
            if key in index:
                raise DataError(f"{split} data tokenized for the {side} has example {key[1]} of task {key[0]} twice; "
                                "ULD pairs the two tokenizations by (task, id): give the task's instances unique ids")
            index[key] = i
        return index

    student_keys, teacher_keys = keys(student_set, "student"), keys(teacher_set, "teacher")
    both = [(i, teacher_keys[key]) for key, i in student_keys.items() if key in teacher_keys]
    s_idx, t_idx = [i for i, _ in both], [j for _, j in both]
    dropped = len(set(student_keys) | set(teacher_keys)) - len(both)

    def pick(examples, idx):
        if len(idx) == len(examples) and idx == list(range(len(examples))):
            return examples
        return examples.select(idx) if hasattr(examples, "select") else [examples[i] for i in idx]

    return pick(student_set, s_idx), pick(teacher_set, t_idx), dropped


def response_alignment(student_targets: torch.Tensor, teacher_targets: torch.Tensor, student_counts: Sequence[int],
                       teacher_counts: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (shaped like each side's targets) of the positions ULD compares: for every example, the first
    min(n_student, n_teacher) of its target (response) positions on each side, as Boizard et al. align the two
    answers by position from their first token.

    The targets are collated batches (padded or packed), in which the examples' target positions come in row-major
    order, example after example, in the order of `student_counts` / `teacher_counts` (each example's number of
    target positions on that side). Both masks hold the same number of positions, matched in row-major order."""
    masks = []
    for targets, counts in ((student_targets, student_counts), (teacher_targets, teacher_counts)):
        if sum(counts) != int((targets != IGNORE_INDEX).sum()):
            raise DataError("ULD alignment: the batch's target positions do not match its examples")
        keep = [k < min(n_s, n_t) for n_s, n_t, n in zip(student_counts, teacher_counts, counts) for k in range(n)]
        mask = torch.zeros_like(targets, dtype=torch.bool)
        mask[targets != IGNORE_INDEX] = torch.tensor(keep, dtype=torch.bool)
        masks.append(mask)
    return masks[0], masks[1]


def _target_count(example: dict) -> int:
    return sum(1 for t in example["targets"] if t != IGNORE_INDEX)


class CrossTokenizerBatches(NIBatches):
    """NIBatches over the student's tokenization whose batches also carry the same examples in the teacher's
    tokenization, laid out in the same units (rows or packs): ``teacher_input_ids``, ``teacher_targets`` and the
    teacher's ``teacher_attention_mask`` / ``teacher_position_ids`` / ``teacher_document_ids`` (as collate_padded /
    collate_packed make them, padded with `teacher_pad_id`), plus ``uld_mask`` (B, L) and ``teacher_uld_mask``
    (B, L_t): the aligned response positions (response_alignment). The examples are paired (pair_examples): index
    i is the same instance in both tokenizations. Packs are made on the student's lengths, so a teacher row may be
    wider than data.max_length (each example still fits it: positions restart per example)."""

    def __init__(self, *args, teacher_train, teacher_val, teacher_pad_id: int, **kwargs):
        super().__init__(*args, **kwargs)
        if len(teacher_train) != len(self.train) or len(teacher_val) != len(self.val):
            raise DataError("the teacher's examples are not paired with the student's (counts differ)")
        if teacher_pad_id is None:
            raise ConfigError("the teacher's tokenizer has no pad token")
        self.teacher_sets = {id(self.train): teacher_train, id(self.val): teacher_val}
        self.teacher_pad_id = teacher_pad_id

    def _collate_side(self, rows: list[dict], units, pad_id: int) -> dict:
        if not self.packing:
            return collate_padded(rows, pad_id)
        packs, start = [], 0
        for u in units:
            packs.append(rows[start:start + len(u)])
            start += len(u)
        return collate_packed(packs, None, pad_id, self.mask_mode)

    def _collate(self, examples, units) -> dict:
        order = [int(i) for u in units for i in u]
        student_rows = example_rows(examples, order)
        teacher_rows = example_rows(self.teacher_sets[id(examples)], order)
        batch = self._collate_side(student_rows, units, self.pad_id)
        teacher = self._collate_side(teacher_rows, units, self.teacher_pad_id)
        batch["uld_mask"], teacher["uld_mask"] = response_alignment(
            batch["targets"], teacher["targets"], [_target_count(ex) for ex in student_rows],
            [_target_count(ex) for ex in teacher_rows])
        batch.update({f"teacher_{k}": v for k, v in teacher.items()})
        return batch


def teacher_view(batch: dict) -> dict:
    """The teacher's half of a CrossTokenizerBatches batch, under the usual names (input_ids, targets, ...)."""
    return {k[len("teacher_"):]: v for k, v in batch.items() if k.startswith("teacher_")}


def uld_loss_fn(teacher, alpha: float, temperature: float, student_vocab: int, teacher_vocab: int,
                chunk_size: int = 4096):
    """Engine loss for cross-tokenizer distillation: α·ULD + (1 − α)·CE, summed (CE over the student's target
    tokens, ULD over the aligned response positions of CrossTokenizerBatches, tune.losses.uld_sums), with the
    ULD and CE parts logged; the engine divides by the student's target tokens. No T² factor: ULD compares
    probabilities, not log-probabilities, and the paper trains at T = 1. `teacher` is the live frozen teacher
    (ULD has no cache); `student_vocab` / `teacher_vocab`: the tokenizers' sizes (embedding rows beyond are
    padding)."""
    from tune.losses import chunked_ce_sum, chunked_uld_sum

    def loss_fn(model, batch):
        if "teacher_input_ids" not in batch:
            raise TuneError("kd.cross_tokenizer=uld needs batches that carry the teacher's tokens "
                            "(CrossTokenizerBatches)")
        hidden, head = hidden_and_head(model, batch)
        ce, n = chunked_ce_sum(hidden, head, batch["targets"], chunk_size)
        teacher_batch = teacher_view(batch)
        with torch.no_grad():
            teacher_hidden, teacher_head = hidden_and_head(teacher, teacher_batch)
            teacher_hidden = teacher_hidden[teacher_batch["uld_mask"]]
        uld = chunked_uld_sum(hidden[batch["uld_mask"]], head, teacher_hidden, teacher_head, temperature,
                              student_vocab, teacher_vocab, chunk_size)
        return with_router_losses(model, alpha * uld + (1 - alpha) * ce, n, {"uld": uld.detach(), "ce": ce.detach()})

    return loss_fn
# -- sequence-level KD (Kim & Rush, 2016) -----------------------------------------------------------
# The teacher decodes an output for every training prompt once; the student then trains on those outputs in place
# of (or next to) the references. The outputs are cached like the top-k cache:
#
#     <cache_dir>/seq-<key>/outputs.safetensors   ids (M,) int32, offsets (n+1,) int64: output i is ids[o[i]:o[i+1]]
#     <cache_dir>/seq-<key>/meta.json             teacher, settings, counts
#
# The key hashes the teacher directory (as the top-k cache), the decoding settings and every prompt's token ids.
SEQ_KD_VERSION = 1


@dataclass(frozen=True)
class SequenceSettings:
    """How the teacher decodes the training prompts (every field enters the cache key).

    max_length: prompt + output must fit it (data.max_length), so a row gets min(max_new_tokens, max_length -
    prompt length) new tokens. eos_ids: the ids that end an output; an output that ends with one ends with
    eos_ids[0] (the tokenizer's eos, which ends every NI reference). precision: the teacher's dtype / quantization
    as loaded (it changes the outputs; only part of the key)."""
    decoding: str = "greedy"  # greedy | sample
    temperature: float = 1.0  # sample only
    top_p: float = 1.0  # sample only; 1 = the whole distribution
    max_new_tokens: int = 64
    max_length: int = 1024
    batch_size: int = 16
    seed: int = 0  # sample only
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    precision: str = ""
    vocab_size: int | None = None  # the tokenizer's ids: embedding rows past them are padding, never emitted


def example_prompts(examples) -> list[list[int]]:
    """The prompt ids (input_ids[:prompt_len]) of tokenized NI examples: a ``datasets.Dataset`` (read in slices)
    or a sequence of dicts."""
    if hasattr(examples, "column_names"):
        cols, prompts = examples.select_columns(["input_ids", "prompt_len"]), []
        for start in range(0, len(cols), 1000):
            part = cols[start:start + 1000]
            prompts += [list(ids[:n]) for ids, n in zip(part["input_ids"], part["prompt_len"])]
        return prompts
    return [list(ex["input_ids"][:ex["prompt_len"]]) for ex in examples]


@torch.no_grad()
def teacher_outputs(teacher, prompts: Sequence[Sequence[int]], settings: SequenceSettings, device=None,
                    log=None) -> list[list[int]]:
    """The teacher's output ids for each prompt (a list of token ids), through HF ``generate`` with its KV cache.

    Prompts are left-padded (with an attention mask) into batches of settings.batch_size rows of the same length
    budget, longest first. Greedy, or sampled at settings.temperature (and top_p; no top-k) with the RNG seeded by
    settings.seed inside torch.random.fork_rng, so the caller's random state is untouched and the outputs are a
    function of the inputs. The model's own generation_config (an instruct model's sampling defaults, repetition
    penalty, ...) does not apply. An output stops after its first eos id (kept, as eos_ids[0], so the student
    learns to stop) or at its budget min(max_new_tokens, max_length - len(prompt)) (then it has no eos).
    A flex_attention teacher decodes with sdpa (restored afterwards). TuneError if a prompt leaves no room."""
    from transformers import GenerationConfig

    from tune.evaluation import left_pad

    s = settings
    if s.decoding not in ("greedy", "sample"):
        raise ConfigError(f"seq_kd.decoding must be greedy or sample, got {s.decoding!r}")
    budgets = [min(s.max_new_tokens, s.max_length - len(p)) for p in prompts]
    if budgets and min(budgets) < 1:
        i = budgets.index(min(budgets))
        raise TuneError(f"prompt {i} has {len(prompts[i])} tokens: no room for an output in max_length={s.max_length}")
    device = device or next(teacher.parameters()).device
    # rows of one batch share their budget, so no row's positions run past max_length (learned position tables)
    order = sorted(range(len(prompts)), key=lambda i: (-budgets[i], -len(prompts[i]), i))
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < s.batch_size and budgets[order[end]] == budgets[order[start]]:
            end += 1
        batches.append(order[start:end])
        start = end
    sample = s.decoding == "sample"
    options = dict(do_sample=sample, num_beams=1, max_new_tokens=1, pad_token_id=s.pad_id,
                   eos_token_id=list(s.eos_ids) or None, use_cache=True)
    if sample:
        options.update(temperature=s.temperature, top_k=0, top_p=s.top_p)
    rows = teacher.get_output_embeddings().weight.shape[0]
    if s.vocab_size is not None and rows > s.vocab_size:  # padded embedding rows are no tokens of the tokenizer
        options["suppress_tokens"] = list(range(s.vocab_size, rows))
    outputs: list[list[int] | None] = [None] * len(prompts)
    saved_config, saved_attn = teacher.generation_config, teacher.config._attn_implementation
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        teacher.generation_config = GenerationConfig()
        if saved_attn == "flex_attention":
            teacher.set_attn_implementation("sdpa")
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(s.seed)
            done = 0
            for index in batches:
                input_ids, attention_mask = left_pad([list(prompts[i]) for i in index], s.pad_id)
                options["max_new_tokens"] = budgets[index[0]]
                out = teacher.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                       **options)
                for i, row in zip(index, out[:, input_ids.shape[1]:].tolist()):
                    outputs[i] = _until_eos(row, s.eos_ids)
                done += len(index)
                if log and done * 10 // len(prompts) > (done - len(index)) * 10 // len(prompts):  # every 10%
                    log(f"sequence-level KD: decoded {done}/{len(prompts)} prompts")
    finally:
        teacher.generation_config = saved_config
        if saved_attn == "flex_attention":
            teacher.set_attn_implementation(saved_attn)
    return outputs


def _until_eos(row: list[int], eos_ids: Sequence[int]) -> list[int]:
    for t, token in enumerate(row):
        if token in eos_ids:
            return row[:t] + [eos_ids[0]]
    return row


def sequence_cache_key(teacher_dir, prompts: Sequence[Sequence[int]], settings: SequenceSettings) -> str:
    h = hashlib.sha256(json.dumps([SEQ_KD_VERSION, _teacher_fingerprint(teacher_dir), asdict(settings)]).encode())
    for start in range(0, len(prompts), 10_000):
        h.update(json.dumps([list(p) for p in prompts[start:start + 10_000]]).encode())
    return h.hexdigest()[:24]


def build_sequence_cache(teacher_dir, teacher, prompts: Sequence[Sequence[int]], cache_dir,
                         settings: SequenceSettings, log=print) -> list[list[int]]:
    """The teacher's outputs for `prompts` (teacher_outputs), read from ``<cache_dir>/seq-<key>/`` when a complete
    entry exists, else decoded by `teacher` and written there (aside, then renamed: readers never see a partial
    one). Logs whether it was reused or written, the number of outputs and their mean length. ConfigError when
    there is no complete entry and `teacher` is None; DataError when an entry does not hold len(prompts) outputs."""
    from safetensors.torch import load_file, save_file

    final = Path(cache_dir) / f"seq-{sequence_cache_key(teacher_dir, prompts, settings)}"
    if (final / "meta.json").is_file():
        data = load_file(str(final / "outputs.safetensors"))
        offsets, ids = data["offsets"].tolist(), data["ids"].tolist()
        if len(offsets) != len(prompts) + 1:
            raise DataError(f"{final} holds {len(offsets) - 1} teacher outputs for {len(prompts)} prompts; delete it "
                            "and run again")
        outputs = [ids[offsets[i]:offsets[i + 1]] for i in range(len(prompts))]
        log(f"sequence-level KD: reusing {final}; {_outputs_line(outputs, settings)}")
        return outputs
    if teacher is None:
        raise ConfigError(f"no complete sequence-level KD cache at {final} and no teacher to build it")
    log(f"sequence-level KD: the teacher decodes {len(prompts)} training prompts ({settings.decoding}, at most "
        f"{settings.max_new_tokens} new tokens)")
    outputs = teacher_outputs(teacher, prompts, settings, log=log)
    with directory_written_aside(final, lambda path: (path / "meta.json").is_file()) as tmp:
        offsets = [0]
        for out in outputs:
            offsets.append(offsets[-1] + len(out))
        save_file({"ids": torch.tensor([t for out in outputs for t in out], dtype=torch.int32),
                   "offsets": torch.tensor(offsets, dtype=torch.int64)}, str(tmp / "outputs.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"teacher": str(teacher_dir), "settings": asdict(settings),
                                                   "outputs": len(outputs), "tokens": offsets[-1]}, indent=2))
    log(f"sequence-level KD: wrote {final}; {_outputs_line(outputs, settings)}")
    return outputs


def _outputs_line(outputs: list[list[int]], settings: SequenceSettings) -> str:
    ended = sum(1 for out in outputs if out and out[-1] == (settings.eos_ids or (None,))[0])
    mean = sum(len(out) for out in outputs) / max(len(outputs), 1)
    return (f"{len(outputs)} outputs, {mean:.1f} tokens on average (eos included), {len(outputs) - ended} cut at "
            "their length budget")


class SequenceKDExamples:
    """Tokenized NI examples whose outputs are the teacher's: example i (i < n) is gold example i's prompt followed
    by outputs[i]; with keep_gold, examples n..2n-1 are the gold examples themselves. Shifted as the NI tokenization
    shifts (data_prep.natural_instructions.tokenize_rows): input_ids = prompt + output, targets[t] = input_ids[t+1]
    on the output (and the whole sequence when mask_prompt is false), -100 elsewhere and at the last position.
    Built on demand per index from `gold` (a ``datasets.Dataset`` or a sequence of dicts with input_ids, targets and
    prompt_len), so the gold set stays memory-mapped."""

    def __init__(self, gold, outputs: list[list[int]], keep_gold: bool = False, mask_prompt: bool = True):
        if len(outputs) != len(gold):
            raise DataError(f"{len(outputs)} teacher outputs for {len(gold)} training examples")
        if any(len(out) == 0 for out in outputs):
            raise DataError("an empty teacher output cannot be trained on (every output has at least one token)")
        self.gold = gold.select_columns(["input_ids", "targets", "prompt_len"]) if hasattr(gold, "column_names") \
            else gold
        self.outputs, self.keep_gold, self.mask_prompt = outputs, keep_gold, mask_prompt

    def __len__(self) -> int:
        return len(self.outputs) * (2 if self.keep_gold else 1)

    def __getitem__(self, i: int) -> dict:
        n = len(self.outputs)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        ex = self.gold[i % n]
        prompt_len = int(ex["prompt_len"])
        if i >= n:
            return {"input_ids": list(ex["input_ids"]), "targets": list(ex["targets"]), "prompt_len": prompt_len}
        ids = list(ex["input_ids"][:prompt_len]) + list(self.outputs[i])
        first = prompt_len if self.mask_prompt else 1  # the first position of ids that is a target
        return {"input_ids": ids, "targets": [IGNORE_INDEX] * max(0, first - 1) + ids[max(1, first):] + [IGNORE_INDEX],
                "prompt_len": prompt_len}
