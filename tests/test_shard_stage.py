"""The shard stage: every document exactly once, a deterministic document-level split, a checked index."""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from helpers import english_documents, prepare, rehash_shards, write_jsonl

from pipeline import shard as shard_stage
from pipeline.artifacts import read_manifest
from pipeline.shard import ShardConfig, run, shuffled_order
from pipeline.shard_format import load_index, read_shard, read_token_part
from pipeline.stage import PipelineError


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
    ids, offsets = read_token_part(tokens / "tokens" / "docs", "part_00000", 300)
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
    (tokens / "tokens" / "docs" / "part_00000.ids").unlink()
    with pytest.raises(PipelineError, match=r"part_00000\.ids is listed in .* but missing"):
        run(ShardConfig(data_dir=tokens, corpus="docs", val_fraction=0.1, force=True))


def test_a_single_document_cannot_be_split(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "one.jsonl", ["Only one document here."])
    with pytest.raises(PipelineError, match=r"holds 1 document\(s\).*--doc-split blankline"):
        prepare(tmp_path / "data", str(source), "one", "bpe:260")


def test_documents_are_shuffled_deterministically(tokens: Path) -> None:
    ids, offsets = read_token_part(tokens / "tokens" / "docs", "part_00000", 300)
    in_order = [tuple(ids[a:b].tolist()) for a, b in pairwise(offsets)]
    train = shard_documents(tokens / "shards" / "docs", "train")
    assert train != [doc for doc in in_order if doc in set(train)]  # not the input order
    run(ShardConfig(data_dir=tokens, corpus="docs", val_fraction=0.1, shuffle=False, force=True))
    assert shard_documents(tokens / "shards" / "docs", "train") == [doc for doc in in_order if doc in set(train)]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 1000, 4097, 65536 + 3])
def test_shuffled_order_is_a_seeded_permutation(count: int) -> None:
    order = np.concatenate(list(shuffled_order(count, seed=7, block=1000)))
    assert sorted(order.tolist()) == list(range(count))
    assert np.array_equal(order, np.concatenate(list(shuffled_order(count, seed=7, block=333))))
    if count >= 1000:
        assert not np.array_equal(order, np.arange(count))
        assert not np.array_equal(order, np.concatenate(list(shuffled_order(count, seed=8))))
        # a real shuffle: adjacent outputs are not adjacent inputs
        assert np.mean(np.abs(np.diff(order)) == 1) < 0.01


def test_shard_memory_does_not_grow_with_the_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_stage, "PERMUTATION_BLOCK", 256)
    peaks = []
    for count in (2_000, 20_000):
        source = write_jsonl(tmp_path / f"docs{count}.jsonl", english_documents(count, 3))
        data = prepare(tmp_path / f"data{count}", str(source), "docs", "bpe:300")
        tracemalloc.start()
        run(ShardConfig(data_dir=data, corpus="docs", shard_tokens=1 << 20, force=True))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # 18,000 more documents: an order or split array of even 8 bytes per document would add 144 kB.
    assert peaks[1] - peaks[0] < 32_000, peaks


def test_verify_checks_every_token(tokens: Path) -> None:
    shards_dir = tokens / "shards" / "docs"
    assert run(ShardConfig(data_dir=tokens, corpus="docs", verify=True)) == shards_dir
    shard = shards_dir / "val_000000.bin"
    data = bytearray(shard.read_bytes())
    data[-2:] = (60000).to_bytes(2, "little")  # an id outside the 300-token vocabulary
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=r"val_000000\.bin does not match the sha256"):
        run(ShardConfig(data_dir=tokens, corpus="docs", verify=True))
    # Even with checksums that agree (a shard written wrong in the first place), the ids are checked.
    rehash_shards(shards_dir)
    with pytest.raises(PipelineError, match=r"val_000000\.bin holds token ids outside the vocabulary"):
        run(ShardConfig(data_dir=tokens, corpus="docs", verify=True))


def test_parts_built_apart_merge_into_one_set_the_trainer_reads(tmp_path: Path) -> None:
    from test_tokenize import gpt2_format_folder

    from pipeline.download import DownloadConfig
    from pipeline.download import run as download
    from pipeline.tokenize import TokenizeConfig
    from pipeline.tokenize import run as tokenize

    texts = english_documents(120, 30)
    source = str(write_jsonl(tmp_path / "docs.jsonl", texts))
    tokenizer = str(gpt2_format_folder(tmp_path / "shared-tokenizer"))
    whole = prepare(tmp_path / "whole", source, "docs", tokenizer, val_fraction=0.1)
    data = tmp_path / "parts"
    for i in range(3):  # as three machines would, each on its own share
        download(DownloadConfig(data_dir=data, source=source, part=f"{i}/3"))
        tokenize(TokenizeConfig(data_dir=data, corpus="docs", tokenizer=tokenizer, part=f"{i}/3"))
        run(ShardConfig(data_dir=data, corpus="docs", val_fraction=0.1, part=f"{i}/3"))
    merged = run(ShardConfig(data_dir=data, corpus="docs", merge=3))
    index = load_index(merged)
    assert [s["file"] for s in index["shards"] if s["split"] == "val"] == ["val_000000.bin", "val_000001.bin",
                                                                          "val_000002.bin"]
    for split in ("train", "val"):  # the same documents on the same side as sharding the whole corpus at once
        assert Counter(shard_documents(merged, split)) == Counter(shard_documents(whole / "shards" / "docs", split))
    run(ShardConfig(data_dir=data, corpus="docs", verify=True))


def test_parts_with_different_tokenizers_are_not_merged(tmp_path: Path) -> None:
    source = str(write_jsonl(tmp_path / "docs.jsonl", english_documents(60, 30)))
    for i in range(2):
        prepare(tmp_path / "data", source, "docs", "bpe:300", part=f"{i}/2")
    with pytest.raises(PipelineError, match="must share one tokenizer"):
        run(ShardConfig(data_dir=tmp_path / "data", corpus="docs", merge=2))
