"""`onecard plan`: will it fit, which config, how long — before a month of electricity is spent.

    python -m pipeline.plan --preset gpt2-xl --gpu "RTX 4070 Ti" --host-ram-gib 64 --nvme-free-gib 200
    python -m pipeline.plan --params 1.5e9 --tokens 10e9 --gpu-memory-gib 24 --gpu-peak-tflops 165 --json plan.json
    python -m pipeline.plan --model Qwen/Qwen2.5-1.5B --gpu "RTX 3060" --host-ram-gib 32

A model is a GPT-2 preset, or any Llama, Qwen2, Mistral or GPT-2 model by its config.json alone (`--model`).
Memory, per shipped config in `ds_configs/`: the memory model's (pipeline/memory.py) GPU, host and NVMe bytes.
Compute: 6·N·D plus attention, the compute-optimal budget of about 20 tokens per parameter, and the
wall-clock time and energy at an MFU: by default the one measured for that config in docs/bench/train-h100,
taken as the fraction of the card's own peak. Everything is an estimate, and the output says which numbers
are measured and which are assumed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import families, nvme
from pipeline import precision as precisions
from pipeline.dsconfig import CONFIGS, load_ds_config, offload_devices, shipped, shipped_configs
from pipeline.hardware import GIB, GPUS, lookup_gpu
from pipeline.memory import PROCESS_BYTES, disk_bytes, gpu_memory_bytes, host_bytes, host_total
from pipeline.model import PRESETS, preset_model_shape
from pipeline.stage import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, PipelineError, Range, stage_main

log = logging.getLogger("onecard")

MEASURED_AT = "docs/bench/train-h100"


MEASURED = shipped("pipeline.measured", MEASURED_AT)
# What keeping the optimizer's states in bf16 costs learning (bench/bf16_states.py): such a config is recommended
# only when its validation loss is within this of fp32 states'.
STATES_MEASURED_AT = "docs/bench/bf16-states"
STATES_MEASURED = shipped("pipeline.bf16_states", STATES_MEASURED_AT)
BF16_STATES_MOST_LOSS = 0.01
# Without a disk of the user's (--measure-disk, --disk-*-gbps), the NVMe days use the development machine's disk as
# bench/nvme_bench.py measured it, and say so.
DISK_MEASURED_AT = "docs/bench/nvme-cpu/disk.json"
DISK_MEASURED = shipped("pipeline.nvme_measured", "docs/bench/nvme-cpu")
TOKENS_PER_PARAMETER = 20  # compute-optimal (Hoffmann et al., 2022)
# A CUDA card not in the table is taken to be a recent one: `auto` would train it in bf16.
UNKNOWN_CARD = precisions.Choice("bf16", "auto: a card not in the table, taken to have bf16 tensor cores")


@dataclass
class PlanConfig:
    preset: str = field(default="gpt2-xl", metadata={"help": f"model preset ({', '.join(PRESETS)})"})
    model: str | None = field(default=None, metadata={
        "help": "a model instead of the preset, by its config.json alone: the file, its folder or a hub id "
                "(Llama, Qwen2, Mistral or GPT-2)"})
    params: float | None = field(
        default=None, metadata={"range": POSITIVE,
                                "help": "a parameter count instead (e.g. 1.5e9); the model gives the shape"})
    seq_len: int = field(default=1024, metadata={"range": AT_LEAST_ONE, "help": "sequence length"})
    tokens: str = field(default="compute-optimal",
                        metadata={"help": "training tokens (e.g. 10e9) or compute-optimal (20 per parameter)"})
    gpu: str = field(default="RTX 4070 Ti",
                     metadata={"help": f"a card of the table: {', '.join(g.name for g in GPUS)}"})
    gpu_memory_gib: float | None = field(default=None, metadata={"range": POSITIVE,
                                                                 "help": "the card's memory, instead of the table's"})
    gpu_peak_tflops: float | None = field(default=None, metadata={"range": POSITIVE,
                                                                  "help": "its dense peak in the run's precision, "
                                                                   "instead"})
    precision: str = field(default="auto", metadata={"help": "bf16 | fp16 | fp32, or auto: what training picks on "
                                                     "that card (bf16 from compute capability 8.0, fp16 on 7.x, "
                                                     "fp32 before)"})
    gpu_watts: float | None = field(default=None, metadata={"range": POSITIVE, "help": "its board power, instead"})
    host_ram_gib: float = field(default=64.0, metadata={"range": POSITIVE, "help": "host RAM"})
    nvme_free_gib: float = field(default=0.0, metadata={"range": NON_NEGATIVE,
                                                        "help": "free space on a fast local SSD for NVMe offload"})
    micro_batch_size: int | None = field(default=None, metadata={"range": AT_LEAST_ONE,
                                                                 "help": "fix the micro-batch (default: the "
                                                                 "largest that fits)"})
    global_batch_tokens: int = field(default=1 << 19, metadata={"range": AT_LEAST_ONE,
                                                                "help": "tokens per optimizer step (GPT-2: ~0.5M)"})
    activation_checkpointing: int = field(default=1, metadata={"range": NON_NEGATIVE,
                                                               "help": "as train's option: 0 off, k every k-th block"})
    mfu: float | None = field(default=None, metadata={"range": Range(0, 1, low_open=True),
                                                      "help": "model FLOPs utilisation to project time with "
                                                       "(default: the one measured for the config)"})
    nvme_path: Path | None = field(default=None, metadata={"help": "the folder on the fast disk NVMe offload would "
                                                                    "swap to (for --measure-disk, and written into "
                                                                    "--write-config)"})
    measure_disk: bool = field(default=False, metadata={"help": "measure that disk's read and write speed through "
                                                                "DeepSpeed's async I/O, sweeping its aio settings "
                                                                "(about a minute, a few GB written); the best go "
                                                                "into --write-config"})
    disk_test_gib: float = field(default=1.0, metadata={"range": POSITIVE,
                                                        "help": "GiB written and read back per setting "
                                                                "--measure-disk tries"})
    disk_read_gbps: float | None = field(default=None, metadata={"range": POSITIVE,
                                                                 "help": "the swap disk's read speed, GB/s, instead "
                                                                          "of measuring it"})
    disk_write_gbps: float | None = field(default=None, metadata={"range": POSITIVE, "help": "its write speed, GB/s"})
    write_config: Path | None = field(default=None, metadata={"help": "write the recommended DeepSpeed JSON here"})
    json: Path | None = field(default=None, metadata={"help": "write the whole plan as JSON here"})


def token_count(text: str) -> float:
    """10e9, 10B, 300b, 3.3e9: a number of tokens."""
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}.get(text[-1:].upper(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise PipelineError(f"--tokens {text!r} is not a token count: give e.g. 10e9, 10B or "
                            "compute-optimal.") from None


def dense_training_flops(params: float, tokens: float) -> float:
    """6·N·D: a forward (2) and a backward (4) multiply-add per parameter per token."""
    return 6 * params * tokens


def card(config: PlanConfig) -> dict[str, Any]:
    gpu = lookup_gpu(config.gpu)
    explicit = (config.gpu_memory_gib, config.gpu_peak_tflops)
    if gpu is None and None in explicit:
        raise PipelineError(f"--gpu {config.gpu!r} is not in the table ({', '.join(g.name for g in GPUS)}); pick "
                            "one, or give --gpu-memory-gib and --gpu-peak-tflops (and --gpu-watts for energy).")
    if config.precision == precisions.AUTO:
        choice = gpu.auto if gpu else UNKNOWN_CARD
    elif config.precision in precisions.PRECISIONS:
        choice = precisions.Choice(config.precision, "set by --precision")
    else:
        raise PipelineError(f"--precision {config.precision}: choose one of auto, "
                            f"{', '.join(precisions.PRECISIONS)}.")
    return {"name": gpu.name if gpu else config.gpu,
            "memory_gib": config.gpu_memory_gib or gpu.memory_gib,
            "precision": choice.precision, "precision_reason": choice.reason,
            "peak_tflops": config.gpu_peak_tflops or gpu.peak_tflops(choice.precision),
            "watts": config.gpu_watts or (gpu.watts if gpu else None)}


def measured_runs() -> dict[str, dict[str, Any]]:
    """onecard's GPU-host records by config stem (ok or cut short with steps done), for MFU and speed."""
    runs = {}
    for path in sorted((p for p in MEASURED.iterdir() if p.name.startswith("onecard-")), key=lambda p: p.name):
        record = json.loads(path.read_text())
        if record.get("mfu"):
            runs[Path(record["config"]).stem] = record
    return runs


# A config without a GPU measurement of its own computes as the measured config it shares its GPU work with: the
# same ZeRO stage, the same gradients and weights on the card (its time on the host side is added where known).
COMPUTES_LIKE = {"zero2_offload_bf16_states": "zero2_offload", "zero3_nvme": "zero3_offload",
                 "zero3_nvme_optimizer": "zero3_offload"}


def bf16_states_loss() -> float | None:
    """How much higher the validation loss ends with bf16 states than with fp32 states (0.01: 1%), as measured;
    None if it has not been."""
    arms = {}
    for arm in ("fp32", "bf16"):
        path = STATES_MEASURED / f"{arm}.json"
        if not path.is_file():
            return None
        arms[arm] = json.loads(path.read_text())["val_loss"]
    return arms["bf16"] / arms["fp32"] - 1


def disk_speed(config: PlanConfig) -> dict[str, Any] | None:
    """The swap disk's read and write GB/s: measured (--measure-disk), given, or None."""
    if config.measure_disk:
        if config.nvme_path is None:
            raise PipelineError("--measure-disk needs --nvme-path: the folder on the disk NVMe offload would use.")
        log.info("measuring the disk of %s through DeepSpeed's async I/O", config.nvme_path)
        measured = nvme.measure_disk(config.nvme_path, config.disk_test_gib)
        return {**measured, "source": f"measured in {config.nvme_path}"}
    if (config.disk_read_gbps is None) != (config.disk_write_gbps is None):
        raise PipelineError("give both --disk-read-gbps and --disk-write-gbps (or --measure-disk).")
    if config.disk_read_gbps is not None:
        return {"read_gbps": config.disk_read_gbps, "write_gbps": config.disk_write_gbps, "source": "given"}
    record = DISK_MEASURED / "disk.json"
    if not record.is_file():
        return None
    measured = json.loads(record.read_text())
    return {"read_gbps": measured["read_gbps"], "write_gbps": measured["write_gbps"],
            "source": f"not yours: the development machine's disk, {DISK_MEASURED_AT} ({measured['date']}); "
                      "--measure-disk measures yours"}


def plan(config: PlanConfig) -> dict[str, Any]:
    """The plan as a dict: the inputs, one entry per shipped config, the recommendation and the compute."""
    shape = families.shape_of(families.read_config(config.model)) if config.model else \
        preset_model_shape(config.preset)
    if config.params:
        shape = replace(shape, parameters=int(config.params))
    params = shape.parameters
    gpu = card(config)
    tokens = TOKENS_PER_PARAMETER * params if config.tokens == "compute-optimal" else token_count(config.tokens)
    per_token = shape.flops_per_token(config.seq_len)
    measured = measured_runs()
    disk = disk_speed(config)
    states_loss = bf16_states_loss()
    configs = []
    for path in shipped_configs():
        shipped_ds = load_ds_config(path)
        if precisions.bf16_states(shipped_ds) and gpu["precision"] != "bf16":
            continue  # bf16 states need a card that trains in bf16
        micros = [config.micro_batch_size] if config.micro_batch_size else [32, 16, 8, 4, 2, 1]
        for micro in micros:  # the batch layout settles the precision's too: accumulation sums in fp32
            accum = max(1, math.ceil(config.global_batch_tokens / (micro * config.seq_len)))
            ds = precisions.apply({**shipped_ds, "train_micro_batch_size_per_gpu": micro,
                                   "gradient_accumulation_steps": accum}, gpu["precision"])
            memory = gpu_memory_bytes(ds, shape, config.seq_len, micro, config.activation_checkpointing)
            if memory["total"] <= gpu["memory_gib"] * GIB:
                break
        ds = nvme.settle(ds, shape)
        host, nvme_bytes = host_total(host_bytes(ds, shape)) + PROCESS_BYTES, disk_bytes(ds, params)
        fits = {"gpu": memory["total"] <= gpu["memory_gib"] * GIB, "host": host <= 0.9 * config.host_ram_gib * GIB,
                "nvme": nvme_bytes <= config.nvme_free_gib * GIB}
        like = path.stem if path.stem in measured else COMPUTES_LIKE.get(path.stem)
        run = measured.get(like) if like else None
        mfu = config.mfu or (run["mfu"] if run else None)
        entry = {"config": f"ds_configs/{path.name}", "zero_stage": ds["zero_optimization"]["stage"],
                 "offload": offload_devices(ds), "micro_batch_size": micro, "grad_accum": accum,
                 "gpu_gib": {k: v / GIB for k, v in memory.items()},
                 "host_gib": host / GIB, "nvme_gib": nvme_bytes / GIB, "fits": all(fits.values()),
                 "fits_detail": fits, "mfu": mfu,
                 "mfu_source": "--mfu" if config.mfu else (f"measured: {MEASURED_AT}/onecard-{like}.json"
                                                          + ("" if like == path.stem else f" ({like}'s)")
                                                          if run else None)}
        steps = tokens / (micro * accum * config.seq_len)
        read, written = nvme.step_traffic(ds, shape)
        if read or written:
            entry["nvme_step_gb"] = {"read": read / 1e9, "written": written / 1e9}
            if disk:
                per_step = read / 1e9 / disk["read_gbps"] + written / 1e9 / disk["write_gbps"]
                entry["nvme_days"] = steps * per_step / 86400
        if mfu and gpu["peak_tflops"] and (disk or not (read or written)):
            seconds = per_token * tokens / (mfu * gpu["peak_tflops"] * 1e12) + entry.get("nvme_days", 0.0) * 86400
            entry.update(days=seconds / 86400, tokens_per_second=tokens / seconds,
                         energy_kwh=seconds * gpu["watts"] / 3.6e6 if gpu["watts"] else None)
        if precisions.bf16_states(ds):
            entry["learning_cost"] = states_loss  # the validation loss's excess over fp32 states, measured
        configs.append({**entry, "_ds": ds})
    # fastest first: the estimated days order them; those without after, by measured MFU. A config that costs
    # learning more than the bound (or was never measured for it) is listed, never recommended.
    fitting = sorted((c for c in configs if c["fits"] and recommendable(c)),
                     key=lambda c: (c.get("days") is None, c.get("days") or 0, -(c["mfu"] or 0),
                                    sum(c.get("nvme_step_gb", {}).values())))
    settled = {c["config"]: c.pop("_ds") for c in configs}
    return {"inputs": {**asdict(config), "write_config": str(config.write_config or ""),
                       "json": str(config.json or ""), "nvme_path": str(config.nvme_path or "")},
            "model": {"name": config.model or config.preset, **asdict(shape)},
            "gpu": gpu, "tokens": tokens, "disk": disk,
            "compute": {"flops_per_token": per_token, "training_flops": per_token * tokens,
                        "dense_6nd_flops": dense_training_flops(params, tokens),
                        "compute_optimal_tokens": TOKENS_PER_PARAMETER * params},
            "configs": configs, "recommended": fitting[0]["config"] if fitting else None,
            "settled": settled}


def table(result: dict[str, Any]) -> str:
    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    gpu, compute = result["gpu"], result["compute"]
    model = result["model"]
    lines = [f"{model['name']} ({model['family']}, {model['layers']} layers, width {model['width']}): "
             f"{model['parameters'] / 1e6:,.1f}M parameters, "
             f"{compute['flops_per_token'] / 1e9:.2f} GFLOP/token; {result['tokens'] / 1e9:,.2f}B tokens "
             f"(compute-optimal: {compute['compute_optimal_tokens'] / 1e9:,.1f}B) = "
             f"{compute['training_flops']:.3g} FLOPs (6ND alone: {compute['dense_6nd_flops']:.3g})",
             f"{gpu['name']}: {gpu['memory_gib']} GiB, {gpu['watts'] or '?'} W; trains in {gpu['precision']} "
             f"({gpu['precision_reason']}), {gpu['peak_tflops'] or '?'} TFLOP/s dense peak in it", "",
             "| config | micro × accum | GPU GiB (states + activations + ...) | host GiB | NVMe GiB | fits | MFU "
             "| days | kWh |", "|---|---|---|---|---|---|---|---|---|"]
    for c in result["configs"]:
        memory = c["gpu_gib"]
        detail = f"{number(memory['total'])} ({number(memory['model_states'])} + {number(memory['activations'])} + ...)"
        fits = "yes" if c["fits"] else "no: " + ", ".join(k for k, ok in c["fits_detail"].items() if not ok)
        days = number(c.get("days"))
        if "nvme_days" in c:
            days += f" ({number(c['nvme_days'])} of NVMe)"
        elif "nvme_step_gb" in c:
            days += " (NVMe time unknown: --measure-disk)"
        if "learning_cost" in c:
            cost = c["learning_cost"]
            verdict = "" if recommendable(c) else ", not recommended"
            fits += (" (learning: not measured)" if cost is None else
                     f" (learning: {100 * cost:+.1f}% validation loss{verdict})")
        lines.append(f"| {c['config']} | {c['micro_batch_size']} × {c['grad_accum']} | {detail} | "
                     f"{number(c['host_gib'])} | {number(c['nvme_gib'])} | {fits} | "
                     f"{number(100 * c['mfu'] if c['mfu'] else None)}{'%' if c['mfu'] else ''} | "
                     f"{days} | {number(c.get('energy_kwh'), 0)} |")
    disk = result["disk"]
    lines += ["", f"recommended: {result['recommended'] or 'none of the shipped configs fits'}",
              "MFU: as measured on an H100 capped at 11 GiB (docs/BENCHMARKS.md) for the config, or for the config it "
              "shares its GPU work with (bf16 states: zero2_offload; NVMe: zero3_offload), unless --mfu is given. "
              "Not measured on this card: its slower compute makes the fixed CPU-side costs (gradient copies, CPU "
              "Adam) weigh less, a desktop CPU makes them larger; GPU memory is an estimate calibrated on the same "
              "measurement. Host RAM: the memory model (pipeline/memory.py), the larger of a checkpoint save and a "
              "resume's checkpoint load included."]
    if disk:
        lines.append(f"NVMe: the swap's bytes per step at the disk's {disk['read_gbps']:.2f} GB/s read and "
                     f"{disk['write_gbps']:.2f} GB/s write ({disk['source']}), added to the compute time with no "
                     "overlap (as measured on CPU: docs/BENCHMARKS.md).")
    return "\n".join(lines)


def recommendable(entry: dict[str, Any]) -> bool:
    cost = entry.get("learning_cost", 0.0)
    return cost is not None and cost <= BF16_STATES_MOST_LOSS


def written_config(chosen: dict[str, Any], settled: dict[str, Any], disk: dict[str, Any] | None,
                   nvme_path: Path | None) -> dict[str, Any]:
    """The recommended shipped config (its plan entry `chosen`, `settled` for the model) as the plan has it: its
    micro-batch and accumulation, its NVMe buffers derived for the model, the measured disk's best aio settings and
    the swap folder; the precision left to the hardware."""
    ds = load_ds_config(CONFIGS / Path(chosen["config"]).name)
    ds.update(train_micro_batch_size_per_gpu=chosen["micro_batch_size"],
              gradient_accumulation_steps=chosen["grad_accum"])
    zero, derived = ds["zero_optimization"], settled["zero_optimization"]
    for key in nvme.AUTO_KEYS:
        section, name = key.removeprefix("zero_optimization.").rpartition(".")[::2]
        if section:
            if name in zero.get(section, {}):
                zero[section][name] = derived[section][name]
        elif name in zero:
            zero[name] = derived[name]
    if nvme.swap_folders(ds):
        if disk and "best" in disk:
            ds["aio"] = nvme.aio_section(disk["best"])
        for key in ("offload_param", "offload_optimizer"):
            if nvme_path is not None and zero.get(key, {}).get("device") == "nvme":
                zero[key]["nvme_path"] = str(Path(nvme_path).absolute())
    return ds


def run(config: PlanConfig) -> dict[str, Any]:
    result = plan(config)
    settled = result.pop("settled")
    log.info("plan:\n%s", table(result))
    if config.json:
        config.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if config.write_config:
        if not result["recommended"]:
            raise PipelineError("no shipped config fits this card and machine, so there is none to write: add "
                                "host RAM or NVMe space, lower --seq-len, or pick a smaller --preset.")
        chosen = next(c for c in result["configs"] if c["config"] == result["recommended"])
        ds = written_config(chosen, settled[chosen["config"]], result["disk"], config.nvme_path)
        config.write_config.write_text(json.dumps(ds, indent=2) + "\n")
        log.info("wrote %s (%s with micro-batch %d x %d accumulation): train with deepspeed launch/train.py "
                 "--deepspeed %s%s", config.write_config, chosen["config"], chosen["micro_batch_size"],
                 chosen["grad_accum"], config.write_config, "" if config.model else f" --preset {config.preset}")
    return result


def main(argv: list[str] | None = None) -> None:
    stage_main(PlanConfig, run, argv)


if __name__ == "__main__":
    main()
