"""Instruction data in the formats users have -> tokenized, loss-masked examples (cached like the NI path).

    records = read_records(["data/train.jsonl"], "alpaca", columns={"output": "response"})
    train, heldout = split_records(records, None, heldout_fraction=0.1, seed=0)
    fmt = Formatter(FormatSettings(kind="alpaca", max_length=512), tokenizer)
    dataset, report = build_format_dataset(train, fmt, ".cache/ni")

Kinds (data.kind) and the fields of a row (data.columns maps a field to your column name):

    alpaca             instruction, input (optional), output    the Stanford Alpaca prompt (or data.template)
    prompt_completion  prompt, completion                       the prompt as is (or data.template with {prompt})
    chat               messages: [{role, content}, ...]         the tokenizer's chat template (or data.chat_template)
    text               text                                     plain text, loss on every token

Files: JSON (a list of objects, or one object per line), JSONL, CSV, Parquet, or a folder written by
``datasets.save_to_disk``; all read through ``datasets``. Tokenized examples are dicts with ``input_ids``,
``targets`` (targets[t] = input_ids[t+1] where that token is trained on, -100 elsewhere; tune/losses.py), ``task``
(the group: the file's name), ``id`` and ``prompt_len`` — the NI examples' layout, so packing, the batches, the
teacher cache and the evaluation work on them unchanged.

Loss masking (data.train_on): ``completion`` (default) trains the output / completion and, for chat, every
assistant reply (TRL's assistant_only_loss, axolotl's roles_to_train: [assistant]); ``all_assistant`` is the same
for chat; ``last_assistant`` only the final reply; ``all`` every token. A chat reply's trained tokens are its
content and the template's end-of-turn token(s) (e.g. ``<|im_end|>``, ``<|eot_id|>``), never the role header the
template writes before it (the generation prompt, given at inference). The eos (or end-of-turn) token of every
trained reply is always a target.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

from data_prep.natural_instructions import report_tail
from tune.errors import ConfigError, DataError
from tune.files import file_head

PathLike = Union[str, os.PathLike]
FORMAT_VERSION = 2  # bumped when the same rows tokenize differently (2: chat replies tokenized on their own)

KINDS = ("ni", "alpaca", "prompt_completion", "chat", "text")
FIELDS = {"alpaca": ("instruction", "input", "output"), "prompt_completion": ("prompt", "completion"),
          "chat": ("messages",), "text": ("text",)}
OPTIONAL_FIELDS = {"input"}  # alpaca rows without an input (column absent, null or empty) use the no-input prompt
TRAIN_ON = ("completion", "all_assistant", "last_assistant", "all")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's `from` values; system / user / assistant as is
SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}

# Stanford Alpaca's two prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT)
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
TEMPLATE_FIELDS = {"alpaca": ({"instruction"}, {"instruction", "input"}), "prompt_completion": ({"prompt"}, {"prompt"})}
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


# -- config checks (no torch, no datasets) -------------------------------------------------------
def column_map(kind: str, columns: dict[str, str] | None) -> dict[str, str]:
    """Our field names of `kind` -> the file's column names (data.columns, our field -> your column; unmapped
    fields keep their name). ConfigError for a key that is not a field of the kind or a value that is no name."""
    names = FIELDS[kind]
    columns = dict(columns or {})
    for key, value in columns.items():
        if key not in names:
            raise ConfigError(f"data.columns.{key}: not a field of data.kind={kind} (fields: {', '.join(names)}); "
                              "data.columns maps our field names to your column names")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"data.columns.{key} must be a column name (a non-empty string), got {value!r}")
    return {name: columns.get(name, name) for name in names}


def check_template(kind: str, template: str | None) -> None:
    """ConfigError unless data.template is None or a format string using the fields `kind` allows (alpaca:
    {instruction}, optionally {input}; prompt_completion: {prompt})."""
    if template is None:
        return
    if kind not in TEMPLATE_FIELDS:
        raise ConfigError(f"data.template applies to data.kind=alpaca or prompt_completion, not {kind} (chat: "
                          "data.chat_template, a Jinja file; ni: data.prompt.template)")
    needed, allowed = TEMPLATE_FIELDS[kind]
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ConfigError(f"data.template is not a valid format string ({e}); escape literal braces as {{{{ }}}}") \
            from None
    if not needed <= fields or not fields <= allowed:
        raise ConfigError(f"data.template for data.kind={kind} must use {' and '.join(f'{{{f}}}' for f in sorted(needed))}"
                          f" and only {', '.join(f'{{{f}}}' for f in sorted(allowed))}; got fields {sorted(fields)}")


def check_train_on(kind: str, train_on: str, mask_prompt: bool = True) -> None:
    """ConfigError for a data.train_on that does not apply to `kind` (the assistant modes are chat's)."""
    if train_on not in TRAIN_ON:
        raise ConfigError(f"data.train_on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if train_on in ("all_assistant", "last_assistant") and kind != "chat":
        raise ConfigError(f"data.train_on={train_on} applies to data.kind=chat; for {kind} use completion or all")
    if not mask_prompt and train_on != "completion":
        raise ConfigError(f"data.mask_prompt=false trains on every token, which contradicts data.train_on={train_on}; "
                          "set data.train_on=all and leave data.mask_prompt out")


def template_problem(path: PathLike) -> str | None:
    """The one-line problem of a chat template file that Jinja cannot parse (checked without transformers:
    `{% generation %}` blocks and loop controls allowed, as transformers' chat templates allow them), else None."""
    import jinja2

    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        return f"data.chat_template={path}: cannot be read ({e}); give a UTF-8 Jinja file"
    text = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", text)
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        return f"data.chat_template={path}: not a valid Jinja template (line {e.lineno}: {e.message}); fix the template"
    return None


def data_files(source) -> list[Path]:
    """data.train / data.eval (a path or a list of them) as paths."""
    if source is None:
        return []
    return [Path(p) for p in (source if isinstance(source, (list, tuple)) else [source])]


def file_problems(key: str, source, split: SplitChoice | None = None) -> list[str]:
    """One line per entry of data.train / data.eval that does not exist, has no known format, is empty, or (a
    DatasetDict folder) lacks the split `split` chooses."""
    problems = []
    for path in data_files(source):
        if not path.exists():
            problems.append(f"{key}: {path} does not exist (paths are relative to where you run tune)")
        elif path.is_file() and path.suffix.lower() not in SUFFIXES:
            problems.append(f"{key}: {path} has an unknown format '{path.suffix}'; use .json, .jsonl, .csv, .tsv, "
                            ".parquet or a folder saved with datasets' save_to_disk")
        elif path.is_file() and _is_blank(path):
            problems.append(f"{key}: {_empty_file(path)}")
        elif path.is_dir() and split is not None and (problem := _split_problem(path, split)):
            problems.append(f"{key}: {problem}")
    return problems


@dataclass(frozen=True)
class SplitChoice:
    """Which split of a DatasetDict folder a key reads: `name` (None: `default`), set by the config key `key`."""
    name: str | None
    default: str
    key: str

    @property
    def chosen(self) -> str:
        return self.default if self.name is None else self.name


def _dataset_dict_splits(path: Path) -> list[str] | None:
    """The splits of a DatasetDict folder written by save_to_disk (its dataset_dict.json), None for other folders."""
    try:
        return list(json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _split_problem(path: Path, split: SplitChoice) -> str | None:
    splits = _dataset_dict_splits(path)
    if splits is None or split.chosen in splits:
        return None
    return f"{path}: no split {split.chosen!r} (splits: {', '.join(splits)}); set {split.key} to one of them"


def _is_blank(path: Path) -> bool:
    """True for a file holding nothing but whitespace (and a BOM), or an empty JSON list."""
    head = file_head(path)
    return head is not None and len(head) < 4096 and re.fullmatch(r"\s*(\[\s*\])?\s*", head) is not None  # larger: datasets judges it


def _empty_file(path: Path) -> str:
    return f"{path} is empty (no rows); write one row per object / line (CSV: a header row, then the rows)"


def source_problems(kind: str, sources: dict, columns: dict[str, str] | None, template: str | None,
                    chat_template: str | None, train_on: str | None = None, mask_prompt: bool = True,
                    splits: dict[str, SplitChoice] | None = None) -> list[str]:
    """One line per problem of rows of `kind` read from `sources` ({config key: path or list of paths}, e.g.
    {"data.train": ..., "data.eval": ...}): files that do not exist, have no known format or lack a column of the
    kind; a data.columns key that is not a field of the kind; data.template / data.train_on / data.chat_template that
    do not fit it or (chat template) cannot be parsed. Cheap: no torch, at most a file's header is read."""
    splits = splits or {}
    problems = [line for key, source in sources.items() for line in file_problems(key, source, splits.get(key))]
    checks = [lambda: column_map(kind, columns), lambda: check_template(kind, template)]
    if train_on is not None:
        checks.append(lambda: check_train_on(kind, train_on, mask_prompt))
    for check in checks:
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    try:
        problems.extend(line for key, source in sources.items()
                        for line in column_problems(key, source, kind, columns, splits.get(key)))
    except ConfigError:
        pass  # a data.columns key that is not a field of the kind: reported above
    if chat_template is not None:
        if kind != "chat":
            problems.append(f"data.chat_template applies to data.kind=chat, not {kind}")
        elif not Path(chat_template).is_file():
            problems.append(f"data.chat_template={chat_template} is not a file (a Jinja chat template)")
        elif problem := template_problem(chat_template):
            problems.append(problem)
    return problems


def chat_template_problem(kind: str, chat_template: str | None, tokenizer_dir, key: str) -> str | None:
    """The problem of data.kind=chat without data.chat_template on a tokenizer directory (`key`: its config key)
    whose files hold no chat template (tokenizer_config.json's chat_template, chat_template.jinja / .json), else
    None (also when that cannot be told cheaply). The run would say the same after loading the tokenizer."""
    if kind != "chat" or chat_template is not None or not tokenizer_dir:
        return None
    folder = Path(tokenizer_dir)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(config, dict) or config.get("chat_template")
            or any((folder / name).exists() for name in ("chat_template.jinja", "chat_template.json",
                                                         "additional_chat_templates"))):
        return None
    return (f"data.kind=chat: the tokenizer of {key}={tokenizer_dir} has no chat template; give one as "
            "data.chat_template=<a .jinja file> (e.g. recipes/templates/plain_chat.jinja)")


def header_columns(path: Path, split: SplitChoice | None = None) -> list[str] | None:
    """The column names of a data file, read cheaply (a CSV header, a Parquet schema, the first object's keys of a
    JSONL file or of a JSON list, a save_to_disk folder's dataset_info.json: a DatasetDict's `split`, default
    "train"); None when they cannot be told without reading much of the file."""
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            if _dataset_dict_splits(path) is not None:
                path = path / (split.chosen if split is not None else "train")
            info = path / "dataset_info.json"
            return list(json.loads(info.read_text(encoding="utf-8")).get("features", {})) if info.is_file() else None
        if suffix in (".csv", ".tsv"):
            with open(path, encoding="utf-8-sig", newline="") as f:
                return next(csv.reader(f, delimiter="\t" if suffix == ".tsv" else ","), None)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        if suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8-sig") as f:
                first = f.readline().strip()
                if first.startswith("{"):
                    obj = json.loads(first)
                else:  # a JSON list (pretty-printed or on one line): its first object, from the first MiB
                    head = (first + f.read(1 << 20)).lstrip()
                    if not head.startswith("["):
                        return None
                    start = len(head) - len(head[1:].lstrip())
                    obj = json.JSONDecoder().raw_decode(head, start)[0]
            return list(obj) if isinstance(obj, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    except Exception:  # pyarrow's own errors for a file that is not Parquet: reported when the run reads it
        return None
    return None


def column_problems(key: str, source, kind: str, columns: dict[str, str], split: SplitChoice | None = None
                    ) -> list[str]:
    """One line per file of `source` whose columns (header_columns) lack a required field of `kind`."""
    mapping = column_map(kind, columns)
    problems = []
    for path in data_files(source):
        present = header_columns(path, split) if path.exists() else None
        if present is None:
            continue
        for name, column in mapping.items():
            if column not in present and _required(name, columns):
                problems.append(f"{key}: {path} has no column '{column}' for field {name} of data.kind={kind} "
                                f"(columns: {', '.join(present)}); set data.columns.{name}=<column>"
                                f"{_header_hint(path)}")
    return problems


def _header_hint(path: Path) -> str:
    """For a CSV / TSV file: a reminder that its first line names the columns (a file without a header row reads its
    first row as the names)."""
    return " or add a header row (the first line names the columns)" if path.suffix.lower() in (".csv", ".tsv") else ""


def _required(name: str, columns: dict[str, str] | None) -> bool:
    """Whether field `name` must have a column: every field but alpaca's input, and that one too when data.columns
    maps it (a misspelt column must not silently read as rows without input)."""
    return name not in OPTIONAL_FIELDS or name in (columns or {})


# -- reading -------------------------------------------------------------------------------------
@dataclass
class Record:
    """One row as read: our field names -> values (checked), where it came from, its group (the file's name)."""
    fields: dict
    where: str  # "<file> row N" (1-based, in file order)
    group: str
    id: str


def load_saved_split(path: Path, split: str | None, default_split: str, split_key: str,
                     formats: str = ".json, .jsonl, .csv, .tsv or .parquet file"):
    """The ``datasets.Dataset`` of a save_to_disk folder: a Dataset, or the `split` (default `default_split`) of a
    DatasetDict. DataError naming the folder and the fix (`split_key`: the config key of the split) when it is no
    dataset folder, the split is missing, or a split is given for a plain Dataset."""
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError / others for non-dataset folders
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({msg}); pass a {formats} or a save_to_disk "
                        "folder") from None
    if isinstance(ds, DatasetDict):
        name = default_split if split is None else split
        if name not in ds:
            raise DataError(f"{path}: no split {name!r} (splits: {', '.join(ds)}); set {split_key} to one of them")
        return ds[name]
    if split is not None:
        raise DataError(f"{path}: a single Dataset, not a DatasetDict with splits; drop {split_key}={split!r}")
    return ds


def _load(path: Path, split: str | None, default_split: str, split_key: str, cache_dir: PathLike | None):
    """The rows of one file / save_to_disk folder as a ``datasets.Dataset``."""
    from datasets import Features, Value, load_dataset

    from tune.hf import quiet_third_party

    if path.is_dir():
        return load_saved_split(path, split, default_split, split_key)
    if not path.is_file():
        raise DataError(f"{path}: data file does not exist; check the path (relative paths are taken from {Path.cwd()})")
    builder = SUFFIXES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unknown data format '{path.suffix}'; use .json, .jsonl, .csv, .tsv, .parquet or a "
                        "folder saved with datasets' save_to_disk")
    if _is_blank(path):
        raise DataError(_empty_file(path))
    kwargs = {}
    if builder == "json" and _is_ni_task(path):
        raise DataError(f"{path} is a Natural-Instructions task file, not rows; give it as data.train_tasks with "
                        "data.kind=ni")
    if builder == "csv":  # every cell as text, empty cells as "" (pandas would turn "42" into 42 and "" into NaN)
        header = header_columns(path) or []
        kwargs = dict(features=Features({c: Value("string") for c in header}), keep_default_na=False, na_filter=False,
                      sep="\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        with quiet_third_party():
            return load_dataset(builder, data_files=str(path.resolve()), split="train",
                                cache_dir=None if cache_dir is None else str(Path(cache_dir) / "files"), **kwargs)
    except Exception as e:  # pyarrow / pandas / json errors of a malformed file
        if "corresponds to no data" in str(e):  # datasets' words for a file without rows (a CSV header alone)
            raise DataError(_empty_file(path)) from None
        if builder == "json" and (line := _bad_json_line(path)):
            raise DataError(f"{path} {line}; fix that line (one JSON object per line, or one JSON list)") from None
        if isinstance(e, UnicodeDecodeError) or isinstance(e.__cause__ or e.__context__, UnicodeDecodeError):
            raise DataError(f"{path}: cannot read it as {builder.upper()} rows: it is not UTF-8 text; save it as UTF-8 "
                            "(e.g. from a spreadsheet: CSV UTF-8)") from None
        msg = (str(e).splitlines() or [type(e).__name__])[0][:200]
        cause = e.__cause__ or e.__context__
        if cause is not None and str(cause):
            msg += f" ({str(cause).splitlines()[0][:200]})"
        raise DataError(f"{path}: cannot read it as {builder.upper()} rows: {msg}; fix the file") from None


def _bad_json_line(path: Path) -> str | None:
    """For a JSON-lines file datasets could not read: "line N: <what is wrong>" of its first line that is not a
    JSON object (datasets counts its rows from 0, and within blocks); None for a JSON list file or when every line
    parses."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if n == 1 and line.lstrip().startswith("["):
                    return None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
                if not isinstance(obj, dict):
                    return f"line {n}: a JSON {type(obj).__name__}, not an object"
    except (OSError, UnicodeDecodeError):
        return None
    return None


def _is_ni_task(path: Path) -> bool:
    head = file_head(path)
    return head is not None and head.lstrip().startswith("{") and '"Definition"' in head and '"Instances"' in head


def _text(value, where: str, field_name: str, column: str, empty_ok: bool = False) -> str:
    if value is None:
        if empty_ok:
            return ""
        raise DataError(f"{where}: field {field_name} (column '{column}') is missing (null); fill it in or remove the row")
    if not isinstance(value, str):
        fix = ("write it as text (in JSON: quoted)" if isinstance(value, (int, float, bool)) else
               f"map data.columns.{field_name} to a text column, or flatten this one into text")
        raise DataError(f"{where}: field {field_name} (column '{column}') must be text, got {type(value).__name__} "
                        f"{str(value)[:40]!r}; {fix}")
    if not value.strip() and not empty_ok:
        raise DataError(f"{where}: field {field_name} (column '{column}') is empty; fill it in or remove the row")
    return value


def _messages(value, where: str, column: str) -> list[dict]:
    """A chat's messages checked: a list of {role, content} with roles in ROLES, the last one the assistant's."""
    if isinstance(value, str):  # CSV cells hold the list as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field messages (column '{column}') must be a list of {{role, content}} objects "
                            f"(in CSV: as JSON); got {value[:40]!r}") from None
    if not isinstance(value, (list, tuple)) or not value:
        got = "an empty list" if isinstance(value, (list, tuple)) else \
            type(value).__name__ if value is not None else "null"
        raise DataError(f"{where}: field messages (column '{column}') must be a non-empty list of {{role, content}} "
                        f"objects, got {got}; give the turns as a list, one object per turn, or remove the row")
    out = []
    for i, message in enumerate(value):
        at = f"{where}: field messages[{i}] (column '{column}')"
        if not isinstance(message, dict):
            raise DataError(f"{at} must be an object with 'role' and 'content', got {type(message).__name__}; write "
                            "each turn as {\"role\": ..., \"content\": ...}")
        if "role" not in message and "from" in message:  # ShareGPT's {from, value}, as TRL's maybe_convert_to_chatml
            role = SHAREGPT_ROLES.get(message["from"], message["from"])
            content = message.get("value")
        else:
            role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}; rename it or remove the message")
        if not isinstance(content, str):
            got = type(content).__name__ if content is not None else "null"
            fix = "join its text parts into one string" if isinstance(content, (list, tuple)) else \
                "write the turn's text there (or remove the turn)"
            raise DataError(f"{at}: content must be text, got {got}; {fix}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{at}: the assistant's content is empty; a reply to train on needs text (remove the "
                            "turn or fill it in)")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: field messages (column '{column}'): the last turn is the {out[-1]['role']}'s, not "
                        "the assistant's; end every chat with the assistant reply to train on")
    return out


def read_records(source, kind: str, columns: dict[str, str] | None = None, split: str | None = None,
                 default_split: str = "train", split_key: str = "data.split",
                 cache_dir: PathLike | None = None) -> list[Record]:
    """The rows of the files in `source` (a path or a list of them) for data kind `kind`, in file order, each checked.

    DataError naming the file, the row (1-based) and the field, with the fix, for: a missing column (listing the
    columns there), a missing / non-text / empty value (alpaca's input may be empty or absent), a chat that is not a
    list of {role, content}, a role other than system / user / assistant, an empty assistant reply, a chat whose last
    turn is not the assistant's, an unreadable file, and a file without rows. ConfigError for a data.columns key that
    is not a field of the kind. Each record's group is its file's name (the file's stem, or the folder's name; the
    path without suffix where two files of `source` share it)."""
    mapping = column_map(kind, columns)
    records = []
    paths = data_files(source)
    for path, group in zip(paths, _group_names(paths)):
        ds = _load(path, split, default_split, split_key, cache_dir)
        present = list(ds.column_names)
        for name, column in mapping.items():
            if column not in present and _required(name, columns):
                raise DataError(f"{path}: no column '{column}' for field {name} of data.kind={kind} (columns there: "
                                f"{', '.join(present)}); set data.columns.{name}=<column>{_header_hint(path)}")
        if len(ds) == 0:
            raise DataError(f"{path}: no rows; the data file is empty")
        wanted = [c for c in dict.fromkeys(mapping.values()) if c in present]
        table = ds.select_columns(wanted).to_dict()
        for i in range(len(ds)):
            where = f"{path} row {i + 1}"
            fields = {}
            for name, column in mapping.items():
                value = table[column][i] if column in table else None
                if kind == "chat":
                    fields[name] = _messages(value, where, column)
                else:
                    fields[name] = _text(value, where, name, column, empty_ok=name in OPTIONAL_FIELDS)
            records.append(Record(fields, where, group, f"{group}-{i + 1}"))
    return records


def _group_names(paths: list[Path]) -> list[str]:
    """Each file's group: its stem (a folder: its name), or, where two files would share it (a/train.jsonl and
    b/train.jsonl), its path without suffix, so that per-file caps, ids and reports keep the files apart."""
    stems = [p.stem if p.is_file() else p.name for p in paths]
    return [stem if stems.count(stem) == 1 else str(p.with_suffix("") if p.is_file() else p)
            for p, stem in zip(paths, stems)]


def split_records(train: list[Record], eval_records: list[Record] | None, heldout_fraction: float, seed: int,
                  max_train_per_group: int | None = None, heldout_rows: int | None = None
                  ) -> tuple[list[Record], list[Record]]:
    """(training records, held-out records): the eval file's records when given, else `heldout_rows` of the training
    rows or, without a count, a share `heldout_fraction` of them (at least one when there are two or more rows),
    chosen by a shuffle seeded by `seed`, never all, kept out of training. `max_train_per_group` caps the training rows of each file (the first ones, in file order)."""
    if eval_records is not None:
        held, rest = list(eval_records), list(train)
    else:
        order = list(range(len(train)))
        random.Random(int.from_bytes(hashlib.sha256(f"{seed}:heldout".encode()).digest()[:8], "big")).shuffle(order)
        if heldout_rows is not None:
            n = min(heldout_rows, len(train) - 1)
        else:
            n = int(round(heldout_fraction * len(train))) if heldout_fraction > 0 else 0
            n = min(max(n, 1 if heldout_fraction > 0 and len(train) > 1 else 0), len(train) - 1)
        chosen = set(order[:n])
        held = [r for i, r in enumerate(train) if i in chosen]
        rest = [r for i, r in enumerate(train) if i not in chosen]
    if max_train_per_group is not None:
        counts: dict[str, int] = {}
        kept = []
        for r in rest:
            if counts.get(r.group, 0) < max_train_per_group:
                counts[r.group] = counts.get(r.group, 0) + 1
                kept.append(r)
        rest = kept
    return rest, held


def heldout_overlap_warning(train: Sequence[Record], heldout: Sequence[Record]) -> str | None:
    """A `warning:` line when held-out rows have the same fields as a training row (duplicated rows in the files, or
    data.eval overlapping data.train): their val loss and scores then measure recall, not generalization. None
    when no row is shared."""
    seen = {json.dumps(r.fields, sort_keys=True, ensure_ascii=False) for r in train}
    shared = [r for r in heldout if json.dumps(r.fields, sort_keys=True, ensure_ascii=False) in seen]
    if not shared:
        return None
    return (f"warning: {len(shared)} of {len(heldout)} held-out rows are also training rows (e.g. {shared[0].where}): "
            "their val loss and scores measure recall; remove duplicated rows (or data.eval's rows from data.train)")


# -- rendering and tokenizing --------------------------------------------------------------------
@dataclass
class FormatSettings:
    kind: str
    max_length: int = 1024
    train_on: str = "completion"
    template: str | None = None  # alpaca / prompt_completion: a format string
    chat_template: str | None = None  # chat: the Jinja text (None: the tokenizer's own)
    add_eos: bool = True


@dataclass
class FormatReport:
    total: int = 0  # rows considered
    examples: int = 0  # tokenized examples kept (text rows longer than max_length give several)
    prompt_truncated: int = 0  # kept examples whose prompt lost tokens from its start to fit max_length
    dropped: int = 0  # rows whose completion (chat: the whole conversation) does not fit: not trained on
    dropped_ids: list[str] = field(default_factory=list)
    tokens: int = 0
    unknown_tokens: int | None = None

    @property
    def unknown_rate(self) -> float:
        return (self.unknown_tokens or 0) / max(self.tokens, 1)

    def __str__(self) -> str:
        s = (f"{self.total - self.dropped}/{self.total} rows kept ({self.examples} examples, {self.tokens} tokens); "
             f"{self.prompt_truncated} had the start of their prompt cut to fit max_length; {self.dropped} dropped "
             "(too long)")
        return s + report_tail(self.dropped_ids, self.unknown_tokens, self.unknown_rate)


def read_chat_template(path: PathLike) -> str:
    """The text of a Jinja chat template file (data.chat_template); DataError when it cannot be read."""
    from tune.files import read_utf8

    text = read_utf8(path, "chat template")
    if not text.strip():
        raise DataError(f"{path}: the chat template file is empty; write a Jinja template there")
    return text


class Formatter:
    """Turns records of one kind into prompts, references and tokenized, loss-masked examples with `tokenizer`.

    chat: the template is settings.chat_template, else the tokenizer's own; ConfigError when there is neither."""

    def __init__(self, settings: FormatSettings, tokenizer, template_source: str = "data.chat_template"):
        from tune.hf import unknown_token_id

        self.s, self.tokenizer, self.source = settings, tokenizer, template_source
        self.unk = unknown_token_id(tokenizer)
        if settings.add_eos and tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no eos_token; set one in its tokenizer_config.json")
        self.chat_template = None
        self.end_of_turn: list[int] = []
        self.pieces_tokenize_alone = True
        if settings.kind == "chat":
            own = getattr(tokenizer, "chat_template", None)
            if isinstance(own, dict):
                own = own.get("default")
            self.chat_template = settings.chat_template or own
            if not self.chat_template:
                raise ConfigError(f"data.kind=chat: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
                                  "chat template; give one as data.chat_template=<a .jinja file>")
            self.source = template_source if settings.chat_template else "the tokenizer's chat template"
            self.generation_blocks = bool(_GENERATION_BLOCK.search(self.chat_template))
            self.end_of_turn = self._end_of_turn()
            self.pieces_tokenize_alone = self._pieces_tokenize_alone()

    def _pieces_tokenize_alone(self) -> bool:
        """Whether a text tokenized on its own gets the ids it has in context after a special token (byte-level BPE:
        yes; SentencePiece with a "▁" prefix on every text: no)."""
        tok = self.tokenizer
        special = tok.eos_token or tok.bos_token
        if special is None:
            return True
        alone = tok("a", add_special_tokens=False)["input_ids"]
        after = tok(special + "a", add_special_tokens=False)["input_ids"]
        return after[1:] == alone

    # chat ------------------------------------------------------------------------------------------
    def render(self, messages: list[dict], generation_prompt: bool, where: str = "") -> str:
        """The conversation as the chat template writes it; DataError naming `where` when the template fails."""
        try:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja2's TemplateError (raise_exception in the template too), TypeError, ...
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{where or 'chat'}: field messages: {self.source} does not render it ({type(e).__name__}: "
                            f"{msg}); fix the template or the row") from None
        if not isinstance(text, str):
            raise DataError(f"{self.source} rendered {type(text).__name__}, not text; check the template")
        return text

    def _end_of_turn(self) -> list[int]:
        """The special token ids the template writes right after an assistant reply (its end-of-turn), [] if none."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        head = self.render(probe[:1], True, "probe chat")
        full = self.render(probe, False, "probe chat")
        # the reply may follow more than the generation prompt (Qwen3's empty <think> block in the last turn)
        reply = full.find("ok", len(head)) if full.startswith(head) else -1
        if reply < 0:
            return []
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        after = self.tokenizer(full[reply + 2:], add_special_tokens=False)["input_ids"]
        return [i for i in after if i in special][:1]

    def chat_spans(self, messages: list[dict], where: str, last_only: bool = False
                   ) -> tuple[str, list[tuple[int, int]]]:
        """(the rendered conversation, the character spans of each assistant reply as the model generates it: from
        the end of the generation prompt through the reply's end-of-turn text, trailing whitespace excluded;
        `last_only`: an earlier reply whose span cannot be found is left out, only the last one's is needed).

        Each span comes from rendering the messages before the reply with the generation prompt and the messages
        through the reply (axolotl's and TRL's prefix method): both must be prefixes of the whole rendering, which
        holds for templates that write each turn independently of later ones, and for the last reply of templates
        that write earlier turns differently (loop.last, Qwen3's thinking blocks). DataError naming `where`
        otherwise."""
        full = self.render(messages, False, where)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = self.render(messages[:i], True, where)
            upto = self.render(messages[:i + 1], False, where)
            if not (upto.startswith(head) and full.startswith(upto)):
                if last_only and i < len(messages) - 1:
                    continue
                fix = "" if last_only else "train on the last reply only (data.train_on=last_assistant), "
                raise DataError(f"{where}: field messages[{i}]: {self.source} does not render the conversation up to "
                                "this reply as a prefix of the whole (it writes a turn differently once later turns "
                                f"follow, e.g. by loop.last); {fix}use a template that writes each turn on its own, "
                                "or mark replies with {% generation %} blocks")
            end = len(upto.rstrip()) if upto.rstrip().startswith(head) else len(upto)
            spans.append((len(head), max(end, len(head))))
        return full, spans

    def _chat_tokens(self, messages: list[dict], where: str) -> tuple[list[int], list[list[int]]]:
        """(input_ids, per assistant reply the token positions it covers)."""
        if self.generation_blocks:
            return self._generation_tokens(messages, where)
        # last_assistant and all need the last reply's span alone (its start is the prompt's end); the others, where
        # found, cut the text as in the other modes so that the ids do not depend on data.train_on
        text, spans = self.chat_spans(messages, where, last_only=self.s.train_on in ("last_assistant", "all"))
        # The text between the spans and each span are tokenized on their own, as prompt and completion are for the
        # other kinds: a BPE merge across a boundary ("assistant: " + "Hi" -> "assistant:", " Hi") would otherwise put
        # the reply's first token half in the prompt (untrained) and train on a prompt tokenization inference never
        # sees (the generation prompt is tokenized alone, ending in " ").
        # A tokenizer that marks the start of every text it is given (SentencePiece's "▁" prefix: Llama-2, Mistral
        # v0.1) would put that mark inside the conversation at each cut: it tokenizes the whole text, and a token
        # that straddles a reply's start is counted in the reply (it holds the reply's first characters).
        if self.pieces_tokenize_alone:
            cuts = [0, *(p for span in spans for p in span), len(text)]
            pieces = self.tokenizer([text[a:b] for a, b in zip(cuts, cuts[1:])], add_special_tokens=False)["input_ids"]
            ids, turns = [], []
            for k, piece in enumerate(pieces):
                if k % 2:  # odd pieces are the replies
                    turns.append(list(range(len(ids), len(ids) + len(piece))))
                ids += piece
        else:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
            turns = [[t for t, (a, b) in enumerate(offsets) if a < end and b > start and b > a] for start, end in spans]
        if not self.end_of_turn and self.s.add_eos:  # a template without an end-of-turn token: eos ends the chat
            # the whitespace the template writes after the last reply comes before that eos: trained too, else the
            # model never learns the way to the eos it must stop on
            ids.append(self.tokenizer.eos_token_id)
            turns[-1] = list(range(turns[-1][0] if turns[-1] else len(ids) - 1, len(ids)))
        return ids, turns

    def _generation_tokens(self, messages: list[dict], where: str) -> tuple[list[int], list[list[int]]]:
        """A template with {% generation %} blocks: transformers' return_assistant_tokens_mask marks the replies."""
        try:
            out = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=True,
                                                     return_dict=True, return_assistant_tokens_mask=True,
                                                     add_generation_prompt=False)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{where}: field messages: {self.source} does not render it ({type(e).__name__}: {msg}); "
                            "fix the template or the row") from None
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
        turns, current = [], None
        for t, m in enumerate(mask):
            if m and current is None:
                current = []
                turns.append(current)
            if m:
                current.append(t)
            else:
                current = None
        for turn in turns:  # a block that leaves the end-of-turn token out: it is a target all the same
            after = turn[-1] + 1
            if after < len(ids) and ids[after] in self.end_of_turn:
                turn.append(after)
        return ids, turns

    # all kinds -------------------------------------------------------------------------------------
    def prompt_and_completion(self, record: Record) -> tuple[str, str]:
        """(prompt text, completion text) of an alpaca / prompt_completion / chat record: for chat the messages
        before the last reply rendered with the generation prompt, and the last reply's content."""
        f, kind = record.fields, self.s.kind
        if kind == "alpaca":
            has_input = bool(f.get("input", "").strip())
            template = self.s.template or (ALPACA_PROMPT if has_input else ALPACA_PROMPT_NO_INPUT)
            return template.format(instruction=f["instruction"], input=f.get("input", "")), f["output"]
        if kind == "prompt_completion":
            return (self.s.template or "{prompt}").format(prompt=f["prompt"]), f["completion"]
        if kind == "chat":
            return self.render(f["messages"][:-1], True, record.where), f["messages"][-1]["content"]
        raise ConfigError(f"data.kind={kind} has no prompt and completion")

    def heldout_input(self, record: Record) -> str:
        """What the copy-input baseline predicts: the row's input (alpaca: else the instruction), prompt, or the
        last user message."""
        f = record.fields
        if self.s.kind == "alpaca":
            return f.get("input") or f["instruction"]
        if self.s.kind == "prompt_completion":
            return f["prompt"]
        if self.s.kind == "chat":
            return next((m["content"] for m in reversed(f["messages"]) if m["role"] == "user"), "")
        return ""

    def _with_bos(self, ids: list[int]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            return [tok.bos_token_id] + ids
        return ids

    def encode(self, records: Sequence[Record]) -> tuple[list[dict], FormatReport]:
        """Tokenized, loss-masked examples of `records` (see the module docstring) and the report of what had to be
        cut or dropped to fit max_length: a prompt loses tokens from its start, a row whose completion (chat: whole
        conversation) does not fit is dropped, a text row longer than max_length becomes several examples."""
        from tune.losses import IGNORE_INDEX

        s, tok = self.s, self.tokenizer
        report = FormatReport(total=len(records), unknown_tokens=None if self.unk is None else 0)
        eos = [tok.eos_token_id] if s.add_eos else []
        examples = []
        if not records:  # no held-out rows (data.heldout_fraction=0): tokenizers fail on an empty batch
            return examples, report

        def add(record, ids, labels, prompt_len, suffix=""):
            targets = labels[1:] + [IGNORE_INDEX]
            examples.append({"input_ids": ids, "targets": targets, "task": record.group, "id": record.id + suffix,
                             "prompt_len": prompt_len})
            report.tokens += len(ids)
            if self.unk is not None:
                report.unknown_tokens += ids.count(self.unk)

        if s.kind == "text":
            texts = tok([r.fields["text"] for r in records], add_special_tokens=False)["input_ids"]
            for record, ids in zip(records, texts):
                ids = self._with_bos(list(ids)) + eos
                pieces = [ids[i:i + s.max_length] for i in range(0, len(ids), s.max_length)]
                pieces = [p for p in pieces if len(p) >= 2] or [ids[:s.max_length]]
                for k, piece in enumerate(pieces):
                    add(record, piece, list(piece), 0, "" if k == 0 else f"#{k}")
            report.examples = len(examples)
            return examples, report

        if s.kind == "chat":
            for record in records:
                ids, turns = self._chat_tokens(record.fields["messages"], record.where)
                with_bos = self._with_bos(ids)  # a template that does not write the bos its tokenizer wants
                if len(with_bos) > len(ids):
                    ids, turns = with_bos, [[t + 1 for t in turn] for turn in turns]
                if len(ids) > s.max_length:
                    report.dropped += 1
                    report.dropped_ids.append(record.id)
                    continue
                if s.train_on == "all":
                    trained = range(len(ids))
                elif s.train_on == "last_assistant":
                    trained = turns[-1] if turns else []
                else:
                    trained = [t for turn in turns for t in turn]
                labels = [IGNORE_INDEX] * len(ids)
                for t in trained:
                    labels[t] = ids[t]
                prompt_len = turns[-1][0] if turns and turns[-1] else len(ids)
                add(record, ids, labels, prompt_len)
            report.examples = len(examples)
            return examples, report

        pairs = [self.prompt_and_completion(r) for r in records]
        prompt_ids = tok([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
        completion_ids = tok([c for _, c in pairs], add_special_tokens=False)["input_ids"]
        for record, prompt, completion in zip(records, prompt_ids, completion_ids):
            prompt, completion = self._with_bos(list(prompt)), list(completion) + eos
            room = s.max_length - len(completion)
            if room < 1:
                report.dropped += 1
                report.dropped_ids.append(record.id)
                continue
            if len(prompt) > room:
                report.prompt_truncated += 1
                prompt = prompt[len(prompt) - room:]
            ids = prompt + completion
            labels = list(ids) if s.train_on == "all" else [IGNORE_INDEX] * len(prompt) + completion
            add(record, ids, labels, len(prompt))
        report.examples = len(examples)
        return examples, report


# -- cached dataset ------------------------------------------------------------------------------
def _cache_key(records: Sequence[Record], fmt: Formatter) -> str:
    from data_prep.natural_instructions import tokenizer_digest

    settings = asdict(fmt.s) | {"chat_template": fmt.chat_template}
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, settings, tokenizer_digest(fmt.tokenizer)]).encode())
    for start in range(0, len(records), 10_000):
        chunk = [[r.group, r.id, r.fields] for r in records[start:start + 10_000]]
        h.update(json.dumps(chunk, ensure_ascii=False).encode())
    return f"{fmt.s.kind}-{h.hexdigest()}"


def build_format_dataset(records: Sequence[Record], fmt: Formatter, cache_dir: PathLike):
    """Formatter.encode as a ``datasets.Dataset`` (input_ids, targets, task, id, prompt_len: the NI layout) and its
    FormatReport, cached under ``cache_dir/<kind>-<sha256 key>/``. The key covers the records, the settings, the
    chat template's text and the tokenizer, so a second call with the same inputs loads from disk."""
    from datasets import Dataset, load_from_disk

    from data_prep.natural_instructions import _features
    from tune.files import directory_written_aside
    from tune.hf import quiet_third_party

    records = list(records)
    final = Path(cache_dir) / _cache_key(records, fmt)

    def load(path: Path):
        try:
            report = FormatReport(**json.loads((path / "report.json").read_text(encoding="utf-8")))
            return load_from_disk(str(path / "dataset")), report
        except (OSError, ValueError, TypeError):
            return None

    cached = load(final)
    if cached is not None:
        return cached
    examples, report = fmt.encode(records)
    columns = {k: [ex[k] for ex in examples] for k in ("input_ids", "targets", "task", "id", "prompt_len")}
    with directory_written_aside(final, lambda path: load(path) is not None) as tmp:
        with quiet_third_party():
            Dataset.from_dict(columns, features=_features()).save_to_disk(str(tmp / "dataset"), num_shards=1)
        (tmp / "report.json").write_text(json.dumps(asdict(report)), encoding="utf-8")
    loaded = load(final)
    if loaded is None:
        raise DataError(f"{final}: cache entry was written but cannot be read back; delete it and run again")
    return loaded
