"""`onecard plan`: will it fit, which config, how long — before a month of electricity is spent.

    python -m pipeline.plan --preset gpt2-xl --gpu "RTX 4070 Ti" --host-ram-gib 64 --nvme-free-gib 200
    python -m pipeline.plan --params 1.5e9 --tokens 10e9 --gpu-memory-gib 24 --gpu-peak-tflops 165 --json plan.json

Memory, per shipped config in `ds_configs/`: the model states on GPU and CPU from DeepSpeed's own estimators
(`estimate_zero2/3_model_states_mem_needs`), plus what they leave out — activations for the micro-batch
(checkpointed or not), the output layer's logits chunk, DeepSpeed's buckets and ZeRO-3's live parameters —
then the allocator's fragmentation and the CUDA context as measured on the GPU host (docs/BENCHMARKS.md).
Compute: 6·N·D plus attention, the compute-optimal budget of about 20 tokens per parameter, and the
wall-clock time and energy at an MFU: by default the one measured for that config in docs/bench/train-h100,
taken as the fraction of the card's own peak. Everything is an estimate, and the output says which numbers
are measured and which are assumed.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from pipeline import precision as precisions
from pipeline.dsconfig import load_ds_config, offload_devices
from pipeline.hardware import GIB, GPUS, lookup_gpu
from pipeline.model import (
    GPT2_VOCAB_SIZE,
    LOSS_CHUNK_TOKENS,
    preset_parameters,
    preset_shape,
    training_flops_per_token,
)
from pipeline.stage import PipelineError, stage_main

log = logging.getLogger("onecard")

MEASURED_AT = "docs/bench/train-h100"


def shipped(package: str, folder: str) -> Any:
    """A folder of the repository that a wheel carries inside the package (pyproject.toml maps ds_configs/ and
    the GPU-host measurements there), so that an installed onecard plans as the source tree does; in a source
    tree or an editable install, the folder itself."""
    try:
        return files(package)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / folder


CONFIGS = shipped("pipeline.ds_configs", "ds_configs")
MEASURED = shipped("pipeline.measured", MEASURED_AT)


def shipped_configs() -> list[Any]:
    """The DeepSpeed configs onecard ships (ds_configs/*.json), by name."""
    return sorted((p for p in CONFIGS.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)
TOKENS_PER_PARAMETER = 20  # compute-optimal (Hoffmann et al., 2022)
# From the GPU-host measurement of GPT-2 XL (docs/BENCHMARKS.md): the allocator reserved 1.29x (ZeRO-2) and
# 2.06x (ZeRO-3) of its peak allocation, and NVML charged the process 1.67 GiB beyond the reservation (CUDA
# context, cuBLAS and NCCL workspaces).
FRAGMENTATION = {2: 1.29, 3: 2.06}
CONTEXT_GIB = 1.67
ACTIVATION_BYTES_PER_LAYER = 34  # x batch x seq x width, bf16, flash attention (Korthikanti et al., 2022)
# A CUDA card not in the table is taken to be a recent one: `auto` would train it in bf16.
UNKNOWN_CARD = precisions.Choice("bf16", "auto: a card not in the table, taken to have bf16 tensor cores")


@dataclass
class PlanConfig:
    preset: str = field(default="gpt2-xl", metadata={"help": "model preset (tiny, gpt2 ... gpt2-xl)"})
    params: float | None = field(
        default=None, metadata={"help": "a parameter count instead (e.g. 1.5e9); the preset gives the shape"})
    seq_len: int = field(default=1024, metadata={"help": "sequence length"})
    tokens: str = field(default="compute-optimal",
                        metadata={"help": "training tokens (e.g. 10e9) or compute-optimal (20 per parameter)"})
    gpu: str = field(default="RTX 4070 Ti",
                     metadata={"help": f"a card of the table: {', '.join(g.name for g in GPUS)}"})
    gpu_memory_gib: float | None = field(default=None, metadata={"help": "the card's memory, instead of the table's"})
    gpu_peak_tflops: float | None = field(default=None, metadata={"help": "its dense peak in the run's precision, "
                                                                   "instead"})
    precision: str = field(default="auto", metadata={"help": "bf16 | fp16 | fp32, or auto: what training picks on "
                                                     "that card (bf16 from compute capability 8.0, fp16 on 7.x, "
                                                     "fp32 before)"})
    gpu_watts: float | None = field(default=None, metadata={"help": "its board power, instead"})
    host_ram_gib: float = field(default=64.0, metadata={"help": "host RAM"})
    nvme_free_gib: float = field(default=0.0, metadata={"help": "free space on a fast local SSD for NVMe offload"})
    micro_batch_size: int | None = field(default=None, metadata={"help": "fix the micro-batch (default: the "
                                                                 "largest that fits)"})
    global_batch_tokens: int = field(default=1 << 19, metadata={"help": "tokens per optimizer step (GPT-2: ~0.5M)"})
    activation_checkpointing: int = field(default=1, metadata={"help": "as train's option: 0 off, k every k-th block"})
    mfu: float | None = field(default=None, metadata={"help": "model FLOPs utilisation to project time with "
                                                       "(default: the one measured for the config)"})
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


def gpu_memory_bytes(ds: dict[str, Any], params: float, shape: tuple[int, int, int, int], seq_len: int,
                     micro: int, checkpointing: int, vocab_size: int) -> dict[str, float]:
    """The GPU bytes of one config, term by term: DeepSpeed's estimate of the model states, then what it
    leaves out; `total` adds fragmentation and the CUDA context. In fp32 (a card without tensor cores) every
    term that bf16 or fp16 keeps in 2 bytes per value takes 4."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n_layer, n_embd, _, _ = shape
    zero = ds["zero_optimization"]
    stage = zero["stage"]
    params_device, optimizer_device = offload_devices(ds)
    if stage == 3:
        largest_layer = vocab_size * n_embd  # the token embedding
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, cpu_offload=optimizer_device != "none", cpu_offload_params=params_device != "none",
            zero_init=False)
        working = 2 * min(params, zero.get("stage3_max_live_parameters", 1e9))  # gathered bf16 parameters
        buffers = 2 * 2 * zero.get("stage3_prefetch_bucket_size", 5e7)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, cpu_offload=optimizer_device != "none")
        working = 0.0
        buffers = 2 * 2 * zero.get("reduce_bucket_size", 5e8)  # two bf16 gradient buckets
    token_slab = micro * seq_len * n_embd
    if checkpointing:
        activations = (math.ceil(n_layer / checkpointing) * 2 + checkpointing * ACTIVATION_BYTES_PER_LAYER) * token_slab
    else:
        activations = n_layer * ACTIVATION_BYTES_PER_LAYER * token_slab
    logits = 3 * 4 * min(LOSS_CHUNK_TOKENS, micro * seq_len) * vocab_size  # fp32 logits, their gradient, softmax
    # ZeRO-1 with an offloaded optimizer keeps every bf16 gradient on the GPU between micro-steps, in
    # allocations made once: they do not fragment
    gradients = 2 * params if stage == 1 and optimizer_device != "none" else 0.0
    widen = 2.0 if precisions.precision_of(ds) == "fp32" else 1.0
    gpu, working, buffers, activations, gradients = (widen * term for term in
                                                     (gpu, working, buffers, activations, gradients))
    allocated = gpu + working + buffers + activations + logits
    return {"model_states": gpu, "gradients": gradients, "model_states_cpu": cpu, "working_parameters": working,
            "buffers": buffers, "activations": activations, "logits": logits, "allocated": allocated + gradients,
            "total": allocated * FRAGMENTATION[max(stage, 2)] + gradients + CONTEXT_GIB * GIB}


def host_and_disk_bytes(ds: dict[str, Any], params: float, model_states_cpu: float) -> tuple[float, float]:
    """(host RAM, NVMe) bytes: DeepSpeed's CPU estimate, or with NVMe offload its pinned buffers and the swap
    train checks for before it starts (`checkpoint.nvme_swap_needs`)."""
    from pipeline.checkpoint import nvme_swap_needs

    swap = nvme_swap_needs(params, ds)
    if not swap:
        return model_states_cpu, 0.0
    zero = ds["zero_optimization"]
    param_buffers = 2 * zero["offload_param"].get("buffer_count", 5) * zero["offload_param"].get("buffer_size", 1e8)
    # the optimizer swapper's buffers hold one sub-group, which is never larger than the model
    sub_group = min(zero.get("sub_group_size", 1e9), params)
    optimizer_buffers = 4 * 4 * sub_group * zero["offload_optimizer"].get("buffer_count", 4)
    # the fp32 model built on the CPU before DeepSpeed takes it over
    return 4 * params + param_buffers + optimizer_buffers, sum(need.bytes for need in swap)


def plan(config: PlanConfig) -> dict[str, Any]:
    """The plan as a dict: the inputs, one entry per shipped config, the recommendation and the compute."""
    shape = preset_shape(config.preset)
    vocab_size = GPT2_VOCAB_SIZE
    params = config.params or preset_parameters(config.preset, vocab_size)
    gpu = card(config)
    tokens = TOKENS_PER_PARAMETER * params if config.tokens == "compute-optimal" else token_count(config.tokens)
    position_params = shape[3] * shape[1]
    per_token = training_flops_per_token(params - position_params, shape[0], shape[1], config.seq_len)
    measured = measured_runs()
    configs = []
    for path in shipped_configs():
        ds = precisions.apply(load_ds_config(path), gpu["precision"])
        micros = [config.micro_batch_size] if config.micro_batch_size else [32, 16, 8, 4, 2, 1]
        for micro in micros:
            memory = gpu_memory_bytes(ds, params, shape, config.seq_len, micro, config.activation_checkpointing,
                                      vocab_size)
            if memory["total"] <= gpu["memory_gib"] * GIB:
                break
        host, nvme = host_and_disk_bytes(ds, params, memory["model_states_cpu"])
        fits = {"gpu": memory["total"] <= gpu["memory_gib"] * GIB, "host": host <= 0.9 * config.host_ram_gib * GIB,
                "nvme": nvme <= config.nvme_free_gib * GIB}
        run = measured.get(path.stem)
        mfu = config.mfu or (run["mfu"] if run else None)
        accum = max(1, math.ceil(config.global_batch_tokens / (micro * config.seq_len)))
        entry = {"config": f"ds_configs/{path.name}", "zero_stage": ds["zero_optimization"]["stage"],
                 "offload": offload_devices(ds), "micro_batch_size": micro, "grad_accum": accum,
                 "gpu_gib": {k: v / GIB for k, v in memory.items() if k != "model_states_cpu"},
                 "host_gib": host / GIB, "nvme_gib": nvme / GIB, "fits": all(fits.values()),
                 "fits_detail": fits, "mfu": mfu,
                 "mfu_source": "--mfu" if config.mfu else (f"measured: {MEASURED_AT}/onecard-"
                                                          f"{path.stem}.json" if run else None)}
        if mfu and gpu["peak_tflops"]:
            seconds = per_token * tokens / (mfu * gpu["peak_tflops"] * 1e12)
            entry.update(days=seconds / 86400, tokens_per_second=tokens / seconds,
                         energy_kwh=seconds * gpu["watts"] / 3.6e6 if gpu["watts"] else None)
        configs.append(entry)
    # fastest first: the measured MFU orders them; unmeasured ones after
    fitting = sorted((c for c in configs if c["fits"]), key=lambda c: -(c["mfu"] or 0))
    return {"inputs": {**asdict(config), "write_config": str(config.write_config or ""),
                       "json": str(config.json or "")},
            "model": {"preset": config.preset, "parameters": params, "layers": shape[0], "width": shape[1]},
            "gpu": gpu, "tokens": tokens,
            "compute": {"flops_per_token": per_token, "training_flops": per_token * tokens,
                        "dense_6nd_flops": dense_training_flops(params, tokens),
                        "compute_optimal_tokens": TOKENS_PER_PARAMETER * params},
            "configs": configs, "recommended": fitting[0]["config"] if fitting else None}


def table(result: dict[str, Any]) -> str:
    def number(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    gpu, compute = result["gpu"], result["compute"]
    lines = [f"{result['model']['preset']}: {result['model']['parameters'] / 1e6:,.1f}M parameters, "
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
        lines.append(f"| {c['config']} | {c['micro_batch_size']} × {c['grad_accum']} | {detail} | "
                     f"{number(c['host_gib'])} | {number(c['nvme_gib'])} | {fits} | "
                     f"{number(100 * c['mfu'] if c['mfu'] else None)}{'%' if c['mfu'] else ''} | "
                     f"{number(c.get('days'))} | {number(c.get('energy_kwh'), 0)} |")
    lines += ["", f"recommended: {result['recommended'] or 'none of the shipped configs fits'}",
              "MFU: as measured for the config on an H100 capped at 11 GiB (docs/BENCHMARKS.md) unless --mfu is "
              "given. Not measured on this card: its slower compute makes the fixed CPU-side costs (gradient "
              "copies, CPU Adam) weigh less, a desktop CPU makes them larger; GPU memory is an estimate calibrated "
              "on the same measurement."]
    return "\n".join(lines)


def run(config: PlanConfig) -> dict[str, Any]:
    result = plan(config)
    log.info("plan:\n%s", table(result))
    if config.json:
        config.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if config.write_config:
        if not result["recommended"]:
            raise PipelineError("no shipped config fits this card and machine, so there is none to write: add "
                                "host RAM or NVMe space, lower --seq-len, or pick a smaller --preset.")
        chosen = next(c for c in result["configs"] if c["config"] == result["recommended"])
        ds = load_ds_config(CONFIGS / Path(chosen["config"]).name)
        ds.update(train_micro_batch_size_per_gpu=chosen["micro_batch_size"],
                  gradient_accumulation_steps=chosen["grad_accum"])
        config.write_config.write_text(json.dumps(ds, indent=2) + "\n")
        log.info("wrote %s (%s with micro-batch %d x %d accumulation): train with deepspeed launch/train.py "
                 "--deepspeed %s --preset %s", config.write_config, chosen["config"], chosen["micro_batch_size"],
                 chosen["grad_accum"], config.write_config, config.preset)
    return result


def main(argv: list[str] | None = None) -> None:
    stage_main(PlanConfig, run, argv)


if __name__ == "__main__":
    main()
