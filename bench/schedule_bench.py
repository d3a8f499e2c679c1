"""Warmup-stable-decay against cosine at equal tokens: the same model, data, batches and peak rate, trained by the
trainer itself (`launch/train.py`, zero2_offload, fp32) once per schedule; validation loss side by side.

    python bench/schedule_bench.py --data-dir DATA --corpus gutenberg --steps 2000 --out docs/bench/schedule-cpu

Both schedules warm up over the same steps and end at the same floor (--min-lr-ratio of the peak): cosine decays
over the whole run after the warmup, WSD holds the peak and decays linearly over the last --decay of it.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import REPO, SmallGPT2Config, small_gpt2_values, write_result

from pipeline.metrics import read_metrics
from pipeline.precision import cpu_flags, cpu_model
from pipeline.stage import parse_config


@dataclass
class ScheduleBenchConfig(SmallGPT2Config):
    schedules: str = field(default="cosine,wsd", metadata={"help": "which schedules to train, in turn"})
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "where both schedules end, as a fraction of the peak"})
    decay: float = field(default=0.2, metadata={"help": "wsd: the decay's length, a fraction of the run"})
    work: Path = field(default=Path("/tmp/onecard-schedule-bench"), metadata={"help": "scratch folder for the runs"})
    out: Path = field(default=Path("docs/bench/schedule-cpu"), metadata={"help": "where the JSON records go"})


def train_command(config: ScheduleBenchConfig, schedule: str, model: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "launch/train.py", "--data-dir", str(data_dir), "--corpus", config.corpus,
            "--deepspeed", "ds_configs/zero2_offload.json", "--model", str(model), "--run", f"schedule-{schedule}",
            "--precision", "fp32", "--seq-len", str(config.seq_len), "--micro-batch-size", str(config.micro_batch_size),
            "--grad-accum", "1", "--max-steps", str(config.steps),
            "--warmup-steps", str(config.warmup_steps), "--min-lr-ratio", str(config.min_lr_ratio),
            "--schedule", schedule, "--decay", str(config.decay), "--eval-every", str(config.eval_every),
            "--eval-tokens", str(config.eval_tokens), "--checkpoint-every", "0", "--log-every", "100"]


def run_schedule(config: ScheduleBenchConfig, schedule: str, work: Path) -> dict[str, Any]:
    """Train one arm in a scratch data directory that links the corpus's shards and tokenizer."""
    data_dir = work / schedule
    for sub in ("shards", "tokenizer"):
        (data_dir / sub).parent.mkdir(parents=True, exist_ok=True)
        if not (data_dir / sub).exists():
            (data_dir / sub).symlink_to((config.data_dir / sub).resolve())
    index = json.loads((config.data_dir / "shards" / config.corpus / "index.json").read_text())
    model = work / "model.json"
    model.write_text(json.dumps(small_gpt2_values(config, index["vocab_size"], index["eot_id"])))
    command = train_command(config, schedule, model, data_dir)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    metrics = read_metrics(data_dir / "runs" / f"schedule-{schedule}")
    curve = [{"step": m["step"], "val_loss": m["eval/val_loss"], "lr": m["lr"]} for m in metrics
             if "eval/val_loss" in m]
    return {"schedule": schedule, "curve": curve, "val_loss": curve[-1]["val_loss"],
            "train_loss": [(m["step"], m["loss"]) for m in metrics],
            "seconds": round(time.perf_counter() - started, 1), "command": shlex.join(command)}


def main() -> None:
    config = parse_config(ScheduleBenchConfig, sys.argv[1:])
    for schedule in config.schedules.split(","):
        record = {**run_schedule(config, schedule, config.work),
                  "config": {k: str(v) for k, v in asdict(config).items()}, "cpu": cpu_model(),
                  "cpu_bf16_flags": sorted(cpu_flags()), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                  "bench_command": "python bench/schedule_bench.py " + " ".join(sys.argv[1:])}
        write_result(config.out / f"{schedule}.json", record)
        print(f"{schedule}: final val loss {record['val_loss']:.4f}")


if __name__ == "__main__":
    main()
