"""`make run` in the precision `auto` picks, on this CPU and on an AVX2-only CPU, against bf16 where it is emulated.

    python bench/cpu_precision.py --out docs/bench/cpu-precision

An AVX2-only CPU (most desktop and laptop CPUs) is emulated on this one by capping oneDNN's and PyTorch's kernels
at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2): bf16 then runs its emulated path, as there. Each
system is a whole `make run` (train and evaluate; the data stages are made first and shared) on its own run
name; the record has the precision the run chose and why, its wall time, its median step time and its final
validation loss. bf16 under the emulation runs --bf16-steps steps only (its per-step time is the point: the
full 300 would take about an hour).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import REPO, write_result

from pipeline.metrics import read_metrics
from pipeline.precision import cpu_flags, cpu_model
from pipeline.stage import parse_config

AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@dataclass
class PrecisionBenchConfig:
    data_dir: Path = field(default=Path("/tmp/cpu-precision"), metadata={"help": "data directory (shared)"})
    steps: int = field(default=300, metadata={"help": "make run's STEPS for the auto runs"})
    bf16_steps: int = field(default=20, metadata={"help": "steps of emulated bf16"})
    systems: str = field(default="native-auto,avx2-auto,avx2-bf16", metadata={"help": "which to run"})
    out: Path = field(default=Path("docs/bench/cpu-precision"), metadata={"help": "where the JSON records go"})


def make(config: PrecisionBenchConfig, target: str, env: dict[str, str], *variables: str) -> float:
    """Wall seconds of `make <target>` on the bench's data directory, in this Python's environment."""
    command = ["make", target, f"DATA={config.data_dir}", *variables]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "VIRTUAL_ENV": sys.prefix, **env},
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def run_system(config: PrecisionBenchConfig, name: str) -> dict[str, Any]:
    make(config, "clean-run", {}, f"RUN={name}")  # a run left by an earlier call would only be resumed
    emulated = name.startswith("avx2")
    env = AVX2_ONLY if emulated else {}
    steps = config.bf16_steps if name.endswith("bf16") else config.steps
    args = "--precision bf16" if name.endswith("bf16") else ""
    seconds = make(config, "run", env, f"RUN={name}", f"STEPS={steps}", f"TRAIN_ARGS={args}")
    run_file = json.loads((config.data_dir / "checkpoints" / name / "run.json").read_text())
    metrics = read_metrics(config.data_dir / "runs" / name)
    report = json.loads((config.data_dir / "eval" / name / "report.json").read_text())
    return {"system": name, "cpu": cpu_model(), "cpu_bf16_flags": sorted(cpu_flags()), "cores": os.cpu_count(),
            "environment": env, "steps": steps, "precision": run_file["precision"]["precision"],
            "precision_reason": run_file["precision"]["reason"], "make_run_seconds": seconds,
            "train_seconds": sum(m["step_seconds"] for m in metrics),
            "median_step_seconds": statistics.median(m["step_seconds"] for m in metrics[1:]),
            "val_loss": report["val_loss"], "start_val_loss": report["start_val_loss"],
            "command": f"{' '.join(f'{k}={v}' for k, v in env.items())} make run RUN={name} STEPS={steps} "
                       f"TRAIN_ARGS='{args}'".strip(), "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    config = parse_config(PrecisionBenchConfig, sys.argv[1:])
    make(config, "shard", {})
    for name in config.systems.split(","):
        record = run_system(config, name)
        write_result(config.out / f"{name}.json", record)
        print(json.dumps(record))


if __name__ == "__main__":
    main()
