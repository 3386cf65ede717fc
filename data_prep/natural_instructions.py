"""Super-NaturalInstructions tasks -> Tk-Instruct prompts -> tokenized, prompt-masked examples (cached).

    tasks = load_tasks("../shared/data/natural_instructions/dev_tasks.txt")
    splits = split_instances(tasks, NISplitConfig(train_tasks=None, eval_tasks=None))
    train, report = build_dataset(splits["train"], tokenizer, PromptConfig(), TokenizeConfig(), ".cache/ni")

A task file is one JSON object with ``Definition`` (list of strings; the first is used, as in
Tk-Instruct), optional ``Positive Examples`` / ``Negative Examples`` (``input``, ``output``,
``explanation``) and ``Instances`` (``id``, ``input``, ``output``: a list of reference answers).
Tokenized examples carry ``targets`` aligned with ``input_ids`` (see tune/losses.py).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

from tune.errors import ConfigError, DataError
from tune.files import directory_written_aside, read_utf8

FORMAT_VERSION = 2  # 2: cache keys hash instances in chunks (issue 11)
PathLike = Union[str, os.PathLike]
_PROMPT_KEYS = ("Definition", "Positive Examples", "Negative Examples", "Instances")


# -- task files ---------------------------------------------------------------------------------
@dataclass
class NIExample:
    input: str
    output: str
    explanation: str = ""


@dataclass
class NIInstance:
    id: str
    input: str
    outputs: list[str]


@dataclass
class NITask:
    name: str
    path: Path
    definition: str
    positive_examples: list[NIExample]
    negative_examples: list[NIExample]
    instances: list[NIInstance]
    metadata: dict = field(default_factory=dict)  # every other top-level field (Categories, Input_language, ...)


def _read_json(path: Path):
    text = read_utf8(path, "task file")
    try:
        data = json.loads(text)  # accepts NaN, which some SNI headers contain ("URL": [NaN])
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); fix the file") from None
    except RecursionError:
        data = None
    if data is None or json_too_deep(data):
        raise DataError(f"{path}: JSON nested too deeply (over {MAX_JSON_DEPTH} levels); a task file is a few levels "
                        "of objects and lists")
    return data


MAX_JSON_DEPTH = 100  # SNI tasks nest 4 levels; deeper values could overflow Python's recursion later (hashing)


def json_too_deep(data, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether lists / objects in `data` nest more than `limit` levels deep (checked without recursion)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _examples(path: Path, obj: dict, key: str) -> list[NIExample]:
    items = obj.get(key, [])
    if not isinstance(items, list):
        raise DataError(f"{path}: field '{key}' must be a list of objects with 'input' and 'output', got {type(items).__name__}")
    out = []
    for i, ex in enumerate(items):
        where = f"{path}: field '{key}'[{i}]"
        if not isinstance(ex, dict):
            raise DataError(f"{where} must be an object with 'input' and 'output', got {type(ex).__name__}")
        inp, output, expl = ex.get("input"), ex.get("output"), ex.get("explanation", "")
        if isinstance(output, list) and output and all(isinstance(o, str) for o in output):
            output = output[0]
        for name, value in (("input", inp), ("output", output)):
            if not isinstance(value, str):
                problem = "is missing" if value is None else f"must be a string, got {type(value).__name__}"
                raise DataError(f"{where}: '{name}' {problem}; give every example an 'input' and an 'output' string")
        out.append(NIExample(inp, output, expl if isinstance(expl, str) else ""))
    return out


def _instances(path: Path, obj: dict) -> list[NIInstance]:
    items = obj["Instances"]
    if not isinstance(items, list):
        raise DataError(f"{path}: field 'Instances' must be a list of objects, got {type(items).__name__}")
    if not items:
        raise DataError(f"{path}: field 'Instances' is empty; a task needs at least one instance")
    out = []
    for i, inst in enumerate(items):
        if not isinstance(inst, dict):
            raise DataError(f"{path}: field 'Instances'[{i}] must be an object with 'id', 'input', 'output', "
                            f"got {type(inst).__name__}")
        iid = inst.get("id", f"{path.stem}-{i}")
        where = f"{path}: field 'Instances'[{i}] (id {iid})"
        if not isinstance(inst.get("input"), str):
            raise DataError(f"{where}: 'input' must be a string; fix the instance")
        outputs = inst.get("output")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise DataError(f"{where}: 'output' must be a list of strings; fix the instance")
        outputs = [o for o in outputs if o.strip()]
        if not outputs:
            raise DataError(f"{where}: 'output' has no non-empty reference answer; add one or remove the instance")
        out.append(NIInstance(str(iid), inst["input"], outputs))
    return out


def load_task(path: PathLike) -> NITask:
    """Parse and validate one task file; DataError (naming the file and field) on bad input."""
    path = Path(path)
    obj = _read_json(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: top level must be a JSON object with 'Definition' and 'Instances', got {type(obj).__name__}")
    for key in ("Definition", "Instances"):
        if key not in obj:
            raise DataError(f"{path}: field '{key}' is missing; every task file needs 'Definition' and 'Instances'")
    definition = obj["Definition"]
    if isinstance(definition, str):
        definition = [definition]
    if not isinstance(definition, list) or not definition or not all(isinstance(d, str) for d in definition):
        raise DataError(f"{path}: field 'Definition' must be a string or a non-empty list of strings; fix the task header")
    if not definition[0].strip():
        raise DataError(f"{path}: field 'Definition' is empty; write the task's instruction there")
    return NITask(
        name=path.stem,
        path=path,
        definition=definition[0].strip(),
        positive_examples=_examples(path, obj, "Positive Examples"),
        negative_examples=_examples(path, obj, "Negative Examples"),
        instances=_instances(path, obj),
        metadata={k: v for k, v in obj.items() if k not in _PROMPT_KEYS},
    )


def read_split_file(path: PathLike) -> list[tuple[int, str]]:
    """(line number, task name) of a split file: one name per line, '#' comments and blank lines ignored."""
    path = Path(path)
    text = read_utf8(path, "split file")
    names = []
    for lineno, line in enumerate(text.splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if name:
            names.append((lineno, name[:-5] if name.endswith(".json") else name))
    return names


def _resolve_name(name: str, tasks_dir: Path, where: str) -> Path:
    """tasks_dir/<name>.json; a DataError naming `where` (a split file and line) if it is missing, or if the name
    reaches outside tasks_dir: absolute, with a '..' part, or through a linked folder (a task file itself may be a
    link: curated task folders often are)."""
    rule = ("is an absolute path" if Path(name).is_absolute() or Path(name).anchor else
            "has a '..' part" if ".." in Path(name).parts else
            None if (tasks_dir / name).parent.resolve().is_relative_to(tasks_dir.resolve()) else
            "resolves outside the tasks folder")
    if rule:
        raise DataError(f"{where}: task name {name[:80]!r} {rule}; names must be task files inside the tasks folder "
                        f"{tasks_dir}")
    path = tasks_dir / f"{name}.json"
    if path.is_file():
        return path
    known = sorted(p.stem for p in tasks_dir.glob("*.json")) if tasks_dir.is_dir() else []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.0)
    hint = f"did you mean '{close[0]}'?" if close else f"{tasks_dir} has no task files; pass tasks_dir"
    raise DataError(f"{where}: unknown task '{name}' (no {path}); {hint}")


def _task_paths(source, tasks_dir: PathLike | None) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        if src.is_dir():
            return sorted(src.glob("*.json"))
        if src.is_file() and src.suffix == ".json":
            return [src]
        if src.is_file():  # split file
            base = Path(tasks_dir) if tasks_dir is not None else src.parent / "tasks"
            return [_resolve_name(name, base, f"{src} line {n}") for n, name in read_split_file(src)]
        if tasks_dir is not None and not src.suffix:
            return [_resolve_name(str(source), Path(tasks_dir), f"tasks_dir {tasks_dir}")]
        raise DataError(f"{src}: task source does not exist; pass a directory of task .json files, a split .txt file "
                        "or .json paths")
    paths = []
    for item in source:
        item_path = Path(item)
        if item_path.is_dir() or (item_path.is_file() and item_path.suffix != ".json"):  # a directory or split file
            paths += _task_paths(item_path, tasks_dir)
        elif item_path.is_file() or item_path.suffix == ".json":
            paths.append(item_path)
        elif tasks_dir is not None:
            paths.append(_resolve_name(str(item), Path(tasks_dir), f"tasks_dir {tasks_dir}"))
        else:
            raise DataError(f"{item}: task file does not exist; pass .json paths, or task names together with tasks_dir")
    return paths


def load_tasks(source, tasks_dir: PathLike | None = None) -> list[NITask]:
    """Load tasks from a directory of .json files, a list of .json paths (or task names with tasks_dir), or a
    split file (.txt) whose names resolve in ``tasks_dir`` (default: ``<split file dir>/tasks``)."""
    paths = _task_paths(source, tasks_dir)
    if not paths:
        raise DataError(f"{source}: no task .json files found; check the path or the split file")
    tasks, seen = [], {}
    for path in paths:
        task = load_task(path)
        if task.name in seen:
            raise DataError(f"{source}: task '{task.name}' is listed twice ({seen[task.name]} and {path}); "
                            "remove the duplicate")
        seen[task.name] = path
        tasks.append(task)
    return tasks


# -- prompts ------------------------------------------------------------------------------------
@dataclass
class PromptConfig:
    num_pos: int = 2
    num_neg: int = 0
    add_explanation: bool = False
    add_definition: bool = True
    template: str | None = None  # custom: a Python format string with {definition}, {examples}, {input}

    def __post_init__(self):
        for name in ("num_pos", "num_neg"):
            if getattr(self, name) < 0:
                raise ConfigError(f"prompt.{name} must be >= 0, got {getattr(self, name)}")
        if self.template is not None:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
            except ValueError as e:
                raise ConfigError(f"prompt.template is not a valid format string ({e}); "
                                  "escape literal braces as {{ }}") from None
            unknown = fields - {"definition", "examples", "input"}
            if unknown or "input" not in fields:
                raise ConfigError(f"prompt.template must use {{input}} and only {{definition}}, {{examples}}, {{input}}; "
                                  f"got fields {sorted(fields)}")


def _example_block(label: str, i: int, ex: NIExample, explain: bool) -> str:
    s = f"{label} Example {i} -\nInput: {ex.input.strip()}\nOutput: {ex.output.strip()}\n"
    if explain and ex.explanation.strip():
        s += f"Explanation: {ex.explanation.strip()}\n"
    return s + "\n"


def encode_prompt(task: NITask, instance_input: str, cfg: PromptConfig, num_pos: int | None = None,
                  definition: str | None = None, num_neg: int | None = None) -> str:
    """The Tk-Instruct prompt; the target follows directly after its final "Output: ".

    num_pos / num_neg / definition override the config and the task (truncation uses them).
    """
    num_pos = cfg.num_pos if num_pos is None else num_pos
    num_neg = cfg.num_neg if num_neg is None else num_neg
    definition = (task.definition if definition is None else definition).strip() if cfg.add_definition else ""
    examples = "".join(_example_block("Positive", i, ex, cfg.add_explanation)
                       for i, ex in enumerate(task.positive_examples[:num_pos], 1))
    examples += "".join(_example_block("Negative", i, ex, cfg.add_explanation)
                        for i, ex in enumerate(task.negative_examples[:num_neg], 1))
    if cfg.template is not None:
        return cfg.template.format(definition=definition, examples=examples, input=instance_input.strip())
    head = f"Definition: {definition}\n\n" if definition else ""
    return f"{head}{examples}Now complete the following example -\nInput: {instance_input.strip()}\nOutput: "


# -- splits -------------------------------------------------------------------------------------
@dataclass
class NISplitConfig:
    train_tasks: str | list[str] | None = None  # split file / dir / list of files or task names; None: all but eval
    eval_tasks: str | list[str] | None = None  # held-out tasks: never trained on
    tasks_dir: str | None = None  # for load_tasks; here names are matched against the tasks passed in
    max_train_instances_per_task: int | None = None
    max_eval_instances_per_task: int = 100  # SNI's cap
    heldout_instances_per_task: int = 10  # held-out instances of each TRAINING task, never trained on
    seed: int = 0

    def __post_init__(self):
        for name in ("max_train_instances_per_task", "max_eval_instances_per_task", "heldout_instances_per_task"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"data.{name} must be >= 0, got {value}")


def _task_names(spec, key: str) -> list[str] | None:
    """Task names named by a split file, a directory, or a list of files / names."""
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if path.is_dir():
            return [p.stem for p in sorted(path.glob("*.json"))]
        if path.is_file() and path.suffix != ".json":
            return [name for _, name in read_split_file(path)]
        if not path.is_file() and (path.suffix == ".json" or os.sep in str(spec)):
            raise ConfigError(f"data.{key}: {spec} does not exist; pass a split file, a directory or a list of task names")
        spec = [spec]
    return [Path(s).stem if str(s).endswith(".json") else str(s) for s in spec]


def _rng(seed: int, name: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big"))


def split_instances(tasks: Sequence[NITask], cfg: NISplitConfig) -> dict[str, list[tuple[NITask, NIInstance]]]:
    """{"train", "heldout_instances", "heldout_tasks"}: lists of (task, instance).

    Training tasks: a shuffle seeded by (seed, task name); the first ``heldout_instances_per_task`` are held out,
    the next ``max_train_instances_per_task`` are trained on. Eval tasks: their first
    ``max_eval_instances_per_task`` instances in file order (as SNI), never trained on.
    """
    by_name = {t.name: t for t in tasks}
    train_names = _task_names(cfg.train_tasks, "train_tasks")
    eval_names = _task_names(cfg.eval_tasks, "eval_tasks") or []
    both = sorted(set(eval_names) & set(train_names or []))
    if both:
        raise ConfigError(f"data.train_tasks and data.eval_tasks both name {both[0]}"
                          f"{f' (+{len(both) - 1} more)' if len(both) > 1 else ''}; a held-out task must not be trained on")
    if train_names is None:
        train_names = [t.name for t in tasks if t.name not in set(eval_names)]
    train_names, eval_names = list(dict.fromkeys(train_names)), list(dict.fromkeys(eval_names))  # no duplicates
    for key, names in (("train_tasks", train_names), ("eval_tasks", eval_names)):
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ConfigError(f"data.{key} names task '{missing[0]}' which was not loaded; load it or remove it from data.{key}")

    out = {"train": [], "heldout_instances": [], "heldout_tasks": []}
    for name in train_names:
        task = by_name[name]
        order = list(task.instances)
        _rng(cfg.seed, name).shuffle(order)
        held = order[:cfg.heldout_instances_per_task]
        rest = order[cfg.heldout_instances_per_task:]
        if cfg.max_train_instances_per_task is not None:
            rest = rest[:cfg.max_train_instances_per_task]
        out["heldout_instances"] += [(task, inst) for inst in held]
        out["train"] += [(task, inst) for inst in rest]
    for name in eval_names:
        task = by_name[name]
        out["heldout_tasks"] += [(task, inst) for inst in task.instances[:cfg.max_eval_instances_per_task]]
    return out


# -- tokenization -------------------------------------------------------------------------------
@dataclass
class TokenizeConfig:
    max_length: int = 1024
    mask_prompt: bool = True  # train only on the output tokens (and eos)
    add_eos: bool = True
    train_on: str = "first"  # which outputs become training targets: "first" | "all" (one example each)

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2, got {self.max_length}")
        if self.train_on not in ("first", "all"):
            raise ConfigError(f"data.train_on must be 'first' or 'all', got {self.train_on!r}")


def report_tail(dropped_ids: list[str], unknown_tokens: int | None, unknown_rate: float) -> str:
    """The end of a tokenization report line: the first dropped ids, and the share of unknown tokens."""
    tail = f": {', '.join(dropped_ids[:3])}{' ...' if len(dropped_ids) > 3 else ''}" if dropped_ids else ""
    return tail + (f"; {unknown_rate:.2%} unknown tokens" if unknown_tokens is not None else "")


@dataclass
class TruncationReport:
    total: int = 0  # examples considered
    examples_dropped_demos: int = 0  # kept examples that lost at least one demonstration to fit max_length
    definition_truncated: int = 0  # kept examples whose definition was cut
    dropped: int = 0  # instance + target alone do not fit: not trained on
    dropped_ids: list[str] = field(default_factory=list)
    tokens: int = 0  # tokens of the kept examples
    unknown_tokens: int | None = None  # of those, the tokenizer's unk token (None: the tokenizer has none)

    @property
    def unknown_rate(self) -> float:
        return (self.unknown_tokens or 0) / max(self.tokens, 1)

    def __str__(self) -> str:
        s = (f"{self.total - self.dropped}/{self.total} examples kept; {self.examples_dropped_demos} lost demonstrations "
             f"and {self.definition_truncated} a truncated definition to fit max_length; {self.dropped} dropped "
             "(instance + target too long)")
        return s + report_tail(self.dropped_ids, self.unknown_tokens, self.unknown_rate)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id] + ids
    return ids


def _prompt_ids(tokenizer, text: str) -> list[int]:
    """Prompt token ids, with bos first for tokenizers that want one (Llama-style)."""
    return _with_bos(tokenizer, _encode(tokenizer, text))


def _fit_prompt(task, inst, cfg, tokenizer, budget, ids: list[int] | None = None) -> tuple[list[int] | None, bool, bool]:
    """Prompt ids within ``budget`` tokens, dropping demos (negatives first, the last one first), then cutting the
    definition from its end. Returns (ids or None if even the bare instance does not fit, demos lost, definition cut).
    `ids`: the full prompt's ids when already computed (by a batched call)."""
    n_pos, n_neg = min(cfg.num_pos, len(task.positive_examples)), min(cfg.num_neg, len(task.negative_examples))
    if ids is None:
        ids = _prompt_ids(tokenizer, encode_prompt(task, inst.input, cfg, n_pos, num_neg=n_neg))
    if len(ids) <= budget:
        return ids, False, False
    lost_demos = n_pos + n_neg > 0
    while n_pos + n_neg > 0:
        n_neg, n_pos = (n_neg - 1, n_pos) if n_neg else (n_neg, n_pos - 1)
        ids = _prompt_ids(tokenizer, encode_prompt(task, inst.input, cfg, n_pos, num_neg=n_neg))
        if len(ids) <= budget:
            return ids, lost_demos, False
    if not (cfg.add_definition and task.definition):
        return None, lost_demos, False
    def_ids = _encode(tokenizer, task.definition)
    keep = len(def_ids) - (len(ids) - budget)
    while keep > 0:
        definition = tokenizer.decode(def_ids[:keep])
        ids = _prompt_ids(tokenizer, encode_prompt(task, inst.input, cfg, 0, definition=definition, num_neg=0))
        if len(ids) <= budget:
            return ids, lost_demos, True
        keep -= max(1, len(ids) - budget)
    ids = _prompt_ids(tokenizer, encode_prompt(task, inst.input, cfg, 0, definition="", num_neg=0))
    return (ids if len(ids) <= budget else None), lost_demos, True


LOST_DEMOS, DEFINITION_CUT, DROPPED = 1, 2, 4  # bits of the per-example "status" while tokenizing


def _instance_rows(pairs) -> tuple[list[NITask], dict[str, list]]:
    """The tasks (their prompt parts only: no instances) and the instances as columns task / id / input / outputs."""
    tasks, index = [], {}
    rows = {"task": [], "id": [], "input": [], "outputs": []}
    for task, inst in pairs:
        if id(task) not in index:
            index[id(task)] = len(tasks)
            tasks.append(NITask(task.name, task.path, task.definition, task.positive_examples, task.negative_examples, []))
        rows["task"].append(index[id(task)])
        rows["id"].append(inst.id)
        rows["input"].append(inst.input)
        rows["outputs"].append(inst.outputs)
    return tasks, rows


def _demos(task: NITask, cfg: PromptConfig) -> tuple[int, int]:
    return min(cfg.num_pos, len(task.positive_examples)), min(cfg.num_neg, len(task.negative_examples))


_TASK_PART_END = len("\nInput:")  # of "\nInput: <input>": the task's part ends at ":", the instance's starts with " "


def _encode_prompts(tokenizer, tasks: Sequence[NITask], prompts: list[str], cfg: PromptConfig) -> list[list[int]]:
    """Token ids (bos included) of full prompts, in batched tokenizer calls.

    Most of a prompt (definition and demonstrations) is the same for every instance of a task. For byte-level BPE
    tokenizers (GPT-2, Llama 3, Qwen: their pre-tokenizer splits ":" from a following " word", so no token spans
    the cut) and the default template, the task's part up to "Input:" is encoded once per task and batch and only
    the instance's part per prompt; the first prompt of each task and batch is also encoded whole and compared,
    and a task whose ids differ is encoded whole. Other tokenizers and templates: every prompt whole."""
    pre = getattr(getattr(tokenizer, "backend_tokenizer", None), "pre_tokenizer", None)
    if cfg.template is not None or pre is None or "ByteLevel" not in repr(pre):
        return [_with_bos(tokenizer, ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    heads: dict[int, str] = {}
    for task, text in zip(tasks, prompts):
        if id(task) not in heads:
            shape = encode_prompt(task, "\x00", cfg, *_demos(task, cfg)[:1], num_neg=_demos(task, cfg)[1])
            heads[id(task)] = shape[:shape.rindex("\nInput: \x00") + _TASK_PART_END]
    rests = []
    for task, text in zip(tasks, prompts):
        if not text.startswith(heads[id(task)]):  # cannot happen for the default template; keep it whole
            heads[id(task)] = ""
        rests.append(text[len(heads[id(task)]):])
    keys = list(heads)
    head_ids = dict(zip(keys, tokenizer([heads[k] for k in keys], add_special_tokens=False)["input_ids"]))
    rest_ids = tokenizer(rests, add_special_tokens=False)["input_ids"]
    first = {}
    for i, task in enumerate(tasks):
        first.setdefault(id(task), i)
    whole = dict(zip(first, tokenizer([prompts[i] for i in first.values()], add_special_tokens=False)["input_ids"]))
    exact = {k: list(head_ids[k]) + list(rest_ids[first[k]]) == list(whole[k]) for k in keys}
    out = []
    for i, (task, text) in enumerate(zip(tasks, prompts)):
        k = id(task)
        if exact[k]:
            out.append(_with_bos(tokenizer, list(head_ids[k]) + list(rest_ids[i])))
        else:
            out.append(_with_bos(tokenizer, _encode(tokenizer, text)))
    return out


def tokenize_rows(rows: dict[str, list], tasks: Sequence[NITask], tokenizer, prompt_cfg: PromptConfig,
                  tok_cfg: TokenizeConfig, unk: int | None) -> dict[str, list]:
    """A batch of instances (columns task = index into `tasks`, id, input, outputs) -> one row per trained output:
    input_ids, targets, task (name), id, prompt_len, status (LOST_DEMOS | DEFINITION_CUT | DROPPED bits) and
    unknown (count of `unk` in input_ids). Prompts and targets are encoded in one batched tokenizer call each;
    only prompts over budget are refitted one by one. A dropped example has empty input_ids."""
    from tune.losses import IGNORE_INDEX

    eos = [tokenizer.eos_token_id] if tok_cfg.add_eos else []
    items = []  # (task, instance, example id, output)
    for t, iid, text, outputs in zip(rows["task"], rows["id"], rows["input"], rows["outputs"]):
        task, inst = tasks[t], NIInstance(iid, text, outputs)
        for k, output in enumerate(outputs if tok_cfg.train_on == "all" else outputs[:1]):
            items.append((task, inst, iid if k == 0 else f"{iid}#{k}", output))
    out = {"input_ids": [], "targets": [], "task": [], "id": [], "prompt_len": [], "status": [], "unknown": []}
    if not items:
        return out
    prompts = [encode_prompt(task, inst.input, prompt_cfg, *_demos(task, prompt_cfg)[:1],
                             num_neg=_demos(task, prompt_cfg)[1]) for task, inst, _, _ in items]
    prompt_ids = _encode_prompts(tokenizer, [task for task, *_ in items], prompts, prompt_cfg)
    output_ids = tokenizer([output for *_, output in items], add_special_tokens=False)["input_ids"]
    for (task, inst, ex_id, _), full, target in zip(items, prompt_ids, output_ids):
        target_ids = list(target) + eos
        prompt, lost_demos, cut_definition = _fit_prompt(task, inst, prompt_cfg, tokenizer,
                                                         tok_cfg.max_length - len(target_ids), full)
        out["task"].append(task.name)
        out["id"].append(ex_id)
        if prompt is None:
            out["input_ids"].append([]), out["targets"].append([]), out["prompt_len"].append(0)
            out["status"].append(DROPPED), out["unknown"].append(0)
            continue
        ids = prompt + target_ids
        first = len(prompt) if tok_cfg.mask_prompt else 1  # first position of ids that is a target
        out["input_ids"].append(ids)
        out["targets"].append([IGNORE_INDEX] * max(0, first - 1) + ids[max(1, first):] + [IGNORE_INDEX])
        out["prompt_len"].append(len(prompt))
        out["status"].append(LOST_DEMOS * lost_demos | DEFINITION_CUT * cut_definition)
        out["unknown"].append(0 if unk is None else ids.count(unk))
    return out


def _check_eos(tokenizer, tok_cfg: TokenizeConfig) -> None:
    if tok_cfg.add_eos and tokenizer.eos_token_id is None:
        raise ConfigError("data.add_eos=true but the tokenizer has no eos_token; "
                          "set one in tokenizer_config.json or add_eos=false")


def tokenize_examples(pairs, tokenizer, prompt_cfg: PromptConfig, tok_cfg: TokenizeConfig,
                      batch_size: int = 1000) -> tuple[list[dict], TruncationReport]:
    """Prompt + target (+ eos) token ids with aligned ``targets``: targets[t] = ids[t+1] where ids[t+1] is an output
    token or eos (everywhere but the last position when mask_prompt=False), -100 elsewhere. Examples longer than
    max_length lose demonstrations, then definition tokens; one whose instance + target still do not fit is dropped.
    In memory, for small sets: build_dataset does the same batches through ``datasets`` onto disk."""
    from tune.hf import unknown_token_id

    _check_eos(tokenizer, tok_cfg)
    unk = unknown_token_id(tokenizer)
    tasks, rows = _instance_rows(pairs)
    columns = {k: [] for k in ("input_ids", "targets", "task", "id", "prompt_len", "status", "unknown")}
    for start in range(0, len(rows["id"]), batch_size):
        part = tokenize_rows({k: v[start:start + batch_size] for k, v in rows.items()}, tasks, tokenizer, prompt_cfg,
                             tok_cfg, unk)
        for k in columns:
            columns[k] += part[k]
    report = _report(columns["status"], columns["id"], [len(ids) for ids in columns["input_ids"]], columns["unknown"], unk)
    examples = [{"input_ids": ids, "targets": t, "task": name, "id": ex_id, "prompt_len": n}
                for ids, t, name, ex_id, n, status in zip(columns["input_ids"], columns["targets"], columns["task"],
                                                          columns["id"], columns["prompt_len"], columns["status"])
                if not status & DROPPED]
    return examples, report


def _report(status, ids, lengths, unknown, unk: int | None) -> TruncationReport:
    """The TruncationReport of tokenize_rows' status / id / length / unknown columns (sequences or numpy arrays)."""
    import numpy as np

    status, lengths, unknown = (np.asarray(x, dtype=np.int64) for x in (status, lengths, unknown))
    dropped = np.flatnonzero(status & DROPPED)
    kept = (status & DROPPED) == 0
    return TruncationReport(total=len(status), examples_dropped_demos=int(((status & LOST_DEMOS) > 0)[kept].sum()),
                            definition_truncated=int(((status & DEFINITION_CUT) > 0)[kept].sum()),
                            dropped=len(dropped), dropped_ids=[str(ids[i]) for i in dropped.tolist()],
                            tokens=int(lengths[kept].sum()), unknown_tokens=None if unk is None else int(unknown[kept].sum()))


# -- cached dataset -----------------------------------------------------------------------------
def tokenizer_digest(tokenizer) -> str:
    """Hash of everything about the tokenizer that changes token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id,
                         bool(getattr(tokenizer, "add_bos_token", False))]).encode())
    return h.hexdigest()


def _cache_key(pairs, tokenizer, prompt_cfg: PromptConfig, tok_cfg: TokenizeConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([FORMAT_VERSION, asdict(prompt_cfg), asdict(tok_cfg), tokenizer_digest(tokenizer)]).encode())
    task_hashes: dict[int, str] = {}
    for task, _ in pairs:
        if id(task) not in task_hashes:  # everything of the task that enters a prompt
            content = [task.name, task.definition, [asdict(e) for e in task.positive_examples],
                       [asdict(e) for e in task.negative_examples]]
            task_hashes[id(task)] = hashlib.sha256(json.dumps(content).encode()).hexdigest()
    for start in range(0, len(pairs), 10_000):  # one json.dumps per 10,000 instances: ~3x faster than one each
        chunk = [[task_hashes[id(task)], inst.id, inst.input, inst.outputs] for task, inst in pairs[start:start + 10_000]]
        h.update(json.dumps(chunk).encode())
    return h.hexdigest()


def _features():
    from datasets import Features, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4
        from datasets import Sequence as List
    return Features({"input_ids": List(Value("int32")), "targets": List(Value("int32")), "task": Value("string"),
                     "id": Value("string"), "prompt_len": Value("int32")})


def _load_cached(path: Path, unk: int | None):
    from datasets import load_from_disk

    try:
        report = json.loads((path / "report.json").read_text(encoding="utf-8"))
        dataset = load_from_disk(str(path / "dataset"))
    except (OSError, ValueError, TypeError):
        return None
    if "tokens" not in report:  # written before the report counted unknown tokens: count them now
        rows = dataset["input_ids"]
        report["tokens"] = sum(len(ids) for ids in rows)
        report["unknown_tokens"] = None if unk is None else sum(ids.count(unk) for ids in rows)
    try:
        return dataset, TruncationReport(**report)
    except TypeError:
        return None


def tokenize_workers(n_instances: int) -> int:
    """Processes for tokenizing `n_instances`: 1 below 50,000 instances or on <= 2 cores (the fast tokenizers'
    batch call already uses every core; extra processes there only add pickling, see BENCHMARKS.md), else one per
    core up to 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores <= 2 or n_instances < 50_000 else min(cores, 8)


def build_dataset(pairs, tokenizer, prompt_cfg: PromptConfig, tok_cfg: TokenizeConfig, cache_dir: PathLike,
                  num_proc: int | None = None):
    """tokenize_examples as a ``datasets.Dataset``, cached under ``cache_dir/<sha256 key>/`` (dataset + report.json,
    which keeps the report's counts, unknown tokens included).

    Tokenizes in batches through ``Dataset.map`` (`num_proc` processes, default tokenize_workers), writing Arrow
    files as it goes: memory stays bounded by a batch, not the data set. The key covers the pairs (task prompt
    content, instance ids, inputs, outputs), both configs and the tokenizer, so a second call with the same inputs
    loads from disk (memory-mapped) without tokenizing.
    """
    import contextlib
    import shutil
    from functools import partial

    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset, Value

    from tune.hf import quiet_third_party, unknown_token_id

    pairs = list(pairs)
    unk = unknown_token_id(tokenizer)
    key = _cache_key(pairs, tokenizer, prompt_cfg, tok_cfg)
    final = Path(cache_dir) / key
    cached = _load_cached(final, unk)
    if cached is not None:
        return cached
    _check_eos(tokenizer, tok_cfg)
    tasks, rows = _instance_rows(pairs)
    del pairs
    work_features = _features()
    work_features["status"], work_features["unknown"] = Value("int8"), Value("int32")
    num_proc = tokenize_workers(len(rows["id"])) if num_proc is None else num_proc
    # an incomplete leftover is replaced; a copy a concurrent build completed first is kept
    with directory_written_aside(final, lambda path: _load_cached(path, unk) is not None) as tmp:
        source = Dataset(pa.table({"task": pa.array(rows["task"], pa.int32()), "id": pa.array(rows["id"], pa.string()),
                                   "input": pa.array(rows["input"], pa.string()),
                                   "outputs": pa.array(rows["outputs"], pa.list_(pa.string()))}))  # 3x from_dict's speed
        del rows
        (tmp / "work").mkdir()
        # a progress bar only where tokenizing takes a while
        with quiet_third_party() if len(source) < 10_000 else contextlib.nullcontext():
            if len(source):
                fn = partial(tokenize_rows, tasks=tasks, tokenizer=tokenizer, prompt_cfg=prompt_cfg, tok_cfg=tok_cfg,
                             unk=unk)
                tokenized = source.map(fn, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
                                       remove_columns=source.column_names, features=work_features,
                                       cache_file_name=str(tmp / "work" / "tokenized.arrow"), new_fingerprint=key[:32],
                                       desc="tokenizing")
            else:  # map would keep the input columns of an empty dataset
                tokenized = Dataset.from_dict({k: [] for k in work_features}, features=work_features)
        table = tokenized.with_format("arrow")[:]  # memory-mapped columns
        status = table["status"].to_numpy()
        ids = table["id"].to_pylist() if (status & DROPPED).any() else []  # only to name the dropped ones
        report = _report(status, ids, pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False),
                         table["unknown"].to_numpy(), unk)
        del table, ids
        with quiet_third_party():  # no "Saving the dataset" bars: a cache write
            kept = tokenized.filter(lambda status: [s & DROPPED == 0 for s in status], input_columns="status",
                                    batched=True, batch_size=10_000,
                                    cache_file_name=str(tmp / "work" / "kept.arrow")) if report.dropped else tokenized
            kept = kept.remove_columns(["status", "unknown"])
            # an empty dataset saved as 0 shards would not load back
            kept.save_to_disk(str(tmp / "dataset"), num_shards=1 if len(kept) == 0 else None)
        del source, tokenized, kept
        shutil.rmtree(tmp / "work", ignore_errors=True)
        (tmp / "report.json").write_text(json.dumps(asdict(report)), encoding="utf-8")
    loaded = _load_cached(final, unk)
    if loaded is None:
        raise DataError(f"{final}: cache entry was written but cannot be read back; delete it and run again")
    return loaded
