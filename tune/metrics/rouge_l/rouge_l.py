"""ROUGE-L as scored by Super-NaturalInstructions, for any language, as an `evaluate` module.

Super-NaturalInstructions (allenai/natural-instructions, `eval/automatic`, and Tk-Instruct's
`compute_metrics.py`) scores each prediction with `rouge_scorer.RougeScorer(["rougeL"])`: the
F-measure of the longest common subsequence of tokens, the best over the instance's references, x100,
averaged over instances. English tasks use rouge_score's default tokenizer with `use_stemmer=True`;
cross-lingual tasks use a GPT-2 tokenizer instead, because the default tokenizer keeps only `[a-z0-9]`
and so scores every non-ASCII text (Japanese, Chinese, Russian, ...) as empty.

This module uses one tokenizer for every language, `UnicodeRougeTokenizer`:

* NFKC-normalise and lowercase (full-width "ＡＢＣ" becomes "abc"; NFKC also composes, so a decomposed
  "e" + U+0301 and a precomposed "é" give the same word);
* every character of a CJK script (Han ideographs, Hiragana, Katakana, Hangul syllables and jamo,
  Bopomofo) is a token of its own, since these scripts do not separate words by spaces; combining
  marks that follow it stay with it;
* everything else forms words: a word is a maximal run of letters, digits and combining marks
  (Unicode categories L*, N*, M*), so the vowel signs and viramas of Indic scripts, Thai/Lao/Khmer/
  Myanmar vowels and tone marks, Hebrew niqqud and Arabic harakat are part of their word ("कील" and
  "काल" are two different words). A mark with no letter or digit before it (at the start of the text,
  after a space or punctuation) starts a word. The zero-width (non-)joiners U+200C/U+200D that Indic
  scripts and Persian write inside words stay in the word when they follow a word character.
  Punctuation, symbols, whitespace and "_" separate words;
* with `use_stemmer=True` (the default, as SNI does for English) ASCII words longer than 3 characters
  are Porter-stemmed, exactly as rouge_score's default tokenizer does; words in other scripts are
  left as they are.

On ASCII text this gives exactly the tokens of rouge_score's default tokenizer, so English scores
equal SNI's. (Accented Latin words are kept whole, "café" rather than the default's "caf".)

Thai, Lao, Khmer and Myanmar are written without spaces between words, and no word segmenter is used:
a "word" there is a whole space-delimited run (often a phrase or a clause), so ROUGE-L on these
scripts is close to a match of whole space-separated phrases, and partial credit comes only from the
runs that match exactly. (rouge_score's default tokenizer keeps only `[a-z0-9]` and drops these
scripts entirely, scoring every such text 0; SNI scores its cross-lingual tasks on GPT-2 tokens.)

    >>> metric = evaluate.load("tune/metrics/rouge_l")
    >>> metric.compute(predictions=["the cat sat on the mat"], references=[["the cat is on the mat"]])
    {'rougeL': 83.33..., 'scores': [83.33...]}
"""

from __future__ import annotations

import re
import unicodedata

import datasets
import evaluate
import regex  # Unicode properties (\p{M}); a dependency of nltk, which rouge_score needs
from rouge_score import rouge_scorer

_CITATION = """\
@inproceedings{lin-2004-rouge,
    title = "{ROUGE}: A Package for Automatic Evaluation of Summaries",
    author = "Lin, Chin-Yew",
    booktitle = "Text Summarization Branches Out",
    year = "2004",
    pages = "74--81",
}
@inproceedings{wang-etal-2022-super,
    title = "Super-{N}atural{I}nstructions: Generalization via Declarative Instructions on 1600+ {NLP} Tasks",
    author = "Wang, Yizhong and others",
    booktitle = "EMNLP",
    year = "2022",
}
"""

_DESCRIPTION = "ROUGE-L F-measure (x100), best over each instance's references, with a Unicode/CJK-aware tokenizer."

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference lists (one list of acceptable strings per prediction), or a list of
        single reference strings.
    use_stemmer: Porter-stem ASCII words longer than 3 characters (default True, as SNI for English).
Returns:
    rougeL: the mean over predictions of the per-prediction score, in [0, 100].
    scores: per prediction, max over its references of the ROUGE-L F-measure, in [0, 100].
"""

# Scripts written without spaces between words, one token per character.
_CJK_RANGES = (
    "\u1100-\u11ff"  # Hangul jamo
    "\u2e80-\u2fdf"  # CJK radicals, Kangxi radicals
    "\u3005\u3007\u3021-\u3029\u3038-\u303b"  # ideographic iteration mark, number zero, Hangzhou numerals
    "\u3040-\u30ff"  # Hiragana, Katakana (incl. the prolonged sound mark)
    "\u3100-\u312f\u31a0-\u31bf"  # Bopomofo
    "\u3130-\u318f"  # Hangul compatibility jamo
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK unified ideographs extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\ua960-\ua97f\uac00-\ud7ff"  # Hangul jamo extended, syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # half-width Katakana (NFKC maps most of these to full width)
    "\U00020000-\U0003134f"  # CJK unified ideographs extensions B-G
)
_CJK_CHAR = rf"[[{_CJK_RANGES}]--\p{{M}}]"
_WORD_CHAR = rf"[[\p{{L}}\p{{N}}\p{{M}}]--{_CJK_CHAR}]"  # letters, digits, combining marks; not CJK
_JOINERS = "\u200c\u200d"  # zero-width non-joiner / joiner, written inside Indic and Persian words
_TOKEN_RE = regex.compile(rf"{_CJK_CHAR}\p{{M}}*|{_WORD_CHAR}(?:{_WORD_CHAR}|[{_JOINERS}])*", regex.V1)
_ASCII_WORD_RE = re.compile(r"^[a-z0-9]+$")


class UnicodeRougeTokenizer:
    """rouge_score tokenizer protocol (`tokenize(text) -> list[str]`); see the module docstring."""

    def __init__(self, use_stemmer: bool = True):
        self.use_stemmer = use_stemmer
        self._stemmer = None
        if use_stemmer:
            from nltk.stem import porter

            self._stemmer = porter.PorterStemmer()  # as rouge_score's DefaultTokenizer

    def tokenize(self, text: str) -> list[str]:
        tokens = _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())
        if self._stemmer is not None:
            tokens = [self._stemmer.stem(t) if len(t) > 3 and _ASCII_WORD_RE.match(t) else t for t in tokens]
        return tokens


_SCORERS: dict[bool, rouge_scorer.RougeScorer] = {}


def rouge_l(prediction: str, references: list[str], use_stemmer: bool = True) -> float:
    """Max over `references` of the ROUGE-L F-measure of `prediction`, x100."""
    if use_stemmer not in _SCORERS:
        _SCORERS[use_stemmer] = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeRougeTokenizer(use_stemmer))
    scorer = _SCORERS[use_stemmer]
    if isinstance(references, str):
        references = [references]
    return max((scorer.score(ref, prediction)["rougeL"].fmeasure * 100.0 for ref in references), default=0.0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate.Metric):
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
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge",
                           "https://github.com/allenai/natural-instructions"],
            reference_urls=["https://aclanthology.org/W04-1013", "https://arxiv.org/abs/2204.07705"],
        )

    def _compute(self, predictions, references, use_stemmer: bool = True):
        scores = [rouge_l(p, r, use_stemmer) for p, r in zip(predictions, references)]
        return {"rougeL": sum(scores) / len(scores) if scores else 0.0, "scores": scores}
