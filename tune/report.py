"""A run's record: metrics.jsonl, samples.jsonl and the same scalars and samples in the trackers of train.log_with
as it trains (MetricsLog), and report.png, the training and validation loss curves drawn from those rows
(write_report)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


def expert_fractions(rows: list[dict]) -> dict[int, list[tuple[int, float]]]:
    """expert index -> [(step, share of the router's assignments)] from the training rows of an MoE run (empty for a
    dense model): the curves that show a collapsing router (one expert taking most tokens)."""
    curves: dict[int, list[tuple[int, float]]] = {}
    for r in rows:
        for key, value in r.items():
            if key.startswith("expert_frac_"):
                curves.setdefault(int(key.rsplit("_", 1)[1]), []).append((r["step"], value))
    return dict(sorted(curves.items()))


def write_report(rows: list[dict], path: Path, title: str | None = None) -> Path | None:
    """Plot train loss (and val loss, if any) against step, and for an MoE run each expert's share of the routed
    tokens below it. Returns the path, or None with no data."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experts = expert_fractions(rows)
    if experts:
        fig, (ax, ax_experts) = plt.subplots(2, 1, figsize=(8, 7), dpi=100, sharex=True,
                                             gridspec_kw={"height_ratios": [2, 1]})
        colors = plt.get_cmap("tab10" if len(experts) <= 10 else "turbo")  # distinct colours for any expert count
        for i, curve in experts.items():
            ax_experts.plot(*zip(*curve), label=f"expert {i}", linewidth=1,
                            color=colors(i if len(experts) <= 10 else i / (len(experts) - 1)))
        ax_experts.axhline(1 / len(experts), color="gray", linestyle="--", linewidth=1, label="balanced")
        ax_experts.set_ylabel("share of routed tokens")
        ax_experts.set_xlabel("step")
        ax_experts.grid(alpha=0.3)
        # beside the axes, not over the curves: one column per 16 entries
        ax_experts.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                          ncol=1 + len(experts) // 16)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", linewidth=1.5, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or Path(path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


class MetricsLog:
    """metrics.jsonl (one JSON object per event), samples.jsonl (one per sample completion) and the trackers of
    train.log_with (tune.trackers: TensorBoard by default), on the main process only.

    Rows are never deleted: when a run starts at `resume_step` and metrics.jsonl (or samples.jsonl) holds rows of
    later steps (the steps trained after the checkpoint it resumes, or a whole earlier run when it starts afresh),
    those rows move to metrics.jsonl.superseded-<time> (samples.jsonl.superseded-<time>) and the file keeps the
    rows up to resume_step, so it always describes the one history that the weights went through."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0, log_with: str | list[str] = "tensorboard",
                 config=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        self.enabled = enabled
        self.trackers = None
        self.superseded: Path | None = None
        self.samples_superseded: Path | None = None
        if not enabled:
            return
        self.superseded = _supersede_after(self.path, resume_step)
        self.samples_superseded = _supersede_after(self.samples_path, resume_step)
        from tune.trackers import Trackers

        self.trackers = Trackers(log_with, run_dir, resume_step, config)

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a killed process
                continue
        return rows

    def log(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.trackers.log(row)

    def log_samples(self, step: int, samples: list[dict]):
        """Sample completions ({"prompt", "reference", "prediction"}) at `step`: to samples.jsonl, one row each with
        "step", and to the trackers' text / table APIs."""
        if not self.enabled:
            return
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
        self.trackers.log_samples(step, samples)

    def close(self):
        if self.trackers is not None:
            self.trackers.finish()


def _supersede_after(path: Path, step: int) -> Path | None:
    """Move the rows of `path` (JSON lines with "step") after `step` to path.superseded-<time>, which is returned
    (None when there were none to move)."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep, later = [], []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except ValueError:  # a line cut short by a killed process: kept with the superseded rows
            row_step = math.inf
        (keep if row_step <= step else later).append(line)
    if not later:
        return None
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    superseded = path.with_name(f"{path.name}.superseded-{stamp}")
    while superseded.exists():
        n += 1
        superseded = path.with_name(f"{path.name}.superseded-{stamp}-{n}")
    for target, content in ((superseded, later), (path, keep)):  # the moved rows are safe first
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(line if line.endswith("\n") else line + "\n" for line in content))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    return superseded
