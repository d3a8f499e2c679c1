"""The reference data preparation that onecard's tokenize + shard stages are measured against.

Written here in the manner of nanoGPT's `data/openwebtext/prepare.py` and llm.c's `dev/data/fineweb.py`: the
GPT-2 encoding of tiktoken (`encode_ordinary`), a multiprocessing pool over the documents, an end-of-text
token before each document, and flat uint16 `.bin` shards of --shard-tokens tokens (with the 256 x int32
header llm.c writes). No manifests, no checksums, no train/val split by document, no resume.

    python bench/reference_prepare.py --source FOLDER_OF_TXT --tokenizer ../shared/data/gpt2-tokenizer --out DIR
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
from pathlib import Path

import numpy as np

EOT = 50256
_encoding = None


def _load_encoding(tokenizer: str) -> None:
    global _encoding
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken would otherwise cache local files by path, stale when they change
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=f"{tokenizer}/merges.txt",
                                            encoder_json_file=f"{tokenizer}/vocab.json")
    _encoding = tiktoken.Encoding(
        "gpt2", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT})


def tokenize(path: Path) -> np.ndarray:
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return np.array([EOT, *_encoding.encode_ordinary(text)], dtype=np.uint16)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shard-tokens", type=int, default=100_000_000)
    parser.add_argument("--processes", type=int, default=os.cpu_count())
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    files = sorted(args.source.rglob("*.txt"))
    buffer = np.empty(args.shard_tokens, dtype=np.uint16)
    filled = shard = 0
    with multiprocessing.Pool(args.processes, initializer=_load_encoding, initargs=(args.tokenizer,)) as pool:
        for tokens in pool.imap(tokenize, files, chunksize=4):
            while len(tokens):
                take = min(len(tokens), args.shard_tokens - filled)
                buffer[filled : filled + take] = tokens[:take]
                filled, tokens = filled + take, tokens[take:]
                if filled == args.shard_tokens:
                    write_shard(args.out / f"shard_{shard:06d}.bin", buffer)
                    filled, shard = 0, shard + 1
    if filled:
        write_shard(args.out / f"shard_{shard:06d}.bin", buffer[:filled])


if __name__ == "__main__":
    main()
