"""Stage 2, tokenize: make or fetch a tokenizer, then turn every raw document into token ids.

--tokenizer gpt2           the GPT-2 byte-level BPE from the Hugging Face hub (cached locally after one fetch);
                           any model's hub id the same way (Qwen/Qwen2.5-1.5B, HuggingFaceTB/SmolLM2-1.7B, ...)
--tokenizer PATH           a local tokenizer folder: a Hugging Face one (tokenizer.json, BPE or Unigram) or GPT-2's
                           original vocab.json + merges.txt
--tokenizer bpe:VOCAB      train a byte-level BPE of VOCAB tokens on the raw corpus (works offline)

Writes the tokenizer, in Hugging Face format, to `data/tokenizer/<name>/` and the ids to
`data/tokens/<corpus>/part_NNNNN.ids` with document boundaries in `part_NNNNN.offsets.npy`, one pair per
raw part, written as they are encoded (memory does not grow with the corpus). A document starts with the
tokenizer's beginning-of-text token where it puts one before a text (Llama, Mistral); the shards put its end-of-text
token between documents. Encoding runs on all cores, in
tiktoken when it reproduces the tokenizer exactly (GPT-2-style byte-level BPEs), else in `tokenizers`. An
interrupted run resumes at the first part that was not finished.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import StageOutput, read_manifest, require_free_space, verify_files
from pipeline.documents import document_parts, document_text
from pipeline.shard_format import TokenPartWriter, read_token_part, token_dtype, token_parts
from pipeline.stage import AT_LEAST_ONE, DataDir, StageConfig, part_corpus, stage_main
from pipeline.tokenizer import build_tokenizer, encode, text_tokenizer, tiktoken_encoding, tokenizer_info

log = logging.getLogger("onecard")

FORMAT_VERSION = 2  # 2: special-token strings inside documents are encoded as text (1 gave them control ids)
SAMPLE_DOCUMENTS, SAMPLE_CHARS = 64, 20_000


@dataclass
class TokenizeConfig(StageConfig):
    corpus: str = field(default="builtin", metadata={"help": "corpus to tokenize (a folder under raw/)"})
    tokenizer: str = field(
        default="bpe:4096", metadata={"help": "gpt2 | a hub name | a local tokenizer folder | bpe:VOCAB_SIZE"}
    )
    part: str | None = field(default=None, metadata={"help": "I/N: tokenize one share of a split corpus"})
    batch_bytes: int = field(default=8 << 20, metadata={"range": AT_LEAST_ONE,
                                                        "help": "bytes of text encoded at a time (bounds memory)"})
    max_tokens: int | None = field(
        default=None, metadata={"range": AT_LEAST_ONE,
                                "help": "stop after this many tokens (at the end of the document that reaches it)"})


class Encoder:
    """JSON lines of documents to token ids (numpy arrays), on all cores.

    tiktoken where it reproduces the tokenizer exactly (checked on a sample of the first batch against
    `tokenizers`, the reference; the tests check whole corpora), in one process per core, which also parse the
    JSON (tiktoken holds the GIL for part of its work, so threads would not scale); `tokenizers`, in its own
    thread pool, otherwise. `submit` returns at once; the ids come from the function it returns.
    """

    def __init__(self, tokenizer_dir: Path, vocab_size: int, sample: list[str], bos_id: int | None) -> None:
        verify_files(tokenizer_dir, read_manifest(tokenizer_dir, "tokenizer"))
        self.backend = text_tokenizer(tokenizer_dir / "tokenizer.json")
        self.fast = tiktoken_encoding(tokenizer_dir / "tokenizer.json")
        self.workers = os.cpu_count() or 1
        self.dtype = token_dtype(vocab_size)
        self.bos = None if bos_id is None else np.array([bos_id], dtype=self.dtype)
        self.pool = None
        if self.fast is not None:
            sample = [text[:SAMPLE_CHARS] for text in sample[:SAMPLE_DOCUMENTS]]
            expected = [np.asarray(e.ids) for e in self.backend.encode_batch_fast(sample, add_special_tokens=False)]
            got = [encode(self.fast, text) for text in sample]
            if any(len(a) != len(b) or (a != b).any() for a, b in zip(got, expected, strict=True)):
                log.warning("tokenize: tiktoken disagrees with tokenizers on this tokenizer; using tokenizers")
                self.fast = None
            else:
                self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_start_worker,
                                                initargs=(str(tokenizer_dir / "tokenizer.json"), self.dtype.str))
                for _ in range(self.workers):  # start them now: their start-up overlaps the caller's work
                    self.pool.submit(int)

    @property
    def library(self) -> str:
        return "tokenizers" if self.fast is None else "tiktoken"

    def submit(self, path: Path, start: int, end: int) -> Callable[[], list[np.ndarray]]:
        """Encode the JSON lines in bytes [start, end) of a download part (read where they are encoded), each
        document after the beginning-of-text token when the tokenizer has one."""
        encoded = self._submit(path, start, end)
        if self.bos is None:
            return encoded
        return lambda: [np.concatenate((self.bos, ids)) for ids in encoded()]

    def _submit(self, path: Path, start: int, end: int) -> Callable[[], list[np.ndarray]]:
        if self.pool is None:
            encodings = self.backend.encode_batch_fast(_read_texts(path, start, end), add_special_tokens=False)
            result = [np.asarray(e.ids, dtype=self.dtype) for e in encodings]
            return lambda: result
        step = max(1, (end - start) // (4 * self.workers))
        bounds = _line_bounds(path, start, end, step)
        futures = [self.pool.submit(_encode_range, str(path), a, b) for a, b in pairwise(bounds)]
        return lambda: [ids for future in futures for ids in future.result()]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


_worker: tuple[Any, np.dtype] | None = None


def _start_worker(tokenizer_json: str, dtype: str) -> None:
    global _worker
    _worker = (tiktoken_encoding(Path(tokenizer_json)), np.dtype(dtype))
    threading.Thread(target=_exit_with_parent, daemon=True).start()


def _exit_with_parent() -> None:
    """An idle worker waits on a queue whose pipe it holds both ends of, so a tokenize killed -9 would leave it
    waiting for ever: it exits when the parent's sentinel says the parent is gone."""
    multiprocessing.connection.wait([multiprocessing.parent_process().sentinel])
    os._exit(1)


def _encode_range(path: str, start: int, end: int) -> list[np.ndarray]:
    encoding, dtype = _worker
    return [encode(encoding, text).astype(dtype) for text in _read_texts(Path(path), start, end)]


def _read_texts(path: Path, start: int, end: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(start)
        return [document_text(line) for line in f.read(end - start).splitlines()]


def _line_bounds(path: Path, start: int, end: int, step: int) -> list[int]:
    """Offsets from start to end, about `step` apart, each at the start of a line."""
    bounds = [start]
    with open(path, "rb") as f:
        while bounds[-1] < end:
            f.seek(min(bounds[-1] + step, end))
            if f.tell() < end:
                f.readline()
            bounds.append(min(f.tell(), end))
    return bounds


def _tokenize_part(part: Path, writer: TokenPartWriter, encode: Encoder, batch_bytes: int, budget: int | None,
                   bar: tqdm) -> tuple[int, int]:
    """Encode one download part into `writer`, one batch encoding while the one before is written; stop after
    the document that uses up `budget` tokens. Returns (documents, tokens) written."""
    documents = tokens = 0
    pending: deque[tuple[Callable[[], list[np.ndarray]], int]] = deque()

    def write(result: Callable[[], list[np.ndarray]], size: int) -> bool:
        nonlocal documents, tokens
        encoded = result()
        if budget is not None:
            lengths = np.cumsum([len(ids) for ids in encoded])
            encoded = encoded[: int(np.searchsorted(lengths, budget - tokens)) + 1]
        tokens += writer.add(encoded)
        documents += len(encoded)
        bar.update(size)
        return budget is not None and tokens >= budget

    for start, end in pairwise(_line_bounds(part, 0, part.stat().st_size, batch_bytes)):
        pending.append((encode.submit(part, start, end), end - start))
        if len(pending) == 2 and write(*pending.popleft()):
            return documents, tokens
    while pending:
        if write(*pending.popleft()):
            break
    return documents, tokens


def run(config: TokenizeConfig) -> Path:
    data = DataDir(config.data_dir)
    corpus = part_corpus(config.corpus, config.part)
    raw_dir = data.raw(corpus)
    raw = read_manifest(raw_dir, "download")
    verify_files(raw_dir, raw, checksums=False)  # checksums below, while the encoder processes start
    tokenizer_dir = build_tokenizer(config.tokenizer, data, corpus, raw_dir, force=config.force)
    info = tokenizer_info(tokenizer_dir)
    params = {"tokenizer": info["name"], "vocab_size": info["vocab_size"], "eot_id": info["eot_id"],
              "max_tokens": config.max_tokens}
    bos_id = info.get("bos_id")  # tokenizers made before onecard knew beginning-of-text tokens: none
    if bos_id is not None:
        params["bos_id"] = bos_id
    out = StageOutput(data.tokens(corpus), "tokenize", FORMAT_VERSION, params,
                      {"raw": raw_dir, "tokenizer": tokenizer_dir}, force=config.force)
    if out.up_to_date():
        return out.final
    # at 2+ bytes of text per token (GPT-2 averages over 4 on English), the ids take at most this much
    require_free_space(out.final.parent, raw["counts"]["text_bytes"] / 2 * token_dtype(info["vocab_size"]).itemsize,
                       "the token ids")
    parts = document_parts(raw_dir)
    sample = _read_texts(parts[0], 0, _line_bounds(parts[0], 0, parts[0].stat().st_size, 1 << 20)[1]) if parts else []
    encode = Encoder(tokenizer_dir, info["vocab_size"], sample, bos_id)
    verify_files(raw_dir, raw)
    documents = tokens = 0
    with out.building(resumable=True) as folder, tqdm(total=sum(p.stat().st_size for p in parts), unit="B",
                                                      unit_scale=True, desc=f"tokenize {corpus}") as bar:
        for index, part in enumerate(parts):
            if config.max_tokens is not None and tokens >= config.max_tokens:
                break
            name = f"part_{index:05d}"
            if name in token_parts(folder):  # done before an interruption
                ids, offsets = read_token_part(folder, name, info["vocab_size"])
                documents, tokens = documents + len(offsets) - 1, tokens + len(ids)
                bar.update(part.stat().st_size)
                continue
            writer = TokenPartWriter(folder, name, info["vocab_size"])
            budget = None if config.max_tokens is None else config.max_tokens - tokens
            added_documents, added_tokens = _tokenize_part(part, writer, encode, config.batch_bytes, budget, bar)
            entry = writer.close()
            out.hashed[entry["path"]] = entry
            documents, tokens = documents + added_documents, tokens + added_tokens
        encode.close()
        out.counts = {"documents": documents, "tokens": tokens}
        out.extra["tokenizer"] = info
        out.extra["encoder"] = encode.library
    log.info("tokenize: %d documents, %d tokens (%s, vocabulary %d, encoded with %s)", documents, tokens,
             info["name"], info["vocab_size"], encode.library)
    return out.final


def main(argv: list[str] | None = None) -> None:
    stage_main(TokenizeConfig, run, argv)


if __name__ == "__main__":
    main()
