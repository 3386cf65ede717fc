"""The shared engine: schedule, optimizer groups, per-token normalisation, checkpoints and exact resume."""

import hashlib
import json
import math
import os
import signal

import numpy as np
import pytest
from pathlib import Path
import torch
import torch.nn.functional as F

from tune.data import TokenWindows
from tune.engine import Engine, TrainConfig, lr_lambda, param_groups
from tune.losses import causal_lm_loss
from tune.models.gpt import GPT, config_from_preset
from conftest import ListSource


def test_warmup_cosine_schedule_against_hand_values():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1.0, min_lr=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1)  # step 1 of 10 warmup steps
    assert f(9) == pytest.approx(1.0)  # end of warmup
    assert f(59) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert f(109) == pytest.approx(0.1)  # floor at the last step
    assert lr_lambda(TrainConfig(max_steps=10, warmup_steps=0, lr_schedule="linear", lr=1.0, min_lr=0.0))(4) == \
        pytest.approx(0.5)


def test_weight_decay_only_on_matrices_not_embeddings():
    model = GPT(config_from_preset("tiny-gpt2", tie_embeddings=False))
    decay, no_decay = param_groups(model, 0.1, decay_embeddings=False)
    decay_ids = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in decay_ids} == {n for n, p in model.named_parameters()
                                             if p.ndim == 2 and "emb" not in n}
    assert all(p.ndim == 1 for p in no_decay["params"] if "emb" not in names[id(p)])
    with_emb, _ = param_groups(model, 0.1, decay_embeddings=True)
    assert len(with_emb["params"]) == len(decay["params"]) + 2


def _masked_batch(ids, n_targets):
    targets = ids.clone()
    targets[:, : ids.shape[1] - n_targets] = -100
    return {"input_ids": ids, "targets": targets}


def test_accumulation_normalises_per_token(tmp_path):
    """Two micro-batches with 3 and 30 target tokens give the same update as one batch holding both."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 32))
    a, b = _masked_batch(ids[:1], 3), _masked_batch(ids[1:], 30)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    updated = []
    for batches, accum in (([a, b], 2), ([both], 1)):
        torch.manual_seed(1)
        model = GPT(config_from_preset("tiny-gpt2"))
        cfg = TrainConfig(max_steps=1, micro_batch_size=1, grad_accum_steps=accum, warmup_steps=0, lr=1e-2,
                          grad_clip=0.0, progress=False, eval_batches=1)
        Engine(cfg, tmp_path / f"run{accum}", model, ListSource([batches]), log=lambda s: None).fit()
        updated.append(model.state_dict())
    for k in updated[0]:
        assert torch.allclose(updated[0][k], updated[1][k], atol=1e-6), k


def test_loss_equals_plain_cross_entropy():
    torch.manual_seed(0)
    model = GPT(config_from_preset("tiny-gpt2"))
    batch = _masked_batch(torch.randint(0, 256, (2, 16)), 5)
    loss_sum, n = causal_lm_loss(model, batch)
    logits = model(batch["input_ids"])
    expected = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100, reduction="sum")
    assert n == 10 and torch.allclose(loss_sum, expected, atol=1e-4)


class Crash(Exception):
    pass


class CrashingWindows(TokenWindows):
    """Dies when asked for the batches of step `crash_at`, like a killed process."""

    crash_at = None

    def step_batches(self, step, rank, world):
        if step == self.crash_at:
            raise Crash(step)
        return super().step_batches(step, rank, world)


def resume_setup(tmp_path, name, max_steps, crash_at=None, **train):
    """(Engine, model) of the resume tests: a tiny GPT with dropout on TokenWindows that can crash inside a step."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, 5000).astype(np.uint16)
    torch.manual_seed(3)
    model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16, dropout=0.1))
    source = CrashingWindows(tokens[:4000], tokens[4000:], 16, micro_batch_size=4, grad_accum_steps=2, seed=7)
    source.crash_at = crash_at
    # one intra-op thread: train.num_threads=0 picks the idle cores at start, which on a busy machine can differ
    # between the runs compared here, and a float32 sum over 2 threads rounds differently from one over 1
    cfg = TrainConfig(**{"max_steps": max_steps, "micro_batch_size": 4, "grad_accum_steps": 2, "warmup_steps": 3,
                         "lr": 3e-3, "eval_batches": 2, "eval_every": 4, "log_every": 1, "progress": False,
                         "num_threads": 1, **train})
    return Engine(cfg, tmp_path / name, model, source, log=lambda s: None), model


def _run(tmp_path, name, max_steps, resume=False, save_every=0, crash_at=None, **train):
    engine, model = resume_setup(tmp_path, name, max_steps, crash_at, save_every=save_every, resume=resume, **train)
    return engine.fit(), model


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full, full_model = _run(tmp_path, "full", 10)
    with pytest.raises(Crash):  # checkpoints at steps 3 and 6, dies inside step 8
        _run(tmp_path, "split", 10, save_every=3, crash_at=8)
    resumed, resumed_model = _run(tmp_path, "split", 10, resume=True)
    losses = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert losses(resumed.history) == losses(full.history)
    vals = lambda rows: [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert vals(resumed.history) == vals(full.history)
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k


def test_run_directory_contents(tmp_path):
    result, _ = _run(tmp_path, "run", 4, save_every=2)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000004"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000004"]
    files = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_rank0.pt", "state.json"}
    assert {p.name for p in (ckpts / "step_0000004").iterdir()} == files | {"manifest.json"}
    assert json.loads((ckpts / "step_0000004" / "state.json").read_text())["step"] == 4
    manifest = json.loads((ckpts / "step_0000004" / "manifest.json").read_text())
    assert manifest["step"] == 4 and set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        content = (ckpts / "step_0000004" / name).read_bytes()
        assert entry == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert (run / "report.png").stat().st_size > 1000
    assert any((run / "tensorboard").iterdir())
    assert not list(ckpts.glob(".tmp*"))


def test_checkpoint_rotation_keeps_n(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, 3000).astype(np.uint16)
    model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16))
    source = TokenWindows(tokens[:2000], tokens[2000:], 16, 2, 1, seed=0)
    cfg = TrainConfig(max_steps=5, micro_batch_size=2, save_every=1, keep_checkpoints=2, eval_every=0, progress=False)
    Engine(cfg, tmp_path, model, source, log=lambda s: None).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000004", "step_0000005"]


class _Payload:
    """Unpickling this would create a marker file (stand-in for arbitrary code in a planted pickle)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_planted_pickle_in_a_checkpoint_is_refused_not_executed(tmp_path):
    import pickle

    from tune.errors import TuneError

    _run(tmp_path, "run", 4, save_every=2)
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "pwned"
    with open(latest / "optimizer.pt", "wb") as f:
        pickle.dump({"state": _Payload(marker)}, f)
    _update_manifest(latest)  # as whoever planted it could
    with pytest.raises(TuneError, match="optimizer.pt: refusing to load"):
        _run(tmp_path, "run", 4, resume=True)
    assert not marker.exists()


def _update_manifest(checkpoint):
    from tune.checkpoint import write_manifest

    files = [f for f in checkpoint.iterdir() if f.name != "manifest.json"]
    write_manifest(checkpoint, json.loads((checkpoint / "state.json").read_text())["step"], files)


class PoisonedWindows(TokenWindows):
    """Marks the batches of step `poison_at`; `poisoned_loss` turns their loss into NaN."""

    poison_at = None

    def step_batches(self, step, rank, world):
        batches = super().step_batches(step, rank, world)
        if step == self.poison_at:
            batches = [{**b, "poison": torch.ones(())} for b in batches]
        return batches


def poisoned_loss(model, batch):
    loss_sum, n = causal_lm_loss(model, batch)
    return (loss_sum * float("nan"), n) if "poison" in batch else (loss_sum, n)


def _poisoned_run(tmp_path, skip: bool):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, 5000).astype(np.uint16)
    torch.manual_seed(3)
    model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16))
    source = PoisonedWindows(tokens[:4000], tokens[4000:], 16, micro_batch_size=4, grad_accum_steps=2, seed=7)
    source.poison_at = 3
    cfg = TrainConfig(max_steps=5, micro_batch_size=4, grad_accum_steps=2, warmup_steps=1, eval_every=0,
                      eval_batches=1, log_every=1, save_every=2, skip_nonfinite_steps=skip, progress=False)
    logs = []
    engine = Engine(cfg, tmp_path / "run", model, source, loss_fn=poisoned_loss, log=logs.append)
    return engine, model, logs


def test_nan_loss_stops_before_the_update_naming_the_step(tmp_path):
    from tune.errors import TuneError

    engine, model, _ = _poisoned_run(tmp_path, skip=False)
    snapshot = {}

    original = engine._train_step

    def remember(module, optimizer, step):
        if step == 3:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
        return original(module, optimizer, step)

    engine._train_step = remember
    with pytest.raises(TuneError, match="loss nan at step 3; the weights were not updated"):
        engine.fit()
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())  # no NaN update
    assert engine.checkpointer.latest().name == "step_0000002"  # the last good checkpoint is kept


def test_skip_nonfinite_steps_skips_the_bad_batch_and_finishes(tmp_path):
    engine, model, logs = _poisoned_run(tmp_path, skip=True)
    result = engine.fit()
    assert result.step == 5 and engine.skipped_steps == 1
    assert any("step 3: loss nan; batch skipped" in line for line in logs)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_out_of_memory_says_what_to_try(tmp_path):
    from tune.errors import TuneError

    engine, _, _ = _poisoned_run(tmp_path, skip=False)

    def oom(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine.module.loss_fn = oom
    with pytest.raises(TuneError, match=r"out of memory at step 1 .*train.micro_batch_size=2 train.grad_accum_steps=4"
                                        r".*gradient_checkpointing=true"):
        engine.fit()


# -- metrics rows: window means and counts that survive a resume ----------------------------------------
def _rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def loss_with_double(model, batch):
    """causal_lm_loss plus an extra sum (twice the loss), as distillation logs its KD and CE parts."""
    loss_sum, n = causal_lm_loss(model, batch)
    return loss_sum, n, {"double": 2 * loss_sum.detach()}


def test_log_row_is_the_token_weighted_mean_of_its_window(tmp_path):
    torch.manual_seed(0)
    n_targets = [3, 30, 7, 16, 1, 9, 12]  # per step: unequal, so a plain mean of step losses would differ
    steps = [[_masked_batch(torch.randint(0, 256, (1, 32)), n)] for n in n_targets]
    rows = {}
    for log_every in (1, 3):
        torch.manual_seed(1)
        model = GPT(config_from_preset("tiny-gpt2"))
        cfg = TrainConfig(max_steps=7, micro_batch_size=1, warmup_steps=0, lr=1e-2, eval_every=0, eval_batches=1,
                          log_every=log_every, progress=False)
        Engine(cfg, tmp_path / f"log{log_every}", model, ListSource(steps), loss_fn=loss_with_double,
               log=lambda s: None).fit()
        rows[log_every] = {r["step"]: r for r in _rows(tmp_path / f"log{log_every}") if "loss" in r}
    per_step, windows = rows[1], rows[3]
    assert sorted(windows) == [3, 6, 7]
    for end, window in ((3, [1, 2, 3]), (6, [4, 5, 6]), (7, [7])):
        n = sum(n_targets[s - 1] for s in window)
        expected = sum(per_step[s]["loss"] * n_targets[s - 1] for s in window) / n
        assert windows[end]["loss"] == pytest.approx(expected, rel=1e-9)
        assert windows[end]["double"] == pytest.approx(2 * expected, rel=1e-9)
        assert windows[end]["grad_norm"] == pytest.approx(np.mean([per_step[s]["grad_norm"] for s in window]), rel=1e-9)
        assert windows[end]["tokens"] == per_step[end]["tokens"] == 32 * end
    assert windows[3]["loss"] != pytest.approx(np.mean([per_step[s]["loss"] for s in (1, 2, 3)]), rel=1e-3)


def test_resumed_tokens_and_window_means_equal_the_uninterrupted_run(tmp_path):
    """Checkpoint at step 4, where the last metrics row is a validation row and a log window is half done."""
    kw = dict(log_every=3, eval_every=2)
    full, _ = _run(tmp_path, "full", 10, **kw)
    with pytest.raises(Crash):
        _run(tmp_path, "split", 10, save_every=4, crash_at=7, **kw)
    assert [r.get("val_loss") is not None for r in _rows(tmp_path / "split") if r["step"] <= 4][-1]
    _run(tmp_path, "split", 10, save_every=4, resume=True, **kw)
    timeless = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]
    assert timeless(_rows(tmp_path / "split")) == timeless(_rows(tmp_path / "full"))
    assert [r["tokens"] for r in _rows(tmp_path / "split") if "tokens" in r] == [8 * 16 * s for s in (3, 6, 9, 10)]


# -- keep_best and report.png ---------------------------------------------------------------------------
def _scripted_val_losses(monkeypatch, by_step: dict):
    """Engine.evaluate returns by_step[step] (the step being evaluated) instead of measuring."""
    monkeypatch.setattr(Engine, "evaluate", lambda self, module: (by_step[self._eval_step], {}))


def test_keep_best_keeps_the_lowest_val_loss_through_rotation_and_resume(tmp_path, monkeypatch):
    _scripted_val_losses(monkeypatch, {1: 3.0, 2: 2.0, 3: 2.5, 4: 2.1, 5: 2.2})
    ckpts = tmp_path / "run" / "checkpoints"
    with pytest.raises(Crash):  # saves at 2 (best) and 3, dies in step 4
        _run(tmp_path, "run", 5, save_every=3, crash_at=4, eval_every=1, keep_best=True, keep_checkpoints=1)
    assert (ckpts / "best").read_text() == "step_0000002"
    state = json.loads((ckpts / "step_0000003" / "state.json").read_text())
    assert (state["best_val_loss"], state["best_step"]) == (2.0, 2)
    # resumed from step 3: 2.1 at step 4 is not below the best so far (2.0, kept in state.json)
    _run(tmp_path, "run", 5, save_every=3, resume=True, eval_every=1, keep_best=True, keep_checkpoints=1)
    assert (ckpts / "best").read_text() == "step_0000002"
    assert (ckpts / "latest").read_text() == "step_0000005"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000005"]  # rotation kept it


def test_keep_best_saves_at_a_new_best_between_save_steps(tmp_path, monkeypatch):
    _scripted_val_losses(monkeypatch, {2: 3.0, 4: 2.5, 6: 2.7, 8: 1.5, 9: 1.6})
    _run(tmp_path, "run", 9, eval_every=2, keep_best=True, keep_checkpoints=1)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "best").read_text() == "step_0000008"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000008", "step_0000009"]
    _run(tmp_path, "plain", 9, eval_every=2)
    assert not (tmp_path / "plain" / "checkpoints" / "best").exists()


class InterruptingWindows(TokenWindows):
    def step_batches(self, step, rank, world):
        if step == 3:
            raise KeyboardInterrupt
        return super().step_batches(step, rank, world)


def test_report_is_written_at_each_evaluation_and_on_ctrl_c(tmp_path):
    with pytest.raises(Crash):  # a crash after the evaluation of step 2: the report of steps 1-2 is there
        _run(tmp_path, "crashed", 10, crash_at=3, eval_every=2)
    assert (tmp_path / "crashed" / "report.png").stat().st_size > 1000

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, 3000).astype(np.uint16)
    model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16))
    source = InterruptingWindows(tokens[:2000], tokens[2000:], 16, 2, 1, seed=0)
    cfg = TrainConfig(max_steps=10, micro_batch_size=2, eval_every=0, log_every=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        Engine(cfg, tmp_path / "interrupted", model, source, log=lambda s: None).fit()
    assert (tmp_path / "interrupted" / "report.png").stat().st_size > 1000
    assert (tmp_path / "interrupted" / "checkpoints" / "latest").read_text() == "step_0000002"


# -- through the pretrain recipe: resume checks, config.yaml, tune export --best -------------------------
def _pretrain(tmp_path, *overrides):
    from recipes.pretrain import PretrainConfig, run
    from tune.config import load_config

    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    base = [f"output_dir={tmp_path / 'run'}", f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
            "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.max_steps=4",
            "train.micro_batch_size=4", "train.warmup_steps=1", "train.save_every=2", "train.eval_every=2",
            "train.eval_batches=1", "train.log_every=1", "train.progress=false", "train.mixed_precision=no",
            "sample.max_new_tokens=2", "export=false"]
    return run(load_config(PretrainConfig, "demo", base + list(overrides)))


def test_resume_refuses_a_schedule_change_and_leaves_config_yaml_alone(tmp_path, capsys):
    from tune.errors import ConfigError

    _pretrain(tmp_path)
    config_yaml = (tmp_path / "run" / "config.yaml").read_bytes()
    state_file = tmp_path / "run" / "checkpoints" / "step_0000004" / "state.json"
    for old_checkpoint in (False, True):
        if old_checkpoint:  # written before state.json kept the schedule: the run's config.yaml says
            state = json.loads(state_file.read_text())
            del state["schedule"]
            state_file.write_text(json.dumps(state))
        with pytest.raises(ConfigError) as refused:
            _pretrain(tmp_path, "train.resume=true", "train.max_steps=8", "train.lr=1e-3", "seed=1")
        message = str(refused.value)
        assert "\n" not in message
        assert "train.max_steps 4 -> 8" in message and "train.lr 0.002 -> 0.001" in message
        assert "seed 1337 -> 1" in message and "train.allow_schedule_change=true" in message
        assert "min_lr" not in message and "global batch" not in message
        assert (tmp_path / "run" / "config.yaml").read_bytes() == config_yaml
    # the same global batch split differently is no change
    capsys.readouterr()
    _pretrain(tmp_path, "train.resume=true", "train.micro_batch_size=2", "train.grad_accum_steps=2")
    assert "allow_schedule_change" not in capsys.readouterr().out

    result = _pretrain(tmp_path, "train.resume=true", "train.max_steps=8", "train.lr=1e-3",
                       "train.allow_schedule_change=true")
    assert "the schedule changes from step 5: train.max_steps 4 -> 8, train.lr 0.002 -> 0.001" in capsys.readouterr().out
    assert result.step == 8
    lr = {r["step"]: r["lr"] for r in result.history if "lr" in r}  # the lr each step used
    new = lr_lambda(TrainConfig(max_steps=8, lr=1e-3, min_lr=2e-4, warmup_steps=1))
    assert lr[5] == pytest.approx(1e-3 * new(4)) and lr[8] == pytest.approx(2e-4)  # the new lr and schedule
    assert "max_steps: 8" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_run_that_fails_before_training_leaves_no_directory(tmp_path):
    from tune.errors import DataError

    with pytest.raises(DataError, match="corpus too small"):
        _pretrain(tmp_path, "model.block_size=100000")
    assert not (tmp_path / "run").exists()


def test_export_best_writes_the_best_checkpoint(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file

    from tune.cli import main

    _scripted_val_losses(monkeypatch, {2: 2.0, 4: 2.5, 6: 3.0})
    _pretrain(tmp_path, "train.max_steps=6", "train.save_every=0", "train.keep_best=true", "train.keep_checkpoints=1")
    assert main(["export", str(tmp_path / "run"), "--best", "--out", str(tmp_path / "best")]) == 0
    assert main(["export", str(tmp_path / "run"), "--step", "2", "--out", str(tmp_path / "step2")]) == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "last")]) == 0
    best, step2, last = (load_file(tmp_path / d / "model.safetensors") for d in ("best", "step2", "last"))
    assert all(torch.equal(best[k], step2[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)

    _pretrain(tmp_path, "output_dir=" + str(tmp_path / "plain"), "train.max_steps=2")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "plain"), "--best"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no best checkpoint" in err and "train.keep_best=true" in err


@pytest.mark.parametrize("requested,cores,processes,omp_env,busy,expected", [
    (0, 2, 1, None, 0.0, (2, "auto")),  # a quiet 2-core machine: both cores
    (0, 2, 2, None, 0.0, (1, "auto")),  # 2 processes x 1 thread
    (0, 16, 3, None, 0.0, (5, "auto")),  # 3 x 5 <= 16
    (0, 2, 1, None, 0.9, (1, "auto")),  # cores busy with other work: 1 thread, never 0
    (0, 8, 1, None, 0.5, (4, "auto")),  # half of 8 cores idle
    (0, 8, 2, None, 0.25, (3, "auto")),  # 6 idle cores over 2 processes
    (0, 2, 4, None, 0.0, (1, "auto")),  # more processes than cores: still 1 each
    (0, 8, 1, "3", 0.9, (3, "OMP_NUM_THREADS")),  # the user's OMP_NUM_THREADS is respected
    (0, 8, 1, "6,2", 0.0, (6, "OMP_NUM_THREADS")),  # nested OMP list: the outer level
    (0, 8, 1, "x", 0.0, (8, "auto")),  # not a number: ignored
    (5, 2, 2, "1", 0.9, (5, "train.num_threads")),  # the config key wins over everything
])
def test_choose_num_threads_hand_values(requested, cores, processes, omp_env, busy, expected):
    from tune.engine import choose_num_threads

    assert choose_num_threads(requested, cores, processes, omp_env, busy) == expected


def test_num_threads_must_not_be_negative():
    from tune.errors import ConfigError

    with pytest.raises(ConfigError, match="train.num_threads must be >= 0"):
        TrainConfig(num_threads=-1)


def test_train_num_threads_reaches_torch_in_a_recipe_run(tmp_path, monkeypatch, capsys):
    from recipes.pretrain import PretrainConfig, run
    from tune.config import load_config

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the config key overrides the environment
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200, encoding="utf-8")
    cfg = load_config(PretrainConfig, "demo", [
        f"output_dir={tmp_path / 'run'}", f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
        "model.n_layer=1", "model.n_embd=32", "model.block_size=16", "train.max_steps=2", "train.eval_every=0",
        "train.eval_batches=1", "train.progress=false", "sample.max_new_tokens=1", "export=false",
        "train.num_threads=3"])
    before = torch.get_num_threads()
    try:
        run(cfg)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert "threads: 3 intra-op per process (train.num_threads=3; 1 process, " in out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_update_saves_that_steps_weights_under_its_number(tmp_path, signum):
    """A signal that arrives inside optimizer.step (between parameter groups, or after the update but before the
    step is counted) used to stop the run there: the checkpoint then held step N's weights labelled N - 1, and the
    resume was not exact. Now the update and the step count change together."""
    from safetensors.torch import load_file

    def run(name, interrupt_at=None):
        torch.manual_seed(0)
        model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16))
        g = torch.Generator().manual_seed(1)
        steps = [[{"input_ids": (x := torch.randint(0, 64, (2, 17), generator=g))[:, :-1], "targets": x[:, 1:]}]
                 for _ in range(5)]
        cfg = TrainConfig(max_steps=5, micro_batch_size=2, lr=1e-2, warmup_steps=0, eval_every=0, eval_batches=1,
                          save_every=1, keep_checkpoints=10, progress=False)
        engine = Engine(cfg, tmp_path / name, model, ListSource(steps), log=lambda s: None)
        if interrupt_at is not None:
            calls = {"n": 0}
            update = engine.optimizer.step

            def step_then_signal(*args, **kwargs):
                out = update(*args, **kwargs)
                calls["n"] += 1
                if calls["n"] == interrupt_at:
                    signal.raise_signal(signum)  # arrives after the weights moved, before the step is counted
                return out

            engine.optimizer.step = step_then_signal
        return engine.fit()

    run("full")
    with pytest.raises(KeyboardInterrupt):
        run("stopped", interrupt_at=3)
    checkpoints = tmp_path / "stopped" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == [f"step_{i:07d}" for i in (1, 2, 3)]
    saved = load_file(checkpoints / "step_0000003" / "model.safetensors")
    reference = load_file(tmp_path / "full" / "checkpoints" / "step_0000003" / "model.safetensors")
    assert all(torch.equal(saved[k], reference[k]) for k in reference)


def test_save_at_end_false_writes_no_final_checkpoint(tmp_path):
    """Benchmarks time-cap their runs: Engine.save_at_end=False skips only the end-of-run checkpoint."""
    g = torch.Generator().manual_seed(1)
    steps = [[{"input_ids": (x := torch.randint(0, 64, (2, 17), generator=g))[:, :-1], "targets": x[:, 1:]}]
             for _ in range(4)]
    cfg = TrainConfig(max_steps=4, micro_batch_size=2, warmup_steps=0, eval_every=0, eval_batches=1, save_every=3,
                      progress=False)
    engine = Engine(cfg, tmp_path / "run", GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16)),
                    ListSource(steps), log=lambda s: None)
    engine.save_at_end = False
    assert engine.fit().step == 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_0000003"]
