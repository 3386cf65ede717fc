"""The engine's GPU fast path, checked on CPU: regional compilation, the optimizer choice, activation offload,
and the sync-free step (deferred reads of the step's sums, prefetched batches)."""

import copy
import json

import pytest
import torch

from tune.engine import Engine, TrainConfig, compile_blocks
from tune.losses import causal_lm_loss
from tune.models.gpt import GPT, config_from_preset


class ListSource:
    """Fixed micro-batches per step, for exact comparisons."""

    def __init__(self, steps):
        self.steps = steps

    def step_batches(self, step, rank, world):
        return self.steps[step - 1]

    def val_batches(self, rank, world, limit):
        return self.steps[0][:limit]


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
    """train.compile=true (each Block compiled) trains to the same fp32 losses as eager, over 2 steps."""
    steps = [[_batch(16, s)] for s in range(2)]
    losses = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=16, n_layer=2, n_embd=32))
        losses.append(_train_losses(_fit(tmp_path, name, steps, model, compile=compile_)))
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
        graphs.append(counters["stats"]["unique_graphs"])  # graphs compiled so far, this step's forward included
        return out

    torch._dynamo.reset()
    counters.clear()
    losses = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        model = GPT(config_from_preset("tiny-gpt2", vocab_size=64, block_size=64, n_layer=2))
        cfg = TrainConfig(max_steps=8, micro_batch_size=2, warmup_steps=1, lr=3e-3, eval_batches=1, eval_every=0,
                          log_every=1, progress=False, mixed_precision="no", compile=compile_)
        result = Engine(cfg, tmp_path / name, model, ListSource(steps), counting_loss, log=lambda s: None).fit()
        losses.append(_train_losses(result))
    train_graphs = graphs[8:16]
    assert train_graphs[0] >= 1 and train_graphs[1] > train_graphs[0]  # compiled at step 1, recompiled once at step 2
    assert train_graphs[2:] == [train_graphs[1]] * 6  # no recompile afterwards
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
    assert float(loss_o) == loss
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, grads[k]), k
