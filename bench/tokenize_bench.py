"""Data preparation at scale, side by side: onecard's tokenize + shard stages against the reference approach of
nanoGPT / llm.c (`bench/reference_prepare.py`: tiktoken + multiprocessing into uint16 .bin files), on the
same corpus with the same GPT-2 tokenizer, on this machine's cores.

    python bench/tokenize_bench.py --source ../shared/data/gutenberg --copies 4 \\
        --tokenizer ../shared/data/gpt2-tokenizer --work /tmp/tokenize-bench --out docs/bench/tokenize

The corpus is --copies copies of the --source folder (one document per file). Each system runs in its own
processes; wall time covers tokenizing and writing shards (for onecard: `pipeline.tokenize` then
`pipeline.shard`, manifests and checksums included; its download stage, which only converts the text to
JSON lines, is timed separately). Peak RSS is the whole process tree's, sampled every 50 ms. onecard is also
run on a tenth of the corpus, to show whether its memory grows with the corpus.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from common import REPO, write_result

from pipeline.stage import parse_config

GIB = 1 << 30


@dataclass
class TokenizeBenchConfig:
    source: Path = field(default=Path("../shared/data/gutenberg"), metadata={"help": "folder of .txt files"})
    copies: int = field(default=4, metadata={"help": "copies of the source that make the corpus"})
    tokenizer: Path = field(default=Path("../shared/data/gpt2-tokenizer"), metadata={"help": "GPT-2 files"})
    work: Path = field(default=Path("/tmp/tokenize-bench"), metadata={"help": "scratch folder (emptied)"})
    out: Path = field(default=Path("docs/bench/tokenize"), metadata={"help": "where the JSON records go"})


def measure(commands: list[list[str]]) -> tuple[float, float]:
    """(wall seconds, peak RSS of the process tree in GiB) of running the commands one after the other."""
    peak, started = 0, time.perf_counter()
    for command in commands:
        process = psutil.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while process.poll() is None:
            try:
                tree = [process, *process.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
    return time.perf_counter() - started, peak / GIB


def make_corpus(config: TokenizeBenchConfig, name: str, fraction: float) -> tuple[Path, int]:
    """A folder of links to the source files, `copies` times over; the first `fraction` of that."""
    files = sorted(config.source.resolve().glob("*.txt"))
    target = fraction * config.copies * sum(p.stat().st_size for p in files)
    folder, total = config.work / name, 0
    for copy in range(config.copies):
        (folder / f"copy{copy}").mkdir(parents=True)
        for path in files:
            if total >= target:
                return folder, total
            (folder / f"copy{copy}" / path.name).symlink_to(path)
            total += path.stat().st_size
    return folder, total


def record(system: str, corpus_bytes: int, tokens: int, seconds: float, rss: float, command: str,
           extra: dict[str, Any]) -> dict[str, Any]:
    return {"system": system, "benchmark": "tokenize", "corpus_bytes": corpus_bytes, "tokens": tokens,
            "seconds": round(seconds, 2), "tokens_per_second": tokens / seconds,
            "tokens_per_second_per_core": tokens / seconds / (os.cpu_count() or 1), "peak_host_rss_gib": rss,
            "cores": os.cpu_count(), "command": command, "date": time.strftime("%Y-%m-%d"), **extra}


def run_onecard(config: TokenizeBenchConfig, corpus: Path, corpus_bytes: int, data: Path) -> dict[str, Any]:
    python, common = sys.executable, ["--data-dir", str(data), "--corpus", "bench"]
    download_seconds, _ = measure([[python, "-m", "pipeline.download", "--source", str(corpus), *common]])
    stages = [[python, "-m", "pipeline.tokenize", "--tokenizer", str(config.tokenizer.resolve()), *common],
              [python, "-m", "pipeline.shard", *common]]
    seconds, rss = measure(stages)
    counts = json.loads((data / "shards" / "bench" / "manifest.json").read_text())["counts"]
    tokens = counts["train_tokens"] + counts["val_tokens"]
    output = sum(p.stat().st_size for p in (data / "shards" / "bench").iterdir())
    return record("onecard", corpus_bytes, tokens, seconds, rss, " && ".join(" ".join(c) for c in stages),
                  {"output_bytes": output, "download_seconds": round(download_seconds, 2),
                   "encoder": json.loads((data / "tokens" / "bench" / "manifest.json").read_text())["encoder"]})


def main() -> None:
    config = parse_config(TokenizeBenchConfig, sys.argv[1:])
    shutil.rmtree(config.work, ignore_errors=True)
    big, big_bytes = make_corpus(config, "corpus", 1)
    small, small_bytes = make_corpus(config, "corpus-tenth", 0.1)
    records = {
        "onecard": run_onecard(config, big, big_bytes, config.work / "data"),
        "onecard-tenth": run_onecard(config, small, small_bytes, config.work / "data-tenth"),
    }
    command = [sys.executable, "bench/reference_prepare.py", "--source", str(big), "--tokenizer",
               str(config.tokenizer.resolve()), "--out", str(config.work / "reference")]
    seconds, rss = measure([command])
    shards = list((config.work / "reference").glob("*.bin"))
    tokens = sum((p.stat().st_size - 1024) // 2 for p in shards)
    records["reference"] = record("reference", big_bytes, tokens, seconds, rss, " ".join(command),
                                  {"output_bytes": sum(p.stat().st_size for p in shards)})
    for name, entry in records.items():
        write_result(config.out / f"{name}.json", entry)
    print("| system | corpus MB | tokens | seconds | tokens/s | tokens/s/core | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in records.items():
        print(f"| {name} | {r['corpus_bytes'] / 1e6:.0f} | {r['tokens']:,} | {r['seconds']} | "
              f"{r['tokens_per_second']:,.0f} | {r['tokens_per_second_per_core']:,.0f} | "
              f"{r['peak_host_rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
