"""Training losses. Batches carry `targets` aligned with `input_ids`: targets[b, t] is the token the
model should predict at position t, or -100 where nothing is trained (prompt, padding)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


def hidden_and_head(model: nn.Module, batch: dict) -> tuple[torch.Tensor, nn.Module]:
    """Final hidden states and the output projection, for the native GPT, any HF causal LM, or a peft wrapper.

    Splitting the model here lets the loss project to the vocabulary only where a target exists:
    with prompt masking most positions need no logits at all.
    """
    if hasattr(model, "hidden_states") and hasattr(model, "output_embeddings"):  # native GPT
        return model.hidden_states(batch["input_ids"]), model.output_embeddings()
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    backbone = lm.get_decoder() if hasattr(lm, "get_decoder") else lm.base_model
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    out = backbone(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    return out[0], lm.get_output_embeddings()


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
