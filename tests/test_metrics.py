"""The shipped `evaluate` metric modules (tune/metrics): ROUGE-L and exact match as Super-NaturalInstructions scores them."""

import fnmatch
import os
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tune.errors import ConfigError
from tune.metrics import METRIC_NAMES, METRICS_DIR, load_metric, metric_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rouge():
    return load_metric("rouge_l")


@pytest.fixture(scope="module")
def em():
    return load_metric("exact_match")


def test_rouge_l_hand_computed(rouge):
    # tokens: the cat sat on the mat / the cat is on the mat -> LCS "the cat on the mat" = 5 of 6 each side
    out = rouge.compute(predictions=["the cat sat on the mat"], references=[["the cat is on the mat"]])
    assert out["scores"] == [pytest.approx(100 * 5 / 6)]
    assert out["rougeL"] == pytest.approx(83.3333, abs=1e-3)
    # non-contiguous LCS: "a c d" -> P = 3/4, R = 3/5, F = 2PR/(P+R) = 2/3
    out = rouge.compute(predictions=["a b c d"], references=[["a c d e f"]])
    assert out["scores"] == [pytest.approx(200 / 3)]


def test_rouge_l_best_of_references_empty_prediction_and_mean(rouge):
    out = rouge.compute(predictions=["the cat sat on the mat", "", "Paris"],
                        references=[["something else entirely", "the cat is on the mat"], ["anything"],
                                    ["paris", "Lyon"]])
    assert out["scores"] == [pytest.approx(100 * 5 / 6), 0.0, 100.0]
    assert out["rougeL"] == pytest.approx((100 * 5 / 6 + 0 + 100) / 3)
    # a single reference string per prediction is accepted as well
    assert rouge.compute(predictions=["a b"], references=["a b"])["scores"] == [100.0]


def test_rouge_l_stemming_and_case(rouge):
    # SNI scores English with use_stemmer=True: running -> run, dogs -> dog
    assert rouge.compute(predictions=["Running DOGS"], references=[["run dog"]])["scores"] == [100.0]
    assert rouge.compute(predictions=["Running DOGS"], references=[["run dog"]], use_stemmer=False)["scores"] == [0.0]


def test_rouge_l_matches_rouge_score_default_tokenizer_on_english(rouge):
    from rouge_score import rouge_scorer

    default = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [("It's 3.5 km, isn't it? (roughly)", "it is roughly 3.5 kilometres"),
             ("The quick brown fox jumped over the lazy dogs.", "A quick brown dog jumps over a lazy fox"),
             ("snake_case and CamelCase words", "snake case and camelcase words"),
             ("Yes", "No")]
    for pred, ref in pairs:
        expected = default.score(ref, pred)["rougeL"].fmeasure * 100
        assert rouge.compute(predictions=[pred], references=[[ref]])["scores"] == [pytest.approx(expected)], pred


def test_rouge_l_scores_japanese_and_chinese_per_character(rouge):
    from rouge_score import rouge_scorer

    # rouge_score's default tokenizer keeps only [a-z0-9]: every Japanese text is empty, scoring 0
    assert rouge_scorer.RougeScorer(["rougeL"]).score("猫が立った", "猫が座った")["rougeL"].fmeasure == 0
    # one token per CJK character: 猫 が 座 っ た vs 猫 が 立 っ た -> LCS 4 of 5
    out = rouge.compute(predictions=["猫が座った", "吾輩は猫である。", "我爱北京"],
                        references=[["猫が立った"], ["吾輩は猫である"], ["我爱上海"]])
    assert out["scores"] == [pytest.approx(80.0), pytest.approx(100.0), pytest.approx(50.0)]
    # other scripts are split on non-word characters, Unicode-aware; full-width letters are NFKC-folded
    assert rouge.compute(predictions=["Привет, мир!"], references=[["привет мир"]])["scores"] == [100.0]
    assert rouge.compute(predictions=["ＡＢＣ café"], references=[["abc CAFÉ"]])["scores"] == [100.0]


def tokenizer_of(metric, use_stemmer=True):
    """The metric module's own tokenizer (evaluate loads the module by path under a generated name)."""
    return sys.modules[type(metric).__module__].UnicodeRougeTokenizer(use_stemmer)


def test_rouge_l_keeps_combining_marks_in_their_words(rouge):
    """Vowel signs, viramas, tone marks, niqqud and harakat (Unicode Mn/Mc) belong to their word: words that
    differ only in their marks are different words (each case: 1 or 2 words a side, so 0, 50 or 100)."""
    cases = [("कील", "काल", 0.0),  # Devanagari: ka + ii / aa + la
             ("दिन", "दान", 0.0),
             ("मेरा घर", "मोर घर", 50.0),  # LCS "घर": P = R = 1/2
             ("मेरा घर", "मेरा घर", 100.0),
             ("ดี", "ดู", 0.0),  # Thai vowels above / below
             ("ດີ", "ດູ", 0.0),  # Lao
             ("סֵפֶר", "סַפָּר", 0.0),  # Hebrew with niqqud: sefer (book) / sapar (barber), same consonants
             ("קָרָא סֵפֶר", "קָרָא סַפָּר", 50.0),
             ("كَتَبَ", "كُتُب", 0.0),  # Arabic with harakat: kataba (he wrote) / kutub (books)
             ("كَتَبَ الدَّرْسَ", "كَتَبَ الدَّرْسَ", 100.0),
             ("கல்", "கால்", 0.0),  # Tamil: kal (stone) / kaal (leg)
             ("কাল ভাত", "কিল ভাত", 50.0),  # Bengali
             ("ទឹក", "ទុក", 0.0),  # Khmer: tuek (water) / tuk (keep)
             ("ကို", "ကာ", 0.0),  # Myanmar
             ("q\u0301", "q", 0.0)]  # decomposed Latin without a precomposed form: q + acute is not q
    out = rouge.compute(predictions=[c[0] for c in cases], references=[[c[1]] for c in cases])
    assert out["scores"] == [c[2] for c in cases]


def test_rouge_l_word_boundaries_with_marks(rouge):
    tokenize = tokenizer_of(rouge).tokenize
    assert tokenize("मेरा घर, कील!") == ["मेरा", "घर", "कील"]
    # decomposed and precomposed Latin are the same word (NFKC composes), kept whole, not cut at the mark
    assert tokenize("cafe\u0301 CAFE\u0301") == tokenize("café café") == ["café", "café"]
    assert rouge.compute(predictions=["re\u0301sume\u0301"], references=[["résumé"]])["scores"] == [100.0]
    assert rouge.compute(predictions=["résumé"], references=[["resume"]])["scores"] == [0.0]
    # a mark with nothing before it starts a word; after a CJK character it stays with that character
    assert tokenize("\u0301x y") == ["\u0301x", "y"]
    assert tokenize("猫\u302aが") == ["猫\u302a", "が"]
    # zero-width joiner inside a Sinhala word (ශ්‍රී) does not split it
    assert tokenize("ශ්\u200dරී ලංකා") == ["ශ්\u200dරී", "ලංකා"]
    # Thai / Khmer / Myanmar: no word segmenter, a word is a whole space-delimited run
    assert tokenize("สวัสดีครับ ขอบคุณ") == ["สวัสดีครับ", "ขอบคุณ"]
    assert rouge.compute(predictions=["สวัสดีครับ ขอบคุณ"], references=[["สวัสดีค่ะ ขอบคุณ"]])["scores"] == [50.0]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=40))
def test_rouge_l_tokens_equal_rouge_score_default_on_any_ascii(text):
    from nltk.stem import porter
    from rouge_score import tokenize as default_tokenize

    rouge = load_metric("rouge_l")
    assert tokenizer_of(rouge, False).tokenize(text) == default_tokenize.tokenize(text, None)
    assert tokenizer_of(rouge, True).tokenize(text) == default_tokenize.tokenize(text, porter.PorterStemmer())


def test_exact_match_normalisation(em):
    cases = [("The Answer.", ["answer"], 100.0),
             ("an apple", ["Apple!"], 100.0),
             ("  yes \n", ["Yes"], 100.0),
             ("answers", ["answer"], 0.0),
             ("the", [""], 100.0),  # both normalise to the empty string
             ("B", ["A", "b"], 100.0),  # any reference
             ("Theory", ["ory"], 0.0)]  # articles only as whole words
    out = em.compute(predictions=[c[0] for c in cases], references=[c[1] for c in cases])
    assert out["scores"] == [c[2] for c in cases]
    assert out["exact_match"] == pytest.approx(100 * 5 / 7)


def test_exact_match_reference_that_is_only_an_article(em):
    # multiple-choice answer "A": SQuAD normalisation empties it; we compare with articles kept instead
    preds, refs = ["", "The", "a.", " A ", "B"], [["A"]] * 5
    assert em.compute(predictions=preds, references=refs)["scores"] == [0.0, 0.0, 100.0, 100.0, 0.0]
    # strict_sni=True reproduces SNI's scoring, where "", "The" and "a." all match "A"
    assert em.compute(predictions=preds, references=refs, strict_sni=True)["scores"] == [100.0, 100.0, 100.0, 100.0, 0.0]


def test_modules_load_by_directory_and_by_file_offline(monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in METRIC_NAMES:
        assert (METRICS_DIR / name / f"{name}.py").is_file()  # evaluate's layout: the file is named as its folder
        by_dir = evaluate.load(str(metric_path(name)), keep_in_memory=True)
        by_file = evaluate.load(str(metric_path(name) / f"{name}.py"), keep_in_memory=True)
        assert isinstance(by_dir, evaluate.Metric) and type(by_dir).__name__ == type(by_file).__name__
    with pytest.raises(ConfigError, match="did you mean 'rouge_l'"):
        load_metric("rouge_L")


def test_metric_modules_ship_as_package_data():
    """pyproject's package-data globs (relative to tune/) cover every metric module, so wheels carry them."""
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tune"]
    for name in METRIC_NAMES:
        relative = os.path.join("metrics", name, f"{name}.py")
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in package_data), relative
