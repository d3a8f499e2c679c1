"""Stage 3, shard: pack token ids into fixed-size binary shards with a deterministic train/val split.

Each document goes to val or train by a keyed hash of its token ids (so the split does not depend on
document order, and duplicate documents land on the same side). Shards hold up to --shard-tokens tokens
(format in `pipeline/shards.py`); `index.json` lists them with token and document counts and checksums.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import StageOutput, read_manifest, sha256_file, verify_files, write_json_atomic
from pipeline.config import DataDir, PipelineError, StageConfig, stage_main
from pipeline.shards import ShardHeader, ShardWriter, read_shard, read_token_part

log = logging.getLogger("onecard")

FORMAT_VERSION = 1
INDEX = "index.json"
SPLITS = ("train", "val")


@dataclass
class ShardConfig(StageConfig):
    corpus: str = field(default="builtin", metadata={"help": "corpus to shard (a folder under tokens/)"})
    shard_tokens: int = field(default=100_000_000, metadata={"help": "tokens per shard file"})
    val_fraction: float = field(default=0.05, metadata={"help": "fraction of documents held out for validation"})
    split_seed: int = field(default=0, metadata={"help": "key of the hash that assigns documents to train/val"})


def _documents(tokens_dir: Path) -> Iterator[np.ndarray]:
    for offsets_file in sorted(tokens_dir.glob("part_*.offsets.npy")):
        ids, offsets = read_token_part(tokens_dir, offsets_file.name.removesuffix(".offsets.npy"))
        for start, end in pairwise(offsets):
            yield ids[start:end]


def _split_score(ids: np.ndarray, key: bytes) -> float:
    digest = hashlib.blake2b(np.ascontiguousarray(ids).tobytes(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2**64


def assign_splits(tokens_dir: Path, val_fraction: float, seed: int) -> np.ndarray:
    """True for each validation document. At least one document goes to each side when there are two."""
    key = seed.to_bytes(8, "little")
    scores = np.array([_split_score(ids, key) for ids in _documents(tokens_dir)])
    if len(scores) < 2:
        raise PipelineError(
            f"{tokens_dir} holds {len(scores)} document(s): a train/val split needs at least 2. Use a bigger "
            "corpus, or for a single text file download it with --doc-split blankline."
        )
    is_val = scores < val_fraction
    if val_fraction > 0 and not is_val.any():
        is_val[np.argmin(scores)] = True
    if is_val.all():
        is_val[np.argmax(scores)] = False
    return is_val


class _SplitWriter:
    """Rolls over to a new shard file of one split every `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, vocab_size: int, eot_id: int) -> None:
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.vocab_size, self.eot_id = vocab_size, eot_id
        self.done: list[tuple[str, ShardHeader]] = []
        self._writer: ShardWriter | None = None

    def add(self, ids: np.ndarray) -> None:
        if self._writer is None or self._writer.tokens >= self.shard_tokens:
            self.close()
            name = f"{self.split}_{len(self.done):06d}.bin"
            self._writer = ShardWriter(self.folder / name, self.vocab_size, self.eot_id)
        self._writer.add_document(ids)

    def close(self) -> None:
        if self._writer is not None:
            self.done.append((self._writer.path.name, self._writer.close()))
            self._writer = None


def run(config: ShardConfig) -> Path:
    if not 0 <= config.val_fraction < 1:
        raise PipelineError(f"--val-fraction {config.val_fraction} must be in [0, 1).")
    data = DataDir(config.data_dir)
    tokens_dir = data.tokens(config.corpus)
    tokens = read_manifest(tokens_dir, "tokenize")
    verify_files(tokens_dir, tokens)
    vocab_size, eot_id = tokens["params"]["vocab_size"], tokens["params"]["eot_id"]
    params = {"shard_tokens": config.shard_tokens, "val_fraction": config.val_fraction,
              "split_seed": config.split_seed, "vocab_size": vocab_size, "eot_id": eot_id}
    out = StageOutput(data.shards(config.corpus), "shard", FORMAT_VERSION, params, {"tokens": tokens_dir},
                      force=config.force)
    if out.up_to_date():
        return out.final
    is_val = assign_splits(tokens_dir, config.val_fraction, config.split_seed)
    with out.building() as folder:
        writers = {split: _SplitWriter(folder, split, config.shard_tokens, vocab_size, eot_id) for split in SPLITS}
        with tqdm(total=tokens["counts"]["tokens"], unit=" tok", unit_scale=True, desc=f"shard {config.corpus}") as bar:
            for ids, val in zip(_documents(tokens_dir), is_val, strict=True):
                writers["val" if val else "train"].add(ids)
                bar.update(len(ids))
        shards = []
        for split, writer in writers.items():
            writer.close()
            for name, header in writer.done:
                shards.append({"file": name, "split": split, "tokens": header.tokens, "documents": header.documents,
                               "bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)})
        index = {"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "eot_id": eot_id,
                 "tokenizer": tokens["tokenizer"], "shards": shards}
        write_json_atomic(folder / INDEX, index)
        out.counts = {f"{split}_{what}": sum(s[what] for s in shards if s["split"] == split)
                      for split in SPLITS for what in ("tokens", "documents")}
        out.extra["tokenizer"] = tokens["tokenizer"]
    log.info("shard: %s", ", ".join(f"{k} {v}" for k, v in out.counts.items()))
    return out.final


def load_index(shards_dir: Path, checksums: bool = True) -> dict[str, Any]:
    """The shard index of a shard stage output, with every shard's header checked against it."""
    manifest = read_manifest(shards_dir, "shard")
    verify_files(shards_dir, manifest, checksums=checksums)
    index = json.loads((shards_dir / INDEX).read_text())
    for entry in index["shards"]:
        header, _ = read_shard(shards_dir / entry["file"])
        if header.tokens != entry["tokens"] or header.vocab_size != index["vocab_size"]:
            raise PipelineError(
                f"{shards_dir / entry['file']} does not match {shards_dir / INDEX} (tokens {header.tokens} vs "
                f"{entry['tokens']}, vocabulary {header.vocab_size} vs {index['vocab_size']}). "
                "Rebuild with `make shard` (python -m pipeline.shard --force)."
            )
    return index


if __name__ == "__main__":
    stage_main(ShardConfig, run)
