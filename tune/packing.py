"""Packing tokenized examples into rows: bin packing, padding/packing collators and the engine BatchSource.

Packing puts several examples in one row. To keep them independent, each row gets ``position_ids`` that
restart at 0 for every example, and one of (``mask_mode``):

- "document_ids" (data.packed_attention=flex): ``document_ids`` (B, L) int64, one id per example (the padding tail
  its own), O(L) per row. tune.losses.hidden_and_head turns them into the model's mask: a flex_attention
  ``BlockMask`` (native GPT on CUDA, HF models loaded with attn_implementation="flex_attention"), no mask at all
  for flash-attention-2 (variable-length sequences from the position_ids restarts), else the dense mask below,
  built on the model's device. torch 2.13 has no flex_attention backward on CPU, so CPU training takes the dense
  mask either way (tune/models/gpt.py).
- "4d" (data.packed_attention=dense): a 4D block-diagonal causal ``attention_mask`` (B, 1, L, L), bool,
  True = may attend. transformers 5 passes a 4D mask through unchanged; with SDPA the bool form gives the same
  logits as running each example alone, for GPT2LMHeadModel and LlamaForCausalLM (tests/test_packing.py). A
  bool mask does not depend on the compute dtype (bf16/fp16 autocast). Eager attention *adds* the mask to the
  scores, so use attn_implementation="sdpa" with it. It rules out SDPA's flash kernel and costs O(L^2) memory.
- "position_ids": position_ids only (no attention_mask), as transformers' DataCollatorWithFlattening; kept for
  callers that pick flash-attention-2 themselves. "document_ids" covers that case too (hidden_and_head drops
  the mask for flash-attention models). With SDPA/eager, isolation then depends on transformers detecting the
  position resets itself (5.x does so only when no attention_mask is passed and use_cache=False, as
  tune.losses does); for the native GPT tune.losses finds the restarts the same way.

Resetting position_ids next to a 2D (padding) mask does NOT isolate examples.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from tune.errors import ConfigError, DataError
from tune.files import directory_written_aside
from tune.losses import IGNORE_INDEX

MASK_MODES = ("4d", "document_ids", "position_ids")
PACKED_ATTENTION = {"flex": "document_ids", "dense": "4d"}  # data.packed_attention -> mask_mode


PACKING_VERSION = 2  # bumps invalidate cached packs (2: bulk best-fit-decreasing)


def best_fit_decreasing(lengths, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin packing in O(n log n): the bins as (items, offsets), bin b holding items[offsets[b]:offsets[b+1]].

    `lengths` is a 1-D int array (or sequence) of example lengths in tokens; each bin's lengths sum to
    <= max_length. Best-fit decreasing: examples go longest first (ties by index) into the bin with the least
    room that still fits them (ties: the bin that reached that room first), else into a new bin; within a bin
    they are listed in that order. Same guarantee as first-fit decreasing (<= 11/9 OPT + 6/9 bins).

    The lengths are integers <= max_length, so bins are kept in buckets by their room; all examples of one
    length are placed together (a bin taken from bucket r absorbs r // length of them), which makes the work
    O(n log n) for the sort plus O(distinct lengths x max_length) numpy steps, independent of n.
    Deterministic: a pure function of (lengths, max_length). ConfigError if an example is longer than
    max_length or empty.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    n = len(lengths)
    if n and lengths.max() > max_length:
        i = int(np.argmax(lengths > max_length))
        raise ConfigError(f"example {i} has {int(lengths[i])} tokens > max_length={max_length}; "
                          "tokenize with the same data.max_length you pack with")
    if n and lengths.min() < 1:
        raise ConfigError(f"example {int(np.argmax(lengths < 1))} has no tokens; empty examples cannot be packed")
    order = np.lexsort((np.arange(n), -lengths))  # longest first, ties by index
    sorted_lengths = lengths[order]
    assign = np.empty(n, dtype=np.int64)  # bin of the example at each sorted position
    buckets: list[list[np.ndarray]] = [[] for _ in range(max_length + 1)]  # bins by room, FIFO, as chunks
    counts = np.zeros(max_length + 1, dtype=np.int64)
    n_bins = 0

    def take(room: int, k: int) -> np.ndarray:
        out, chunks = [], buckets[room]
        while k:
            chunk = chunks[0]
            if len(chunk) <= k:
                out.append(chunks.pop(0))
                k -= len(chunk)
            else:
                out.append(chunk[:k])
                chunks[0] = chunk[k:]
                k = 0
        return np.concatenate(out)

    def put(room: int, bins: np.ndarray) -> None:
        if len(bins):
            buckets[room].append(bins)
            counts[room] += len(bins)

    starts = np.flatnonzero(np.r_[True, sorted_lengths[1:] != sorted_lengths[:-1]]) if n else np.zeros(0, np.int64)
    for g, pos in enumerate(starts.tolist()):
        end = int(starts[g + 1]) if g + 1 < len(starts) else n
        s = int(sorted_lengths[pos])
        while pos < end:
            fitting = np.flatnonzero(counts[s:])
            if len(fitting):
                room = s + int(fitting[0])
                per_bin = room // s
                k = min(-(-(end - pos) // per_bin), int(counts[room]))
                bins = take(room, k)
                counts[room] -= k
            else:  # new bins
                room = max_length
                per_bin = room // s
                k = -(-(end - pos) // per_bin)
                bins = np.arange(n_bins, n_bins + k, dtype=np.int64)
                n_bins += k
            placed = min(k * per_bin, end - pos)
            assign[pos:pos + placed] = np.repeat(bins, per_bin)[:placed]
            full, rest = divmod(placed, per_bin)
            put(room - per_bin * s, bins[:full])
            if rest:  # the examples ran out: the last bin is partly filled
                put(room - rest * s, bins[full:])
            pos += placed
    within = np.argsort(assign, kind="stable")  # by bin, in placement order
    items = order[within]
    offsets = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(assign, minlength=n_bins), out=offsets[1:])
    return items, offsets


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """best_fit_decreasing as lists of example indices (small inputs and tests; large ones use the arrays)."""
    items, offsets = best_fit_decreasing(lengths, max_length)
    return [items[offsets[b]:offsets[b + 1]].tolist() for b in range(len(offsets) - 1)]


def collate_packed(examples: Sequence[Sequence[dict]], max_length: int | None, pad_id: int,
                   mask_mode: str = "4d") -> dict:
    """A micro-batch of packs (each a list of tokenized examples) as tensors of width max_length (None: longest).

    input_ids (B, L) padded with pad_id; targets (B, L) with -100 on padding; position_ids restarting at 0 for
    every example (and for the padding tail); mask_mode "4d": attention_mask (B, 1, L, L) bool, causal within an
    example and never across; padding rows attend only to themselves (keeps SDPA finite; their targets are -100).
    mask_mode "document_ids": document_ids (B, L) int64 instead, example k of a row has id k and the padding tail
    its own id (len(pack)): O(L) per row, the model builds its mask (tune.losses.hidden_and_head).
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
    if mask_mode == "document_ids":
        padding = torch.tensor([len(pack) for pack in examples])[:, None].expand(B, width)
        batch["document_ids"] = torch.where(segment >= 0, segment, padding)
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


class Units:
    """Training units (bins of example indices) as flat arrays: unit u is items[offsets[u]:offsets[u+1]]."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray):
        self.items, self.offsets = items, offsets

    @classmethod
    def singletons(cls, n: int) -> "Units":
        return cls(np.arange(n, dtype=np.int64), np.arange(n + 1, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, u: int) -> np.ndarray:
        return self.items[self.offsets[u]:self.offsets[u + 1]]


def example_lengths(examples) -> np.ndarray:
    """len(input_ids) of every example as an int64 array: read from the Arrow column of a ``datasets.Dataset``
    (memory-mapped, no Python lists), else from each dict of a sequence."""
    if hasattr(examples, "with_format") and hasattr(examples, "column_names"):
        import pyarrow.compute as pc

        column = examples.with_format("arrow")["input_ids"]
        return pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    return np.fromiter((len(ex["input_ids"]) for ex in examples), dtype=np.int64, count=len(examples))


def example_rows(examples, indices: Sequence[int]) -> list[dict]:
    """The examples at `indices` as dicts with input_ids and targets (lists), read by index: a ``datasets.Dataset``
    is read in one batched Arrow lookup, so only these rows are ever decoded."""
    indices = [int(i) for i in indices]
    if hasattr(examples, "column_names"):
        if not indices:
            return []
        cols = examples.select_columns(["input_ids", "targets"])[indices]
        return [{"input_ids": ids, "targets": t} for ids, t in zip(cols["input_ids"], cols["targets"])]
    return [examples[i] for i in indices]


def dataset_directory(examples) -> Path | None:
    """The directory holding a disk-backed ``datasets.Dataset``'s Arrow files' folder (its cache entry), else None."""
    files = getattr(examples, "cache_files", None)
    return Path(files[0]["filename"]).parent.parent if files else None


def _pack_key(examples, lengths: np.ndarray, max_length: int, seed: int) -> str:
    fingerprint = getattr(examples, "_fingerprint", None)
    h = hashlib.sha256(json.dumps([PACKING_VERSION, fingerprint, len(lengths), max_length, seed]).encode())
    h.update(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())  # a changed dataset never reuses packs
    return h.hexdigest()[:24]


def cached_packs(examples, lengths: np.ndarray, max_length: int, seed: int | None,
                 cache_dir: Path | None) -> Units:
    """Bins of the examples (best_fit_decreasing, after a permutation seeded by `seed`; seed None: in order),
    read from / written to ``cache_dir/packs-<key>/{items,offsets}.npy`` when cache_dir is given.

    The key covers the lengths, the dataset fingerprint, max_length, seed and PACKING_VERSION; the entry is
    written aside and renamed, so readers only see complete ones."""
    key = _pack_key(examples, lengths, max_length, -1 if seed is None else seed)
    final = None if cache_dir is None else Path(cache_dir) / f"packs-{key}"
    if final is not None:
        try:
            units = Units(np.load(final / "items.npy"), np.load(final / "offsets.npy"))
            if units.offsets[-1] == len(lengths) == len(units.items):
                return units
        except (OSError, ValueError):
            pass
    if seed is None:
        order = np.arange(len(lengths), dtype=np.int64)
    else:
        order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(lengths))
    items, offsets = best_fit_decreasing(lengths[order], max_length)
    units = Units(order[items], offsets)
    if final is not None:
        def complete(path: Path) -> bool:
            return (path / "offsets.npy").is_file() and (path / "items.npy").is_file()

        with directory_written_aside(final, complete) as tmp:
            np.save(tmp / "items.npy", units.items)
            np.save(tmp / "offsets.npy", units.offsets)
    return units


class NIBatches:
    """Engine BatchSource over tokenized examples (input_ids and targets), a pure function of (seed, step).

    The examples are a ``datasets.Dataset`` (read by index, memory-mapped: nothing is loaded up front) or a
    sequence of dicts. Units are examples, or packs of examples when packing (best_fit_decreasing after a
    shuffle seeded by `seed`, on the lengths only; cached next to a disk-backed dataset, or in `cache_dir`).
    Epoch e is a permutation of the units seeded by (seed, e); the stream of epochs is cut into global batches of
    G = micro_batch_size * grad_accum_steps * world units, step s taking units [(s-1)*G, s*G), split into
    micro-batches of micro_batch_size units of which rank r takes r, r + world, ... So any split of the same global
    batch over processes and accumulation steps trains on the same units. A micro-batch's tensors are built
    only when step_batches / val_batches asks for it. mask_mode: how packed rows keep examples apart (collate_packed;
    PACKED_ATTENTION maps data.packed_attention to it).
    """

    def __init__(self, train_examples, val_examples, micro_batch_size: int, grad_accum_steps: int, seed: int,
                 packing: bool, max_length: int, pad_id: int, mask_mode: str = "4d", cache_dir=None):
        if len(train_examples) == 0:
            raise DataError("NI training set is empty (no instances, or all dropped for max_length); "
                            "check data.train_tasks and raise data.max_length")
        if pad_id is None:
            raise ConfigError("the tokenizer has no pad token; set pad_token (e.g. its eos token: padding is masked)")
        if mask_mode not in MASK_MODES:
            raise ConfigError(f"data.mask_mode must be one of {', '.join(MASK_MODES)}, got {mask_mode!r}")
        self.train, self.val = train_examples, val_examples
        self.micro, self.accum, self.seed = micro_batch_size, grad_accum_steps, seed
        self.packing, self.max_length, self.pad_id, self.mask_mode = packing, max_length, pad_id, mask_mode
        if packing:
            self.units = cached_packs(self.train, example_lengths(self.train), max_length, seed,
                                      cache_dir if cache_dir is not None else dataset_directory(self.train))
            self.val_units = cached_packs(self.val, example_lengths(self.val), max_length, None,
                                          cache_dir if cache_dir is not None else dataset_directory(self.val))
        else:
            self.units, self.val_units = Units.singletons(len(self.train)), Units.singletons(len(self.val))
        self._perm: tuple[int, np.ndarray | None] = (-1, None)  # the last epoch's permutation

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the training units on one process (world=1)."""
        return math.ceil(len(self.units) / (self.micro * self.accum))

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.units)))
        return self._perm[1]

    def _unit(self, position: int) -> np.ndarray:
        epoch, offset = divmod(position, len(self.units))
        return self.units[int(self._permutation(epoch)[offset])]

    def _collate(self, examples, units: list[np.ndarray]) -> dict:
        rows = example_rows(examples, [i for u in units for i in u])
        if self.packing:
            packs, start = [], 0
            for u in units:
                packs.append(rows[start:start + len(u)])
                start += len(u)
            return collate_packed(packs, None, self.pad_id, self.mask_mode)
        return collate_padded(rows, self.pad_id)

    def micro_batch_units(self, step: int, rank: int, world: int) -> list[tuple[int, list[np.ndarray]]]:
        """This rank's micro-batches of `step` as (m, units): m the micro-batch's index in the step's global batch
        (the same whatever the number of processes), units its training units (arrays of example indices)."""
        n_micro = self.accum * world
        first = (step - 1) * n_micro * self.micro
        units = [self._unit(p) for p in range(first, first + n_micro * self.micro)]
        return [(m, units[m * self.micro:(m + 1) * self.micro]) for m in range(rank, n_micro, world)]

    def step_batches(self, step: int, rank: int, world: int) -> list[dict]:
        return [self._collate(self.train, units) for _, units in self.micro_batch_units(step, rank, world)]

    def val_batches(self, rank: int, world: int, limit: int) -> Iterable[dict]:
        """Fixed batches of the validation examples in order (packed when packing), at most `limit` in all."""
        n = min(limit, math.ceil(len(self.val_units) / self.micro))
        for m in range(rank, n, world):
            units = [self.val_units[u] for u in range(m * self.micro, min((m + 1) * self.micro, len(self.val_units)))]
            yield self._collate(self.val, units)
