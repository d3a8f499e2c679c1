"""The host-memory ledger: the bytes a run holds in host RAM, by kind, read off the live DeepSpeed engine.

The memory model (pipeline/memory.py) estimates the same kinds before anything is built; train logs the two side
by side after the first step (when CPU Adam has made its moments and ZeRO its accumulation buffers) and saves them
in run.json, so that every run tests the estimate. The kinds:

    master        the optimizer's fp32 (or bf16) master weights
    gradients     host gradient buffers (the partition the optimizer steps on, accumulation and transfer buffers)
    moments       Adam's two moments
    swap_buffers  NVMe offload's pinned buffers (parameter and optimizer swappers)
    model         the model's own 16-bit (or fp32) weights kept on the host: ZeRO-3's offloaded partitions (those
                  not swapped to NVMe), ZeRO-1/2's staging copy for the upload after CPU Adam
    device        what a GPU would hold instead: the model's weights, gradients and DeepSpeed's buckets, which
                  are host memory only on a CPU accelerator (on a GPU the ledger finds none)
    other         any other engine tensor on the host of 1 MiB or more (named in the debug log: a kind to add)

Each tensor's storage is counted once, under the first of these kinds that any path to it names (ZeRO-3's small
persistent parameters are views into its flat buffer of offloaded partitions, which is `model`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.hardware import GIB
from pipeline.memory import pinned_size

log = logging.getLogger("onecard")

KINDS = ("master", "gradients", "moments", "swap_buffers", "model", "device", "other")
# DeepSpeed 0.19's attribute names (ZeRO-1/2: stage_1_and_2.py, ZeRO-3: stage3.py, the NVMe swappers), by kind.
ATTRIBUTE_KINDS = {
    "single_partition_of_fp32_groups": "master", "fp32_partitioned_groups_flat": "master",
    "grad_partitions_flat_buffer": "gradients", "accumulated_grads_in_cpu": "gradients",
    "temp_grad_buffer_for_cpu_offload": "gradients", "averaged_gradients": "gradients",
    "grads_in_partition": "gradients",
    "state": "moments",
    "optimizer_swapper": "swap_buffers", "param_swapper": "swap_buffers", "nvme_swapper": "swap_buffers",
    "fp16_partitioned_groups_flat": "model", "fp16_partitioned_groups": "model",
    "param_groups_fp16_flat_cpu_memory": "model",
    "param_buffer_of_bit16_for_cpu_offload_groups": "model",
    "bit16_groups_flat": "device", "lp_param_buffer": "device", "ipg_buckets": "device", "ipg_buffer": "device",
    "temp_grad_buffer_for_gpu_offload": "device", "persistent_parameters": "device",
}
SMALLEST_OTHER = 1 << 20


def _tensors(value: Any, path: str, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor reachable from `value` through containers and DeepSpeed's own objects, with each of its paths
    (a tensor is yielded once per path; containers and objects are walked once)."""
    if isinstance(value, torch.Tensor):
        yield path, value
        if value.grad is not None:
            yield f"{path}.grad", value.grad
        if getattr(value, "ds_tensor", None) is not None:
            yield f"{path}.ds_tensor", value.ds_tensor
        if getattr(value, "nvme_swapper", None) is not None:  # ZeRO-3's parameter swapper, shared by them all
            yield from _tensors(value.nvme_swapper, f"{path}.nvme_swapper", seen)
        return
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple | set):
        items = enumerate(value)
    elif isinstance(value, torch.optim.Optimizer) or type(value).__module__.startswith("deepspeed"):
        items = vars(value).items()
    else:
        return
    for key, item in items:
        yield from _tensors(item, f"{path}.{key}", seen)


def _kind(path: str) -> str | None:
    """The kind of a tensor by its path: a gradient of a master weight is a gradient; otherwise the innermost
    attribute on the path that names a kind; None where none does."""
    parts = path.split(".")
    named = next((ATTRIBUTE_KINDS[part] for part in reversed(parts) if part in ATTRIBUTE_KINDS), None)
    return "gradients" if parts[-1] == "grad" and named == "master" else named


def _rank(kind: str | None) -> int:
    return KINDS.index(kind) if kind is not None else len(KINDS)


def measure(engine: Any, model: torch.nn.Module) -> dict[str, int]:
    """The bytes of host memory the engine's tensors hold, by kind (KINDS)."""
    storages: dict[int, tuple[int, str | None, str]] = {}  # data pointer: bytes, kind, a path to it
    walked: set[int] = set()
    for root, value in (("optimizer", engine.optimizer), ("model", list(model.parameters()))):
        for path, tensor in _tensors(value, root, walked):
            storage = tensor.untyped_storage()
            if tensor.device.type != "cpu" or storage.nbytes() == 0:
                continue
            # the model's own parameters (and gradients) live on the accelerator unless a named kind holds them
            kind = _kind(path) or ("device" if root == "model" else None)
            # page-locked beside a GPU: what the pinned-memory allocator took for it (a power of two), not its size
            size = pinned_size(storage.nbytes()) if tensor.is_pinned() else storage.nbytes()
            known = storages.get(storage.data_ptr())
            if known is None or _rank(kind) < _rank(known[1]):
                storages[storage.data_ptr()] = (int(size), kind, path)
    ledger = dict.fromkeys(KINDS, 0)
    for size, kind, path in storages.values():
        if kind is None and size >= SMALLEST_OTHER:
            log.debug("ledger: %s (%.1f MiB) is of no known kind", path, size / (1 << 20))
        if kind is not None or size >= SMALLEST_OTHER:
            ledger[kind or "other"] += size
    return ledger


def table(measured: dict[str, float], estimated: dict[str, float]) -> str:
    """The ledger beside the estimate, one line per kind, in GiB."""
    rows = [f"{kind} {measured.get(kind, 0) / GIB:.2f} (estimate {estimated.get(kind, 0) / GIB:.2f})"
            for kind in (*KINDS, "save", "load") if measured.get(kind) or estimated.get(kind)]
    return ", ".join(rows)
