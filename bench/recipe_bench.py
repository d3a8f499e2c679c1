"""Does onecard's training learn as well as the reference recipe? onecard (DeepSpeed ZeRO with offload)
against nanoGPT's recipe in a plain PyTorch loop (`bench/recipe_reference.py`): the same model and
initialisation, the same batches in the same order, the same token budget and schedule, both scored on the
same validation tokens by `pipeline.evaluate.validation_loss`.

    python bench/recipe_bench.py --corpus builtin --preset tiny --seq-len 128 --steps 300 --out docs/bench/recipe-cpu

Writes `<out>/onecard.json` and `<out>/reference.json` (keys: system, benchmark "recipe", val_loss, losses per
step, tokens, command, date, ...), and `<out>/table.md`.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import REPO, base_record, write_result
from recipe_reference import RecipeConfig

from pipeline.checkpoint import load_weights
from pipeline.data import TokenSequences
from pipeline.evaluate import validation_loss
from pipeline.metrics import read_metrics
from pipeline.model import build_model
from pipeline.shard_format import load_index
from pipeline.stage import DataDir, parse_config

RUN = "recipe-onecard"


@dataclass
class RecipeDriverConfig(RecipeConfig):
    deepspeed: str = field(default="zero2_offload", metadata={"help": "onecard's DeepSpeed config (ds_configs/)"})
    out: Path = field(default=Path("recipe-results"), metadata={"help": "folder for the records and the table"})


def run(command: list[str]) -> str:
    """Run a system to the end; its command line as the record shows it (the program by name, not path)."""
    print(f"== {shlex.join(command)}", file=sys.stderr, flush=True)
    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{finished.stdout[-3000:]}{finished.stderr[-3000:]}")
    return shlex.join([Path(command[0]).name, *command[1:]])


def shared_flags(config: RecipeDriverConfig) -> list[str]:
    return ["--preset", config.preset, "--seq-len", str(config.context), "--micro-batch-size",
            str(config.micro_batch_size), "--grad-accum", str(config.grad_accum), "--precision", config.precision,
            "--lr", str(config.lr), "--data-dir", str(config.data_dir), "--corpus", config.corpus]


def onecard(config: RecipeDriverConfig) -> dict[str, Any]:
    command = [str(Path(sys.executable).with_name("deepspeed")), "launch/train.py", "--deepspeed",
               f"ds_configs/{config.deepspeed}.json", *shared_flags(config), "--max-steps", str(config.steps),
               "--schedule", "cosine", "--warmup-steps", str(config.lr_warmup), "--min-lr-ratio",
               str(config.min_lr_ratio), "--run", RUN,
               "--force", "--checkpoint-every", str(config.steps), "--eval-every", "0", "--log-every", "50"]
    shown = run(command)
    data = DataDir(config.data_dir)
    index = load_index(data.shards(config.corpus), checksums=False)
    model = build_model(config.preset, index["vocab_size"], index["eot_id"])
    _, weights = load_weights(data.checkpoints(RUN))
    model.load_state_dict(weights, strict=False)  # lm_head.weight is tied to the token embedding
    val = TokenSequences(data.shards(config.corpus), index, "val", config.context)
    config.config = f"ds_configs/{config.deepspeed}.json"
    return {**base_record("onecard", config, [shown]), "benchmark": "recipe",
            "losses": [m["loss"] for m in read_metrics(data.runs(RUN))],
            "val_loss": validation_loss(model, val, config.micro_batch_size, config.eval_tokens)}


def reference(config: RecipeDriverConfig) -> dict[str, Any]:
    result = config.out / "reference.json"
    shown = run([sys.executable, "bench/recipe_reference.py", *shared_flags(config), "--steps", str(config.steps),
                 "--lr-warmup", str(config.lr_warmup), "--min-lr-ratio", str(config.min_lr_ratio), "--eval-tokens",
                 str(config.eval_tokens), "--config", "nanoGPT recipe, plain PyTorch", "--result", str(result)])
    return {**json.loads(result.read_text()), "command": shown}


def table(records: list[dict[str, Any]], every: int) -> str:
    steps = sorted({*range(every, len(records[0]["losses"]) + 1, every), len(records[0]["losses"])})
    lines = ["| system | config | " + " | ".join(f"train loss @{s}" for s in steps) + " | final val loss |",
             "|---|---|" + "---|" * (len(steps) + 1)]
    for r in records:
        lines.append(f"| {r['system']} | {r['config']} | " + " | ".join(f"{r['losses'][s - 1]:.4f}" for s in steps)
                     + f" | **{r['val_loss']:.4f}** |")
    difference = records[0]["val_loss"] / records[1]["val_loss"] - 1
    return "\n".join(lines) + f"\n\nonecard's final validation loss is {100 * difference:+.2f}% of the reference's.\n"


def main() -> None:
    config = parse_config(RecipeDriverConfig, sys.argv[1:])
    config.out.mkdir(parents=True, exist_ok=True)
    records = [onecard(config), reference(config)]
    tokens = config.steps * config.micro_batch_size * config.grad_accum * config.context
    for record in records:
        record["tokens"] = tokens
        record["bench_command"] = shlex.join(["python", "bench/recipe_bench.py", *sys.argv[1:]])
        record["relative_val_loss"] = record["val_loss"] / records[1]["val_loss"]
        write_result(config.out / f"{record['system']}.json", record)
    markdown = table(records, max(1, config.steps // 6))
    (config.out / "table.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
