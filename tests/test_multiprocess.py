"""Two CPU processes (gloo, started by `tune run --nproc 2` through torch.distributed.run) against one.

With the same global batch (1 process x 2 accumulation steps vs 2 processes x 1), every step trains on
the same examples, so the losses agree. On this machine they were bit-identical (2 ranks: the gloo
all-reduce adds the same two partial gradients a single process accumulates). The tolerance stays at
1e-4 relative because that is not guaranteed in general: with more ranks or NCCL's ring all-reduce the
summation order differs from sequential accumulation, and Adam's division by sqrt(v) carries such
1e-7-relative differences on from step to step. Dropout is off: each rank draws its own dropout masks, so runs with
dropout are equivalent in distribution but not equal.
"""

import json

import pytest

from conftest import NI_TASKS, REPO, SHARED_DATA, assert_losses_close, losses, rewind_to_step_4, tune_run

pytestmark = pytest.mark.skipif(not NI_TASKS.is_dir(), reason="needs ../shared/data (see README: Data)")

NO_DROPOUT = {"pretrain": ["model.dropout=0.0"], "finetune": ["lora.dropout=0.0"], "distill": [],
              "classify": ["task.head_dropout=0.0"]}  # native presets have no dropout by default


def run(recipe, recipe_configs, out, nproc, extra=()):
    config, overrides = recipe_configs[recipe]
    accum = "train.grad_accum_steps=2" if nproc == 1 else "train.grad_accum_steps=1"
    done = tune_run(recipe, config, [*overrides, *NO_DROPOUT[recipe], accum, "train.keep_checkpoints=4", *extra],
                    out, nproc=nproc)
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(out)


@pytest.mark.parametrize("recipe", ["pretrain", "finetune", "distill", "classify"])
def test_two_processes_match_one_with_the_same_global_batch(recipe, recipe_configs, tmp_path):
    one = run(recipe, recipe_configs, tmp_path / "one", 1)
    two = run(recipe, recipe_configs, tmp_path / "two", 2)
    assert len(one[0]) == 8 and len(one[1]) == 3
    assert_losses_close(one[0], two[0])
    assert_losses_close(one[1], two[1])
    if recipe in ("finetune", "distill"):  # sample completions at each evaluation, written by the main process alone
        samples = [[json.loads(line) for line in (tmp_path / n / "samples.jsonl").read_text().splitlines()]
                   for n in ("one", "two")]
        assert [s["step"] for s in samples[1]] == [3, 3, 3, 6, 6, 6, 8, 8, 8]
        assert [s["prompt"] for s in samples[1]] == [s["prompt"] for s in samples[0]]


@pytest.mark.slow  # ~40 s: one- and two-process runs of every recipe
def test_checkpoints_move_between_one_and_two_processes(recipe_configs, tmp_path):
    two = run("finetune", recipe_configs, tmp_path / "two", 2)
    one = run("finetune", recipe_configs, tmp_path / "one", 1)
    rewind_to_step_4(tmp_path / "two")
    rewind_to_step_4(tmp_path / "one")
    two_then_one = run("finetune", recipe_configs, tmp_path / "two", 1, ["train.resume=true"])
    one_then_two = run("finetune", recipe_configs, tmp_path / "one", 2, ["train.resume=true"])
    assert_losses_close(two_then_one[0], two[0])
    assert_losses_close(one_then_two[0], one[0])
    assert_losses_close(two_then_one[1], one[1])


def interrupt_two_processes_then_resume(tmp_path, send):
    """Start `tune run --nproc 2` (in its own session, as a terminal's job), call send(launcher) once the first
    metrics row is written, and return (launcher's exit code, stdout, stderr, the checkpoint, the run dir); then
    assert that the resumed run reproduces an uninterrupted one."""
    import os
    import subprocess
    import sys
    import time

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:60_000])
    common = ["pretrain", "--config", "demo", "--nproc", "2", f"data.corpus={corpus}",
              f"data.cache_dir={tmp_path / 'cache'}", "model.n_layer=2", "model.n_embd=64", "model.block_size=64",
              "model.dropout=0.0", "train.max_steps=60", "train.log_every=1", "train.eval_every=0",
              "train.eval_batches=2", "train.progress=false", "sample.max_new_tokens=1", "export=false"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OMP_NUM_THREADS", None)  # the launcher chooses it (and torchrun prints no banner)
    out = tmp_path / "run"
    launcher = subprocess.Popen([sys.executable, "-m", "tune.cli", "run", *common, f"output_dir={out}"], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group, as a terminal's job
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.05)
    send(launcher)
    stdout, stderr = launcher.communicate(timeout=300)
    assert "Traceback" not in stderr and "SignalException" not in stderr and "OMP_NUM_THREADS" not in stderr, stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert " intra-op per process (from OMP_NUM_THREADS; 2 processes," in stdout  # the launcher set it for both
    resumed = subprocess.run([sys.executable, "-m", "tune.cli", "run", *common, f"output_dir={out}",
                              "train.resume=true"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = subprocess.run([sys.executable, "-m", "tune.cli", "run", *common, f"output_dir={tmp_path / 'whole'}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert losses(out) == losses(tmp_path / "whole")
    return launcher.returncode, stdout, stderr, latest, out


@pytest.mark.slow
def test_ctrl_c_under_two_processes_saves_one_checkpoint_and_says_so_in_one_line(tmp_path):
    """Ctrl-C at a terminal signals the launcher's process group (torchrun runs in its own session, so only the
    launcher, which forwards it once): both ranks stop at the same step boundary and save; exit 130, no
    traceback, one line; the resumed run then reproduces an uninterrupted one."""
    import os
    import signal

    code, stdout, stderr, latest, out = interrupt_two_processes_then_resume(
        tmp_path, lambda launcher: os.killpg(launcher.pid, signal.SIGINT))
    assert code == 130, stderr[-3000:]
    step = int(latest.removeprefix("step_"))
    assert 1 <= step < 60
    assert f"interrupted at step {step}: saved checkpoint {latest}; train.resume=true continues" in stdout
    assert stderr.strip().splitlines() == [f"interrupted: checkpoint {out / 'checkpoints' / latest} written "
                                           "(every process saved its part); train.resume=true continues"]


@pytest.mark.slow
def test_sigterm_to_the_launcher_only_under_two_processes_saves_a_checkpoint(tmp_path):
    """SIGTERM to the launcher's pid only (what Kubernetes sends): forwarded to torchrun and the ranks, which stop
    together and save; exit 143, one line; the resumed run reproduces an uninterrupted one."""
    import signal

    code, stdout, stderr, latest, out = interrupt_two_processes_then_resume(
        tmp_path, lambda launcher: launcher.send_signal(signal.SIGTERM))
    assert code == 143, stderr[-3000:]
    step = int(latest.removeprefix("step_"))
    assert 1 <= step < 60
    assert f"received SIGTERM at step {step}: saved checkpoint {latest}; train.resume=true continues" in stdout
    assert stderr.strip().splitlines() == [f"stopped by SIGTERM: checkpoint {out / 'checkpoints' / latest} written "
                                           "(every process saved its part); train.resume=true continues"]
