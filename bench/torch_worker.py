"""Benchmark worker: the same model and batches in plain PyTorch, without DeepSpeed.

    python bench/torch_worker.py --config plain ...                        # AdamW, everything on the GPU
    torchrun --nproc_per_node 1 bench/torch_worker.py --config fsdp2 ...    # FSDP2 with CPUOffloadPolicy

`plain` is what training GPT-2 XL looks like without any offload (on a 12 GB card: out of memory, recorded
as such). `fsdp2` is PyTorch's own answer: fully_shard each block and the root, parameters, gradients and
optimizer on the CPU (CPUOffloadPolicy needs an accelerator; on a CPU-only machine the same code runs
without it, and the record says so).
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch
from common import BenchConfig, StepLog, train_batches, write_result

from pipeline.families import decoder_layers
from pipeline.hardware import cap_gpu_memory
from pipeline.model import LOSS_CHUNK_TOKENS, TrainingModel, build_model
from pipeline.stage import parse_config


def build(config: BenchConfig, vocab_size: int, eot_id: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(1337)
    model = TrainingModel(build_model(config.preset, vocab_size, eot_id).train(), LOSS_CHUNK_TOKENS)
    if config.gradient_checkpointing:
        model.lm.activation_checkpointing_enable(every_n_layers=1)
    if config.config != "fsdp2":
        return model.to(device)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    options = {"mesh": mesh}
    if config.precision == "bf16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if device.type == "cuda":
        options["offload_policy"] = CPUOffloadPolicy()
    else:
        config.config = "fsdp2 (no CPU offload: CPUOffloadPolicy needs a GPU)"
    for layer in decoder_layers(model.lm):
        fully_shard(layer, **options)
    fully_shard(model, **options)  # the root: TrainingModel, so every forward goes through its hooks
    return model


def main() -> None:
    config = parse_config(BenchConfig, sys.argv[1:])
    system = "fsdp2" if config.config == "fsdp2" else "torch"
    command = [sys.executable, *sys.argv]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.gpu_mem_cap is not None:
        cap_gpu_memory(config.gpu_mem_cap)
    batches, index = train_batches(config)
    log = StepLog()
    error = None
    try:
        model = build(config, index["vocab_size"], index["eot_id"], device)
        # fused AdamW where there is a GPU: the fastest PyTorch optimizer, the fair baseline
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.1,
                                      fused=device.type == "cuda" and config.config == "plain")
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                    if config.precision == "bf16" and config.config == "plain" else nullcontext())
        for step in range(config.steps):
            log.start()
            total = 0.0
            for micro_step in range(config.grad_accum):
                inputs, targets = (t.to(device) for t in batches.get(step, micro_step, 0))
                with autocast:
                    loss = model(inputs, targets)
                (loss / config.grad_accum).backward()
                total += loss.item() / config.grad_accum
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            log.end(total)
    except Exception as caught:
        error = caught
    record = log.result(system, config, index, command, error)
    write_result(config.result, record)


if __name__ == "__main__":
    main()
