"""Pearson and Spearman correlation of predicted and reference scores, an `evaluate` module (numpy only).

Spearman's rho is the Pearson correlation of the ranks, ties given their average rank (as
scipy.stats.spearmanr). Both are x100. Constant predictions or references (or fewer than 2 pairs) have
no defined correlation: the result is nan.

    >>> metric = evaluate.load("tune/metrics/correlation")
    >>> metric.compute(predictions=[1.0, 2.0, 4.0], references=[1.0, 2.0, 3.0])
    {'pearson': 98.19805060619659, 'spearman': 100.0}
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Pearson and Spearman correlation (x100) of predicted scores against reference scores."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted scores (float).
    references: list of reference scores (float), one per prediction.
Returns:
    pearson: Pearson's r x100, in [-100, 100]; nan when either side is constant or there are < 2 pairs.
    spearman: Spearman's rho x100 (ties: average ranks), in [-100, 100]; nan likewise.
"""


def average_ranks(values) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks: [10, 20, 20, 5] -> [2, 3.5, 3.5, 1]."""
    values = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # rank of the last of each distinct value
    return (ends - (counts - 1) / 2.0)[inverse]


def pearson(x, y) -> float:
    """Pearson's r of two equal-length sequences; nan when either is constant or shorter than 2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denominator) if denominator > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman's rho: pearson of the average ranks."""
    return pearson(average_ranks(x), average_ranks(y)) if len(x) >= 2 else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Correlation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
            reference_urls=["https://en.wikipedia.org/wiki/Spearman%27s_rank_correlation_coefficient"],
        )

    def _compute(self, predictions, references):
        return {"pearson": 100.0 * pearson(predictions, references),
                "spearman": 100.0 * spearman(predictions, references)}
