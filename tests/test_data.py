"""The training data loader: batches fixed by (seed, step, micro step, rank), disjoint across ranks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import TokenSequences, TrainBatches, micro_batch_loader
from pipeline.stage import PipelineError


@pytest.fixture(scope="module")
def sequences(builtin_data: Path) -> TokenSequences:
    shards_dir = builtin_data / "shards" / "builtin"
    return TokenSequences(shards_dir, json.loads((shards_dir / "index.json").read_text()), "train", 32)


def test_targets_are_inputs_shifted_by_one(sequences: TokenSequences) -> None:
    inputs, targets = TrainBatches(sequences, seed=1, micro_batch_size=4, grad_accum=2, world_size=1).get(3, 1, 0)
    assert inputs.shape == targets.shape == (4, 32)
    assert inputs.dtype == targets.dtype == torch.int64
    assert (inputs[:, 1:] == targets[:, :-1]).all()


def test_batches_depend_only_on_seed_and_position(sequences: TokenSequences) -> None:
    a = TrainBatches(sequences, seed=7, micro_batch_size=4, grad_accum=2, world_size=2)
    b = TrainBatches(sequences, seed=7, micro_batch_size=4, grad_accum=2, world_size=2)
    later_first = b.get(50, 1, 1)  # asked out of order, on a fresh loader
    for step in range(3):
        b.get(step, 0, 0)
    assert all((x == y).all() for x, y in zip(a.get(50, 1, 1), later_first, strict=True))
    other_seed = TrainBatches(sequences, seed=8, micro_batch_size=4, grad_accum=2, world_size=2)
    assert not (other_seed.get(50, 1, 1)[0] == later_first[0]).all()


def test_ranks_read_disjoint_samples_and_an_epoch_covers_every_sequence(sequences: TokenSequences) -> None:
    world, micro, accum = 2, 3, 2
    batches = TrainBatches(sequences, seed=0, micro_batch_size=micro, grad_accum=accum, world_size=world)
    per_step = world * micro * accum
    steps = len(sequences) // per_step
    seen = [batches.sample_indices(s, m, r) for s in range(steps) for m in range(accum) for r in range(world)]
    flat = np.concatenate(seen)
    assert len(set(flat.tolist())) == len(flat) == steps * per_step  # nothing read twice within an epoch
    step0 = {r: set(np.concatenate([batches.sample_indices(0, m, r) for m in range(accum)])) for r in range(world)}
    assert not step0[0] & step0[1]


def test_global_batch_is_the_same_for_one_rank_or_two(sequences: TokenSequences) -> None:
    one = TrainBatches(sequences, seed=3, micro_batch_size=4, grad_accum=1, world_size=1)
    two = TrainBatches(sequences, seed=3, micro_batch_size=2, grad_accum=1, world_size=2)
    for step in (0, 9):
        split = np.concatenate([two.sample_indices(step, 0, rank) for rank in range(2)])
        np.testing.assert_array_equal(one.sample_indices(step, 0, 0), split)


def test_order_is_reshuffled_each_epoch(sequences: TokenSequences) -> None:
    batches = TrainBatches(sequences, seed=0, micro_batch_size=len(sequences), grad_accum=1, world_size=1)
    first, second = batches.sample_indices(0, 0, 0), batches.sample_indices(1, 0, 0)
    assert sorted(first) == sorted(second) == list(range(len(sequences)))
    assert list(first) != list(second)


def test_evaluation_batches_cover_the_first_sequences_in_order(builtin_data: Path) -> None:
    shards_dir = builtin_data / "shards" / "builtin"
    val = TokenSequences(shards_dir, json.loads((shards_dir / "index.json").read_text()), "val", 16)
    rows = [inputs for inputs, _ in val.in_order(batch_size=5, max_sequences=12)]
    assert [len(r) for r in rows] == [5, 5, 2]
    assert (rows[0][0] == val.get(np.array([0]))[0, :-1]).all()


def test_too_short_split_is_refused(builtin_data: Path) -> None:
    shards_dir = builtin_data / "shards" / "builtin"
    with pytest.raises(PipelineError, match="not enough for one sequence"):
        TokenSequences(shards_dir, json.loads((shards_dir / "index.json").read_text()), "val", 10**7)


def test_the_loader_delivers_exactly_the_batches_of_its_steps_in_order(sequences: TokenSequences) -> None:
    """Steps 4-8 of rank 1 of 2, two micro-steps each: what a run resumed at step 4 reads."""
    batches = TrainBatches(sequences, seed=5, micro_batch_size=3, grad_accum=2, world_size=2)
    loader = iter(micro_batch_loader(batches, rank=1, start_step=4, end_step=9))
    for step in range(4, 9):
        for micro_step in range(2):
            got, expected = next(loader), batches.get(step, micro_step, 1)
            assert all((a == b).all() for a, b in zip(got, expected, strict=True))
            assert got[0].shape == (3, sequences.seq_len)
    with pytest.raises(StopIteration):
        next(loader)
