"""What keeping the optimizer's states in bf16 costs learning: ds_configs/zero2_offload_bf16_states.json (master
weights, gradients and Adam moments in bf16: 8 bytes per parameter on the host instead of 16) against
zero2_offload.json (all fp32), the same model, data and schedule, validation loss side by side.

    python bench/bf16_states.py --data-dir DATA --corpus gutenberg --steps 2000 --out docs/bench/bf16-states

Each arm makes the same updates DeepSpeed makes under its config: DeepSpeed's own CPU Adam (DeepSpeedCPUAdam, the
op both configs run, with its states in the arm's precision) on master weights of the arm's precision, from bf16
gradients (what a bf16 model's backward gives), clipped at 1.0; the model computes from the bf16 copy of the
master weights. Only the forward and backward differ from a bf16 run on a GPU: they compute in fp32 (from those
bf16 weights, rounding the gradients to bf16), in both arms alike, because this CPU has no native bf16 (an AVX2
CPU emulates bf16 matmuls many times slower than fp32) — so the difference between the arms is the states' alone.

A third arm, `bf16-sr`, asks whether stochastic rounding (an update below half a bf16 step of its weight then
lands with the right probability instead of never) recovers what plain rounding loses: neither DeepSpeed nor
PyTorch offers it, torchao's AdamW does (`pip install torchao`; `torchao.optim._AdamW(bf16_stochastic_round=True)`,
its states in bf16 as well) — a measurement of the remedy, not a shipped config.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import REPO, SmallGPT2Config, small_gpt2_values, write_result

from pipeline import schedule as schedules
from pipeline.data import TokenSequences, TrainBatches
from pipeline.dsconfig import load_ds_config
from pipeline.evaluate import validation_loss
from pipeline.families import config_from, for_training
from pipeline.model import FUSED_GELU, build, lm_loss, optimizer_groups
from pipeline.precision import cpu_flags, cpu_model
from pipeline.shard_format import load_index
from pipeline.stage import parse_config

ARMS = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-sr": torch.bfloat16}


@dataclass
class StatesBenchConfig(SmallGPT2Config):
    arms: str = field(default="fp32,bf16", metadata={"help": "which arms to train: fp32, bf16, bf16-sr"})
    seed: int = field(default=1337, metadata={"help": "seeds the weights and the data order"})
    out: Path = field(default=Path("docs/bench/bf16-states"), metadata={"help": "where the JSON records go"})


def model_for(config: StatesBenchConfig, vocab_size: int, eot_id: int) -> torch.nn.Module:
    torch.manual_seed(config.seed)
    values = small_gpt2_values(config, vocab_size, eot_id)
    return build(for_training(config_from(values, "bench"), 0.0, FUSED_GELU), "cpu").train()


def train_arm(config: StatesBenchConfig, arm: str) -> dict[str, Any]:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    shards = config.data_dir / "shards" / config.corpus
    index = load_index(shards)
    batches = TrainBatches(TokenSequences(shards, index, "train", config.seq_len), config.seed,
                           config.micro_batch_size, 1, 1)
    val = TokenSequences(shards, index, "val", config.seq_len)
    model = model_for(config, index["vocab_size"], index["eot_id"])
    dtype = ARMS[arm]
    masters = {id(p): p.detach().to(dtype).clone().requires_grad_(True) for p in model.parameters()}
    for param in model.parameters():  # the model computes from the bf16 copy of the master weights
        param.data.copy_(masters[id(param)].detach().to(torch.bfloat16))
    adam = load_ds_config(REPO / "ds_configs" / "zero2_offload.json")["optimizer"]["params"]
    groups = [{**group, "params": [masters[id(p)] for p in group["params"]]}
              for group in optimizer_groups(model, adam["weight_decay"])]
    if arm == "bf16-sr":
        from torchao.optim import _AdamW

        optimizer = _AdamW(groups, lr=adam["lr"], betas=adam["betas"], eps=adam["eps"], bf16_stochastic_round=True)
    else:
        optimizer = DeepSpeedCPUAdam(groups, lr=adam["lr"], betas=adam["betas"], eps=adam["eps"], adamw_mode=True,
                                     fp32_optimizer_states=dtype == torch.float32)
    curve, losses, started = [], [], time.perf_counter()
    schedule = schedules.make("cosine", config.steps, config.warmup_steps, 0.1, 0)
    for step in range(config.steps):
        for group in optimizer.param_groups:  # torchao keeps the rate in a tensor, to be changed in place
            rate = adam["lr"] * schedule.ratio(step)
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(rate)
            else:
                group["lr"] = rate
        loss = lm_loss(model, *batches.get(step, 0, 0))
        loss.backward()
        for param in model.parameters():  # a bf16 backward's gradients
            param.grad = param.grad.to(torch.bfloat16).float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for param in model.parameters():
            masters[id(param)].grad = param.grad.to(dtype)
            param.grad = None
        optimizer.step()
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(masters[id(param)].to(torch.bfloat16))
        losses.append(float(loss))
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            curve.append({"step": done, "train_loss": sum(losses[-50:]) / len(losses[-50:]),
                          "val_loss": validation_loss(model, val, config.micro_batch_size, config.eval_tokens)})
            model.train()
            print(json.dumps({"arm": arm, **curve[-1], "seconds": time.perf_counter() - started}), flush=True)
    return {"arm": arm, "states": str(dtype).removeprefix("torch."), "curve": curve,
            "val_loss": curve[-1]["val_loss"], "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": time.perf_counter() - started, "losses": losses}


def main() -> None:
    config = parse_config(StatesBenchConfig, sys.argv[1:])
    torch.set_num_threads(os.cpu_count() or 1)
    for arm in config.arms.split(","):
        record = {**train_arm(config, arm), "config": {k: str(v) for k, v in asdict(config).items()},
                  "cpu": cpu_model(), "cpu_bf16_flags": sorted(cpu_flags()), "cores": os.cpu_count(),
                  "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                  "command": "python bench/bf16_states.py " + " ".join(sys.argv[1:])}
        write_result(config.out / f"{arm}.json", record)
        print(f"{arm}: final val loss {record['val_loss']:.4f} (perplexity {math.exp(record['val_loss']):.2f})")


if __name__ == "__main__":
    main()
