"""What bad input gets (issue 11): every number checked for its range before any work, bounded YAML, output
directories apart from the inputs, split-file names inside the tasks folder, model directories that would run
code (custom code, pickle weights) refused with one line, and task JSON nested too deeply."""

import dataclasses
import time
import typing

import pytest

from tune.cli import load_recipe, main
from tune.errors import ConfigError

RECIPES = {"pretrain": "demo", "finetune": "lora_ni", "distill": "distill_ni", "evaluate": "eval_ni"}


def numeric_fields(cls, prefix=""):
    """(dotted key, int or float) of every number field of a config dataclass, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        options = [t for t in typing.get_args(tp) if t is not type(None)] if typing.get_origin(tp) in (
            typing.Union, __import__("types").UnionType) else [tp]
        if dataclasses.is_dataclass(options[0]):
            yield from numeric_fields(options[0], f"{prefix}{f.name}.")
        elif options[0] in (int, float) and len(options) == 1:
            yield f"{prefix}{f.name}", options[0]


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_number_of_every_recipe_has_a_range(recipe, capsys):
    """-1 is out of range for every number a config holds (sizes, rates, seeds, temperatures...), and NaN for
    every float: `tune validate` refuses each, naming the key. A new number field without a check fails here."""
    keys = list(numeric_fields(load_recipe(recipe).CONFIG_CLASS))
    assert len(keys) >= 6
    for key, tp in keys:
        for value in ("-1", ".nan") if tp is float else ("-1",):
            assert main(["validate", RECIPES[recipe], f"{key}={value}"]) == 2, (key, value)
            err = capsys.readouterr().err
            assert key in err, (key, value, err)


def test_native_model_config_numbers_have_ranges():
    from tune.models.config import GPTConfig

    checked = 0
    for f in dataclasses.fields(GPTConfig):
        if f.type in ("int", "float", "int | None"):
            with pytest.raises(ConfigError, match=f"model.{f.name}"):
                GPTConfig(**{f.name: -1})
            checked += 1
    assert checked == 10


@pytest.fixture
def model_dir(tmp_path):
    """A directory `tune validate` accepts as a GPT-2 model (config.json is read as JSON; weights are not read)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": 1024}')
    (model / "model.safetensors").write_bytes(b"")
    return model


ISSUE_CASES = [  # (config, override, the error's text): the issue's cases and at least one key per section
    ("demo", "train.eps=-1", "train.eps must be > 0, got -1.0"),
    ("demo", "seed=-1", "seed must be in [0, 4294967295], got -1"),
    ("demo", "seed=4294967296", "seed must be in [0, 4294967295]"),
    ("demo", "train.weight_decay=-5", "train.weight_decay must be >= 0, got -5.0"),
    ("demo", "train.grad_clip=-1", "train.grad_clip must be >= 0, got -1.0"),
    ("demo", "train.grad_clip=.nan", "train.grad_clip: expected a finite number, got nan"),
    ("demo", "train.lr=.inf", "train.lr: expected a finite number, got inf"),
    ("demo", "train.lr=1e999", "train.lr: expected a finite number, got inf"),
    ("demo", "train.stop_at_val_loss=-0.5", "train.stop_at_val_loss must be >= 0"),
    ("demo", "sample.temperature=-1", "sample.temperature must be >= 0, got -1.0"),
    ("demo", "sample.top_p=0", "sample.top_p must be in (0, 1], got 0.0"),
    ("demo", "sample.top_p=1.5", "sample.top_p must be in (0, 1], got 1.5"),
    ("demo", "sample.top_k=-1", "sample.top_k must be >= 0, got -1"),
    ("demo", "sample.max_new_tokens=0", "sample.max_new_tokens must be >= 1, got 0"),
    ("demo", "model.rope_theta=0", "model.rope_theta must be > 0"),
    ("demo", "model.dropout=1", "model.dropout must be in [0, 1)"),
    ("demo", "data.val_fraction=1", "data.val_fraction must be in (0, 1), got 1.0"),
    ("demo", "train.max_steps=99999999999999999999", "train.max_steps: 99999999999999999999 is out of range"),
    ("lora_ni", "lora.alpha=0", "lora.alpha must be > 0, got 0"),
    ("lora_ni", "data.heldout_instances_per_task=-1", "data.heldout_instances_per_task must be >= 0"),
    ("lora_ni", "data.prompt.num_pos=-1", "data.prompt.num_pos must be >= 0, got -1"),
    ("lora_ni", "data.seed=-1", "data.seed must be in [0, 4294967295]"),
    ("lora_ni", "eval.batch_size=0", "eval.batch_size must be >= 1, got 0"),
    ("distill_ni", "teacher.cache_top_k=-1", "teacher.cache_top_k must be >= 0"),
    ("distill_ni", "student.n_layer=0", "student.n_layer must be >= 1, got 0"),
    ("distill_ni", "kd.temperature=0", "kd.temperature must be > 0"),
    ("distill_ni", "kd.chunk_size=0", "kd.chunk_size must be >= 1, got 0"),
    ("distill_ni", "compare.max_new_tokens=0", "compare.max_new_tokens must be >= 1, got 0"),
    ("distill_ni", "data.val_fraction=0", "data.val_fraction must be in (0, 1), got 0.0"),
    ("eval_ni", "generation.batch_size=0", "generation.batch_size must be >= 1, got 0"),
    ("eval_ni", "prompt.num_neg=-1", "prompt.num_neg must be >= 0, got -1"),
]


@pytest.mark.parametrize("config,override,message", ISSUE_CASES)
def test_validate_refuses_numbers_out_of_range(config, override, message, model_dir, tmp_path, capsys, request):
    from conftest import NI_TASKS

    if config != "demo":
        request.getfixturevalue("shared_data")  # skips without ../shared/data

    valid = {"demo": [], "lora_ni": [f"base_model={model_dir}", f"data.train_tasks={NI_TASKS}"],
             "distill_ni": [f"teacher.model={model_dir}", f"data.train_tasks={NI_TASKS}"],
             "eval_ni": [f"model={model_dir}", "adapter=null", "data.exclude_train_of=null", f"data.tasks={NI_TASKS}"]}
    overrides = valid[config] + [f"output_dir={tmp_path / 'run'}"]
    assert main(["validate", config, *overrides]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["validate", config, *overrides, override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_output_dir_apart_from_the_inputs(tmp_path, model_dir, capsys, shared_data):
    """An output_dir that is, contains or lies inside an input (the corpus, the tasks, the folder a split
    file's names resolve in, a model) is refused by `tune validate`, naming the relation and the key."""
    from conftest import NI_TASKS

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text\n" * 100)
    split = tmp_path / "ni" / "split.txt"
    (tmp_path / "ni" / "tasks").mkdir(parents=True)
    split.write_text("task001_x\n")
    cases = [
        ("demo", [f"data.corpus={corpus}", f"output_dir={corpus}"], f"is the input data.corpus={corpus}"),
        ("demo", [f"data.corpus={corpus}", f"output_dir={corpus / 'run'}"], f"lies inside the input data.corpus={corpus}"),
        ("demo", [f"data.corpus=[{corpus / 'a.txt'}]", f"output_dir={corpus}"],
         f"contains the input data.corpus={corpus / 'a.txt'}"),
        ("lora_ni", [f"base_model={model_dir}", f"data.train_tasks={NI_TASKS}", f"output_dir={NI_TASKS}"],
         f"is the input data.train_tasks={NI_TASKS}"),
        ("lora_ni", [f"base_model={model_dir}", f"data.train_tasks={NI_TASKS}", f"output_dir={NI_TASKS / 'run'}"],
         f"lies inside the input data.train_tasks={NI_TASKS}"),
        ("lora_ni", [f"base_model={model_dir}", f"data.train_tasks={NI_TASKS}", f"output_dir={NI_TASKS.parent}"],
         f"contains the input data.train_tasks={NI_TASKS}"),
        ("lora_ni", [f"base_model={model_dir}", f"data.train_tasks={NI_TASKS}", f"output_dir={model_dir}"],
         f"is the input base_model={model_dir}"),
        ("eval_ni", [f"model={model_dir}", "adapter=null", "data.exclude_train_of=null", f"data.tasks={split}",
                     f"output_dir={split.parent / 'tasks'}"], f"is the input data.tasks={split.parent / 'tasks'}"),
        ("distill_ni", [f"teacher.model={model_dir}", f"data.train_tasks={NI_TASKS}", f"output_dir={model_dir.parent}"],
         f"contains the input teacher.model={model_dir}"),
    ]
    for config, overrides, message in cases:
        assert main(["validate", config, *overrides]) == 2, (config, overrides)
        err = capsys.readouterr().err
        assert err.startswith(f"error: output_dir=") and message in err and err.count("\n") == 1, err


def test_output_dir_must_be_a_writable_directory(tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("x")
    for output_dir, message in ((file, "is a file, not a directory"),
                                (file / "run", f"lies under the file {file}")):
        assert main(["validate", "demo", f"output_dir={output_dir}"]) == 2
        err = capsys.readouterr().err
        assert f"error: output_dir={output_dir} {message}" in err and err.count("\n") == 1, err


def test_output_dir_read_only(tmp_path, capsys, monkeypatch):
    """A directory that cannot be written: refused up front. Root may write anywhere (os.access says yes, and CI
    runs as root), so there the permission answer is faked for the locked directory; elsewhere chmod makes it so."""
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    try:
        for output_dir in (locked, locked / "run"):
            assert main(["validate", "demo", f"output_dir={output_dir}"]) == 2
            err = capsys.readouterr().err
            assert f"error: output_dir={output_dir} is not writable" in err and err.count("\n") == 1, err
    finally:
        locked.chmod(0o700)
