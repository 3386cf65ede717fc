"""Evaluate a causal LM (optionally + a peft adapter) on Natural-Instructions tasks by generation.

    tune run evaluate --config eval_ni [key=value ...]
    tune run evaluate --config eval_ni_fewshot model=runs/shakespeare_bpe_cpu/hf prompt.add_definition=true prompt.num_pos=0

Prompts are Tk-Instruct encodings of each instance (`data_prep.natural_instructions.encode_prompt`);
the model continues them greedily and every continuation is scored with ROUGE-L and exact match
against the instance's references, next to two baselines (copy the first demonstration's output,
copy the input). The table and `output_dir/eval_results.json` give per-task scores and two overall
means: over instances (as Super-NaturalInstructions reports) and over tasks.

Prompt settings give the usual comparisons of a base model before and after tuning:

    instruction + k demonstrations (Tk-Instruct)   add_definition=true  num_pos=k   (default k=2)
    instruction only, zero-shot                     add_definition=true  num_pos=0
    GPT-3-style k-shot, no instruction              add_definition=false num_pos=k  (one-shot: k=1)

A base model that was never tuned to stop tends to go on with another "Input: ... Output: ..." block;
`generation.stop_at_newline=true` cuts each prediction at its first line break.
`data.exclude_train_of=RUN_DIR` (a finetune run) drops the instances that run trained on, so
evaluating its training tasks measures held-out instances only; without it the first
`data.max_instances_per_task` instances of each task are scored, trained on or not (printed, and recorded
as `instances_scored` in eval_results.json).

`harness.tasks=[...]` also runs lm-evaluation-harness (the `harness` extra: pip install -e ".[harness]") on the
same model in memory: lm_eval's tasks, or task YAMLs of your own under `harness.include_path` (a task on local
files, `dataset_path: json`, needs no hub). Its metrics and standard errors go into eval_results.json under
"harness" (tune/harness.py). `data.tasks=null` skips the Natural-Instructions scoring (harness only).

    tune run evaluate --config eval_harness model=runs/demo/hf adapter=null    # tests/harness_tasks' two tasks
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tune.config import os_errors_as_config_errors
from tune.errors import ConfigError


@dataclass
class EvalDataSection:
    # ni: Natural-Instructions tasks (data.tasks); alpaca / prompt_completion / chat: your rows (data.rows), prompted
    # as the finetune recipe trains on them (README: Data formats)
    kind: Literal["ni", "alpaca", "prompt_completion", "chat"] = "ni"
    # split file, dir or task files; null: no Natural-Instructions scoring (harness.tasks only, or data.rows)
    tasks: str | list[str] | None = "../shared/data/natural_instructions/dev_tasks.txt"
    rows: str | list[str] | None = None  # kind != ni: .json / .jsonl / .csv / .parquet files or a save_to_disk folder
    split: str | None = None  # rows: the split of a save_to_disk DatasetDict (default: validation)
    columns: dict[str, str] = field(default_factory=dict)  # rows: our field -> your column, e.g. {output: answer}
    template: str | None = None  # alpaca / prompt_completion: the prompt format string (default: as finetune)
    chat_template: str | None = None  # chat: a Jinja template file (default: the tokenizer's own)
    tasks_dir: str | None = None  # where names in a split file resolve (default: <split file dir>/tasks)
    max_instances_per_task: int = 100  # the first N instances of each task (after exclude_train_of)
    exclude_train_of: str | None = None  # a finetune run dir: skip the instances it trained on


@dataclass
class EvalPromptSection:
    num_pos: int = 2  # positive demonstrations in the prompt
    num_neg: int = 0  # negative demonstrations
    add_explanation: bool = False  # include the demonstrations' explanations
    add_definition: bool = True  # include the task definition (false + num_pos=k: GPT-3-style k-shot)
    template: str | None = None  # custom format string with {definition}, {examples}, {input}


@dataclass
class GenerationSection:
    batch_size: int = 8
    max_new_tokens: int = 64
    max_prompt_tokens: int | None = None  # longer prompts lose tokens from the left (default: context - max_new_tokens)
    stop_at_newline: bool = False  # cut predictions at their first line break (base models, k-shot prompts)


@dataclass
class HarnessSection:
    """lm-evaluation-harness on the evaluated model (the `harness` extra); nothing runs while `tasks` is empty."""
    tasks: list[str] = field(default_factory=list)  # lm_eval task / group / tag names or glob patterns
    include_path: str | list[str] | None = None  # directories (or YAML files) of your own task configs
    num_fewshot: int | None = None  # demonstrations per prompt for every task (null: each task's default)
    limit: int | float | None = None  # the first N documents of each task (a number < 1: that fraction)
    batch_size: int = 8
    bootstrap_iters: int = 100000  # resamples for the stderr of metrics without a closed form (0: no stderr at all)

    def __post_init__(self):
        from tune.config import check_ranges

        check_ranges("harness.", self, {"num_fewshot": ">= 0", "limit": "> 0", "batch_size": ">= 1",
                                        "bootstrap_iters": ">= 0"})
        if isinstance(self.limit, float) and self.limit >= 1:
            raise ConfigError(f"harness.limit={self.limit}: give a whole number of documents (e.g. 100) or a "
                              "fraction below 1 (e.g. 0.1)")


@dataclass
class EvaluateConfig:
    model: str  # an HF causal-LM directory (save_pretrained output)
    recipe: Literal["evaluate"] = "evaluate"
    adapter: str | None = None  # a peft adapter directory trained on `model` (e.g. runs/lora_ni/adapter)
    tokenizer: str | None = None  # default: the model directory
    output_dir: str = "runs/eval"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    # load the model quantized through bitsandbytes (int8: LLM.int8; nf4 / fp4: 4-bit computing in `dtype`), the
    # adapter on top; null: as stored (a `tune quantize` checkpoint loads quantized without it)
    quant: Literal["int8", "nf4", "fp4"] | None = None
    data: EvalDataSection = field(default_factory=EvalDataSection)
    prompt: EvalPromptSection = field(default_factory=EvalPromptSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    harness: HarnessSection = field(default_factory=HarnessSection)


CONFIG_CLASS = EvaluateConfig


@os_errors_as_config_errors
def validate(cfg: EvaluateConfig) -> None:
    """Cheap checks (no weights loaded, no torch): directories, the model's config, sizes. Every problem is
    reported, in one ConfigError."""
    from tune.errors import Problems
    from tune.hf import check_adapter_dir, check_model_dir, check_no_custom_code, stored_quant
    from tune.recipe_utils import check_output_dir, empty_path_problems, task_source_paths

    problems = Problems()
    problems.extend(empty_path_problems(cfg, ["output_dir", "model", "adapter", "tokenizer", "data.tasks",
                                              "data.tasks_dir", "data.exclude_train_of", "harness.include_path"]))
    if problems.call(check_model_dir, cfg.model, "model") is not None and cfg.quant is not None:
        stored = stored_quant(cfg.model)
        if stored not in (None, cfg.quant):
            problems.add(f"quant={cfg.quant}: model={cfg.model} is already quantized ({stored}, its config.json has "
                         "quantization_config); drop quant to load it as saved, or quantize the full-precision model")
    if cfg.adapter:
        problems.call(check_adapter_dir, cfg.adapter, "adapter")
    if cfg.tokenizer and not Path(cfg.tokenizer).is_dir():
        problems.add(f"tokenizer={cfg.tokenizer} is not a directory (paths are relative to where you run tune)")
    elif cfg.tokenizer:
        problems.call(check_no_custom_code, cfg.tokenizer, "tokenizer")
    items = cfg.data.tasks if isinstance(cfg.data.tasks, list) else [cfg.data.tasks]
    if cfg.data.kind != "ni":
        row_problems(cfg.data, problems)
        from data_prep.instructions import chat_template_problem

        if problem := chat_template_problem(cfg.data.kind, cfg.data.chat_template, cfg.tokenizer or cfg.model,
                                            "tokenizer" if cfg.tokenizer else "model"):
            problems.add(problem)
        items = []
    elif cfg.data.rows is not None or cfg.data.chat_template is not None or cfg.data.template is not None:
        given = next(k for k in ("rows", "template", "chat_template") if getattr(cfg.data, k) is not None)
        problems.add(f"data.{given} applies to your rows (data.kind=alpaca, prompt_completion or chat); NI tasks are "
                     "data.tasks: set data.kind or drop it")
    elif cfg.data.tasks is None:
        items = []
        if not cfg.harness.tasks:
            problems.add("data.tasks is null and harness.tasks is empty: nothing to evaluate; give Natural-"
                         "Instructions tasks in data.tasks or lm-evaluation-harness tasks in harness.tasks")
        if cfg.data.exclude_train_of is not None:
            problems.add("data.exclude_train_of applies to the Natural-Instructions tasks, and data.tasks is null; "
                         "drop it or give data.tasks")
    elif not items:
        problems.add("data.tasks is empty; give a split file, a directory of task JSON files or a list of them")
    for item in items:
        if not Path(item).exists() and cfg.data.tasks_dir is None:
            problems.add(f"data.tasks: {item} does not exist (paths are relative to where you run tune)")
    if cfg.data.tasks_dir is not None and not Path(cfg.data.tasks_dir).is_dir():
        problems.add(f"data.tasks_dir={cfg.data.tasks_dir} is not a directory")
    if cfg.data.exclude_train_of is not None and not (Path(cfg.data.exclude_train_of) / "config.yaml").is_file():
        problems.add(f"data.exclude_train_of={cfg.data.exclude_train_of} is not a finetune run directory "
                     "(no config.yaml)")
    for key, value, least in (("data.max_instances_per_task", cfg.data.max_instances_per_task, 1),
                              ("prompt.num_pos", cfg.prompt.num_pos, 0), ("prompt.num_neg", cfg.prompt.num_neg, 0),
                              ("generation.batch_size", cfg.generation.batch_size, 1),
                              ("generation.max_new_tokens", cfg.generation.max_new_tokens, 1)):
        if value < least:
            problems.add(f"{key} must be >= {least}, got {value}")
    p = cfg.prompt
    if not p.add_definition and p.num_pos == 0 and p.num_neg == 0 and p.template is None:
        problems.add("prompt.add_definition=false with prompt.num_pos=0 leaves the prompts with neither the task "
                     "definition nor a demonstration; for zero-shot set prompt.add_definition=true")
    if cfg.generation.max_prompt_tokens is not None and cfg.generation.max_prompt_tokens < 1:
        problems.add(f"generation.max_prompt_tokens must be >= 1 (or null), got {cfg.generation.max_prompt_tokens}")
    if cfg.harness.tasks:
        from tune.harness import missing_problem

        problems.extend(filter(None, [missing_problem()]))
        paths = cfg.harness.include_path
        for path in paths if isinstance(paths, list) else [paths]:
            if path and not Path(path).exists():
                problems.add(f"harness.include_path: {path} does not exist (a directory of task YAMLs or a YAML file; "
                             "paths are relative to where you run tune)")
    inputs = {"model": cfg.model, "adapter": cfg.adapter, "tokenizer": cfg.tokenizer,
              "data.tasks": task_source_paths(cfg.data.tasks, cfg.data.tasks_dir), "data.tasks_dir": cfg.data.tasks_dir,
              "harness.include_path": cfg.harness.include_path}
    problems.extend(check_output_dir(cfg.output_dir, inputs))
    problems.raise_if_any()


def row_problems(d: EvalDataSection, problems) -> None:
    """Record the problems of data.kind != ni: data.rows missing or without the kind's columns, NI-only keys given,
    data.columns / data.template / data.chat_template that do not fit the kind (no torch, at most a file's header)."""
    from data_prep import instructions as formats

    for key in ("tasks", "tasks_dir", "exclude_train_of"):
        if getattr(d, key) is not None:
            problems.add(f"data.{key} applies to Natural-Instructions tasks, which data.kind={d.kind} does not read; "
                         f"set data.{key}=null (your rows are data.rows)")
    if not d.rows:
        problems.add(f"data.kind={d.kind} scores your rows from data.rows (.json / .jsonl / .csv / .parquet files or a "
                     "save_to_disk folder); set it (README: Data formats)")
        return
    problems.extend(formats.source_problems(d.kind, {"data.rows": d.rows}, d.columns, d.template, d.chat_template,
                                            splits={"data.rows": formats.SplitChoice(d.split, "validation",
                                                                                     "data.split")}))


def trained_instances(run_dir) -> set[tuple[str, str]]:
    """(task name, instance id) of every instance a finetune run trained on, from its saved config."""
    import importlib

    from tune.config import load_config, read_yaml
    from tune.errors import ConfigError

    path = Path(run_dir) / "config.yaml"
    recipe = read_yaml(path).get("recipe")
    if recipe != "finetune":
        raise ConfigError(f"data.exclude_train_of={run_dir}: {path} is a {recipe!r} config, not a finetune run")
    finetune = importlib.import_module("recipes.finetune")
    run_cfg = load_config(finetune.CONFIG_CLASS, str(path))
    if run_cfg.data.kind != "ni":  # trained on rows of its own files: no NI instance to exclude
        return set()
    return {(task.name, instance.id) for task, instance in finetune.load_splits(run_cfg)["train"]}


def select_pairs(tasks, max_per_task: int, exclude: set[tuple[str, str]] = frozenset()) -> list:
    """The first `max_per_task` instances of each task that are not in `exclude`, as (task, instance) pairs."""
    pairs = []
    for task in tasks:
        kept = [inst for inst in task.instances if (task.name, inst.id) not in exclude][:max_per_task]
        pairs.extend((task, inst) for inst in kept)
    return pairs


def run(cfg: EvaluateConfig) -> dict:
    from data_prep.natural_instructions import PromptConfig, load_tasks
    from tune.errors import DataError
    from tune.evaluation import evaluate_tasks, format_table

    validate(cfg)
    harness = resolve_harness(cfg)
    if cfg.data.kind != "ni":
        return run_rows(cfg, harness)
    if cfg.data.tasks is None:
        return run_harness_only(cfg, harness)
    tasks = load_tasks(cfg.data.tasks, cfg.data.tasks_dir)
    exclude = trained_instances(cfg.data.exclude_train_of) if cfg.data.exclude_train_of else set()
    pairs = select_pairs(tasks, cfg.data.max_instances_per_task, exclude)
    if not pairs:
        raise DataError(f"data.tasks={cfg.data.tasks}: no instances left to evaluate"
                        + (f" after excluding those run {cfg.data.exclude_train_of} trained on" if exclude else ""))
    skipped = sum(1 for task in tasks for inst in task.instances if (task.name, inst.id) in exclude)
    tokenizer_dir, tokenizer, model = load_evaluated(cfg)
    device = next(model.parameters()).device
    harness_results = run_harness(cfg, harness, model, tokenizer)  # first: a task whose data is missing fails early
    n = cfg.data.max_instances_per_task
    print(f"{model_line(cfg)} on {len(pairs)} instances of {len({t.name for t, _ in pairs})} tasks ({device})"
          + (f"; {skipped} instances skipped as trained on by {cfg.data.exclude_train_of}" if exclude else ""),
          flush=True)
    if exclude:
        scored = f"held-out-of {cfg.data.exclude_train_of}"
    else:
        scored = f"first-{n}"
        print(f"scoring the first {n} instances of each task; pass data.exclude_train_of=RUN_DIR to score only "
              "instances a fine-tune did not train on", flush=True)

    p = cfg.prompt
    prompt_cfg = PromptConfig(num_pos=p.num_pos, num_neg=p.num_neg, add_explanation=p.add_explanation,
                              add_definition=p.add_definition, template=p.template)
    g = cfg.generation
    results = evaluate_tasks(model, tokenizer, pairs, prompt_cfg, batch_size=g.batch_size,
                             max_new_tokens=g.max_new_tokens, device=device, max_prompt_tokens=g.max_prompt_tokens,
                             stop_at_newline=g.stop_at_newline, log=lambda m: print(m, flush=True))
    results = {"model": cfg.model, "adapter": cfg.adapter, "quant": cfg.quant, "tokenizer": tokenizer_dir,
               "tasks_source": cfg.data.tasks,
               "instances_scored": scored, "excluded_trained_instances": skipped, **results, **harness_results}
    print(format_table(results))
    if results["n_prompts_fewer_demos"] or results["n_prompts_truncated"]:
        print(f"note: to fit the context, {results['n_prompts_fewer_demos']} prompts lost demonstrations and "
              f"{results['n_prompts_truncated']} were cut from the left")
    return save_results(cfg, results)


def resolve_harness(cfg: EvaluateConfig):
    """(lm_eval TaskManager, task names) for harness.tasks, checked before any model loads; None without tasks."""
    if not cfg.harness.tasks:
        return None
    from tune.harness import resolve_tasks

    return resolve_tasks(cfg.harness.tasks, cfg.harness.include_path)


def run_harness(cfg: EvaluateConfig, harness, model, tokenizer) -> dict:
    """lm-evaluation-harness on the loaded model: prints its table and returns {"harness": summary}
    (tune.harness.summarize) for eval_results.json, or {} when harness.tasks is empty."""
    if harness is None:
        return {}
    from tune.harness import harness_table, run_harness as run_lm_eval

    manager, names = harness
    h = cfg.harness
    print(f"lm-evaluation-harness on {len(names)} task(s): {', '.join(names)}"
          + (f" ({h.num_fewshot}-shot)" if h.num_fewshot is not None else "")
          + (f", the first {h.limit:.0%} of each task's documents" if isinstance(h.limit, float)
             else f", at most {h.limit} documents each" if h.limit is not None else ""), flush=True)
    summary = run_lm_eval(model, tokenizer, manager, names, num_fewshot=h.num_fewshot, limit=h.limit,
                          batch_size=h.batch_size, bootstrap_iters=h.bootstrap_iters)
    print(harness_table(summary), flush=True)
    return {"harness": {"tasks_requested": list(h.tasks), "include_path": h.include_path, **summary}}


def load_evaluated(cfg: EvaluateConfig, tokenizer=None):
    """(tokenizer directory, tokenizer, model) of the run: the model (+ adapter, quantized as asked) on its device,
    checked against the tokenizer's vocabulary; the evaluation's threads set."""
    from tune.engine import apply_num_threads
    from tune.evaluation import check_vocab, load_model, load_tokenizer

    tokenizer_dir = cfg.tokenizer or cfg.model
    tokenizer = tokenizer or load_tokenizer(tokenizer_dir)
    model = load_model(cfg.model, cfg.adapter, cfg.dtype, quant=cfg.quant)
    check_vocab(model, tokenizer, tokenizer_dir)
    apply_num_threads(0, key="OMP_NUM_THREADS")
    return tokenizer_dir, tokenizer, model


def save_results(cfg: EvaluateConfig, results: dict) -> dict:
    """config.yaml and eval_results.json (atomically) in output_dir; returns `results`."""
    from tune.config import save_config
    from tune.evaluation import write_json_atomic

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    path = write_json_atomic(out / "eval_results.json", results)
    print(f"wrote {path}")
    return results


def model_line(cfg: EvaluateConfig) -> str:
    return (f"evaluating {cfg.model}" + (f" + adapter {cfg.adapter}" if cfg.adapter else "")
            + (f", quantized {cfg.quant}" if cfg.quant else ""))


def run_harness_only(cfg: EvaluateConfig, harness) -> dict:
    """data.tasks=null: lm-evaluation-harness alone; eval_results.json holds the model and the "harness" results."""
    tokenizer_dir, tokenizer, model = load_evaluated(cfg)
    print(f"{model_line(cfg)} ({next(model.parameters()).device})", flush=True)
    return save_results(cfg, {"model": cfg.model, "adapter": cfg.adapter, "quant": cfg.quant,
                              "tokenizer": tokenizer_dir, **run_harness(cfg, harness, model, tokenizer)})


def run_rows(cfg: EvaluateConfig, harness) -> dict:
    """data.kind=alpaca / prompt_completion / chat: the first data.max_instances_per_task rows of each file of
    data.rows, prompted as the finetune recipe trains on them (a chat: its turns before the last reply, with the
    generation prompt), scored by ROUGE-L / exact match against the reply (tune.evaluation.evaluate_examples,
    beside the copy-input baseline); the rows are read and checked before the model loads."""
    from data_prep.instructions import FormatSettings, Formatter, read_chat_template, read_records
    from tune.evaluation import HeldOut, evaluate_examples, format_table, load_tokenizer

    d, g = cfg.data, cfg.generation
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    formatter = Formatter(FormatSettings(kind=d.kind, template=d.template,
                                         chat_template=read_chat_template(d.chat_template) if d.chat_template else None),
                          tokenizer, template_source=f"data.chat_template={d.chat_template}")
    counts: dict[str, int] = {}
    examples = []
    for record in read_records(d.rows, d.kind, d.columns, d.split, "validation", "data.split"):
        if counts.setdefault(record.group, 0) < d.max_instances_per_task:
            counts[record.group] += 1
            prompt, reference = formatter.prompt_and_completion(record)
            examples.append(HeldOut(prompt, [reference], record.group, record.id, formatter.heldout_input(record)))
    tokenizer_dir, tokenizer, model = load_evaluated(cfg, tokenizer)
    harness_results = run_harness(cfg, harness, model, tokenizer)
    device = next(model.parameters()).device
    print(f"{model_line(cfg)} on {len(examples)} rows ({d.kind}) of {len(counts)} files ({device})", flush=True)
    results = evaluate_examples(model, tokenizer, examples, batch_size=g.batch_size, max_new_tokens=g.max_new_tokens,
                                device=device, max_prompt_tokens=g.max_prompt_tokens, stop_at_newline=g.stop_at_newline,
                                log=lambda m: print(m, flush=True), stop_ids=formatter.end_of_turn, kind=d.kind)
    results = {"model": cfg.model, "adapter": cfg.adapter, "quant": cfg.quant, "tokenizer": tokenizer_dir,
               "rows_source": d.rows, **results, **harness_results}
    print(format_table(results))
    if results["n_prompts_truncated"]:
        print(f"note: to fit the context, {results['n_prompts_truncated']} prompts were cut from the left")
    return save_results(cfg, results)
