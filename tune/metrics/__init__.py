"""Metric modules shipped with the package, loaded through `evaluate` from their directories (no network).

Each metric is a standard `evaluate` module: `tune/metrics/<name>/<name>.py` holding one
`evaluate.Metric` subclass, so `evaluate.load("path/to/tune/metrics/<name>")` (the directory, or the
`.py` file) returns it. `load_metric(name)` does that with the path of the installed package, offline.

    rouge_l         ROUGE-L F-measure x100 as in Super-NaturalInstructions, best over references, with a
                    Unicode/CJK-aware tokenizer (see rouge_l/rouge_l.py)
    exact_match     SQuAD-normalised exact match x100 against any reference
    classification  accuracy and macro-F1 x100 of predicted class ids (task heads, `tune run classify`)
    correlation     Pearson and Spearman (ties: average ranks) x100 of predicted scores (regression heads)

    >>> load_metric("rouge_l").compute(predictions=["a b"], references=[["a b", "c"]])
    {'rougeL': 100.0, 'scores': [100.0]}
"""

from __future__ import annotations

import difflib
import os
from functools import lru_cache
from pathlib import Path

from tune.errors import ConfigError

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("rouge_l", "exact_match", "classification", "correlation")


def metric_path(name: str) -> Path:
    """The module directory of a shipped metric (it holds `<name>.py`)."""
    if name not in METRIC_NAMES:
        close = difflib.get_close_matches(name, METRIC_NAMES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"available: {', '.join(METRIC_NAMES)}"
        raise ConfigError(f"unknown metric {name!r}; {hint}")
    return METRICS_DIR / name


@lru_cache(maxsize=None)
def load_metric(name: str):
    """`evaluate.load` of a shipped metric module, by path, never touching the network.

    The result is cached per process and kept in memory (no Arrow cache files or locks on disk).
    """
    path = metric_path(name)
    # Local modules need no network, but evaluate pings the Hub for download counts unless offline.
    os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
    import evaluate

    evaluate.config.HF_EVALUATE_OFFLINE = True  # the env var is read when evaluate is first imported
    return evaluate.load(str(path), keep_in_memory=True)
