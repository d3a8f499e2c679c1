"""The precision a run computes in — bf16, fp16 or fp32 — and `auto`, the hardware's choice.

The DeepSpeed JSON asks for a precision (`"bf16": {"enabled": true}`), or for `"auto"` as the shipped configs do
(the Hugging Face DeepSpeed configs' spelling); `--precision` overrides it. `auto` is settled here, before the
engine is built, by what the device runs natively:

    CUDA compute capability >= 8.0 (Ampere, Ada, Hopper)   bf16   bf16 tensor cores
    CUDA 7.x (Volta, Turing)                                fp16   tensor cores for fp16 only; dynamic loss scaling
    CUDA 6.x and older (Pascal)                             fp32   no tensor cores, and DeepSpeed refuses fp16 there
    a CPU with AVX512-BF16 or AMX-BF16                      bf16   native bf16 dot products
    any other CPU                                           fp32   bf16 is emulated (AVX2: a step 12-17x slower)

Ranks whose devices choose differently (a mixed pair of GPUs) all train in the precision every one of them runs
natively: fp32 runs anywhere, and a card with bf16 tensor cores has fp16 ones too.

`torch.cuda.is_bf16_supported()` and `torch.ops.mkldnn._is_mkldnn_bf16_supported()` are no guide: both say yes
where bf16 is only emulated (a Turing card, any AVX-512 CPU).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.stage import PipelineError

log = logging.getLogger("onecard")

PRECISIONS = ("bf16", "fp16", "fp32")
AUTO = "auto"
# DeepSpeed's dynamic loss scaling, written out so that the merged config shows what an fp16 run does: the scale
# starts at 2^16, halves after `hysteresis` overflows in a row (the step is skipped), doubles after
# `loss_scale_window` clean steps, and never goes below `min_loss_scale`.
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                     "min_loss_scale": 1}
# From the precision the most devices run natively to the fewest (see `common`).
NATIVE_EVERYWHERE = ("fp32", "fp16", "bf16")
# The CPU instruction sets with native bf16 dot products, as /proc/cpuinfo names them.
CPU_BF16_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX-BF16"}
# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) that still allow those instructions; a lower cap makes bf16 emulated.
ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                    "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                    "ALL", "DEFAULT")


@dataclass(frozen=True)
class Choice:
    """A run's precision and why it is that one (logged, and saved with the run)."""

    precision: str
    reason: str

    def __str__(self) -> str:
        return f"{self.precision} ({self.reason})"


def for_gpu(name: str, capability: tuple[int, int]) -> Choice:
    """What `auto` picks on a CUDA card of this compute capability."""
    major, minor = capability
    where = f"auto: {name}, compute capability {major}.{minor}"
    if major >= 8:
        return Choice("bf16", f"{where}: bf16 tensor cores")
    if major == 7:
        return Choice("fp16", f"{where}: tensor cores for fp16, not bf16; dynamic loss scaling")
    return Choice("fp32", f"{where}: no tensor cores, and DeepSpeed refuses fp16 before 7.0")


def for_cpu(model: str, flags: set[str], isa_cap: str | None = None) -> Choice:
    """What `auto` picks on a CPU with these /proc/cpuinfo flags (and this ONEDNN_MAX_CPU_ISA, if set)."""
    native = [name for flag, name in CPU_BF16_FLAGS.items() if flag in flags]
    if native and isa_cap and isa_cap.upper() not in ONEDNN_BF16_ISAS:
        return Choice("fp32", f"auto: {model}, ONEDNN_MAX_CPU_ISA={isa_cap} leaves out {' and '.join(native)}: "
                              "bf16 would be emulated, many times slower than fp32")
    if native:
        return Choice("bf16", f"auto: {model}, {' and '.join(native)}")
    return Choice("fp32", f"auto: {model}, no AVX512-BF16 or AMX-BF16: bf16 would be emulated, many times slower "
                          "than fp32")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's bf16 flags: PyTorch's own probe where this torch has it, else /proc/cpuinfo's flags."""
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    if all(hasattr(torch.cpu, probe) for probe in probes.values()):
        return {flag for flag, probe in probes.items() if getattr(torch.cpu, probe)()}
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "this CPU"
    line = next((line for line in text.splitlines() if line.startswith("model name")), "")
    return line.partition(":")[2].strip() or "this CPU"


def detect() -> Choice:
    """What `auto` picks on this process's device."""
    if torch.cuda.is_available():
        return for_gpu(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    return for_cpu(cpu_model(), cpu_flags(), os.environ.get("ONEDNN_MAX_CPU_ISA"))


def common(choices: list[Choice]) -> Choice:
    """One `auto` for ranks whose devices chose `choices` (in rank order): theirs where they agree, else the
    precision every one of them runs natively."""
    if len({choice.precision for choice in choices}) == 1:
        return choices[0]
    weakest = min(choices, key=lambda choice: NATIVE_EVERYWHERE.index(choice.precision))
    ranks = "; ".join(f"rank {rank}: {choice}" for rank, choice in enumerate(choices))
    return Choice(weakest.precision, f"auto, the precision every rank runs natively ({ranks})")


def asked(ds: dict[str, Any], source: str, override: str | None) -> tuple[str, str]:
    """(the precision asked for — one of PRECISIONS or AUTO —, who asked): --precision, else the JSON."""
    if override is not None:
        if override not in (*PRECISIONS, AUTO):
            raise PipelineError(f"--precision {override}: choose one of {', '.join((AUTO, *PRECISIONS))}.")
        return override, "--precision"
    enabled = {name: ds.get(name, {}).get("enabled", False) for name in ("bf16", "fp16")}
    for name, value in enabled.items():
        if value not in (True, False, AUTO):
            raise PipelineError(f"{source}: {name}.enabled is {value!r}; it must be true, false or \"auto\".")
    if all(value is True for value in enabled.values()):
        raise PipelineError(f"{source} enables both bf16 and fp16; enable one (or neither, for fp32), or say "
                            "\"auto\" to let the hardware choose.")
    return precision_of(ds), source


def resolve(ds: dict[str, Any], source: str, override: str | None,
            device: Callable[[], Choice] | None = None) -> tuple[dict[str, Any], Choice]:
    """The config with its precision settled (bf16/fp16 `enabled` true or false, fp16's loss scaling written
    out), and the choice with its reason. An explicit precision wins over `auto`; one this device cannot run is
    refused, and one it only emulates gets a warning."""
    wanted, by = asked(ds, source, override)
    natural = (device or detect)()
    choice = natural if wanted == AUTO else Choice(wanted, f"set by {by}")
    if bf16_states(ds) and choice.precision != "bf16":
        raise PipelineError(f"{source} keeps the master weights, gradients and Adam moments in bf16 "
                            f"(bf16.bf16_master_weights_and_grads), which needs bf16 training, and {by} asks for "
                            f"{choice.precision}. Drop --precision, or pick a config with fp32 states such as "
                            "ds_configs/zero2_offload.json.")
    if choice.precision == "fp16":
        _check_fp16()
    if wanted == "bf16" and natural.precision != "bf16":
        log.warning("bf16 is %s, but this device has no native bf16 (%s): expect it to run many times slower than "
                    "%s would", choice.reason, natural.reason, natural.precision)
    return apply(ds, choice.precision), choice


def bf16_states(ds: dict[str, Any]) -> bool:
    """Whether the config keeps the optimizer's master weights and gradients in bf16 (DeepSpeed's
    bf16_master_weights_and_grads; its bf16_optimizer_states adds the moments)."""
    return bool(ds.get("bf16", {}).get("bf16_master_weights_and_grads"))


def precision_of(ds: dict[str, Any]) -> str:
    """The precision of a settled config (AUTO while it still says "auto")."""
    enabled = {name: ds.get(name, {}).get("enabled", False) for name in ("bf16", "fp16")}
    return next((name for name, value in enabled.items() if value is True),
                AUTO if AUTO in enabled.values() else "fp32")


def apply(ds: dict[str, Any], precision: str) -> dict[str, Any]:
    """A copy of the config computing in `precision`. A bf16 or fp16 run that accumulates gradients over micro-steps
    sums them in fp32 (`data_types.grad_accum_dtype`, unless the JSON sets it): DeepSpeed otherwise sums them in the
    model's precision, where eight bf16 micro-batches lose the low bits each sum would keep (tests/test_precision.py
    measures it)."""
    ds = {**ds, "bf16": {**ds.get("bf16", {}), "enabled": precision == "bf16"},
          "fp16": {**ds.get("fp16", {}), "enabled": precision == "fp16"}}
    if precision == "fp16":
        ds["fp16"] = {**FP16_LOSS_SCALING, **ds["fp16"]}
    if precision != "fp32" and ds.get("gradient_accumulation_steps", 1) > 1:
        ds["data_types"] = {"grad_accum_dtype": "fp32", **ds.get("data_types", {})}
    return ds


def fp32_accumulation_buffer(ds: dict[str, Any]) -> bool:
    """Whether DeepSpeed sums a settled config's gradients in an fp32 buffer of its own: a bf16 or fp16 run whose
    grad_accum_dtype is fp32. ZeRO-1 and 2 keep it on the device while the micro-steps add to it (4 bytes per
    parameter of the rank's partition, instead of ZeRO-1's 16-bit gradients or ZeRO-2's 16-bit host sums), ZeRO-3
    gathers each gradient partition on the host in fp32 instead of the model's precision."""
    return precision_of(ds) != "fp32" and ds.get("data_types", {}).get("grad_accum_dtype") == "fp32"


def _check_fp16() -> None:
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_model()
        raise PipelineError(
            f"fp16 is asked for, but DeepSpeed cannot train in fp16 on {device} (it needs a GPU of compute "
            "capability 7.0 or newer, or a CPU with AVX512-FP16). Use --precision auto (the hardware's choice) or "
            "--precision fp32.")
