"""Token storage formats: the binary training shard and its index, and the per-document token parts of the
tokenize stage.

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

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import how_to_run, read_manifest, verify_files
from pipeline.stage import PipelineError

INDEX = "index.json"  # the shard stage's list of shards, beside them
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


def read_shard(path: Path) -> tuple[ShardHeader, np.ndarray]:
    """Validate a shard's header and size, then memory-map its tokens (read-only)."""
    path = Path(path)
    fix = f"Rebuild the shards with {how_to_run('shard', force=True)}."
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


class TokenPartWriter:
    """One tokenized input file, written as it is encoded: `<name>.ids` (the token ids back to back, raw
    little-endian) and `<name>.offsets.npy` (document boundaries, documents + 1 of them). Both appear under
    their final names only when the part is complete, the offsets last, so a part whose offsets exist is done.
    """

    def __init__(self, folder: Path, name: str, vocab_size: int) -> None:
        self.folder, self.name = Path(folder), name
        self.dtype = token_dtype(vocab_size)
        self.offsets = [0]
        self.digest = hashlib.sha256()  # as it is written: the manifest need not read the file again
        self._file = open(self.folder / f".{name}.ids.partial", "wb")

    def add(self, documents: list[np.ndarray]) -> int:
        """Append a batch of documents; returns the number of tokens added."""
        if documents:
            data = np.concatenate(documents).astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self.digest.update(data)
        for ids in documents:
            self.offsets.append(self.offsets[-1] + len(ids))
        return sum(len(ids) for ids in documents)

    def close(self) -> dict[str, Any]:
        """Finish the part; returns the ids file's manifest entry."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.folder / f".{self.name}.ids.partial", self.folder / f"{self.name}.ids")
        partial = self.folder / f".{self.name}.offsets.partial.npy"
        np.save(partial, np.asarray(self.offsets, dtype=np.int64), allow_pickle=False)
        os.replace(partial, self.folder / f"{self.name}.offsets.npy")
        path = f"{self.name}.ids"
        return {"path": path, "bytes": (self.folder / path).stat().st_size, "sha256": self.digest.hexdigest()}


def token_parts(folder: Path) -> list[str]:
    """The names of the complete token parts in a folder, in order."""
    return sorted(p.name.removesuffix(".offsets.npy") for p in Path(folder).glob("part_*.offsets.npy"))


def read_token_part(folder: Path, name: str, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids memory-mapped, document offsets) of one token part."""
    offsets = np.load(Path(folder) / f"{name}.offsets.npy", allow_pickle=False, mmap_mode="r")
    path = Path(folder) / f"{name}.ids"
    dtype = token_dtype(vocab_size)
    if path.stat().st_size != offsets[-1] * dtype.itemsize:
        raise PipelineError(
            f"{path} holds {path.stat().st_size // dtype.itemsize} tokens but {name}.offsets.npy says "
            f"{offsets[-1]}. Rebuild with {how_to_run('tokenize', force=True)}."
        )
    ids = np.memmap(path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype=dtype)
    return ids, offsets


def load_index(shards_dir: Path, checksums: bool = True) -> dict[str, Any]:
    """The shard index of a shard stage output, with every shard's header checked against it."""
    manifest = read_manifest(shards_dir, "shard")
    verify_files(shards_dir, manifest, checksums=checksums)
    index = json.loads((shards_dir / INDEX).read_text())
    for entry in index["shards"]:
        header, _ = read_shard(shards_dir / entry["file"])
        if (header.tokens, header.documents, header.vocab_size) != (
                entry["tokens"], entry["documents"], index["vocab_size"]):
            raise PipelineError(
                f"{shards_dir / entry['file']} does not match {shards_dir / INDEX} (tokens {header.tokens} vs "
                f"{entry['tokens']}, documents {header.documents} vs {entry['documents']}, vocabulary "
                f"{header.vocab_size} vs {index['vocab_size']}). Rebuild with {how_to_run('shard', force=True)}."
            )
    return index
