"""The GPU check: GPT-2 XL on a 12 GB budget, the Hugging Face Trainer beside onecard's configs and each of its
speed levers, in one command that fits the GPU host's 10-minute limit.

    python bench/gpu_check.py --runs hf,today,best,nvme --budget 520 --out $OUT/gpu-check

(`bench/gpu_check.sh` is the whole GPU-host command: bundle, op builds, data check, then this.) Every run is
one entry of RUNS: a system and config with its own batch layout and onecard flags (the levers it turns on).
Runs go one after another, in the order given, each in its own process (train_bench.run_system) and each under
the smaller of its own time cap and what is left of --budget; a run that would get less than --min-run-seconds
is recorded as not run. Every record is `<out>/<label>.json` (train_bench's keys plus label, levers,
tokens_per_step, startup_seconds), and `<out>/table.md` sets them side by side with each run's speed-up over
the Trainer's row. Shared settings (preset, sequence length, precision, memory cap, data) are the driver's
flags; --max-steps and --max-grad-accum cap every run's (the tests run the list on CPU with the tiny preset).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

from common import base_record, memory_and_loss_cells, number, percent, write_result, write_table
from train_bench import DriverConfig, run_system

from pipeline.stage import parse_config


@dataclass(frozen=True)
class Run:
    spec: str  # system:config, as train_bench's --systems takes it
    what: str
    micro_batch_size: int = 8
    grad_accum: int = 4
    levers: str = "--activation-checkpointing 1"  # onecard's flags for this run
    steps: int = 15
    seconds: int = 240  # this run's own time cap, start-up included
    torch_compile: bool = False


# The order is the order of the table; the levers add up from "today" down. Micro-batches are what
# `onecard plan` says fits an 11 GiB card (ZeRO-1 also holds the whole bf16 gradients: micro 4).
RUNS = {
    "hf": Run("hf-trainer:zero2_offload", "Hugging Face Trainer, the transformers docs' ZeRO-2 offload config"),
    "hf-compile": Run("hf-trainer:zero2_offload", "the Trainer with its own speed flag torch_compile=True",
                      torch_compile=True),
    "today": Run("onecard:zero2_offload", "onecard's ZeRO-2 offload as measured before, with GPT-2's gelu_new",
                 levers="--activation-checkpointing 1 --no-fused-gelu"),
    "fused-gelu": Run("onecard:zero2_offload", "+ PyTorch's fused tanh-GELU"),
    "zero2-big-micro": Run("onecard:zero2_offload", "+ micro-batch 16: fewer gradient copies per token, 131K tokens "
                           "per step", micro_batch_size=16, grad_accum=8),
    "zero1": Run("onecard:zero1_offload", "ZeRO-1: gradients accumulate on the GPU, go to the host once per step",
                 micro_batch_size=4, grad_accum=8),
    "zero1-big-step": Run("onecard:zero1_offload", "+ 131K tokens per optimizer step (CPU Adam amortised)",
                          micro_batch_size=4, grad_accum=32),
    "zero1-compile": Run("onecard:zero1_offload", "+ torch.compile of every block", micro_batch_size=4,
                         grad_accum=32, levers="--activation-checkpointing 1 --compile"),
    "zero2-every2": Run("onecard:zero2_offload", "ZeRO-2, every 2nd block checkpointed, 131K tokens per step",
                        micro_batch_size=4, grad_accum=32, levers="--activation-checkpointing 2"),
    "zero2-selective": Run("onecard:zero2_offload", "ZeRO-2, selective checkpointing (matmul outputs kept), 131K "
                           "tokens per step", micro_batch_size=2, grad_accum=64,
                           levers="--activation-checkpointing 1 --selective-checkpointing"),
    "best": Run("onecard:zero1_offload", "the candidate XL config for 60 steps", micro_batch_size=4, grad_accum=32,
                steps=60, seconds=420),
    "nvme": Run("onecard:zero3_nvme", "ZeRO-3 with parameters and optimizer on NVMe", steps=8, seconds=300),
}


@dataclass
class CheckConfig(DriverConfig):
    runs: str = field(default="hf,today,best,nvme", metadata={"help": f"comma-separated, from: {', '.join(RUNS)}"})
    budget: int = field(default=520, metadata={"help": "seconds for all runs together"})
    min_run_seconds: int = field(default=90, metadata={"help": "a run that would get less is not started"})
    max_steps: int | None = field(default=None, metadata={"help": "cap every run's steps (CPU tests)"})
    max_grad_accum: int | None = field(default=None, metadata={"help": "cap every run's accumulation (CPU tests)"})


def run_config(config: CheckConfig, run: Run, seconds: float) -> DriverConfig:
    steps = min(run.steps, config.max_steps or run.steps)
    grad_accum = min(run.grad_accum, config.max_grad_accum or run.grad_accum)
    return replace(config, micro_batch_size=run.micro_batch_size, grad_accum=grad_accum, steps=steps,
                   onecard_args=f"{run.levers} {config.onecard_args}".strip(), timeout=int(seconds),
                   torch_compile=run.torch_compile)


def check(config: CheckConfig) -> list[dict[str, Any]]:
    labels = [label for label in config.runs.split(",") if label]
    if unknown := [label for label in labels if label not in RUNS]:
        raise SystemExit(f"unknown run(s) {', '.join(unknown)}: choose from {', '.join(RUNS)}")
    started, records = time.monotonic(), []
    for label in labels:
        run = RUNS[label]
        seconds = min(run.seconds, config.budget - (time.monotonic() - started))
        settings = run_config(config, run, seconds)
        if seconds < config.min_run_seconds:
            record = {**base_record(run.spec.partition(":")[0], settings, []), "label": label,
                      "status": f"not run: {max(0, int(seconds))}s of --budget left"}
        else:
            record = run_system(settings, run.spec, label)
        record.update(what=run.what, levers=run.levers if run.spec.startswith("onecard") else
                      ("torch_compile=True" if run.torch_compile else ""))
        write_result(config.out / f"{label}.json", record)
        records.append(record)
    return records


def table(records: list[dict[str, Any]]) -> str:
    trainer = next((r.get("tokens_per_second") for r in records if r["label"] == "hf"), None)
    lines = ["| run | what | status | steps | tokens/step | tokens/s | x Trainer | MFU | start-up s "
             "| GPU peak NVML GiB | GPU peak reserved GiB | host RSS peak GiB | loss first → last |", "|" + "---|" * 13]
    for r in records:
        speed = r.get("tokens_per_second")
        lines.append(
            f"| {r['label']} | {r['what']} (`{r.get('levers') or '-'}`) | {r['status'][:40]} | {r.get('steps', 0)} | "
            f"{number(r.get('tokens_per_step'), 0)} | {number(speed, 0)} | "
            f"{number(speed / trainer if speed and trainer else None, 2)} | {percent(r.get('mfu'))} | "
            f"{number(r.get('startup_seconds'), 1)} | {memory_and_loss_cells(r)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    config = parse_config(CheckConfig, sys.argv[1:])
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "settings.json").write_text(json.dumps({"argv": sys.argv[1:]}, indent=2) + "\n")
    write_table(config.out, table(check(config)))


if __name__ == "__main__":
    main()
