"""Preflight: before a run builds anything, what it will need — host RAM, page-locked host memory, GPU memory —
by the memory model `onecard plan` uses too (pipeline/memory.py), against what this machine has. A run that
cannot fit stops (exit 2) with what it needs, what there is and what would fit instead, rather than being killed
by the kernel minutes later; a run that fits with little room gets a warning. `--no-preflight` skips the check.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from pipeline import nvme
from pipeline import precision as precisions
from pipeline.dsconfig import load_ds_config, shipped_configs
from pipeline.families import Shape
from pipeline.hardware import GIB
from pipeline.memory import CONTEXT_GIB, PROCESS_BYTES, gpu_memory_bytes, host_bytes, host_total

log = logging.getLogger("onecard")

TIGHT = 0.9  # needing more than this share of what there is gets a warning
# The GPU estimate is calibrated to be at most this much above what NVML measured (tests/test_plan.py): a run is
# refused only beyond it, so that no run that fits is turned away (and a CUDA out-of-memory error, unlike the
# kernel's OOM killer, is a clean and early failure).
GPU_ESTIMATE_ABOVE = 1.15


@dataclass(frozen=True)
class Needs:
    host_bytes: float
    host_kinds: dict[str, float]  # one rank's host RAM by the ledger's kinds (pipeline/memory.py host_bytes)
    pinned_bytes: float  # page-locked, counted against the memlock limit (with a GPU only)
    gpu_bytes: float | None  # what NVML would charge the process; None without a GPU


@dataclass(frozen=True)
class Machine:
    host_available_bytes: float
    memlock_bytes: float | None  # None: unlimited
    gpu_bytes: float | None  # what NVML may charge the process: the card, or --gpu-mem-cap plus the context


def estimate(ds: dict[str, Any], shape: Shape, seq_len: int, checkpointing: int, local_ranks: int = 1,
             gpu: bool | None = None) -> Needs:
    """What a run of this config needs on this node (host RAM for all its local ranks, GPU memory per rank)."""
    gpu = torch.cuda.is_available() if gpu is None else gpu
    kinds = host_bytes(ds, shape, local_ranks, gpu)
    return Needs(host_total(kinds, local_ranks) + local_ranks * PROCESS_BYTES, kinds, local_ranks * kinds["pinned"],
                 gpu_memory_bytes(ds, shape, seq_len, ds["train_micro_batch_size_per_gpu"], checkpointing)["total"]
                 if gpu else None)


CAP_IPC_LOCK = 14  # the capability that lifts the memlock limit (linux/capability.h)


def locks_without_limit(status: str) -> bool:
    """Whether a process with this /proc/<pid>/status may page-lock any amount (CAP_IPC_LOCK, as root usually
    has), whatever `ulimit -l` says."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    return False


def read_machine(gpu_mem_cap_gib: float | None) -> Machine:
    memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    status = Path("/proc/self/status")
    if memlock == resource.RLIM_INFINITY or (status.is_file() and locks_without_limit(status.read_text())):
        memlock = None
    gpu = None
    if torch.cuda.is_available():
        gpu = (gpu_mem_cap_gib + CONTEXT_GIB) * GIB if gpu_mem_cap_gib is not None else \
            torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return Machine(psutil.virtual_memory().available, memlock, gpu)


def check(needs: Needs, machine: Machine, config_path: str,
          alternatives: Callable[[], dict[str, Needs]]) -> list[str]:
    """Raise nothing: the problems (each one paragraph) that stop the run, after logging the warnings.
    `alternatives` (the needs of other configs) is asked for only when the run does not fit."""
    def gib(value: float) -> str:
        return f"{value / GIB:.1f} GiB"

    instead = ""
    if _short(needs, machine):
        fitting = [name for name, other in alternatives().items() if not _short(other, machine)]
        instead = f" Configs that fit this machine: {', '.join(fitting)}." if fitting else ""
    problems = []
    if needs.host_bytes > machine.host_available_bytes:
        problems.append(
            f"{config_path} needs about {gib(needs.host_bytes)} of host RAM for this run (offloaded model states "
            f"and the process, with a checkpoint save or a resume's checkpoint load on top), and this machine has "
            f"{gib(machine.host_available_bytes)} available: it would be killed by the kernel's out-of-memory "
            f"killer.{instead} (`onecard plan --host-ram-gib N` compares them; "
            "--no-preflight goes on regardless.)")
    if machine.memlock_bytes is not None and needs.pinned_bytes > machine.memlock_bytes:
        problems.append(
            f"{config_path} page-locks about {gib(needs.pinned_bytes)} of host memory for fast transfers, and the "
            f"memlock limit (`ulimit -l`) is {gib(machine.memlock_bytes)}. Raise the limit, or set "
            "\"pin_memory\": false in the config's offload_optimizer / offload_param (slower transfers).")
    if _gpu_short(needs, machine):
        problems.append(
            f"{config_path} needs about {gib(needs.gpu_bytes)} of GPU memory at this micro-batch, and the card has "
            f"{gib(machine.gpu_bytes)}. Use a smaller --micro-batch-size (with a larger --grad-accum for the same "
            f"batch), --activation-checkpointing 1, or a config that offloads more.{instead}")
    for what, needed, there, refused_above in (("host RAM", needs.host_bytes, machine.host_available_bytes, 1.0),
                                               ("GPU memory", needs.gpu_bytes, machine.gpu_bytes, GPU_ESTIMATE_ABOVE)):
        if needed is not None and there is not None and TIGHT * there < needed <= refused_above * there:
            log.warning("preflight: this run needs about %s of %s and %s is there: little room to spare",
                        gib(needed), what, gib(there))
    return problems


def _gpu_short(needs: Needs, machine: Machine) -> bool:
    return (needs.gpu_bytes is not None and machine.gpu_bytes is not None
            and needs.gpu_bytes > GPU_ESTIMATE_ABOVE * machine.gpu_bytes)


def _short(needs: Needs, machine: Machine) -> bool:
    return needs.host_bytes > machine.host_available_bytes or _gpu_short(needs, machine)


def shipped_alternatives(ds: dict[str, Any], shape: Shape, seq_len: int, checkpointing: int,
                         local_ranks: int, gpu: bool | None = None) -> dict[str, Needs]:
    """The needs of every shipped config at this run's batch layout and precision, by name (on a GPU or not: as
    `estimate`)."""
    layout = {key: ds[key] for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")}
    alternatives = {}
    for path in shipped_configs():
        other = nvme.settle(precisions.apply({**load_ds_config(Path(path)), **layout}, precisions.precision_of(ds)),
                            shape, local_ranks)
        alternatives[f"ds_configs/{path.name}"] = estimate(other, shape, seq_len, checkpointing, local_ranks, gpu)
    return alternatives
