"""The shared engine: schedule, optimizer groups, per-token normalisation, checkpoints and exact resume."""

import json
import math

import numpy as np
import pytest
from pathlib import Path
import torch
import torch.nn.functional as F

from tune.data import TokenWindows
from tune.engine import Engine, TrainConfig, lr_lambda, param_groups
from tune.losses import causal_lm_loss
from tune.models.gpt import GPT, config_from_preset


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


class ListSource:
    """Fixed micro-batches per step, for exact comparisons."""

    def __init__(self, steps):
        self.steps = steps

    def step_batches(self, step, rank, world):
        return self.steps[step - 1]

    def val_batches(self, rank, world, limit):
        return self.steps[0][:limit]


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


def _run(tmp_path, name, max_steps, resume=False, save_every=0, crash_at=None):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, 5000).astype(np.uint16)
    torch.manual_seed(3)
    model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16, dropout=0.1))
    source = CrashingWindows(tokens[:4000], tokens[4000:], 16, micro_batch_size=4, grad_accum_steps=2, seed=7)
    source.crash_at = crash_at
    cfg = TrainConfig(max_steps=max_steps, micro_batch_size=4, grad_accum_steps=2, warmup_steps=3, lr=3e-3,
                      eval_every=4, eval_batches=2, log_every=1, save_every=save_every, resume=resume, progress=False)
    return Engine(cfg, tmp_path / name, model, source, log=lambda s: None).fit(), model


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
    assert {p.name for p in (ckpts / "step_0000004").iterdir()} == \
        {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_rank0.pt", "state.json"}
    assert json.loads((ckpts / "step_0000004" / "state.json").read_text())["step"] == 4
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
    with pytest.raises(TuneError, match="optimizer.pt: refusing to load"):
        _run(tmp_path, "run", 6, resume=True)
    assert not marker.exists()


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
