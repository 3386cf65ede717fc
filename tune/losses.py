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
    out = backbone(input_ids=batch["input_ids"], use_cache=False, **kwargs)
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


def hf_document_mask(lm: nn.Module, document_ids: torch.Tensor):
    """The attention_mask that keeps the packed examples of `document_ids` (B, L) apart in the HF model `lm`,
    for its attention implementation: flex_attention -> a BlockMask; flash_attention_* -> None (transformers
    then splits the rows at the position_ids restarts into variable-length sequences); eager -> the 4D additive
    float mask (eager adds it to the scores); sdpa and others -> the 4D bool mask (B, 1, L, L).
    TuneError for models that cannot take a 4D mask (check_takes_4d_mask)."""
    from tune.models.gpt import document_block_mask, document_dense_mask

    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
    if impl.startswith("flash_attention"):
        return None
    check_takes_4d_mask(lm)
    if impl == "flex_attention":
        return document_block_mask(document_ids)
    dense = document_dense_mask(document_ids)
    if impl == "eager":
        dtype = lm.dtype if lm.dtype.is_floating_point else torch.float32
        return torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill(~dense, torch.finfo(dtype).min)
    return dense


def chunked_ce_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int = 8192):
    """Sum of cross-entropy over target positions, projecting at most `chunk_size` positions at a time
    so full-vocabulary fp32 logits never exist for the whole batch. Returns (loss_sum, n_targets)."""
    mask = targets != IGNORE_INDEX
    if torch.compiler.is_compiling():  # boolean selection has a data-dependent shape: project every position
        h, t = hidden.flatten(0, -2), targets.flatten()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, t.numel(), chunk_size):
            logits = head(h[start:start + chunk_size]).float()
            total = total + F.cross_entropy(logits, t[start:start + chunk_size], reduction="sum",
                                            ignore_index=IGNORE_INDEX)
        return total, mask.sum()
    h, t = hidden[mask], targets[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk_size):
        logits = head(h[start:start + chunk_size]).float()
        total = total + F.cross_entropy(logits, t[start:start + chunk_size], reduction="sum")
    return total, mask.sum()


def causal_lm_loss(model: nn.Module, batch: dict):
    """Summed next-token cross-entropy and the number of target tokens."""
    hidden, head = hidden_and_head(model, batch)
    return chunked_ce_sum(hidden, head, batch["targets"])


# -- knowledge distillation ------------------------------------------------------------------------
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str = "forward_kl",
               beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between two distributions given as log-probs over the same support (N, S).

    forward_kl  KL(p_teacher || p_student)  mode-covering; Hinton et al.'s distillation loss
    reverse_kl  KL(p_student || p_teacher)  mode-seeking
    jsd         beta * KL(p_teacher || m) + (1 - beta) * KL(p_student || m),  m = beta p_teacher + (1 - beta) p_student
                (the generalized JSD of GKD; beta = 0.5 is the symmetric Jensen-Shannon divergence)
    """
    if kind == "forward_kl":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse_kl":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
        mixture = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log(1 - beta)]), 0)
        kl_t = (teacher_logp.exp() * (teacher_logp - mixture)).sum(-1)
        kl_s = (student_logp.exp() * (student_logp - mixture)).sum(-1)
        return beta * kl_t + (1 - beta) * kl_s
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def kd_sums(student_logits: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, temperature: float,
            kind: str, beta: float, teacher_ids: torch.Tensor | None = None,
            vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of divergences, sum of cross-entropies) over N target positions, in fp32.

    student_logits (N, V_s). `teacher` is either the teacher's logits (N, V_t), compared on the first
    `vocab_size` ids (the shared tokenizer's; default min(V_s, V_t)), or, with `teacher_ids` (N, k), the teacher's cached top-k
    log-probs at temperature 1: both distributions are then renormalised over those k ids (exact when k
    covers the vocabulary). Temperature scales the logits of both models before the divergence only.
    """
    student_logits = student_logits.float()
    ce = F.cross_entropy(student_logits, targets, reduction="sum")
    if teacher_ids is None:
        shared = vocab_size or min(student_logits.shape[-1], teacher.shape[-1])
        s = F.log_softmax(student_logits[:, :shared] / temperature, -1)
        t = F.log_softmax(teacher[:, :shared].float() / temperature, -1)
    else:  # log p_T(T) over the support = log_softmax(log p_T(1) / T): the teacher's normaliser cancels
        s = F.log_softmax(student_logits.gather(-1, teacher_ids.long()) / temperature, -1)
        t = F.log_softmax(teacher.float() / temperature, -1)
    return divergence(s, t, kind, beta).sum(), ce


def chunked_kd_sums(student_hidden, student_head, targets, temperature: float, kind: str, beta: float,
                    teacher_hidden=None, teacher_head=None, cached=None, vocab_size: int | None = None,
                    chunk_size: int = 4096):
    """kd_sums over the target positions of a batch, projecting at most `chunk_size` positions of each model
    at a time, so neither model's full-vocabulary logits exist for the whole batch.

    The teacher is live (`teacher_hidden` (B, T, D) + `teacher_head`, computed without grad) or `cached`:
    (log-probs (N, k), ids (N, k)) for the N target positions in row-major order.
    Returns (kd_sum, ce_sum, n_targets).
    """
    mask = targets != IGNORE_INDEX
    h, t = student_hidden[mask], targets[mask]
    th = teacher_hidden[mask] if teacher_hidden is not None else None
    kd = student_hidden.new_zeros((), dtype=torch.float32)
    ce = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk_size):
        end = start + chunk_size
        logits = student_head(h[start:end])
        if cached is not None:
            k_sum, c_sum = kd_sums(logits, cached[0][start:end], t[start:end], temperature, kind, beta,
                                   teacher_ids=cached[1][start:end])
        else:
            with torch.no_grad():
                teacher_logits = teacher_head(th[start:end])
            k_sum, c_sum = kd_sums(logits, teacher_logits, t[start:end], temperature, kind, beta, vocab_size=vocab_size)
        kd, ce = kd + k_sum, ce + c_sum
    return kd, ce, mask.sum()
