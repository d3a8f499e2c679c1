"""A model under each NVMe (or any) config on this machine, as a user runs it: the disk's raw speed through
DeepSpeed's async I/O, then a run that trains --steps steps and saves, a second session that resumes it for one
more step, and a straight run of --steps + 1 steps to compare that step with — each a `deepspeed launch/train.py`
of its own. The record: every step's time split, NVMe traffic and rate, peak host RSS, the host-memory ledger
beside the memory model's estimate, the save's peak and size, and whether the resumed step is the straight one.

    python bench/nvme_bench.py --data-dir DATA --corpus gutenberg --preset gpt2 \\
        --configs zero3_nvme,zero3_nvme_optimizer --out docs/bench/nvme-cpu
    python bench/nvme_bench.py ... --preset gpt2-xl --seq-len 128     # the real shape (tens of GB of disk each)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import REPO, write_result

from pipeline import nvme
from pipeline.artifacts import bytes_in
from pipeline.checkpoint import latest_tag
from pipeline.metrics import read_metrics
from pipeline.precision import cpu_flags, cpu_model
from pipeline.stage import parse_config


@dataclass
class NvmeBenchConfig:
    data_dir: Path = field(default=Path("data"), metadata={"help": "onecard data directory with the shards"})
    corpus: str = field(default="gutenberg", metadata={"help": "corpus whose shards to train on"})
    preset: str = field(default="gpt2", metadata={"help": "model preset"})
    configs: str = field(default="zero3_nvme,zero3_nvme_optimizer", metadata={"help": "ds_configs/ stems to run"})
    steps: int = field(default=3, metadata={"help": "steps before the save; the resume trains one more"})
    seq_len: int = field(default=128, metadata={"help": "sequence length"})
    micro_batch_size: int = field(default=1, metadata={"help": "micro-batch"})
    precision: str = field(default="auto", metadata={"help": "--precision of the runs"})
    disk_gib: float = field(default=1.0, metadata={"help": "GiB per trial of the raw disk measurement (0: none)"})
    straight: bool = field(default=True, metadata={"help": "also train the straight run to compare the resume with"})
    out: Path = field(default=Path("docs/bench/nvme-cpu"), metadata={"help": "where the JSON records go"})


def launch(config: NvmeBenchConfig, ds_config: str, run: str, *flags: str) -> float:
    """Wall seconds of one `deepspeed launch/train.py` session."""
    command = [str(Path(sys.executable).with_name("deepspeed")), "--master_port", str(29700 + os.getpid() % 200),
               "launch/train.py", "--deepspeed", f"ds_configs/{ds_config}.json", "--data-dir", str(config.data_dir),
               "--corpus", config.corpus, "--preset", config.preset, "--run", run, "--seq-len", str(config.seq_len),
               "--micro-batch-size", str(config.micro_batch_size), "--precision", config.precision,
               "--log-every", "1", "--eval-every", "0", *flags]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def disk_rate(step: dict[str, Any], disk: dict[str, Any] | None) -> float | None:
    """How fast the swap ran against the raw disk: the time its reads and writes take at the raw speeds, over the
    time the disk was busy with them (1.0: at the disk's speed)."""
    if not disk or not step.get("swap_busy_seconds"):
        return None
    raw = step["swap_read_gb"] / disk["read_gbps"] + step["swap_write_gb"] / disk["write_gbps"]
    return raw / step["swap_busy_seconds"]


def run_config(config: NvmeBenchConfig, ds_config: str, disk: dict[str, Any] | None) -> dict[str, Any]:
    name = f"nvme-bench-{ds_config}-{config.preset}"
    checkpoints = config.data_dir / "checkpoints"
    for run in (name, f"{name}-straight"):
        shutil.rmtree(checkpoints / run, ignore_errors=True)
        shutil.rmtree(config.data_dir / "runs" / run, ignore_errors=True)
    total = config.steps + 1
    first = launch(config, ds_config, name, "--max-steps", str(total), "--stop-after", str(config.steps))
    saved = checkpoints / name / latest_tag(checkpoints / name)
    checkpoint_bytes = bytes_in(saved)
    host_memory = json.loads((checkpoints / name / "run.json").read_text())["host_memory"]
    second = launch(config, ds_config, name, "--max-steps", str(total), "--checkpoint-every", "0")
    metrics = read_metrics(config.data_dir / "runs" / name)
    record = {"config": f"ds_configs/{ds_config}.json", "preset": config.preset, "seq_len": config.seq_len,
              "micro_batch_size": config.micro_batch_size, "steps": [
                  {**m, "swap_rate_of_disk": disk_rate(m, disk)} for m in metrics],
              "host_memory_gib": {side: {k: v / (1 << 30) for k, v in values.items()}
                                  for side, values in host_memory.items()},
              "peak_host_rss_gib": max(m["peak_host_rss_gib"] for m in metrics),
              "checkpoint_gb": checkpoint_bytes / 1e9, "session_seconds": [first, second]}
    steady = metrics[1:config.steps]
    if steady:
        record["median_step_seconds"] = statistics.median(m["step_seconds"] for m in steady)
        record["median_optimizer_seconds"] = statistics.median(m["optimizer_seconds"] for m in steady)
        if "swap_gbps" in steady[0]:
            record["median_swap_gbps"] = statistics.median(m["swap_gbps"] or 0 for m in steady)
            rates = [r for m in steady if (r := disk_rate(m, disk)) is not None]
            record["median_swap_rate_of_disk"] = statistics.median(rates) if rates else None
    if config.straight:
        launch(config, ds_config, f"{name}-straight", "--max-steps", str(total), "--checkpoint-every", "0")
        straight = read_metrics(config.data_dir / "runs" / f"{name}-straight")
        record["resumed_step_equals_straight"] = (metrics[-1]["loss"] == straight[-1]["loss"]
                                                  and metrics[-1]["grad_norm"] == straight[-1]["grad_norm"])
        record["straight_last"] = {"loss": straight[-1]["loss"], "grad_norm": straight[-1]["grad_norm"]}
    shutil.rmtree(checkpoints / name, ignore_errors=True)  # tens of GB for the real shape
    return record


def main() -> None:
    config = parse_config(NvmeBenchConfig, sys.argv[1:])
    swap_folder = config.data_dir / "nvme"
    disk = nvme.measure_disk(swap_folder, config.disk_gib) if config.disk_gib else None
    machine = {"cpu": cpu_model(), "cpu_bf16_flags": sorted(cpu_flags()), "cores": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d"), "command": "python bench/nvme_bench.py " + " ".join(sys.argv[1:])}
    if disk:
        write_result(config.out / "disk.json", {**disk, **machine})
        machine["disk"] = {k: v for k, v in disk.items() if k != "trials"}
    for ds_config in config.configs.split(","):
        record = {**run_config(config, ds_config, disk), **machine}
        write_result(config.out / f"{ds_config}-{config.preset}.json", record)
        print(json.dumps({k: v for k, v in record.items() if k != "steps"}), flush=True)


if __name__ == "__main__":
    main()
