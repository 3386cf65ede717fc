"""The tune CLI: ls, cp, validate, run with overrides, one-line errors; and the README's demo command."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tune.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_ls_lists_recipes_and_configs(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "pretrain" in out
    for name in ("demo", "shakespeare_char", "shakespeare_char_cpu", "soseki_char", "gpt1", "gpt2_124m"):
        assert re.search(rf"^\s+{name}\s", out, re.M), name


def test_cp_then_validate_edited_copy(tmp_path, capsys):
    assert main(["cp", "gpt1", str(tmp_path)]) == 0
    copied = tmp_path / "gpt1.yaml"
    assert copied.read_text() == (REPO / "recipes/configs/gpt1.yaml").read_text()
    assert main(["cp", "gpt1", str(tmp_path)]) == 2  # refuses to overwrite
    copied.write_text(copied.read_text().replace("warmup_steps: 2000", "warmup_stepz: 2000"))
    assert main(["validate", str(copied)]) == 2
    assert "unknown config key 'train.warmup_stepz'; did you mean 'train.warmup_steps'?" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1e-3", "did you mean 'train.lr'?"),
    ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
    ("train.max_steps=1.5", "train.max_steps: expected an integer"),
    ("train.mixed_precision=bf17", "not one of ['auto', 'no', 'bf16', 'fp16'] (did you mean 'bf16'?)"),
    ("model.preset=gpt5", "override model.preset=gpt5: model.preset='gpt5' is unknown"),  # names its source
    ("train.max_steps=0", "override train.max_steps=0: train.max_steps must be >= 1, got 0"),  # not "train: train..."
    ("train.lr=-1", "train.lr must be > 0"),
    ("data.tokenizer=bpe", "data.vocab_size is required"),
    ("modle.preset=gpt1", "did you mean 'model'?"),
    ("train", "must look like key=value"),
])
def test_validate_rejects_bad_values_with_one_line(override, message, capsys):
    assert main(["validate", "demo", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_cp_into_a_missing_directory(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["cp", "demo", "newdir/"]) == 0
    assert (tmp_path / "newdir").is_dir()
    assert (tmp_path / "newdir" / "demo.yaml").read_text() == (REPO / "recipes/configs/demo.yaml").read_text()
    assert main(["cp", "demo", "copy.yaml"]) == 0 and (tmp_path / "copy.yaml").is_file()  # no slash: a file


def test_cat_prints_the_resolved_config(tmp_path, capsys):
    from tune.config import load_config, to_dict, yaml_load
    from recipes.finetune import FinetuneConfig

    # base_model need not exist: cat checks keys and values, not paths
    overrides = ["train.lr=3e-4", "lora.r=4", f"base_model={tmp_path / 'later'}"]
    assert main(["cat", "lora_ni", *overrides]) == 0
    out = capsys.readouterr().out
    expected = to_dict(load_config(FinetuneConfig, "lora_ni", overrides))
    assert yaml_load(out) == expected
    assert expected["train"]["lr"] == 3e-4 and expected["lora"]["r"] == 4
    assert "keep_checkpoints: 2" in out  # a default the file does not set
    (tmp_path / "cat.yaml").write_text(out)  # the printout is a config file that loads back to the same values
    assert to_dict(load_config(FinetuneConfig, str(tmp_path / "cat.yaml"))) == expected
    assert main(["cat", "demo", "train.lr=fast"]) == 2
    assert "train.lr: expected a number" in capsys.readouterr().err


def test_section_checks_name_their_key_once(capsys):
    for config, override, message in (("demo", "train.max_steps=0", "train.max_steps must be >= 1"),
                                      ("lora_ni", "lora.r=0", "lora.r must be >= 1"),
                                      ("demo", "model.n_embd=65", "model.n_embd=65 must be divisible")):
        assert main(["validate", config, override]) == 2
        err = capsys.readouterr().err
        body = err.split(f"override {override}: ", 1)[1]  # the source names the override, then the problem
        assert message in body and body.count(message.split(" ")[0].split("=")[0]) == 1, err


def test_validate_lists_every_missing_input_at_once(tmp_path, capsys):
    missing = {k: str(tmp_path / k) for k in ("base", "tasks", "held", "teacher", "student", "model", "adapter")}
    cases = [
        ("lora_ni", [f"base_model={missing['base']}", f"data.train_tasks={missing['tasks']}",
                     f"data.eval_tasks=[{missing['held']}]", "data.max_length=8"],
         ["base_model=" + missing["base"], "data.train_tasks: " + missing["tasks"],
          "data.eval_tasks: " + missing["held"], "data.max_length=8"]),
        ("distill_ni", [f"teacher.model={missing['teacher']}", f"student.model={missing['student']}",
                        "student.preset=null", f"data.train_tasks={missing['tasks']}", "kd.alpha=2",
                        "data.max_length=8"],
         ["teacher.model=" + missing["teacher"], "student.model=" + missing["student"],
          "data.train_tasks: " + missing["tasks"], "kd.alpha must be in [0, 1]", "data.max_length=8"]),
        ("eval_ni", [f"model={missing['model']}", f"adapter={missing['adapter']}", f"data.tasks={missing['tasks']}",
                     "data.exclude_train_of=null"],
         ["model=" + missing["model"], "adapter=" + missing["adapter"], "data.tasks: " + missing["tasks"]]),
    ]
    for config, overrides, named in cases:
        assert main(["validate", config, *overrides]) == 2
        err = capsys.readouterr().err
        lines = err.splitlines()
        assert lines[0] == f"error: {len(named)} problems in {REPO / 'recipes/configs' / config}.yaml:", err
        assert len(lines) == 1 + len(named) and all(any(n in line for line in lines[1:]) for n in named), err


def test_validate_imports_neither_torch_nor_transformers(tmp_path):
    """`tune validate` stays fast (well under a second of imports): no torch, no transformers, even for a
    config whose model directory exists (config.json is read as JSON)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(
        '{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_positions": 64}')
    (model / "model.safetensors").write_bytes(b"")
    code = ("import sys; from tune.cli import main; "
            f"assert main(['validate', 'demo']) == 0; "
            f"assert main(['validate', 'lora_ni', 'base_model={model}', 'data.max_length=64', "
            f"'data.train_tasks={model}']) == 0; "
            f"assert main(['validate', 'eval_ni', 'model={model}', 'adapter=null', 'data.exclude_train_of=null', "
            f"'data.tasks={model}']) == 0; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_overrides_reach_the_config():
    from tune.cli import load_recipe_config

    _, cfg = load_recipe_config("demo", ["train.lr=3e-4", "train.betas=[0.9, 0.999]", "sample.prompt=KING:",
                                         "model.dropout=0.1", "train.mixed_precision=no"])
    assert cfg.train.lr == 3e-4 and cfg.train.betas == [0.9, 0.999] and cfg.sample.prompt == "KING:"
    assert cfg.model.dropout == 0.1 and cfg.train.mixed_precision == "no"


def test_unknown_recipe_and_config(capsys):
    assert main(["run", "pretrian", "--config", "demo"]) == 2
    assert "did you mean 'pretrain'?" in capsys.readouterr().err
    assert main(["run", "pretrain", "--config", "shakespeare"]) == 2
    assert "did you mean 'shakespeare_char'?" in capsys.readouterr().err


def readme_command(marker: str) -> str:
    """The shell command in the README's code block that follows `marker`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(re.escape(marker) + r".*?```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, f"README has no code block after {marker!r}"
    return block.group(1).strip()


QUICK_START = ("tune run pretrain --config demo", "tune run finetune --config demo_lora",
               "tune run distill --config demo_distill")


def test_readme_demo_command_runs(tmp_path):
    """Run the README's quick start (minus the install, which CI has just done) from a clone of the repo without
    ../shared, as a fresh clone would: pretrain the demo model, LoRA-fine-tune it on the built-in tasks and
    evaluate it, distil it into a smaller student. Each step must show what the README says it shows."""
    command = readme_command("<!-- demo-command -->")
    assert "pip install" in command and all(step in command for step in QUICK_START), command
    run_part = command[command.index("tune run"):]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    result = subprocess.run(run_part.replace("tune run", f"{sys.executable} -m tune.cli run"),
                            shell=True, cwd=clone, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out, runs = result.stdout, clone / "runs"
    assert "warning" not in out.lower(), out  # no unknown characters, no demonstrations lost, nothing dropped
    assert out.count("0.00% unknown tokens") == 3, out  # the corpus, the tasks for LoRA, the tasks for distillation
    # 1. pretrain: the demo grammar is learnt well below ln(47) = 3.85; a sample and an HF export
    vals = [json.loads(line)["val_loss"] for line in (runs / "demo" / "metrics.jsonl").read_text().splitlines()
            if "val_loss" in line]
    assert vals and vals[-1] < 1.2, vals
    assert (runs / "demo" / "hf" / "model.safetensors").is_file() and (runs / "demo" / "report.png").is_file()
    assert "--- sample 1 ---" in out
    # 2. LoRA on the built-in tasks: held-out instances (never trained on) scored well above both copy baselines
    assert (runs / "demo_lora" / "adapter" / "adapter_config.json").is_file()
    lora = json.loads((runs / "demo_lora" / "eval_results.json").read_text())["heldout_instances"]
    overall = lora["overall"]["mean_over_instances"]
    assert lora["n_instances"] == 80 and "heldout instances:" in out
    assert overall["rougeL"] > max(overall["copy_demo_rougeL"], overall["copy_input_rougeL"]) + 15, overall
    assert overall["exact_match"] > max(overall["copy_demo_exact_match"], overall["copy_input_exact_match"]) + 20
    # 3. distillation: the KD student is nearer the teacher than the same student trained with CE alone, in val loss
    # (it closes a few % of the gap: 5% measured) and in KL
    rows = json.loads((runs / "demo_distill" / "comparison.json").read_text())
    kd, ce, teacher = rows["off-policy KD"], rows["CE-only student"], rows["teacher"]
    assert teacher["val_loss"] < kd["val_loss"] < ce["val_loss"], rows
    assert kd["gap_closed"] > 2 and kd["kl_to_teacher"] < ce["kl_to_teacher"], rows
    assert (runs / "demo_distill" / "student" / "model.safetensors").is_file()
    assert "closes" in out and "of the gap" in out


def test_ci_runs_the_readme_test_command():
    command = readme_command("<!-- test-command -->")
    assert command in (REPO / ".ci" / "run").read_text()


def test_constraints_pin_every_dependency_within_the_declared_ranges():
    """constraints.txt (what CI and the README install) pins each dependency of pyproject.toml, test extra
    included, to one version inside the range pyproject.toml declares; torch is pinned by the command."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    assert "torch" not in pins  # the install command pins torch (CPU or CUDA build)
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        if name == "torch":
            assert requirement.specifier.contains("2.13.0"), requirement
            continue
        assert name in pins, f"constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name]), f"{requirement.name}=={pins[name]} is outside {requirement}"


def test_launcher_drops_torchrun_noise_and_keeps_what_the_processes_say():
    """What torchrun writes around a Ctrl-C (its warnings, its SignalException traceback) goes; a process's own
    traceback (prefixed [rank1]:) and errors stay."""
    from tune.cli import _SIGNAL_TRACEBACK, _TORCHRUN_WARNING

    child = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"x.py\", line 1, in <module>\n"
             "[rank1]: RuntimeError: Connection closed by peer\n")
    torchrun = ("Traceback (most recent call last):\n  File \"<frozen runpy>\", line 198, in _run_module_as_main\n"
                "    raise SignalException(f\"Process {os.getpid()} got signal: {sigval}\", sigval=sigval)\n"
                "torch.distributed.elastic.multiprocessing.api.SignalException: Process 10438 got signal: 2\n")
    warnings = ("W1130 19:18:42.537000 9805 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process "
                "9811 closing signal SIGINT\n")
    error = "E1130 19:18:42.537000 9805 torch/distributed/elastic/multiprocessing/api.py:900] failed (exitcode: 2)\n"
    text = warnings + child + error + torchrun
    kept = _SIGNAL_TRACEBACK.sub("", _TORCHRUN_WARNING.sub(b"", text.encode()).decode())
    assert kept == child + error


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def tiny_run(tmp_path):
    """A finished 2-step pretrain run (tmp_path/run) with one checkpoint."""
    from test_engine import _pretrain

    _pretrain(tmp_path, "train.max_steps=2")
    return tmp_path / "run"


def test_export_refuses_an_out_that_is_holds_or_lies_inside_the_run(tiny_run, tmp_path, capsys, monkeypatch):
    checkpoints = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    for out in (tiny_run, tiny_run / "checkpoints" / "step_0000002", tiny_run / "checkpoints", tmp_path,
                tiny_run / "exports"):
        assert main(["export", str(tiny_run), "--out", str(out), "--force"]) == 2
        _one_line_error(capsys, f"--out {out} would overwrite the run")
    monkeypatch.chdir(tmp_path)  # a relative --out naming the run itself
    assert main(["export", "run", "--out", "run/.", "--force"]) == 2
    _one_line_error(capsys, "would overwrite the run")
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir()) == checkpoints  # nothing was deleted
    assert (tiny_run / "config.yaml").is_file()
    # the default, and any path inside RUN_DIR/exports, is allowed (twice: --force replaces it)
    for _ in range(2):
        assert main(["export", str(tiny_run), "--out", str(tiny_run / "exports" / "mine"), "--force"]) == 0
    assert (tiny_run / "exports" / "mine" / "model.safetensors").is_file()


def test_export_to_unusable_paths_says_so_in_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert main(["export", str(tiny_run), "--out", str(afile), "--force"]) == 2  # an existing file
    _one_line_error(capsys, f"error: --out {afile} is a file, not a directory")
    assert afile.read_text() == "x"
    assert main(["export", str(tiny_run), "--out", str(afile / "zz")]) == 2  # under a file: NotADirectoryError
    _one_line_error(capsys, "error: cannot use ", str(afile), "TUNE_DEBUG=1")
    monkeypatch.setenv("TUNE_DEBUG", "1")
    with pytest.raises(OSError):
        main(["export", str(tiny_run), "--out", str(afile / "zz")])


def test_cp_and_run_to_unusable_paths_say_so_in_one_line(tmp_path, capsys):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert main(["cp", "demo", f"{afile}/x/"]) == 2
    _one_line_error(capsys, "error: cannot use ", str(afile), "Not a directory")
    assert main(["cp", "demo", f"{afile}/x/demo.yaml"]) == 2
    _one_line_error(capsys, "error: cannot use ", str(afile))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    small = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.max_steps=1",
             "train.warmup_steps=0", "train.progress=false", "export=false", f"data.corpus={corpus}"]
    assert main(["run", "pretrain", "--config", "demo", *small, f"data.cache_dir={tmp_path / 'cache'}",
                 f"output_dir={afile / 'run'}"]) == 2
    _one_line_error(capsys, str(afile))  # the recipe's validate or the OSError line, whichever comes first
    assert main(["run", "pretrain", "--config", "demo", *small, f"data.cache_dir={afile}",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    _one_line_error(capsys, str(afile))


@pytest.mark.parametrize("nproc", ["0", "-1"])
def test_run_refuses_fewer_than_one_process(nproc, capsys):
    assert main(["run", "pretrain", "--config", "demo", "--nproc", nproc]) == 2
    _one_line_error(capsys, f"--nproc must be >= 1 (processes on this machine), got {nproc}")


def test_version_prints_the_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"tune {version('gpt-tune')}\n"


def _tiny_run_command(tmp_path, *extra):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    return [sys.executable, "-m", "tune.cli", "run", "pretrain", "--config", "demo", f"data.corpus={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
            "model.block_size=16", "train.max_steps=6", "train.micro_batch_size=4", "train.warmup_steps=1",
            "train.eval_every=0", "train.eval_batches=1", "train.log_every=1", "train.mixed_precision=no",
            "sample.max_new_tokens=2", "export=false", f"output_dir={tmp_path / 'run'}", *extra]


@pytest.mark.parametrize("name,line,code", [
    ("TERM", "received SIGTERM at step 2: saved checkpoint step_0000002; train.resume=true continues", 143),
    ("INT", "interrupted at step 2: saved checkpoint step_0000002; train.resume=true continues", 130),
])
def test_interrupt_line_starts_its_own_line_after_the_bar_at_a_terminal(name, line, code, tmp_path):
    """At a terminal (a pty) the progress bar shows; a signal inside step 3 prints one line naming the checkpoint
    on a line of its own (not glued onto the bar), the bar is not drawn again, and no second line follows."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNE_KILL_AT": "step:3", "TUNE_KILL_SIGNAL": name}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty has 0 columns
    proc = subprocess.Popen(_tiny_run_command(tmp_path, "train.progress=true"), cwd=REPO, env=env,
                            stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == code
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "train:" in text and "\r" in text  # the bar was drawn
    assert re.search(rf"\n{re.escape(line)}\r?\n", text), text
    after = text.split(line, 1)[1]
    assert "train:" not in after and "interrupted" not in after and "stopped by" not in after, after
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000002"


def test_no_progress_bar_when_not_at_a_terminal(tmp_path):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(_tiny_run_command(tmp_path, "train.progress=true"), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr + done.stdout and "train:" not in done.stderr, done.stderr
