"""The memory model: what a run of a DeepSpeed config needs on the GPU, in host RAM and on NVMe, for a model's
shape — `onecard plan` and train's preflight both ask it.

GPU: DeepSpeed's own estimators for the model states (`estimate_zero2/3_model_states_mem_needs`), plus what they
leave out — activations for the micro-batch (checkpointed or not), the output layer's logits chunk, DeepSpeed's
buckets and ZeRO-3's live parameters — then the allocator's fragmentation and the CUDA context as measured on the
GPU host (docs/BENCHMARKS.md). Host: by the kinds of the host-memory ledger (pipeline/ledger.py), which every run
measures beside this estimate, plus a checkpoint save and the model's build. NVMe: DeepSpeed's swap files.
"""

from __future__ import annotations

import math
from typing import Any

from pipeline import precision as precisions
from pipeline.dsconfig import offload_devices
from pipeline.families import Shape
from pipeline.hardware import GIB
from pipeline.model import LOSS_CHUNK_TOKENS

# From the GPU-host measurement of GPT-2 XL (docs/BENCHMARKS.md): the allocator reserved 1.29x (ZeRO-2) and
# 2.06x (ZeRO-3) of its peak allocation, and NVML charged the process 1.67 GiB beyond the reservation (CUDA
# context, cuBLAS and NCCL workspaces).
FRAGMENTATION = {2: 1.29, 3: 2.06}
CONTEXT_GIB = 1.67
# A trainer process before any model state (Python, torch, DeepSpeed, transformers, the loader): the tiny
# preset's peak RSS on the development machine is 0.7-0.8 GiB, nearly all of it this.
PROCESS_BYTES = 0.8 * GIB


def gpu_memory_bytes(ds: dict[str, Any], shape: Shape, seq_len: int, micro: int,
                     checkpointing: int) -> dict[str, float]:
    """The GPU bytes of one config, term by term: DeepSpeed's estimate of the model states, then what it
    leaves out; `total` adds fragmentation and the CUDA context. In fp32 (a card without tensor cores) every
    term that bf16 or fp16 keeps in 2 bytes per value takes 4."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    params, zero = shape.parameters, ds["zero_optimization"]
    stage = zero["stage"]
    params_device, optimizer_device = offload_devices(ds)
    if stage == 3:
        largest_layer = shape.vocab_size * shape.width  # the token embedding
        _, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, cpu_offload=optimizer_device != "none", cpu_offload_params=params_device != "none",
            zero_init=False)
        working = 2 * min(params, zero.get("stage3_max_live_parameters", 1e9))  # gathered bf16 parameters
        buffers = 2 * 2 * zero.get("stage3_prefetch_bucket_size", 5e7)
    else:
        _, gpu = estimate_zero2_model_states_mem_needs(params, cpu_offload=optimizer_device != "none")
        working = 0.0
        buffers = 2 * 2 * zero.get("reduce_bucket_size", 5e8)  # two bf16 gradient buckets
    tokens = micro * seq_len
    if checkpointing:  # each checkpointed block keeps its 16-bit input; k blocks are live again in the backward
        activations = (math.ceil(shape.layers / checkpointing) * 2 * shape.width
                       + checkpointing * shape.activation_bytes_per_token()) * tokens
    else:
        activations = shape.layers * shape.activation_bytes_per_token() * tokens
    logits = 3 * 4 * min(LOSS_CHUNK_TOKENS, tokens) * shape.vocab_size  # fp32 logits, their gradient, softmax
    # ZeRO-1 with an offloaded optimizer keeps every bf16 gradient on the GPU between micro-steps, in
    # allocations made once: they do not fragment
    gradients = 2 * params if stage == 1 and optimizer_device != "none" else 0.0
    widen = 2.0 if precisions.precision_of(ds) == "fp32" else 1.0
    gpu, working, buffers, activations, gradients = (widen * term for term in
                                                     (gpu, working, buffers, activations, gradients))
    if stage < 3 and precisions.fp32_accumulation_buffer(ds):  # instead, the fp32 sum of the micro-steps
        gradients = (gradients if stage == 2 else 0.0) + 4 * params
    allocated = gpu + working + buffers + activations + logits
    return {"model_states": gpu, "gradients": gradients, "working_parameters": working,
            "buffers": buffers, "activations": activations, "logits": logits, "allocated": allocated + gradients,
            "total": allocated * FRAGMENTATION[max(stage, 2)] + gradients + CONTEXT_GIB * GIB}


HOST_KINDS = ("master", "gradients", "moments", "swap_buffers", "model", "device")  # the ledger's (pipeline/ledger.py)


def pinned_size(size: float) -> float:
    """What a page-locked host tensor of `size` bytes takes beside a GPU: PyTorch's pinned-memory allocator (which
    DeepSpeed's `pin_memory` copies go through) rounds each allocation up to a power of two by default."""
    return float(1 << math.ceil(math.log2(size))) if size > 0 else 0.0


def host_bytes(ds: dict[str, Any], shape: Shape, world_size: int = 1, on_gpu: bool = True) -> dict[str, float]:
    """The host RAM one rank of a settled config holds for `shape`, by the ledger's kinds (HOST_KINDS), plus `save`,
    what a checkpoint save adds on top (rank 0), `load`, what a resume's checkpoint load adds on top (every rank),
    `build`, the fp32 model as train builds it on the host before
    DeepSpeed takes it over, and `pinned`, the page-locked part of the kinds. `on_gpu` False: a CPU accelerator,
    whose host also holds what a GPU would (the model's weights and gradients), and which pins nothing."""
    from pipeline import nvme

    zero = ds["zero_optimization"]
    stage, (params_device, optimizer_device) = zero["stage"], offload_devices(ds)
    params, matrices = shape.parameters, shape.matrices()
    partition, largest = params / world_size, max(matrices)
    element = nvme.element_bytes(ds)  # the model's own weights and gradients
    fp32_sum = precisions.fp32_accumulation_buffer(ds)
    summed = 4 if fp32_sum else element  # what the micro-steps' gradients sum in
    bf16 = ds.get("bf16", {})
    master = 2 if bf16.get("bf16_master_weights_and_grads") else 4
    moment = 2 if bf16.get("bf16_optimizer_states") else 4
    locked = [0.0]

    def pinned_bytes(size: float, pinned: bool) -> float:
        if not pinned:
            return size
        locked[0] += pinned_size(size)
        return pinned_size(size)

    pin = on_gpu and zero.get("offload_optimizer", {}).get("pin_memory", False)
    groups = nvme.sub_groups([math.ceil(m / world_size) for m in matrices],
                             zero.get("sub_group_size", nvme.DEFAULT_SUB_GROUP))
    kinds = dict.fromkeys(HOST_KINDS, 0.0)
    if optimizer_device == "nvme":
        kinds["swap_buffers"] += 4 * zero["offload_optimizer"].get("buffer_count", 4) * max(map(sum, groups))
        locked[0] += kinds["swap_buffers"] if on_gpu else 0.0  # DeepSpeed's aio allocates them page-locked
        kinds["gradients"] += pinned_bytes(summed * partition, pin)  # gathered on the host before the swap
    elif optimizer_device == "cpu" and stage == 3:
        kinds["master"] += master * partition
        kinds["moments"] += 2 * moment * partition
        # the gradients as ZeRO-3 gathers them, in what the micro-steps sum in, then in fp32 per optimizer sub-group
        kinds["gradients"] += pinned_bytes(summed * partition, pin) + sum(
            pinned_bytes(master * sum(group), pin) for group in groups)
    elif optimizer_device == "cpu":
        kinds["master"] += pinned_bytes(master * partition, pin)
        kinds["moments"] += 2 * moment * partition
        # the master partition's gradients, and the buffer each gradient is copied through
        kinds["gradients"] += pinned_bytes(master * partition, pin) + pinned_bytes(element * largest, pin)
        if stage == 2 and ds["gradient_accumulation_steps"] > 1 and master == 4 and not fp32_sum:
            # summed across micro-steps on the host in the model's precision (an fp32 sum is on the device)
            kinds["gradients"] += sum(pinned_bytes(element * m / world_size, pin) for m in matrices)
        kinds["model"] += pinned_bytes(element * partition, pin)  # the staging copy for the upload after CPU Adam
    swap = nvme.param_swap(ds, shape, world_size)
    if swap is not None:
        offload = zero["offload_param"]
        param_buffers = element * offload["buffer_count"] * offload["buffer_size"]
        kinds["swap_buffers"] += param_buffers
        locked[0] += param_buffers if on_gpu else 0.0
        kinds["model"] += element * sum(n for n, swapped in zip(swap.partitions, swap.swapped, strict=True)
                                        if not swapped)
        kinds["swap_buffers"] += element * swap.write_back
    elif params_device == "cpu":  # ZeRO-3's offloaded partitions
        pin_params = on_gpu and zero["offload_param"].get("pin_memory", False)
        kinds["model"] += pinned_bytes(element * partition, pin_params)
        if pin_params:  # each parameter's partition is pinned on its own first and copied into the flat buffer; the
            # allocator keeps the freed blocks for reuse
            kinds["model"] += sum(pinned_bytes(element * m / world_size, True) for m in matrices)
    if not on_gpu:  # a CPU accelerator: the weights and DeepSpeed's buckets a GPU would hold
        kinds["device"] += element * ((params + largest) if stage < 3 else zero.get("reduce_bucket_size", 5e8))
    built_on_host = stage == 3 or not on_gpu
    # the save holds one whole fp32 tensor at a time (ZeRO-3's gather two: its buffer and the copy it returns; bf16
    # masters: the gathered bf16 tensor and its fp32 copy), or with the optimizer on NVMe one sub-group's weights
    # read from its swap file
    if optimizer_device == "nvme":
        saved = 4 * max(map(sum, groups))
    else:
        saved = (8 if stage == 3 else 4 + (master if master < 4 else 0)) * largest
    # a resume reads this rank's ZeRO optimizer file whole (DeepSpeed's torch.load, no mmap) while the states it is
    # loaded into are already there: the master partition and both moments, or, with the optimizer on NVMe (whose
    # moments onecard reads back one sub-group at a time, pipeline/checkpoint.py), one sub-group's two moments. A
    # ZeRO-1/2 resume has read the model's weights (element bytes each) before, and they were still held: measured
    # for bf16 states, the mid model of tests/test_ledger.py, the load was the two files' sum to 0.2%.
    if optimizer_device == "nvme":
        loaded = 2 * 4 * max(map(sum, groups))
    else:
        loaded = (master + 2 * moment) * partition + (element * params if stage < 3 else 0.0)
    return {**kinds, "save": saved, "load": loaded, "build": 4 * params if built_on_host else 0.0,
            "pinned": locked[0]}


def host_total(kinds: dict[str, float], ranks: int = 1) -> float:
    """The most host RAM `ranks` ranks of these kinds hold together: their model states with rank 0's checkpoint
    save on top, or with every rank's resume load on top, or their builds. (A run is judged by its resume too: one
    the machine can start but not resume is lost at its first crash.)"""
    steady = sum(kinds[kind] for kind in HOST_KINDS)
    return max(ranks * steady + kinds["save"], ranks * (steady + kinds["load"]),
               ranks * (kinds["build"] + kinds["model"]))


def disk_bytes(ds: dict[str, Any], params: float) -> float:
    """What DeepSpeed's NVMe swap takes on disk (pipeline/nvme.py)."""
    from pipeline.nvme import swap_needs

    return sum(need.bytes for need in swap_needs(ds, params))
