"""NVMe offload: what DeepSpeed's swappers hold for a model, what they write to disk, and where.

ZeRO-3's parameter swapper reads each parameter partition from NVMe into one of `offload_param.buffer_count`
pinned buffers of `buffer_size` elements and keeps it there until the parameter is released. A parameter is not
released while its next use lies within `stage3_max_reuse_distance` elements of the trace, so the buffers must hold
every parameter that can be kept that way at once: DeepSpeed 0.19 otherwise stops mid-step with `AssertionError:
Not enough buffers 0 for swapping 1` (GPT-2 XL's second step, with the 5 buffers and the 1e9 reuse distance its
docs show). The counts depend on the model, so the shipped configs say "auto" for them and `settle` derives them
from the model's shape; a config that gives numbers is checked by `param_buffer_problems` before anything is built.
The first `offload_param.max_in_cpu` parameter elements (in whole optimizer sub-groups, in order) stay in host RAM.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.artifacts import DiskNeed
from pipeline.families import Shape
from pipeline.precision import precision_of

# DeepSpeed swaps a partition only from this size (deepspeed.runtime.swap_tensor.utils.MIN_AIO_BYTES) or the aio
# block size, whichever is larger; smaller ones stay in host RAM.
MIN_SWAP_BYTES = 1 << 20
# DeepSpeed's defaults for the keys a config may leave out (deepspeed.runtime.zero.config / offload_config).
DEFAULT_SUB_GROUP = 1e9
DEFAULT_MAX_IN_CPU = 1e9
DEFAULT_REUSE_DISTANCE = 1e9
# The keys `settle` derives when a config says "auto".
AUTO_KEYS = ("zero_optimization.offload_param.buffer_count", "zero_optimization.offload_param.buffer_size",
             "zero_optimization.stage3_max_reuse_distance")


def element_bytes(ds: dict[str, Any]) -> int:
    """Bytes per value of the model's own (16-bit or fp32) parameters and gradients."""
    return 4 if precision_of(ds) == "fp32" else 2


def sub_groups(partitions: list[int], sub_group_size: float) -> list[list[int]]:
    """How ZeRO-3 splits an optimizer group into sub-groups (`_create_fp16_sub_groups`): in order, each closed once
    it reaches `sub_group_size` elements."""
    if sub_group_size >= sum(partitions):
        return [partitions]
    groups, current = [], []
    for numel in partitions:
        current.append(numel)
        if sum(current) >= sub_group_size:
            groups.append(current)
            current = []
    return groups + ([current] if current else [])


@dataclass(frozen=True)
class ParamSwap:
    """Where a model's weight matrices live under ZeRO-3 parameter offload to NVMe: each matrix's partition, in
    the order the forward pass uses them (the tied output layer again at the end), and which are swapped."""

    partitions: list[int]  # elements of each matrix's partition on one rank
    swapped: list[bool]  # on NVMe (else in host RAM: within max_in_cpu, or too small to swap)
    trace: list[int]  # indices into `partitions`: the forward pass, then the backward (the forward reversed)
    layer: int  # the elements of one decoder layer's matrices on one rank
    ahead: int  # the most swapped matrices of one decoder layer: what reading a layer ahead takes
    last_layer: int  # the swapped elements of the last decoder layer
    write_back: int  # elements of the swapper's buffer for writing back a sub-group beyond max_in_cpu (0: none)

    @property
    def largest_swapped(self) -> int:
        return max((n for n, swapped in zip(self.partitions, self.swapped, strict=True) if swapped), default=0)

    def held_at_once(self, reuse_distance: float) -> int:
        """The most swapped parameters DeepSpeed can hold in its buffers at once: every parameter whose next use
        lies within `reuse_distance` elements of the trace is kept, so at any point all the swapped parameters
        in the next `reuse_distance` elements (the one being fetched included) may be in buffers."""
        sizes = [self.partitions[index] for index in self.trace]
        starts = [0, *itertools.accumulate(sizes)]  # elements traversed before each position
        in_window: Counter[int] = Counter()
        most, end = 0, 0
        for start in range(len(self.trace)):
            while end < len(self.trace) and starts[end] - starts[start] <= reuse_distance:
                if self.swapped[self.trace[end]]:
                    in_window[self.trace[end]] += 1
                end += 1
            most = max(most, len(in_window))
            index = self.trace[start]
            if self.swapped[index]:
                in_window[index] -= 1
                if not in_window[index]:
                    del in_window[index]
        return most

    def longest_reuse_distance(self, buffers: int) -> int:
        """The largest stage3_max_reuse_distance whose held parameters fit in `buffers` buffers."""
        low, high = 0, sum(self.partitions[index] for index in self.trace)
        if self.held_at_once(low) > buffers:
            return -1
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if self.held_at_once(middle) <= buffers else (low, middle - 1)
        return low


def param_swap(ds: dict[str, Any], shape: Shape, world_size: int = 1) -> ParamSwap | None:
    """How `shape` sits under this config's parameter offload to NVMe; None without it."""
    zero = ds.get("zero_optimization", {})
    offload = zero.get("offload_param", {})
    if offload.get("device") != "nvme":
        return None
    matrices = shape.matrices()
    partitions = [math.ceil(numel / world_size) for numel in matrices]
    in_cpu = min(sum(partitions), _number(offload.get("max_in_cpu"), DEFAULT_MAX_IN_CPU))
    smallest = max(MIN_SWAP_BYTES, ds.get("aio", {}).get("block_size", MIN_SWAP_BYTES)) / element_bytes(ds)
    swapped, end, write_back = [], 0, 0
    for group in sub_groups(partitions, _number(zero.get("sub_group_size"), DEFAULT_SUB_GROUP)):
        end += sum(group)
        swapped += [end > in_cpu and numel >= smallest for numel in group]
        if end > in_cpu:  # no room in host RAM: DeepSpeed keeps a buffer as large as the largest such sub-group
            write_back = max(write_back, sum(group))
    forward = list(range(len(matrices))) + ([0] if shape.tied_embeddings else [])
    per_layer = len(shape.layer_matrices())
    first = 2 if shape.position_parameters else 1  # the embeddings come first
    layers = [range(first + i * per_layer, first + (i + 1) * per_layer) for i in range(shape.layers)]
    ahead = max(sum(swapped[j] for j in layer) for layer in layers)
    last = sum(partitions[j] for j in layers[-1] if swapped[j])
    return ParamSwap(partitions, swapped, forward + forward[::-1], math.ceil(sum(shape.layer_matrices()) / world_size),
                     ahead, last, write_back)


def _number(value: Any, default: float) -> float:
    return default if value is None or value == "auto" else float(value)


class ParamBuffers(NamedTuple):
    count: int
    size: int
    reuse_distance: int


def derived_param_buffers(swap: ParamSwap) -> ParamBuffers:
    """What "auto" settles to: a reuse distance of one decoder layer (what activation checkpointing's recompute
    and the backward pass use twice in a row stays in memory), buffers for everything that distance can keep
    plus one layer's parameters read ahead, each as large as the largest swapped partition."""
    return ParamBuffers(count=max(2, swap.held_at_once(swap.layer) + swap.ahead), size=max(1, swap.largest_swapped),
                        reuse_distance=swap.layer)


def settle(ds: dict[str, Any], shape: Shape, world_size: int = 1) -> dict[str, Any]:
    """A copy of the config with the NVMe parameter buffers' "auto" values derived for this model."""
    swap = param_swap(ds, shape, world_size)
    if swap is None:
        return ds
    ds = copy.deepcopy(ds)
    zero = ds["zero_optimization"]
    derived = derived_param_buffers(swap)
    for key, value in (("buffer_count", derived.count), ("buffer_size", derived.size)):
        if zero["offload_param"].get(key) == "auto":
            zero["offload_param"][key] = value
    if zero.get("stage3_max_reuse_distance") == "auto":
        zero["stage3_max_reuse_distance"] = derived.reuse_distance
    return ds


def param_buffer_problems(ds: dict[str, Any], shape: Shape, world_size: int, source: str) -> list[str]:
    """Why the parameter swap buffers of a settled config cannot hold what it lets in flight (each one paragraph)."""
    swap = param_swap(ds, shape, world_size)
    if swap is None or not any(swap.swapped):
        return []
    zero = ds["zero_optimization"]
    offload = zero["offload_param"]
    count, size = int(offload.get("buffer_count", 5)), int(offload.get("buffer_size", 1e8))
    reuse = _number(zero.get("stage3_max_reuse_distance"), DEFAULT_REUSE_DISTANCE)
    held = swap.held_at_once(reuse)
    problems = []
    if size < swap.largest_swapped:
        problems.append(
            f"{source}: offload_param.buffer_size is {size:,} elements, but this model swaps parameter partitions "
            f"of up to {swap.largest_swapped:,}: set buffer_size to at least that (or \"auto\").")
    if count < held:
        fits = swap.longest_reuse_distance(count)
        shorter = f", or stage3_max_reuse_distance to at most {fits:,}" if fits >= 0 else ""
        problems.append(
            f"{source}: offload_param.buffer_count is {count}, but with stage3_max_reuse_distance {reuse:,.0f} "
            f"DeepSpeed can keep {held} of this model's swapped parameters in buffers at once and would stop "
            f"mid-step (\"Not enough buffers\"). Set buffer_count to at least {held}{shorter} (or both to "
            f"\"auto\": {derived_param_buffers(swap).count} buffers, distance {swap.layer:,}).")
    return problems


def swap_needs(ds: dict[str, Any], params: float) -> list[DiskNeed]:
    """What DeepSpeed writes to NVMe, 2% over for its alignment: for the optimizer the fp32 weights, two Adam
    moments and the fp32 gradients (16 bytes per parameter); for the parameters their 16-bit or fp32 values.
    Empty without NVMe offload."""
    zero = ds.get("zero_optimization", {})
    needs = []
    if zero.get("offload_optimizer", {}).get("device") == "nvme":
        needs.append(DiskNeed(Path(zero["offload_optimizer"]["nvme_path"]), 1.02 * 16 * params,
                              "the NVMe optimizer swap"))
    if zero.get("offload_param", {}).get("device") == "nvme":
        needs.append(DiskNeed(Path(zero["offload_param"]["nvme_path"]), 1.02 * element_bytes(ds) * params,
                              "the NVMe parameter swap"))
    return needs


def swap_folders(ds: dict[str, Any]) -> list[Path]:
    """The run's NVMe swap folders (`<nvme_path>/<run>`, as dsconfig.merge_ds_config sets them)."""
    zero = ds.get("zero_optimization", {})
    return sorted({Path(zero[key]["nvme_path"]) for key in ("offload_param", "offload_optimizer")
                   if zero.get(key, {}).get("device") == "nvme"})


def remove_swap(ds: dict[str, Any]) -> None:
    for folder in swap_folders(ds):
        shutil.rmtree(folder, ignore_errors=True)


def remove_run_swap(ckpt_dir: Path) -> None:
    """Remove the NVMe swap of the run whose checkpoints are in `ckpt_dir`, wherever its merged config (the
    ds_config.json train saves there) put it (`make clean-run`)."""
    config = Path(ckpt_dir) / "ds_config.json"
    if config.is_file():
        remove_swap(json.loads(config.read_text()))


def step_traffic(ds: dict[str, Any], shape: Shape, world_size: int = 1) -> tuple[float, float]:
    """(read, written) bytes of NVMe swap per optimizer step on one rank: the optimizer's fp32 weights, Adam moments
    and gradients in and out (16 bytes per parameter each way; the gradients go out during the backward pass), and
    the swapped parameters read in each micro-batch's forward and backward pass but for the layer at either turn,
    which the reuse distance of one layer keeps, and written once after the update."""
    zero = ds.get("zero_optimization", {})
    read = written = 0.0
    if zero.get("offload_optimizer", {}).get("device") == "nvme":
        read = written = 16 * shape.parameters / world_size
    swap = param_swap(ds, shape, world_size)
    if swap is not None:
        swapped = element_bytes(ds) * sum(n for n, on in zip(swap.partitions, swap.swapped, strict=True) if on)
        layer = element_bytes(ds) * swap.last_layer
        read += ds.get("gradient_accumulation_steps", 1) * max(swapped, 2 * (swapped - layer))
        written += swapped
    return read, written


def fix_cpu_parameter_swapping() -> None:
    """Make ZeRO-3 parameter offload to NVMe on DeepSpeed 0.19's CPU accelerator (the tests and the CPU
    measurements) behave as it does beside a GPU. Two faults, neither on a GPU's path:

    - zero.Init ignores the dtype it is given on an accelerator without fp16 (`dtype or torch.float16 if
      fp16_supported else torch.bfloat16 ...` parses as `(dtype or torch.float16) if ...`): an fp32 run's
      parameter swapper swaps bf16 copies, and the first swapped layer fails with "self and mat2 must have the
      same dtype". The given dtype wins here.
    - With one rank a fetched parameter is its pinned swap buffer itself (`.to("cpu")` copies nothing), where a
      GPU's fetch copies it into device memory; with activation checkpointing the gradients then come out wrong
      (GPT-2 124M, first step: gradient norm 38,691 instead of 88.79; with two ranks, whose all-gather copies,
      they are right). The fetch copies here too.
    """
    from deepspeed.runtime.zero import partition_parameters as zero
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    if getattr(zero.Init._set_dtype, "onecard", False):
        return
    set_dtype = zero.Init._set_dtype

    def _set_dtype(self: Any, ds_config: Any, dtype: Any) -> None:
        set_dtype(self, ds_config, dtype)
        if dtype is not None:
            self.dtype = dtype

    def copy_swapped(handle: type) -> None:
        fetch = handle.__init__

        def __init__(self: Any, params: Any) -> None:
            fetch(self, params)
            for param in params if isinstance(params, list) else [params]:
                if param.ds_tensor.final_location == OffloadDeviceEnum.nvme:
                    param.data = param.data.clone()

        handle.__init__ = __init__

    _set_dtype.onecard = True
    zero.Init._set_dtype = _set_dtype
    copy_swapped(zero.NoGatherHandle)
    copy_swapped(zero.NoGatherCoalescedHandle)


def _disk_name(folder: Path) -> str | None:
    """The block device (as /proc/diskstats names it) of the filesystem holding `folder`; None for one without
    a block device of its own (tmpfs, overlay)."""
    device = os.stat(folder).st_dev
    link = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    return link.resolve().name if link.exists() else None


class DiskCounters(NamedTuple):
    read_bytes: int  # what this process read from storage (DeepSpeed's O_DIRECT swap included)
    write_bytes: int
    busy_ms: int | None  # how long the swap disk had requests in flight, whoever made them (None: not known)
    at: float


class SwapMeter:
    """The NVMe swap traffic of each step: the bytes this process read and wrote (/proc/self/io) and the time the
    swap disk was busy (/proc/diskstats' io_ticks), over the step and over its optimizer phase, and the seconds CPU
    Adam spent computing in that phase. From them: the disk's rate while busy, and how much of its busy time in
    the optimizer phase hid behind Adam's computation (0: none, the two take turns; 1: all)."""

    def __init__(self, folders: list[Path], inner_optimizer: Any) -> None:
        names = {_disk_name(folder) for folder in folders}
        self.disk = names.pop() if len(names) == 1 else None  # one disk, or its busy time means nothing
        self.adam_seconds = 0.0
        step = inner_optimizer.step

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self.adam_seconds += time.perf_counter() - started

        inner_optimizer.step = timed_step
        self.step_start = self.optimizer_start = self.counters()

    def counters(self) -> DiskCounters:
        io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        busy = None
        if self.disk is not None:
            for line in Path("/proc/diskstats").read_text().splitlines():
                fields = line.split()
                if fields[2] == self.disk:
                    busy = int(fields[12])
        return DiskCounters(int(io["read_bytes"]), int(io["write_bytes"]), busy, time.perf_counter())

    def optimizer_begins(self) -> None:
        self.optimizer_start, self.adam_seconds = self.counters(), 0.0

    def step_ends(self) -> dict[str, float | None]:
        end, start, optimizer = self.counters(), self.step_start, self.optimizer_start
        self.step_start = end
        moved = (end.read_bytes - start.read_bytes) + (end.write_bytes - start.write_bytes)
        busy = None if end.busy_ms is None else (end.busy_ms - start.busy_ms) / 1e3
        optimizer_busy = None if end.busy_ms is None else (end.busy_ms - optimizer.busy_ms) / 1e3
        optimizer_seconds = end.at - optimizer.at
        overlap = None
        if optimizer_busy:  # busy + compute beyond the phase's length ran at the same time
            overlap = min(1.0, max(0.0, optimizer_busy + self.adam_seconds - optimizer_seconds) / optimizer_busy)
        return {"swap_read_gb": (end.read_bytes - start.read_bytes) / 1e9,
                "swap_write_gb": (end.write_bytes - start.write_bytes) / 1e9,
                "swap_busy_seconds": busy, "swap_gbps": moved / 1e9 / busy if busy else None,
                "adam_seconds": self.adam_seconds, "swap_overlap": overlap}


# DeepSpeed's async I/O settings (the config's "aio" section) that measure_disk sweeps, in this order: each is
# tried with the best of those before it, the rest at DeepSpeed's defaults.
AIO_SWEEP = {"block_size": [262144, 1048576, 4194304], "queue_depth": [8, 32, 128],
             "thread_count": [1, 2, 4, 8], "single_submit": [False, True], "overlap_events": [True, False]}
# Requests submitted before each wait: the optimizer swapper's four tensors of a sub-group (weights, two moments,
# gradients) at a time.
IN_FLIGHT = 4
AIO_DEFAULTS = {"block_size": 1048576, "queue_depth": 8, "thread_count": 1, "single_submit": False,
                "overlap_events": True}


def measure_disk(folder: Path, gib: float = 1.0, sweep: dict[str, list[Any]] | None = None) -> dict[str, Any]:
    """Read and write speed of the disk holding `folder` through DeepSpeed's own async I/O (the aio handle its
    swappers use, O_DIRECT: the page cache is bypassed), as the optimizer swapper moves data: large pinned tensors,
    IN_FLIGHT requests at a time, `gib` GiB each way per trial. The aio settings are swept one at a time
    (AIO_SWEEP), each trial written then read back; returns every trial and the best settings (least time to write
    and read the same bytes, as a training step swaps about as much in as out)."""
    import torch
    from deepspeed.ops.op_builder import AsyncIOBuilder

    aio = AsyncIOBuilder().load(verbose=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    request = min(256 << 20, int(gib * (1 << 30)) // 4096 * 4096)  # O_DIRECT wants whole 4 KiB blocks
    requests = max(1, round(gib * (1 << 30) / request))
    path = folder / ".onecard-disk-probe.swp"
    trials, best = [], dict(AIO_DEFAULTS)
    try:
        for key, values in (sweep or AIO_SWEEP).items():
            results = []
            for value in values:
                settings = {**best, key: value}
                done = next((t for t in trials if all(t[k] == v for k, v in settings.items())), None)
                if done is not None:  # measured with these settings already
                    results.append(done)
                    continue
                handle = aio.aio_handle(settings["block_size"], settings["queue_depth"], settings["single_submit"],
                                        settings["overlap_events"], settings["thread_count"])
                buffer = handle.new_cpu_locked_tensor(request, torch.empty(0, dtype=torch.uint8))
                buffer.random_(0, 255)
                seconds = {}
                for direction, call in (("write", handle.async_pwrite), ("read", handle.async_pread)):
                    started = time.perf_counter()
                    for first in range(0, requests, IN_FLIGHT):  # as the optimizer swapper submits a sub-group
                        for index in range(first, min(first + IN_FLIGHT, requests)):
                            call(buffer, f"{path}.{index}", 0)
                        handle.wait()
                    seconds[direction] = time.perf_counter() - started
                handle.free_cpu_locked_tensor(buffer)
                moved = requests * request / 1e9
                trial = {**settings, "write_gbps": moved / seconds["write"], "read_gbps": moved / seconds["read"],
                         "seconds": seconds["write"] + seconds["read"]}
                trials.append(trial)
                results.append(trial)
            best = {name: min(results, key=lambda t: t["seconds"])[name] for name in AIO_DEFAULTS}
    finally:
        for leftover in folder.glob(f"{path.name}.*"):
            leftover.unlink()
    fastest = min((t for t in trials if all(t[k] == v for k, v in best.items())), key=lambda t: t["seconds"])
    return {"folder": str(folder), "disk": _disk_name(folder), "gib_per_trial": requests * request / (1 << 30),
            "trials": trials, "best": best, "read_gbps": fastest["read_gbps"], "write_gbps": fastest["write_gbps"],
            "best_read_gbps": max(t["read_gbps"] for t in trials),
            "best_write_gbps": max(t["write_gbps"] for t in trials)}


def aio_section(settings: dict[str, Any]) -> dict[str, Any]:
    """The config's "aio" section for measured settings."""
    return {key: settings[key] for key in AIO_DEFAULTS}
