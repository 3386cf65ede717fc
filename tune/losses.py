"""Training losses. Batches carry `targets` aligned with `input_ids`: targets[b, t] is the token the
model should predict at position t, or -100 where nothing is trained (prompt, padding)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tune.errors import TuneError

IGNORE_INDEX = -100


def hidden_and_head(model: nn.Module, batch: dict) -> tuple[torch.Tensor, nn.Module]:
    """Final hidden states and the output projection, for the native GPT, any HF causal LM, or a peft wrapper.

    Splitting the model here lets the loss project to the vocabulary only where a target exists:
    with prompt masking most positions need no logits at all.
    """
    if hasattr(model, "hidden_states") and hasattr(model, "output_embeddings"):  # native GPT
        mask, documents, positions = batch.get("attention_mask"), batch.get("document_ids"), batch.get("position_ids")
        if mask is not None and mask.dim() == 2:
            # right padding (collate_padded): causal attention never reaches it from a real token
            mask = None
        if mask is None and documents is None and positions is not None:
            documents = documents_from_positions(positions)
        return model.hidden_states(batch["input_ids"], position_ids=positions, document_ids=documents,
                                   attention_mask=mask), model.output_embeddings()
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    if "document_ids" in batch:
        kwargs.pop("attention_mask", None)
        mask = hf_document_mask(lm, batch["document_ids"])
        if mask is not None:
            kwargs["attention_mask"] = mask
    elif "attention_mask" in kwargs and kwargs["attention_mask"].dim() == 4:
        check_takes_4d_mask(lm)
        kwargs["attention_mask"] = dense_mask_for(lm, kwargs["attention_mask"])
    routed = model.training and getattr(lm.config, "output_router_logits", None) is not None  # an HF MoE
    if routed:
        kwargs["output_router_logits"] = True
    out = backbone(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    if routed:  # for with_router_losses (hf_router_losses), as the native MoE keeps its losses after a forward
        lm._tune_router_logits = out.router_logits
    return out[0], lm.get_output_embeddings()


def documents_from_positions(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document ids (B, L) for rows packed with position_ids only (mask_mode="position_ids"): a new example wherever
    the positions do not continue by 1, as transformers detects packing; None when no row restarts (plain causal)."""
    first = position_ids[:, :1] - 1
    documents = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    return documents if bool(documents[:, -1].any()) else None


def check_takes_4d_mask(lm: nn.Module) -> None:
    """TuneError unless the HF model builds its masks with transformers' mask interface (masking_utils), which
    passes a 4D mask / BlockMask through as given. Models that support none of sdpa, flex or flash attention
    (OpenAIGPTLMHeadModel in transformers 5) take only a 2D padding mask and would mis-broadcast a 4D one."""
    if not any(getattr(lm, f"_supports_{kind}", False) for kind in ("sdpa", "flex_attn", "flash_attn")):
        raise TuneError(f"{type(lm).__name__} takes only a 2D padding mask, so packed examples cannot be kept "
                        "apart; set data.packing=false")


def attention_of(lm: nn.Module) -> str:
    """The HF model's attention implementation (sdpa, eager, flex_attention, flash_attention_2, ...)."""
    return getattr(lm.config, "_attn_implementation", None) or "eager"


def hf_document_mask(lm: nn.Module, document_ids: torch.Tensor):
    """The attention_mask that keeps the packed examples of `document_ids` (B, L) apart in the HF model `lm`,
    for its attention implementation: flex_attention -> a BlockMask; flash_attention_* -> None (transformers
    then splits the rows at the position_ids restarts into variable-length sequences); eager -> the 4D additive
    float mask (eager adds it to the scores); sdpa and others -> the 4D bool mask (B, 1, L, L).
    TuneError for models that cannot take a 4D mask (check_takes_4d_mask)."""
    from tune.models.gpt import document_block_mask, document_dense_mask

    impl = attention_of(lm)
    if impl.startswith("flash_attention"):
        return None
    check_takes_4d_mask(lm)
    if impl == "flex_attention":
        return document_block_mask(document_ids)
    return dense_mask_for(lm, document_dense_mask(document_ids))


def dense_mask_for(lm: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """A 4D bool mask (B, 1, L, L), True = may attend, in the form the HF model `lm`'s attention applies as a mask:
    as it is for sdpa; as the additive float mask for eager (which adds the mask to the scores: a bool one would add
    0 / 1). TuneError for flex_attention, which also adds a 4D tensor mask to its scores (it needs document ids)."""
    impl = attention_of(lm)
    if impl == "flex_attention":
        raise TuneError(f"{type(lm).__name__} runs flex_attention, which cannot apply a dense (B, 1, L, L) mask; "
                        "use data.packed_attention=flex (document ids), or load the model with sdpa attention")
    if impl == "eager" and dense.dtype == torch.bool:
        dtype = lm.dtype if lm.dtype.is_floating_point else torch.float32
        return torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill(~dense, torch.finfo(dtype).min)
    return dense


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"  # without importing torch.distributed where it is absent


def fusable_head(head: nn.Module) -> bool:
    """Whether the fused loss can read `head` as plain `x @ weight.T + bias`: an nn.Linear itself (not a
    subclass such as a 4-bit or LoRA-wrapped layer, or a module FSDP shards on its own), without forward hooks,
    whose weight is a whole tensor (not a DTensor shard)."""
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return False
    return not any(_is_dtensor(p) for p in (head.weight, head.bias) if p is not None)


def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so one chunk's fp32 logits take about 256 MB (at least 256 positions): 1335 at a
    vocabulary of 50k, 2048 at 32k."""
    return max(256, 2 ** 26 // vocab_size)


def _linear_ce_chunks(hidden, weight, bias, targets, chunk_size: int, grads: tuple[bool, bool, bool], weights=None):
    """The summed cross-entropy of `hidden @ weight.T + bias` against `targets` (-100 rows count nothing), each row's
    term multiplied by `weights` (N,) when given, chunk by chunk, and (per `grads`: hidden, weight, bias) its gradients
    w.r.t. those inputs.

    Logits are computed in the autocast dtype when autocast is on (else hidden's dtype), as nn.Linear would,
    and the log-sum-exp in fp32. Weight and bias gradients accumulate in fp32 over the chunks; every
    gradient is returned in its input's dtype. Memory beyond the inputs and gradients: one chunk's logits.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    need_h, need_w, need_b = grads
    need_b = need_b and bias is not None
    with torch.autocast(device, enabled=False):
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, targets.numel(), chunk_size):
            h, t = hidden[start:start + chunk_size].to(dtype), targets[start:start + chunk_size]
            logits = F.linear(h, w, b).float()
            lse = torch.logsumexp(logits, -1)
            keep = (t != IGNORE_INDEX).float()
            if weights is not None:
                keep = keep * weights[start:start + chunk_size].float()
            safe_t = t.clamp(min=0)  # -100 rows gather some logit; `keep` zeroes their loss and gradient
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total = total + ((lse - picked) * keep).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum of CE)/d logits = softmax - one_hot(target), in place of the logits
            g = logits.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, safe_t[:, None], torch.full_like(picked[:, None], -1.0))
            g.mul_(keep[:, None])
            g_low = g.to(dtype)
            if need_h:
                grad_h[start:start + chunk_size] = g_low @ w
            if need_w:
                grad_w += g_low.t() @ h
            if need_b:
                grad_b += g.sum(0)
    return total, (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a linear projection (the LM head), computed chunk by chunk over positions with
    its gradients in the same pass, so no (N, V) tensor outlives its chunk; the backward only scales the
    stored gradients (hidden (N, D), weight (V, D), bias (V,)) by the incoming gradient. Inputs that need no
    gradient (a frozen head under LoRA) get none computed or stored."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, weights=None):
        total, grads = _linear_ce_chunks(hidden, weight, bias, targets, chunk_size, tuple(ctx.needs_input_grad[:3]),
                                         weights)
        ctx.save_for_backward(*grads)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
        return *grads, None, None, None


def fused_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        chunk_size: int | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over N positions of cross-entropy(hidden @ weight.T + bias, targets) (times `weights`), fp32 scalar.

    hidden (N, D), weight (V, D), bias (V,) or None, targets (N,) int64 with -100 for positions that count
    nothing, weights (N,) float or None (every position 1; constants, no gradient). Projects `chunk_size` positions at a time (default: default_chunk_size(V)) and, when autograd
    needs them, computes the gradients in the same pass (FusedLinearCrossEntropy): memory beyond inputs and
    gradients is one chunk's logits, whatever N. Without grad (evaluation) it computes the loss only.
    """
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    inputs = (hidden, weight) if bias is None else (hidden, weight, bias)
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        return FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, weights)
    return _linear_ce_chunks(hidden, weight, bias, targets, chunk_size, (False, False, False), weights)[0]


def chunked_ce_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int | None = None,
                   weights: torch.Tensor | None = None):
    """Sum of cross-entropy over the target positions (targets != -100) and their number: (fp32 scalar, int64
    scalar). hidden (B, T, D), targets (B, T); weights (B, T) float or None: each position's term is multiplied by
    its weight (e.g. 1 / the tokens of its sequence, for per-sequence means: tune.task_heads).

    A plain nn.Linear head (fusable_head) goes through fused_linear_ce_sum: only target positions are
    projected, `chunk_size` at a time, with the gradients computed chunk by chunk, so peak memory does not grow
    with vocabulary x tokens. Other heads (4-bit, LoRA-wrapped, sharded on their own by FSDP) are called
    chunk by chunk through autograd, which keeps every chunk's logits for the backward.
    """
    mask = targets != IGNORE_INDEX
    if torch.compiler.is_compiling():  # boolean selection has a data-dependent shape: pass every position
        h, t = hidden.flatten(0, -2), targets.flatten()
        w = None if weights is None else weights.flatten()
    else:
        h, t = hidden[mask], targets[mask]
        w = None if weights is None else weights[mask]
    if fusable_head(head):
        return fused_linear_ce_sum(h, head.weight, head.bias, t, chunk_size, w), mask.sum()
    chunk_size = chunk_size or 8192
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk_size):
        logits = head(h[start:start + chunk_size]).float()
        ce = F.cross_entropy(logits, t[start:start + chunk_size], reduction="none", ignore_index=IGNORE_INDEX)
        total = total + (ce if w is None else ce * w[start:start + chunk_size].float()).sum()
    return total, mask.sum()


def causal_lm_loss(model: nn.Module, batch: dict):
    """Summed next-token cross-entropy and the number of target tokens; for a native MoE GPT also its router losses
    (with_router_losses)."""
    hidden, head = hidden_and_head(model, batch)
    return with_router_losses(model, *chunked_ce_sum(hidden, head, batch["targets"]))


def with_router_losses(model: nn.Module, loss_sum: torch.Tensor, n_targets: torch.Tensor, extras: dict | None = None):
    """An engine loss (loss_sum, n_targets[, extras]) with the router losses of an MoE model added, after its forward
    (every loss function of the engine ends here, so no recipe drops them):
    - a native MoE GPT (tune.models.gpt.MoE): in training loss_sum + n_targets · (router_aux_coef · aux +
      router_z_coef · z), aux the per-layer Switch loss averaged over the MoE layers;
    - an HF MoE causal LM (Mixtral, Qwen-MoE, ... whose config has output_router_logits; hidden_and_head asked it for
      its router logits in training): loss_sum + n_targets · router_aux_loss_coef · aux, aux transformers' own
      load_balancing_loss_func over all layers' router logits (what its ForCausalLM adds), no z-loss.
    In eval mode loss_sum alone, so val_loss is the cross-entropy. Extras router_aux, router_z and expert_frac_<i>
    (each times n_targets, so the engine's per-token means are token-weighted averages over the micro-batches) join
    `extras`. A dense model: the inputs as given."""
    router = model.router_losses() if hasattr(model, "router_losses") else hf_router_losses(model)
    if router is None:
        return (loss_sum, n_targets) if extras is None else (loss_sum, n_targets, extras)
    n = n_targets.float()
    loss = loss_sum  # evaluation: the cross-entropy alone, comparable with a dense model's validation loss
    if model.training:
        loss = loss_sum + n * (router["aux_coef"] * router["aux"] + router["z_coef"] * router["z"])
    out = {**(extras or {}), "router_aux": (router["aux"] * n).detach(), "router_z": (router["z"] * n).detach()}
    out.update({f"expert_frac_{i}": f * n for i, f in enumerate(router["expert_fraction"])})
    return loss, n_targets, out


def hf_router_losses(model: nn.Module) -> dict | None:
    """The router terms of an HF MoE causal LM (or its peft wrapper) from the router logits hidden_and_head kept
    (training only): aux = transformers' load_balancing_loss_func (Switch loss pooled over layers, as
    MixtralForCausalLM computes it), z = 0, expert_fraction (n_experts,) = each expert's share of the top-k
    assignments, and the config's router_aux_loss_coef; None for a dense model or outside training."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    logits = getattr(lm, "_tune_router_logits", None)
    if logits is None:
        return None
    lm._tune_router_logits = None
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = lm.config
    experts, top_k = config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts, \
        config.num_experts_per_tok
    stacked = torch.cat([layer.float() for layer in logits])  # (layers·N, E)
    chosen = stacked.topk(top_k, dim=-1).indices.flatten()
    fraction = torch.bincount(chosen, minlength=experts).float() / chosen.numel()
    aux = load_balancing_loss_func(tuple(logits), experts, top_k)
    return {"aux": aux, "z": aux.new_zeros(()), "expert_fraction": fraction.detach(),
            "aux_coef": config.router_aux_loss_coef, "z_coef": 0.0}


def liger_loss_fn(device: torch.device):
    """causal_lm_loss through Liger-Kernel's fused linear cross-entropy (train.ce_kernel=liger), for a run on
    `device`. A head that is not a plain nn.Linear (fusable_head) and compiled code take chunked_ce_sum.
    Raises ConfigError unless liger_kernel is importable and the device is CUDA (its kernels are Triton)."""
    from tune.errors import ConfigError

    device = torch.device(device)
    if device.type != "cuda":
        raise ConfigError(f"train.ce_kernel=liger runs on CUDA only and this run is on {device.type}; "
                          "set train.ce_kernel=chunked")
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise ConfigError(f"train.ce_kernel=liger needs Liger-Kernel ({e}): pip install liger-kernel (or the "
                          "gpt-tune[liger] extra), or set train.ce_kernel=chunked") from None
    liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

    def loss_fn(model: nn.Module, batch: dict):
        hidden, head = hidden_and_head(model, batch)
        targets = batch["targets"]
        if not fusable_head(head) or torch.compiler.is_compiling():
            return with_router_losses(model, *chunked_ce_sum(hidden, head, targets))
        mask = targets != IGNORE_INDEX
        h, t = hidden[mask], targets[mask]
        if t.numel() == 0:  # Liger divides by the token count when it sizes its chunks
            return with_router_losses(model, fused_linear_ce_sum(h, head.weight, head.bias, t), mask.sum())
        return with_router_losses(model, liger(head.weight, h, t, head.bias).float(), mask.sum())

    return loss_fn


# -- knowledge distillation ------------------------------------------------------------------------
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str = "forward_kl",
               beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence (N,) between two distributions given as log-probs over the same support (N, S).
    `beta` is the mixing weight of the three mixture divergences (jsd's β, the skew KLs' α); the others ignore it.

    forward_kl       KL(p_teacher || p_student)  mode-covering; Hinton et al.'s distillation loss
    reverse_kl       KL(p_student || p_teacher)  mode-seeking
    jsd              beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m),  m = beta p_teacher + (1 - beta)
                     p_student (the generalized JSD of GKD, Agarwal et al. 2024; beta = 0.5: Jensen-Shannon); as in
                     GKD's reference implementation (TRL's GKDTrainer) beta = 0 is forward KL and beta = 1 reverse KL
    tvd              0.5 * sum |p_teacher - p_student|, total variation distance (in [0, 1]; bounded gradients)
    skew_forward_kl  KL(p_teacher || beta p_teacher + (1 - beta) p_student)  DistiLLM's α-skew KL (Ko et al.
                     2024, α = beta, 0.1 there): forward KL that stays finite where the student puts ~no mass
    skew_reverse_kl  KL(p_student || beta p_student + (1 - beta) p_teacher)  DistiLLM's α-skew reverse KL
    beta = 0 turns both skew KLs into the plain ones.
    """
    if kind == "forward_kl":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse_kl":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        if not 0 <= beta <= 1:
            raise ValueError(f"jsd needs 0 <= beta <= 1, got {beta}")
        if beta in (0, 1):
            return divergence(student_logp, teacher_logp, "forward_kl" if beta == 0 else "reverse_kl")
        mixture = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), 0)
        kl_t = (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)
        kl_s = (student_logp.exp() * (student_logp - mixture)).sum(-1)
        return beta * kl_t + (1 - beta) * kl_s
    if kind == "tvd":
        return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)
    if kind in ("skew_forward_kl", "skew_reverse_kl"):
        if not 0 <= beta < 1:
            raise ValueError(f"{kind} needs 0 <= alpha < 1, got {beta}")
        p, q = (teacher_logp, student_logp) if kind == "skew_forward_kl" else (student_logp, teacher_logp)
        if beta == 0:
            return (p.exp() * (p - q)).sum(-1)
        skewed = torch.logaddexp(p + math.log(beta), q + math.log(1 - beta))  # log(α p + (1 − α) q)
        return (p.exp() * (p - skewed)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def kd_sums(student_logits: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
            kind: str, beta: float, teacher_ids: torch.Tensor | None = None,
            vocab_size: int | None = None, tail: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of divergences, sum of cross-entropies) over N target positions, in fp32.

    student_logits (N, V_s). `teacher` is either the teacher's logits (N, V_t), compared on the first
    `vocab_size` ids (the shared tokenizer's; default min(V_s, V_t)), or, with `teacher_ids` (N, k), the teacher's
    cached top-k log-probs at temperature 1. Cached, with `tail` (default) both distributions are compared on k + 1
    buckets, the k ids and one bucket holding the rest of the mass (topk_with_tail): at T = 1 the divergence is then
    the exact divergence of those buckets, a lower bound on the full-vocabulary one (merging outcomes never
    raises an f-divergence), and equal to it when k covers the vocabulary; without `tail` both are renormalised over
    the k ids (the older approximation). Temperature scales the logits of both models before the divergence only.
    """
    student_logits = student_logits.float()
    if teacher_ids is not None and tail and teacher_ids.shape[-1] < student_logits.shape[-1]:
        # the tail bucket needs the student's log-probs over the whole vocabulary; at T = 1 they also give the CE,
        # so one (fused) log_softmax serves both
        logp = F.log_softmax(student_logits, -1)
        ce = F.nll_loss(logp, targets, reduction="sum")
        s, t = topk_with_tail(student_logits, teacher.float(), teacher_ids.long(), temperature,
                              logp if temperature == 1 else None)
        return divergence(s, t, kind, beta).sum(), ce
    ce = F.cross_entropy(student_logits, targets, reduction="sum")
    if teacher_ids is None:
        shared = vocab_size or min(student_logits.shape[-1], teacher.shape[-1])
        s = F.log_softmax(student_logits[:, :shared] / temperature, -1)
        t = F.log_softmax(teacher[:, :shared].float() / temperature, -1)
    else:  # renormalised over the k ids (exact when k = V): log p_T(T) = log_softmax(log p_T(1) / T) over them
        s = F.log_softmax(student_logits.gather(-1, teacher_ids.long()) / temperature, -1)
        t = F.log_softmax(teacher.float() / temperature, -1)
    return divergence(s, t, kind, beta).sum(), ce


TAIL_FLOOR = 1e-12  # the least mass a tail bucket holds: k = V leaves none, and 0 · log 0 would be nan


def topk_with_tail(student_logits: torch.Tensor, teacher_logp: torch.Tensor, ids: torch.Tensor,
                   temperature: float, student_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probs (N, k + 1) at `temperature` on the teacher's top-k ids plus one tail bucket.

    student_logits (N, V); teacher_logp (N, k): the teacher's log-probs at T = 1 on `ids` (N, k), as cached. The
    student side is exact at any T (its full softmax, gathered; the tail is the rest). The teacher's tail at T = 1
    is 1 − Σ_k p, exact. At T ≠ 1 its tempered tail needs the tail tokens' own probabilities, which the cache does
    not keep: they are taken as equal (the tail mass spread evenly over the V − k other ids), which is exact for a
    flat tail and otherwise an approximation (a peaked tail has more tempered mass than this at T < 1, less at
    T > 1). student_logp (N, V): the student's tempered log-probs when the caller has them (kd_sums at T = 1).
    """
    if student_logp is None:
        student_logp = F.log_softmax(student_logits / temperature, -1)
    s_k = student_logp.gather(-1, ids)
    s_tail = torch.log((-torch.expm1(torch.logsumexp(s_k, -1, keepdim=True))).clamp_min(TAIL_FLOOR))
    tail_mass = (-torch.expm1(torch.logsumexp(teacher_logp, -1, keepdim=True))).clamp_min(TAIL_FLOOR)
    if temperature == 1:
        t = torch.cat([teacher_logp, tail_mass.log()], -1)
    else:
        others = max(student_logits.shape[-1] - ids.shape[-1], 1)
        # log Σ_tail p_j^(1/T) with each p_j = tail_mass / others
        t_tail = math.log(others) + (tail_mass.log() - math.log(others)) / temperature
        t = F.log_softmax(torch.cat([teacher_logp / temperature, t_tail], -1), -1)
    return torch.cat([s_k, s_tail], -1), t


def _kd_chunk(h, targets, student_head, temperature, kind, beta, teacher_hidden, teacher_head, cached_logprobs,
              cached_ids, vocab_size, tail=True):
    """kd_sums for one chunk of target positions, from the student's hidden states (see chunked_kd_sums)."""
    logits = student_head(h)
    if cached_ids is not None:
        return kd_sums(logits, cached_logprobs, targets, temperature, kind, beta, teacher_ids=cached_ids, tail=tail)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    return kd_sums(logits, teacher_logits, targets, temperature, kind, beta, vocab_size=vocab_size)


def chunked_kd_sums(student_hidden, student_head, targets, temperature: float, kind: str, beta: float,
                    teacher_hidden=None, teacher_head=None, cached=None, vocab_size: int | None = None,
                    chunk_size: int = 4096, tail: bool = True):
    """kd_sums over the target positions of a batch, projecting at most `chunk_size` positions of each model
    at a time, so neither model's full-vocabulary logits exist for the whole batch.

    The teacher is live (`teacher_hidden` (B, T, D) + `teacher_head`, computed without grad) or `cached`:
    (log-probs (N, k), ids (N, k)) for the N target positions in row-major order, compared with a tail bucket
    unless `tail` is false (see kd_sums).
    When autograd needs gradients, each chunk runs under activation checkpointing: its logits (the student's,
    and a live teacher's) are recomputed in the backward instead of kept, so peak memory holds one chunk's
    logits, not the batch's (the price: each chunk's projections run twice).
    Returns (kd_sum, ce_sum, n_targets).
    """
    from torch.utils.checkpoint import checkpoint

    mask = targets != IGNORE_INDEX
    h, t = student_hidden[mask], targets[mask]
    th = teacher_hidden[mask] if teacher_hidden is not None else None
    params = [p for p in student_head.parameters() if p.requires_grad]
    recompute = torch.is_grad_enabled() and (h.requires_grad or bool(params))
    kd = student_hidden.new_zeros((), dtype=torch.float32)
    ce = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk_size):
        end = start + chunk_size
        args = (h[start:end], t[start:end], student_head, temperature, kind, beta,
                th[start:end] if th is not None else None, teacher_head,
                cached[0][start:end] if cached is not None else None,
                cached[1][start:end] if cached is not None else None, vocab_size, tail)
        if recompute:
            k_sum, c_sum = checkpoint(_kd_chunk, *args, use_reentrant=False)
        else:
            k_sum, c_sum = _kd_chunk(*args)
        kd, ce = kd + k_sum, ce + c_sum
    return kd, ce, mask.sum()


# -- cross-tokenizer distillation: Universal Logit Distillation ---------------------------------------
def uld_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Universal Logit Distillation (Boizard et al. 2024, arXiv 2402.12030) at each of N aligned positions, fp32 (N,).

    student_logits (N, V_s) and teacher_logits (N, V_t) over their own vocabularies (any sizes, no shared ids):
    both are softened by `temperature` and turned into probabilities, each sorted in decreasing order, the smaller
    vocabulary zero-padded to the larger, and the position's loss is Σ_i |p_s,(i) − p_t,(i)| (p_(i) the i-th
    largest probability): the paper's closed-form Wasserstein-1 distance between the two distributions under
    a uniform transport cost, which needs no mapping between the two vocabularies. It compares the sorted
    shapes only: it is 0 for any two distributions equal up to a relabelling of the tokens, and in [0, 2].
    """
    s = torch.softmax(student_logits.float() / temperature, -1).sort(-1, descending=True).values
    t = torch.softmax(teacher_logits.float() / temperature, -1).sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s, t = F.pad(s, (0, width - s.shape[-1])), F.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


def _uld_chunk(h, th, student_head, teacher_head, temperature, student_vocab, teacher_vocab):
    logits = student_head(h)[:, :student_vocab]
    with torch.no_grad():
        teacher_logits = teacher_head(th)[:, :teacher_vocab]
    return uld_sums(logits, teacher_logits, temperature).sum()


def chunked_uld_sum(student_hidden: torch.Tensor, student_head: nn.Module, teacher_hidden: torch.Tensor,
                    teacher_head: nn.Module, temperature: float, student_vocab: int, teacher_vocab: int,
                    chunk_size: int = 4096) -> torch.Tensor:
    """Σ uld_sums over M aligned positions (fp32 scalar), projecting at most `chunk_size` positions of each model at
    a time: student_hidden (M, D_s) and teacher_hidden (M, D_t, computed without grad) are the two models' final
    hidden states at the same M response positions, in the same order. Each model's logits are cut to its
    tokenizer's ids (`student_vocab`, `teacher_vocab`: embedding rows beyond them are padding). When autograd needs
    gradients each chunk runs under activation checkpointing, as chunked_kd_sums does."""
    from torch.utils.checkpoint import checkpoint

    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise TuneError(f"ULD needs as many teacher as student positions, got {teacher_hidden.shape[0]} and "
                        f"{student_hidden.shape[0]}")
    params = [p for p in student_head.parameters() if p.requires_grad]
    recompute = torch.is_grad_enabled() and (student_hidden.requires_grad or bool(params))
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_hidden.shape[0], chunk_size):
        args = (student_hidden[start:start + chunk_size], teacher_hidden[start:start + chunk_size], student_head,
                teacher_head, temperature, student_vocab, teacher_vocab)
        total = total + (checkpoint(_uld_chunk, *args, use_reentrant=False) if recompute else _uld_chunk(*args))
    return total
