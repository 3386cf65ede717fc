"""data_prep.task_data (GPT-1 task-head data): reading rows, label sets, Natural-Instructions task formats, the input
transformations token by token, longest-first truncation; and the classification / correlation metrics."""

import json
import math
import re

import pytest

from conftest import NI_TASKS
from data_prep.natural_instructions import NIInstance, load_tasks
from data_prep.task_data import (KIND_FIELDS, NI_FORMATS, SpecialTokens, TaskData, TaskRow, encode_rows, fit_lengths,
                                 ni_qualification, ni_task_data, read_rows, sorted_labels, to_task_data)
from data_prep.text import train_bpe_tokenizer
from tune.errors import ConfigError, DataError
from tune.metrics import load_metric

SPECIALS = ["<s>", "<$>", "<e>"]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "is it raining today", "yes no maybe",
         "Paragraph: Anne is rough. Question: Anne is young.", "Sentence 1: a red bus Sentence 2: a bus"] * 5


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE (vocab 300) + the three task tokens as special tokens (transformers 5 keeps them in
    `extra_special_tokens`; the key "additional_special_tokens" is still accepted)."""
    tokenizer = train_bpe_tokenizer(TEXTS, 300)
    assert tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS}) == 3
    assert tokenizer.extra_special_tokens == SPECIALS
    return tokenizer


@pytest.fixture(scope="module")
def sp(tok):
    return SpecialTokens(*tok.convert_tokens_to_ids(SPECIALS))


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def data(kind, fields_list, targets=None):
    rows = [TaskRow(fields, 0, f"test.jsonl line {i + 1}") for i, fields in enumerate(fields_list)]
    return TaskData(kind, rows, None, targets or [0] * len(rows))


# -- input transformations ------------------------------------------------------------------------------
def test_transformations_token_by_token(tok, sp):
    s, d, e = sp.start, sp.delimiter, sp.extract
    assert len({s, d, e}) == 3 and min(s, d, e) >= 300  # new ids after the BPE vocabulary

    (ex,), n = encode_rows(data("classification", [{"text": "the cat sat"}], [1]), tok, sp, 64)
    assert ex.sequences == [[s, *ids(tok, "the cat sat"), e]] and ex.target == 1 and not ex.truncated and n == 0

    (ex,), _ = encode_rows(data("entailment", [{"premise": "a dog ran", "hypothesis": "it is raining"}]), tok, sp, 64)
    assert ex.sequences == [[s, *ids(tok, "a dog ran"), d, *ids(tok, "it is raining"), e]]

    (ex,), _ = encode_rows(data("similarity", [{"a": "a red bus", "b": "the mat"}]), tok, sp, 64)
    a, b = ids(tok, "a red bus"), ids(tok, "the mat")
    assert ex.sequences == [[s, *a, d, *b, e], [s, *b, d, *a, e]]  # both orders

    (ex,), _ = encode_rows(data("multiple_choice", [{"context": "is it raining", "choices": ["yes", "no", "maybe"]}],
                                [2]), tok, sp, 64)
    c = ids(tok, "is it raining")
    assert ex.sequences == [[s, *c, d, *ids(tok, choice), e] for choice in ("yes", "no", "maybe")] and ex.target == 2
    # surrounding whitespace is not part of a field
    (ex,), _ = encode_rows(data("classification", [{"text": "  the cat sat \n"}]), tok, sp, 64)
    assert ex.sequences == [[s, *ids(tok, "the cat sat"), e]]


def test_literal_special_strings_in_text_stay_text(tok, sp):
    text = "the <e> cat <s> sat <$> on <|endoftext|>"
    assert sp.extract in ids(tok, text)  # a plain call would read "<e>" as the extract token
    (ex,), _ = encode_rows(data("classification", [{"text": text}]), tok, sp, 64)
    body = ex.sequences[0][1:-1]
    assert not {sp.start, sp.delimiter, sp.extract, tok.eos_token_id} & set(body)
    assert tok.decode(body) == text  # the characters, as ordinary tokens
    # transformers 5 implements split_special_tokens by setting the Rust tokenizer's flag and leaves it set;
    # encode_rows restores it, so direct backend calls afterwards still see special tokens
    backend = tok.backend_tokenizer
    assert backend.encode_special_tokens is False
    assert sp.extract in backend.encode("x <e>", add_special_tokens=False).ids


def test_text_yielding_a_task_token_id_raises(tok):
    # tokens added as ordinary (non-special) tokens are not split by split_special_tokens: the guard catches it
    wrong = SpecialTokens(start=tok.convert_tokens_to_ids("<s>"), delimiter=tok.convert_tokens_to_ids("<$>"),
                          extract=ids(tok, "cat")[0])
    rows = data("entailment", [{"premise": "a dog ran", "hypothesis": "the cat sat"}])
    with pytest.raises(DataError, match=r"test.jsonl line 1: field hypothesis encodes to special token id"):
        encode_rows(rows, tok, wrong, 64)


def test_encodes_in_batches(tok, sp, monkeypatch):
    """Fast tokenizers' batch calls: one call per field per 10,000 texts, not one per row."""
    calls = []
    real = type(tok).__call__

    def counting(self, text, *args, **kwargs):
        calls.append(len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tok), "__call__", counting)
    rows = data("entailment", [{"premise": f"a dog ran {i}", "hypothesis": "the cat sat"} for i in range(25_000)])
    examples, _ = encode_rows(rows, tok, sp, 64)
    assert calls == [10_000, 10_000, 5_000] * 2 and len(examples) == 25_000
    assert examples[12_345].sequences[0][1:-1] == real(tok, "a dog ran 12345", add_special_tokens=False).input_ids + \
        [sp.delimiter] + real(tok, "the cat sat", add_special_tokens=False).input_ids


# -- truncation -------------------------------------------------------------------------------------------
def test_fit_lengths_equals_one_token_at_a_time():
    def brute(la, lb, room):
        while la + lb > room:
            if la > lb:
                la -= 1
            else:
                lb -= 1
        return la, lb

    for la in range(1, 14):
        for lb in range(1, 14):
            for room in range(2, 30):
                assert fit_lengths(la, lb, room) == brute(la, lb, room), (la, lb, room)
    assert fit_lengths(10, 3, 8) == (5, 3) and fit_lengths(3, 10, 8) == (3, 5)  # only the longer one is cut
    assert fit_lengths(6, 6, 9) == (5, 4) and fit_lengths(1, 1, 2) == (1, 1)


def test_truncation_longest_first_keeps_extract_and_second_start(tok, sp):
    s, d, e = sp.start, sp.delimiter, sp.extract
    long, short = " ".join(["the cat sat on the mat"] * 3), "is it raining"
    p, h = ids(tok, long), ids(tok, short)
    k = len(h) + 2  # what is left of the long segment
    assert len(p) > k + 5
    rows = data("entailment", [{"premise": long, "hypothesis": short}, {"premise": "yes", "hypothesis": "no"},
                               {"premise": short, "hypothesis": long}])
    examples, n = encode_rows(rows, tok, sp, 3 + len(h) + k)
    # the premise cut from its end to k tokens; the hypothesis (second segment) whole, <e> last
    assert examples[0].sequences == [[s, *p[:k], d, *h, e]] and examples[0].truncated
    assert examples[1].sequences == [[s, *ids(tok, "yes"), d, *ids(tok, "no"), e]] and not examples[1].truncated
    # the long second segment is cut from its end: its start is kept
    assert examples[2].sequences == [[s, *h, d, *p[:k], e]] and examples[2].truncated
    assert n == 2
    # both too long: cut to about half each, the first segment keeping the odd token
    (ex,), n = encode_rows(data("entailment", [{"premise": long, "hypothesis": long}]), tok, sp, 3 + 7)
    assert ex.sequences == [[s, *p[:4], d, *p[:3], e]] and n == 1
    # classification: the text's end goes
    (ex,), n = encode_rows(data("classification", [{"text": long}]), tok, sp, 5)
    assert ex.sequences == [[s, *p[:3], e]] and n == 1


def test_similarity_orders_truncate_the_same_segments(tok, sp):
    s, d, e = sp.start, sp.delimiter, sp.extract
    a_text, b_text = "the cat sat on the mat the cat sat", "a dog ran in the park"
    a, b = ids(tok, a_text), ids(tok, b_text)
    la, lb = fit_lengths(len(a), len(b), 9 - 3)
    (ex,), n = encode_rows(data("similarity", [{"a": a_text, "b": b_text}]), tok, sp, 9)
    assert ex.sequences == [[s, *a[:la], d, *b[:lb], e], [s, *b[:lb], d, *a[:la], e]]
    assert all(len(seq) == 9 for seq in ex.sequences) and n == 1


def test_multiple_choice_truncates_each_choice_and_counts_the_row_once(tok, sp):
    s, d, e = sp.start, sp.delimiter, sp.extract
    context, long_choice = "is it raining today", "the cat sat on the mat the cat sat"
    c, y, lc = ids(tok, context), ids(tok, "yes"), ids(tok, long_choice)
    max_length = 3 + len(c) + len(y)
    rows = data("multiple_choice", [{"context": context, "choices": ["yes", long_choice]},
                                    {"context": context, "choices": ["yes", "yes"]}])
    examples, n = encode_rows(rows, tok, sp, max_length)
    la, lb = fit_lengths(len(c), len(lc), max_length - 3)
    assert examples[0].sequences == [[s, *c, d, *y, e], [s, *c[:la], d, *lc[:lb], e]]
    assert examples[0].truncated and not examples[1].truncated and n == 1


def test_cannot_fit_and_empty_encodings_raise(tok, sp):
    rows = data("entailment", [{"premise": "a dog", "hypothesis": "the cat"}])
    with pytest.raises(DataError, match=r"test.jsonl line 1: max_length=4 cannot hold <s> premise <\$> hypothesis <e>"
                                        r" with 1 token per field \(needs >= 5\)"):
        encode_rows(rows, tok, sp, 4)
    assert encode_rows(rows, tok, sp, 5)[0][0].sequences[0] == [sp.start, ids(tok, "a dog")[0], sp.delimiter,
                                                                 ids(tok, "the cat")[0], sp.extract]
    with pytest.raises(DataError, match=r"max_length=2 cannot hold <s> text <e> .*needs >= 3"):
        encode_rows(data("classification", [{"text": "a dog"}]), tok, sp, 2)
    with pytest.raises(DataError, match=r"test.jsonl line 2: field choices\[1\] encodes to no tokens"):
        encode_rows(data("multiple_choice", [{"context": "a", "choices": ["b", "c"]},
                                             {"context": "a", "choices": ["b", "  "]}]), tok, sp, 16)


# -- reading rows -------------------------------------------------------------------------------------------
ROWS = [{"sentence": "the cat sat", "tag": "POS", "choices": ["yes", "no"]},
        {"sentence": "a dog, \"ran\"\tfast", "tag": "NEG", "choices": ["no", "maybe", "yes"]},
        {"sentence": "is it raining", "tag": "POS", "choices": ["a", "b"]}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path, rows, delimiter=","):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(list(rows[0]))
        for r in rows:
            writer.writerow([json.dumps(v) if isinstance(v, list) else v for v in r.values()])
    return path


def test_jsonl_csv_tsv_and_datasets_dirs_give_the_same_rows(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

    columns = {"text": "sentence", "label": "tag"}
    jsonl = read_rows(write_jsonl(tmp_path / "d.jsonl", ROWS), "classification", columns)
    assert [(r.fields, r.label) for r in jsonl] == [({"text": r["sentence"]}, r["tag"]) for r in ROWS]
    assert [r.where for r in jsonl] == [f"{tmp_path / 'd.jsonl'} line {i}" for i in (1, 2, 3)]
    csv_rows = read_rows(write_csv(tmp_path / "d.csv", ROWS), "classification", columns)
    tsv_rows = read_rows(write_csv(tmp_path / "d.tsv", ROWS, "\t"), "classification", columns)
    assert csv_rows[2].where == f"{tmp_path / 'd.csv'} data row 3"
    features = Features({"sentence": Value("string"), "tag": ClassLabel(names=["NEG", "POS"]),
                         "choices": List(Value("string"))})
    dataset = Dataset.from_dict({"sentence": [r["sentence"] for r in ROWS], "tag": [1, 0, 1],
                                 "choices": [r["choices"] for r in ROWS]}, features=features)
    dataset.save_to_disk(str(tmp_path / "ds"))
    DatasetDict({"train": dataset.select([0]), "validation": dataset}).save_to_disk(str(tmp_path / "dd"))
    from_ds = read_rows(tmp_path / "ds", "classification", columns)  # ClassLabel ids -> names
    from_dd = read_rows(tmp_path / "dd", "classification", columns, split="validation")
    for other in (csv_rows, tsv_rows, from_ds, from_dd):
        assert [(r.fields, r.label) for r in other] == [(r.fields, r.label) for r in jsonl]
    assert len(read_rows(tmp_path / "dd", "classification", columns)) == 1  # DatasetDict: "train" by default
    # multiple choice: a list in JSONL / datasets, a JSON list string in CSV
    mc = {"context": "sentence", "label": "tag"}
    expected = [({"context": r["sentence"], "choices": r["choices"]}, r["tag"]) for r in ROWS]
    for path in (tmp_path / "d.jsonl", tmp_path / "d.csv", tmp_path / "d.tsv", tmp_path / "ds"):
        assert [(r.fields, r.label) for r in read_rows(path, "multiple_choice", mc)] == expected, path
    # unmapped fields use their own name; with_labels=False reads no label
    (row,) = read_rows(write_jsonl(tmp_path / "e.json", [{"premise": "p", "hypothesis": "h"}]), "entailment",
                       with_labels=False)
    assert row.fields == {"premise": "p", "hypothesis": "h"} and row.label is None


BAD = [  # (file name, content, kind, columns, expected message)
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n', "classification", None,
     r"bad.jsonl line 2: malformed JSON at column \d+"),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n\n{"sentence": "b", "label": "y"}\n', "classification", None,
     r"bad.jsonl line 3: no column 'text' for field text \(columns there: sentence, label\); "
     r"set data.columns.text=<column>"),
    ("bad.csv", "sentence,label\na,x\n", "classification", {"text": "txt"},
     r"bad.csv data row 1: no column 'txt' for field text \(columns there: sentence, label\); "
     r"set data.columns.text=<column>"),
    ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": "  ", "label": "y"}\n', "classification", None,
     r"bad.jsonl line 2: field text \(column 'text'\) is empty"),
    ("bad.jsonl", '{"text": 7, "label": "x"}\n', "classification", None,
     r"bad.jsonl line 1: field text \(column 'text'\) must be text, got int"),
    ("bad.jsonl", '{"context": "q", "choices": [], "label": 0}\n', "multiple_choice", None,
     r"bad.jsonl line 1: field choices \(column 'choices'\) is an empty list"),
    ("bad.jsonl", '{"context": "q", "choices": ["a", ""], "label": 0}\n', "multiple_choice", None,
     r"bad.jsonl line 1: field choices\[1\] \(column 'choices'\) is empty"),
    ("bad.csv", 'context,choices,label\nq,"a, b",0\n', "multiple_choice", None,
     r"bad.csv data row 1: field choices \(column 'choices'\) must be a JSON list of strings"),
    ("bad.jsonl", '{"text": "a", "label": null}\n', "classification", None,
     r"bad.jsonl line 1: label \(column 'label'\) is missing"),
    ("bad.csv", "text,label\na,x\nb,\n", "classification", None, r"bad.csv data row 2: label \(column 'label'\) is missing"),
    ("bad.csv", "text,label\na,x\nb,y,z\n", "classification", None, r"bad.csv data row 2: 3 fields but the header has 2"),
    ("bad.jsonl", '[1, 2]\n', "classification", None, r"bad.jsonl line 1: each line must be a JSON object"),
    ("bad.csv", 'text,label\n"a\n', "classification", None, r"bad.csv data row 1: malformed CSV"),
    ("bad.jsonl", '\n  \n', "classification", None, r"bad.jsonl: no rows"),
    ("bad.txt", 'a\n', "classification", None, r"bad.txt: unknown data format '.txt'"),
]


@pytest.mark.parametrize("name,content,kind,columns,message", BAD)
def test_bad_files_name_file_row_and_field(tmp_path, name, content, kind, columns, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(tmp_path)) + "/" + message):
        read_rows(path, kind, columns)


def test_bad_dataset_dirs_and_config(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl", "classification")
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9,x\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: not valid UTF-8 \(byte offset 14"):
        read_rows(tmp_path / "latin1.csv", "classification")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a dataset saved with save_to_disk"):
        read_rows(tmp_path / "empty", "classification")
    features = Features({"text": Value("string"), "label": ClassLabel(names=["a", "b"])})
    ds = Dataset.from_dict({"text": ["x", "y"], "label": [0, -1]}, features=features)  # -1: no label (GLUE test)
    DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"dd \[train\] row 2: label \(column 'label'\) is missing"):
        read_rows(tmp_path / "dd", "classification")
    with pytest.raises(DataError, match=r"no split 'test' \(splits: train\); set data.split"):
        read_rows(tmp_path / "dd", "classification", split="test")
    with pytest.raises(DataError, match=r"dd \[train\] row 1: no column 'sentence' for field text \(columns there: "
                                        r"text, label\)"):
        read_rows(tmp_path / "dd", "classification", {"text": "sentence"})
    with pytest.raises(ConfigError, match=r"data.columns.premise: not a field of kind classification"):
        read_rows(tmp_path / "dd", "classification", {"premise": "text"})
    with pytest.raises(ConfigError, match="task.kind must be one of"):
        read_rows(tmp_path / "dd", "regression")


# -- labels ---------------------------------------------------------------------------------------------
def rows_of(labels, kind="classification"):
    fields = {"context": "q", "choices": ["yes", "no", "maybe"]} if kind == "multiple_choice" else {"text": "t"}
    return [TaskRow(dict(fields), label, f"d.csv data row {i + 1}") for i, label in enumerate(labels)]


def test_label_sets():
    data = to_task_data(rows_of(["10", 2, "2", "1.5"]), "classification")
    assert data.labels == ["1.5", "2", "10"] and data.targets == [2, 1, 1, 0]  # numeric order, as text
    data = to_task_data(rows_of(["pos", "neg", "Neutral", "pos "]), "classification")
    assert data.labels == ["Neutral", "neg", "pos"] and data.targets == [2, 1, 0, 2]
    assert sorted_labels(["b", "10", "9"]) == ["10", "9", "b"]  # not all numbers: as text
    # another split reuses the training labels, even when it lacks a class
    assert to_task_data(rows_of(["pos", "pos"]), "classification", labels=data.labels).targets == [2, 2]
    with pytest.raises(DataError, match=r"d.csv data row 2: label 'happy' is not in the label set "
                                        r"\['Neutral', 'neg', 'pos'\]; fix the row or add the label to task.labels"):
        to_task_data(rows_of(["pos", "happy"]), "classification", labels=data.labels)
    with pytest.raises(DataError, match=r"d.csv data row 1: every row has the label 'pos'; a classifier needs at least 2"):
        to_task_data(rows_of(["pos", "pos"]), "classification")
    with pytest.raises(DataError, match=r"d.csv data row 2: the row has no label"):
        to_task_data(rows_of(["pos", None]), "classification")
    with pytest.raises(ConfigError, match="at least 2 distinct labels"):
        to_task_data(rows_of(["pos"]), "classification", labels=["pos", "pos"])
    with pytest.raises(DataError, match="no rows"):
        to_task_data([], "classification")


def test_regression_labels():
    data = to_task_data(rows_of(["3.5", 2, 0.25, " 1e1 "]), "similarity", regression=True)
    assert data.targets == [3.5, 2.0, 0.25, 10.0] and data.labels is None and data.regression
    for bad in ("high", "nan", True):
        with pytest.raises(DataError, match=r"d.csv data row 2: regression label must be a finite number"):
            to_task_data(rows_of(["1", bad]), "classification", regression=True)
    with pytest.raises(ConfigError, match="task.labels does not apply with task.regression=true"):
        to_task_data(rows_of(["1", "2"]), "classification", labels=["1", "2"], regression=True)


def test_multiple_choice_labels():
    # an int index, a choice's text, or (CSV) an index written as text
    assert to_task_data(rows_of([2, "no", "0", "yes"], "multiple_choice"), "multiple_choice").targets == [2, 1, 0, 0]
    cases = [(3, r"label 3 is out of range for 3 choices \(0-based: 0..2\)"),
             (-1, r"label -1 is out of range"),
             ("4", r"label 4 is out of range"),
             ("perhaps", r"label 'perhaps' is none of the 3 choices"),
             (1.0, r"multiple-choice label must be a 0-based choice index or a choice's text, got 1.0")]
    for label, message in cases:
        with pytest.raises(DataError, match=r"d.csv data row 2: " + message):
            to_task_data(rows_of([0, label], "multiple_choice"), "multiple_choice")
    one = [TaskRow({"context": "q", "choices": ["only"]}, 0, "d.jsonl line 1")]
    with pytest.raises(DataError, match=r"d.jsonl line 1: field choices has 1 choice; multiple choice needs at least 2"):
        to_task_data(one, "multiple_choice")
    same = [TaskRow({"context": "q", "choices": ["a", "b", "a"]}, "a", "d.jsonl line 1")]
    with pytest.raises(DataError, match=r"label 'a' equals choices 0 and 2"):
        to_task_data(same, "multiple_choice")
    with pytest.raises(ConfigError, match="do not apply to multiple_choice"):
        to_task_data(rows_of([0], "multiple_choice"), "multiple_choice", regression=True)


# -- Natural-Instructions tasks ---------------------------------------------------------------------------
EXPECTED_NI = {  # task -> (kind, label set) for the tasks that qualify with max_labels=10
    "task073_commonsenseqa_answer_generation": ("multiple_choice", None),
    "task1294_wiki_qa_answer_verification": ("entailment", ["No", "Yes"]),
    "task1346_glue_cola_grammatical_correctness_classification": ("classification", ["0", "1"]),
    "task1347_glue_sts-b_similarity_classification": ("similarity", ["0", "1", "2", "3", "4", "5"]),
    "task195_sentiment140_classification": ("classification", ["negative", "positive"]),
    "task363_sst2_polarity_classification": ("classification", ["NEG", "POS"]),
    "task400_paws_paraphrase_classification": ("similarity", ["Not paraphrase", "Paraphrase"]),
    "task966_ruletaker_fact_checking_based_on_given_context": ("entailment", ["False", "True"]),
}
NOT_QUALIFYING = {  # task -> why not
    "task087_new_operator_addsub_arithmetic": "146 distinct outputs, more than data.max_labels=10",
    "task1340_msr_text_compression_compression": "27 distinct outputs",
    "task1355_sent_comp_summarization": "75 distinct outputs",
    "task1359_numer_sense_answer_generation": "11 distinct outputs, more than data.max_labels=10",
    "task1398_obqa_question_generation": "102 distinct outputs",
    "task177_para-nmt_paraphrasing": "95 distinct outputs",
    "task582_naturalquestion_answer_generation": "has 7 different outputs",
    "task753_svamp_addition_question_answering": "63 distinct outputs",
}


@pytest.fixture(scope="module")
def ni_tasks():
    if not NI_TASKS.is_dir():
        pytest.skip(f"{NI_TASKS} not present (see README: getting the data)")
    return {task.name: task for task in load_tasks(NI_TASKS)}


def test_ni_table(ni_tasks):
    assert set(ni_tasks) == set(EXPECTED_NI) | set(NOT_QUALIFYING)
    assert set(NI_FORMATS) == set(EXPECTED_NI)
    for name, task in ni_tasks.items():
        kind, reason = ni_qualification(task)
        if name in EXPECTED_NI:
            assert kind == EXPECTED_NI[name][0], (name, reason)
        else:
            assert kind is None and NOT_QUALIFYING[name] in reason, (name, reason)
    assert ni_qualification(ni_tasks["task363_sst2_polarity_classification"]) == ("classification", "2 labels: NEG, POS")
    assert "use `tune run finetune` (generation)" in ni_qualification(ni_tasks["task087_new_operator_addsub_arithmetic"])[1]
    # a larger label limit admits numer_sense as classification of its input
    assert ni_qualification(ni_tasks["task1359_numer_sense_answer_generation"], max_labels=11)[0] == "classification"
    with pytest.raises(DataError, match=r"task1340_msr_text_compression_compression: 27 distinct outputs"):
        ni_task_data(ni_tasks["task1340_msr_text_compression_compression"])


def test_every_instance_of_the_qualifying_tasks_parses(ni_tasks):
    for name, (kind, labels) in EXPECTED_NI.items():
        task = ni_tasks[name]
        data = ni_task_data(task)
        assert data.kind == kind and data.labels == labels and len(data.rows) == len(task.instances)
        for row, inst, target in zip(data.rows, task.instances, data.targets):
            assert set(row.fields) == set(KIND_FIELDS[kind]) and row.where == f"{name} instance {inst.id}"
            texts = [t for v in row.fields.values() for t in (v if isinstance(v, list) else [v])]  # input order
            assert all(t.strip() == t and t for t in texts)
            if labels is not None:
                assert labels[target] == inst.outputs[0]
            else:
                assert len(row.fields["choices"]) == 5 and target == "ABCDE".index(inst.outputs[0])
            # the fields are pieces of the input, and together with the format's markers they are all of it
            rest = inst.input
            for text in texts:
                assert text in rest, (name, inst.id, text)
                rest = rest.replace(text, "", 1)
            for marker in ("Sentence 1:", "Sentence 2:", "Paragraph:", "Question:", ", Answer:", "(A)", "(B)", "(C)",
                           "(D)", "(E)"):
                rest = rest.replace(marker, "")
            assert not rest.strip(), (name, inst.id, rest)


def test_ni_parsers_by_hand(ni_tasks):
    def first(name, n=0):
        data = ni_task_data(ni_tasks[name])
        return data.rows[n].fields, data.targets[n]

    fields, target = first("task073_commonsenseqa_answer_generation")
    assert fields == {"context": "A revolving door is convenient for two direction travel, but it also serves as a "
                                 "security measure at a what?",
                      "choices": ["bank", "library", "department store", "mall", "new york"]} and target == 0
    fields, target = first("task073_commonsenseqa_answer_generation", 4)  # answer B
    assert fields["choices"][target] == "mexico"
    fields, target = first("task073_commonsenseqa_answer_generation", 5)  # answer D
    assert fields["choices"] == ["feel pleasure", "procreate", "pass water", "listen to each other", "sing"]
    assert target == 3
    fields, _ = first("task1347_glue_sts-b_similarity_classification", 1)
    assert fields == {"a": "Red double decker bus on side of street.", "b": "A red double decker bus on a city street."}
    fields, target = first("task966_ruletaker_fact_checking_based_on_given_context", 1)
    assert fields["premise"].startswith("Anne is rough. Cold people are rough.") and fields["premise"].endswith(
        "Anne is young.") and fields["hypothesis"] == "Anne is not young." and target == 0  # False
    fields, target = first("task1294_wiki_qa_answer_verification")
    assert fields["premise"] == "who sings i am a man of constant sorrow" and target == 1  # Yes
    assert fields["hypothesis"].startswith('"Man of Constant Sorrow" (also known as')
    fields, _ = first("task400_paws_paraphrase_classification")
    assert fields["a"].startswith("This was a series of nested angular standards") and fields["a"].endswith("ecliptic .")
    assert fields["b"].startswith("This was a series of nested polar scales") and "\n" not in fields["a"] + fields["b"]


def test_ni_subsets_label_reuse_and_unparsable_instance(ni_tasks):
    task = ni_tasks["task400_paws_paraphrase_classification"]
    subset = [inst for inst in task.instances if inst.outputs == ["Paraphrase"]][:3]
    data = ni_task_data(task, subset)  # the label set comes from all the task's instances
    assert data.labels == ["Not paraphrase", "Paraphrase"] and data.targets == [1, 1, 1]
    bad = NIInstance("task400-broken", "one sentence only, no second line", ["Paraphrase"])
    with pytest.raises(DataError, match=r"task400_paws_paraphrase_classification: instance task400-broken: input does "
                                        r"not have the task's similarity format"):
        ni_task_data(task, [bad])
    with pytest.raises(ConfigError, match="max_labels must be >= 2"):
        ni_task_data(task, max_labels=1)


def test_ni_parsers_reject_other_layouts():
    sts, rule = NI_FORMATS["task1347_glue_sts-b_similarity_classification"][1], NI_FORMATS[
        "task966_ruletaker_fact_checking_based_on_given_context"][1]
    mc, wiki = NI_FORMATS["task073_commonsenseqa_answer_generation"][1], NI_FORMATS[
        "task1294_wiki_qa_answer_verification"][1]
    assert sts("Sentence 1: a. Sentence 2: b.") == {"a": "a.", "b": "b."}
    assert sts("Sentence 1: a. Sentence 2: b. Sentence 2: c") is None and sts("a. b.") is None
    assert rule("Paragraph: x.   Question: y.") == {"premise": "x.", "hypothesis": "y."} and rule("Question: y.") is None
    assert mc("q?\n(A)x (B)y") == {"context": "q?", "choices": ["x", "y"]}
    assert mc("q?\n(A)x (C)y") is None and mc("q?\n(A)x (B)") is None and mc("q? (A)x (B)y") is None
    assert wiki("q, Answer: s") == {"premise": "q", "hypothesis": "s"} and wiki("q? s") is None


def test_ni_rows_encode(tok, sp, ni_tasks):
    data = ni_task_data(ni_tasks["task073_commonsenseqa_answer_generation"])
    examples, _ = encode_rows(data, tok, sp, 64)
    assert [len(ex.sequences) for ex in examples] == [5] * len(data.rows)
    assert all(seq[0] == sp.start and seq[-1] == sp.extract and seq.count(sp.delimiter) == 1
               for ex in examples for seq in ex.sequences)


# -- metrics ----------------------------------------------------------------------------------------------
def test_classification_metric_hand_computed():
    metric = load_metric("classification")
    # classes 0, 1, 2; class 2 is true twice and never predicted
    preds, refs = [0, 0, 1, 1, 1, 0], [0, 1, 1, 2, 2, 0]
    # accuracy 3/6; class 0: P 2/3 R 2/2 F1 0.8; class 1: P 1/3 R 1/2 F1 0.4; class 2: P 0 R 0 F1 0
    out = metric.compute(predictions=preds, references=refs)
    assert out["accuracy"] == pytest.approx(50.0) and out["macro_f1"] == pytest.approx(100 * (0.8 + 0.4 + 0) / 3)
    # a class predicted but never true counts (F1 0); a class in neither side is skipped
    out = metric.compute(predictions=[0, 3], references=[0, 0])
    assert out["accuracy"] == 50.0 and out["macro_f1"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    assert metric.compute(predictions=[1, 1], references=[1, 1]) == {"accuracy": 100.0, "macro_f1": 100.0}


def test_correlation_metric_hand_computed():
    metric = load_metric("correlation")
    # pearson of (1, 2, 3, 4) and (2, 4, 5, 9): mean 2.5 / 5; dx = -1.5 -0.5 0.5 1.5, dy = -3 -1 0 4
    # sum dx dy = 4.5 + 0.5 + 0 + 6 = 11; sum dx^2 = 5; sum dy^2 = 26 -> r = 11 / sqrt(130)
    out = metric.compute(predictions=[1.0, 2.0, 3.0, 4.0], references=[2.0, 4.0, 5.0, 9.0])
    assert out["pearson"] == pytest.approx(100 * 11 / math.sqrt(130)) and out["spearman"] == pytest.approx(100.0)
    # ties: predictions (1, 2, 2, 3) rank (1, 2.5, 2.5, 4); references (4, 3, 2, 1) rank (4, 3, 2, 1)
    # d = rank - 2.5: (-1.5, 0, 0, 1.5) and (1.5, 0.5, -0.5, -1.5): sum = -4.5; sums of squares 4.5 and 5
    out = metric.compute(predictions=[1.0, 2.0, 2.0, 3.0], references=[4.0, 3.0, 2.0, 1.0])
    assert out["spearman"] == pytest.approx(100 * -4.5 / math.sqrt(4.5 * 5))
    # spearman ignores monotone transforms; pearson does not
    out = metric.compute(predictions=[1.0, 10.0, 100.0, 1000.0], references=[1.0, 2.0, 3.0, 4.0])
    assert out["spearman"] == pytest.approx(100.0) and out["pearson"] < 90
    out = metric.compute(predictions=[2.0, 2.0, 2.0], references=[1.0, 2.0, 3.0])  # constant: undefined
    assert math.isnan(out["pearson"]) and math.isnan(out["spearman"])


def test_review_cases_tsv_without_quoting_repeated_header_ni_file_ambiguous_choice_and_classlabel_order(tmp_path):
    """GLUE-style TSV (a field starting with a stray quote) reads as written; a repeated header column, an NI task
    file given as rows, and a CSV multiple-choice label that is both an index and another choice's text are one-line
    errors; a datasets ClassLabel's names come back in class-id order."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from data_prep.task_data import dataset_label_names

    tsv = tmp_path / "glue.tsv"
    tsv.write_text('text\tlabel\n"quoted start and no end\t1\nplain\t0\n', encoding="utf-8")
    rows = read_rows(tsv, "classification")
    assert [r.fields["text"] for r in rows] == ['"quoted start and no end', "plain"]
    bad = tmp_path / "dup.csv"
    bad.write_text("text,text,label\na,b,1\n", encoding="utf-8")
    with pytest.raises(DataError, match="dup.csv header: column 'text' appears more than once"):
        read_rows(bad, "classification")
    with pytest.raises(DataError, match="is a Natural-Instructions task file, not rows; give it as data.ni_task"):
        read_rows(NI_TASKS / "task363_sst2_polarity_classification.json", "classification")
    mc = tmp_path / "mc.csv"
    mc.write_text('context,choices,label\nWhat is 0+0?,"[""2"", ""0"", ""1""]",1\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"mc.csv data row 1: label '1' is both choice 1 \(as an index\) and the text of choice 2"):
        to_task_data(read_rows(mc, "multiple_choice"), "multiple_choice")
    features = Features({"text": Value("string"), "label": ClassLabel(names=["positive", "negative"])})
    DatasetDict({"train": Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}, features=features)}).save_to_disk(
        str(tmp_path / "dd"))
    assert dataset_label_names(tmp_path / "dd") == ["positive", "negative"]
    assert dataset_label_names(tsv) is None
