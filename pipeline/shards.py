"""Token storage formats: the binary training shard, and the per-document token parts of the tokenize stage.

A shard is a 64-byte little-endian header followed by the flat token array::

    offset  size  field
    0       8     magic b"ONECARD\\x00"
    8       4     format version (1)
    12      4     bytes per token: 2 (uint16, vocabulary <= 65536) or 4 (uint32)
    16      8     token count
    24      8     document count
    32      4     vocabulary size
    36      4     end-of-text token id
    40      24    zero padding

Every document is preceded by the end-of-text token, so documents are separated by it. Reading maps the
array with numpy (no pickle) after checking the magic, version and that the file size matches the header.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import PipelineError

MAGIC = b"ONECARD\x00"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQII")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardHeader:
    tokens: int
    documents: int
    vocab_size: int
    eot_id: int
    dtype: np.dtype
    version: int = VERSION

    def pack(self) -> bytes:
        fields = _HEADER.pack(
            MAGIC, self.version, self.dtype.itemsize, self.tokens, self.documents, self.vocab_size, self.eot_id
        )
        return fields.ljust(HEADER_BYTES, b"\x00")


class ShardWriter:
    """Streams documents into one shard file in O(1) memory; the header is written last, on close."""

    def __init__(self, path: Path, vocab_size: int, eot_id: int) -> None:
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.eot_id = eot_id
        self.dtype = token_dtype(vocab_size)
        self.tokens = 0
        self.documents = 0
        self._file = open(self.path, "wb")
        self._file.write(b"\x00" * HEADER_BYTES)
        self._eot = np.array([eot_id], dtype=self.dtype)

    def add_document(self, ids: np.ndarray) -> None:
        self._file.write(self._eot.tobytes())
        self._file.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.tokens += 1 + len(ids)
        self.documents += 1

    def close(self) -> ShardHeader:
        header = ShardHeader(self.tokens, self.documents, self.vocab_size, self.eot_id, self.dtype)
        if not self._file.closed:
            self._file.seek(0)
            self._file.write(header.pack())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        return header

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_shard(path: Path, documents: list[np.ndarray], vocab_size: int, eot_id: int) -> ShardHeader:
    """Write a whole shard from a list of documents (token id arrays)."""
    with ShardWriter(path, vocab_size, eot_id) as writer:
        for ids in documents:
            writer.add_document(ids)
        return writer.close()


def read_shard(path: Path) -> tuple[ShardHeader, np.ndarray]:
    """Validate a shard's header and size, then memory-map its tokens (read-only)."""
    path = Path(path)
    fix = "Rebuild the shards with `make shard` (python -m pipeline.shard --force)."
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as error:
        raise PipelineError(f"cannot read shard {path}: {error.strerror}. {fix}") from error
    if len(raw) < HEADER_BYTES:
        raise PipelineError(f"{path} is not a onecard shard: only {len(raw)} bytes, shorter than the header. {fix}")
    magic, version, itemsize, tokens, documents, vocab_size, eot_id = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise PipelineError(f"{path} is not a onecard shard: wrong magic {magic!r} (expected {MAGIC!r}). {fix}")
    if version != VERSION:
        raise PipelineError(
            f"{path} has shard format version {version}; this onecard reads version {VERSION}. {fix}"
        )
    if itemsize not in (2, 4):
        raise PipelineError(f"{path} has an invalid token size of {itemsize} bytes in its header. {fix}")
    dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32)
    expected = HEADER_BYTES + tokens * itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise PipelineError(
            f"{path} is truncated or padded: {actual} bytes on disk, but its header announces {tokens} tokens "
            f"({expected} bytes). {fix}"
        )
    header = ShardHeader(tokens, documents, vocab_size, eot_id, dtype, version)
    if tokens == 0:
        return header, np.zeros(0, dtype=dtype)
    return header, np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(tokens,))


def write_token_part(folder: Path, name: str, ids: np.ndarray, offsets: np.ndarray) -> None:
    """One tokenized input file: all token ids back to back, and document boundaries (len = documents + 1)."""
    np.save(folder / f"{name}.ids.npy", ids, allow_pickle=False)
    np.save(folder / f"{name}.offsets.npy", offsets.astype(np.int64), allow_pickle=False)


def read_token_part(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.load(folder / f"{name}.ids.npy", mmap_mode="r", allow_pickle=False)
    offsets = np.load(folder / f"{name}.offsets.npy", allow_pickle=False)
    if offsets[-1] != len(ids):
        raise PipelineError(
            f"{folder / name}.offsets.npy does not match {name}.ids.npy ({offsets[-1]} vs {len(ids)} tokens). "
            "Rebuild with `make tokenize` (python -m pipeline.tokenize --force)."
        )
    return ids, offsets
