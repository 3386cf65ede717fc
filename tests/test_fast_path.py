"""The engine's GPU fast path, checked on CPU: regional compilation, the optimizer choice, activation offload,
and the sync-free step (deferred reads of the step's sums, prefetched batches)."""

import copy
import json

import pytest
import torch

from tune.engine import Engine, TrainConfig, compile_blocks
from tune.losses import causal_lm_loss
from tune.models.gpt import GPT, config_from_preset
from conftest import ListSource


def _batch(width, seed, vocab=64, rows=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    targets = ids.clone()
    targets[:, : width // 3] = -100
    return {"input_ids": ids, "targets": targets}


def _fit(tmp_path, name, steps, model, **train):
    cfg = TrainConfig(**{"max_steps": len(steps), "micro_batch_size": 2, "warmup_steps": 1, "lr": 3e-3,
                         "eval_batches": 1, "eval_every": 0, "log_every": 1, "progress": False,
                         "mixed_precision": "no", **train})
    return Engine(cfg, tmp_path / name, model, ListSource(steps), log=lambda s: None).fit()


def _train_losses(result):
    return [r["loss"] for r in result.history if "loss" in r]


# -- 1. regional compilation ---------------------------------------------------------------------------------
COMPILE_TOL = dict(rel=1e-4, abs=1e-5)  # fp32: inductor may reorder a reduction, nothing more


def test_regional_compile_gives_the_eager_losses(tmp_path):
    """train.compile=true (each Block compiled) trains to the same fp32 losses as eager, over 2 steps (the one
    compiling test of the default run: ~20 s of CPU time)."""
    steps = [[_batch(16, s)] for s in range(2)]
    losses = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16, n_layer=2, n_embd=32))
        cfg = TrainConfig(max_steps=2, micro_batch_size=2, warmup_steps=1, lr=3e-3, eval_batches=1, eval_every=0,
                          log_every=1, progress=False, mixed_precision="no", compile=compile_)
        losses.append(_train_losses(Engine(cfg, tmp_path / name, model, ListSource(steps), log=lambda s: None).fit()))
        assert all(b._compiled_call_impl is not None for b in model.blocks) == compile_
    assert losses[1] == pytest.approx(losses[0], **COMPILE_TOL)
    assert len(losses[0]) == 2


def _hf_model(kind: str, lora: bool, checkpointing: bool):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=128,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                           bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                             max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=0))
    if checkpointing:
        from tune.hf import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    if lora:
        from tune.adapters import add_lora
        from tune.train_config import LoraSection

        if checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, LoraSection(r=4, alpha=8, dropout=0.0))
    model.train()
    return model


def _loss_and_grads(model, batch):
    loss, n = causal_lm_loss(model, batch)
    (loss / n).backward()
    loss = loss.detach()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.slow
@pytest.mark.parametrize("kind,lora,checkpointing", [("gpt2", False, False), ("llama", False, True),
                                                     ("gpt2", True, True), ("llama", True, False)])
def test_regional_compile_of_hf_and_lora_models(kind, lora, checkpointing):
    """Compiled decoder layers (HF GPT-2 / Llama, in a peft LoRA wrapper, under gradient checkpointing) give the
    eager loss and gradients in fp32."""
    eager = _hf_model(kind, lora, checkpointing)
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled) == 2
    for width in (24, 40):
        batch = _batch(width, width)
        loss, grads = _loss_and_grads(eager, batch)
        loss_c, grads_c = _loss_and_grads(compiled, batch)
        assert loss_c == pytest.approx(loss, **COMPILE_TOL)
        assert grads_c.keys() == grads.keys() and grads
        for k in grads:
            torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_varying_packed_widths_recompile_once_not_per_step(tmp_path):
    """8 steps of 8 different widths (as packed fine-tuning batches): the blocks compile at step 1, once more at
    the first width change (automatic dynamic shapes), and never again; the losses equal eager ones."""
    from torch._dynamo.utils import counters

    widths = [40, 52, 31, 64, 45, 27, 60, 33]
    steps = [[_batch(w, i)] for i, w in enumerate(widths)]
    graphs = []

    def counting_loss(model, batch):
        out = causal_lm_loss(model, batch)
        if torch.is_grad_enabled():  # a training forward (evaluations run without grad: another graph)
            graphs.append(counters["stats"]["unique_graphs"])  # graphs compiled so far, this forward's included
        return out

    torch._dynamo.reset()
    counters.clear()
    losses = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        graphs.clear()
        torch.manual_seed(0)
        model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=64, n_layer=2))
        cfg = TrainConfig(max_steps=8, micro_batch_size=2, warmup_steps=1, lr=3e-3, eval_batches=1, eval_every=0,
                          log_every=1, progress=False, mixed_precision="no", compile=compile_)
        result = Engine(cfg, tmp_path / name, model, ListSource(steps), counting_loss, log=lambda s: None).fit()
        losses.append(_train_losses(result))
    assert graphs[0] >= 1 and graphs[1] > graphs[0]  # compiled at step 1, recompiled once at step 2
    assert graphs[2:] == [graphs[1]] * 6  # no recompile afterwards
    assert losses[1] == pytest.approx(losses[0], **COMPILE_TOL)


# -- 2. train.optimizer ----------------------------------------------------------------------------------------
def test_8bit_adamw_follows_torch_adamw_and_resumes_exactly(tmp_path):
    """bitsandbytes' AdamW8bit (same groups, schedule, betas, eps, decay) stays within 1% of torch AdamW's losses
    over 10 steps, and a run killed inside step 8 resumes from its step-6 checkpoint to the very same losses,
    validation losses and weights."""
    from test_engine import Crash, _run

    reference, _ = _run(tmp_path, "adamw", 10)
    full, full_model = _run(tmp_path, "full", 10, optimizer="adamw_8bit")
    losses = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [loss for _, loss in losses(full.history)] == pytest.approx(
        [loss for _, loss in losses(reference.history)], rel=1e-2)
    assert losses(full.history) != losses(reference.history)  # it is another optimizer
    with pytest.raises(Crash):
        _run(tmp_path, "split", 10, save_every=3, crash_at=8, optimizer="adamw_8bit")
    resumed, resumed_model = _run(tmp_path, "split", 10, resume=True, optimizer="adamw_8bit")
    assert losses(resumed.history) == losses(full.history)
    vals = lambda rows: [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    assert vals(resumed.history) == vals(full.history)
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k


@pytest.mark.parametrize("first, then", [("adamw_8bit", "adamw"), ("adamw", "adamw_8bit")])
def test_resuming_with_another_optimizer_is_refused_in_one_line(tmp_path, first, then):
    """Another optimizer cannot load the checkpoint's optimizer state (it crashed with KeyError
    'param_groups.0.alpha'): refused, even with allow_schedule_change, and the run directory is left as it was."""
    from test_engine import _run

    from tune.errors import ConfigError

    _run(tmp_path, "run", 4, optimizer=first)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    for allow in (False, True):
        with pytest.raises(ConfigError, match=rf"holds the state of train.optimizer={first}, which "
                                              rf"train.optimizer={then} cannot load; resume with train.optimizer={first}"):
            _run(tmp_path, "run", 6, resume=True, optimizer=then, allow_schedule_change=allow)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("name", ["paged_adamw", "paged_adamw_8bit"])
def test_paged_optimizers_are_refused_on_cpu(tmp_path, name):
    from tune.errors import ConfigError

    model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16, n_layer=1))
    with pytest.raises(ConfigError, match=rf"^train.optimizer={name} pages .* needs a CUDA GPU .*use "
                                          r"train.optimizer=adamw or adamw_8bit$"):
        _fit(tmp_path, "run", [[_batch(16, 0)]], model, optimizer=name)


def test_optimizer_name_is_checked_without_torch():
    """`tune validate` checks train.optimizer without importing torch (a misspelt name gets a did-you-mean)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from tune.config import build_dataclass\n"
            "from tune.errors import ConfigError\n"
            "from tune.train_config import TrainConfig\n"
            "assert build_dataclass(TrainConfig, {'optimizer': 'paged_adamw_8bit'}, 'train').optimizer == 'paged_adamw_8bit'\n"
            "try:\n"
            "    build_dataclass(TrainConfig, {'optimizer': 'adamw8bit'}, 'train')\n"
            "except ConfigError as e:\n"
            "    print(e)\n"
            "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("train.optimizer: 'adamw8bit' is not one of") and "adamw_8bit" in done.stdout


# -- 3. train.activation_offload -------------------------------------------------------------------------------
def test_activation_offload_trains_to_the_same_metrics(tmp_path):
    """The engine with train.activation_offload=true (save_on_cpu hooks around every forward) logs the very same
    losses and gradient norms as without."""
    steps = [[_batch(16, s), _batch(16, 10 + s)] for s in range(3)]
    rows = []
    for name, offload in (("off", False), ("on", True)):
        torch.manual_seed(0)
        model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16, n_layer=2))
        result = _fit(tmp_path, name, steps, model, grad_accum_steps=2, activation_offload=offload)
        rows.append([(r["loss"], r["grad_norm"]) for r in result.history if "loss" in r])
    assert rows[0] == rows[1] and len(rows[0]) == 3


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_offload_keeps_loss_and_gradients_with_and_without_checkpointing(checkpointing):
    """HF GPT-2, with or without (non-reentrant) gradient checkpointing: the offloading hooks nest with the
    checkpoint's own and the loss and every gradient stay bit-identical."""
    from tune.engine import offload_activations

    model = _hf_model("gpt2", lora=False, checkpointing=checkpointing)
    batch = _batch(24, 1)
    loss, grads = _loss_and_grads(model, batch)
    with offload_activations(torch.device("cpu")):
        loss_o, n = causal_lm_loss(model, batch)
    (loss_o / n).backward()
    assert loss_o.item() == loss
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, grads[k]), k


# -- 4. a step without host-device syncs: deferred reads, on-device skipping, prefetched batches --------------
def _windows_run(tmp_path, name, max_steps, read_every=1, prefetch=True, crash_at=None, **train):
    """test_engine's resume setup (tiny GPT with dropout, TokenWindows), with the engine's read interval and
    prefetching set as given. Returns (result, model, engine)."""
    from test_engine import resume_setup

    engine, model = resume_setup(tmp_path, name, max_steps, crash_at, **{"log_every": 3, **train})
    engine.read_every, engine.prefetch = read_every, prefetch
    return engine.fit(), model, engine


def _timeless_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")} for r in rows]


def test_deferred_reads_and_prefetch_write_the_same_metrics_and_resume_exactly(tmp_path):
    """Reading the step results every 5 steps (log rows every 3, evaluations every 4, a checkpoint every 3) gives
    the same metrics.jsonl and weights as reading every step, and so does turning the batch prefetch off; a
    deferred run killed inside step 8 resumes from step 6 to the same metrics and weights."""
    _, per_step_model, _ = _windows_run(tmp_path, "per_step", 10, read_every=1, prefetch=False)
    _, deferred_model, _ = _windows_run(tmp_path, "deferred", 10, read_every=5, save_every=3)
    _, no_prefetch_model, _ = _windows_run(tmp_path, "no_prefetch", 10, read_every=1, prefetch=False, save_every=3)
    expected = _timeless_rows(tmp_path / "per_step")
    assert len([r for r in expected if "loss" in r]) == 4 and len([r for r in expected if "val_loss" in r]) == 3
    assert _timeless_rows(tmp_path / "deferred") == expected
    assert _timeless_rows(tmp_path / "no_prefetch") == expected
    from test_engine import Crash

    with pytest.raises(Crash):
        _windows_run(tmp_path, "split", 10, read_every=5, save_every=3, crash_at=8)
    _, resumed_model, _ = _windows_run(tmp_path, "split", 10, read_every=5, save_every=3, resume=True)
    assert _timeless_rows(tmp_path / "split") == expected
    for k, v in per_step_model.state_dict().items():
        for other in (deferred_model, no_prefetch_model, resumed_model):
            assert torch.equal(v, other.state_dict()[k]), k


def _poisoned(tmp_path, name, read_every, poison_at, skip, **train):
    """test_engine's NaN-loss run (a NaN loss at the steps in `poison_at`), read every `read_every` steps."""
    from test_engine import _poisoned_run

    engine, model, logs = _poisoned_run(tmp_path / name, skip=skip)
    engine.source.poison_at = None
    steps = set(poison_at)
    original = engine.source.step_batches
    engine.source.step_batches = lambda step, rank, world: [
        {**b, "poison": torch.ones(())} for b in original(step, rank, world)] if step in steps else original(
        step, rank, world)
    engine.cfg.__dict__.update(train)
    engine.read_every = read_every
    return engine, model, logs


def test_deferred_nan_step_is_skipped_on_device_and_reported_at_the_read(tmp_path):
    """A NaN loss at step 3 read only at step 5 (no log row before): fused AdamW's found_inf left the weights as
    they were after step 2 (steps 4 and 5 were not applied either), and the error names step 3, as the per-step
    check's does."""
    from tune.errors import TuneError

    errors, weights = [], []
    for read_every in (1, 5):
        engine, model, _ = _poisoned(tmp_path, f"read{read_every}", read_every, [3], skip=False, log_every=5,
                                     save_every=0)
        snapshot = {}
        original = engine._train_step

        def remember(module, optimizer, step, original=original, model=model, snapshot=snapshot):
            if step == 3:
                snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
            return original(module, optimizer, step)

        engine._train_step = remember
        with pytest.raises(TuneError) as info:
            engine.fit()
        errors.append(str(info.value).replace(str(engine.run_dir), "RUN"))
        assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
        weights.append(model.state_dict())
    assert errors[0] == errors[1] and errors[0].startswith("loss nan at step 3; the weights were not updated")


@pytest.mark.parametrize("poison_at,max_skipped", [([2, 4], 10), ([2, 3, 4], 2)])
def test_deferred_skipped_steps_are_counted_as_per_step(tmp_path, poison_at, max_skipped):
    """train.skip_nonfinite_steps with reads every 5 steps: the same log lines, skipped-step count, metrics rows and
    weights as per-step checks, and the same stop when max_skipped_steps NaN steps come in a row."""
    from tune.errors import TuneError

    outcomes = []
    for read_every in (1, 5):
        engine, model, logs = _poisoned(tmp_path, f"read{read_every}", read_every, poison_at, skip=True,
                                        max_skipped_steps=max_skipped, log_every=2, save_every=0)
        try:
            engine.fit()
            error = None
        except TuneError as e:
            error = str(e)
        error = error and error.replace(str(engine.run_dir), "RUN")
        outcomes.append((error, logs, engine.skipped_steps, _timeless_rows(engine.run_dir), model.state_dict()))
    (error, logs, skipped, rows, weights), other = outcomes
    assert (error, logs, skipped, rows) == other[:4]
    assert all(torch.equal(v, other[4][k]) for k, v in weights.items())
    assert skipped == 2 and (error is None) == (max_skipped == 10)
    if error is not None:
        assert error.startswith("loss nan at step 3: 2 steps in a row skipped (train.max_skipped_steps=2)")


@pytest.mark.slow
def test_packed_hf_batches_recompile_once_and_match_eager():
    """HF GPT-2 on collate_packed batches (position_ids restarting per example, a (B, 1, L, L) block-diagonal mask),
    6 steps of 6 widths: one compile, one recompile at the first change of width, none after; fp32 loss and
    gradients as eager."""
    from torch._dynamo.utils import counters

    from tune.packing import collate_packed

    eager = _hf_model("gpt2", lora=False, checkpointing=False)
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)

    def example(n):
        ids = torch.randint(1, 64, (n,), generator=g).tolist()
        return {"input_ids": ids, "targets": ids}

    graphs = []
    for lengths in ([30, 20], [41, 12], [25, 25, 9], [70], [33, 31], [50, 8]):
        batch = collate_packed([[example(n) for n in lengths], [example(10)]], None, 0)
        loss, grads = _loss_and_grads(eager, batch)
        loss_c, grads_c = _loss_and_grads(compiled, batch)
        graphs.append(counters["stats"]["unique_graphs"])
        assert loss_c == pytest.approx(loss, **COMPILE_TOL)
        for k in grads:
            torch.testing.assert_close(grads_c[k], grads[k], rtol=1e-4, atol=1e-5, msg=k)
    assert graphs == [1, 2, 2, 2, 2, 2]
