"""Stage 2, tokenize: make or fetch a tokenizer, then turn every raw document into token ids.

--tokenizer gpt2           the GPT-2 byte-level BPE from the Hugging Face hub (cached locally after one fetch)
--tokenizer PATH           a local tokenizer folder: a Hugging Face one (tokenizer.json) or GPT-2's
                           original vocab.json + merges.txt
--tokenizer bpe:VOCAB      train a byte-level BPE of VOCAB tokens on the raw corpus (works offline)

Writes the tokenizer, in Hugging Face format, to `data/tokenizer/<name>/` and the ids to
`data/tokens/<corpus>/part_NNNNN.ids` with document boundaries in `part_NNNNN.offsets.npy`, one pair per
raw part, written as they are encoded (memory does not grow with the corpus). Encoding runs on all cores, in
tiktoken when it reproduces the tokenizer exactly (GPT-2-style byte-level BPEs), else in `tokenizers`. An
interrupted run resumes at the first part that was not finished.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import StageOutput, read_manifest, require_free_space, verify_files, write_json_atomic
from pipeline.config import DataDir, PipelineError, StageConfig, part_corpus, stage_main
from pipeline.download import read_documents
from pipeline.shards import TokenPartWriter, read_token_part, token_dtype, token_parts

log = logging.getLogger("onecard")

FORMAT_VERSION = 1
EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer regex, as OpenAI released it (and as `tokenizers`' ByteLevel uses it)
SAMPLE_DOCUMENTS, SAMPLE_CHARS = 64, 20_000
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass
class TokenizeConfig(StageConfig):
    corpus: str = field(default="builtin", metadata={"help": "corpus to tokenize (a folder under raw/)"})
    tokenizer: str = field(
        default="bpe:4096", metadata={"help": "gpt2 | a hub name | a local tokenizer folder | bpe:VOCAB_SIZE"}
    )
    part: str | None = field(default=None, metadata={"help": "I/N: tokenize one share of a split corpus"})
    batch_bytes: int = field(default=8 << 20, metadata={"help": "bytes of text encoded at a time (bounds memory)"})
    max_tokens: int | None = field(
        default=None, metadata={"help": "stop after this many tokens (at the end of the document that reaches it)"})


def tokenizer_name(spec: str, corpus: str) -> str:
    if spec.startswith("bpe:"):
        return f"{corpus}-bpe{spec[4:]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec.rstrip("/")).name).strip("-.") or "tokenizer"


def _train_bpe(vocab_size: int, raw_dir: Path) -> Any:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        read_documents(raw_dir), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False
    )
    return bpe._tokenizer


def _no_eot(spec: str) -> PipelineError:
    return PipelineError(f"tokenizer {spec!r} has no {EOT} token; onecard separates documents with it. "
                         "Use a GPT-2-style tokenizer, or train one with --tokenizer bpe:VOCAB_SIZE.")


def _gpt2_files(folder: Path, spec: str) -> Any:
    """GPT-2's original release format, vocab.json + merges.txt, as a `tokenizers` byte-level BPE."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    if bpe.token_to_id(EOT) is None:
        raise _no_eot(spec)
    bpe.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])  # keeps its id, now special
    return bpe._tokenizer


def _save(backend: Any, folder: Path) -> None:
    """A `tokenizers` tokenizer as a Hugging Face tokenizer folder that AutoTokenizer loads."""
    backend.save(str(folder / "tokenizer.json"))
    write_json_atomic(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "clean_up_tokenization_spaces": False})


def _save_pretrained(spec: str, folder: Path) -> None:
    """A tokenizer of the Hugging Face hub, or a local folder with tokenizer.json, copied through transformers."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise PipelineError(
            f"cannot load tokenizer {spec!r} ({error}). Give a hub name you can reach (e.g. gpt2), a local folder "
            "with tokenizer.json or vocab.json + merges.txt, or bpe:VOCAB to train one offline."
        ) from error
    tokenizer.save_pretrained(folder)


def build_tokenizer(config: TokenizeConfig, corpus: str, raw_dir: Path) -> Path:
    """The tokenizer folder for this corpus, trained or fetched once and reused afterwards."""
    spec = config.tokenizer
    params: dict[str, Any] = {"spec": spec}
    inputs = {}
    if spec.startswith("bpe:"):
        if not spec[4:].isdigit() or int(spec[4:]) < 258:
            raise PipelineError(f"--tokenizer {spec}: the vocabulary size must be an integer of at least 258.")
        inputs["raw"] = raw_dir  # a trained tokenizer depends on the corpus it was trained on
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser().resolve()
        params["spec"] = str(folder)
        params["files"] = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.iterdir())
    name = tokenizer_name(spec, corpus)
    out = StageOutput(DataDir(config.data_dir).tokenizer(name), "tokenizer", FORMAT_VERSION, params, inputs,
                      force=config.force)
    if out.up_to_date():
        return out.final
    with out.building() as folder:
        local = Path(spec).expanduser()
        if spec.startswith("bpe:"):
            _save(_train_bpe(int(spec[4:]), raw_dir), folder)
        elif local.is_dir() and not (local / "tokenizer.json").is_file():
            if not ((local / "vocab.json").is_file() and (local / "merges.txt").is_file()):
                raise PipelineError(
                    f"{local} holds neither tokenizer.json nor vocab.json + merges.txt: it is not a tokenizer folder.")
            _save(_gpt2_files(local, spec), folder)
        else:
            _save_pretrained(str(local) if local.is_dir() else spec, folder)
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        if backend.token_to_id(EOT) is None:
            raise _no_eot(spec)
        out.counts = {"vocab_size": backend.get_vocab_size(with_added_tokens=True), "eot_id": backend.token_to_id(EOT)}
    return out.final


def load_tokenizer(folder: Path) -> Any:
    """A tokenizer written by this stage (validated against its manifest)."""
    from transformers import AutoTokenizer

    verify_files(folder, read_manifest(folder, "tokenizer"))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def tokenizer_info(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder, "tokenizer")
    return {"name": folder.name, **manifest["counts"]}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def tiktoken_encoding(tokenizer_json: Path) -> Any:
    """The same byte-level BPE as a tiktoken Encoding (about 1.5x the speed of `tokenizers` here), or None
    when the tokenizer is not a plain GPT-2-style byte-level BPE."""
    import tiktoken

    spec = json.loads(Path(tokenizer_json).read_text())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or spec.get("normalizer") or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space") or not pre.get("use_regex", True)):
        return None
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    decoder = _byte_decoder()
    try:
        ranks = {bytes(decoder[c] for c in token): rank for token, rank in model["vocab"].items()
                 if token not in specials}
    except KeyError:
        return None
    if len({bytes([b]) for b in range(256)} - ranks.keys()):
        return None
    return tiktoken.Encoding(name=Path(tokenizer_json).parent.name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def token_counter(spec: str, data_dir: Path) -> Callable[[str], int]:
    """The number of tokens a text gets from `tokenize --tokenizer spec`, for `download --max-tokens`."""
    if spec.startswith("bpe:"):
        raise PipelineError(
            f"--count-tokenizer {spec}: a bpe: tokenizer is trained on the download itself, so it cannot count "
            "the download's tokens. Count with the GPT-2 tokenizer (--count-tokenizer gpt2, or a folder of its "
            "files), or limit the download with --max-bytes."
        )
    folder = build_tokenizer(TokenizeConfig(data_dir=data_dir, tokenizer=spec), corpus="", raw_dir=Path())
    fast = tiktoken_encoding(folder / "tokenizer.json")
    if fast is not None:
        return lambda text: len(_encode(fast, text))
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return lambda text: len(backend.encode(text, add_special_tokens=False).ids)


class Encoder:
    """JSON lines of documents to token ids (numpy arrays), on all cores.

    tiktoken where it reproduces the tokenizer exactly (checked on a sample of the first batch against
    `tokenizers`, the reference; the tests check whole corpora), in one process per core, which also parse the
    JSON (tiktoken holds the GIL for part of its work, so threads would not scale); `tokenizers`, in its own
    thread pool, otherwise. `submit` returns at once; the ids come from the function it returns.
    """

    def __init__(self, tokenizer_dir: Path, vocab_size: int, sample: list[str]) -> None:
        from tokenizers import Tokenizer

        verify_files(tokenizer_dir, read_manifest(tokenizer_dir, "tokenizer"))
        self.backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        self.fast = tiktoken_encoding(tokenizer_dir / "tokenizer.json")
        self.workers = os.cpu_count() or 1
        self.dtype = token_dtype(vocab_size)
        self.pool = None
        if self.fast is not None:
            sample = [text[:SAMPLE_CHARS] for text in sample[:SAMPLE_DOCUMENTS]]
            expected = [np.asarray(e.ids) for e in self.backend.encode_batch_fast(sample, add_special_tokens=False)]
            got = [_encode(self.fast, text) for text in sample]
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
        """Encode the JSON lines in bytes [start, end) of a download part (read where they are encoded)."""
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


def _encode_range(path: str, start: int, end: int) -> list[np.ndarray]:
    encoding, dtype = _worker
    return [_encode(encoding, text).astype(dtype) for text in _read_texts(Path(path), start, end)]


def _encode(encoding: Any, text: str) -> np.ndarray:
    """Special tokens written in the text are special, as in `tokenizers`; the scan for them costs ~7%, so it is
    only asked for when one of them occurs at all."""
    if any(special in text for special in encoding.special_tokens_set):
        return encoding.encode_to_numpy(text, allowed_special="all")
    return encoding.encode_to_numpy(text, disallowed_special=())


def _read_texts(path: Path, start: int, end: int) -> list[str]:
    with open(path, "rb") as f:
        f.seek(start)
        return [json.loads(line)["text"] for line in f.read(end - start).splitlines()]


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
    tokenizer_dir = build_tokenizer(config, corpus, raw_dir)
    info = tokenizer_info(tokenizer_dir)
    params = {"tokenizer": info["name"], "vocab_size": info["vocab_size"], "eot_id": info["eot_id"],
              "max_tokens": config.max_tokens}
    out = StageOutput(data.tokens(corpus), "tokenize", FORMAT_VERSION, params,
                      {"raw": raw_dir, "tokenizer": tokenizer_dir}, force=config.force)
    if out.up_to_date():
        return out.final
    # at 2+ bytes of text per token (GPT-2 averages over 4 on English), the ids take at most this much
    require_free_space(out.final.parent, raw["counts"]["text_bytes"] / 2 * token_dtype(info["vocab_size"]).itemsize,
                       "the token ids")
    parts = sorted(raw_dir.glob("docs_*.jsonl"))
    sample = _read_texts(parts[0], 0, _line_bounds(parts[0], 0, parts[0].stat().st_size, 1 << 20)[1]) if parts else []
    encode = Encoder(tokenizer_dir, info["vocab_size"], sample)
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


if __name__ == "__main__":
    stage_main(TokenizeConfig, run)
