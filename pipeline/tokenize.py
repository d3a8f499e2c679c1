"""Stage 2, tokenize: make or fetch a tokenizer, then turn every raw document into token ids.

--tokenizer gpt2           the GPT-2 byte-level BPE from the Hugging Face hub (cached locally after one fetch)
--tokenizer PATH           a local tokenizer folder: a Hugging Face one (tokenizer.json) or GPT-2's
                           original vocab.json + merges.txt
--tokenizer bpe:VOCAB      train a byte-level BPE of VOCAB tokens on the raw corpus (works offline)

Writes the tokenizer, in Hugging Face format, to `data/tokenizer/<name>/` and the ids to
`data/tokens/<corpus>/part_NNNNN.ids.npy` with document boundaries in `part_NNNNN.offsets.npy`, one pair per
raw part. Encoding runs in the `tokenizers` library's Rust thread pool, on all cores.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.artifacts import StageOutput, read_manifest, verify_files
from pipeline.config import DataDir, PipelineError, StageConfig, stage_main
from pipeline.download import read_documents
from pipeline.shards import token_dtype, write_token_part

log = logging.getLogger("onecard")

FORMAT_VERSION = 1
EOT = "<|endoftext|>"


@dataclass
class TokenizeConfig(StageConfig):
    corpus: str = field(default="builtin", metadata={"help": "corpus to tokenize (a folder under raw/)"})
    tokenizer: str = field(
        default="bpe:4096", metadata={"help": "gpt2 | a hub name | a local tokenizer folder | bpe:VOCAB_SIZE"}
    )
    batch_docs: int = field(default=256, metadata={"help": "documents per encode_batch call"})


def tokenizer_name(spec: str, corpus: str) -> str:
    if spec.startswith("bpe:"):
        return f"{corpus}-bpe{spec[4:]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec.rstrip("/")).name).strip("-.") or "tokenizer"


def _wrap(backend: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, bos_token=EOT, unk_token=EOT)


def _train_bpe(vocab_size: int, raw_dir: Path) -> Any:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        read_documents(raw_dir), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False
    )
    return _wrap(bpe)


def _no_eot(spec: str) -> PipelineError:
    return PipelineError(f"tokenizer {spec!r} has no {EOT} token; onecard separates documents with it. "
                         "Use a GPT-2-style tokenizer, or train one with --tokenizer bpe:VOCAB_SIZE.")


def _load_pretrained(spec: str) -> Any:
    from transformers import AutoTokenizer

    folder = Path(spec).expanduser()
    if folder.is_dir() and not (folder / "tokenizer.json").is_file():
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            from tokenizers import ByteLevelBPETokenizer

            bpe = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
            if bpe.token_to_id(EOT) is None:  # checked before wrapping, which would add it as a new token
                raise _no_eot(spec)
            return _wrap(bpe)
        raise PipelineError(
            f"{folder} holds neither tokenizer.json nor vocab.json + merges.txt: it is not a tokenizer folder."
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder) if folder.is_dir() else spec, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise PipelineError(
            f"cannot load tokenizer {spec!r} ({error}). Give a hub name you can reach (e.g. gpt2), a local folder "
            "with tokenizer.json or vocab.json + merges.txt, or bpe:VOCAB to train one offline."
        ) from error


def build_tokenizer(config: TokenizeConfig, raw_dir: Path) -> Path:
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
    name = tokenizer_name(spec, config.corpus)
    out = StageOutput(DataDir(config.data_dir).tokenizer(name), "tokenizer", FORMAT_VERSION, params, inputs,
                      force=config.force)
    if out.up_to_date():
        return out.final
    with out.building() as folder:
        tokenizer = _train_bpe(int(spec[4:]), raw_dir) if spec.startswith("bpe:") else _load_pretrained(spec)
        if EOT not in tokenizer.get_vocab():
            raise _no_eot(spec)
        eot_id = tokenizer.convert_tokens_to_ids(EOT)
        tokenizer.save_pretrained(folder)
        out.counts = {"vocab_size": len(tokenizer), "eot_id": eot_id}
    return out.final


def load_tokenizer(folder: Path) -> Any:
    """A tokenizer written by this stage (validated against its manifest)."""
    from transformers import AutoTokenizer

    verify_files(folder, read_manifest(folder, "tokenizer"))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def tokenizer_info(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder, "tokenizer")
    return {"name": folder.name, **manifest["counts"]}


def run(config: TokenizeConfig) -> Path:
    data = DataDir(config.data_dir)
    raw_dir = data.raw(config.corpus)
    raw = read_manifest(raw_dir, "download")
    verify_files(raw_dir, raw)
    tokenizer_dir = build_tokenizer(config, raw_dir)
    info = tokenizer_info(tokenizer_dir)
    params = {"tokenizer": info["name"], "vocab_size": info["vocab_size"], "eot_id": info["eot_id"]}
    out = StageOutput(data.tokens(config.corpus), "tokenize", FORMAT_VERSION, params,
                      {"raw": raw_dir, "tokenizer": tokenizer_dir}, force=config.force)
    if out.up_to_date():
        return out.final
    backend = load_tokenizer(tokenizer_dir).backend_tokenizer
    dtype = token_dtype(info["vocab_size"])
    documents = tokens = 0
    with out.building() as folder, tqdm(total=raw["counts"]["text_bytes"], unit="B", unit_scale=True,
                                        desc=f"tokenize {config.corpus}") as bar:
        for index, part in enumerate(sorted(raw_dir.glob("docs_*.jsonl"))):
            chunks, lengths = [], []
            with open(part, encoding="utf-8") as f:
                while batch := [json.loads(line)["text"] for line in islice(f, config.batch_docs)]:
                    for encoding in backend.encode_batch(batch, add_special_tokens=False):
                        chunks.append(np.asarray(encoding.ids, dtype=dtype))
                        lengths.append(len(encoding.ids))
                    bar.update(sum(len(text.encode("utf-8")) for text in batch))
            ids = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
            write_token_part(folder, f"part_{index:05d}", ids, np.concatenate([[0], np.cumsum(lengths)]))
            documents += len(lengths)
            tokens += len(ids)
        out.counts = {"documents": documents, "tokens": tokens}
        out.extra["tokenizer"] = info
    log.info("tokenize: %d documents, %d tokens (%s, vocabulary %d)", documents, tokens, info["name"],
             info["vocab_size"])
    return out.final


if __name__ == "__main__":
    stage_main(TokenizeConfig, run)
