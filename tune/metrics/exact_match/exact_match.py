"""Exact match as scored by Super-NaturalInstructions (Tk-Instruct's `compute_metrics.py`), an `evaluate` module.

A prediction scores 100 when, after SQuAD's `normalize_answer` (lowercase; drop ASCII punctuation;
drop the articles a / an / the as whole words; collapse whitespace), it equals any of its references
normalised the same way, else 0. The result is the mean over predictions.

One departure (off with `strict_sni=True`): a reference that is nothing but an article, such as the
multiple-choice answer "A" (task073 and many SNI tasks label options A-E), normalises to the empty
string, so SNI counts an empty prediction, or "The", as a match. For such a reference both sides are
compared with the articles kept: "a." still matches "A", "" and "the" do not.

    >>> metric = evaluate.load("tune/metrics/exact_match")
    >>> metric.compute(predictions=["The Answer."], references=[["answer"]])
    {'exact_match': 100.0, 'scores': [100.0]}
"""

from __future__ import annotations

import re
import string

import datasets
import evaluate

_CITATION = """\
@inproceedings{rajpurkar-etal-2016-squad,
    title = "{SQ}u{AD}: 100,000+ Questions for Machine Comprehension of Text",
    author = "Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy",
    booktitle = "EMNLP",
    year = "2016",
}
"""

_DESCRIPTION = "Exact match (x100) after SQuAD-style answer normalisation, against any of an instance's references."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference lists (one list of acceptable strings per prediction), or a list of
        single reference strings.
    strict_sni: reproduce SNI exactly, also for references that are only an article (default False: "A"
        is not matched by an empty prediction).
Returns:
    exact_match: the mean over predictions, in [0, 100].
    scores: per prediction, 100 if its normalised text equals a normalised reference, else 0.
"""

_PUNCTUATION = set(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str, remove_articles: bool = True) -> str:
    """SQuAD's normalisation: lowercase, remove punctuation, remove articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    if remove_articles:
        text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _match(prediction: str, reference: str, strict_sni: bool) -> bool:
    ref = normalize_answer(reference)
    if not ref and not strict_sni:
        kept = normalize_answer(reference, remove_articles=False)
        if kept:  # the reference is only an article ("A"): compare with articles kept
            return normalize_answer(prediction, remove_articles=False) == kept
    return normalize_answer(prediction) == ref


def exact_match(prediction: str, references: list[str], strict_sni: bool = False) -> float:
    """100.0 if `prediction` equals any of `references` after normalisation, else 0.0."""
    if isinstance(references, str):
        references = [references]
    return 100.0 if any(_match(prediction, ref, strict_sni) for ref in references) else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
            codebase_urls=["https://github.com/yizhongw/Tk-Instruct/blob/main/src/compute_metrics.py"],
            reference_urls=["https://arxiv.org/abs/1606.05250", "https://arxiv.org/abs/2204.07705"],
        )

    def _compute(self, predictions, references, strict_sni: bool = False):
        scores = [exact_match(p, r, strict_sni) for p, r in zip(predictions, references)]
        return {"exact_match": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
