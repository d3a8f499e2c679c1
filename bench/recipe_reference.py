"""The reference recipe: nanoGPT's `train.py` loop, written out in plain PyTorch (no DeepSpeed, no offload).

    python bench/recipe_reference.py --preset tiny --seq-len 128 --steps 300 --result reference.json

What nanoGPT does and this does too: AdamW with betas (0.9, 0.95), weight decay on the >= 2-D parameters only,
a linear warmup then a cosine decay to min_lr = lr x min_lr_ratio (nanoGPT's `get_lr`, warmup counted as
(it + 1) / (warmup + 1)), gradient accumulation, gradient clipping at 1.0, bf16 autocast on a GPU. The model
(a `pipeline.model` preset, seed 1337) and the batches (`pipeline.data`, seed 1337) are the ones onecard
trains on, so the two runs differ only in the training code. The record has the per-step training loss and
the final validation loss, computed by the same function that scores onecard's checkpoint.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from common import BenchConfig, base_record, train_batches, write_result

from pipeline.data import TokenSequences
from pipeline.evaluate import validation_loss
from pipeline.model import build_model
from pipeline.stage import DataDir, parse_config


@dataclass
class RecipeConfig(BenchConfig):
    lr_warmup: int = field(default=15, metadata={"help": "learning-rate warmup steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine decays to lr x this"})
    eval_tokens: int = field(default=1 << 20, metadata={"help": "validation tokens scored at the end"})


def nanogpt_lr(step: int, config: RecipeConfig) -> float:
    """nanoGPT's get_lr, with lr_decay_iters = max_iters."""
    min_lr = config.lr * config.min_lr_ratio
    if step < config.lr_warmup:
        return config.lr * (step + 1) / (config.lr_warmup + 1)
    ratio = (step - config.lr_warmup) / max(1, config.steps - config.lr_warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * min(1.0, ratio))) * (config.lr - min_lr)


def main() -> None:
    config = parse_config(RecipeConfig, sys.argv[1:])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batches, index = train_batches(config)
    torch.manual_seed(1337)
    model = build_model(config.preset, index["vocab_size"], index["eot_id"]).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16"
                and device.type == "cuda" else nullcontext())
    losses = []
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = nanogpt_lr(step, config)
        total = 0.0
        for micro_step in range(config.grad_accum):
            inputs, targets = (t.to(device) for t in batches.get(step, micro_step, 0))
            with autocast:
                logits = model(input_ids=inputs).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
            (loss / config.grad_accum).backward()
            total += loss.item() / config.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    shards_dir = DataDir(config.data_dir).shards(config.corpus)
    val = TokenSequences(shards_dir, index, "val", config.context)
    record = {**base_record("reference", config, [sys.executable, *sys.argv]), "benchmark": "recipe",
              "losses": losses, "val_loss": validation_loss(model, val, config.micro_batch_size, config.eval_tokens)}
    write_result(config.result, record)


if __name__ == "__main__":
    main()
