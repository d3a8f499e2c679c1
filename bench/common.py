"""What the training-throughput benchmark's workers share: their options, their data, and the result record.

Every system trains the same model (a `pipeline.model` preset) on the same batches (`pipeline.data`, from the
same shards) and reports one JSON object with the keys of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the workers run as scripts: make `pipeline` importable

from pipeline.data import TokenSequences, TrainBatches  # noqa: E402
from pipeline.distributed import launch_time  # noqa: E402
from pipeline.hardware import MemoryProbe, device_name, peak_tflops  # noqa: E402
from pipeline.model import GPT2_VOCAB_SIZE, build_model, default_seq_len, flops_per_token, model_config  # noqa: E402
from pipeline.precision import detect  # noqa: E402
from pipeline.shard_format import load_index  # noqa: E402
from pipeline.stage import DataDir, default_data_dir  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = field(default="tiny", metadata={"help": "model preset"})
    seq_len: int | None = field(default=None, metadata={"help": "sequence length (default: the preset's context)"})
    steps: int = field(default=20, metadata={"help": "optimizer steps to run"})
    warmup_steps: int = field(default=3, metadata={"help": "first steps left out of the throughput"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per forward pass"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    precision: str = field(default="auto", metadata={"help": "bf16 or fp32, or auto: the device's (onecard's `auto`)"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute every block's activations in the backward pass, in every system"})
    torch_compile: bool = field(
        default=False, metadata={"help": "the Hugging Face Trainer's own speed flag: torch_compile=True"})
    lr: float = field(default=3e-4, metadata={"help": "learning rate, constant in every system (no schedule)"})
    gpu_mem_cap: float | None = field(default=None, metadata={"help": "GPU allocator cap in GiB"})
    data_dir: Path = field(default_factory=default_data_dir, metadata={"help": "onecard data directory"})
    corpus: str = field(default="builtin", metadata={"help": "corpus whose shards to train on"})
    config: str = field(default="", metadata={"help": "the system's configuration (a DeepSpeed JSON, a mode)"})
    result: Path = field(default=Path("result.json"), metadata={"help": "where to write the result"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})

    def __post_init__(self) -> None:
        if self.precision == "auto":
            self.precision = detect().precision
        if self.precision not in ("bf16", "fp32"):  # the PyTorch and Trainer workers have no loss scaling
            raise SystemExit(f"--precision {self.precision}: the benchmark's systems run bf16 or fp32.")

    @property
    def context(self) -> int:
        return self.seq_len or default_seq_len(model_config(self.preset, GPT2_VOCAB_SIZE, GPT2_VOCAB_SIZE - 1))


@dataclass
class SmallGPT2Config:
    """What the learning benchmarks (bench/bf16_states.py, bench/schedule_bench.py) share: a small GPT-2 trained on a
    corpus's shards and scored on its validation split."""

    data_dir: Path = field(default=Path("data"), metadata={"help": "onecard data directory with the shards"})
    corpus: str = field(default="gutenberg", metadata={"help": "corpus whose shards to train on"})
    layers: int = field(default=6, metadata={"help": "GPT-2 layers"})
    width: int = field(default=384, metadata={"help": "GPT-2 width (6 x 384 with a 4,096-token vocabulary: 12.2M)"})
    seq_len: int = field(default=128, metadata={"help": "sequence length"})
    micro_batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    steps: int = field(default=2000, metadata={"help": "optimizer steps"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps"})
    eval_every: int = field(default=250, metadata={"help": "validation loss every N steps (and at the end)"})
    eval_tokens: int = field(default=1 << 17, metadata={"help": "validation tokens scored each time"})


def small_gpt2_values(config: SmallGPT2Config, vocab_size: int, eot_id: int) -> dict[str, Any]:
    """The small GPT-2's config.json values for a tokenizer of `vocab_size` whose end-of-text id is `eot_id`."""
    return {"model_type": "gpt2", "n_layer": config.layers, "n_embd": config.width, "n_head": config.width // 64,
            "n_positions": config.seq_len, "vocab_size": vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id}


def train_batches(config: BenchConfig, world_size: int = 1) -> tuple[TrainBatches, dict[str, Any]]:
    shards_dir = DataDir(config.data_dir).shards(config.corpus)
    index = load_index(shards_dir, checksums=False)
    sequences = TokenSequences(shards_dir, index, "train", config.context)
    return TrainBatches(sequences, 1337, config.micro_batch_size, config.grad_accum, world_size), index


class StepLog:
    """Per-step loss, time and memory; summarised into the benchmark's result record."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.seconds: list[float] = []
        self.memory = MemoryProbe()
        self.readings: dict[str, float | None] = {}
        self.started = time.perf_counter()
        self.startup_seconds: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def end(self, loss: float) -> None:
        if not self.seconds:  # as onecard's trainer counts it: from the user's command to the end of step 1
            self.startup_seconds = time.time() - launch_time()
        self.seconds.append(time.perf_counter() - self.started)
        self.losses.append(loss)
        self.readings = self.memory.sample()

    def result(self, system: str, config: BenchConfig, index: dict[str, Any], command: list[str],
               error: BaseException | None = None) -> dict[str, Any]:
        """The record of this run; an error (out of memory above all) is a result, not a crash."""
        self.readings = self.memory.sample()
        record = summarise(system, config, model_flops(config, index), self.losses, self.seconds, self.readings,
                           command)
        record["startup_seconds"] = self.startup_seconds
        if error is not None:
            record["status"] = "oom" if is_out_of_memory(error) else "error"
            record["error"] = f"{type(error).__name__}: {str(error)[:500]}"
        return record


def model_flops(config: BenchConfig, index: dict[str, Any]) -> float:
    with torch.device("meta"):  # the count needs the shapes only
        return flops_per_token(build_model(config.preset, index["vocab_size"], index["eot_id"]), config.context)


def summarise(system: str, config: BenchConfig, flops: float, losses: list[float], seconds: list[float],
              readings: dict[str, Any], command: list[str]) -> dict[str, Any]:
    """The result record: throughput is the median over the steps after the warm-up."""
    tokens_per_step = tokens_in_step(config)
    timed = seconds[config.warmup_steps:] or seconds
    tokens_per_second = tokens_per_step / statistics.median(timed) if timed else None
    peak = peak_tflops(config.precision)
    tflops = flops * tokens_per_second / 1e12 if tokens_per_second else None
    return {
        **base_record(system, config, command),
        "status": "ok" if losses else "error",
        "steps": len(losses),
        "tokens_per_second": tokens_per_second,
        "tflops": tflops,
        "mfu": tflops / peak if tflops and peak else None,
        "peak_gpu_mem_nvml_gib": readings.get("peak_gpu_nvml_gib"),
        "peak_gpu_mem_reserved_gib": readings.get("peak_gpu_reserved_gib"),
        "peak_host_rss_gib": readings.get("peak_host_rss_gib"),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def tokens_in_step(config: BenchConfig) -> int:
    return config.micro_batch_size * config.grad_accum * config.context


def base_record(system: str, config: BenchConfig, command: list[str]) -> dict[str, Any]:
    return {
        "system": system, "model": config.preset, "config": config.config, "device": device_name(),
        "gpu_mem_cap_gib": config.gpu_mem_cap, "seq_len": config.context, "precision": config.precision,
        "micro_batch_size": config.micro_batch_size, "grad_accum": config.grad_accum,
        "tokens_per_step": tokens_in_step(config),
        "command": " ".join(command), "date": time.strftime("%Y-%m-%d"),
    }


def write_result(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def is_out_of_memory(error: BaseException | str) -> bool:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return "OutOfMemoryError" in text or "out of memory" in text.lower()


def number(value: Any, digits: int = 1) -> str:
    """A table cell: the value with thousands separators, or "-" where there is none."""
    return "-" if value is None else f"{value:,.{digits}f}"


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def memory_and_loss_cells(record: dict[str, Any]) -> str:
    """The last columns of both benchmark tables: GPU peak (NVML, reserved), host RSS peak, first and last loss."""
    return (f"{number(record.get('peak_gpu_mem_nvml_gib'), 2)} | {number(record.get('peak_gpu_mem_reserved_gib'), 2)} "
            f"| {number(record.get('peak_host_rss_gib'), 2)} | {number(record.get('first_loss'), 3)} → "
            f"{number(record.get('last_loss'), 3)} |")


def write_table(out: Path, markdown: str) -> None:
    """`<out>/table.md`, and the same on the console."""
    (out / "table.md").write_text(markdown)
    print(markdown)
