"""Batch sources for the engine. A source is a pure function of (seed, step): resume needs no data state."""

from __future__ import annotations

import numpy as np
import torch


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


class TokenWindows:
    """Random (block_size + 1)-token windows of a memory-mapped token array, nanoGPT style.

    The global batch of a step is micro_batch_size * grad_accum_steps * world windows drawn from one
    generator seeded by (seed, step); rank r takes micro-batches r, r + world, ... of it. So any split
    of the same global batch over processes and accumulation trains on the same windows.
    """

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, block_size: int, micro_batch_size: int,
                 grad_accum_steps: int, seed: int):
        self.train, self.val = train_tokens, val_tokens
        self.block_size, self.micro, self.accum, self.seed = block_size, micro_batch_size, grad_accum_steps, seed

    def _windows(self, tokens: np.ndarray, starts: torch.Tensor) -> dict:
        rows = np.stack([np.asarray(tokens[i:i + self.block_size + 1], dtype=np.int64) for i in starts.tolist()])
        window = torch.from_numpy(rows)
        return {"input_ids": window[:, :-1].contiguous(), "targets": window[:, 1:].contiguous()}

    def step_batches(self, step: int, rank: int, world: int) -> list[dict]:
        n_micro = self.accum * world
        starts = torch.randint(len(self.train) - self.block_size - 1 + 1, (n_micro * self.micro,),
                               generator=step_generator(self.seed, step))
        mine = range(rank, n_micro, world)
        return [self._windows(self.train, starts[m * self.micro:(m + 1) * self.micro]) for m in mine]

    def val_batches(self, rank: int, world: int, limit: int):
        starts = torch.randint(len(self.val) - self.block_size - 1 + 1, (limit * self.micro,),
                               generator=step_generator(self.seed + 1, 0))
        for m in range(rank, limit, world):
            yield self._windows(self.val, starts[m * self.micro:(m + 1) * self.micro])
