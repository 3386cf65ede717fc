"""Fuzzing the two readers of user files: Natural-Instructions task JSON and YAML configs.

Whatever the input — random or truncated JSON, wrong types, huge fields, odd Unicode — the answer is a
task or config, or a TuneError (DataError / ConfigError) whose one-line message names the file; never a
traceback from inside a library.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import NI_TASKS
from data_prep.natural_instructions import load_task
from tune.config import load_config
from tune.errors import TuneError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

odd_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["", " ", "\x00", "\u202e", "🙂" * 50, "x" * 100_000, "\ufeff", "猫" * 10])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | odd_text,
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
                           max_leaves=12)


def task_like():
    """Dicts shaped like an SNI task with any field possibly missing or of the wrong type."""
    example = st.fixed_dictionaries({}, optional={"input": json_values | odd_text, "output": json_values | odd_text,
                                                  "explanation": json_values | odd_text})
    instance = st.fixed_dictionaries({}, optional={"id": json_values | odd_text, "input": json_values | odd_text,
                                                   "output": st.lists(odd_text, max_size=3) | json_values})
    return st.fixed_dictionaries({}, optional={
        "Definition": st.lists(odd_text, max_size=2) | json_values,
        "Positive Examples": st.lists(example, max_size=3) | json_values,
        "Negative Examples": st.lists(example, max_size=2) | json_values,
        "Instances": st.lists(instance, max_size=4) | json_values,
        "Categories": json_values})


def check_task_file(path, data: bytes):
    path.write_bytes(data)
    try:
        task = load_task(path)
    except TuneError as e:
        message = str(e)
        assert path.name in message and "\n" not in message, message
        return
    assert task.instances and all(inst.outputs for inst in task.instances)


@FUZZ
@given(task=task_like())
def test_task_shaped_json(tmp_path, task):
    check_task_file(tmp_path / "task999_fuzz.json", json.dumps(task).encode())


@FUZZ
@given(value=json_values)
def test_any_json(tmp_path, value):
    check_task_file(tmp_path / "task998_fuzz.json", json.dumps(value).encode())


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(tmp_path, data):
    check_task_file(tmp_path / "task997_fuzz.json", data)


@pytest.mark.skipif(not NI_TASKS.is_dir(), reason="needs ../shared/data")
@FUZZ
@given(cut=st.floats(0, 1), flip=st.integers(0, 255))
def test_truncated_and_corrupted_real_task(tmp_path, cut, flip):
    real = (NI_TASKS / "task363_sst2_polarity_classification.json").read_bytes()[:20_000]
    n = int(len(real) * cut)
    check_task_file(tmp_path / "task996_fuzz.json", real[:n] + bytes([flip]) + real[n + 1:n + 50])


yaml_scalars = st.sampled_from(["1e-3", "true", "no", "null", "~", "[1, 2", "{a: 1}", "'x'", "- 1", "!!python/object:os.system ls",
                                "&a 1", "*a", "0x1F", ".inf", "日本", "", "{", "]", "1: 2: 3"]) | odd_text
config_keys = st.sampled_from(["recipe", "output_dir", "train", "train.lr", "train.max_steps", "model", "model.preset",
                               "data", "data.corpus", "sample.top_k", "lrr", "train.betas", "", "a.b.c.d"])


def check_config(path, text, overrides):
    from recipes.pretrain import PretrainConfig

    path.write_text(text, encoding="utf-8")
    try:
        load_config(PretrainConfig, str(path), overrides)
    except TuneError as e:  # one line per problem (several problems: a summary line, then one line each)
        for problem in getattr(e, "problems", [str(e)]):
            assert "\n" not in problem.strip(), str(e)


@FUZZ
@given(lines=st.lists(st.tuples(config_keys, yaml_scalars), max_size=6))
def test_config_files(tmp_path, lines):
    text = "\n".join(f"{k.split('.')[-1]}: {v}" if k else v for k, v in lines)
    check_config(tmp_path / "fuzz.yaml", text, [])


@FUZZ
@given(overrides=st.lists(st.tuples(config_keys, yaml_scalars), max_size=4))
def test_config_overrides(tmp_path, overrides):
    check_config(tmp_path / "fuzz.yaml", "recipe: pretrain\n", [f"{k}={v}" for k, v in overrides])


@FUZZ
@given(text=st.text(max_size=200))
def test_config_random_text(tmp_path, text):
    check_config(tmp_path / "fuzz.yaml", text, [])
