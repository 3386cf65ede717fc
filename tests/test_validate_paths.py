"""`tune validate` on paths and config-loading problems (new user's try-out): empty path values, a cache_dir that
is a file, every problem reported at once with its source, init_from's shape and position table, warmup."""

import json

import pytest

from tune.cli import main


@pytest.fixture
def model_dir(tmp_path):
    """A directory `tune validate` accepts as a GPT-2 model (config.json is read as JSON; weights are not read)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": 1024}')
    (model / "model.safetensors").write_bytes(b"")
    return model


def valid_overrides(config, model_dir, tmp_path):
    from conftest import NI_TASKS

    valid = {"demo": [], "lora_ni": [f"base_model={model_dir}", f"data.train_tasks={NI_TASKS}"],
             "distill_ni": [f"teacher.model={model_dir}", f"data.train_tasks={NI_TASKS}"],
             "eval_ni": [f"model={model_dir}", "adapter=null", "data.exclude_train_of=null", f"data.tasks={NI_TASKS}"]}
    return valid[config] + [f"output_dir={tmp_path / 'run'}"]


EMPTY_CASES = [  # (config, key): every path-like key of every recipe; the value is "" or blank
    ("demo", "output_dir"), ("demo", "data.corpus"), ("demo", "data.cache_dir"), ("demo", "data.tokenizer_path"),
    ("demo", "model.init_from"),
    ("lora_ni", "output_dir"), ("lora_ni", "base_model"), ("lora_ni", "tokenizer"), ("lora_ni", "data.train_tasks"),
    ("lora_ni", "data.eval_tasks"), ("lora_ni", "data.tasks_dir"), ("lora_ni", "data.cache_dir"),
    ("distill_ni", "output_dir"), ("distill_ni", "teacher.model"), ("distill_ni", "teacher.cache_dir"),
    ("distill_ni", "student.model"), ("distill_ni", "data.corpus"), ("distill_ni", "data.train_tasks"),
    ("distill_ni", "data.cache_dir"),
    ("eval_ni", "output_dir"), ("eval_ni", "model"), ("eval_ni", "adapter"), ("eval_ni", "tokenizer"),
    ("eval_ni", "data.tasks"), ("eval_ni", "data.tasks_dir"), ("eval_ni", "data.exclude_train_of"),
]


@pytest.mark.parametrize("config,key", EMPTY_CASES)
@pytest.mark.parametrize("value", ["", "'  '"])
def test_empty_path_is_refused(config, key, value, model_dir, tmp_path, capsys, request):
    if config != "demo":
        request.getfixturevalue("shared_data")
    assert main(["validate", config, *valid_overrides(config, model_dir, tmp_path), f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert f"{key} is empty; give a path" in err, err


def test_empty_entry_of_a_path_list_is_refused(tmp_path, capsys):
    corpus = tmp_path / "a.txt"
    corpus.write_text("hello world\n")
    assert main(["validate", "demo", f"output_dir={tmp_path / 'run'}", f"data.corpus=[{corpus}, '']"]) == 2
    assert "data.corpus[1] is empty; give a path" in capsys.readouterr().err


def test_cache_dir_that_is_a_file_is_refused(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("x")
    out = f"output_dir={tmp_path / 'run'}"
    assert main(["validate", "demo", out, f"data.cache_dir={readme}"]) == 2
    assert f"data.cache_dir={readme} is a file, not a directory" in capsys.readouterr().err
    assert main(["validate", "demo", out, f"data.cache_dir={readme / 'sub'}"]) == 2
    assert f"data.cache_dir={readme / 'sub'} lies under the file {readme}" in capsys.readouterr().err
    assert main(["validate", "demo", out, f"data.cache_dir={tmp_path / 'cache'}"]) == 0
