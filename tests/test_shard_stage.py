"""The shard stage: every document exactly once, a deterministic document-level split, a checked index."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from helpers import english_documents, prepare, write_jsonl

from pipeline.artifacts import read_manifest
from pipeline.config import PipelineError
from pipeline.shard import ShardConfig, load_index, run
from pipeline.shards import read_shard, read_token_part


@pytest.fixture()
def tokens(tmp_path: Path) -> Path:
    source = write_jsonl(tmp_path / "docs.jsonl", english_documents(200, 30))
    return prepare(tmp_path / "data", str(source), "docs", "bpe:300", val_fraction=0.1)


def shard_documents(shards_dir: Path, split: str) -> list[tuple[int, ...]]:
    index = json.loads((shards_dir / "index.json").read_text())
    docs = []
    for entry in index["shards"]:
        if entry["split"] != split:
            continue
        _, ids = read_shard(shards_dir / entry["file"])
        bounds = [*np.flatnonzero(np.asarray(ids) == index["eot_id"]).tolist(), len(ids)]
        docs += [tuple(ids[a + 1 : b].tolist()) for a, b in pairwise(bounds)]
    return docs


def test_every_document_lands_exactly_once_and_the_split_is_by_document(tokens: Path) -> None:
    ids, offsets = read_token_part(tokens / "tokens" / "docs", "part_00000")
    originals = Counter(tuple(ids[a:b].tolist()) for a, b in pairwise(offsets))
    shards_dir = tokens / "shards" / "docs"
    train, val = shard_documents(shards_dir, "train"), shard_documents(shards_dir, "val")
    assert Counter(train) + Counter(val) == originals
    assert not set(train) & set(val)
    assert 5 <= len(val) <= 40  # about 10% of 200
    counts = read_manifest(shards_dir, "shard")["counts"]
    assert (counts["train_documents"], counts["val_documents"]) == (len(train), len(val))


def test_split_and_shards_are_deterministic(tokens: Path, tmp_path: Path) -> None:
    first = (tokens / "shards" / "docs" / "index.json").read_text()
    run(ShardConfig(data_dir=tokens, corpus="docs", val_fraction=0.1, force=True))
    assert (tokens / "shards" / "docs" / "index.json").read_text() == first
    run(ShardConfig(data_dir=tokens, corpus="docs", val_fraction=0.1, split_seed=1, force=True))
    assert (tokens / "shards" / "docs" / "index.json").read_text() != first


def test_shards_roll_over_at_the_configured_size(tokens: Path) -> None:
    run(ShardConfig(data_dir=tokens, corpus="docs", val_fraction=0.1, shard_tokens=2000, force=True))
    index = load_index(tokens / "shards" / "docs")
    train = [s for s in index["shards"] if s["split"] == "train"]
    assert len(train) > 2
    assert [s["file"] for s in train] == [f"train_{i:06d}.bin" for i in range(len(train))]
    assert all(s["tokens"] < 2000 + 100 for s in train)
    assert sum(s["tokens"] for s in index["shards"]) == read_manifest(tokens / "tokens" / "docs", "tokenize")[
        "counts"]["tokens"] + sum(s["documents"] for s in index["shards"])


def test_corrupt_or_truncated_shards_are_caught_by_the_index(tokens: Path) -> None:
    shard = tokens / "shards" / "docs" / "train_000000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"train_000000\.bin does not match the sha256.*--force"):
        load_index(tokens / "shards" / "docs")
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(PipelineError, match=r"train_000000\.bin has \d+ bytes but its manifest says"):
        load_index(tokens / "shards" / "docs", checksums=False)


def test_missing_or_changed_upstream_is_reported(tokens: Path) -> None:
    with pytest.raises(PipelineError, match=r"tokens/other/manifest\.json is missing.*make tokenize"):
        run(ShardConfig(data_dir=tokens, corpus="other"))
    with pytest.raises(PipelineError, match=r"differs in: val_fraction"):
        run(ShardConfig(data_dir=tokens, corpus="docs", val_fraction=0.2))
    (tokens / "tokens" / "docs" / "part_00000.ids.npy").unlink()
    with pytest.raises(PipelineError, match=r"part_00000\.ids\.npy is listed in .* but missing"):
        run(ShardConfig(data_dir=tokens, corpus="docs", val_fraction=0.1, force=True))


def test_a_single_document_cannot_be_split(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "one.jsonl", ["Only one document here."])
    with pytest.raises(PipelineError, match=r"holds 1 document\(s\).*--doc-split blankline"):
        prepare(tmp_path / "data", str(source), "one", "bpe:260")
