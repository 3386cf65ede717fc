"""Fine-tune any local HF causal LM on Natural-Instructions tasks or your own instruction rows (alpaca,
prompt_completion, chat, text: data.kind, data_prep/instructions.py): full, LoRA or QLoRA.

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
    # ni: Natural-Instructions tasks (train_tasks ...); alpaca / prompt_completion / chat / text: your rows in
    # data.train (README: Data formats; data_prep/instructions.py)
    kind: Literal["ni", "alpaca", "prompt_completion", "chat", "text"] = "ni"
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
    # kinds other than ni: .json / .jsonl / .csv / .parquet files or save_to_disk folders (one path or a list)
    train: str | list[str] | None = None
    eval: str | list[str] | None = None  # held-out rows in the same form; default: data.heldout_fraction of data.train
    split: str | None = None  # the split of a DatasetDict folder in data.train (null: "train")
    eval_split: str | None = None  # the split of a DatasetDict folder in data.eval (null: "validation")
    columns: dict[str, str] = field(default_factory=dict)  # the column map: our field -> your column, {output: answer}
    heldout_fraction: float = 0.1  # of data.train's rows (seeded by data.seed), when there is no data.eval
    heldout_rows: int | None = None  # a number of rows instead of data.heldout_fraction
    template: str | None = None  # alpaca: a format string with {instruction} (and {input}); prompt_completion: {prompt}
    chat_template: str | None = None  # chat: a Jinja template file (default: the tokenizer's own chat template)
    # which tokens are trained on: completion (the output / completion; chat: every assistant reply, as
    # all_assistant), last_assistant (chat: the final reply only) or all; eos / end-of-turn always a target
    train_on: Literal["completion", "all_assistant", "last_assistant", "all"] = "completion"


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
    from tune.recipe_utils import check_file_free_dir, check_output_dir, empty_path_problems
    from data_prep.instructions import chat_template_problem
    from tune.hf import read_model_config
    from tune.train_config import check_resume_keeps_lora, lora_init_problem, lora_model_problems

    problems = Problems()
    problems.extend((*empty_path_problems(cfg, ["output_dir", "base_model", "tokenizer", "data.train_tasks",
                                                "data.eval_tasks", "data.tasks_dir", "data.cache_dir", "data.train",
                                                "data.eval", "data.chat_template"]),
                     *check_file_free_dir("data.cache_dir", cfg.data.cache_dir)))
    base = problems.call(check_model_dir, cfg.base_model, "base_model")
    if cfg.tokenizer and not Path(cfg.tokenizer).is_dir():
        problems.add(f"tokenizer={cfg.tokenizer} is not a directory")
    elif cfg.tokenizer:
        problems.call(check_no_custom_code, cfg.tokenizer, "tokenizer")
    check_data_sources(cfg.data, problems)
    if problem := chat_template_problem(cfg.data.kind, cfg.data.chat_template, cfg.tokenizer or cfg.base_model,
                                        "tokenizer" if cfg.tokenizer else "base_model"):
        problems.add(problem)
    check_ni_numbers(cfg.data, problems)
    problems.extend(check_output_dir(cfg.output_dir, {"base_model": cfg.base_model, "tokenizer": cfg.tokenizer,
                                                      **data_inputs(cfg.data)}))
    problems.extend((*range_problems("", cfg, {"seed": SEED_RANGE}),
                     *range_problems("eval.", cfg.eval, {"batch_size": ">= 1", "max_new_tokens": ">= 1",
                                                         "max_instances_per_task": ">= 1"})))
    if base is not None:
        problems.call(check_positions, "data.max_length", cfg.data.max_length, "base_model", cfg.base_model)
    if cfg.method == "full" and cfg.merge:
        problems.add("merge=true applies to lora/qlora; a full fine-tune already writes a full checkpoint")
    if base is not None and cfg.method != "full":
        problems.call(check_moe_lora_dropout, cfg.lora, base)
    if init_problem := lora_init_problem(cfg.lora, cfg.method):
        problems.add(init_problem)
    problems.call(check_resume_keeps_lora, cfg.output_dir, cfg.train.resume, cfg.method, cfg.lora)
    model_config = problems.call(read_model_config, base) if base is not None else None
    problems.extend(lora_model_problems(cfg.lora, cfg.method, model_config or {}, cfg.train.loraplus_lr_ratio))
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


def check_data_sources(d: NIDataSection, problems) -> None:
    """Record the problems of the data section's sources: NI task paths (data.kind=ni), else data.train / data.eval
    files that do not exist or lack a column the kind needs, a data.columns key that is not a field of the kind, a
    data.template / data.train_on that does not fit it, a missing data.chat_template file. Cheap: no torch, at most
    a file's header is read."""
    from data_prep import instructions as formats

    if d.kind == "ni":
        check_task_paths(d, problems)
        if d.train_on not in ("completion", "all"):
            problems.add(f"data.train_on={d.train_on} applies to data.kind=chat; for NI tasks use completion or all")
        given = [key for key in ("train", "eval", "chat_template", "template") if getattr(d, key) is not None]
        if given:
            problems.add(f"data.{given[0]} applies to your rows (data.kind=alpaca, prompt_completion, chat or text); "
                         "NI tasks are data.train_tasks / data.eval_tasks: set data.kind or drop it")
        return
    if d.eval_tasks is not None:
        problems.add(f"data.eval_tasks names NI tasks, which data.kind={d.kind} does not read; held-out rows come from "
                     "data.eval (or data.heldout_fraction of data.train): set data.eval_tasks=null")
    if not d.train:
        problems.add(f"data.kind={d.kind} reads your rows from data.train (.json / .jsonl / .csv / .parquet files or "
                     "a save_to_disk folder); set it (README: Data formats)")
    splits = {"data.train": formats.SplitChoice(d.split, "train", "data.split"),
              "data.eval": formats.SplitChoice(d.eval_split, "validation", "data.eval_split")}
    problems.extend(formats.source_problems(d.kind, {"data.train": d.train, "data.eval": d.eval}, d.columns,
                                            d.template, d.chat_template, d.train_on, d.mask_prompt, splits))


def data_inputs(d: NIDataSection) -> dict[str, list]:
    """The paths the data section reads, by key (check_output_dir keeps a run from writing among them)."""
    from data_prep.instructions import data_files
    from tune.recipe_utils import ni_task_inputs

    if d.kind == "ni":
        return ni_task_inputs(d)
    return {"data.train": [str(p) for p in data_files(d.train)], "data.eval": [str(p) for p in data_files(d.eval)],
            "data.chat_template": [d.chat_template]}


def check_ni_numbers(d: NIDataSection, problems, prompts: bool = True) -> None:
    """Record every number of the NI data section (and its prompt) out of its range (max_length: when `prompts`
    are built from it)."""
    from tune.config import SEED_RANGE, range_problems

    if prompts and d.max_length < 16:
        problems.add(f"data.max_length={d.max_length} leaves no room for a prompt; use >= 128")
    problems.extend((*range_problems("data.", d, {"max_train_instances_per_task": ">= 0",
                                                  "heldout_instances_per_task": ">= 0",
                                                  "max_eval_instances_per_task": ">= 0", "seed": SEED_RANGE,
                                                  "heldout_fraction": "[0, 1)", "heldout_rows": ">= 0"}),
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


def report_warnings(report, tokenizer, max_length: int) -> list[str]:
    """The `warning:` lines of a tokenization report (NI's TruncationReport or the rows' FormatReport): too many
    unknown tokens for the tokenizer, too many examples dropped for data.max_length."""
    from tune.hf import unknown_token_warning

    return [w for w in (unknown_token_warning(report.unknown_rate, getattr(tokenizer, "name_or_path", "") or "(given)"),
                        dropped_examples_warning(report.dropped, report.total, max_length)) if w]


def build_ni_datasets(d: NIDataSection, splits, tokenizer, accelerator, say):
    """Tokenized (cached) training and held-out-instance datasets, and the prompt config they were built with."""
    from data_prep.natural_instructions import TokenizeConfig, build_dataset

    prompt_cfg = prompt_config(d)
    tok_cfg = TokenizeConfig(max_length=d.max_length, mask_prompt=d.mask_prompt and d.train_on != "all")
    with accelerator.main_process_first():
        train_set, report = build_dataset(splits["train"], tokenizer, prompt_cfg, tok_cfg, d.cache_dir)
        val_set, _ = build_dataset(splits["heldout_instances"], tokenizer, prompt_cfg, tok_cfg, d.cache_dir)
    say(f"train: {report}")
    for warning in report_warnings(report, tokenizer, d.max_length):
        say(warning)
    say(f"held out: {len(val_set)} instances of training tasks (val loss), {len(splits['heldout_tasks'])} instances "
        f"of {len({t.name for t, _ in splits['heldout_tasks']})} unseen tasks")
    return train_set, val_set, prompt_cfg


@dataclass
class RunData:
    """The data section read and checked: NI splits and their prompt config (kind ni), or the training and held-out
    rows of another kind with the Formatter that renders and tokenizes them."""
    kind: str
    splits: dict | None = None
    prompt_cfg: object = None
    formatter: object = None
    train_records: list | None = None
    heldout_records: list | None = None


def format_settings(d: NIDataSection):
    """data_prep.instructions.FormatSettings of the data section (the chat template file read)."""
    from data_prep.instructions import FormatSettings, read_chat_template

    return FormatSettings(kind=d.kind, max_length=d.max_length, train_on="all" if not d.mask_prompt else d.train_on,
                          template=d.template,
                          chat_template=read_chat_template(d.chat_template) if d.chat_template else None)


def load_data(cfg, tokenizer) -> RunData:
    """The run's data, read and checked before anything is written: NI tasks split (load_splits), or data.train's
    rows (and data.eval's, else a seeded data.heldout_fraction of them held out) with their Formatter. `cfg`: a
    config with a data section (finetune's or distill's)."""
    from data_prep.instructions import Formatter, read_records, split_records
    from tune.errors import DataError

    d = cfg.data
    if d.kind == "ni":
        return RunData("ni", splits=load_splits(cfg), prompt_cfg=prompt_config(d))
    records = read_records(d.train, d.kind, d.columns, d.split, "train", "data.split", d.cache_dir)
    held = read_records(d.eval, d.kind, d.columns, d.eval_split, "validation", "data.eval_split", d.cache_dir) \
        if d.eval else None
    train, heldout = split_records(records, held, d.heldout_fraction, d.seed, d.max_train_instances_per_task,
                                   d.heldout_rows)
    if not train:
        raise DataError(f"data.train: no training rows left ({len(records)} read, {len(heldout)} held out); add rows or "
                        "lower data.heldout_fraction")
    formatter = Formatter(format_settings(d), tokenizer, template_source=f"data.chat_template={d.chat_template}")
    if d.kind != "text":  # a row the template cannot render fails now, not at the evaluation after training
        for record in heldout:
            try:
                formatter.prompt_and_completion(record)
            except DataError:
                for earlier in records:  # name the file's first row that fails, not the first held-out one
                    if earlier is record:
                        break
                    formatter.prompt_and_completion(earlier)
                raise
    return RunData(d.kind, formatter=formatter, train_records=train, heldout_records=heldout)


def build_datasets(d: NIDataSection, data: RunData, tokenizer, accelerator, say):
    """(training, held-out) tokenized datasets of any kind (cached), their truncation report said."""
    if data.kind == "ni":
        return build_ni_datasets(d, data.splits, tokenizer, accelerator, say)[:2]
    from data_prep.instructions import build_format_dataset, heldout_overlap_warning

    with accelerator.main_process_first():
        train_set, report = build_format_dataset(data.train_records, data.formatter, d.cache_dir)
        val_set, _ = build_format_dataset(data.heldout_records, data.formatter, d.cache_dir)
    say(f"train ({d.kind}): {report}")
    for warning in report_warnings(report, tokenizer, d.max_length):
        say(warning.replace(" even without demonstrations", ""))
    say(f"held out: {len(val_set)} examples of {len(data.heldout_records)} rows (val loss"
        f"{', evaluation' if d.kind != 'text' else ''})")
    if warning := heldout_overlap_warning(data.train_records, data.heldout_records):
        say(warning)
    return train_set, val_set


def heldout_examples(data: RunData, cap: int | None = None) -> dict[str, list]:
    """The held-out examples of any kind as tune.evaluation.HeldOut (prompt text as trained on, references, group),
    at most `cap` per group: {"heldout_instances": [...], "heldout_tasks": [...]} for NI, {"heldout": [...]} for
    alpaca / prompt_completion / chat, {} for text (no completions to score). Evaluation, the sample completions
    and distillation's comparison read these."""
    from tune.evaluation import HeldOut

    if data.kind == "ni":
        from data_prep.natural_instructions import encode_prompt

        return {name: [HeldOut(encode_prompt(task, inst.input, data.prompt_cfg), list(inst.outputs), task.name,
                               inst.id, inst.input)
                       for task, inst in _cap_per_task(data.splits[name], cap if cap is not None else 10 ** 9)]
                for name in ("heldout_instances", "heldout_tasks") if data.splits[name]}
    if data.kind == "text":
        return {}
    counts: dict[str, int] = {}
    examples = []
    for record in data.heldout_records:
        if cap is None or counts.get(record.group, 0) < cap:
            counts[record.group] = counts.get(record.group, 0) + 1
            prompt, reference = data.formatter.prompt_and_completion(record)
            examples.append(HeldOut(prompt, [reference], record.group, record.id, data.formatter.heldout_input(record)))
    return {"heldout": examples} if examples else {}


def evaluate_data(data: RunData, model, tokenizer, cap: int, batch_size: int, max_new_tokens: int, device=None) -> dict:
    """ROUGE-L / exact match of `model` on the held-out examples of any kind, by set name (heldout_examples' names):
    NI through evaluate_tasks (prompts fitted as at training, copy baselines), the other kinds through
    evaluate_examples (a chat stops at the template's end-of-turn token too)."""
    from tune.evaluation import evaluate_examples, evaluate_tasks

    if data.kind == "ni":
        return {name: evaluate_tasks(model, tokenizer, _cap_per_task(data.splits[name], cap), data.prompt_cfg,
                                     batch_size=batch_size, max_new_tokens=max_new_tokens, device=device)
                for name in ("heldout_instances", "heldout_tasks") if _cap_per_task(data.splits[name], cap)}
    return {name: evaluate_examples(model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                    device=device, stop_ids=data.formatter.end_of_turn, kind=data.kind)
            for name, examples in heldout_examples(data, cap).items()}


def run(cfg: FinetuneConfig):
    from accelerate.utils import set_seed

    from tune.packing import PACKED_ATTENTION, NIBatches
    from tune.adapters import attention_implementation, merge_adapter, prepare_initial_adapter
    from tune.engine import Engine, check_train_device, make_accelerator
    from tune.hf import experts_note, resolve_dtype
    from tune.recipe_utils import prepare_output_dir

    validate(cfg)
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.num_threads)
    check_train_device(cfg.train, accelerator.device)  # before the output directory is touched
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    # Everything that can reject the input runs before the output directory is touched.
    tokenizer = run_tokenizer(cfg)
    data = load_data(cfg, tokenizer)
    # rows of the other kinds are rendered as they are tokenized: a bad one is refused before anything is written
    built = build_datasets(cfg.data, data, tokenizer, accelerator, say) if data.kind != "ni" else None
    run_dir = prepare_output_dir(cfg, accelerator, inputs=[cfg.base_model, cfg.tokenizer])
    set_seed(cfg.seed)

    train_set, val_set = built or build_datasets(cfg.data, data, tokenizer, accelerator, say)

    weights_dtype = resolve_dtype(cfg.dtype)
    model = build_model(cfg)
    initial = None  # PiSSA / OLoRA: the adapter as it started, to save the trained one for the original base
    if cfg.method != "full" and accelerator.is_main_process:
        resume = cfg.train.resume and any((run_dir / "checkpoints").glob("step_*"))
        initial = prepare_initial_adapter(model, cfg.lora, run_dir, resume)
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
    samples = sample_fn(tokenizer, data, cfg.train.num_samples,
                        cfg.eval.max_new_tokens, cfg.eval.batch_size)
    result = Engine(cfg.train, run_dir, model, source, accelerator=accelerator, log=say,
                    rebuild=lambda: build_model(cfg), run_config=cfg, samples=samples).fit()

    if accelerator.is_main_process:
        model = result.model  # unsharded (the same module unless FSDP trained it)
        model.eval()
        out = save_trained(cfg, model, tokenizer, run_dir / ("model" if cfg.method == "full" else "adapter"), initial)
        say(f"saved {'model' if cfg.method == 'full' else 'adapter'} to {out}")
        if cfg.merge:
            merged = merge_adapter(cfg.base_model, out, run_dir / "merged", dtype=weights_dtype,
                                   quant=cfg.qlora if cfg.method == "qlora" else None, tokenizer=tokenizer)
            say(f"merged checkpoint: {merged}")
        if cfg.eval.enabled:
            evaluate_run(cfg, model, tokenizer, data, run_dir, say)
    accelerator.wait_for_everyone()
    return result


def sample_fn(tokenizer, data: RunData, n: int, max_new_tokens: int, batch_size: int, as_hf=None):
    """The engine's samples callable (train.num_samples): greedy completions of `n` held-out examples, one group (NI
    task, data file) after another, prompted as evaluation prompts them (NI: tune.evaluation.fit_prompt drops
    demonstrations to fit the model's context; a chat stops at its end-of-turn token). `as_hf(model)`: the HF model
    to generate with, for a model that is not one (distill's native student). None when n is 0 or nothing is held
    out (a text corpus has no completions)."""
    from tune.evaluation import fit_prompt, prompt_token_limit, sample_completions, spread_over_groups

    if data.kind == "ni":
        chosen = spread_over_groups(list(data.splits["heldout_instances"]), n)
    else:
        chosen = spread_over_groups(heldout_examples(data, n).get("heldout", []), n, group=lambda e: e.group)
    if not chosen:
        return None
    stop_ids = data.formatter.end_of_turn if data.formatter is not None else ()
    examples = []

    def samples(model):
        model = as_hf(model) if as_hf is not None else model
        if not examples and data.kind == "ni":  # the prompts, fitted to the model's context once
            limit = prompt_token_limit(model, max_new_tokens)
            examples.extend((fit_prompt(tokenizer, task, instance.input, data.prompt_cfg, limit)[0],
                             list(instance.outputs)) for task, instance in chosen)
        elif not examples:
            examples.extend((e.prompt, list(e.references)) for e in chosen)
        return sample_completions(model, tokenizer, examples, max_new_tokens, batch_size, stop_ids=stop_ids)

    return samples


def run_tokenizer(cfg: FinetuneConfig):
    """The tokenizer of the run (cfg.tokenizer, else the base model's), with its pad token checked; chat rows with
    data.chat_template: that template as its chat template, so the saved adapter / model chats as it was trained
    (apply_chat_template, as TRL saves a given template)."""
    from data_prep.instructions import read_chat_template
    from tune.hf import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.base_model, "tokenizer" if cfg.tokenizer else "base_model",
                               pad_token=cfg.pad_token, pad_with_eos=False)
    if cfg.data.kind == "chat" and cfg.data.chat_template:
        tokenizer.chat_template = read_chat_template(cfg.data.chat_template)
    return tokenizer


def build_model(cfg: FinetuneConfig):
    """The base model as configured (full, or wrapped with LoRA / QLoRA adapters)."""
    from tune.adapters import add_lora, attention_implementation, load_base_model
    from tune.hf import resolve_dtype

    attn, _ = attention_implementation(cfg.base_model, cfg.data.packed_attention)
    base = load_base_model(cfg.base_model, cfg.method, resolve_dtype(cfg.dtype), cfg.qlora, cfg.train.gradient_checkpointing,
                           attn_implementation=attn)
    return add_lora(base, cfg.lora) if cfg.method in ("lora", "qlora") else base


def save_trained(cfg: FinetuneConfig, model, tokenizer, out: Path, initial: Path | None = None) -> Path:
    """The full model (method=full) or the PEFT adapter directory, with the tokenizer. `initial`: a PiSSA / OLoRA
    run's initial adapter (tune.adapters.prepare_initial_adapter), to save the adapter for the original base."""
    from tune.adapters import save_adapter
    from tune.hf import quiet_third_party

    if cfg.method == "full":
        with quiet_third_party():
            model.save_pretrained(out, safe_serialization=True)
    else:
        save_adapter(model, out, initial)
    tokenizer.save_pretrained(out)
    return out


def export_checkpoint(cfg: FinetuneConfig, run_dir: Path, checkpoint: Path, out: Path) -> Path:
    """One checkpoint of a fine-tuning run as the run saves its end: adapter directory or full model."""
    from tune.adapters import INITIAL_ADAPTER, mutates_base
    from tune.engine import read_checkpoint_weights

    tokenizer = run_tokenizer(cfg)
    model = build_model(cfg)
    model.load_state_dict(read_checkpoint_weights(checkpoint, model), strict=False)
    initial = run_dir / INITIAL_ADAPTER if cfg.method != "full" and mutates_base(cfg.lora) else None
    return save_trained(cfg, model.eval(), tokenizer, out, initial)


def evaluate_run(cfg: FinetuneConfig, model, tokenizer, data: RunData, run_dir: Path, say) -> dict:
    """ROUGE-L / exact match on the held-out examples (NI: held-out instances and held-out tasks; other kinds: the
    held-out rows), saved to eval_results.json."""
    import json

    from tune.evaluation import format_table

    results = evaluate_data(data, model, tokenizer, cfg.eval.max_instances_per_task, cfg.eval.batch_size,
                            cfg.eval.max_new_tokens)
    for name, result in results.items():
        say(f"\n{name.replace('_', ' ')}:\n{format_table(result)}")
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
