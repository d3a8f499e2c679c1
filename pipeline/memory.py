"""The memory model: what a run of a DeepSpeed config needs on the GPU, in host RAM and on NVMe, for a model's
shape — `onecard plan` and train's preflight both ask it.

GPU: DeepSpeed's own estimators for the model states (`estimate_zero2/3_model_states_mem_needs`), plus what they
leave out — activations for the micro-batch (checkpointed or not), the output layer's logits chunk, DeepSpeed's
buckets and ZeRO-3's live parameters — then the allocator's fragmentation and the CUDA context as measured on the
GPU host (docs/BENCHMARKS.md). Host and NVMe: DeepSpeed's CPU estimate, or NVMe offload's buffers and swap.
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
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, cpu_offload=optimizer_device != "none", cpu_offload_params=params_device != "none",
            zero_init=False)
        working = 2 * min(params, zero.get("stage3_max_live_parameters", 1e9))  # gathered bf16 parameters
        buffers = 2 * 2 * zero.get("stage3_prefetch_bucket_size", 5e7)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(params, cpu_offload=optimizer_device != "none")
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
