"""The shard format: write then read gives back exactly the tokens; damaged shards are refused by name."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from helpers import write_shard

from pipeline.shard_format import HEADER_BYTES, MAGIC, ShardWriter, read_shard, token_dtype
from pipeline.stage import PipelineError


def documents(vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab_size, size=int(n)) for n in rng.integers(1, 200, size=25)]


@pytest.mark.parametrize("vocab_size", [512, 50257, 100_000])
def test_round_trip_returns_exactly_the_tokens(tmp_path: Path, vocab_size: int) -> None:
    docs = documents(vocab_size)
    header = write_shard(tmp_path / "s.bin", docs, vocab_size=vocab_size, eot_id=0)
    read_header, tokens = read_shard(tmp_path / "s.bin")
    expected = np.concatenate([np.concatenate([[0], d]) for d in docs])
    assert read_header == header
    assert tokens.dtype == token_dtype(vocab_size) == (np.uint16 if vocab_size <= 65536 else np.uint32)
    assert (read_header.tokens, read_header.documents, read_header.vocab_size) == (len(expected), 25, vocab_size)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + len(expected) * tokens.dtype.itemsize


def test_documents_are_separated_by_the_end_of_text_token(tmp_path: Path) -> None:
    write_shard(tmp_path / "s.bin", [np.array([5, 6]), np.array([7])], vocab_size=100, eot_id=99)
    _, tokens = read_shard(tmp_path / "s.bin")
    assert tokens.tolist() == [99, 5, 6, 99, 7]


def test_streaming_writer_equals_whole_write(tmp_path: Path) -> None:
    docs = documents(1000, seed=3)
    write_shard(tmp_path / "a.bin", docs, vocab_size=1000, eot_id=0)
    with ShardWriter(tmp_path / "b.bin", vocab_size=1000, eot_id=0) as writer:
        for doc in docs:
            writer.add_document(doc)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_truncated_shard_is_refused_with_its_name(tmp_path: Path) -> None:
    path = tmp_path / "train_000000.bin"
    write_shard(path, documents(512), vocab_size=512, eot_id=0)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PipelineError, match=r"train_000000\.bin is truncated.*make shard"):
        read_shard(path)


@pytest.mark.parametrize(("offset", "value", "message"), [
    (0, b"NOTASHRD", r"s\.bin is not a onecard shard: wrong magic"),
    (8, struct.pack("<I", 7), r"s\.bin has shard format version 7"),
    (12, struct.pack("<I", 3), r"s\.bin has an invalid token size of 3 bytes"),
])
def test_damaged_header_is_refused(tmp_path: Path, offset: int, value: bytes, message: str) -> None:
    path = tmp_path / "s.bin"
    write_shard(path, documents(512), vocab_size=512, eot_id=0)
    data = bytearray(path.read_bytes())
    data[offset : offset + len(value)] = value
    path.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match=message):
        read_shard(path)


def test_file_shorter_than_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.bin"
    path.write_bytes(MAGIC)
    with pytest.raises(PipelineError, match="shorter than the header"):
        read_shard(path)
