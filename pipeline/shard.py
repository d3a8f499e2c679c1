"""Stage 3, shard: pack token ids into fixed-size binary shards, shuffled by document, split train/val.

    python -m pipeline.shard [--shard-tokens 100000000] [--val-fraction 0.05]
    python -m pipeline.shard --verify                   # re-check a shard set, byte for byte
    python -m pipeline.shard --part 2/4                 # the shards of one share of a split corpus
    python -m pipeline.shard --merge 4                  # the shares' shards as one set the trainer reads

Each document goes to val or train by a keyed hash of its token ids (so the split does not depend on
document order or on how the corpus was split into parts, and duplicate documents land on the same side).
Documents are written in a seeded random order, streamed into shards of --shard-tokens tokens (format in
`pipeline/shard_format.py`); `index.json` lists them with token and document counts and checksums. Memory does not
grow with the corpus: tokens and document offsets are memory-mapped, the split is recomputed from each
document's hash as it is written, and the order is a keyed bijection of the document numbers (a Feistel
cipher), computed a block at a time instead of held as a permutation array.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import (
    StageOutput,
    how_to_run,
    read_manifest,
    require_free_space,
    sha256_file,
    verify_files,
    write_json_atomic,
)
from pipeline.shard_format import (
    INDEX,
    ShardHeader,
    ShardWriter,
    load_index,
    read_shard,
    read_token_part,
    token_dtype,
    token_parts,
)
from pipeline.stage import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    PROBABILITY,
    DataDir,
    PipelineError,
    StageConfig,
    part_corpus,
    stage_main,
)

log = logging.getLogger("onecard")

FORMAT_VERSION = 1
SPLITS = ("train", "val")


@dataclass
class ShardConfig(StageConfig):
    corpus: str = field(default="builtin", metadata={"help": "corpus to shard (a folder under tokens/)"})
    part: str | None = field(default=None, metadata={"help": "I/N: shard one share of a split corpus"})
    shard_tokens: int = field(default=100_000_000, metadata={"range": AT_LEAST_ONE, "help": "tokens per shard file"})
    val_fraction: float = field(default=0.05, metadata={"range": PROBABILITY,
                                                        "help": "fraction of documents held out for validation"})
    split_seed: int = field(default=0, metadata={"range": NON_NEGATIVE,
                                                 "help": "key of the hash that assigns documents to train/val"})
    shuffle: bool = field(default=True, metadata={"help": "write the documents in a seeded random order"})
    shuffle_seed: int = field(default=0, metadata={"range": NON_NEGATIVE, "help": "seed of the document order"})
    verify: bool = field(default=False, metadata={"help": "only re-check the existing shard set, then exit"})
    merge: int | None = field(default=None, metadata={"range": AT_LEAST_ONE,
                                                      "help": "N: merge the shard sets of --part 0/N .. N-1/N"})


class TokenDocuments:
    """The documents of a tokenize output, by index, memory-mapped."""

    def __init__(self, tokens_dir: Path, vocab_size: int) -> None:
        self.parts = [read_token_part(tokens_dir, name, vocab_size) for name in token_parts(tokens_dir)]
        counts = [len(offsets) - 1 for _, offsets in self.parts]
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.first[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        part = int(np.searchsorted(self.first, index, side="right")) - 1
        ids, offsets = self.parts[part]
        local = index - int(self.first[part])
        return ids[offsets[local] : offsets[local + 1]]


PERMUTATION_BLOCK = 1 << 16
_FEISTEL_ROUNDS = 4


def _mix(values: np.ndarray, key: int) -> np.ndarray:
    """A keyed 64-bit mixing function (splitmix64's finaliser) over an array, wrapping like C."""
    z = values ^ np.uint64(key)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def shuffled_order(count: int, seed: int, block: int = PERMUTATION_BLOCK) -> Iterator[np.ndarray]:
    """A seeded permutation of range(count), a block at a time, in O(block) memory.

    A balanced Feistel network is a bijection on [0, 4**half) for any round function; values that land
    outside [0, count) are encrypted again ("cycle walking"), which keeps it a bijection on [0, count).
    """
    half = max(1, (max(count - 1, 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    keys = [int(k) for k in np.random.default_rng(seed).integers(0, 2**63, _FEISTEL_ROUNDS)]

    def encrypt(values: np.ndarray) -> np.ndarray:
        left, right = values >> np.uint64(half), values & mask
        for key in keys:
            left, right = right, left ^ (_mix(right, key) & mask)
        return (left << np.uint64(half)) | right

    for start in range(0, count, block):
        values = encrypt(np.arange(start, min(start + block, count), dtype=np.uint64))
        outside = values >= count
        while outside.any():
            values[outside] = encrypt(values[outside])
            outside = values >= count
        yield values.astype(np.int64)


class SplitAssigner:
    """Sends a document to val when a keyed hash of its token ids falls below the validation fraction.

    `prepare` makes one pass to guarantee a document on each side (when there are two): if the hash puts
    none on one side, the document with the extreme score is moved, so only three numbers are kept.
    """

    def __init__(self, val_fraction: float, seed: int) -> None:
        self.val_fraction, self.key = val_fraction, seed.to_bytes(8, "little")
        self.forced: dict[int, bool] = {}

    def score(self, ids: np.ndarray) -> float:
        digest = hashlib.blake2b(np.ascontiguousarray(ids).tobytes(), digest_size=8, key=self.key).digest()
        return int.from_bytes(digest, "little") / 2**64

    def prepare(self, documents: TokenDocuments, where: Path) -> None:
        if len(documents) < 2:
            raise PipelineError(
                f"{where} holds {len(documents)} document(s): a train/val split needs at least 2. Use a bigger "
                "corpus, or for a single text file download it with --doc-split blankline."
            )
        val_count, lowest, highest = 0, (2.0, -1), (-1.0, -1)
        for index in tqdm(range(len(documents)), desc="split", unit=" doc", unit_scale=True, leave=False):
            score = self.score(documents[index])
            val_count += score < self.val_fraction
            lowest, highest = min(lowest, (score, index)), max(highest, (score, index))
        if self.val_fraction > 0 and val_count == 0:
            self.forced[lowest[1]] = True
        if val_count == len(documents):
            self.forced[highest[1]] = False

    def is_val(self, index: int, ids: np.ndarray) -> bool:
        if index in self.forced:
            return self.forced[index]
        return self.score(ids) < self.val_fraction


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


def _finish(folder: Path, out: StageOutput, shards: list[dict[str, Any]], vocab_size: int, eot_id: int,
            tokenizer: dict[str, Any]) -> None:
    write_json_atomic(folder / INDEX, {"format_version": FORMAT_VERSION, "vocab_size": vocab_size, "eot_id": eot_id,
                                       "tokenizer": tokenizer, "shards": shards})
    out.hashed = {s["file"]: {"path": s["file"], "bytes": s["bytes"], "sha256": s["sha256"]} for s in shards}
    out.counts = {f"{split}_{what}": sum(s[what] for s in shards if s["split"] == split)
                  for split in SPLITS for what in ("tokens", "documents")}
    out.extra["tokenizer"] = tokenizer


def _shard_entry(folder: Path, name: str, split: str, header: ShardHeader) -> dict[str, Any]:
    return {"file": name, "split": split, "tokens": header.tokens, "documents": header.documents,
            "bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}


def run(config: ShardConfig) -> Path:
    data = DataDir(config.data_dir)
    if config.verify:
        return verify(data.shards(part_corpus(config.corpus, config.part)))
    if config.merge is not None:
        return merge(config)
    if not 0 <= config.val_fraction < 1:
        raise PipelineError(f"--val-fraction {config.val_fraction} must be in [0, 1).")
    corpus = part_corpus(config.corpus, config.part)
    tokens_dir = data.tokens(corpus)
    tokens = read_manifest(tokens_dir, "tokenize")
    verify_files(tokens_dir, tokens)
    vocab_size, eot_id = tokens["params"]["vocab_size"], tokens["params"]["eot_id"]
    params = {"shard_tokens": config.shard_tokens, "val_fraction": config.val_fraction,
              "split_seed": config.split_seed, "shuffle": config.shuffle, "shuffle_seed": config.shuffle_seed,
              "vocab_size": vocab_size, "eot_id": eot_id}
    out = StageOutput(data.shards(corpus), "shard", FORMAT_VERSION, params, {"tokens": tokens_dir},
                      force=config.force)
    if out.up_to_date():
        return out.final
    total_tokens = tokens["counts"]["tokens"] + tokens["counts"]["documents"]  # one end-of-text per document
    require_free_space(out.final.parent, total_tokens * token_dtype(vocab_size).itemsize, "the shards")
    documents = TokenDocuments(tokens_dir, vocab_size)
    splits = SplitAssigner(config.val_fraction, config.split_seed)
    splits.prepare(documents, tokens_dir)
    blocks = (shuffled_order(len(documents), config.shuffle_seed, PERMUTATION_BLOCK) if config.shuffle
              else (np.arange(start, min(start + PERMUTATION_BLOCK, len(documents)))
                    for start in range(0, len(documents), PERMUTATION_BLOCK)))
    with out.building() as folder:
        writers = {split: _SplitWriter(folder, split, config.shard_tokens, vocab_size, eot_id) for split in SPLITS}
        with tqdm(total=tokens["counts"]["tokens"], unit=" tok", unit_scale=True, desc=f"shard {corpus}") as bar:
            for block in blocks:
                for index in block.tolist():
                    ids = documents[index]
                    writers["val" if splits.is_val(index, ids) else "train"].add(ids)
                    bar.update(len(ids))
        shards = []
        for split, writer in writers.items():
            writer.close()
            shards += [_shard_entry(folder, name, split, header) for name, header in writer.done]
        _finish(folder, out, shards, vocab_size, eot_id, tokens["tokenizer"])
    log.info("shard: %s", ", ".join(f"{k} {v}" for k, v in out.counts.items()))
    return out.final


def merge(config: ShardConfig) -> Path:
    """One shard set from the sets of --part 0/N .. N-1/N: the files are linked (or copied) and renumbered."""
    data = DataDir(config.data_dir)
    count = config.merge
    if not count or count < 1:
        raise PipelineError(f"--merge {count}: give the number of parts, N of --part I/N.")
    parts = [data.shards(part_corpus(config.corpus, f"{i}/{count}")) for i in range(count)]
    indexes = [load_index(folder, checksums=False) for folder in parts]
    reference = {k: indexes[0][k] for k in ("vocab_size", "eot_id", "tokenizer")}
    for folder, index in zip(parts, indexes, strict=True):
        mismatch = [k for k, v in reference.items() if index[k] != v]
        if mismatch:
            raise PipelineError(
                f"{folder} was tokenized differently from {parts[0]} ({', '.join(mismatch)} differ): the parts of a "
                "corpus must share one tokenizer. Give every part the same --tokenizer (a hub name or a folder; "
                "a bpe: tokenizer is trained per part), then rebuild the parts."
            )
    out = StageOutput(data.shards(config.corpus), "shard", FORMAT_VERSION, {"merged_parts": count},
                      {f"part {i}": folder for i, folder in enumerate(parts)}, force=config.force)
    if out.up_to_date():
        return out.final
    with out.building() as folder:
        shards = []
        for part_folder, index in zip(parts, indexes, strict=True):
            for entry in index["shards"]:
                number = sum(s["split"] == entry["split"] for s in shards)
                name = f"{entry['split']}_{number:06d}.bin"
                try:
                    os.link(part_folder / entry["file"], folder / name)  # no copy on the same filesystem
                except OSError:
                    shutil.copyfile(part_folder / entry["file"], folder / name)
                shards.append({**entry, "file": name})
        _finish(folder, out, shards, reference["vocab_size"], reference["eot_id"], reference["tokenizer"])
    log.info("shard: merged %d parts into %s: %s", count, out.final,
             ", ".join(f"{k} {v}" for k, v in out.counts.items()))
    return out.final


def verify(shards_dir: Path) -> Path:
    """Re-check a shard set: every file's size and sha256, every header against the index, every token id."""
    index = load_index(shards_dir, checksums=True)
    for entry in tqdm(index["shards"], desc=f"verify {shards_dir.name}", unit=" shard"):
        _, tokens = read_shard(shards_dir / entry["file"])
        where = shards_dir / entry["file"]
        if len(tokens) and (tokens[0] != index["eot_id"] or int(tokens.max()) >= index["vocab_size"]):
            raise PipelineError(f"{where} holds token ids outside the vocabulary or does not start a document. "
                                f"Rebuild with {how_to_run('shard', force=True)}.")
        if int(np.count_nonzero(tokens == index["eot_id"])) < entry["documents"]:
            raise PipelineError(f"{where} has fewer end-of-text tokens than its {entry['documents']} documents. "
                                f"Rebuild with {how_to_run('shard', force=True)}.")
    log.info("verify: %s is intact (%d shards, %d tokens)", shards_dir, len(index["shards"]),
             sum(s["tokens"] for s in index["shards"]))
    return shards_dir


def main(argv: list[str] | None = None) -> None:
    stage_main(ShardConfig, run, argv)


if __name__ == "__main__":
    main()
