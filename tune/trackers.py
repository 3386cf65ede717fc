"""Experiment trackers (train.log_with): the scalars of metrics.jsonl, and the sample completions of samples.jsonl,
also sent to TensorBoard, Weights & Biases, MLflow, trackio, Aim, Comet, ... through accelerate's tracker classes
(accelerate.tracking: the objects `Accelerator.init_trackers` makes, with their start / log / finish).

The engine starts them itself, on the main process, one set per run directory, rather than through
`Accelerator.init_trackers` / `end_training`: one accelerator serves several runs (distill's CE-only and other
students train into subdirectories with their own trackers), and `end_training` also destroys the process group
the recipes still use after training.

Importing this module imports neither torch nor any tracker: `tune validate` checks names and installs with it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import uuid
from pathlib import Path

# train.log_with name (accelerate's) -> (module it imports, pip package that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
    "aim": ("aim", "aim"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
    "swanlab": ("swanlab", "swanlab"),
}
PROJECT = "gpt-tune"  # wandb / trackio / comet / swanlab project and MLflow experiment, unless their env var says
SAMPLE_COLUMNS = ("step", "prompt", "reference", "prediction")


def tracker_names(log_with: str | list[str]) -> list[str]:
    """train.log_with as a list of names, each once, in order ("tensorboard" -> ["tensorboard"])."""
    return list(dict.fromkeys([log_with] if isinstance(log_with, str) else log_with))


def unknown_tracker_problems(log_with: str | list[str]) -> list[str]:
    """One problem line per name of train.log_with that is no tracker we know."""
    return [f"train.log_with: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} (or [] for "
            "metrics.jsonl alone)" for name in tracker_names(log_with) if name not in TRACKERS]


def missing_tracker_problems(log_with: str | list[str]) -> list[str]:
    """One problem line per tracker of train.log_with whose package is not installed here, naming what to install
    (an environment check of `tune validate` and run start, not of the config: config.yaml must load elsewhere)."""
    return [f"train.log_with: {name} is not installed: pip install {TRACKERS[name][1]} (or drop {name} from "
            "train.log_with)" for name in tracker_names(log_with)
            if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None]


def flat_config(config) -> dict:
    """The run's config (a dataclass or dict) as {"train.lr": 0.001, ...}: the hyperparameters trackers store.
    Values stay bool / int / float / str / None; lists and other values become their str()."""
    from dataclasses import asdict, is_dataclass

    data = asdict(config) if is_dataclass(config) else dict(config)
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    walk("", data)
    return flat


class Trackers:
    """The trackers of one run (create them on the main process only). `resume_step` > 0 continues the tracker
    runs of the previous start (their ids are kept in run_dir/trackers.json): wandb resumes its run, MLflow its
    run id, Aim its run hash, trackio its run name, TensorBoard drops the events after resume_step; 0 starts new
    ones. `config`: the hyperparameters stored with a new run (not on resume: MLflow refuses a changed parameter).

    Raises ConfigError for an unknown or not installed tracker, TuneError (one line) for one that fails to start."""

    def __init__(self, log_with: str | list[str], run_dir, resume_step: int = 0, config=None):
        from tune.errors import ConfigError, TuneError

        problems = unknown_tracker_problems(log_with) + missing_tracker_problems(log_with)
        if problems:
            raise ConfigError(problems[0])
        self.run_dir = Path(run_dir)
        self.ids_path = self.run_dir / "trackers.json"
        ids = json.loads(self.ids_path.read_text()) if resume_step and self.ids_path.is_file() else {}
        self.trackers = []
        for name in tracker_names(log_with):
            tracker = self._make(name, resume_step, ids.get(name, {}))
            try:
                tracker.start()
            except Exception as e:  # e.g. wandb online without an API key, an MLflow store it cannot open
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise TuneError(f"train.log_with: {name} did not start: {first} (its own settings say where it "
                                "logs, e.g. WANDB_MODE=offline, MLFLOW_TRACKING_URI)") from e
            ids[name] = self._run_id(tracker)
            if config is not None and not resume_step and name != "tensorboard":  # config.yaml is beside TB's events
                tracker.store_init_configuration(flat_config(config))
            self.trackers.append(tracker)
        if self.trackers:
            tmp = self.ids_path.with_name(self.ids_path.name + ".tmp")
            tmp.write_text(json.dumps(ids, indent=2))
            tmp.replace(self.ids_path)

    def _make(self, name: str, resume_step: int, previous: dict):
        """accelerate's tracker object for `name`, writing under run_dir where the tracker writes locally."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls, run, resume = LOGGER_TYPE_TO_CLASS[name], self.run_dir, bool(resume_step)
        if name == "tensorboard":  # run_dir/tensorboard; events after the resumed step are dropped
            return cls("tensorboard", run, purge_step=resume_step + 1 if resume else None)
        if name == "wandb":  # offline (WANDB_MODE=offline) files go to run_dir/wandb
            run_id = previous.get("id") if resume else None
            return cls(os.environ.get("WANDB_PROJECT", PROJECT), dir=str(run), name=run.name,
                       id=run_id or uuid.uuid4().hex[:12], resume="allow")
        if name == "mlflow":  # where MLFLOW_TRACKING_URI says (MLflow's default otherwise)
            return cls(PROJECT, run_id=previous.get("run_id") if resume else None, run_name=run.name)
        if name == "trackio":  # local (~/.cache/huggingface/trackio or TRACKIO_DIR) unless space_id is set
            return cls(os.environ.get("TRACKIO_PROJECT", PROJECT), name=previous.get("name") or run.name,
                       resume="allow" if resume else "never")
        if name == "aim":  # an Aim repository in run_dir
            return cls(run.name, run, **({"run_hash": previous["run_hash"]} if resume and "run_hash" in previous
                                         else {}))
        return cls(PROJECT, run) if cls.requires_logging_directory else cls(PROJECT)

    @staticmethod
    def _run_id(tracker) -> dict:
        """What continues this tracker's run on resume."""
        run = tracker.tracker
        if tracker.name == "wandb":
            return {"id": run.id}
        if tracker.name == "mlflow":
            return {"run_id": run.info.run_id}
        if tracker.name == "aim":
            return {"run_hash": run.hash}
        if tracker.name == "trackio":
            return {"name": run.name}
        return {}

    def log(self, row: dict) -> None:
        """A metrics.jsonl row's numbers (all but "step") at its step, to every tracker."""
        values = {k: v for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(values, step=row["step"])

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Sample completions ({"prompt", "reference", "prediction"}) at `step`, through each tracker's own text or
        table API: a wandb / trackio Table, MLflow's log_table (artifact samples.json), TensorBoard and Aim text,
        Comet's log_table. Trackers without one get nothing (samples.jsonl has them all)."""
        rows = [[step, s["prompt"], s["reference"], s["prediction"]] for s in samples]
        for tracker in self.trackers:
            run = tracker.tracker
            if tracker.name == "tensorboard":
                for i, s in enumerate(samples):
                    run.add_text(f"samples/{i}", _markdown(s), global_step=step)
                run.flush()
            elif tracker.name == "wandb":
                import wandb

                run.log({"samples": wandb.Table(columns=list(SAMPLE_COLUMNS), data=rows)}, step=step)
            elif tracker.name == "trackio":
                import trackio

                run.log({"samples": trackio.Table(columns=list(SAMPLE_COLUMNS), data=rows)}, step=step)
            elif tracker.name == "mlflow":
                import mlflow

                mlflow.log_table({c: [r[i] for r in rows] for i, c in enumerate(SAMPLE_COLUMNS)}, "samples.json")
            elif tracker.name == "aim":
                import aim

                for i, s in enumerate(samples):
                    run.track(aim.Text(_markdown(s)), name="samples", step=step, context={"index": i})
            elif tracker.name == "comet_ml":
                run.log_table(f"samples_{step:07d}.csv", tabular_data=rows, headers=list(SAMPLE_COLUMNS))

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _markdown(sample: dict) -> str:
    """One sample as Markdown (TensorBoard and Aim render it): the prompt in a code block, then the two outputs."""
    fence = "````" if "```" in sample["prompt"] else "```"
    return (f"**prompt**\n\n{fence}\n{sample['prompt']}\n{fence}\n\n**reference**: {sample['reference']}\n\n"
            f"**prediction**: {sample['prediction']}")
