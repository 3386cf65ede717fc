"""What the engine does when things go wrong around checkpoints: damaged checkpoints (manifest, fallback), a full
disk, two runs in one directory (the lock), non-finite weights, stale temp folders; and that every logged
quantity describes the step it is logged for. Signals (SIGTERM, a second Ctrl-C) run in subprocesses:
tests/test_crash_resume.py."""

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tune.data import TokenWindows
from tune.engine import Engine, TrainConfig
from tune.errors import TuneError
from tune.losses import causal_lm_loss
from tune.models.gpt import GPT, config_from_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _engine(tmp_path, name, max_steps, logs=None, loss_fn=causal_lm_loss, **train):
    """A tiny run (dropout on, so the RNG state matters for exact resume); its log lines go to `logs`."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, 5000).astype(np.uint16)
    torch.manual_seed(3)
    model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16, dropout=0.1))
    source = TokenWindows(tokens[:4000], tokens[4000:], 16, micro_batch_size=4, grad_accum_steps=2, seed=7)
    cfg = TrainConfig(**{"max_steps": max_steps, "micro_batch_size": 4, "grad_accum_steps": 2, "warmup_steps": 3,
                         "lr": 3e-3, "eval_batches": 2, "eval_every": 0, "log_every": 1, "progress": False,
                         "mixed_precision": "no", **train})
    return Engine(cfg, tmp_path / name, model, source, loss_fn=loss_fn,
                  log=logs.append if logs is not None else (lambda s: None))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [(r["step"], r["loss"]) for r in _rows(run_dir) if "loss" in r]


# -- every logged quantity describes its own step -------------------------------------------------------------
def test_logged_lr_tokens_grad_norm_and_elapsed_are_those_of_the_logged_step(tmp_path):
    engine = _engine(tmp_path, "run", 6, warmup_steps=3, lr=1e-3, min_lr=1e-4)
    used_lr, norms, ends = [], [], []
    engine.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used_lr.append(opt.param_groups[0]["lr"]))
    original = engine._train_step

    def measured(module, optimizer, step):
        out = original(module, optimizer, step)
        norms.append(out[3])
        ends.append(time.time())
        return out

    engine._train_step = measured
    engine.fit()
    rows = [r for r in _rows(tmp_path / "run") if "loss" in r]
    # warmup: 1/3, 2/3, 1 of 1e-3; then cosine: 1e-4 + 9e-4 x 0.75, 0.25, 0
    hand = [1e-3 / 3, 2e-3 / 3, 1e-3, 7.75e-4, 3.25e-4, 1e-4]
    assert [r["lr"] for r in rows] == pytest.approx(hand, rel=1e-9)
    assert used_lr == pytest.approx(hand, rel=1e-9)  # what the optimizer really used
    assert [r["grad_norm"] for r in rows] == norms
    assert [r["tokens"] for r in rows] == [2 * 4 * 16 * s for s in range(1, 7)]
    # elapsed_s is read when the row is written, right after its step: its increments follow the steps' ends
    assert np.diff([r["elapsed_s"] for r in rows]) == pytest.approx(np.diff(ends), abs=0.05)


# -- damaged checkpoints: verified against the manifest, the newest good one resumed --------------------------
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_bit_in_tensor_data(path):
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 100] ^= 0x10  # a bit inside the first tensor's data, past the JSON header
    path.write_bytes(bytes(data))


DAMAGES = {
    "truncated model.safetensors": (lambda c: _truncate(c / "model.safetensors"), r"model.safetensors is \d+ bytes, "
                                    r"the manifest says \d+"),
    "deleted optimizer.pt": (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    "deleted scheduler.pt": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
    "truncated optimizer.pt": (lambda c: _truncate(c / "optimizer.pt"), r"optimizer.pt is \d+ bytes"),
    "garbage state.json": (lambda c: (c / "state.json").write_text("{garbage" + " " * 300),
                           "state.json is .*|state.json does not match its checksum"),
    "latest names a missing folder": (lambda c: shutil.rmtree(c), "the folder does not exist"),
    "state.json gone": (lambda c: (c / "state.json").unlink(), "state.json is missing"),
    "deleted rng_rank0.pt": (lambda c: (c / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    "flipped bit in tensor data": (lambda c: _flip_bit_in_tensor_data(c / "model.safetensors"),
                                   "model.safetensors does not match its checksum"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run's losses, and the same run crashed in step 5, with complete checkpoints at steps
    2 and 4 to damage."""
    tmp = tmp_path_factory.mktemp("reference")
    _engine(tmp, "full", 6).fit()
    crashing = _engine(tmp, "saved", 6, save_every=2)
    step_batches = crashing.source.step_batches

    def crash_at_5(step, rank, world):
        if step == 5:
            raise RuntimeError("killed")
        return step_batches(step, rank, world)

    crashing.source.step_batches = crash_at_5
    with pytest.raises(RuntimeError, match="killed"):
        crashing.fit()
    return _losses(tmp / "full"), tmp / "saved"


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(damage, reference, tmp_path):
    expected, saved = reference
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    harm, reason = DAMAGES[damage]
    harm(run / "checkpoints" / "step_0000004")
    logs = []
    _engine(tmp_path, "run", 6, logs, resume=True, save_every=2).fit()
    skipped = [line for line in logs if line.startswith("skipping checkpoints/step_0000004: ")]
    assert len(skipped) == 1 and re.search(reason, skipped[0]), logs
    assert any("resumed from" in line and "step_0000002 at step 2" in line for line in logs), logs
    assert _losses(run) == expected  # exact resume from step 2
    superseded = list(run.glob("metrics.jsonl.superseded-*"))  # the rows of steps 3-4 moved aside, not deleted
    assert len(superseded) == 1
    assert [json.loads(line)["step"] for line in superseded[0].read_text().splitlines()] == [3, 4]
    assert (run / "checkpoints" / "latest").read_text() == "step_0000006"


def test_checkpoints_of_the_replaced_history_move_aside_and_never_count_for_rotation(reference, tmp_path):
    """After falling back from a damaged step 4 to step 2, the resumed run saves steps 3 and 6: rotation
    (keep_checkpoints=2) keeps those two, not the damaged step 4 of the history the resume replaced, which
    moves to checkpoints/superseded/ instead of being deleted."""
    from tune.checkpoint import verify_checkpoint

    expected, saved = reference
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    _truncate(run / "checkpoints" / "step_0000004" / "model.safetensors")
    logs = []
    _engine(tmp_path, "run", 6, logs, resume=True, save_every=3, keep_checkpoints=2).fit()
    assert _losses(run) == expected
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000003", "step_0000006"]
    assert all(verify_checkpoint(p) is None for p in ckpts.glob("step_*"))
    assert [p.name.split("-")[0] for p in (ckpts / "superseded").iterdir()] == ["step_0000004"]
    assert any("step_0000004 belongs to the history replaced by this resume" in line for line in logs), logs


def test_no_checkpoint_verifies_an_error_lists_them_and_metrics_stay(reference, tmp_path):
    _, saved = reference
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    metrics = (run / "metrics.jsonl").read_bytes()
    (run / "checkpoints" / "step_0000004" / "optimizer.pt").unlink()
    _truncate(run / "checkpoints" / "step_0000002" / "model.safetensors")
    with pytest.raises(TuneError) as error:
        _engine(tmp_path, "run", 6, resume=True).fit()
    message = str(error.value)
    assert "\n" not in message and "no checkpoint in" in message
    assert "step_0000004: optimizer.pt is missing" in message and "step_0000002: model.safetensors is" in message
    assert (run / "metrics.jsonl").read_bytes() == metrics  # never restarted from step 0, nothing cleared


def test_a_checkpoint_without_manifest_resumes_with_a_note(reference, tmp_path):
    expected, saved = reference
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    for manifest in (run / "checkpoints").glob("step_*/manifest.json"):  # as written before manifests existed
        manifest.unlink()
    logs = []
    _engine(tmp_path, "run", 6, logs, resume=True).fit()
    assert any("step_0000004 has no manifest.json (written by an earlier version): resuming it unverified" in line
               for line in logs), logs
    assert _losses(run) == expected


def test_stale_temp_folders_are_removed_when_a_run_resumes(reference, tmp_path):
    _, saved = reference
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    stale = run / "checkpoints" / ".tmp-step_0000005"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / "checkpoints" / ".latest.tmp").write_text("step_0000005")
    logs = []
    _engine(tmp_path, "run", 6, logs, resume=True).fit()
    assert not stale.exists() and not (run / "checkpoints" / ".latest.tmp").exists()
    assert any("removed .tmp-step_0000005" in line for line in logs), logs


# -- a full disk ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["ENOSPC", "torch zip writer", "safetensors"])
def test_disk_full_while_saving_names_the_checkpoint_and_size_and_leaves_no_partial_folder(failure, tmp_path,
                                                                                          monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    real_save, real_save_file = torch.save, safetensors.torch.save_file

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("step_0000004/optimizer.pt"):
            with open(f, "wb") as fh:
                fh.write(b"\0" * 4096)  # part of the file, then the disk is full
            if failure == "ENOSPC":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 4032")
        return real_save(obj, f, *args, **kwargs)

    def full_disk_safetensors(tensors, f, *args, **kwargs):
        if str(f).endswith("step_0000004/model.safetensors"):
            Path(f).write_bytes(b"\0" * 4096)
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        return real_save_file(tensors, f, *args, **kwargs)

    if failure == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", full_disk_safetensors)
    else:
        monkeypatch.setattr(torch, "save", full_disk)
    engine = _engine(tmp_path, "run", 4, save_every=2)
    with pytest.raises(TuneError) as error:
        engine.fit()
    trainable = [p for p in engine.model.parameters() if p.requires_grad]
    # fp32 weights + AdamW's exp_avg and exp_avg_sq + its fp32 step count per parameter
    needed = sum(3 * p.numel() * 4 + 4 for p in trainable)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"no space left to write checkpoint step_0000004 in {tmp_path / 'run' / 'checkpoints'} "
                              f"(it needs about {needed / 1e6:,.1f} MB")
    assert "the latest complete checkpoint step_0000002 is intact" in message and "train.resume=true" in message
    ckpts = tmp_path / "run" / "checkpoints"
    assert not list(ckpts.glob(".tmp-*")) and not (ckpts / "step_0000004").exists()
    assert (ckpts / "latest").read_text() == "step_0000002"


# -- one writer per run directory -----------------------------------------------------------------------------
def _hold_lock(run_dir):
    """A separate process that takes the run lock and waits (killed by the caller)."""
    code = ("import sys, time; from tune.run_lock import lock_run_dir; lock_run_dir(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_and_a_dead_holder_blocks_nothing(tmp_path):
    from tune.errors import ConfigError

    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        with pytest.raises(ConfigError) as refused:
            _engine(tmp_path, "run", 2).fit()
        assert str(refused.value).startswith(f"output_dir={run} is in use by another run (pid {holder.pid} on ")
        assert "wait for it to finish or choose another output_dir" in str(refused.value)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((run / ".lock").read_text())["pid"] == holder.pid  # the killed holder's file is still there
    _engine(tmp_path, "run", 2).fit()  # ... and blocks nothing
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def test_tune_run_into_a_directory_in_use_exits_2_writing_nothing(tmp_path, capsys):
    from tune.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    holder = _hold_lock(run)
    try:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text("".join(f"line {i}: the quick brown fox.\n" for i in range(200)))
        code = main(["run", "pretrain", "--config", "demo", f"output_dir={run}", f"data.corpus={corpus}",
                     f"data.cache_dir={tmp_path / 'cache'}", "overwrite=true", "train.max_steps=2",
                     "train.warmup_steps=0"])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"is in use by another run (pid {holder.pid}" in err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


# -- non-finite values ----------------------------------------------------------------------------------------
def test_infinite_lr_saves_no_checkpoint_and_says_none_exists(tmp_path):
    engine = _engine(tmp_path, "run", 4, lr=math.inf, save_every=1)
    with pytest.raises(TuneError) as error:
        engine.fit()
    assert str(error.value).startswith("step 1: the weights are not finite (NaN or Inf), so no checkpoint is saved; "
                                       "no checkpoint was saved yet in ")
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def test_skipping_nonfinite_steps_stops_after_max_skipped_steps_in_a_row(tmp_path):
    logs = []
    engine = _engine(tmp_path, "run", 20, logs, lr=math.inf, skip_nonfinite_steps=True, max_skipped_steps=10)
    with pytest.raises(TuneError) as error:
        engine.fit()
    # step 1 updates with an infinite lr; steps 2-11 have NaN losses and are skipped; no NaN weights are saved
    assert str(error.value).startswith("loss nan at step 11: 10 steps in a row skipped (train.max_skipped_steps=10), "
                                       "stopping; no checkpoint was saved yet in ")
    assert sum("batch skipped" in line for line in logs) == 10
    assert not list((tmp_path / "run" / "checkpoints").glob("step_*"))


def nan_from_step_3(model, batch):
    loss_sum, n = causal_lm_loss(model, batch)
    return (loss_sum * math.nan, n) if nan_from_step_3.step >= 3 else (loss_sum, n)


nan_from_step_3.step = 0  # the step being trained, set by the test


def test_stop_message_names_the_latest_checkpoint_and_warns_when_its_weights_are_huge(tmp_path):
    for huge in (False, True):
        engine = _engine(tmp_path, f"run{huge}", 6, loss_fn=nan_from_step_3, save_every=2)
        original = engine._train_step

        def step_counter(module, optimizer, step):
            nan_from_step_3.step = step
            out = original(module, optimizer, step)
            if huge and step == 2:  # weights that have run away, though still finite
                with torch.no_grad():
                    next(engine.model.parameters()).mul_(1e8)
            return out

        engine._train_step = step_counter
        with pytest.raises(TuneError) as error:
            engine.fit()
        message = str(error.value)
        assert message.startswith("loss nan at step 3; the weights were not updated; the latest checkpoint is "
                                  f"step_0000002 in {tmp_path / f'run{huge}' / 'checkpoints'}")
        assert ("may already have diverged" in message) == huge
        if huge:
            assert re.search(r"its weights reach max \|w\| = [\d.]+e\+\d+, so they may already have diverged", message)


def test_export_of_a_damaged_checkpoint_names_the_fault(reference, tmp_path):
    from tune.checkpoint import find_checkpoint

    _, saved = reference
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    _flip_bit_in_tensor_data(run / "checkpoints" / "step_0000004" / "model.safetensors")
    with pytest.raises(TuneError) as error:
        find_checkpoint(run)
    assert str(error.value) == (f"{run / 'checkpoints' / 'step_0000004'} is damaged: model.safetensors does not match "
                                "its checksum in the manifest (damaged content); choose another with --step N "
                                "(there are: step_0000002, step_0000004)")
    assert find_checkpoint(run, step=2).name == "step_0000002"
