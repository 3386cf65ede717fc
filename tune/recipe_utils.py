"""Small steps every recipe shares: checking and preparing the run directory, sampling text.

Without torch at import: recipes' `validate` (run by `tune validate`) uses check_output_dir.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tune.errors import ConfigError


def empty_path_problems(cfg, keys: list[str]) -> list[str]:
    """One line per path-like key of `cfg` (dotted, e.g. 'data.corpus') whose value is an empty or blank string,
    or a list holding one. Empty means the current directory to pathlib, so `output_dir=` would write into it and
    `data.corpus=` would read every .txt under it: refuse instead. None (unset) passes."""
    problems = []
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if isinstance(item, str) and not item.strip():
                where = f"{key}[{i}]" if isinstance(value, (list, tuple)) else key
                problems.append(f"{where} is empty; give a path (paths are relative to where you run tune)")
    return problems


def check_file_free_dir(key: str, value) -> list[str]:
    """The problem (one line, or none) when directory `value` of config key `key` is an existing file or lies
    under one (it could never be created)."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        return [f"{key}={value} is a file, not a directory; choose a directory"]
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"{key}={value} lies under the file {existing}; choose a directory"]
    return []


def check_output_dir(output_dir, inputs: dict[str, object]) -> list[str]:
    """The problems of `output_dir` as the directory a run writes (one line each; empty if none).

    Refused: a file; a path under a file; a directory that cannot be written (the nearest existing ancestor
    is checked when it does not exist yet; root passes every os.access check); and a directory that is,
    contains or lies inside an input. `inputs` maps config keys to paths (a str, a list of them, or None):
    a run writing into an input would change what the next run reads (samples.txt in the corpus folder).
    """
    out = Path(output_dir)
    named = f"output_dir={output_dir}"
    file_problems = check_file_free_dir("output_dir", output_dir)
    if file_problems:
        return file_problems
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "" if existing == out else f" ({existing} is where it would be created)"
        return [f"{named} is not writable{what}; choose a directory you can write to"]
    problems = []
    resolved = out.resolve()
    for key, value in inputs.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not item or not Path(item).exists():  # a missing input is reported as such; a task name is no path
                continue
            path = Path(item).resolve()
            if path == resolved:
                relation = "is"
            elif path.is_relative_to(resolved):
                relation = "contains"
            elif resolved.is_relative_to(path):
                relation = "lies inside"
            else:
                continue
            problems.append(f"{named} {relation} the input {key}={item}; a run must not write among its inputs "
                            "(the next run would read what it wrote): choose a separate output_dir")
    return problems


def ni_task_inputs(d) -> dict[str, list]:
    """The paths an NI data section (finetune / distill) reads, by key: task sources, the folder a split file's
    names resolve in, tasks_dir."""
    return {f"data.{key}": task_source_paths(getattr(d, key), d.tasks_dir) for key in ("train_tasks", "eval_tasks")} \
        | {"data.tasks_dir": [d.tasks_dir]}


def task_source_paths(source, tasks_dir) -> list[str]:
    """The entries of a task source (a path or a list of them), each split file with the folder its names
    resolve in (tasks_dir, else <split file dir>/tasks)."""
    paths = []
    for item in source if isinstance(source, list) else [source]:
        if item is None:
            continue
        paths.append(str(item))
        if Path(item).is_file() and Path(item).suffix != ".json":  # a split file
            paths.append(str(tasks_dir) if tasks_dir is not None else str(Path(item).parent / "tasks"))
    return paths


def prepare_output_dir(cfg, accelerator, inputs=()) -> Path:
    """Check output_dir against inputs and earlier runs before any heavy work; returns it (not created yet).
    An existing output_dir is locked first (tune.run_lock): a second run writing into it is refused.

    Refuses to start afresh over an earlier run's checkpoints unless train.resume or overwrite is set,
    so nothing already saved is lost by a re-run, and refuses a resume that would change the schedule the
    checkpoint was trained with (engine.schedule_changes) unless train.allow_schedule_change is set.
    config.yaml is not written here: the engine writes it (Engine(run_config=cfg)) when training starts, so a
    refused resume leaves the earlier config.yaml as it was and a run that fails before its first step leaves
    no directory holding only a config.
    """
    from tune.checkpoint import Checkpointer, schedule_changes
    from tune.run_lock import lock_run_dir

    run_dir = Path(cfg.output_dir)
    for item in inputs:
        if item and Path(item).resolve() == run_dir.resolve():
            raise ConfigError(f"output_dir={cfg.output_dir} is also an input ({item}); choose a separate output_dir")
    if accelerator.is_main_process and run_dir.is_dir():  # before anything here is read or changed (new: Engine.fit)
        lock_run_dir(run_dir)
    checkpoints = run_dir / "checkpoints"
    has_checkpoints = (checkpoints / "latest").is_file() or any(p.is_dir() for p in checkpoints.glob("step_*"))
    if has_checkpoints and not cfg.train.resume and not getattr(cfg, "overwrite", False):
        raise ConfigError(f"output_dir={cfg.output_dir} holds checkpoints of an earlier run: set train.resume=true to "
                          "continue it, overwrite=true to start afresh, or choose another output_dir")
    latest = Checkpointer(run_dir, keep=1).resume_point(accelerator.num_processes) if cfg.train.resume else None
    if latest is not None:
        schedule_changes(latest, cfg.train, accelerator.num_processes, getattr(cfg, "seed", None))
    if accelerator.is_main_process and has_checkpoints and not cfg.train.resume:
        steps = sorted(p.name for p in checkpoints.glob("step_*") if p.is_dir())
        shutil.rmtree(checkpoints)
        # the earlier run's TensorBoard events would mix with this run's curves; its metrics.jsonl rows are kept
        # (moved to metrics.jsonl.superseded-TIME when training starts)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        print(f"overwrite=true: removed the earlier run's checkpoints in {checkpoints} ({', '.join(steps) or 'none'}) "
              "and its tensorboard/ events")
    accelerator.wait_for_everyone()
    return run_dir


def sample_text(model, tokenizer, sample_cfg, device, stream=print) -> list[str]:
    """Generate sample_cfg.num_samples continuations of sample_cfg.prompt with the native GPT, streaming text."""
    import torch

    from tune.generate import TextStreamer

    ids = tokenizer(sample_cfg.prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
    samples = []
    for i in range(sample_cfg.num_samples):
        streamer = TextStreamer(tokenizer)
        prompt = torch.tensor([ids], device=device)
        if stream:
            stream(f"--- sample {i + 1} ---\n{sample_cfg.prompt}", end="", flush=True)
        pieces = []
        for token in model.generate(prompt, sample_cfg.max_new_tokens, sample_cfg.temperature, sample_cfg.top_k,
                                    sample_cfg.top_p, eos_token_id=tokenizer.eos_token_id):
            piece = streamer.put(token[0].tolist())
            pieces.append(piece)
            if stream and piece:
                stream(piece, end="", flush=True)
        pieces.append(streamer.end())
        if stream:
            stream(pieces[-1])
        samples.append(sample_cfg.prompt + "".join(pieces))
    return samples

