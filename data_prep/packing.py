"""Padding, packing and the engine BatchSource for tokenized instruction examples.

Packing puts several examples in one row. To keep them independent, each row gets ``position_ids`` that
restart at 0 for every example and a 4D block-diagonal causal ``attention_mask`` (B, 1, L, L), bool,
True = may attend. transformers 5.23 passes a 4D mask through unchanged; with SDPA (the default
attention) the bool form gives the same logits as running each example alone, for GPT2LMHeadModel and
LlamaForCausalLM (tests/test_packing.py). A bool mask does not depend on the compute dtype (bf16/fp16
autocast). Eager attention *adds* the mask to the scores, so use attn_implementation="sdpa" with it.
Resetting position_ids next to a 2D (padding) mask does NOT isolate examples.

GPU note: a 4D mask makes SDPA fall back to its math / memory-efficient kernels (no flash kernel).
With ``attn_implementation="flash_attention_2"``, mask_mode="position_ids" emits only position_ids (no
attention_mask), which flash-attention turns into variable-length sequences (as transformers'
DataCollatorWithFlattening does) and keeps the fast kernels. That mode is meant for flash-attention-2 on a
GPU; with SDPA/eager, isolation then depends on transformers detecting the position resets itself (5.23
does so only when no attention_mask is passed and use_cache=False, as tune.losses does), so "4d" is the
default and the mode the tests verify on CPU.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from tune.errors import ConfigError, DataError
from tune.losses import IGNORE_INDEX

MASK_MODES = ("4d", "position_ids")


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """First-fit-decreasing bin packing: lists of example indices whose lengths sum to <= max_length.

    Deterministic: longer examples first (ties by index); each goes into the first bin with room.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ConfigError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens > max_length={max_length}; "
                          "tokenize with the same data.max_length you pack with")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return bins


def collate_packed(examples: Sequence[Sequence[dict]], max_length: int | None, pad_id: int,
                   mask_mode: str = "4d") -> dict:
    """A micro-batch of packs (each a list of tokenized examples) as tensors of width max_length (None: longest).

    input_ids (B, L) padded with pad_id; targets (B, L) with -100 on padding; position_ids restarting at 0 for
    every example (and for the padding tail); mask_mode "4d": attention_mask (B, 1, L, L) bool, causal within an
    example and never across; padding rows attend only to themselves (keeps SDPA finite; their targets are -100).
    mask_mode "position_ids": no attention_mask (flash-attention-2 on GPU only, see the module docstring).
    """
    if mask_mode not in MASK_MODES:
        raise ConfigError(f"data.mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
    widths = [sum(len(ex["input_ids"]) for ex in pack) for pack in examples]
    width = max(widths) if max_length is None else max_length
    if max(widths) > width:
        raise ConfigError(f"a pack has {max(widths)} tokens > max_length={width}; pack with the same max_length")
    B = len(examples)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    targets = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    segment = torch.full((B, width), -1, dtype=torch.long)  # example index within the row; -1 = padding
    for b, pack in enumerate(examples):
        start = 0
        for k, ex in enumerate(pack):
            n = len(ex["input_ids"])
            input_ids[b, start:start + n] = torch.as_tensor(ex["input_ids"])
            targets[b, start:start + n] = torch.as_tensor(ex["targets"])
            position_ids[b, start:start + n] = torch.arange(n)
            segment[b, start:start + n] = k
            start += n
        position_ids[b, start:] = torch.arange(width - start)
    batch = {"input_ids": input_ids, "targets": targets, "position_ids": position_ids}
    if mask_mode == "4d":
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        same = (segment[:, :, None] == segment[:, None, :]) & (segment >= 0)[:, :, None]
        diagonal = torch.eye(width, dtype=torch.bool)
        batch["attention_mask"] = ((causal & same) | diagonal)[:, None]
    return batch


def collate_padded(examples: Sequence[dict], pad_id: int) -> dict:
    """One example per row, right-padded to the longest: input_ids, targets (-100 on padding), 2D attention_mask."""
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[b, :n] = torch.as_tensor(ex["input_ids"])
        targets[b, :n] = torch.as_tensor(ex["targets"])
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "targets": targets, "attention_mask": attention_mask}


class NIBatches:
    """Engine BatchSource over tokenized examples (dicts with input_ids and targets), a pure function of (seed, step).

    Units are examples, or packs of examples when packing (packed once, after a shuffle seeded by `seed`). Epoch e
    is a permutation of the units seeded by (seed, e); the stream of epochs is cut into global batches of
    G = micro_batch_size * grad_accum_steps * world units, step s taking units [(s-1)*G, s*G), split into
    micro-batches of micro_batch_size units of which rank r takes r, r + world, ... So any split of the same global
    batch over processes and accumulation steps trains on the same units.
    """

    def __init__(self, train_examples: Sequence[dict], val_examples: Sequence[dict], micro_batch_size: int,
                 grad_accum_steps: int, seed: int, packing: bool, max_length: int, pad_id: int, mask_mode: str = "4d"):
        if not train_examples:
            raise DataError("NI training set is empty (no instances, or all dropped for max_length); "
                            "check data.train_tasks and raise data.max_length")
        if pad_id is None:
            raise ConfigError("the tokenizer has no pad token; set pad_token (e.g. its eos token: padding is masked)")
        if mask_mode not in MASK_MODES:
            raise ConfigError(f"data.mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
        self.train, self.val = list(train_examples), list(val_examples)
        self.micro, self.accum, self.seed = micro_batch_size, grad_accum_steps, seed
        self.packing, self.max_length, self.pad_id, self.mask_mode = packing, max_length, pad_id, mask_mode
        if packing:
            order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(self.train))
            bins = pack_examples([len(self.train[i]["input_ids"]) for i in order], max_length)
            self.units = [[int(order[j]) for j in b] for b in bins]
            self.val_units = pack_examples([len(ex["input_ids"]) for ex in self.val], max_length)
        else:
            self.units = [[i] for i in range(len(self.train))]
            self.val_units = [[i] for i in range(len(self.val))]
        self._perm: tuple[int, np.ndarray | None] = (-1, None)  # the last epoch's permutation

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the training units on one process (world=1)."""
        return math.ceil(len(self.units) / (self.micro * self.accum))

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.units)))
        return self._perm[1]

    def _unit(self, position: int) -> list[int]:
        epoch, offset = divmod(position, len(self.units))
        return self.units[self._permutation(epoch)[offset]]

    def _collate(self, examples: list[dict], units: list[list[int]]) -> dict:
        if self.packing:
            return collate_packed([[examples[i] for i in u] for u in units], None, self.pad_id, self.mask_mode)
        return collate_padded([examples[u[0]] for u in units], self.pad_id)

    def step_batches(self, step: int, rank: int, world: int) -> list[dict]:
        n_micro = self.accum * world
        first = (step - 1) * n_micro * self.micro
        units = [self._unit(p) for p in range(first, first + n_micro * self.micro)]
        return [self._collate(self.train, units[m * self.micro:(m + 1) * self.micro]) for m in range(rank, n_micro, world)]

    def val_batches(self, rank: int, world: int, limit: int) -> Iterable[dict]:
        """Fixed batches of the validation examples in order (packed when packing), at most `limit` in all."""
        n = min(limit, math.ceil(len(self.val_units) / self.micro))
        for m in range(rank, n, world):
            yield self._collate(self.val, self.val_units[m * self.micro:(m + 1) * self.micro])
