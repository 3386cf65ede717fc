"""Accuracy and macro-F1 of class predictions, an `evaluate` module (for `tune run classify`).

Macro-F1 is the unweighted mean of per-class F1 over the classes that occur in the references or the
predictions (a class with no true and no predicted rows is skipped). A class's precision (recall) is 0
when it is never predicted (never true), as scikit-learn's `zero_division=0`; F1 is 0 when both are 0.

    >>> metric = evaluate.load("tune/metrics/classification")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 66.66666666666667, 'macro_f1': 66.66666666666666}
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = "Accuracy and macro-F1 (x100) of predicted class ids against reference class ids."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted class ids (int).
    references: list of true class ids (int), one per prediction.
Returns:
    accuracy: percentage of predictions equal to their reference, in [0, 100] (0 for no predictions).
    macro_f1: mean per-class F1 x100 over the classes present in references or predictions (0 for none).
"""


def accuracy_macro_f1(predictions: list[int], references: list[int]) -> tuple[float, float]:
    """(accuracy, macro-F1), both in [0, 100]; see the module docstring for the F1 conventions."""
    n = len(references)
    if n == 0:
        return 0.0, 0.0
    correct = sum(p == r for p, r in zip(predictions, references))
    f1s = []
    for c in sorted(set(predictions) | set(references)):
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        predicted, true = sum(p == c for p in predictions), sum(r == c for r in references)
        precision = tp / predicted if predicted else 0.0
        recall = tp / true if true else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return 100.0 * correct / n, 100.0 * sum(f1s) / len(f1s)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(self, predictions, references):
        accuracy, macro_f1 = accuracy_macro_f1(list(predictions), list(references))
        return {"accuracy": accuracy, "macro_f1": macro_f1}
