"""`tune validate` on paths and config-loading problems (new user's try-out): empty path values, a cache_dir that
is a file, every problem reported at once with its source, init_from's shape and position table, warmup."""

import pytest

from tune.cli import main


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


@pytest.mark.parametrize("overrides,expected", [
    (["train.eps=-1", "train.grad_clip=-1"],
     ["override train.eps=-1: train.eps must be > 0, got -1.0",
      "override train.grad_clip=-1: train.grad_clip must be >= 0, got -1.0"]),
    (["train.lrr=1", "train.eps=-1", "seed=-1", "data.corpus=/nonexistent"],
     ["override train.lrr=1: unknown config key 'train.lrr'; did you mean 'train.lr'?",
      "override train.eps=-1: train.eps must be > 0, got -1.0",
      "seed must be in [0, 4294967295], got -1",
      "data.corpus: /nonexistent does not exist"]),
    (["lora.r=0", "lora.dropout=1", "train.max_steps=0", "train.lr=0", "base_model=/nonexistent/base"],
     ["lora.r must be >= 1, got 0", "lora.dropout must be in [0, 1), got 1.0", "train.max_steps must be >= 1",
      "train.lr must be > 0", "base_model=/nonexistent/base does not exist"]),  # several of a section, validate's
])
def test_validate_reports_every_problem_at_once(overrides, expected, tmp_path, capsys):
    config = "lora_ni" if overrides[0].startswith("lora") else "demo"
    assert main(["validate", config, f"output_dir={tmp_path / 'run'}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {len(expected)} problems in "), err
    assert err.count("\n  - ") == len(expected), err
    for message in expected:
        assert message in err, (message, err)


def test_problems_name_the_file_or_the_override(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("recipe: pretrain\ntrain:\n  lrr: 1\n  eps: -1\n")
    assert main(["validate", str(config), f"output_dir={tmp_path / 'run'}", "train.warmup_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert f"{config}: unknown config key 'train.lrr'" in err, err
    assert f"{config}: train.eps must be > 0" in err, err
    assert "override train.warmup_stepz=3: unknown config key 'train.warmup_stepz'" in err, err
    # a whole section set by an override is that override's
    assert main(["validate", "demo", f"output_dir={tmp_path / 'run'}", "train={eps: -1}"]) == 2
    assert "error: override train={eps: -1}: train.eps must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("train.lr=inf", "train.lr: expected a finite number, got 'inf'"),
    ("train.lr=-Infinity", "train.lr: expected a finite number, got '-Infinity'"),
    ("train.eps=nan", "train.eps: expected a finite number, got 'nan'"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.grad_clip=null", "train.grad_clip: expected a number, got None (0 disables clipping)"),
    ("train.max_steps=null", "train.max_steps: expected an integer, got None (this key cannot be null)"),
    ("output_dir=null", "output_dir: expected a string, got None (this key cannot be null)"),
])
def test_number_hints(override, message, tmp_path, capsys):
    assert main(["validate", "demo", override]) == 2
    err = capsys.readouterr().err
    assert err == f"error: override {override}: {message}\n", err


def test_warmup_longer_than_the_run_warns(tmp_path, capsys):
    out = f"output_dir={tmp_path / 'run'}"
    assert main(["validate", "demo", out, "train.max_steps=8", "train.warmup_steps=50"]) == 0
    err = capsys.readouterr().err
    assert "warning: train.warmup_steps=50 is more than train.max_steps=8" in err and "reaches 16% of" in err, err
    assert main(["validate", "demo", out, "train.max_steps=50", "train.warmup_steps=50"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.fixture(params=["tiny-gpt2", "tiny-modern"])
def exported(request, tmp_path):
    """A native preset (2 layers) exported as an HF directory: GPT-2 layout or Llama layout."""
    from tune.models.config import config_from_preset
    from tune.models.export import export_hf
    from tune.models.gpt import GPT

    config = config_from_preset(request.param, n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50)
    return export_hf(GPT(config), tmp_path / request.param), config


def test_init_from_shape_matches_the_import(exported):
    """The torch-free reading of config.json that validate uses agrees with what import_hf builds."""
    from transformers import AutoConfig

    from recipes.pretrain import SHAPE_KEYS, init_from_shape
    from tune.hf import read_model_config
    from tune.models.export import native_config_from_hf

    out, config = exported
    shape = init_from_shape(read_model_config(out))
    imported = native_config_from_hf(AutoConfig.from_pretrained(out))
    for key in (*SHAPE_KEYS, "block_size", "position"):
        if shape[key] is not None:  # None: the key does not apply to the layout
            assert shape[key] == getattr(imported, key) == getattr(config, key), key
    assert shape["n_layer"] == 2 and shape["block_size"] == 64


def test_validate_checks_init_from_shape_and_positions(exported, tmp_path, capsys):
    out, config = exported
    base = ["validate", "demo", f"output_dir={tmp_path / 'run'}", f"model.init_from={out}"]
    # demo.yaml's own n_layer=4 / n_head=4 / n_embd=128 / block_size=256 differ from this model's: each named
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"model.n_layer=4 would change the shape of init_from={out} (its n_layer is 2); set model.n_layer=2 " \
           "or model.n_layer=null" in err, err
    assert "model.n_head=4" in err and "model.n_embd=128" in err, err
    learned = config.position == "learned"
    assert ("model.block_size=256 is larger than the position table (64)" in err) == learned, err
    same = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32"]  # equal to the model's own: no change
    assert main([*base, *same, "model.block_size=64"]) == 0, capsys.readouterr().err
    assert main([*base, "model.n_layer=null", "model.n_head=null", "model.n_embd=null", "model.block_size=null"]) == 0
    capsys.readouterr()
    if learned:
        assert main([*base, *same, "model.block_size=65"]) == 2
        assert "model.block_size=65 is larger than the position table (64)" in capsys.readouterr().err
