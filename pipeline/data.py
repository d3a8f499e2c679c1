"""The trainer's data loader: fixed-length token sequences from memory-mapped shards, in a seeded order.

Sequence i of a shard is its tokens [i*T, i*T + T + 1): inputs are the first T, targets the last T. The
global order of sequences is a fresh seeded permutation per epoch, and sample g of the run is the g-th
element of that order. A micro-batch is addressed by (step, micro step, rank), which fixes its samples, so
batches depend on nothing but the seed and their position: resuming at step s replays exactly the batches an
uninterrupted run would have seen, and ranks always read disjoint samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.shard_format import read_shard
from pipeline.stage import PipelineError


class TokenSequences:
    """All length-(T+1) windows of one split, numbered across its shards."""

    def __init__(self, shards_dir: Path, index: dict[str, Any], split: str, seq_len: int) -> None:
        self.seq_len = seq_len
        self.arrays = [read_shard(shards_dir / s["file"])[1] for s in index["shards"] if s["split"] == split]
        counts = [max(0, (len(a) - 1) // seq_len) for a in self.arrays]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if len(self) == 0:
            tokens = sum(len(a) for a in self.arrays)
            raise PipelineError(
                f"the {split} shards in {shards_dir} hold {tokens} tokens, not enough for one sequence of "
                f"{seq_len + 1}. Use a shorter --seq-len or a bigger corpus"
                + (" or a larger --val-fraction when sharding." if split == "val" else ".")
            )

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Rows of T+1 token ids (int64) for the given global sequence indices."""
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        rows = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, (s, i) in enumerate(zip(shard, indices, strict=True)):
            begin = (int(i) - int(self.starts[s])) * self.seq_len
            rows[row] = self.arrays[s][begin : begin + self.seq_len + 1]
        return rows

    def in_order(self, batch_size: int, max_sequences: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation batches: the first `max_sequences` sequences, in order."""
        total = min(len(self), max_sequences)
        for begin in range(0, total, batch_size):
            rows = torch.from_numpy(self.get(np.arange(begin, min(begin + batch_size, total))))
            yield rows[:, :-1], rows[:, 1:]


class TrainBatches:
    """Micro-batches addressed by (step, micro step, rank); see the module docstring."""

    def __init__(self, sequences: TokenSequences, seed: int, micro_batch_size: int, grad_accum: int,
                 world_size: int) -> None:
        self.sequences = sequences
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.world_size = world_size
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.sequences))
        return self._orders[epoch]

    def sample_indices(self, step: int, micro_step: int, rank: int) -> np.ndarray:
        first = ((step * self.grad_accum + micro_step) * self.world_size + rank) * self.micro_batch_size
        samples = np.arange(first, first + self.micro_batch_size)
        epochs, positions = np.divmod(samples, len(self.sequences))
        return np.array([self._order(int(e))[p] for e, p in zip(epochs, positions, strict=True)])

    def get(self, step: int, micro_step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.sequences.get(self.sample_indices(step, micro_step, rank)))
        return rows[:, :-1], rows[:, 1:]


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch k = step x grad_accum + micro step of one rank: TrainBatches as a dataset that PyTorch's
    DataLoader reads by index."""

    def __init__(self, batches: TrainBatches, rank: int) -> None:
        self.batches = batches
        self.rank = rank

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro_step = divmod(k, self.batches.grad_accum)
        return self.batches.get(step, micro_step, self.rank)


def micro_batch_loader(batches: TrainBatches, rank: int, start_step: int, end_step: int,
                       pin: bool = False) -> torch.utils.data.DataLoader:
    """The micro-batches of steps [start_step, end_step) for one rank, in order, through PyTorch's DataLoader;
    with `pin`, in page-locked memory, ready for an asynchronous copy to the GPU. The batches are read in the
    trainer's own process (no workers): a micro-batch of GPT-2 XL comes from the memory-mapped shards in under a
    millisecond (bench/loader_bench.py, docs/BENCHMARKS.md) while the GPU is still busy with the previous
    micro-step, so a background reader would hide nothing the step notices."""
    accum = batches.grad_accum
    return torch.utils.data.DataLoader(MicroBatches(batches, rank), batch_size=None,
                                       sampler=range(start_step * accum, end_step * accum), pin_memory=pin)
