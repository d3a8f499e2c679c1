"""Training throughput, side by side: onecard's configs, the Hugging Face Trainer with DeepSpeed, FSDP2 with CPU
offload, and plain PyTorch — same model, same data, same sequence length, precision and memory cap.

    python bench/train_bench.py --preset gpt2-xl --seq-len 1024 --steps 50 --gpu-mem-cap 11 \\
        --micro-batch-size 4 --grad-accum 8 --corpus gutenberg --out docs/bench/train-h100

Each system runs in its own process (so that one's memory peak or out-of-memory cannot touch another) and
writes one JSON record; this script collects them into `<out>/<system>-<config>.json` and prints a Markdown
table (also written to `<out>/table.md`). The throughput is the median step after --warmup-steps.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common import (
    REPO,
    BenchConfig,
    base_record,
    is_out_of_memory,
    memory_and_loss_cells,
    model_flops,
    number,
    percent,
    summarise,
    write_result,
    write_table,
)

from pipeline.metrics import read_metrics
from pipeline.shard_format import load_index
from pipeline.stage import DataDir, parse_config

DEFAULT_SYSTEMS = ",".join(
    [f"onecard:{p.stem}" for p in sorted((REPO / "ds_configs").glob("*.json"))]
    + [f"hf-trainer:{p.stem}" for p in sorted((REPO / "bench" / "hf_configs").glob("*.json"))]
    + ["fsdp2:fsdp2", "torch:plain"]
)


@dataclass
class DriverConfig(BenchConfig):
    systems: str = field(default=DEFAULT_SYSTEMS, metadata={"help": "comma-separated system:config list"})
    out: Path = field(default=Path("bench-results"), metadata={"help": "folder for the JSON records and table"})
    onecard_args: str = field(default="", metadata={"help": "extra flags for onecard's trainer"})
    timeout: int = field(default=3600, metadata={"help": "seconds one system may take"})


def common_flags(config: DriverConfig, result: Path) -> list[str]:
    flags = ["--preset", config.preset, "--seq-len", str(config.context), "--steps", str(config.steps),
             "--warmup-steps", str(config.warmup_steps), "--micro-batch-size", str(config.micro_batch_size),
             "--grad-accum", str(config.grad_accum), "--precision", config.precision, "--lr", str(config.lr),
             "--data-dir", str(config.data_dir), "--corpus", config.corpus, "--result", str(result)]
    flags += ["--gradient-checkpointing"] if config.gradient_checkpointing else []
    flags += ["--torch-compile"] if config.torch_compile else []
    return flags + (["--gpu-mem-cap", str(config.gpu_mem_cap)] if config.gpu_mem_cap is not None else [])


def command_for(system: str, name: str, config: DriverConfig, result: Path, label: str) -> list[str]:
    # On PATH first: an offline install with `pip --target` puts the launcher beside the packages, not Python.
    deepspeed = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if system == "onecard":
        flags = ["--deepspeed", f"ds_configs/{name}.json", "--preset", config.preset, "--seq-len", str(config.context),
                 "--max-steps", str(config.steps), "--micro-batch-size", str(config.micro_batch_size),
                 "--grad-accum", str(config.grad_accum), "--precision", config.precision, "--lr", str(config.lr),
                 "--data-dir", str(config.data_dir), "--corpus", config.corpus, "--run", f"bench-{label}",
                 "--force", "--checkpoint-every", "0", "--eval-every", "0", "--log-every", "1", "--warmup-steps", "1",
                 "--min-lr-ratio", "1",
                 *(["--gpu-mem-cap", str(config.gpu_mem_cap)] if config.gpu_mem_cap is not None else []),
                 *(["--activation-checkpointing", "1"] if config.gradient_checkpointing else []),
                 *config.onecard_args.split()]
        return [deepspeed, "launch/train.py", *flags]
    if system == "hf-trainer":
        return [deepspeed, "bench/hf_trainer_worker.py", "--config", f"bench/hf_configs/{name}.json",
                *common_flags(config, result)]
    if system == "fsdp2":
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        return [torchrun, "--nproc_per_node", "1", "bench/torch_worker.py", "--config", "fsdp2",
                *common_flags(config, result)]
    if system == "torch":
        return [sys.executable, "bench/torch_worker.py", "--config", "plain", *common_flags(config, result)]
    raise SystemExit(f"unknown system {system!r}: use onecard, hf-trainer, fsdp2 or torch")


def onecard_record(config: DriverConfig, label: str, command: list[str], output: str) -> dict[str, Any]:
    """onecard reports through its own metrics.jsonl; turn that into the common record."""
    metrics = read_metrics(DataDir(config.data_dir).runs(f"bench-{label}"))
    index = load_index(DataDir(config.data_dir).shards(config.corpus), checksums=False)
    readings = {key: max((m[key] for m in metrics if m.get(key) is not None), default=None)
                for key in ("peak_gpu_nvml_gib", "peak_gpu_reserved_gib", "peak_host_rss_gib")}
    record = summarise("onecard", config, model_flops(config, index), [m["loss"] for m in metrics],
                       [m["step_seconds"] for m in metrics], readings, command)
    first = metrics[0] if metrics else {}
    record.update(startup_seconds=first.get("startup_seconds"), op_build_seconds=first.get("op_build_seconds"),
                  onecard_args=config.onecard_args)
    if len(metrics) < config.steps:
        record["status"] = "oom" if is_out_of_memory(output) else "error"
        record["error"] = output[-1000:]
    return record


def run_system(config: DriverConfig, spec: str, label: str | None = None) -> dict[str, Any]:
    """Run one system:config and write its record to `<out>/<label>.json` (label: `<system>-<config>`)."""
    system, _, name = spec.partition(":")
    label = label or f"{system}-{name}"
    result = config.out / f"{label}.json"
    command = command_for(system, name, config, result, label)
    config = replace(config, config={"onecard": f"ds_configs/{name}.json",
                                     "hf-trainer": f"bench/hf_configs/{name}.json"}.get(system, name))
    print(f"== {spec}: {' '.join(command)}", file=sys.stderr, flush=True)
    # A session of its own, so that a timeout kills the launcher's children too: a trainer left running would
    # hold GPU memory and cores while the next system is measured.
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output = process.communicate(timeout=config.timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        # at the end: the record keeps the output's tail
        output = f"{process.communicate()[0]}\ntimed out after {config.timeout}s (--timeout)"
    if system == "onecard":
        record = onecard_record(config, label, command, output)
    elif result.is_file():
        record = json.loads(result.read_text())
    else:  # the worker died before it could write (e.g. killed by the host's OOM killer)
        record = {**base_record(system, config, command), "status": "error", "error": output[-1000:]}
    record["command"] = shlex.join([Path(command[0]).name, *command[1:]])
    record["label"] = label
    write_result(result, record)
    return record


def table(records: list[dict[str, Any]]) -> str:
    lines = ["| system | config | status | tokens/s | TFLOP/s | MFU | GPU peak NVML GiB | GPU peak reserved GiB "
             "| host RSS peak GiB | loss first → last |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['system']} | {r['config']} | {r['status']} | {number(r.get('tokens_per_second'), 0)} | "
                     f"{number(r.get('tflops'), 2)} | {percent(r.get('mfu'))} | {memory_and_loss_cells(r)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    config = parse_config(DriverConfig, sys.argv[1:])
    config.out.mkdir(parents=True, exist_ok=True)
    write_table(config.out, table([run_system(config, spec) for spec in config.systems.split(",") if spec]))


if __name__ == "__main__":
    main()
