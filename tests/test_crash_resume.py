"""Crash safety: training processes killed with SIGKILL at many points, then resumed, for pretrain, LoRA
fine-tune and distill. Every resumed run must reproduce the uninterrupted run's losses step for step.

Kill points are set through TUNE_KILL_AT=name:step (tune.checkpoint.fault_point): `step` (inside a step,
after a backward), `eval` (inside the validation pass), `checkpoint` (mid-write: weights written,
optimizer not yet) and `pointer` (checkpoint renamed into place, `latest` not yet moved). Runs save
every 2 steps and evaluate every 3, over 8 steps. The default run tries one kill point per recipe;
`pytest -m slow` tries them all (KILL_POINTS below: 24 in all). TUNE_KILL_SIGNAL=INT / TERM / USR1 sends
that signal instead of SIGKILL (Ctrl-C, preemption), and TUNE_KILL_AT takes several points, comma-separated.
"""

import signal

import pytest

from conftest import NI_TASKS, losses, tune_run

pytestmark = pytest.mark.skipif(not NI_TASKS.is_dir(), reason="needs ../shared/data (see README: Data)")

ALL_POINTS = ["step:3", "step:5", "eval:3", "eval:6", "checkpoint:2", "checkpoint:4", "pointer:4", "step:8"]
DEFAULT_POINTS = {"pretrain": "checkpoint:4", "finetune": "step:5", "distill": "eval:6"}
KILL_POINTS = [pytest.param(recipe, point, marks=[] if DEFAULT_POINTS[recipe] == point else [pytest.mark.slow])
               for recipe in ("pretrain", "finetune", "distill") for point in ALL_POINTS]
_references: dict[str, tuple] = {}


def reference(recipe, configs, tmp_path_factory):
    """The uninterrupted run's losses, once per recipe."""
    if recipe not in _references:
        out = tmp_path_factory.mktemp(f"ref_{recipe}") / "run"
        done = tune_run(recipe, *configs[recipe], out)
        assert done.returncode == 0, done.stderr[-2000:]
        _references[recipe] = losses(out)
    return _references[recipe]


@pytest.mark.parametrize("recipe,point", KILL_POINTS)
def test_killed_run_resumes_to_the_same_losses(recipe, point, recipe_configs, tmp_path, tmp_path_factory):
    configs = recipe_configs
    expected = reference(recipe, configs, tmp_path_factory)
    out = tmp_path / "run"
    killed = tune_run(recipe, *configs[recipe], out, kill_at=point)
    assert killed.returncode == -signal.SIGKILL, f"not killed at {point}: {killed.stderr[-2000:]}"
    config, overrides = configs[recipe]
    resumed = tune_run(recipe, config, [*overrides, "train.resume=true"], out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == expected
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000008"


def test_ctrl_c_saves_a_checkpoint_exits_cleanly_and_resumes(recipe_configs, tmp_path, tmp_path_factory, monkeypatch):
    expected = reference("finetune", recipe_configs, tmp_path_factory)
    config, overrides = recipe_configs["finetune"]
    out = tmp_path / "run"
    monkeypatch.setenv("TUNE_KILL_SIGNAL", "INT")
    interrupted = tune_run("finetune", config, overrides, out, kill_at="step:6")  # Ctrl-C inside step 6
    monkeypatch.delenv("TUNE_KILL_SIGNAL")
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert "interrupted at step 5: saved checkpoint step_0000005; train.resume=true continues" in interrupted.stdout + interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000005"
    resumed = tune_run("finetune", config, [*overrides, "train.resume=true"], out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == expected


@pytest.mark.parametrize("name,code,point,step", [
    ("TERM", 143, "step:6", 5),  # inside step 6: the checkpoint of step 5
    ("TERM", 143, "checkpoint:4", 4),  # while step 4's checkpoint is written: it completes first
    pytest.param("USR1", 138, "step:6", 5, marks=pytest.mark.slow)])
def test_sigterm_saves_a_checkpoint_exits_128_plus_signum_and_resumes(name, code, point, step, recipe_configs,
                                                                     tmp_path, tmp_path_factory, monkeypatch):
    """SIGTERM (what SLURM and Kubernetes send before preemption) and SIGUSR1 (SLURM's early warning) act as Ctrl-C."""
    from tune.checkpoint import verify_checkpoint

    expected = reference("pretrain", recipe_configs, tmp_path_factory)
    config, overrides = recipe_configs["pretrain"]
    out = tmp_path / "run"
    monkeypatch.setenv("TUNE_KILL_SIGNAL", name)
    stopped = tune_run("pretrain", config, overrides, out, kill_at=point)
    monkeypatch.delenv("TUNE_KILL_SIGNAL")
    assert stopped.returncode == code, stopped.stderr[-2000:]
    assert (f"received SIG{name} at step {step}: saved checkpoint step_{step:07d}; train.resume=true continues"
            in stopped.stdout)
    assert "Traceback" not in stopped.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step:07d}"
    assert verify_checkpoint(out / "checkpoints" / f"step_{step:07d}") is None
    resumed = tune_run("pretrain", config, [*overrides, "train.resume=true"], out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == expected


@pytest.mark.slow  # ~22 s
def test_a_second_ctrl_c_during_the_interrupt_save_does_not_break_it(recipe_configs, tmp_path, tmp_path_factory,
                                                                     monkeypatch):
    from tune.checkpoint import verify_checkpoint

    expected = reference("pretrain", recipe_configs, tmp_path_factory)
    config, overrides = recipe_configs["pretrain"]
    out = tmp_path / "run"
    monkeypatch.setenv("TUNE_KILL_SIGNAL", "INT")
    # Ctrl-C inside step 6, and again while the interrupt save of step 5 is half written
    interrupted = tune_run("pretrain", config, overrides, out, kill_at="step:6,checkpoint:5")
    monkeypatch.delenv("TUNE_KILL_SIGNAL")
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert "Traceback" not in interrupted.stderr
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_0000005"
    assert verify_checkpoint(checkpoints / "step_0000005") is None and not list(checkpoints.glob(".tmp-*"))
    resumed = tune_run("pretrain", config, [*overrides, "train.resume=true"], out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(out) == expected
