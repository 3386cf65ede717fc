"""tune/losses.py: the fused linear + cross-entropy and the chunked distillation sums against full-logits references
(values and gradients), and what they keep for the backward (bytes saved by autograd, counted with
saved_tensors_hooks: the fused loss keeps gradients of O(N*D + V*D), never the O(N*V) logits)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tune.losses import IGNORE_INDEX, causal_lm_loss, chunked_ce_sum, chunked_kd_sums, fused_linear_ce_sum, kd_sums


class SubclassedLinear(nn.Linear):
    """Not fusable (fusable_head wants nn.Linear itself): chunked_ce_sum takes its autograd path, which keeps every
    chunk's logits for the backward, like the loss before the fused one."""


def saved_bytes(fn):
    """(fn(), bytes of the tensors autograd saved for the backward while fn ran)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def batch(seed=0, B=3, T=11, D=16, V=50, masked=4):
    torch.manual_seed(seed)
    hidden = torch.randn(B, T, D, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    targets[:, :masked] = IGNORE_INDEX  # a prompt: no loss there
    return hidden, targets


def full_logits_ce(hidden, head, targets):
    """The reference: full (B*T, V) logits, F.cross_entropy with ignore_index."""
    logits = head(hidden).float()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


# -- fused linear + cross-entropy -------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 1000])  # 5 divides none of the 21 target positions evenly
@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_and_grads_equal_full_logits_cross_entropy(chunk_size, bias):
    hidden, targets = batch()
    head = nn.Linear(16, 50, bias=bias)
    params = [hidden, *head.parameters()]
    loss, n = chunked_ce_sum(hidden, head, targets, chunk_size)
    ref = full_logits_ce(hidden, head, targets)
    assert n.item() == 21
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert loss.grad_fn.name() == "FusedLinearCrossEntropyBackward"
    # the backward scales the stored gradients by the incoming one (the engine divides by the token count)
    got_grads = grads(loss * 0.37, params)
    for got, want in zip(got_grads, grads(ref * 0.37, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_grads[0][:, :4].abs().max() == 0  # masked positions get no gradient


def test_fused_loss_equals_the_autograd_path_it_replaces():
    hidden, targets = batch(1)
    head, other = nn.Linear(16, 50), SubclassedLinear(16, 50)
    other.load_state_dict(head.state_dict())
    loss, _ = chunked_ce_sum(hidden, head, targets, 6)
    old, _ = chunked_ce_sum(hidden, other, targets, 6)
    assert old.grad_fn.name() != "FusedLinearCrossEntropyBackward"
    torch.testing.assert_close(loss, old)
    for got, want in zip(grads(loss, [hidden, *head.parameters()]), grads(old, [hidden, *other.parameters()])):
        torch.testing.assert_close(got, want)


def test_ignored_targets_inside_the_fused_function_count_nothing():
    """Under torch.compile every position is passed and -100 is handled inside the chunk loop."""
    hidden, targets = batch(2)
    head = nn.Linear(16, 50)
    h, t = hidden.flatten(0, 1), targets.flatten()
    loss = fused_linear_ce_sum(h, head.weight, head.bias, t, chunk_size=7)
    ref = full_logits_ce(hidden, head, targets)
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads(loss, [hidden, *head.parameters()]), grads(ref, [hidden, *head.parameters()])):
        torch.testing.assert_close(got, want)


def test_compiled_loss_equals_eager():
    hidden, targets = batch(3)
    head = nn.Linear(16, 50, bias=False)

    def loss_of(h, t):
        return chunked_ce_sum(torch.tanh(h), head, t, 5)

    compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=True)
    got, want = compiled(hidden, targets), loss_of(hidden, targets)
    assert got[1].item() == want[1].item() == 21
    torch.testing.assert_close(got[0], want[0])
    for g, w in zip(grads(got[0], [hidden, head.weight]), grads(want[0], [hidden, head.weight])):
        torch.testing.assert_close(g, w)


def test_no_targets_gives_zero_loss_and_zero_grads():
    hidden, targets = batch(masked=11)
    head = nn.Linear(16, 50)
    loss, n = chunked_ce_sum(hidden, head, targets)
    assert n.item() == 0 and loss.item() == 0.0
    for g in grads(loss, [hidden, *head.parameters()]):
        assert g.abs().max() == 0


def test_without_grad_only_the_loss_is_computed():
    hidden, targets = batch(4)
    head = nn.Linear(16, 50)
    with torch.no_grad():
        loss, _ = chunked_ce_sum(hidden, head, targets, 4)
        ref = full_logits_ce(hidden, head, targets)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref)


def test_frozen_head_gets_no_weight_gradient_computed_or_stored():
    hidden, targets = batch(5, T=40, V=500)
    head = nn.Linear(16, 500).requires_grad_(False)  # as under LoRA
    (loss, _), stored = saved_bytes(lambda: chunked_ce_sum(hidden, head, targets, 16))
    n = 3 * 36
    assert stored < n * 16 * 4 + 3 * 40 * 8  # the hidden gradient and the target mask, no (V, D) gradient
    torch.testing.assert_close(grads(loss, [hidden])[0], grads(full_logits_ce(hidden, head, targets), [hidden])[0])


def test_bf16_autocast_matches_full_logits_and_returns_grads_in_each_inputs_dtype():
    """Logits in bf16 as nn.Linear gives them under autocast, log-sum-exp in fp32. Tolerance: the loss to 1e-4
    relative; gradients within 2% of their largest entry (the reference rounds the (V, D) weight gradient
    to bf16 once for the whole batch, the fused loss once per chunk before summing in fp32)."""
    hidden, targets = batch(6, T=30, V=300)
    head = nn.Linear(16, 300).to(torch.bfloat16)  # bf16 parameters, fp32 hidden states
    params = [hidden, *head.parameters()]
    with torch.autocast("cpu", torch.bfloat16):
        loss, _ = chunked_ce_sum(hidden, head, targets, 7)
        ref = full_logits_ce(hidden, head, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0)
    for got, want in zip(grads(loss, params), grads(ref, params)):
        assert got.dtype == want.dtype
        assert (got.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()


def test_tied_embeddings_get_the_head_gradient_once():
    from tune.models.config import config_from_preset
    from tune.models.gpt import GPT

    torch.manual_seed(7)
    config = config_from_preset("tiny-gpt2", vocab_size=97, block_size=32, n_layer=1, dropout=0.0)
    model = GPT(config)
    assert model.lm_head.weight is model.tok_emb.weight
    ids = torch.randint(0, 97, (2, 32))
    targets = torch.roll(ids, -1, 1)
    targets[:, :5] = IGNORE_INDEX
    params = list(model.parameters())
    loss, n = causal_lm_loss(model, {"input_ids": ids, "targets": targets})
    ref = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(loss, ref)
    for (name, _), got, want in zip(model.named_parameters(), grads(loss, params), grads(ref, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_peft_lora_on_an_hf_model_matches_the_models_own_loss():
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(8)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=120, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    model.eval()  # no dropout
    ids = torch.randint(0, 120, (2, 24))
    targets = torch.roll(ids, -1, 1)
    targets[:, :6] = IGNORE_INDEX
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss, _ = causal_lm_loss(model, {"input_ids": ids, "targets": targets})
    ref = F.cross_entropy(model(input_ids=ids).logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    torch.testing.assert_close(loss, ref)
    for got, want in zip(grads(loss, trainable), grads(ref, trainable)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_loss_saves_gradients_not_logits():
    """Saved for the backward: fused O(N*D + V*D); the autograd path and full logits O(N*V)."""
    N, D, V = 400, 16, 2000
    hidden, targets = batch(9, B=4, T=100, D=D, V=V, masked=0)
    head, other = nn.Linear(D, V), SubclassedLinear(D, V)
    _, fused = saved_bytes(lambda: chunked_ce_sum(hidden, head, targets, 64))
    _, chunked_autograd = saved_bytes(lambda: chunked_ce_sum(hidden, other, targets, 64))
    _, full = saved_bytes(lambda: full_logits_ce(hidden, head, targets))
    grads_bytes = (N * D + V * D + V) * 4
    assert grads_bytes <= fused <= grads_bytes + N * 8  # + the boolean target mask
    assert chunked_autograd >= N * V * 4 and full >= N * V * 4


# -- distillation ----------------------------------------------------------------------------------------
def kd_setup(seed=10, B=4, T=60, V=300, top_k=None):
    torch.manual_seed(seed)
    student_head, teacher_head = nn.Linear(16, V), nn.Linear(24, V + 8, bias=False)  # padded teacher vocab
    hidden, teacher_hidden = torch.randn(B, T, 16, requires_grad=True), torch.randn(B, T, 24)
    targets = torch.randint(0, V, (B, T))
    targets[:, :7] = IGNORE_INDEX
    mask = targets != IGNORE_INDEX
    cached = None
    if top_k:
        with torch.no_grad():
            cached = F.log_softmax(teacher_head(teacher_hidden[mask])[:, :V], -1).topk(top_k, dim=-1)
    return student_head, teacher_head, hidden, teacher_hidden, targets, mask, cached


@pytest.mark.parametrize("teacher", ["live", "cached"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"])
def test_chunked_kd_values_grads_and_saved_bytes(kind, teacher):
    V, chunk = 300, 16
    student_head, teacher_head, hidden, teacher_hidden, targets, mask, cached = kd_setup(
        top_k=20 if teacher == "cached" else None)
    args = dict(temperature=2.0, kind=kind, beta=0.3)
    if teacher == "live":
        args.update(teacher_hidden=teacher_hidden, teacher_head=teacher_head, vocab_size=V)
    else:
        args.update(cached=(cached.values, cached.indices))
    (kd, ce, n), stored = saved_bytes(lambda: chunked_kd_sums(hidden, student_head, targets, chunk_size=chunk, **args))

    def reference():
        logits = student_head(hidden[mask])
        if teacher == "live":
            with torch.no_grad():
                t_logits = teacher_head(teacher_hidden[mask])
            return kd_sums(logits, t_logits, targets[mask], 2.0, kind, 0.3, vocab_size=V)
        return kd_sums(logits, cached.values, targets[mask], 2.0, kind, 0.3, teacher_ids=cached.indices)

    (ref_kd, ref_ce), ref_stored = saved_bytes(reference)
    N = int(n)
    assert N == 4 * 53
    torch.testing.assert_close(kd, ref_kd)
    torch.testing.assert_close(ce, ref_ce)
    params = [hidden, *student_head.parameters()]
    for got, want in zip(grads(0.7 * kd + 0.3 * ce, params), grads(0.7 * ref_kd + 0.3 * ref_ce, params)):
        torch.testing.assert_close(got, want)
    # kept for the backward: the chunks' inputs (student hidden states; teacher hidden states or cached top-k),
    # and target ids, which the backward recomputes the logits from, and the boolean target mask: O(N * D)
    inputs = N * 16 * 4 + (N * 24 * 4 if teacher == "live" else cached.values.nbytes + cached.indices.nbytes) + N * 8
    assert stored == inputs + targets.numel()
    assert stored < N * V * 4 / 3 and ref_stored >= N * V * 4


def test_chunked_kd_without_grad_equals_with_grad():
    student_head, teacher_head, hidden, teacher_hidden, targets, mask, _ = kd_setup(11)
    args = dict(temperature=1.5, kind="forward_kl", beta=0.5, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                vocab_size=300, chunk_size=32)
    with_grad = chunked_kd_sums(hidden, student_head, targets, **args)
    with torch.no_grad():
        without = chunked_kd_sums(hidden, student_head, targets, **args)
    assert without[0].grad_fn is None
    torch.testing.assert_close(with_grad[0], without[0])
    torch.testing.assert_close(with_grad[1], without[1])


# -- train.ce_kernel -------------------------------------------------------------------------------------
def test_ce_kernel_liger_without_liger_is_a_one_line_validate_error(monkeypatch, capsys):
    import importlib.util

    from tune.cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else
                        real_find_spec(name, *a))
    assert main(["validate", "demo", "train.ce_kernel=liger"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.ce_kernel=liger needs Liger-Kernel" in err, err
    assert "pip install liger-kernel" in err and "train.ce_kernel=chunked" in err
    assert main(["validate", "demo", "train.ce_kernel=chunked"]) == 0
    assert main(["validate", "demo", "train.ce_kernel=fused"]) == 2
    assert "not one of ['chunked', 'liger']" in capsys.readouterr().err
    # with the recipe's own problems: listed together, not one hiding the other
    assert main(["validate", "demo", "train.ce_kernel=liger", "data.tokenizer_path=/no/such/tokenizer"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 problems in ") and "/no/such/tokenizer" in err and "needs Liger-Kernel" in err, err


def test_engine_picks_the_loss_from_ce_kernel(tmp_path):
    from tune.engine import Engine, TrainConfig, make_accelerator
    from tune.errors import ConfigError

    accelerator = make_accelerator("no")
    model = nn.Linear(2, 2)
    engine = Engine(TrainConfig(max_steps=1), tmp_path, model, source=None, accelerator=accelerator)
    assert engine.module.loss_fn is causal_lm_loss
    with pytest.raises(ConfigError, match="train.ce_kernel=liger runs on CUDA only and this run is on cpu; "
                                          "set train.ce_kernel=chunked"):
        Engine(TrainConfig(max_steps=1, ce_kernel="liger"), tmp_path, model, source=None, accelerator=accelerator)


def test_liger_parity_check_runs_on_cpu_with_liger_reported_skipped():
    """bench/ce_parity.py's liger_parity, which the GPU check calls on CUDA, at its CPU shape."""
    from bench.ce_parity import liger_parity

    result = liger_parity("cpu")
    assert result["ok"] and result["liger"].startswith("skipped: ")
    assert [(r["kernel"], r["precision"]) for r in result["rows"]] == [
        ("full logits", "fp32"), ("chunked", "fp32"), ("full logits", "bf16"), ("chunked", "bf16")]
    assert result["rows"][1]["grad_rel_err"]["weight"] < 1e-5
