"""YAML configs mapped onto nested dataclasses, with `key=value` overrides and strict validation.

Every recipe declares its config as a dataclass (fields may be dataclasses themselves). Loading
rejects unknown keys (suggesting the closest valid one), checks types, and reports the file and the
dotted key at fault.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from tune.errors import ConfigError, ConfigProblems, TuneError

class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: 1e-3 is a float, and only true/false are booleans
    (YAML 1.1 turns `no`, `on`, `off`, `yes` into booleans, which breaks mixed_precision: no)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_CONFIG_BYTES = 1_000_000
# values (scalars, lists, mappings) a config may hold once YAML aliases are expanded: real configs have hundreds;
# a "billion laughs" file (aliases of aliases) would expand 472 bytes into hundreds of millions
MAX_CONFIG_NODES = 100_000


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def short_repr(value, limit: int = 80) -> str:
    """repr(value) cut to at most `limit` characters (ending in ...), for quoting user values in one-line errors.
    Never builds the full repr of a huge or self-nested value (reprlib stops at a few items and levels)."""
    if isinstance(value, int) and value.bit_length() > 256:  # repr of a 4,300-digit int raises ValueError
        return f"an integer of {value.bit_length():,} bits"
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _count_nodes(data, limit: int) -> None:
    """Raise ValueError once `data`, with shared (aliased) values counted each time they occur, exceeds `limit`."""
    count = 0
    stack = [data]
    while stack:
        item = stack.pop()
        count += 1
        if count > limit:
            raise ValueError
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def yaml_load(text: str, source: str = "<text>"):
    """YAML 1.2-style scalars (see _Loader), with a bounded size: a ConfigError naming `source` for more than
    MAX_CONFIG_NODES values after alias expansion, or nesting too deep for the parser."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply; configs are a few levels of sections") from None
    except ValueError as e:  # an integer of over 4,300 digits (Python's int-from-text limit)
        raise ConfigError(f"{source}: {str(e)[:80]}") from None
    try:
        _count_nodes(data, MAX_CONFIG_NODES)
    except ValueError:
        raise ConfigError(f"{source}: too many YAML aliases/nodes (limit {MAX_CONFIG_NODES:,}); configs do not need "
                          "aliases") from None
    return data


CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    """A config given as a path, or as the name of a file in recipes/configs (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(str(name_or_path), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; built-in configs: {', '.join(names)}"
    raise ConfigError(f"config {short_repr(name_or_path)} is neither a file nor a built-in config{hint}")


def read_yaml(path: Path) -> dict:
    """A YAML config file as a dict; ConfigError (naming the file) when it is over MAX_CONFIG_BYTES, not UTF-8,
    invalid YAML, too large once its aliases are expanded, or not a mapping."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes is too large for a config (limit {MAX_CONFIG_BYTES:,} bytes)")
        data = yaml_load(path.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0][:200]}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config ({e.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {short_repr(text)} must look like key=value (e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {short_repr(text)} has an empty key")
    try:
        value = yaml_load(raw, f"override {short_repr(key)}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # "prompt=ROMEO:" is text, not a mapping
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.setdefault(k, {}), dict):
                raise ConfigError(f"override {short_repr(item)}: {short_repr(k)} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return data


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
# what 0 means for the keys whose "off" a user may try to write as null
_NULL_HINTS = {"grad_clip": "0 disables clipping", "eval_every": "0 disables periodic evaluation",
               "save_every": "0 checkpoints only at the end", "num_threads": "0 chooses automatically"}
# words YAML 1.2 leaves as strings (only .inf / .nan are floats) that mean a non-finite number
_NONFINITE_WORDS = {"inf", "infinity", "nan", ".inf", ".nan"}


def _coerce(value, tp, where: str):
    """Check `value` against annotation `tp`, converting the harmless cases (int->float, list->tuple)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{where}: {short_repr(value)} does not match any of {[_type_name(o) for o in options]}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {short_repr(value)} is not one of {list(allowed)}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short_repr(value)}")
        return value
    if value is None and tp in (bool, int, float, str):
        hint = _NULL_HINTS.get(where.rsplit(".", 1)[-1], "this key cannot be null")
        raise ConfigError(f"{where}: expected {_EXPECTED[tp]}, got None ({hint})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {short_repr(value)}")
        return build_dataclass(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {short_repr(value)}")
        if abs(value) >= 2**63:
            raise ConfigError(f"{where}: {short_repr(value)} is out of range (|value| < 2**63)")
        return value
    if tp is float:
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in _NONFINITE_WORDS:
            raise ConfigError(f"{where}: expected a finite number, got {short_repr(value)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {short_repr(value)}")
        if isinstance(value, int) and abs(value) >= 2**63 or not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {short_repr(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {short_repr(value)}")
        return value
    return value


def problem_lines(error: ConfigError) -> list[str]:
    """The one-line problems of a ConfigError (a ConfigProblems holds several)."""
    return list(error.problems) if isinstance(error, ConfigProblems) else [str(error)]


def _raise_problems(problems: list[str], source: str = "the config") -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigProblems(problems, source)


def _build(cls, data: dict, where: str, problems: list[str], bad_keys: list[str]):
    """`cls` built from `data`, or None; every problem of every key (unknown keys, types, the section's own
    checks) appended to `problems`, their dotted keys to `bad_keys`. A key with a problem is left at its
    default so the others are still checked."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean {(where + '.' if where else '') + close[0]!r}?" if close else \
                f"; valid keys here: {', '.join(known)}"
            problems.append(f"unknown config key {short_repr(dotted)}{hint}")
            bad_keys.append(dotted)
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            section = _build(tp, value, dotted, problems, bad_keys)
            if section is not None:
                kwargs[key] = section
            continue
        try:
            kwargs[key] = _coerce(value, tp, dotted)
        except ConfigError as e:
            problems.extend(problem_lines(e))
            bad_keys.append(dotted)
    required = [name for name, f in known.items() if name not in kwargs and
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]  # the others were given, with a problem
    if missing:
        problems.append(f"missing required config key(s): "
                        f"{', '.join((where + '.' if where else '') + m for m in missing)}")
    if required:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # section checks name their keys in full ("train.max_steps must be >= 1"): no "train: " in front again
        for line in problem_lines(e):
            named = not where or line.startswith((f"{where}.", f"{where}="))
            problems.append(line if named else f"{where}: {line}")
        bad_keys.append(where)
        return None


def build_dataclass(cls, data: dict, where: str = ""):
    """Instantiate dataclass `cls` from a mapping, validating every key and value.

    Raises ConfigError for one problem, ConfigProblems listing all of them (every key of every section) for more.
    """
    problems: list[str] = []
    result = _build(cls, data, where, problems, [])
    _raise_problems(problems)
    return result


_KEY_AT_START = re.compile(r"(?:unknown config key ')?([A-Za-z_][\w.]*)")


def _override_keys(overrides: list[str]) -> dict[str, str]:
    """dotted key -> the override text that set it (the last one wins, as in apply_overrides)."""
    keys = {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key:
            keys[key] = item
    return keys


def _source_of(problem: str, source: str, overrides: dict[str, str]) -> str:
    """`problem` prefixed with where its key came from: the override that set it (or a section above it),
    else the config file `source`."""
    match = _KEY_AT_START.match(problem)
    if match:
        key = match.group(1).rstrip(".")
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            item = overrides.get(".".join(parts[:n]))
            if item is not None:
                shown = item if item.isprintable() and len(item) <= 80 else short_repr(item)  # one line, short
                return f"override {shown}: {problem}"
    return f"{source}: {problem}"


def load_config(cls, name_or_path: str | None = None, overrides: list[str] | None = None, data: dict | None = None):
    """Load a recipe config: YAML file (or dict) + overrides -> validated dataclass instance.

    Every problem of every key is reported, each naming where its key came from (`override train.lr=...:` or
    the file): ConfigError for one, ConfigProblems for several. The error carries `partial` (the config built
    with the faulty keys at their defaults, or None when a section could not be built) and `bad_keys` (their
    dotted names), so a recipe's `validate` can add its problems to the same report (with_validate_problems).
    """
    source = "<dict>"
    if data is None:
        path = resolve_config_path(name_or_path)
        source = str(path)
        data = read_yaml(path)
    data = apply_overrides(dict(data), overrides or [])
    problems: list[str] = []
    bad_keys: list[str] = []
    result = _build(cls, data, "", problems, bad_keys)
    if problems:
        from_override = _override_keys(overrides or [])
        lines = [_source_of(p, source, from_override) for p in problems]
        error = ConfigError(lines[0]) if len(lines) == 1 else ConfigProblems(lines, source)
        error.partial, error.bad_keys = result, bad_keys
        raise error
    return result


def with_validate_problems(error: ConfigError, validate, source: str) -> ConfigError:
    """`error` from load_config with the problems `validate` finds in its partial config added (those about a
    key that already has a problem are left out: that key holds its default there, not the user's value).
    `error` itself when there is no partial config."""
    partial = getattr(error, "partial", None)
    if partial is None:
        return error
    lines = problem_lines(error)
    try:
        validate(partial)
    except TuneError as e:
        bad = [re.compile(r"(?<![\w.])" + re.escape(k) + r"(?!\w)") for k in getattr(error, "bad_keys", [])]
        lines += [p for p in problem_lines(e) if not any(b.search(p) for b in bad)]
    except Exception:  # noqa: BLE001 - a half-built config may trip a check: the config's own problems suffice
        pass
    return ConfigProblems(lines, source) if len(lines) > 1 else error


def os_errors_as_config_errors(check):
    """Decorator for a recipe's `validate`: an OSError from looking at a configured path (a name too long for the
    file system, a permission denied) becomes a one-line ConfigError naming the path instead of a traceback."""
    import functools

    @functools.wraps(check)
    def checked(*args, **kwargs):
        try:
            return check(*args, **kwargs)
        except OSError as e:
            raise ConfigError(f"{short_repr(e.filename) if e.filename else 'a configured path'}: {e.strerror or e}; "
                              "check the paths in the config") from None
    return checked


SEED_RANGE = "[0, 4294967295]"  # numpy's seed range (accelerate's set_seed seeds numpy too)


def range_problem(key: str, value, rule: str) -> str | None:
    """The one-line problem when number `value` breaks `rule`, else None (None values pass: null means unset).

    rule: '> X', '>= X', or an interval '[a, b]', '(a, b]', '[a, b)', '(a, b)'. The message names `key`.
    """
    if value is None:
        return None
    if rule.startswith(">"):
        op, bound = rule.split()
        ok = {">": value > float(bound), ">=": value >= float(bound)}[op]
    else:
        low, high = (float(x) for x in rule[1:-1].split(","))
        ok = ((low <= value) if rule[0] == "[" else (low < value)) and \
            ((value <= high) if rule[-1] == "]" else (value < high))
    return None if ok else f"{key} must be {'in ' if rule[0] in '[(' else ''}{rule}, got {short_repr(value)}"


def range_problems(prefix: str, section, rules: dict[str, str]) -> list[str]:
    """range_problem for each `field: rule` of `section`, its keys named `prefix + field` (e.g. 'sample.')."""
    problems = (range_problem(prefix + name, getattr(section, name), rule) for name, rule in rules.items())
    return [p for p in problems if p]


def check_ranges(prefix: str, section, rules: dict[str, str]) -> None:
    """range_problems as a ConfigError (one problem) or ConfigProblems (several), for a section's __post_init__."""
    _raise_problems(range_problems(prefix, section, rules))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8")
