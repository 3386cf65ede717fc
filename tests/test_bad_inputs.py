"""What bad input gets (issue 11): every number checked for its range before any work, bounded YAML, output
directories apart from the inputs, split-file names inside the tasks folder, model directories that would run
code (custom code, pickle weights) refused with one line, and task JSON nested too deeply."""

import dataclasses
import time
import typing

import pytest

from tune.cli import load_recipe, main
from tune.errors import ConfigError, DataError

RECIPES = {"pretrain": "demo", "finetune": "lora_ni", "distill": "distill_ni", "evaluate": "eval_ni",
           "classify": "gpt1_classify"}


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
    assert checked == 15


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
    ("distill_ni", "kd.skew_alpha=1", "kd.skew_alpha must be in [0, 1), got 1"),
    ("distill_ni", "kd.chunk_size=0", "kd.chunk_size must be >= 1, got 0"),
    ("distill_ni", "compare.max_new_tokens=0", "compare.max_new_tokens must be >= 1, got 0"),
    ("distill_ni", "data.val_fraction=0", "data.val_fraction must be in (0, 1), got 0.0"),
    ("distill_ni", "kd.lmbda=1.5", "kd.lmbda must be in [0, 1] (the share of on-policy steps), got 1.5"),
    ("distill_ni", "kd.beta=-0.1", "kd.beta must be in [0, 1] (0 forward KL, 1 reverse KL), got -0.1"),
    ("distill_ni", "kd.max_new_tokens=0", "kd.max_new_tokens must be >= 1, got 0"),
    ("distill_ni", "kd.sample_temperature=-1", "kd.sample_temperature must be >= 0 (0: greedy), got -1.0"),
    ("distill_ni", "compare.methods=[on_policy, gkd]", "compare.methods: unknown method 'gkd'; choose from"),
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
        ("demo", [f"data.corpus={corpus}", f"output_dir={corpus / 'run'}"],
         f"lies inside the input data.corpus={corpus}"),
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
        assert err.startswith("error: output_dir=") and message in err and err.count("\n") == 1, err


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


# -- YAML bounds ----------------------------------------------------------------------------------------
def billion_laughs() -> str:
    """9 levels of lists of 9 aliases to the level below: under 500 bytes, 9**9 (387 million) strings expanded."""
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(lines) + "\n"


def test_yaml_billion_laughs_is_refused_quickly(tmp_path, capsys):
    path = tmp_path / "lol.yaml"
    path.write_text("recipe: pretrain\n" + billion_laughs())
    assert path.stat().st_size < 500
    start = time.perf_counter()
    assert main(["validate", str(path)]) == 2
    assert time.perf_counter() - start < 1
    err = capsys.readouterr().err
    assert err == f"error: {path}: too many YAML aliases/nodes (limit 100,000); configs do not need aliases\n"
    # as an override value too: the same anchors and aliases in one flow list
    flow = "[" + ", ".join(line.split(": ", 1)[1] for line in billion_laughs().splitlines()) + "]"
    start = time.perf_counter()
    assert main(["validate", "demo", "data.corpus=" + flow]) == 2
    err = capsys.readouterr().err
    assert time.perf_counter() - start < 1
    assert err == ("error: override 'data.corpus': too many YAML aliases/nodes (limit 100,000); configs do not need "
                   "aliases\n")


def test_yaml_size_and_depth_bounds_and_short_values(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("recipe: pretrain\n# " + "x" * 1_000_000)
    deep = tmp_path / "deep.yaml"
    deep.write_text("recipe: pretrain\noutput_dir: " + "[" * 100_000)
    for path, message in ((big, "1,000,019 bytes is too large for a config (limit 1,000,000 bytes)"),
                          (deep, "YAML nested too deeply; configs are a few levels of sections")):
        assert main(["validate", str(path)]) == 2
        assert capsys.readouterr().err == f"error: {path}: {message}\n"
    # a value quoted in an error is cut to 80 characters
    assert main(["validate", "demo", "output_dir=[" + "x" * 100_000 + "]"]) == 2
    err = capsys.readouterr().err
    assert "output_dir: expected a string, got ['xxx" in err and "...\n" in err and len(err) < 300, err
    assert main(["validate", "demo", "train.max_steps=1" + "0" * 5000]) == 2  # Python's 4,300-digit int limit
    err = capsys.readouterr().err
    assert err.startswith("error: override 'train.max_steps': ") and len(err) < 300, err


# -- split files, deep task JSON -------------------------------------------------------------------------
def test_split_file_names_stay_inside_the_tasks_folder(tmp_path, capsys):
    from data_prep.natural_instructions import load_tasks
    from tune.errors import DataError

    tasks = tmp_path / "ni" / "tasks"
    tasks.mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "task_x.json").write_text(
        '{"Definition": ["d"], "Instances": [{"id": "1", "input": "i", "output": ["o"]}]}')
    (tasks / "linked").symlink_to(secret)
    split = tmp_path / "ni" / "split.txt"
    for line, rule in (("../secret/task_x", "has a '..' part"), ("../../secret/task_x", "has a '..' part"),
                       (str(secret / "task_x"), "is an absolute path"), ("/etc/passwd", "is an absolute path"),
                       ("linked/task_x", "resolves outside the tasks folder")):
        split.write_text(f"# tasks\n{line}\n")
        with pytest.raises(DataError) as e:
            load_tasks(split)
        assert str(e.value) == (f"{split} line 2: task name {line!r} {rule}; names must be task files inside the "
                                f"tasks folder {tasks}"), str(e.value)
    # a name inside the folder still loads (and a task file there may itself be a link)
    (tasks / "task_y.json").symlink_to(secret / "task_x.json")
    split.write_text("task_y\n")
    assert [t.name for t in load_tasks(split)] == ["task_y"]


def test_task_json_nested_too_deeply(tmp_path):
    from data_prep.natural_instructions import load_task
    from tune.errors import DataError

    for name, text in (("task_open.json", "[" * 100_000), ("task_closed.json", "[" * 100_000 + "]" * 100_000),
                       ("task_meta.json", '{"Definition": ["d"], "Categories": ' + "[" * 150 + "]" * 150 + "}")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError) as e:
            load_task(path)
        assert str(e.value) == (f"{path}: JSON nested too deeply (over 100 levels); a task file is a few levels of "
                                "objects and lists")


def test_model_config_json_nested_too_deeply(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["validate", "eval_ni", f"model={model}", "adapter=null", "data.exclude_train_of=null",
                 f"data.tasks={tmp_path}"]) == 2
    assert f"{model}/config.json: not a valid transformers config (JSON nested too deeply)" in capsys.readouterr().err
    from tune.hf import check_adapter_dir, check_no_custom_code

    (model / "config.json").write_text("{}")
    for name, what in (("adapter_config.json", "adapter"), ("tokenizer_config.json", "tokenizer")):
        (model / name).write_text("[" * 100_000 + "]" * 100_000)
        with pytest.raises(DataError, match=rf"{name}: not a valid {what} config \(JSON nested too deeply\)$"):
            check_adapter_dir(model) if what == "adapter" else check_no_custom_code(model, "tokenizer")


# -- model directories that would run code --------------------------------------------------------------
@pytest.fixture
def tiny_gpt2(tmp_path):
    """A real (random) GPT-2 of a few thousand weights, saved with save_pretrained (safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path / "gpt2"
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


def test_custom_code_model_is_refused_without_a_prompt(tiny_gpt2, tmp_path):
    """config.json with auto_map (transformers would ask "Do you wish to run the custom code? [y/N]"): one line
    from `tune run finetune` and `tune generate`, with stdin closed and a timeout, so a prompt fails the test."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    config = json.loads((tiny_gpt2 / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilLM"}
    (tiny_gpt2 / "config.json").write_text(json.dumps(config))
    (tiny_gpt2 / "modeling_evil.py").write_text("raise SystemExit('custom code ran')\n")
    expected = (f"error: base_model={tiny_gpt2}: {tiny_gpt2 / 'config.json'} has auto_map: it needs custom Python "
                "code from its directory, which tune never runs; use a model transformers supports natively (if this "
                "one is, delete auto_map from the file)\n")
    (tmp_path / "tasks").mkdir()
    for args, message in (
            (["run", "finetune", "--config", "lora_ni", f"base_model={tiny_gpt2}",
              f"data.train_tasks={tmp_path / 'tasks'}", f"output_dir={tmp_path / 'run'}"], expected),
            (["generate", "--model", str(tiny_gpt2), "--prompt", "hi"], expected.replace("base_model=", "--model "))):
        done = subprocess.run([sys.executable, "-m", "tune.cli", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stderr == message, done.stderr[-2000:]
        assert not (tmp_path / "run").exists()


def test_custom_code_tokenizer_is_refused(tiny_gpt2, tmp_path, capsys):
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["tok.Evil", null]}}')
    (tmp_path / "tasks").mkdir()
    assert main(["validate", "lora_ni", f"base_model={tiny_gpt2}", f"tokenizer={tokenizer}",
                 f"data.train_tasks={tmp_path / 'tasks'}", "data.max_length=64"]) == 2
    assert capsys.readouterr().err == (f"error: tokenizer={tokenizer}: {tokenizer / 'tokenizer_config.json'} has "
                                       "auto_map: it needs custom Python code from its directory, which tune never "
                                       "runs; use a model transformers supports natively (if this one is, "
                                       "delete auto_map from the file)\n")


def test_pickle_only_model_is_refused_up_front_with_the_conversion(tiny_gpt2, tmp_path, capsys, shared_data):
    """pytorch_model.bin only (transformers 5 writes safetensors whatever safe_serialization says, so the pickle
    is written with torch.save): one line from `tune validate` and `tune run finetune`, before tokenization; the
    command the message gives converts the directory, which then validates."""
    import shlex
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from conftest import NI_TASKS

    state = load_file(tiny_gpt2 / "model.safetensors")
    (tiny_gpt2 / "model.safetensors").unlink()
    torch.save(state, tiny_gpt2 / "pytorch_model.bin")
    overrides = [f"base_model={tiny_gpt2}", f"data.train_tasks={NI_TASKS}", "data.max_length=64",
                 f"output_dir={tmp_path / 'run'}"]
    prefix = f"error: base_model={tiny_gpt2} holds only pickle weights (pytorch_model.bin), which are never loaded"
    assert main(["validate", "lora_ni", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1, err
    assert main(["run", "finetune", "--config", "lora_ni", *overrides]) == 2
    assert capsys.readouterr().err == err and not (tmp_path / "run").exists()

    command = shlex.split(err.split("convert once, on a trusted copy: ", 1)[1])
    assert command[0] == "python"
    subprocess.run([sys.executable, *command[1:]], check=True, capture_output=True, timeout=120)
    converted = load_file(tiny_gpt2 / "model.safetensors")
    assert all(torch.equal(converted[k], state[k]) for k in converted) and len(converted) >= len(state) - 1
    assert main(["validate", "lora_ni", *overrides]) == 0


def test_every_transformers_load_refuses_remote_code():
    """Every from_pretrained of a transformers model, config or tokenizer in tune/, recipes/ and data_prep/ passes
    trust_remote_code=False (peft's PeftModel loads adapters, which carry no code)."""
    import ast

    from conftest import REPO

    calls = []
    for path in [p for d in ("tune", "recipes", "data_prep") for p in sorted((REPO / d).rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and getattr(node.func.value, "id", "") != "PeftModel"):
                flags = [k.value for k in node.keywords if k.arg == "trust_remote_code"]
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", [getattr(f, "value", f) for f in flags]))
    assert len(calls) >= 12
    assert all(flags == [False] for _, flags in calls), [c for c in calls if c[1] != [False]]


@pytest.mark.parametrize("option,message", [
    (["--temperature", "nan"], "--temperature must be a finite number >= 0 (0 is greedy), got nan"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0 (0 is greedy), got -1.0"),
    (["--top-k", "-1"], "--top-k must be >= 0 (0 is off), got -1"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--seed", "-1"], "--seed must be in [0, 2**63), got -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
])
def test_generate_options_out_of_range(option, message, capsys):
    """Checked before the model is even looked at (a missing --model is not reported first)."""
    assert main(["generate", "--model", "nowhere", "--prompt", "hi", *option]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("setting, message", [
    ("train.optimizer=paged_adamw", "error: train.optimizer=paged_adamw pages optimizer states between GPU and CPU "
                                    "memory and needs a CUDA GPU (this run is on cpu); use train.optimizer=adamw or "
                                    "adamw_8bit\n"),
])
def test_a_setting_this_device_cannot_run_leaves_no_output_dir(tmp_path, capsys, setting, message):
    """Refused right after the accelerator exists, before the recipe writes anything (pretrain used to leave .lock
    and tokenizer/ behind)."""
    assert main(["run", "pretrain", "--config", "demo", f"output_dir={tmp_path / 'run'}", setting]) == 2
    assert capsys.readouterr().err.endswith(message)
    assert not (tmp_path / "run").exists()


def test_a_model_directory_without_tokenizer_files_is_refused_not_silently_empty(tmp_path, gpt2_base, capsys):
    """transformers 5 builds an empty tokenizer for a directory without tokenizer files: `tune generate` printed the
    prompt and nothing else, exit 0. Every load names the directory and the fix; --tokenizer still works."""
    import shutil

    from tune.errors import DataError
    from tune.hf import load_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(gpt2_base / name, bare / name)
    with pytest.raises(DataError, match="holds no tokenizer files"):
        load_tokenizer(bare, "base_model")
    assert main(["generate", "--model", str(bare), "--prompt", "hello", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {bare} holds no tokenizer files") and "--tokenizer" in err
    assert main(["generate", "--model", str(bare), "--tokenizer", str(gpt2_base), "--prompt", "hello",
                 "--max-new-tokens", "2", "--temperature", "0"]) == 0
