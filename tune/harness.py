"""lm-evaluation-harness (EleutherAI's `lm_eval`, the optional `harness` extra) on a model already in memory.

Used by `recipes/evaluate.py` when `harness.tasks` is set:

    manager, names = resolve_tasks(["hellaswag", "my_task"], include_path="my_tasks")   # before loading the model
    summary = run_harness(model, tokenizer, manager, names, num_fewshot=0, limit=None, batch_size=8)
    print(harness_table(summary))   # summary: what eval_results.json keeps under "harness"

The model (a transformers model, a peft model on top of one, quantized or not) is wrapped in lm_eval's `HFLM`,
which takes a model instance, so whatever `tune.hf.load_model` loaded is what the harness scores. Tasks are
lm_eval's own (its task names, groups, tags and glob patterns) and task YAMLs of your own in `include_path`
directories; a task reading local files (`dataset_path: json`, `dataset_kwargs.data_files`) needs no hub.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging
from pathlib import Path

from tune.errors import ConfigError, DataError

INSTALL = 'pip install -e ".[harness]"'


def missing_problem(key: str = "harness.tasks") -> str | None:
    """The one-line problem when lm_eval is not installed (None when it is); imports nothing."""
    if importlib.util.find_spec("lm_eval") is None:
        return (f"{key} needs lm-evaluation-harness, which is not installed: run {INSTALL} "
                "(or pip install lm_eval) in this environment")
    return None


def _paths(include_path) -> list[str]:
    if include_path is None:
        return []
    return list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm_eval logs a line for every setting it overrides and warns that a model passed as an instance is used
    as is (which is what we want); keep its warnings about the tasks and data, drop the INFO chatter."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm_eval.models.huggingface")]
    levels = [lg.level for lg in loggers]
    loggers[0].setLevel(max(levels[0], logging.WARNING))
    loggers[1].setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def resolve_tasks(tasks: list[str], include_path=None):
    """lm_eval's TaskManager and the task names to run: each of `tasks` is a registered task, group or tag name
    (lm_eval's or one from a YAML under `include_path`: a directory, a YAML file or a list of them), a glob
    pattern over those names (e.g. "arc_*"), or the path of a task YAML.

    When every name is found in `include_path` alone, lm_eval's own tasks (~15,000 YAMLs) are not indexed.
    Raises ConfigError naming `harness.tasks` for an unknown name (with the closest known names).
    """
    from lm_eval.tasks import TaskManager

    paths = _paths(include_path)
    with _quiet_lm_eval():
        if paths:
            local = TaskManager(include_path=paths, include_defaults=False)
            names = _match(local, tasks)
            if names is not None:
                return local, names
        manager = TaskManager(include_path=paths or None)
    names = _match(manager, tasks)
    if names is None:
        unknown = []
        for name in (t for t in tasks if not _match(manager, [t])):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            unknown.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        where = f" or in harness.include_path={paths}" if paths else ""
        skipped = unreadable_yamls(paths)
        if skipped:  # lm_eval skips a task YAML it cannot read without a word: the likely cause, named
            files = "; ".join(f"{path} ({reason})" for path, reason in skipped[:3])
            raise ConfigError(f"harness.tasks: no task named {', '.join(unknown)}, and lm_eval skipped task YAML(s) it "
                              f"could not read: {files}; fix them")
        raise ConfigError(f"harness.tasks: no task, group or tag named {', '.join(unknown)} in lm_eval{where}; "
                          "`lm_eval ls tasks` lists lm_eval's, and harness.include_path takes the directory of "
                          "your own task YAMLs")
    return manager, names


def unreadable_yamls(paths: list[str]) -> list[tuple[Path, str]]:
    """(file, reason) for each task YAML under the `paths` (directories or files) that lm_eval's task index skips
    silently: a YAML syntax error, an `include` that does not exist, no `task` / `group` key; and *.yml files, which it
    does not read at all."""
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    bad = []
    for root in map(Path, paths):
        files = [root] if root.is_file() else sorted([*root.glob("**/*.yaml"), *root.glob("**/*.yml")])
        for path in files:
            if path.suffix != ".yaml":
                bad.append((path, "lm_eval reads *.yaml files only: rename it"))
                continue
            try:
                TaskIndex.process_cfg(load_yaml(path, resolve_func=False, recursive=True), path, {})
            except Exception as e:  # what TaskIndex.build catches and logs at debug level
                text = " ".join(str(e).split())[:200]
                bad.append((path, f"{type(e).__name__}: {text}" if text else type(e).__name__))
    return bad


def _match(manager, tasks: list[str]) -> list[str] | None:
    """`tasks` with glob patterns expanded over the manager's names, or None if any matches nothing."""
    names = []
    for task in tasks:
        if task in manager.all_tasks or (task.endswith((".yaml", ".yml")) and Path(task).is_file()):
            names.append(task)
        elif any(c in task for c in "*?[") and manager.match_tasks([task]):
            names.extend(n for n in manager.match_tasks([task]) if n not in names)
        else:
            return None
    return names


def run_harness(model, tokenizer, manager, names: list[str], num_fewshot: int | None = None,
                limit: int | float | None = None, batch_size: int = 8, bootstrap_iters: int = 100000) -> dict:
    """Run lm_eval's `simple_evaluate` on `model` (in memory, on its own device) with `tokenizer`.

    num_fewshot: demonstrations per prompt for every task (None: each task's default; a task whose YAML sets
    num_fewshot: 0 keeps 0). limit: the first N documents of each task (a float < 1: that fraction).
    bootstrap_iters: resamples for the stderr of metrics without a closed form (0: no standard errors at all).
    Returns summarize(lm_eval's results). A task whose data cannot be read (a missing data file, a hub dataset
    while offline) is a DataError naming the task list.
    """
    from jinja2 import TemplateError
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        try:
            raw = simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                                  bootstrap_iters=bootstrap_iters, log_samples=False)
        except OSError as e:  # a data file not found; a hub dataset offline (ConnectionError)
            text = str(e).strip().splitlines()
            reason = (text[0] if text else type(e).__name__)[:300]
            raise DataError(f"harness.tasks={names}: cannot load a task's data ({reason}); data_files in a task YAML "
                            "are relative to where you run tune, and a hub dataset needs the network "
                            "(with HF_DATASETS_OFFLINE=1 only what is cached)") from None
        except ValueError as e:
            if "Sample larger than population" not in str(e):
                raise
            raise ConfigError(f"harness.num_fewshot={num_fewshot}: a task of {names} has fewer documents than that to "
                              "draw demonstrations from (its fewshot_split, else its training split); lower "
                              "harness.num_fewshot (null: each task's default)") from None
        except TemplateError as e:  # a doc_to_text / doc_to_target / doc_to_choice Jinja template of a task YAML
            where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise ConfigError(f"harness.tasks={names}: a task's Jinja template does not render{where}: "
                              f"{type(e).__name__}: {' '.join(str(e).split())[:200]}; fix the doc_to_* templates of "
                              "its task YAML") from None
    return summarize(raw)


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(raw: dict) -> dict:
    """lm_eval's results as eval_results.json keeps them: per task (and group) its metrics and their standard
    errors, the number of documents scored, the shots and the task version.

    A metric is named as lm_eval names it without its filter when the filter is "none" (`acc`, `acc_norm`,
    `exact_match`), else `metric,filter` (gsm8k's `exact_match,strict-match`). A standard error lm_eval could not
    compute ("N/A") is null.
    """
    tasks = {}
    for name, row in raw["results"].items():
        metrics, stderr = {}, {}
        for key, value in row.items():
            if "," not in key:
                continue
            metric, filter_name = key.split(",", 1)
            if metric.endswith("_stderr"):
                metric = metric[: -len("_stderr")]
                target = stderr
            else:
                target = metrics
            target[metric if filter_name == "none" else f"{metric},{filter_name}"] = _number(value)
        samples = raw.get("n-samples", {}).get(name, {})
        tasks[name] = {"n": samples.get("effective", row.get("sample_len")),
                       "num_fewshot": raw.get("n-shot", {}).get(name), "version": raw.get("versions", {}).get(name),
                       "metrics": metrics, "stderr": stderr}
    import lm_eval

    return {"lm_eval_version": lm_eval.__version__, "tasks": tasks,
            "groups": sorted(raw.get("groups", {})), "limit": raw.get("config", {}).get("limit")}


def _format(value) -> str:
    return "n/a" if value is None else f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


def harness_table(summary: dict) -> str:
    """One row per task (and group) and metric: name, documents scored, shots, metric, value and standard error
    (as lm_eval reports them: fractions, not x100)."""
    header = ("task", "n", "shots", "metric", "value", "stderr")
    rows = []
    for name, row in summary["tasks"].items():
        for i, (metric, value) in enumerate(row["metrics"].items()):
            stderr = row["stderr"].get(metric)
            rows.append((name if i == 0 else "", str(row["n"]) if i == 0 else "",
                         str(row["num_fewshot"]) if i == 0 else "", metric,
                         _format(value), _format(stderr)))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(r):
        return "  ".join(r[c].ljust(widths[c]) if c in (0, 3) else r[c].rjust(widths[c]) for c in range(len(r)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])
