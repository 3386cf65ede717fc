"""Fine-tune any local HF causal LM on Natural-Instructions tasks: full, LoRA or QLoRA.

    tune run finetune --config lora_ni [key=value ...]

Steps: tokenizer -> NI tasks split into train / held-out instances / held-out tasks -> prompts
tokenized (prompt masked) and packed -> base model (+ LoRA, + 4-bit) -> the shared engine ->
adapter (or full model), optional merged checkpoint, generation-based evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tune.config import os_errors_as_config_errors
from tune.train_config import LoraSection, QuantSection, TrainConfig


@dataclass
class PromptSection:
    num_pos: int = 2  # Tk-Instruct default: definition + 2 positive examples, then the instance
    num_neg: int = 0
    add_explanation: bool = False
    add_definition: bool = True
    template: str | None = None  # custom format string with {definition}, {examples}, {input}


@dataclass
class NIDataSection:
    # a directory, split file or list of task files; builtin:demo = the built-in demo tasks (data_prep/demo.py)
    train_tasks: str | list[str] = "../shared/data/natural_instructions/tasks"
    eval_tasks: str | list[str] | None = None  # held-out tasks, never trained on
    tasks_dir: str | None = None  # where names in split files resolve (default: <split file dir>/tasks)
    max_train_instances_per_task: int | None = None
    heldout_instances_per_task: int = 10  # per training task: val loss and evaluation, never trained on
    max_eval_instances_per_task: int = 100
    prompt: PromptSection = field(default_factory=PromptSection)
    max_length: int = 1024
    mask_prompt: bool = True  # loss only on the output tokens (and eos)
    packing: bool = True  # several examples per row, no attention across them
    # how packed rows keep examples apart: flex = (B, L) document ids, flex_attention on CUDA (a mask built from the
    # ids elsewhere); dense = a (B, 1, L, L) mask made by the collator (O(L^2) per row, no flash kernel)
    packed_attention: Literal["flex", "dense"] = "flex"
    cache_dir: str = ".cache/ni"
    seed: int = 0


@dataclass
class EvalSection:
    enabled: bool = True  # generation-based ROUGE-L / exact match on held-out instances and tasks at the end
    batch_size: int = 8
    max_new_tokens: int = 32
    max_instances_per_task: int = 20


@dataclass
class FinetuneConfig:
    recipe: Literal["finetune"] = "finetune"
    method: Literal["full", "lora", "qlora"] = "lora"
    base_model: str = "runs/shakespeare_bpe_cpu/hf"  # any local HF causal-LM directory
    tokenizer: str | None = None  # default: the base model's directory
    pad_token: str | None = None  # for tokenizers without one, e.g. "<|endoftext|>" (GPT-2) — padding is masked
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # weights of the base (full: the trained weights)
    output_dir: str = "runs/finetune"
    seed: int = 1337
    overwrite: bool = False
    merge: bool = False  # also write a merged full checkpoint (lora / qlora)
    lora: LoraSection = field(default_factory=LoraSection)
    qlora: QuantSection = field(default_factory=QuantSection)
    data: NIDataSection = field(default_factory=NIDataSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)


CONFIG_CLASS = FinetuneConfig


@os_errors_as_config_errors
def validate(cfg: FinetuneConfig) -> None:
    """Cheap checks before any heavy work (config.json read as JSON, no weights, no torch): paths exist, the
    base is a causal LM, sizes are sane. Every problem is reported, in one ConfigError."""
    from tune.config import SEED_RANGE, range_problems
    from tune.errors import Problems
    from tune.hf import check_model_dir, check_moe_lora_dropout, check_no_custom_code, stored_quant
    from tune.recipe_utils import check_file_free_dir, check_output_dir, empty_path_problems, ni_task_inputs

    problems = Problems()
    problems.extend((*empty_path_problems(cfg, ["output_dir", "base_model", "tokenizer", "data.train_tasks",
                                                "data.eval_tasks", "data.tasks_dir", "data.cache_dir"]),
                     *check_file_free_dir("data.cache_dir", cfg.data.cache_dir)))
    base = problems.call(check_model_dir, cfg.base_model, "base_model")
    if cfg.tokenizer and not Path(cfg.tokenizer).is_dir():
        problems.add(f"tokenizer={cfg.tokenizer} is not a directory")
    elif cfg.tokenizer:
        problems.call(check_no_custom_code, cfg.tokenizer, "tokenizer")
    check_task_paths(cfg.data, problems)
    check_ni_numbers(cfg.data, problems)
    problems.extend(check_output_dir(cfg.output_dir, {"base_model": cfg.base_model, "tokenizer": cfg.tokenizer,
                                                      **ni_task_inputs(cfg.data)}))
    problems.extend((*range_problems("", cfg, {"seed": SEED_RANGE}),
                     *range_problems("eval.", cfg.eval, {"batch_size": ">= 1", "max_new_tokens": ">= 1",
                                                         "max_instances_per_task": ">= 1"})))
    if base is not None:
        problems.call(check_positions, "data.max_length", cfg.data.max_length, "base_model", cfg.base_model)
    if cfg.method == "full" and cfg.merge:
        problems.add("merge=true applies to lora/qlora; a full fine-tune already writes a full checkpoint")
    if base is not None and cfg.method != "full":
        problems.call(check_moe_lora_dropout, cfg.lora, base)
    quantized = problems.call(stored_quant, base) if base is not None else None
    if quantized:
        problems.add(f"base_model={cfg.base_model} is a quantized checkpoint ({quantized}, e.g. `tune "
                     "quantize` output): fine-tune the full-precision model it was made from (method=qlora "
                     "quantizes it to 4-bit as it loads)")
    problems.raise_if_any()


def check_task_paths(d: NIDataSection, problems) -> None:
    """Record every data.train_tasks / data.eval_tasks entry that does not exist."""
    for key in ("train_tasks", "eval_tasks"):
        value = getattr(d, key)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item != BUILTIN_TASKS and not Path(item).exists() and d.tasks_dir is None:
                problems.add(f"data.{key}: {item} does not exist (paths are relative to where you run tune)")


def check_ni_numbers(d: NIDataSection, problems, prompts: bool = True) -> None:
    """Record every number of the NI data section (and its prompt) out of its range (max_length: when `prompts`
    are built from it)."""
    from tune.config import SEED_RANGE, range_problems

    if prompts and d.max_length < 16:
        problems.add(f"data.max_length={d.max_length} leaves no room for a prompt; use >= 128")
    problems.extend((*range_problems("data.", d, {"max_train_instances_per_task": ">= 0",
                                                  "heldout_instances_per_task": ">= 0",
                                                  "max_eval_instances_per_task": ">= 0", "seed": SEED_RANGE}),
                     *range_problems("data.prompt.", d.prompt, {"num_pos": ">= 0", "num_neg": ">= 0"})))


def check_positions(length_key: str, length: int, model_key: str, model_dir) -> None:
    """A ConfigError if `length` tokens do not fit the learned position table of the HF model in `model_dir`."""
    from tune.errors import ConfigError
    from tune.hf import position_table_size

    table = position_table_size(model_dir)
    if table is not None and length > table:
        raise ConfigError(f"{length_key}={length} is longer than the position table of {model_key}={model_dir} "
                          f"({table} positions); set {length_key} <= {table}")


BUILTIN_TASKS = "builtin:demo"  # data.train_tasks / data.eval_tasks: the tasks of data_prep/demo.py


def task_source(source, cache_dir: str):
    """A data.train_tasks / data.eval_tasks value with builtin:demo (alone or in a list) replaced by the directory
    the built-in demo tasks are written to, <cache_dir>/builtin/demo_tasks (as pretrain's data.corpus=builtin:demo
    is written to its cache); other entries are returned as they are."""
    from data_prep.demo import write_demo_tasks

    def resolve(item):
        return str(write_demo_tasks(Path(cache_dir) / "builtin" / "demo_tasks")) if item == BUILTIN_TASKS else item

    return [resolve(item) for item in source] if isinstance(source, list) else resolve(source)


def load_splits(cfg: FinetuneConfig):
    from data_prep.natural_instructions import NISplitConfig, load_tasks, split_instances

    d = cfg.data
    train_tasks, eval_tasks = task_source(d.train_tasks, d.cache_dir), task_source(d.eval_tasks, d.cache_dir)
    tasks = load_tasks(train_tasks, d.tasks_dir)
    held_out = load_tasks(eval_tasks, d.tasks_dir) if eval_tasks else []
    if isinstance(train_tasks, str) and Path(train_tasks).is_dir():  # a directory: all its tasks but the held-out
        tasks = [t for t in tasks if t.name not in {h.name for h in held_out}]
    return split_instances(tasks + held_out, NISplitConfig(
        train_tasks=[t.name for t in tasks], eval_tasks=[t.name for t in held_out],
        max_train_instances_per_task=d.max_train_instances_per_task,
        max_eval_instances_per_task=d.max_eval_instances_per_task,
        heldout_instances_per_task=d.heldout_instances_per_task, seed=d.seed))


def prompt_config(d: NIDataSection):
    from data_prep.natural_instructions import PromptConfig

    p = d.prompt
    return PromptConfig(num_pos=p.num_pos, num_neg=p.num_neg, add_explanation=p.add_explanation,
                        add_definition=p.add_definition, template=p.template)


DROPPED_WARN_FRACTION = 0.1  # warn when more than this fraction of the training examples cannot fit max_length


def dropped_examples_warning(dropped: int, total: int, max_length: int) -> str | None:
    """A `warning:` line when more than DROPPED_WARN_FRACTION of `total` examples were dropped because their
    instance + target alone exceed `max_length` tokens; None otherwise."""
    if total == 0 or dropped / total <= DROPPED_WARN_FRACTION:
        return None
    return (f"warning: {dropped} of {total} training examples ({dropped / total:.0%}) do not fit "
            f"data.max_length={max_length} even without demonstrations and are not trained on; raise data.max_length "
            "(up to the base's context), or use a tokenizer that needs fewer tokens for this text")


def build_ni_datasets(d: NIDataSection, splits, tokenizer, accelerator, say):
    """Tokenized (cached) training and held-out-instance datasets, and the prompt config they were built with."""
    from data_prep.natural_instructions import TokenizeConfig, build_dataset
    from tune.hf import unknown_token_warning

    prompt_cfg = prompt_config(d)
    tok_cfg = TokenizeConfig(max_length=d.max_length, mask_prompt=d.mask_prompt)
    with accelerator.main_process_first():
        train_set, report = build_dataset(splits["train"], tokenizer, prompt_cfg, tok_cfg, d.cache_dir)
        val_set, _ = build_dataset(splits["heldout_instances"], tokenizer, prompt_cfg, tok_cfg, d.cache_dir)
    say(f"train: {report}")
    warning = unknown_token_warning(report.unknown_rate, getattr(tokenizer, "name_or_path", "") or "(given)")
    if warning:
        say(warning)
    warning = dropped_examples_warning(report.dropped, report.total, d.max_length)
    if warning:
        say(warning)
    say(f"held out: {len(val_set)} instances of training tasks (val loss), {len(splits['heldout_tasks'])} instances "
        f"of {len({t.name for t, _ in splits['heldout_tasks']})} unseen tasks")
    return train_set, val_set, prompt_cfg


def run(cfg: FinetuneConfig):
    from accelerate.utils import set_seed

    from tune.packing import PACKED_ATTENTION, NIBatches
    from tune.adapters import attention_implementation, merge_adapter
    from tune.engine import Engine, check_train_device, make_accelerator
    from tune.hf import experts_note, resolve_dtype
    from tune.recipe_utils import prepare_output_dir

    validate(cfg)
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.num_threads)
    check_train_device(cfg.train, accelerator.device)  # before the output directory is touched
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    # Everything that can reject the input runs before the output directory is touched.
    tokenizer = run_tokenizer(cfg)
    splits = load_splits(cfg)
    run_dir = prepare_output_dir(cfg, accelerator, inputs=[cfg.base_model, cfg.tokenizer])
    set_seed(cfg.seed)

    train_set, val_set, prompt_cfg = build_ni_datasets(cfg.data, splits, tokenizer, accelerator, say)

    weights_dtype = resolve_dtype(cfg.dtype)
    model = build_model(cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"{cfg.method}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    if cfg.method == "qlora" and (note := experts_note(model, cfg.qlora.quant_type)):
        say(note)
    if cfg.data.packing:
        say(attention_implementation(cfg.base_model, cfg.data.packed_attention)[1])

    d = cfg.data
    source = NIBatches(train_set, val_set, cfg.train.micro_batch_size, cfg.train.grad_accum_steps,
                       seed=cfg.seed, packing=d.packing, max_length=d.max_length, pad_id=tokenizer.pad_token_id,
                       mask_mode=PACKED_ATTENTION[d.packed_attention])
    result = Engine(cfg.train, run_dir, model, source, accelerator=accelerator, log=say,
                    rebuild=lambda: build_model(cfg), run_config=cfg).fit()

    if accelerator.is_main_process:
        model = result.model  # unsharded (the same module unless FSDP trained it)
        model.eval()
        out = save_trained(cfg, model, tokenizer, run_dir / ("model" if cfg.method == "full" else "adapter"))
        say(f"saved {'model' if cfg.method == 'full' else 'adapter'} to {out}")
        if cfg.merge:
            merged = merge_adapter(cfg.base_model, out, run_dir / "merged", dtype=weights_dtype,
                                   quant=cfg.qlora if cfg.method == "qlora" else None, tokenizer=tokenizer)
            say(f"merged checkpoint: {merged}")
        if cfg.eval.enabled:
            evaluate_run(cfg, model, tokenizer, splits, prompt_cfg, run_dir, say)
    accelerator.wait_for_everyone()
    return result


def run_tokenizer(cfg: FinetuneConfig):
    """The tokenizer of the run (cfg.tokenizer, else the base model's), with its pad token checked."""
    from tune.hf import load_tokenizer

    return load_tokenizer(cfg.tokenizer or cfg.base_model, "tokenizer" if cfg.tokenizer else "base_model",
                          pad_token=cfg.pad_token, pad_with_eos=False)


def build_model(cfg: FinetuneConfig):
    """The base model as configured (full, or wrapped with LoRA / QLoRA adapters)."""
    from tune.adapters import add_lora, attention_implementation, load_base_model
    from tune.hf import resolve_dtype

    attn, _ = attention_implementation(cfg.base_model, cfg.data.packed_attention)
    base = load_base_model(cfg.base_model, cfg.method, resolve_dtype(cfg.dtype), cfg.qlora, cfg.train.gradient_checkpointing,
                           attn_implementation=attn)
    return add_lora(base, cfg.lora) if cfg.method in ("lora", "qlora") else base


def save_trained(cfg: FinetuneConfig, model, tokenizer, out: Path) -> Path:
    """The full model (method=full) or the PEFT adapter directory, with the tokenizer."""
    from tune.hf import quiet_third_party

    if cfg.method == "full":
        with quiet_third_party():
            model.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_checkpoint(cfg: FinetuneConfig, run_dir: Path, checkpoint: Path, out: Path) -> Path:
    """One checkpoint of a fine-tuning run as the run saves its end: adapter directory or full model."""
    from tune.engine import read_checkpoint_weights

    tokenizer = run_tokenizer(cfg)
    model = build_model(cfg)
    model.load_state_dict(read_checkpoint_weights(checkpoint, model), strict=False)
    return save_trained(cfg, model.eval(), tokenizer, out)


def evaluate_run(cfg: FinetuneConfig, model, tokenizer, splits, prompt_cfg, run_dir: Path, say) -> dict:
    """ROUGE-L / exact match on held-out instances and held-out tasks, saved to eval_results.json."""
    import json

    from tune.evaluation import evaluate_tasks, format_table

    results = {}
    for name in ("heldout_instances", "heldout_tasks"):
        pairs = _cap_per_task(splits[name], cfg.eval.max_instances_per_task)
        if not pairs:
            continue
        results[name] = evaluate_tasks(model, tokenizer, pairs, prompt_cfg, batch_size=cfg.eval.batch_size,
                                       max_new_tokens=cfg.eval.max_new_tokens)
        say(f"\n{name.replace('_', ' ')}:\n{format_table(results[name])}")
    tmp = run_dir / "eval_results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(run_dir / "eval_results.json")
    return results


def _cap_per_task(pairs, cap: int):
    counts: dict[str, int] = {}
    kept = []
    for task, instance in pairs:
        if counts.get(task.name, 0) < cap:
            counts[task.name] = counts.get(task.name, 0) + 1
            kept.append((task, instance))
    return kept
