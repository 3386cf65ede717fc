"""The tune CLI: ls, cp, validate, run with overrides, one-line errors; and the README's demo command."""

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
    ("model.preset=gpt5", "model.preset='gpt5' is unknown"),
    ("train.lr=-1", "train.lr must be > 0"),
    ("data.tokenizer=bpe", "data.vocab_size is required"),
    ("modle.preset=gpt1", "did you mean 'model'?"),
    ("train", "must look like key=value"),
])
def test_validate_rejects_bad_values_with_one_line(override, message, capsys):
    assert main(["validate", "demo", override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


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


def test_readme_demo_command_runs(tmp_path):
    """Run the README's install+demo command (minus the install, which CI has just done) from a copy
    of the repo without ../shared, as a fresh clone would."""
    command = readme_command("<!-- demo-command -->")
    assert "pip install" in command and "tune run pretrain --config demo" in command
    run_part = command[command.index("tune run"):]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    result = subprocess.run(run_part.replace("tune run", f"{sys.executable} -m tune.cli run", 1),
                            shell=True, cwd=clone, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = clone / "runs" / "demo"
    vals = [float(v) for v in re.findall(r"val_loss ([0-9.]+)", result.stdout)]
    assert vals and vals[-1] < 1.5, result.stdout[-2000:]  # the demo grammar is learnt well below ln(40)=3.7
    assert (run_dir / "hf" / "model.safetensors").is_file() and (run_dir / "report.png").is_file()
    assert "--- sample 1 ---" in result.stdout


def test_ci_runs_the_readme_test_command():
    command = readme_command("<!-- test-command -->")
    assert command in (REPO / ".ci" / "run").read_text()


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
