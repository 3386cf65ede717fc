"""GPT-1 transfer learning: fine-tune a causal LM with a task head (classification, entailment, similarity,
multiple choice) on its input transformations, with the auxiliary LM loss L = L_task + lambda * L_LM.

    tune run classify --config gpt1_classify [key=value ...]

Steps: tokenizer (+ the start / delimiter / extract tokens) -> rows (your JSONL / CSV / datasets directory, or a
Natural-Instructions task with a small label set) -> input transformations, truncated to data.max_length -> base
model (full, LoRA or QLoRA; the new token rows and the head always trained) + head -> the shared engine (held-out
accuracy every train.eval_every steps) -> model / adapter, HF export, held-out accuracy / macro-F1 (Pearson /
Spearman for scores) beside the majority class and, for NI tasks, beside generation fine-tuning on the same split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from tune.config import os_errors_as_config_errors
from tune.train_config import LoraSection, QuantSection, TrainConfig


@dataclass
class TokensSection:
    start: str = "<s>"
    delimiter: str = "<$>"  # GPT-1 writes it `$`; a literal `$` token would also match every dollar sign in text
    extract: str = "<e>"


@dataclass
class TaskSection:
    kind: Literal["classification", "entailment", "similarity", "multiple_choice"] = "classification"
    # the label set, in class-id order; default: a datasets ClassLabel's names, else the distinct training labels
    labels: list[str | int | float] | None = None
    regression: bool = False  # one score per example (MSE; Pearson / Spearman), e.g. similarity ratings
    lm_coef: float = 0.5  # lambda of the auxiliary LM loss; 0 trains on the task loss alone
    head_dropout: float = 0.1  # dropout on the extract token's state before the head (GPT-1: 0.1)
    tokens: TokensSection = field(default_factory=TokensSection)


@dataclass
class ClassifyDataSection:
    train: str | None = None  # a .jsonl / .csv / .tsv file or a `datasets` directory (save_to_disk)
    eval: str | None = None  # held-out rows in the same form; default: data.heldout_fraction of data.train
    split: str | None = None  # the split of a DatasetDict directory in data.train (null: "train")
    eval_split: str | None = None  # the split of a DatasetDict directory in data.eval (null: "validation")
    columns: dict[str, str] = field(default_factory=dict)  # our field -> your column, e.g. {text: sentence, label: y}
    heldout_fraction: float = 0.1
    ni_task: str | None = None  # a Natural-Instructions task file instead of data.train (small label sets only)
    heldout_instances: int = 20  # ni_task: instances held out (as finetune's data.heldout_instances_per_task)
    max_instances: int | None = None  # ni_task: cap on the training instances
    max_labels: int = 10  # ni_task: at most this many distinct outputs to count as a label set
    max_length: int = 512  # tokens per transformed sequence (GPT-1: 512); longer rows are truncated, longest first
    seed: int = 0


@dataclass
class GPT1TrainConfig(TrainConfig):
    """The training loop with GPT-1's fine-tuning defaults: lr 6.25e-5, 32 examples per step, linear decay to 0 after
    a warmup over 0.2% of training (warmup_ratio), Adam betas (0.9, 0.999), weight decay 0.01, clip 1."""
    lr: float = 6.25e-5
    min_lr: float = 0.0
    micro_batch_size: int = 8
    grad_accum_steps: int = 4
    lr_schedule: Literal["cosine", "linear", "constant"] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eval_every: int = 50
    eval_batches: int = 50
    log_every: int = 10


@dataclass
class ClassifyEvalSection:
    batch_size: int = 16  # examples per forward at the final evaluation
    # ni_task: also fine-tune the same base the generation way (tune run finetune: same method, split, steps and lr)
    # and report its exact match / ROUGE-L on the same held-out instances
    generation_baseline: bool = False
    max_new_tokens: int = 16


@dataclass
class ClassifyConfig:
    recipe: Literal["classify"] = "classify"
    method: Literal["full", "lora", "qlora"] = "full"
    base_model: str = "runs/gpt1/hf"  # any local HF causal-LM directory (our pretrain export, GPT-2, Llama, ...)
    tokenizer: str | None = None  # default: the base model's directory
    pad_token: str | None = None  # for tokenizers without one, e.g. its eos token (padding is masked)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    output_dir: str = "runs/classify"
    seed: int = 1337
    overwrite: bool = False
    epochs: float | None = 3.0  # sets train.max_steps (passes over the training rows); null: train.max_steps as given
    warmup_ratio: float | None = 0.002  # sets train.warmup_steps as this fraction of the steps; null: as given
    export: bool = True  # write a standard HF checkpoint to output_dir/hf (ForSequenceClassification / DoubleHeads)
    task: TaskSection = field(default_factory=TaskSection)
    data: ClassifyDataSection = field(default_factory=ClassifyDataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    qlora: QuantSection = field(default_factory=QuantSection)
    train: GPT1TrainConfig = field(default_factory=GPT1TrainConfig)
    eval: ClassifyEvalSection = field(default_factory=ClassifyEvalSection)


CONFIG_CLASS = ClassifyConfig


@os_errors_as_config_errors
def validate(cfg: ClassifyConfig) -> None:
    """Cheap checks before any heavy work: paths exist, the base is a causal LM, one data source, sane numbers.
    Every problem is reported, in one ConfigError."""
    from recipes.finetune import check_positions
    from tune.config import SEED_RANGE, range_problems
    from tune.errors import Problems
    from tune.hf import check_model_dir, check_no_custom_code
    from tune.recipe_utils import check_output_dir, empty_path_problems
    from tune.train_config import check_resume_keeps_lora, lora_init_problem

    d, problems = cfg.data, Problems()
    problems.extend(empty_path_problems(cfg, ["output_dir", "base_model", "tokenizer", "data.train", "data.eval",
                                              "data.ni_task"]))
    base = problems.call(check_model_dir, cfg.base_model, "base_model")
    if init_problem := lora_init_problem(cfg.lora, cfg.method, converts=False):
        problems.add(init_problem)
    problems.call(check_resume_keeps_lora, cfg.output_dir, cfg.train.resume, cfg.method, cfg.lora)
    if isinstance(cfg.lora.trainable_token_indices, dict) and cfg.method != "full":
        problems.add("lora.trainable_token_indices must be a list of token ids here (classify adds its own tokens to "
                     "the input embedding), not a mapping of modules")
    if cfg.tokenizer and not Path(cfg.tokenizer).is_dir():
        problems.add(f"tokenizer={cfg.tokenizer} is not a directory")
    elif cfg.tokenizer:
        problems.call(check_no_custom_code, cfg.tokenizer, "tokenizer")
    if (d.train is None) == (d.ni_task is None):
        problems.add("give exactly one of data.train (your rows) and data.ni_task (a Natural-Instructions task file)")
    for key in ("train", "eval", "ni_task"):
        value = getattr(d, key)
        if value and not Path(value).exists():
            problems.add(f"data.{key}={value} does not exist (paths are relative to where you run tune)")
    if d.ni_task and d.eval:
        problems.add("data.eval applies to data.train; an NI task holds out data.heldout_instances of its own")
    if cfg.eval.generation_baseline and not d.ni_task:
        problems.add("eval.generation_baseline compares on NI tasks (data.ni_task); your rows have no generation target")
    from data_prep.task_data import KIND_FIELDS

    fields = (*KIND_FIELDS[cfg.task.kind], "label")
    for key in cfg.data.columns:
        if key not in fields:
            problems.add(f"data.columns.{key}: not a field of task.kind={cfg.task.kind} (fields: {', '.join(fields)})")
    if cfg.task.regression and cfg.task.kind == "multiple_choice":
        problems.add("task.regression=true does not apply to multiple_choice (a choice index is no score)")
    if cfg.task.labels is not None and (len(cfg.task.labels) < 2 or len(set(cfg.task.labels)) < len(cfg.task.labels)):
        problems.add(f"task.labels must be at least two different labels, got {cfg.task.labels}")
    problems.extend((*range_problems("", cfg, {"seed": SEED_RANGE, "epochs": "> 0", "warmup_ratio": "[0, 1)"}),
                     *range_problems("task.", cfg.task, {"lm_coef": ">= 0", "head_dropout": "[0, 1)"}),
                     *range_problems("data.", d, {"heldout_fraction": "(0, 1)", "heldout_instances": ">= 1",
                                                  "max_instances": ">= 1", "max_labels": ">= 2", "max_length": ">= 8",
                                                  "seed": SEED_RANGE}),
                     *range_problems("eval.", cfg.eval, {"batch_size": ">= 1", "max_new_tokens": ">= 1"})))
    problems.extend(check_output_dir(cfg.output_dir, {"base_model": cfg.base_model, "tokenizer": cfg.tokenizer,
                                                      "data.train": d.train, "data.eval": d.eval,
                                                      "data.ni_task": d.ni_task}))
    if base is not None:
        problems.call(check_positions, "data.max_length", d.max_length, "base_model", cfg.base_model)
    problems.raise_if_any()


def load_task_data(cfg: ClassifyConfig, say):
    """(train TaskData, held-out TaskData, NI split or None): rows read and labelled; the held-out rows use the
    training label set."""
    from data_prep.task_data import dataset_label_names, ni_task_data, read_rows, to_task_data
    from tune.errors import DataError

    d, t = cfg.data, cfg.task
    if d.ni_task:
        from data_prep.natural_instructions import load_task
        from recipes.finetune import load_splits

        n_instances = len(load_task(d.ni_task).instances)
        if d.heldout_instances >= n_instances:
            raise DataError(f"data.ni_task={d.ni_task} has {n_instances} instances: data.heldout_instances="
                            f"{d.heldout_instances} leaves none to train on; set it below {n_instances}")
        splits = load_splits(generation_config(cfg, Path(cfg.output_dir)))
        task = splits["train"][0][0]
        train = ni_task_data(task, [i for _, i in splits["train"]], max_labels=d.max_labels, labels=t.labels)
        held = ni_task_data(task, [i for _, i in splits["heldout_instances"]], max_labels=d.max_labels,
                            labels=train.labels)
        say(f"{task.name}: a {train.kind} task with {len(train.labels or [])} labels"
            + (" (NI tasks set their own kind and labels: task.kind / task.regression are not used)"
               if t.kind != train.kind or t.regression else ""))
        return train, held, splits
    label_column = d.columns.get("label", "label")
    labels = t.labels or (None if t.regression else dataset_label_names(d.train, label_column, d.split))
    rows = read_rows(d.train, t.kind, d.columns, d.split)
    train = to_task_data(rows, t.kind, labels, t.regression)
    if d.eval:
        held_rows = read_rows(d.eval, t.kind, d.columns, d.eval_split, default_split="validation",
                              keys={"split": "data.eval_split"})
    else:
        import random

        order = list(range(len(rows)))
        random.Random(d.seed).shuffle(order)
        n_held = max(1, round(len(rows) * d.heldout_fraction))
        if n_held >= len(rows):
            raise DataError(f"data.train={d.train} has {len(rows)} rows: too few to hold out "
                            f"data.heldout_fraction={d.heldout_fraction} of them; give data.eval")
        held_set = set(order[:n_held])
        held_rows = [r for i, r in enumerate(rows) if i in held_set]
        rows = [r for i, r in enumerate(rows) if i not in held_set]
        train = to_task_data(rows, t.kind, train.labels if not t.regression else None, t.regression)
    held = to_task_data(held_rows, t.kind, train.labels, t.regression)
    return train, held, None


def generation_config(cfg: ClassifyConfig, run_dir: Path):
    """The finetune config of the generation baseline: the same base, method, NI task and split, steps and lr."""
    from recipes.finetune import EvalSection, FinetuneConfig, NIDataSection
    from tune.train_config import TrainConfig

    d = cfg.data
    train = TrainConfig(**{k: getattr(cfg.train, k) for k in TrainConfig.__dataclass_fields__})
    return FinetuneConfig(
        method=cfg.method, base_model=cfg.base_model, tokenizer=cfg.tokenizer, pad_token=cfg.pad_token,
        dtype=cfg.dtype, output_dir=str(run_dir / "generation_baseline"), seed=cfg.seed, overwrite=True,
        lora=cfg.lora, qlora=cfg.qlora,
        data=NIDataSection(train_tasks=[d.ni_task], max_train_instances_per_task=d.max_instances,
                           heldout_instances_per_task=d.heldout_instances, max_eval_instances_per_task=0,
                           max_length=d.max_length, packing=False, cache_dir=str(run_dir / "generation_baseline" / "cache"),
                           seed=d.seed),
        train=replace(train, resume=False), eval=EvalSection(enabled=True, batch_size=cfg.eval.batch_size,
                                                            max_new_tokens=cfg.eval.max_new_tokens,
                                                            max_instances_per_task=d.heldout_instances))


def run_tokenizer(cfg: ClassifyConfig):
    """The run's tokenizer with the task tokens (and a pad token) added: (tokenizer, token ids by role, new tokens)."""
    from tune.hf import load_tokenizer
    from tune.task_heads import add_task_tokens

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.base_model, "tokenizer" if cfg.tokenizer else "base_model",
                               pad_token=cfg.pad_token, pad_with_eos=False)
    tok = cfg.task.tokens
    ids, new = add_task_tokens(tokenizer, tok.start, tok.delimiter, tok.extract)
    return tokenizer, ids, new


def schedule(cfg: ClassifyConfig, n_train: int, world: int) -> TrainConfig:
    """cfg.train with max_steps from `epochs` and warmup_steps from `warmup_ratio` when those are set."""
    train = cfg.train
    if cfg.epochs is not None:
        per_step = train.micro_batch_size * train.grad_accum_steps * world
        train = replace(train, max_steps=max(1, math.ceil(cfg.epochs * n_train / per_step)))
    if cfg.warmup_ratio is not None:
        train = replace(train, warmup_steps=math.ceil(cfg.warmup_ratio * train.max_steps))
    return train


def schedule_lines(cfg: ClassifyConfig, given: TrainConfig, world: int) -> list[str]:
    """The schedule the run uses (cfg.train after `schedule`), and a note for each train.* value the user gave that
    epochs / warmup_ratio replaced (`given`: cfg.train before `schedule`)."""
    train, defaults, lines = cfg.train, GPT1TrainConfig(), []
    for key, setting in (("max_steps", "epochs"), ("warmup_steps", "warmup_ratio")):
        value = getattr(given, key)
        if getattr(cfg, setting) is not None and value != getattr(defaults, key) and value != getattr(train, key):
            lines.append(f"note: train.{key}={value} is replaced by {setting}={getattr(cfg, setting)} "
                         f"({getattr(train, key)}); set {setting}=null to use train.{key}")
    per_step = train.micro_batch_size * train.grad_accum_steps * world
    lines.append(f"schedule: {train.max_steps} steps of {per_step} examples ({world} process{'es' * (world > 1)}), "
                 f"warmup {train.warmup_steps}, lr {train.lr} ({train.lr_schedule})")
    return lines


def run(cfg: ClassifyConfig):
    from accelerate.utils import set_seed

    from data_prep.task_data import SpecialTokens, encode_rows
    from tune.engine import Engine, check_train_device, make_accelerator
    from tune.evaluation import write_json_atomic
    from tune.recipe_utils import prepare_output_dir
    from tune.task_heads import TaskBatches, task_loss_fn, val_metrics

    validate(cfg)
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.num_threads)
    check_train_device(cfg.train, accelerator.device)
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    # Everything that can reject the input runs before the output directory is touched.
    tokenizer, token_ids, new_tokens = run_tokenizer(cfg)
    train_data, held_data, splits = load_task_data(cfg, say)
    special = SpecialTokens(**token_ids)
    train_set, n_cut = encode_rows(train_data, tokenizer, special, cfg.data.max_length)
    held_set, n_cut_held = encode_rows(held_data, tokenizer, special, cfg.data.max_length)
    for warning in data_warnings(train_data, train_set, tokenizer, cfg):
        say(warning)
    given_train = cfg.train
    cfg = replace(cfg, task=replace(cfg.task, kind=train_data.kind, labels=train_data.labels,
                                    regression=train_data.regression),
                  train=schedule(cfg, len(train_set), accelerator.num_processes))
    check_resumed_task(cfg)
    run_dir = prepare_output_dir(cfg, accelerator, inputs=[cfg.base_model, cfg.tokenizer])
    set_seed(cfg.seed)
    labels = train_data.labels
    say(f"{train_data.kind}: {len(train_set)} training rows, {len(held_set)} held out"
        + (f", {len(labels)} labels ({', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})" if labels else "")
        + f"; truncated to data.max_length={cfg.data.max_length}: {n_cut} training and {n_cut_held} held-out rows")
    for line in schedule_lines(cfg, given_train, accelerator.num_processes):
        say(line)
    if new_tokens:
        say(f"new tokens (embedding rows trained): {', '.join(new_tokens)}")

    model = build_model(cfg, tokenizer, token_ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"{cfg.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    source = TaskBatches(train_set, held_set, cfg.train.micro_batch_size, cfg.train.grad_accum_steps, seed=cfg.seed,
                         pad_id=tokenizer.pad_token_id, kind=train_data.kind, regression=train_data.regression)
    engine = Engine(cfg.train, run_dir, model, source, loss_fn=task_loss_fn(cfg.task.lm_coef, train_data.regression),
                    accelerator=accelerator, log=say, rebuild=lambda: build_model(cfg, tokenizer, token_ids),
                    run_config=cfg)
    engine.val_metrics = val_metrics  # held-out accuracy and macro-F1 (or Pearson) at every evaluation
    result = engine.fit()

    if accelerator.is_main_process:
        model = result.model.eval()
        for stale in ("model", "adapter", "hf"):  # an earlier run's artifacts (overwrite=true) never mix with these
            shutil.rmtree(run_dir / stale, ignore_errors=True)
        out = save_trained(cfg, model, tokenizer, token_ids, run_dir / ("model" if cfg.method == "full" else "adapter"))
        say(f"saved {'model' if cfg.method == 'full' else 'adapter'} to {out}")
        if cfg.export:
            hf_dir, hf_class = export_run(cfg, model, tokenizer, out, run_dir / "hf")
            say(f"exported {hf_class} to {hf_dir}")
        results = evaluate_run(cfg, model, tokenizer, train_data, held_data, held_set, run_dir, say)
    accelerator.wait_for_everyone()
    if cfg.eval.generation_baseline:  # on every process: the finetune recipe trains on all of them
        generation = generation_baseline(cfg, run_dir, say)
        if accelerator.is_main_process:
            results["generation"] = generation
    if accelerator.is_main_process:
        write_json_atomic(run_dir / "eval_results.json", results)  # strict JSON: an undefined metric is null
        say("\n" + format_results(results))
    accelerator.wait_for_everyone()
    return result


def data_warnings(data, examples, tokenizer, cfg: ClassifyConfig) -> list[str]:
    """`warning:` lines about the training rows: text the tokenizer cannot represent (its unk token), and number labels
    that look like scores trained as classes (task.regression=true is probably meant)."""
    from tune.hf import unknown_token_id, unknown_token_warning

    warnings = []
    unk = unknown_token_id(tokenizer)
    if unk is not None:
        tokens = [t for ex in examples for seq in ex.sequences for t in seq]
        warning = unknown_token_warning(sum(t == unk for t in tokens) / max(len(tokens), 1),
                                        cfg.tokenizer or cfg.base_model)
        if warning:
            warnings.append(warning)
    values = _numeric(data.labels) if data.labels else None
    if values is not None and (any(v != int(v) for v in values) or len(values) > max(20, len(data.rows) // 2)):
        warnings.append(f"warning: the {len(values)} labels are numbers ({', '.join(data.labels[:5])}, ...) and are "
                        "trained as that many classes; for scores set task.regression=true")
    return warnings


def check_resumed_task(cfg: ClassifyConfig) -> None:
    """ConfigError when train.resume continues a run trained on another task kind, label set or scores / classes: its
    head would be read with another meaning (or not fit)."""
    from tune.config import read_yaml
    from tune.errors import ConfigError

    saved = Path(cfg.output_dir) / "config.yaml"
    if not cfg.train.resume or not saved.is_file():
        return
    before = read_yaml(saved).get("task", {})
    now = {"kind": cfg.task.kind, "labels": cfg.task.labels, "regression": cfg.task.regression}
    changed = [f"task.{k}: {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]
    if changed:
        raise ConfigError(f"train.resume: output_dir={cfg.output_dir} trained a head for other data ({'; '.join(changed)});"
                          " resume with the same data, or start afresh with overwrite=true or another output_dir")


def build_model(cfg: ClassifyConfig, tokenizer, token_ids: dict[str, int]):
    """The base model grown to the tokenizer's vocabulary, wrapped as configured (full, or LoRA / QLoRA with the
    task tokens' embedding rows trainable), with the head on top (always trained)."""
    from tune.adapters import add_lora, attention_implementation, load_base_model
    from tune.hf import resolve_dtype
    from tune.task_heads import TaskHeadModel, resize_embeddings

    attn, _ = attention_implementation(cfg.base_model)  # sdpa, or eager for a class without it (OpenAIGPT)
    lm = load_base_model(cfg.base_model, cfg.method, resolve_dtype(cfg.dtype), cfg.qlora,
                         cfg.train.gradient_checkpointing, attn_implementation=attn)
    resize_embeddings(lm, len(tokenizer))
    head = lm.get_output_embeddings()
    if cfg.task.lm_coef == 0 and head is not None and head.weight is not lm.get_input_embeddings().weight:
        head.requires_grad_(False)  # no LM loss: an untied output head gets no gradient (DDP refuses unused parameters)
    if cfg.method in ("lora", "qlora"):
        lm = add_lora(lm, cfg.lora, trainable_token_indices=sorted(set(token_ids.values())))
    return TaskHeadModel(lm, cfg.task.kind, n_outputs(cfg.task), dropout=cfg.task.head_dropout)


def n_outputs(task: TaskSection) -> int:
    """The head's outputs: one per label, or one score (regression; one per choice for multiple choice)."""
    return 1 if task.regression or task.kind == "multiple_choice" else len(task.labels or [])


def task_meta(cfg: ClassifyConfig, tokenizer, token_ids: dict[str, int], fmt: str) -> dict:
    """What a saved task model needs besides weights (tune.task_heads.TASK_FILE)."""
    t = cfg.task
    return {"format": fmt, "kind": t.kind, "labels": t.labels, "regression": t.regression, "n_outputs": n_outputs(t),
            "tokens": {"start": t.tokens.start, "delimiter": t.tokens.delimiter, "extract": t.tokens.extract},
            "token_ids": token_ids, "max_length": cfg.data.max_length, "method": cfg.method,
            "base_model": str(Path(cfg.base_model).resolve()),
            **({"qlora": dataclasses.asdict(cfg.qlora)} if cfg.method == "qlora" else {})}


def save_trained(cfg: ClassifyConfig, model, tokenizer, token_ids, out: Path) -> Path:
    """The causal LM (full) or the adapter with the task tokens' rows (LoRA / QLoRA) in `out`, with the head,
    task.json and the tokenizer."""
    from tune.hf import quiet_third_party
    from tune.task_heads import save_head

    with quiet_third_party():
        # an adapter needs no copy of the grown embedding table: resize_embeddings rebuilds the same rows on load, and
        # the task tokens' trained rows are in the adapter (peft's trainable tokens)
        model.lm.save_pretrained(out, **({"safe_serialization": True} if cfg.method == "full" else
                                         {"save_embedding_layers": False}))
    tokenizer.save_pretrained(out)
    save_head(model, out, task_meta(cfg, tokenizer, token_ids, "causal_lm" if cfg.method == "full" else "peft_adapter"))
    return out


def export_run(cfg: ClassifyConfig, model, tokenizer, saved: Path, out: Path) -> tuple[Path, str]:
    """The standard HF checkpoint of the trained task model (tune.task_heads.export_hf); LoRA / QLoRA adapters are
    merged first (QLoRA: into the dequantized 4-bit weights it trained on)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tune.adapters import merge_adapter
    from tune.hf import quiet_third_party
    from tune.task_heads import export_hf, read_task_meta

    meta = {k: v for k, v in read_task_meta(saved).items() if k != "format"}
    if cfg.method == "full":
        return export_hf(model, model.lm, tokenizer, meta, out)
    merged_dir = out.parent / (out.name + ".merged-tmp")
    merge_adapter(cfg.base_model, saved, merged_dir, torch.float32, cfg.qlora if cfg.method == "qlora" else None,
                  vocab_size=len(tokenizer))
    try:
        with quiet_third_party():
            lm = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, trust_remote_code=False)
        return export_hf(model, lm, tokenizer, meta, out)
    finally:
        shutil.rmtree(merged_dir, ignore_errors=True)


def export_checkpoint(cfg: ClassifyConfig, run_dir: Path, checkpoint: Path, out: Path) -> Path:
    """One checkpoint of a classify run as the run saves its end: model/ or adapter/ with the head."""
    from tune.engine import read_checkpoint_weights

    tokenizer, token_ids, _ = run_tokenizer(cfg)
    model = build_model(cfg, tokenizer, token_ids)
    model.load_state_dict(read_checkpoint_weights(checkpoint, model), strict=False)
    return save_trained(cfg, model.eval(), tokenizer, token_ids, out)


def majority_baseline(train_data, held_data) -> dict:
    """Predicting the most frequent training label (regression: the training mean) for every held-out row."""
    from collections import Counter

    if train_data.regression:
        mean = sum(train_data.targets) / len(train_data.targets)
        return {"predictions": [mean] * len(held_data.targets), "label": f"{mean:.3f}"}
    top = Counter(train_data.targets).most_common(1)[0][0]
    name = train_data.labels[top] if train_data.labels else f"choice {top}"
    return {"predictions": [top] * len(held_data.targets), "label": name}


def scores(held_data, predictions, probabilities=None) -> dict:
    """Held-out metrics (x100): accuracy and macro-F1 for labels and choices; Pearson / Spearman (and MSE, not
    x100) for scores, and for labels that are all numbers (on the probability-weighted label value)."""
    from tune.metrics import load_metric

    refs = held_data.targets
    if held_data.regression:
        out = load_metric("correlation").compute(predictions=[float(p) for p in predictions],
                                                 references=[float(r) for r in refs])
        out["mse"] = sum((float(p) - float(r)) ** 2 for p, r in zip(predictions, refs)) / max(len(refs), 1)
        return out
    out = load_metric("classification").compute(predictions=[int(p) for p in predictions],
                                                references=[int(r) for r in refs])
    values = _numeric(held_data.labels)
    if values is not None and probabilities is not None:
        expected = [sum(p * v for p, v in zip(row, values)) for row in probabilities.tolist()]
        out.update(load_metric("correlation").compute(predictions=expected, references=[values[r] for r in refs]))
    return out


def _numeric(labels):
    try:
        return [float(x) for x in labels] if labels else None
    except ValueError:
        return None


def evaluate_run(cfg: ClassifyConfig, model, tokenizer, train_data, held_data, held_set, run_dir: Path, say) -> dict:
    """Held-out metrics of the trained head beside the majority-class baseline, with per-row predictions in
    run_dir/predictions.jsonl."""
    from tune.task_heads import predict

    out = predict(model, held_set, tokenizer.pad_token_id, held_data.regression, cfg.eval.batch_size)
    predictions = out.tolist() if held_data.regression else out.argmax(-1).tolist()
    base = majority_baseline(train_data, held_data)
    with open(run_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for row, pred, ref, prob in zip(held_data.rows, predictions, held_data.targets, out.tolist()):
            f.write(json.dumps({"where": row.where, "prediction": _name(held_data, pred), "reference": _name(held_data, ref),
                                **({} if held_data.regression else {"probabilities": prob})}, ensure_ascii=False) + "\n")
    return {"task": Path(cfg.data.ni_task).stem if cfg.data.ni_task else str(cfg.data.train), "kind": held_data.kind,
            "labels": held_data.labels, "heldout_rows": len(held_set), "method": cfg.method,
            "lm_coef": cfg.task.lm_coef, "steps": cfg.train.max_steps,
            "majority": {"label": base["label"], **scores(held_data, base["predictions"])},
            "task_head": scores(held_data, predictions, None if held_data.regression else out)}


def _name(data, value):
    if data.regression:
        return value
    return data.labels[value] if data.labels else value


def generation_baseline(cfg: ClassifyConfig, run_dir: Path, say) -> dict:
    """Fine-tune the same base the generation way on the same NI split (recipes.finetune, same steps and lr): its
    exact match / ROUGE-L on the same held-out instances."""
    from recipes import finetune

    say("\ngeneration baseline: tune run finetune on the same split, steps and lr")
    gen_cfg = generation_config(cfg, run_dir)
    finetune.run(gen_cfg)
    gen = json.loads((Path(gen_cfg.output_dir) / "eval_results.json").read_text(encoding="utf-8"))
    task = Path(cfg.data.ni_task).stem
    row = gen["heldout_instances"]["tasks"][task]
    return {"exact_match": row["exact_match"], "rougeL": row["rougeL"], "heldout_rows": row["n"]}


def format_results(results: dict) -> str:
    """One table: the task head, the majority class and (NI) the generation baseline on the same held-out rows."""
    columns = ["accuracy", "macro_f1", "pearson", "spearman", "mse", "exact_match", "rougeL"]
    rows = [(f"task head ({results['method']}, lm_coef={results['lm_coef']})", results["task_head"]),
            (f"majority ({results['majority']['label']})", results["majority"])]
    if "generation" in results:
        rows.append((f"generation ({results['method']}, tune run finetune)", results["generation"]))
    shown = [c for c in columns if any(c in r for _, r in rows)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{results['task']}: {results['kind']}, {results['heldout_rows']} held-out rows",
             f"{'':<{width}}  " + "  ".join(f"{c:>11}" for c in shown)]
    for name, r in rows:
        cells = [f"{r[c]:>11.2f}" if isinstance(r.get(c), (int, float)) and r.get(c) == r.get(c) else f"{'-':>11}"
                 for c in shown]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)
