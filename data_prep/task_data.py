"""Labelled task data for GPT-1 task heads: rows from files or Natural-Instructions tasks -> label ids -> token ids.

    rows = read_rows("data/train.jsonl", "entailment", columns={"premise": "sentence1", "hypothesis": "sentence2"})
    train = to_task_data(rows, "entailment")                        # label set: the distinct labels, sorted
    val = to_task_data(read_rows("data/val.jsonl", "entailment", ...), "entailment", labels=train.labels)
    examples, n_truncated = encode_rows(train, tokenizer, SpecialTokens(start, delimiter, extract), max_length=512)

Input transformations (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training",
section 3.3 and figure 1), with start ``<s>``, delimiter ``<$>`` and extract ``<e>``:

    classification    <s> text <e>
    entailment        <s> premise <$> hypothesis <e>
    similarity        <s> a <$> b <e>  and  <s> b <$> a <e>           (2 sequences)
    multiple_choice   <s> context <$> choice_k <e>  for every choice k   (one sequence per choice)

Every sequence ends with the extract token, where the task head reads the final hidden state.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from tune.errors import ConfigError, DataError
from tune.files import file_head, read_utf8

from .natural_instructions import NIInstance, NITask

PathLike = Union[str, os.PathLike]

KINDS = ("classification", "entailment", "similarity", "multiple_choice")
KIND_FIELDS = {"classification": ("text",), "entailment": ("premise", "hypothesis"),
               "similarity": ("a", "b"), "multiple_choice": ("context", "choices")}
JSONL_SUFFIXES = (".jsonl", ".json")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_SHOWN_LABELS = 20  # label sets longer than this are abbreviated in messages


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the start `<s>`, delimiter `<$>` and extract `<e>` tokens (the caller adds them to the vocabulary)."""

    start: int
    delimiter: int
    extract: int


@dataclass
class TaskRow:
    fields: dict[str, str | list[str]]  # KIND_FIELDS[kind] -> text (choices: list of str)
    label: object  # raw label as read (str / int / float / bool; MC: choice index or choice text); None: no label
    where: str  # for messages, e.g. "data/train.jsonl line 7" / "task363_sst2... instance task363-abc"


@dataclass
class TaskData:
    kind: str
    rows: list[TaskRow]
    labels: list[str] | None  # class names, index = class id (None: regression or multiple_choice)
    targets: list[int | float]  # per row: class id, choice index (multiple_choice) or float score (regression)
    regression: bool = False


@dataclass
class EncodedExample:
    sequences: list[list[int]]  # 1 (classification / entailment), 2 (similarity: a$b then b$a), one per choice (MC)
    target: int | float
    truncated: bool


def check_kind(kind: str) -> None:
    """ConfigError unless `kind` is one of KINDS."""
    if kind not in KINDS:
        raise ConfigError(f"task.kind must be one of {', '.join(KINDS)}; got {kind!r}")


# -- reading files ----------------------------------------------------------------------------------
def _column_map(kind: str, columns: dict[str, str] | None) -> dict[str, str]:
    """Our field names (and "label") -> the file's column names."""
    names = (*KIND_FIELDS[kind], "label")
    columns = dict(columns or {})
    unknown = [k for k in columns if k not in names]
    if unknown:
        raise ConfigError(f"data.columns.{unknown[0]}: not a field of kind {kind} (fields: {', '.join(names)}); "
                          "remove it or rename it")
    for key, value in columns.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"data.columns.{key} must be a column name (a non-empty string), got {value!r}")
    return {name: columns.get(name, name) for name in names}


def _jsonl_records(path: Path):
    """(where, object) per non-blank line."""
    for lineno, line in enumerate(read_utf8(path, "data file").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ("; the file must hold one JSON object per line (JSONL), not one JSON array or a pretty-printed "
                    "object" if line.strip() in ("[", "{") else "; fix the line")
            raise DataError(f"{where}: malformed JSON at column {e.colno} ({e.msg}){hint}") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply; a row is one flat object") from None
        if not isinstance(obj, dict):
            hint = " (one JSON array of rows? write one object per line: JSONL)" if isinstance(obj, list) else ""
            raise DataError(f"{where}: each line must be a JSON object with the row's columns, got "
                            f"{type(obj).__name__}{hint}")
        yield where, obj


def _csv_records(path: Path, delimiter: str):
    """(where, {column: text}) per data row; the first row is the header. A TSV that does not parse with CSV quoting
    (GLUE-style TSVs do not quote, so a field may start with a stray `"`) is read with its fields as they are."""
    text = read_utf8(path, "data file")
    quoting = csv.QUOTE_MINIMAL
    if delimiter == "\t":
        try:
            list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True))
        except csv.Error:
            quoting = csv.QUOTE_NONE
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True, quoting=quoting)
    n, header = 0, None  # data rows read, blank lines included
    try:
        header = next(reader, None)
        if header is None:
            return
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise DataError(f"{path} header: column {repeated[0]!r} appears more than once; give every column its own name")
        for row in reader:
            n += 1
            if not row:  # a blank line
                continue
            if len(row) != len(header):
                raise DataError(f"{path} data row {n}: {len(row)} fields but the header has {len(header)} "
                                f"({', '.join(header)}); quote fields that contain the delimiter")
            yield f"{path} data row {n}", dict(zip(header, row))
    except csv.Error as e:
        where = f"{path} header" if header is None else f"{path} data row {n + 1}"
        raise DataError(f"{where}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} ({e}); fix the quoting") from None


def _dataset_records(path: Path, split: str | None, columns: list[str], default_split: str = "train",
                     split_key: str = "data.split"):
    """(where, {column: value}) per row of a `datasets` directory, ClassLabel integers as their names."""
    from datasets import ClassLabel

    from .instructions import load_saved_split

    ds = load_saved_split(path, split, default_split, split_key, ".jsonl, .csv or .tsv file")
    name = f"{path} [{split or default_split}]" if _is_dataset_dict(path) else str(path)
    present = [c for c in columns if c in ds.column_names]
    table = ds.select_columns(present).to_dict()
    n_rows = len(ds)
    names = {c: ds.features[c].names for c in present if isinstance(ds.features[c], ClassLabel)}
    for i in range(n_rows):
        record = {c: table[c][i] for c in present}
        for c, class_names in names.items():
            value = record[c]
            if value is not None and value >= 0:
                record[c] = class_names[value]
            else:  # ClassLabel's -1 marks a row without a label (e.g. GLUE test splits)
                record[c] = None
        yield f"{name} row {i + 1}", record, ds.column_names


def _text(value, where: str, field: str, column: str) -> str:
    if value is None:
        raise DataError(f"{where}: field {field} (column '{column}') is missing (null); fill it in or remove the row")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field} (column '{column}') must be text, got {type(value).__name__} "
                        f"{str(value)[:40]!r}")
    if not value.strip():
        raise DataError(f"{where}: field {field} (column '{column}') is empty; fill it in or remove the row")
    return value


def _choices(value, where: str, column: str, from_csv: bool) -> list[str]:
    if from_csv:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field choices (column '{column}') must be a JSON list of strings in CSV, "
                            f"e.g. [\"yes\", \"no\"]; got {value[:40]!r}") from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: field choices (column '{column}') must be a list of strings, got "
                        f"{type(value).__name__}")
    if not value:
        raise DataError(f"{where}: field choices (column '{column}') is an empty list; give at least 2 choices")
    return [_text(v, where, f"choices[{k}]", column) for k, v in enumerate(value)]


def _missing(where: str, field: str, column: str, columns, hint: str = "data.columns.{field}=<column>") -> DataError:
    return DataError(f"{where}: no column '{column}' for field {field} (columns there: {', '.join(map(str, columns))}); "
                     f"set {hint.format(field=field)}")


def _looks_like_ni_task(path: Path) -> bool:
    """Whether a .json file is a Natural-Instructions task (one JSON object with Definition and Instances)."""
    head = file_head(path)
    if head is None:
        return False
    first = head.lstrip().split("\n", 1)[0]
    try:
        json.loads(first)
        return False  # a complete object on the first line: JSONL
    except ValueError:
        return first.startswith("{") and '"Definition"' in head


def _is_dataset_dict(path: Path) -> bool:
    return (Path(path) / "dataset_dict.json").is_file()


def dataset_label_names(path: PathLike, label_column: str = "label", split: str | None = None,
                        default_split: str = "train") -> list[str] | None:
    """The ClassLabel names (in class-id order) of the label column of a `datasets` directory, or None (not a
    directory, no such column, not a ClassLabel): the label set a run should keep, so class ids match the dataset's."""
    from datasets import ClassLabel, DatasetDict, load_from_disk

    path = Path(path)
    if not path.is_dir():
        return None
    try:
        ds = load_from_disk(str(path))
    except Exception:  # read_rows reports an unreadable folder
        return None
    if isinstance(ds, DatasetDict):
        ds = ds.get(default_split if split is None else split)
    feature = ds.features.get(label_column) if ds is not None else None
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def read_rows(path: PathLike, kind: str, columns: dict[str, str] | None = None, split: str | None = None,
              with_labels: bool = True, default_split: str = "train", keys: dict[str, str] | None = None
              ) -> list[TaskRow]:
    """The rows of a data file for task kind `kind`, in file order.

    Formats: JSONL (`.jsonl`, or `.json` with one object per line), CSV / TSV (`.csv` / `.tsv`, a header row), or a
    `datasets` directory saved with `save_to_disk` (a Dataset, or a DatasetDict and `split`, default "train";
    ClassLabel integers are turned into their names). `columns` maps our field names (KIND_FIELDS[kind], and
    "label") to the file's column names, e.g. {"text": "sentence"}; unmapped fields use their own name. `choices`
    is a list (JSONL / datasets) or, in CSV / TSV, a JSON list string. Rows are named (TaskRow.where) by the file
    and "line N" (JSONL: the file's line), "data row N" (CSV / TSV: the header not counted) or "row N" (datasets),
    all 1-based. with_labels=False: the label column is not read (TaskRow.label is None), e.g. for prediction.
    `default_split`: the split of a DatasetDict when `split` is None. `keys`: how messages name the settings, by
    "split" and "column" (default data.split and data.columns.FIELD=COLUMN; `tune predict` passes its flags).

    Raises DataError naming the file, row and field for: an unreadable / non-UTF-8 file, an unknown format, a
    malformed JSON line or CSV row, a missing column (listing the columns there), a value of the wrong type, empty
    text, an empty choice list, a missing label (JSON null, empty CSV cell, ClassLabel -1), and a file without rows.
    ConfigError for an unknown kind or a `columns` key that is not a field of the kind.
    """
    check_kind(kind)
    keys = {"split": "data.split", "column": "data.columns.{field}=<column>", **(keys or {})}
    path = Path(path)
    mapping = _column_map(kind, columns)
    if not with_labels:
        del mapping["label"]
    suffix = path.suffix.lower()
    if path.is_dir():
        records = _dataset_records(path, split, list(mapping.values()), default_split, keys["split"])
    elif not path.exists():
        raise DataError(f"{path}: data file does not exist; check the path (relative paths are taken from {Path.cwd()})")
    elif suffix in JSONL_SUFFIXES:
        records = ((where, obj, None) for where, obj in _jsonl_records(path))
        if suffix == ".json" and _looks_like_ni_task(path):
            raise DataError(f"{path} is a Natural-Instructions task file, not rows; give it as data.ni_task")
    elif suffix in CSV_DELIMITERS:
        records = ((where, obj, None) for where, obj in _csv_records(path, CSV_DELIMITERS[suffix]))
    else:
        raise DataError(f"{path}: unknown data format '{suffix}'; use .jsonl / .json (one object per line), .csv, .tsv "
                        "or a folder saved with datasets' save_to_disk")
    from_csv = suffix in CSV_DELIMITERS and not path.is_dir()
    rows = []
    for where, record, all_columns in records:
        fields = {}
        for name, column in mapping.items():
            if column not in record:
                raise _missing(where, name, column, record.keys() if all_columns is None else all_columns,
                               keys["column"])
            value = record[column]
            if name == "label":
                if value is None or (from_csv and not value.strip()):
                    raise DataError(f"{where}: label (column '{column}') is missing; every training / evaluation row "
                                    "needs a label")
                if not isinstance(value, (str, int, float)):
                    raise DataError(f"{where}: label (column '{column}') must be text or a number, got "
                                    f"{type(value).__name__}")
            elif name == "choices":
                fields[name] = _choices(value, where, column, from_csv)
            else:
                fields[name] = _text(value, where, name, column)
        rows.append(TaskRow(fields, record.get(mapping["label"]) if with_labels else None, where))
    if not rows:
        raise DataError(f"{path}: no rows; the data file is empty")
    return rows


# -- labels -----------------------------------------------------------------------------------------
def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def sorted_labels(names) -> list[str]:
    """Distinct label names, sorted numerically when every one is a finite number ("2" < "10"), else as text."""
    names = set(names)
    if all(_number(n) is not None for n in names):
        return sorted(names, key=lambda n: (_number(n), n))
    return sorted(names)


def _label_name(row: TaskRow) -> str:
    if row.label is None:
        raise DataError(f"{row.where}: the row has no label; a training / evaluation row needs one")
    if not isinstance(row.label, (str, int, float)):
        raise DataError(f"{row.where}: label must be text or a number, got {type(row.label).__name__}")
    return str(row.label).strip()


def _shown(labels: list[str]) -> str:
    head = ", ".join(repr(x) for x in labels[:_SHOWN_LABELS])
    return f"[{head}{f', ... ({len(labels)} in all)' if len(labels) > _SHOWN_LABELS else ''}]"


def _score(row: TaskRow) -> float:
    label = row.label
    value = None
    if isinstance(label, str):
        value = _number(label.strip())
    elif isinstance(label, (int, float)) and not isinstance(label, bool) and math.isfinite(label):
        value = float(label)
    if value is None:
        raise DataError(f"{row.where}: regression label must be a finite number, got {label!r}; fix the row or "
                        "set task.regression=false")
    return value


def _choice_index(row: TaskRow) -> int:
    choices = row.fields.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        n = len(choices) if isinstance(choices, list) else 0
        raise DataError(f"{row.where}: field choices has {n} choice{'s' * (n != 1)}; multiple choice needs at least 2")
    label = row.label
    if isinstance(label, str):
        matches = [k for k, choice in enumerate(choices) if choice == label]
        if len(matches) > 1:
            raise DataError(f"{row.where}: label {label!r} equals choices {matches[0]} and {matches[1]}; make the "
                            "choices distinct or give the answer as a 0-based index")
        as_index = int(label) if re.fullmatch(r"\s*\d+\s*", label) else None
        if matches and as_index is not None and as_index < len(choices) and as_index != matches[0]:
            raise DataError(f"{row.where}: label {label!r} is both choice {as_index} (as an index) and the text of choice "
                            f"{matches[0]}; give the answer unambiguously: in JSONL as a number (an index) or the "
                            "choice's text, or make the choices distinct from the indices")
        if matches:
            return matches[0]
        if re.fullmatch(r"\s*-?\d+\s*", label):  # CSV / TSV hold an index as text
            label = int(label)
        else:
            raise DataError(f"{row.where}: label {label!r} is none of the {len(choices)} choices; give the answer as "
                            "one choice's exact text or as a 0-based index")
    if isinstance(label, bool) or not isinstance(label, int):
        raise DataError(f"{row.where}: multiple-choice label must be a 0-based choice index or a choice's text, got "
                        f"{label!r}")
    if not 0 <= label < len(choices):
        raise DataError(f"{row.where}: label {label} is out of range for {len(choices)} choices (0-based: 0.."
                        f"{len(choices) - 1}); fix the row")
    return label


def to_task_data(rows: list[TaskRow], kind: str, labels: list[str] | None = None,
                 regression: bool = False) -> TaskData:
    """Rows with their targets: class ids (a label set), floats (regression) or choice indices (multiple choice).

    Label set: `labels` when given (every row's label, as text, must be in it), else the distinct labels of the rows
    as text, sorted numerically when all are numbers, else as text; at least 2. Reuse a training set's labels for
    another split: to_task_data(eval_rows, kind, labels=train.labels). regression=True: each label is parsed as a
    float (TaskData.labels None). multiple_choice: the label is a 0-based int index into the row's choices, or a
    string equal to one choice's text (else, if it is an integer written as text, as in CSV, that index).

    Raises DataError naming the row (TaskRow.where) for a label outside the set, a missing label, a non-numeric
    regression label, a multiple-choice label out of range / matching no choice, fewer than 2 choices; DataError
    when there are no rows or only one distinct label (and `labels` not given). ConfigError for an unknown kind,
    `labels` or regression with multiple_choice, labels with regression, or a `labels` list with duplicates / < 2.
    """
    check_kind(kind)
    if not rows:
        raise DataError(f"no rows of kind {kind} to train or evaluate on; check the data file")
    if kind == "multiple_choice":
        if regression or labels is not None:
            raise ConfigError("task.regression / task.labels do not apply to multiple_choice (the answer is a choice "
                              "index); remove them")
        return TaskData(kind, rows, None, [_choice_index(row) for row in rows])
    if regression:
        if labels is not None:
            raise ConfigError("task.labels does not apply with task.regression=true (targets are numbers); remove it")
        return TaskData(kind, rows, None, [_score(row) for row in rows], regression=True)
    names = [_label_name(row) for row in rows]
    if labels is None:
        labels = sorted_labels(names)
        if len(labels) < 2:
            raise DataError(f"{rows[0].where}: every row has the label {labels[0]!r}; a classifier needs at least 2 "
                            "labels (set task.labels to the full label set if this is an evaluation split)")
    else:
        labels = [str(x).strip() for x in labels]
        if len(set(labels)) != len(labels) or len(labels) < 2:
            raise ConfigError(f"task.labels must list at least 2 distinct labels, got {_shown(labels)}")
    index = {name: i for i, name in enumerate(labels)}
    targets = []
    for row, name in zip(rows, names):
        if name not in index:
            raise DataError(f"{row.where}: label {name!r} is not in the label set {_shown(labels)}; fix the row or add "
                            "the label to task.labels")
        targets.append(index[name])
    return TaskData(kind, rows, labels, targets)


# -- Natural-Instructions tasks -----------------------------------------------------------------------
def _ni_text(text: str) -> dict | None:
    return {"text": text.strip()} if text.strip() else None


def _split_once(text: str, sep: str) -> tuple[str, str] | None:
    """(before, after) when `sep` occurs exactly once with text on both sides."""
    parts = text.split(sep)
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        return None
    return parts[0].strip(), parts[1].strip()


def _ni_paws(text: str) -> dict | None:
    """Two sentences, one per line."""
    pair = _split_once(text.strip(), "\n")
    return {"a": pair[0], "b": pair[1]} if pair else None


def _ni_sts_b(text: str) -> dict | None:
    """'Sentence 1: <a> Sentence 2: <b>'."""
    m = re.fullmatch(r"\s*Sentence 1:(.*?)Sentence 2:(.*)", text, re.S)
    if not m or "Sentence 1:" in m.group(2) or "Sentence 2:" in m.group(2):
        return None
    a, b = m.group(1).strip(), m.group(2).strip()
    return {"a": a, "b": b} if a and b else None


def _ni_ruletaker(text: str) -> dict | None:
    """'Paragraph: <facts and rules> Question: <statement>'."""
    m = re.fullmatch(r"\s*Paragraph:(.*?)Question:(.*)", text, re.S)
    if not m or "Question:" in m.group(2) or "Paragraph:" in m.group(1):
        return None
    premise, hypothesis = m.group(1).strip(), m.group(2).strip()
    return {"premise": premise, "hypothesis": hypothesis} if premise and hypothesis else None


def _ni_wiki_qa(text: str) -> dict | None:
    """'<question>, Answer: <sentence>': does the sentence answer the question."""
    pair = _split_once(text, ", Answer:")
    return {"premise": pair[0], "hypothesis": pair[1]} if pair else None


_OPTION = re.compile(r"\(([A-Z])\)")


def _ni_lettered_options(text: str) -> dict | None:
    """'<question>\\n(A)<option> (B)<option> ...': letters A, B, C, ... in order, each option non-empty."""
    pair = _split_once(text.strip(), "\n")
    if not pair:
        return None
    question, options = pair
    marks = list(_OPTION.finditer(options))
    if len(marks) < 2 or marks[0].start() != 0 or [m.group(1) for m in marks] != [chr(65 + k) for k in range(len(marks))]:
        return None
    ends = [m.start() for m in marks[1:]] + [len(options)]
    choices = [options[m.end():end].strip() for m, end in zip(marks, ends)]
    return {"context": question, "choices": choices} if all(choices) else None


def _letter_index(output: str):
    """'A' -> 0, 'B' -> 1, ...: the answer letter of a lettered-options task as a choice index (else unchanged)."""
    letter = output.strip()
    return ord(letter) - 65 if len(letter) == 1 and "A" <= letter <= "Z" else output


NI_FORMATS: dict[str, tuple[str, Callable[[str], dict | None]]] = {
    # task name -> (kind, parser(instance input) -> fields or None when the input does not have the task's format).
    # Every other task is classification with text = the instance input.
    "task363_sst2_polarity_classification": ("classification", _ni_text),
    "task195_sentiment140_classification": ("classification", _ni_text),
    "task1346_glue_cola_grammatical_correctness_classification": ("classification", _ni_text),
    "task400_paws_paraphrase_classification": ("similarity", _ni_paws),
    "task1347_glue_sts-b_similarity_classification": ("similarity", _ni_sts_b),
    "task966_ruletaker_fact_checking_based_on_given_context": ("entailment", _ni_ruletaker),
    "task1294_wiki_qa_answer_verification": ("entailment", _ni_wiki_qa),
    "task073_commonsenseqa_answer_generation": ("multiple_choice", _ni_lettered_options),
}


def _ni_output(task: NITask, inst: NIInstance) -> str:
    distinct = list(dict.fromkeys(o.strip() for o in inst.outputs))
    if len(distinct) != 1:
        raise DataError(f"{task.name}: instance {inst.id} has {len(distinct)} different outputs "
                        f"({', '.join(repr(o[:30]) for o in distinct[:3])}); a task head predicts one label per "
                        "instance: use `tune run finetune` (generation) for it")
    return distinct[0]


def ni_task_data(task: NITask, instances: list[NIInstance] | None = None, max_labels: int = 10,
                 labels: list[str] | None = None) -> TaskData:
    """A Natural-Instructions task as task-head data (kind and parser from NI_FORMATS, else classification of the input).

    instances: the subset to convert (default all of task.instances). The task qualifies when every instance has one
    output (or all its outputs equal) and its distinct outputs over ALL its instances number 2..max_labels. The label
    set is those outputs (sorted as `sorted_labels`), or `labels` when given; multiple-choice tasks (lettered options)
    map the answer letter to a choice index (A -> 0) and have no label set. Rows are named
    "<task> instance <id>".

    Raises DataError (naming the task, and the instance where one is at fault) when the task does not qualify or an
    instance's input does not have the task's format; ConfigError when max_labels < 2.
    """
    if max_labels < 2:
        raise ConfigError(f"data.max_labels must be >= 2, got {max_labels}")
    kind, parse = NI_FORMATS.get(task.name, ("classification", _ni_text))
    outputs = {inst.id: _ni_output(task, inst) for inst in task.instances}
    distinct = sorted_labels(outputs.values())
    if len(distinct) < 2:
        raise DataError(f"{task.name}: every instance has the output {distinct[0]!r}; a classifier needs at least 2 "
                        "labels")
    if len(distinct) > max_labels:
        raise DataError(f"{task.name}: {len(distinct)} distinct outputs, more than data.max_labels={max_labels}: not "
                        "a small label set; use `tune run finetune` (generation) for it")
    rows = []
    for inst in task.instances if instances is None else instances:
        fields = parse(inst.input)
        if fields is None:
            raise DataError(f"{task.name}: instance {inst.id}: input does not have the task's {kind} format "
                            f"({(parse.__doc__ or 'non-empty text').strip()}); got {inst.input[:60]!r}")
        output = outputs.get(inst.id)
        output = _ni_output(task, inst) if output is None else output  # an instance not among task.instances
        label = _letter_index(output) if kind == "multiple_choice" else output
        rows.append(TaskRow(fields, label, f"{task.name} instance {inst.id}"))
    if kind == "multiple_choice":
        return to_task_data(rows, kind, labels=labels)  # ConfigError if labels are given
    return to_task_data(rows, kind, labels=distinct if labels is None else labels)


def ni_qualification(task: NITask, max_labels: int = 10) -> tuple[str | None, str]:
    """(kind, one-line reason) when the task works as task-head data (see ni_task_data), else (None, why not)."""
    try:
        data = ni_task_data(task, max_labels=max_labels)
    except DataError as e:
        return None, str(e).removeprefix(f"{task.name}: ")
    if data.kind == "multiple_choice":
        counts = sorted({len(row.fields["choices"]) for row in data.rows})
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        return data.kind, f"{n} lettered options per instance; the answer letter is the choice index (A -> 0)"
    return data.kind, f"{len(data.labels)} labels: {', '.join(data.labels)}"


# -- input transformations ----------------------------------------------------------------------------
def _encode_texts(tokenizer, texts: list[str], batch: int = 10_000) -> list[list[int]]:
    """Token ids of each text: no special tokens added, and special-token strings in the text ("<e>", "<s>",
    "<|endoftext|>") tokenized as ordinary text (split_special_tokens=True)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    flag = getattr(backend, "encode_special_tokens", None)
    out = []
    try:
        for start in range(0, len(texts), batch):
            # verbose=False: no "longer than the model's maximum length" warning, encode_rows truncates
            out += tokenizer(texts[start:start + batch], add_special_tokens=False, split_special_tokens=True,
                             return_attention_mask=False, verbose=False)["input_ids"]
    finally:
        # transformers 5's fast tokenizers implement split_special_tokens by setting the Rust tokenizer's
        # encode_special_tokens and leave it set: code that calls the backend directly afterwards
        # (data_prep/text.py) would split special tokens too
        if flag is not None:
            backend.encode_special_tokens = flag
    return out


def fit_lengths(la: int, lb: int, room: int) -> tuple[int, int]:
    """Segment lengths after "longest first" truncation of two segments to `room` tokens in all.

    One token at a time from the end of the longer segment (the second one on a tie), as transformers'
    `truncation="longest_first"`; computed in closed form. Needs room >= 2 and la, lb >= 1; each keeps >= 1 token.
    """
    if la + lb <= room:
        return la, lb
    short = min(la, lb)
    if room - short >= short:  # cutting the longer one down to the shorter's length is enough
        return (room - lb, lb) if la > lb else (la, room - la)
    return room - room // 2, room // 2  # both cut to about half; the first keeps the odd token


def encode_rows(data: TaskData, tokenizer, special: SpecialTokens, max_length: int) -> tuple[list[EncodedExample], int]:
    """Token ids of every row's input transformation(s) (see the module docstring), and the number of rows truncated.

    Each field's text is stripped of surrounding whitespace and encoded without special tokens, with special-token
    strings in it tokenized as ordinary text, in batches. Sequences are built from ids:
    [start] + A + [extract] or [start] + A + [delimiter] + B + [extract]. A sequence longer than `max_length`
    tokens is truncated "longest first" (`fit_lengths`): tokens come off the END of the longer segment, one at a
    time, until it fits; each segment keeps >= 1 token, and the extract token and the second segment's start are
    always kept. Similarity's two orders use the same truncated segments; multiple choice truncates each choice's
    sequence on its own. A row counts as truncated if any of its sequences was.

    Returns (examples in row order, rows truncated). Raises DataError naming the row (TaskRow.where) and field when
    a text encodes to no tokens or to one of the special ids, and naming the first row when `max_length` is below
    the specials + 1 token per segment (3, or 5 with a delimiter).
    """
    kind = data.kind
    check_kind(kind)
    specials = {special.start, special.delimiter, special.extract}
    first, second = KIND_FIELDS[kind] if kind != "classification" else ("text", None)
    minimum = 3 if second is None else 5
    if data.rows and max_length < minimum:
        layout = "<s> text <e>" if second is None else f"<s> {first} <$> {second if second != 'choices' else 'choice'} <e>"
        raise DataError(f"{data.rows[0].where}: max_length={max_length} cannot hold {layout} with 1 token per field "
                        f"(needs >= {minimum}); raise data.max_length")

    def encoded(texts: list[str], wheres: list[str], fields: list[str]) -> list[list[int]]:
        ids = _encode_texts(tokenizer, [t.strip() for t in texts])
        for seq, where, field in zip(ids, wheres, fields):
            if not seq:
                raise DataError(f"{where}: field {field} encodes to no tokens; fix or remove the row")
            if not specials.isdisjoint(seq):
                token = next(t for t in seq if t in specials)
                raise DataError(f"{where}: field {field} encodes to special token id {token} (split_special_tokens "
                                "did not keep it out); start / delimiter / extract need ids of their own")
        return ids

    rows = data.rows
    wheres = [row.where for row in rows]
    a_ids = encoded([row.fields[first] for row in rows], wheres, [first] * len(rows))
    if second == "choices":
        flat, flat_where, flat_field = [], [], []
        for row in rows:
            flat += row.fields["choices"]
            flat_where += [row.where] * len(row.fields["choices"])
            flat_field += [f"choices[{k}]" for k in range(len(row.fields["choices"]))]
        flat_ids = encoded(flat, flat_where, flat_field)
        b_ids, pos = [], 0
        for row in rows:
            b_ids.append(flat_ids[pos:pos + len(row.fields["choices"])])
            pos += len(row.fields["choices"])
    elif second is not None:
        b_ids = encoded([row.fields[second] for row in rows], wheres, [second] * len(rows))

    s, d, e = special.start, special.delimiter, special.extract
    examples, n_truncated = [], 0
    for i, target in enumerate(data.targets):
        a = a_ids[i]
        if second is None:
            keep = min(len(a), max_length - 2)
            sequences, cut = [[s, *a[:keep], e]], keep < len(a)
        elif kind == "multiple_choice":
            sequences, cut = [], False
            for b in b_ids[i]:
                la, lb = fit_lengths(len(a), len(b), max_length - 3)
                sequences.append([s, *a[:la], d, *b[:lb], e])
                cut = cut or (la, lb) != (len(a), len(b))
        else:
            b = b_ids[i]
            la, lb = fit_lengths(len(a), len(b), max_length - 3)
            sequences = [[s, *a[:la], d, *b[:lb], e]]
            if kind == "similarity":
                sequences.append([s, *b[:lb], d, *a[:la], e])
            cut = (la, lb) != (len(a), len(b))
        n_truncated += cut
        examples.append(EncodedExample(sequences, target, cut))
    return examples, n_truncated
