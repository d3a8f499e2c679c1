"""How fast the trainer's data loader delivers batches, against how fast GPT-2 XL could possibly consume them.

    python bench/loader_bench.py --corpus gutenberg --out docs/bench/loader.json

The ceiling of consumption is an H100 at 100% of its dense bf16 peak (989.4 TFLOP/s) training GPT-2 XL at
sequence 1024: peak / FLOPs per token. Measured here: the loader alone (`TrainBatches.get` in a loop), the
trainer's PyTorch DataLoader (`pipeline.data.micro_batch_loader`, no workers) drained as fast as possible, and
the DataLoader feeding a consumer that spends that ceiling's step time on each micro-batch (sleeping, as a
GPU-bound step leaves the CPU free), recording how long the consumer waited for data.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import REPO, write_result

from pipeline.data import TokenSequences, TrainBatches, micro_batch_loader
from pipeline.hardware import lookup_gpu
from pipeline.model import build_model, flops_per_token
from pipeline.shard_format import load_index
from pipeline.stage import DataDir, default_data_dir, parse_config


@dataclass
class LoaderBenchConfig:
    data_dir: Path = field(default_factory=default_data_dir, metadata={"help": "onecard data directory"})
    corpus: str = field(default="builtin", metadata={"help": "corpus whose shards to read"})
    seq_len: int = field(default=1024, metadata={"help": "sequence length"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    batches: int = field(default=2000, metadata={"help": "micro-batches per measurement"})
    out: Path = field(default=Path("docs/bench/loader.json"), metadata={"help": "where the record goes"})


def main() -> None:
    config = parse_config(LoaderBenchConfig, sys.argv[1:])
    shards = DataDir(config.data_dir).shards(config.corpus)
    index = load_index(shards, checksums=False)
    batches = TrainBatches(TokenSequences(shards, index, "train", config.seq_len), 0, config.micro_batch_size, 1, 1)
    tokens_per_batch = config.micro_batch_size * config.seq_len

    with torch.device("meta"):
        xl_flops = flops_per_token(build_model("gpt2-xl", 50257, 50256), config.seq_len)
    ceiling = lookup_gpu("H100 80GB HBM3").bf16_tflops * 1e12 / xl_flops  # tokens/s at 100% MFU

    started = time.perf_counter()
    for step in range(config.batches):
        batches.get(step, 0, 0)
    direct = config.batches * tokens_per_batch / (time.perf_counter() - started)

    loader = iter(micro_batch_loader(batches, 0, 0, config.batches))
    started = time.perf_counter()
    for _ in range(config.batches):
        next(loader)
    through_dataloader = config.batches * tokens_per_batch / (time.perf_counter() - started)

    step_seconds = tokens_per_batch / ceiling
    steps = min(config.batches, int(20 / step_seconds))  # about 20 seconds of simulated training
    loader, waited = iter(micro_batch_loader(batches, 0, 0, steps)), 0.0
    started = time.perf_counter()
    for _ in range(steps):
        asked = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - asked
        time.sleep(step_seconds)
    fed_seconds = time.perf_counter() - started

    record = {
        "benchmark": "loader", "corpus": config.corpus, "seq_len": config.seq_len,
        "micro_batch_size": config.micro_batch_size, "cores": os.cpu_count(),
        "gpt2_xl_h100_ceiling_tokens_per_second": ceiling,
        "loader_tokens_per_second": direct, "dataloader_tokens_per_second": through_dataloader,
        "loader_over_ceiling": direct / ceiling, "dataloader_over_ceiling": through_dataloader / ceiling,
        "fed_steps": steps, "fed_step_seconds": step_seconds, "fed_wait_seconds": waited,
        "fed_wait_fraction": waited / fed_seconds,
        "command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d"),
    }
    write_result(REPO / config.out if not config.out.is_absolute() else config.out, record)
    for key, value in record.items():
        print(f"{key}: {value:,.4g}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
