"""Stage 4, train: a causal LM (GPT-2, Llama, Qwen2, Mistral) under DeepSpeed ZeRO with CPU/NVMe offload,
resumable exactly.

    deepspeed launch/train.py --deepspeed ds_configs/zero3_offload.json [--preset gpt2-xl] [--max-steps N] ...
    ... [--model path/to/config.json]        from scratch, any model of the families (pipeline/families.py)
    ... [--init-from Qwen/Qwen2.5-1.5B]      from released safetensors weights

The DeepSpeed JSON decides ZeRO stage, offload, precision, batch sizes and AdamW hyper-parameters; the flags
below may override the batch sizes, precision and learning rate, and the merged config is logged and saved
with the checkpoints. The learning rate follows a linear warmup, then a cosine decay to --min-lr-ratio or
warmup-stable-decay (--schedule wsd: extendable, and --cooldown-from branches a decayed run from its stable phase).
Checkpoints go to `checkpoints/<run>/`; TensorBoard events, `metrics.jsonl` and `train.log` (the console's lines
plus what is left off it: the merged config, library warnings) to `runs/<run>/`; starting
the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline import checkpoint, families, ledger, memory, nvme, preflight, pretrained
from pipeline import precision as precisions
from pipeline import schedule as schedules
from pipeline.artifacts import (
    MANIFEST,
    DiskNeed,
    bytes_in,
    input_entry,
    require_disk,
    write_json_atomic,
    write_text_atomic,
)
from pipeline.data import TokenSequences, TrainBatches, micro_batch_loader
from pipeline.distributed import (
    StopSignal,
    all_reduce_sum,
    any_rank,
    every_rank,
    init_distributed,
    launch_time,
    under_deepspeed_launcher,
)
from pipeline.dsconfig import (
    check_nvme,
    describe,
    load_ds_config,
    load_ops,
    merge_ds_config,
    offload_devices,
)
from pipeline.hardware import (
    GIB,
    MemoryProbe,
    cap_gpu_memory,
    device_name,
    peak_tflops,
    rss_rise,
    start_rss_rise,
)
from pipeline.metrics import Metrics
from pipeline.model import (
    FUSED_GELU,
    GPT2_GELU,
    LOSS_CHUNK_TOKENS,
    PRESETS,
    TrainingModel,
    build,
    compile_layers,
    default_seq_len,
    enable_activation_checkpointing,
    model_config,
    optimizer_groups,
    parameter_count,
)
from pipeline.shard_format import load_index
from pipeline.stage import (
    AT_LEAST_ONE,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    RATIO,
    DataDir,
    PipelineError,
    Range,
    StageConfig,
    close_log_file,
    log_to_file,
    setup_logging,
    stage_main,
)
from pipeline.timing import PhaseTimer, StartupClock

log = logging.getLogger("onecard")


@dataclass
class TrainConfig(StageConfig):
    deepspeed: str = field(default="ds_configs/zero3_offload.json", metadata={"help": "DeepSpeed JSON config"})
    corpus: str = field(default="builtin", metadata={"help": "corpus to train on (a folder under shards/)"})
    preset: str | None = field(default=None, metadata={
        "help": f"{' | '.join(PRESETS)} (default: tiny, or the shape of --init-from)"})
    model: str | None = field(default=None, metadata={
        "help": "train from scratch a model of this config.json (the file, its folder or a hub id): GPT-2, "
                "Llama, Qwen2 or Mistral, through transformers' own classes"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from released weights: a Hugging Face hub id (openai-community/gpt2-xl, "
                "Qwen/Qwen2.5-1.5B, ...) or a folder with config.json + model.safetensors (an onecard export too)"})
    run: str | None = field(default=None, metadata={
        "help": "run name (default: <corpus>-<preset>-<config>-<YYYYMMDD>, the newest such run if one exists)"})
    seq_len: int | None = field(default=None, metadata={"range": AT_LEAST_ONE,
        "help": "sequence length (default: the model's context, at most 2048)"})
    max_steps: int = field(default=300, metadata={"range": AT_LEAST_ONE,
                                                  "help": "optimizer steps to train for, in total"})
    warmup_steps: int | None = field(default=None, metadata={"range": NON_NEGATIVE,
                                                             "help": "linear warmup steps (default: 5%% of max)"})
    min_lr_ratio: float = field(default=0.1, metadata={"range": RATIO,
                                                       "help": "the decay ends at this fraction of the peak"})
    schedule: Literal["cosine", "wsd"] | None = field(default=None, metadata={
        "help": "the learning rate after the warmup: wsd (the default; 1.1%% lower validation loss than cosine "
                "in docs/QUALITY.md), the peak until the run's last --decay, then a linear decay, and a wsd run "
                "extends with a larger --max-steps; cosine, decaying over the whole run (its length is fixed once "
                "it starts). A resumed run keeps its own"})
    decay: float = field(default=0.2, metadata={"range": POSITIVE, "help": "wsd: the decay's length, a fraction "
                                                                           "of the run (below 1) or steps"})
    cooldown_from: str | None = field(default=None, metadata={
        "help": "wsd: start this run (--run NAME) from a checkpoint of another run's stable phase "
                "(checkpoints/RUN/step_N, under --data-dir or a path) and decay from there over --decay"})
    allow_schedule_change: bool = field(default=False, metadata={
        "help": "resume although the learning rate would jump at once (a cosine run given another --max-steps, "
                "a wsd run extended inside its decay)"})
    micro_batch_size: int | None = field(default=None, metadata={"range": AT_LEAST_ONE,
                                                                 "help": "override the JSON's micro-batch"})
    grad_accum: int | None = field(default=None, metadata={"range": AT_LEAST_ONE,
                                                           "help": "override gradient_accumulation_steps"})
    precision: Literal["auto", "bf16", "fp16", "fp32"] | None = field(default=None, metadata={
        "help": "override the JSON's precision; auto: the hardware's choice (bf16 on CUDA 8.0+ and on CPUs with "
                "AVX512-BF16/AMX, fp16 on CUDA 7.x, else fp32), which the shipped configs ask for"})
    allow_precision_change: bool = field(default=False, metadata={
        "help": "resume a run in another precision than it was trained in (the fp32 master weights and Adam "
                "moments carry over; an fp16 loss scale starts anew)"})
    lr: float | None = field(default=None, metadata={"range": POSITIVE,
                                                     "help": "override the optimizer's peak learning rate"})
    activation_checkpointing: int = field(
        default=0, metadata={"range": NON_NEGATIVE,
                             "help": "recompute activations of every k-th decoder layer in the backward "
                             "pass: 0 off, 1 every block, k every k-th (less memory, more compute)"})
    selective_checkpointing: bool = field(
        default=False, metadata={"help": "in the checkpointed layers keep the matmul and attention outputs and "
                                 "recompute only the norms, activations and adds (more memory, less compute)"})
    activation_offload: bool = field(
        default=False, metadata={"help": "keep the checkpointed activations in pinned host memory"})
    compile: bool = field(
        default=False, metadata={"help": "torch.compile each decoder layer (fuses the norms, activations, bias "
                                 "adds and residuals; the first step pays the compilation)"})
    fused_gelu: bool = field(
        default=True, metadata={"help": "PyTorch's fused tanh-GELU (--no-fused-gelu: GPT-2's op-by-op gelu_new, "
                                "the same function)"})
    loss_chunk_tokens: int = field(
        default=LOSS_CHUNK_TOKENS, metadata={"range": NON_NEGATIVE,
                                             "help": "compute the output layer and loss this many tokens at a time, "
                                             "so the full logits never exist (0: all at once)"})
    gpu_mem_cap: float | None = field(
        default=None, metadata={"range": POSITIVE,
                                "help": "cap this process's GPU allocator at this many GiB (emulate a smaller card)"})
    peak_tflops: float | None = field(
        default=None, metadata={"range": POSITIVE,
                                "help": "the GPU's dense peak in the run's precision, for MFU (default: from the "
                                "built-in table)"})
    seed: int = field(default=1337, metadata={"range": NON_NEGATIVE, "help": "seeds the weights and the data order"})
    dropout: float = field(default=0.0, metadata={"range": PROBABILITY,
                                                  "help": "dropout probability (GPT-2 pre-training: 0)"})
    stop_after: int | None = field(
        default=None, metadata={"range": AT_LEAST_ONE,
                                "help": "stop with a checkpoint after this step, e.g. to fit a job's time limit "
                                "(the schedule still runs to --max-steps; run again to continue)"})
    checkpoint_every: int = field(
        default=100, metadata={"range": NON_NEGATIVE,
                               "help": "save a checkpoint every N steps and at the end (0: never, for benchmarks)"})
    keep_checkpoints: int = field(default=2, metadata={"range": AT_LEAST_ONE,
                                                       "help": "how many of the newest checkpoints to keep"})
    eval_every: int = field(
        default=100, metadata={"range": NON_NEGATIVE,
                               "help": "validation loss every N steps and at the end, into TensorBoard (0: never)"})
    eval_tokens: int = field(default=1 << 17, metadata={"range": AT_LEAST_ONE,
                                                        "help": "validation tokens scored each time"})
    log_every: int = field(default=10, metadata={"range": AT_LEAST_ONE, "help": "console line every N steps"})
    nvme_path: str | None = field(default=None, metadata={"help": "NVMe swap root (relative: under --data-dir)"})
    verify_data: bool = field(default=True, metadata={"help": "check shard checksums before training"})
    on_nonfinite: Literal["stop", "skip"] = field(
        default="stop", metadata={"help": "a NaN/inf loss: stop (exit non-zero, the last checkpoint is the last good "
                                  "state) or skip (that micro-batch contributes no gradient)"})
    preflight: bool = field(
        default=True, metadata={"help": "estimate the host RAM, page-locked and GPU memory the run needs before "
                                "building anything, and refuse a run this machine cannot hold (--no-preflight: "
                                "go on regardless)"})
    local_rank: int = field(default=-1, metadata={"range": Range(-1), "help": "set by the deepspeed launcher"})


def run_name(config: TrainConfig) -> str:
    return config.run or DataDir(config.data_dir).default_run(config.corpus, model_name(config), config.deepspeed,
                                                              fresh=config.force)


def model_name(config: TrainConfig) -> str:
    """The model part of a run's default name: the preset, the --model config's name (its folder's, for a
    config.json) or `from-<weights>` (as the Makefile spells it)."""
    if config.init_from:
        return f"from-{Path(config.init_from.rstrip('/')).name}"
    if config.model:
        path = Path(config.model.rstrip("/"))
        return path.parent.name if path.name == "config.json" else path.name.removesuffix(".json")
    return config.preset or "tiny"


@dataclass(frozen=True)
class Start:
    """Released weights a run starts from (--init-from)."""

    folder: Path
    config: dict[str, Any]
    source: dict[str, Any]


def resolve_start(config: TrainConfig) -> tuple[TrainConfig, Start | None]:
    """The config with its model settled (a preset, --model or --init-from; a preset too when the weights have a
    preset's shape), and the --init-from weights (located and checked, not yet loaded)."""
    if config.model and (config.preset or config.init_from):
        raise PipelineError(f"--model {config.model} with --{'preset' if config.preset else 'init-from'}: give one "
                            "of --preset, --model (a config.json, trained from scratch) and --init-from (weights).")
    if not config.init_from:
        return replace(config, preset=config.preset or (None if config.model else "tiny")), None
    folder = pretrained.locate(config.init_from)
    weights_config = pretrained.read_config(folder, config.init_from)
    preset = pretrained.preset_of(weights_config)
    if config.preset not in (None, preset):
        raise PipelineError(f"--preset {config.preset}, but --init-from {config.init_from} is "
                            f"{'of the ' + preset + ' shape' if preset else 'of no preset shape'}. Leave --preset "
                            f"out (the weights' config.json decides the model), or give weights of the "
                            f"{config.preset} shape.")
    return replace(config, preset=preset), Start(folder, weights_config, pretrained.source(config.init_from, folder))


def run_model_config(config: TrainConfig, start: Start | None, vocab_size: int, eot_id: int) -> tuple[Any, dict]:
    """The transformers config of the run's model, and what the run's identity keeps of it: a preset with the
    shards' vocabulary, the --model config.json, or the weights' own config.json."""
    gelu = FUSED_GELU if config.fused_gelu else GPT2_GELU
    if config.preset and start is None:
        return model_config(config.preset, vocab_size, eot_id, config.dropout, gelu), {}
    if start is not None:
        values, source = start.config, str(start.folder / "config.json")
    else:
        values, source = families.read_values(config.model)
    model = families.for_training(families.config_from(values, source), config.dropout, gelu)
    if model.vocab_size < vocab_size:
        raise PipelineError(
            f"{source} has a vocabulary of {model.vocab_size} tokens and the shards' tokenizer {vocab_size}: the "
            "model cannot take their ids. Tokenize with the model's own tokenizer (python -m pipeline.tokenize "
            "--tokenizer FOLDER_OR_HUB_ID --force, then shard again), or give a config with a vocab_size of at "
            f"least {vocab_size}.")
    return model, ({} if start is not None else {"model": values})


def lr_schedule(config: TrainConfig, saved_run: dict[str, Any] | None = None) -> schedules.Schedule:
    """The run's schedule. A resumed run keeps the kind and the warmup it started with unless --schedule or
    --warmup-steps is given (the warmup's default, 5% of --max-steps, would otherwise move when the run is
    extended; the kind's default, when a run from before it changed resumed)."""
    saved = saved_run.get("schedule") if saved_run else None
    kind = config.schedule or (saved["kind"] if saved else schedules.DEFAULT)
    warmup = config.warmup_steps
    if warmup is None and saved:
        warmup = saved["warmup_steps"]
    return schedules.make(kind, config.max_steps, warmup, config.min_lr_ratio, config.decay)


def _check_schedule_continues(saved_run: dict[str, Any] | None, schedule: schedules.Schedule, step: int,
                              allow: bool) -> None:
    """Refuse a resume whose learning rate would jump: the next update's rate under the schedule the run was
    trained on and under this one must agree."""
    if not saved_run or "schedule" not in saved_run or step == 0:
        return
    before = schedules.from_json(saved_run["schedule"])
    was, will = before.ratio(step), schedule.ratio(step)
    if math.isclose(was, will, rel_tol=1e-9) or allow:
        return
    raise PipelineError(
        f"resuming at step {step + 1} would move the learning rate at once from {was:.3g}x to {will:.3g}x of the "
        f"peak: the run was trained on a {before.kind} schedule to step {before.max_steps}, and this one is "
        f"{schedule.kind} to step {schedule.max_steps}. "
        + ("A cosine's every step depends on the run's length: to train longer, start a run with --schedule wsd, "
           "which extends. " if before.kind == "cosine" else "A wsd run extends only from its stable phase; a "
           "decayed one continues from a stable checkpoint with --cooldown-from. ")
        + "Pass --allow-schedule-change to accept the jump.")


def branch_for_cooldown(config: TrainConfig, data: DataDir, ckpt_dir: Path, rank: int) -> TrainConfig:
    """--cooldown-from: the new run starts from a checkpoint of another run's stable phase, hard-linked (a copy
    across file systems) into its own folder with that run's records, and decays from there: its --max-steps
    becomes the checkpoint's step plus the decay."""
    from deepspeed import comm as dist

    if config.schedule not in (None, "wsd"):
        raise PipelineError("--cooldown-from decays a warmup-stable-decay run: leave out --schedule, or give wsd.")
    source = Path(config.cooldown_from).expanduser()
    if not source.is_dir():
        source = data.root / "checkpoints" / config.cooldown_from
    if not (source / "manifest.json").is_file() or not source.name.startswith(checkpoint.TAG_PREFIX):
        runs = sorted({p.parent.name for p in (data.root / "checkpoints").glob(f"*/{checkpoint.TAG_PREFIX}*")})
        raise PipelineError(
            f"--cooldown-from {config.cooldown_from}: no checkpoint there. Give a step folder "
            f"(checkpoints/RUN/{checkpoint.TAG_PREFIX}N) of a run that has one"
            + (f": {', '.join(runs)}." if runs else "; there are none yet."))
    step = int(source.name.removeprefix(checkpoint.TAG_PREFIX))
    if rank == 0 and not (ckpt_dir / "latest").exists():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for name in (MANIFEST, checkpoint.RUN_FILE, "ds_config.json", checkpoint.MODEL_CONFIG):
            shutil.copy2(source.parent / name, ckpt_dir / name)
        shutil.copytree(source, ckpt_dir / source.name, copy_function=_link_or_copy, dirs_exist_ok=True)
        write_text_atomic(ckpt_dir / "latest", source.name)
    dist.barrier()
    max_steps = step + schedules.cooldown_length(config.decay, step)
    log.info("run %s: a cooldown of %s from its step %d, decaying to step %d", ckpt_dir.name, source.parent.name,
             step, max_steps)
    return replace(config, schedule="wsd", max_steps=max_steps)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def deepspeed_config(config: TrainConfig, world_size: int, data_root: Path, name: str,
                     shape: families.Shape) -> tuple[dict[str, Any], precisions.Choice]:
    """The run's DeepSpeed config, its precision and NVMe buffers settled: the JSON with the command-line
    overrides merged in, checked for what this trainer needs before anything is allocated."""
    ds = merge_ds_config(
        load_ds_config(config.deepspeed), config.deepspeed, world_size=world_size, data_dir=data_root, run=name,
        nvme_path=config.nvme_path, micro_batch_size=config.micro_batch_size, grad_accum=config.grad_accum,
        lr=config.lr,
    )
    ds, choice = precisions.resolve(ds, config.deepspeed, config.precision,
                                    lambda: precisions.common(every_rank(precisions.detect())))
    ds = nvme.settle(ds, shape, world_size)
    if problems := nvme.param_buffer_problems(ds, shape, world_size, config.deepspeed):
        raise PipelineError(" ".join(problems))
    if "scheduler" in ds:
        raise PipelineError(
            f"{config.deepspeed} has a \"scheduler\" section; onecard sets the schedule itself (--schedule, "
            "--warmup-steps, --min-lr-ratio, --decay). Remove the section."
        )
    if ds.get("zero_optimization", {}).get("stage", 0) == 0:
        raise PipelineError(f"{config.deepspeed} does not enable ZeRO; use stage 1, 2 or 3 (see ds_configs/).")
    check_nvme(ds)
    return ds, choice


def run_identity(config: TrainConfig, ds: dict[str, Any], index: dict[str, Any], shards_dir: Path, seq_len: int,
                 world_size: int, start: Start | None, model: dict[str, Any],
                 schedule: schedules.Schedule) -> dict[str, Any]:
    """What a resumed run must keep, and its layout (LAYOUT), which may change as long as the global batch stays
    the same. Of the schedule, its kind, warmup and floor: its length may change (a wsd run extends) as long as
    the rate does not jump (`_check_schedule_continues`). A run from released weights keeps where they came from
    (`init`), one from a --model config.json the config's values (`model`)."""
    identity = {"corpus": config.corpus, "shards": input_entry(shards_dir)["manifest_sha256"],
                "vocab_size": index["vocab_size"], "preset": config.preset, "seq_len": seq_len,
                "seed": config.seed, "dropout": config.dropout, "train_batch_size": ds["train_batch_size"],
                "world_size": world_size, "micro_batch_size": ds["train_micro_batch_size_per_gpu"],
                "grad_accum": ds["gradient_accumulation_steps"],
                "zero_stage": ds["zero_optimization"]["stage"], "offload": offload_devices(ds),
                "precision": precisions.precision_of(ds), "optimizer": ds["optimizer"],
                "gradient_clipping": ds.get("gradient_clipping"), **model,
                "schedule": {"kind": schedule.kind, "warmup_steps": schedule.warmup_steps,
                             "min_lr_ratio": schedule.min_ratio}}
    if start is not None:
        identity["init"] = start.source
    return json.loads(json.dumps(identity))  # as it reads back from run.json (tuples become lists)


# Ranks, micro-batch and accumulation may change between a run's sessions: batches are addressed by their
# place in the global batch, so the same global batch continues with the same sequences.
LAYOUT = ("world_size", "micro_batch_size", "grad_accum")


def _check_resume(ckpt_dir: Path, run_file: dict[str, Any] | None, identity: dict[str, Any],
                  choice: precisions.Choice, allow_precision_change: bool) -> bool:
    """Refuse to resume a run with settings that would make it another run; whether it switches precision."""
    if run_file is None:
        return False
    saved = {"schedule": identity["schedule"], **run_file["identity"]}  # a run from before schedules were kept
    switches = saved.get("precision") != identity["precision"]
    if switches and not allow_precision_change:
        was = run_file.get("precision", {}).get("reason")
        raise PipelineError(
            f"{ckpt_dir} was trained in {saved.get('precision')}{f' ({was})' if was else ''}, and this run would "
            f"train in {choice}. A run keeps its precision: resume it with --precision {saved.get('precision')}, "
            "or switch on purpose with --allow-precision-change (the fp32 master weights and Adam moments carry "
            "over; an fp16 loss scale starts anew).")
    changed = sorted(key for key in set(saved) | set(identity)
                     if key not in (*LAYOUT, "precision") and saved.get(key) != identity.get(key))
    if changed:
        raise PipelineError(
            f"{ckpt_dir} holds a run made with different settings ({', '.join(changed)}), so it cannot be "
            "resumed with these. Start a separate run with --run NAME, or start this one over with --force."
            + (" (The number of ranks, the micro-batch and the accumulation may change, as long as their product, "
               "the global batch, does not.)" if "train_batch_size" in changed else "")
        )
    if switches:
        log.warning("resuming %s in %s, after training in %s (--allow-precision-change)", ckpt_dir.name,
                    identity["precision"], saved.get("precision"))
    return switches


def _resharding(ckpt_dir: Path, ds: dict[str, Any], world_size: int) -> bool:
    """Whether the latest checkpoint was written by another number of ranks, and so must be loaded through
    DeepSpeed's universal checkpoint (converted here, on rank 0, before the engine exists)."""
    from deepspeed import comm as dist

    tag = checkpoint.latest_tag(ckpt_dir)
    saved_ranks = checkpoint.checkpoint_manifest(ckpt_dir, tag)[1]["params"]["world_size"] if tag else world_size
    if saved_ranks == world_size:
        return False
    if "nvme" in offload_devices(ds):
        raise PipelineError(
            f"{ckpt_dir / tag} was written by {saved_ranks} rank(s) and this run has {world_size}, but DeepSpeed's "
            "universal checkpoint (which re-partitions a checkpoint for another number of ranks) does not cover "
            f"NVMe offload. Resume with {saved_ranks} rank(s), or start over with --force."
        )
    log.info("the latest checkpoint was written by %d rank(s), this run has %d: converting it to DeepSpeed's "
             "universal checkpoint", saved_ranks, world_size)
    if dist.get_rank() == 0:
        checkpoint.convert_to_universal(ckpt_dir, tag)
    dist.barrier()
    return True


@torch.no_grad()
def validation_loss(engine: Any, val: TokenSequences, micro_batch_size: int, max_tokens: int, rank: int,
                    world_size: int) -> float | None:
    """Mean loss over the first max_tokens of the val split, each rank scoring every world_size-th sequence.
    All ranks run the same number of forwards: under ZeRO-3 each one gathers the weights from all of them."""
    from deepspeed import comm as dist

    per_rank = min(len(val), max(1, max_tokens // val.seq_len)) // world_size
    if per_rank == 0:
        return None
    engine.eval()
    total = torch.zeros((), device=engine.device)
    for begin in range(0, per_rank, micro_batch_size):
        indices = np.arange(begin, min(begin + micro_batch_size, per_rank)) * world_size + rank
        rows = torch.from_numpy(val.get(indices)).to(engine.device)
        total += engine(rows[:, :-1], rows[:, 1:]).float() * len(indices)
    engine.train()
    dist.all_reduce(total)
    return total.item() / (per_rank * world_size)


@dataclass
class Session:
    """What a training session settles before the model exists: who it is, what it trains on, how far."""

    config: TrainConfig
    name: str
    rank: int
    world_size: int
    data: DataDir
    index: dict[str, Any]
    ds: dict[str, Any]
    identity: dict[str, Any]
    seq_len: int
    end_step: int
    estimate: preflight.Needs | None
    start: Start | None
    precision: precisions.Choice
    switches_precision: bool  # resumed in another precision than it was trained in (--allow-precision-change)
    model_config: Any  # the transformers config of the model
    shape: families.Shape
    host_estimate: dict[str, float]  # one rank's host RAM by kind, as the memory model has it (pipeline/memory.py)
    schedule: schedules.Schedule

    @property
    def ckpt_dir(self) -> Path:
        return self.data.checkpoints(self.name)

    @property
    def shards_dir(self) -> Path:
        return self.data.shards(self.config.corpus)

    @property
    def micro_batch_size(self) -> int:
        return self.ds["train_micro_batch_size_per_gpu"]

    @property
    def grad_accum(self) -> int:
        return self.ds["gradient_accumulation_steps"]

    @property
    def tokens_per_step(self) -> int:
        return self.ds["train_batch_size"] * self.seq_len


@dataclass
class Trainee:
    """The model as the loop drives it: the DeepSpeed engine, the causal LM inside it, where training resumes."""

    engine: Any
    model: torch.nn.Module
    start_step: int
    n_params: int
    flops_per_token: float
    peak_tflops: float | None  # the device's dense peak in the run's precision, for MFU
    host_memory: dict[str, int] = field(default_factory=dict)  # the ledger (pipeline/ledger.py), the save's and the
    # resume load's peaks
    swap_meter: nvme.SwapMeter | None = None  # the NVMe swap traffic of each step, with NVMe offload


def run(config: TrainConfig) -> Path:
    clock = StartupClock(launch_time(), time.time())
    init_distributed()
    config, start = resolve_start(config)
    session = start_session(config, start)
    if session is None:
        return DataDir(config.data_dir).checkpoints(run_name(config))
    clock.lap("setup")
    try:
        trainee = build_trainee(session, clock)
        done = train(session, trainee, clock)
        log.info("trained %s to step %d of %d in %.0fs; checkpoints in %s", session.name, done,
                 session.config.max_steps, time.time() - clock.started, session.ckpt_dir)
    finally:
        # DeepSpeed's NVMe swap is scratch (a resume starts it anew from the checkpoint's copy): tens of GB that a
        # finished or failed run must not leave behind
        nvme.remove_swap(session.ds)
        close_log_file()
    return session.ckpt_dir


def end_step(config: TrainConfig) -> int:
    """The step this session trains to: --max-steps, or --stop-after if that comes first."""
    return min(config.max_steps, config.stop_after or config.max_steps)


def start_session(config: TrainConfig, start: Start | None) -> Session | None:
    """Settle and check everything that needs no model: the run, its data, its DeepSpeed config, whether it
    may resume; write the run's files. None when the run is already trained to its end."""
    from deepspeed import comm as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    checkpoint.check_deepspeed()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    data, name = DataDir(config.data_dir), run_name(config)
    ckpt_dir, shards_dir = data.checkpoints(name), data.shards(config.corpus)
    index = load_index(shards_dir, checksums=config.verify_data)
    model, model_identity = run_model_config(config, start, index["vocab_size"], index["eot_id"])
    shape = families.shape_of(model)
    seq_len = config.seq_len or default_seq_len(model)
    if seq_len > shape.context:
        raise PipelineError(f"--seq-len {seq_len} is longer than the context of {describe_model(config)}, "
                            f"{shape.context}.")
    if start is not None:
        pretrained.check_tokenizer(start.folder, config.init_from, start.config,
                                   data.tokenizer(index["tokenizer"]["name"]), index["vocab_size"])
    ds, choice = deepspeed_config(config, world_size, data.root, name, shape)
    if config.gpu_mem_cap is not None:  # checked before anything is written
        cap_gpu_memory(config.gpu_mem_cap)
    finished = not (config.force or config.cooldown_from) and checkpoint.latest_step(ckpt_dir) >= end_step(config)
    # a finished run only checks its settings: it needs no memory or disk (a second `make run` on a busy machine)
    estimate = check_fits(config, ds, shape, seq_len) if config.preflight and not finished else None
    if not finished:
        _check_disk(start_disk_needs(config, ds, ckpt_dir, shape.parameters))
    if rank == 0 and config.force:
        for folder in (ckpt_dir, data.runs(name), *nvme.swap_folders(ds)):
            shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    if config.cooldown_from:
        config = branch_for_cooldown(config, data, ckpt_dir, rank)
    saved_run = json.loads(run_file.read_text()) if (run_file := ckpt_dir / checkpoint.RUN_FILE).is_file() else None
    schedule = lr_schedule(config, saved_run)
    identity = run_identity(config, ds, index, shards_dir, seq_len, world_size, start, model_identity, schedule)
    switches_precision = _check_resume(ckpt_dir, saved_run, identity, choice, config.allow_precision_change)
    trained = checkpoint.latest_step(ckpt_dir)  # after --force and --cooldown-from, which change it
    _check_schedule_continues(saved_run, schedule, trained, config.allow_schedule_change)
    end = end_step(config)
    if trained >= end:
        log.info("run %s is already trained to step %d: nothing to do", name, trained)
        return None
    if rank == 0:  # from here on the run writes: its log file too (a refused run changes nothing)
        log_to_file(data.runs(name) / "train.log")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(ckpt_dir / checkpoint.RUN_FILE, {"identity": identity, "config": asdict(config),
                                                           "schedule": schedule.to_json(), "precision": asdict(choice),
                                                           "tokenizer": index["tokenizer"]})
        write_json_atomic(ckpt_dir / "ds_config.json", ds)
        write_json_atomic(ckpt_dir / checkpoint.MODEL_CONFIG, model.to_diff_dict())  # what evaluate builds
    dist.barrier()
    log.info("run %s: %s", name, describe(ds))
    log.info("precision %s", choice)
    # The whole merged config is saved beside the checkpoints and in TensorBoard; the console gets the summary.
    log.debug("merged config:\n%s", merged_config(config, ds, choice))
    return Session(config, name, rank, world_size, data, index, ds, identity, seq_len, end, estimate, start,
                   choice, switches_precision, model, shape,
                   memory.host_bytes(ds, shape, world_size, torch.cuda.is_available()), schedule)


def start_disk_needs(config: TrainConfig, ds: dict[str, Any], ckpt_dir: Path, params: int) -> list[DiskNeed]:
    """What the run will write before its first save completes: DeepSpeed's NVMe swap (less what a previous session's
    swap files, which DeepSpeed replaces, already take) and, when it saves at all, the next checkpoint."""
    needs = [need._replace(bytes=max(0.0, need.bytes - bytes_in(need.folder)))
             for need in nvme.swap_needs(ds, params)]
    if config.checkpoint_every or config.stop_after:
        needs.append(checkpoint.next_checkpoint_need(ckpt_dir, params, ds))
    return needs


def describe_model(config: TrainConfig) -> str:
    """The run's model as the command line named it: the preset (of the weights too, when they have a preset's
    shape), else the --model config or the --init-from weights."""
    return config.preset or config.model or str(config.init_from)


def check_fits(config: TrainConfig, ds: dict[str, Any], shape: families.Shape, seq_len: int) -> preflight.Needs:
    """The preflight (pipeline/preflight.py), on every rank, all refusing together: what this run needs."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    needs = preflight.estimate(ds, shape, seq_len, config.activation_checkpointing, local_ranks)
    machine = preflight.read_machine(config.gpu_mem_cap)
    log.info("preflight: about %.1f GiB of host RAM (%.1f available), %.1f GiB page-locked%s", needs.host_bytes / GIB,
             machine.host_available_bytes / GIB, needs.pinned_bytes / GIB,
             "" if needs.gpu_bytes is None else f", {needs.gpu_bytes / GIB:.1f} GiB of GPU memory "
                                                f"({(machine.gpu_bytes or 0) / GIB:.1f} there)")
    problems = preflight.check(needs, machine, config.deepspeed, lambda: preflight.shipped_alternatives(
        ds, shape, seq_len, config.activation_checkpointing, local_ranks))
    if any_rank(bool(problems)):
        raise PipelineError(" ".join(problems) if problems else "another rank's machine cannot hold this run: see "
                            "its log.")
    return needs


def merged_config(config: TrainConfig, ds: dict[str, Any], choice: precisions.Choice) -> str:
    return json.dumps({"train": asdict(config), "precision": asdict(choice), "deepspeed": ds}, indent=2, default=str)


def build_trainee(session: Session, clock: StartupClock) -> Trainee:
    """The model, built on the accelerator, inside its DeepSpeed engine, restored from the latest checkpoint."""
    import deepspeed
    from deepspeed import comm as dist

    config, ds = session.config, session.ds
    torch.manual_seed(config.seed)
    device = build_device(ds, session.shape.parameters, config.gpu_mem_cap)
    if session.start is not None:
        model = pretrained.load(session.start.folder, session.model_config).to(device).train()
        log.info("starting from %s (%s)", config.init_from, session.start.folder)
    else:
        model = build(session.model_config, device=device).train()
    if config.activation_checkpointing:
        enable_activation_checkpointing(model, config.activation_checkpointing, config.selective_checkpointing,
                                        config.activation_offload)
    if config.compile:
        compile_layers(model)
    n_params, flops = parameter_count(model), session.shape.flops_per_token(session.seq_len)
    clock.lap("model")
    clock.lap("op loads", excluded=sum(seconds for seconds, built in load_ops(ds).values() if built))
    schedule = session.schedule.as_lambda()
    resharding = _resharding(session.ckpt_dir, ds, session.world_size)
    if offload_devices(ds)[0] == "nvme" and not torch.cuda.is_available():
        nvme.fix_cpu_parameter_swapping()
    engine, *_ = deepspeed.initialize(
        model=TrainingModel(model, config.loss_chunk_tokens),
        model_parameters=optimizer_groups(model, ds["optimizer"].get("params", {}).get("weight_decay", 0.0)),
        config={**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}} if resharding else ds,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    release_build_memory()
    clock.lap("engine")
    load_base = start_rss_rise()
    client_state = checkpoint.load_latest(engine, session.ckpt_dir, universal=resharding,
                                          new_precision=session.switches_precision)
    load = rss_rise(load_base)  # what the load added at its peak, for the ledger
    loaded = {"load": load} if client_state and load is not None else {}
    if session.precision.precision == "fp16":  # a loss scale at its floor stops the run with onecard's own error
        engine.optimizer.loss_scaler.raise_error_at_min_scale = False
    if resharding:  # loaded on every rank: the conversion (as big as the checkpoint's fp32 states) has done its job
        dist.barrier()
        if session.rank == 0:
            shutil.rmtree(session.ckpt_dir / checkpoint.UNIVERSAL)
    start_step = client_state["step"] if client_state else 0
    if client_state:
        checkpoint.restore_rng_states(client_state["rng"])
        # The checkpoint holds the learning rate of its own schedule; a resumed run with a new --max-steps
        # must continue on the new one (for an unchanged schedule this sets the same value). The schedule is at
        # the step count of the updates made: steps an fp16 overflow skipped do not advance it.
        scheduler = engine.lr_scheduler
        for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * schedule(scheduler.last_epoch)
    clock.lap("checkpoint load")
    shape = session.shape
    log.info("model %s (%s, %d layers, width %d, vocabulary %d): %.2fM parameters, %.2f GFLOP/token, %d tokens per "
             "step, training steps %d..%d of %d on %s", describe_model(config), shape.family, shape.layers,
             shape.width, shape.vocab_size, n_params / 1e6, flops / 1e9, session.tokens_per_step, start_step + 1,
             session.end_step, config.max_steps, device_name())
    swap_folders = nvme.swap_folders(ds)
    return Trainee(engine, model, start_step, n_params, flops,
                   peak_tflops(session.precision.precision, config.peak_tflops),
                   swap_meter=nvme.SwapMeter(swap_folders, engine.optimizer.optimizer) if swap_folders else None,
                   host_memory=loaded)


def build_device(ds: dict[str, Any], parameters: float, gpu_mem_cap: float | None = None) -> str:
    """Where the model is built: under ZeRO-1/2, whose weights live on the GPU anyway, on the GPU when its fp32
    weights fit there with room to spare (GPT-2 XL's 1.56B weights are initialised in a fraction of a second
    there, against a minute of CPU random numbers); otherwise on the CPU, where ZeRO-3 partitions them from.
    (The same seed draws other weights on each.)"""
    from deepspeed.accelerator import get_accelerator

    if not torch.cuda.is_available() or ds["zero_optimization"]["stage"] == 3:
        return "cpu"
    room = torch.cuda.mem_get_info()[0]
    if gpu_mem_cap is not None:
        room = min(room, gpu_mem_cap * GIB)
    return get_accelerator().current_device_name() if 1.2 * 4 * parameters < room else "cpu"


def estimated_gib(estimate: preflight.Needs | None) -> dict[str, float | None]:
    """The preflight's estimate, recorded beside the measured peaks so that every run tests it."""
    if estimate is None:
        return {}
    return {"estimated_host_gib": estimate.host_bytes / GIB,
            "estimated_gpu_gib": None if estimate.gpu_bytes is None else estimate.gpu_bytes / GIB}


def release_build_memory() -> None:
    """The fp32 weights the model was built with are bf16 (or partitioned away) inside the engine: hand their
    cached blocks back, and start the peak readings from the training state."""
    if torch.cuda.is_available():
        log.info("GPU memory while building the engine: peak %.2f GiB allocated",
                 torch.cuda.max_memory_allocated() / GIB)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train(session: Session, trainee: Trainee, clock: StartupClock) -> int:
    """The training loop, from the resumed step to the session's end; the last step trained."""
    config, engine, start_step = session.config, trainee.engine, trainee.start_step
    batches = TrainBatches(TokenSequences(session.shards_dir, session.index, "train", session.seq_len), config.seed,
                           session.micro_batch_size, session.grad_accum, session.world_size)
    val = TokenSequences(session.shards_dir, session.index, "val", session.seq_len)
    metrics, memory, timer = Metrics(session.data.runs(session.name), session.rank == 0, start_step), MemoryProbe(), \
        PhaseTimer(engine.device)
    if start_step == 0:
        metrics.text("config", f"```\n{merged_config(config, session.ds, session.precision)}\n```")
    loader = iter(micro_batch_loader(batches, session.rank, start_step, session.end_step,
                                     pin=torch.cuda.is_available()))
    stop, done = StopSignal(under_deepspeed_launcher()), start_step
    run_inputs = {"shards": input_entry(session.shards_dir)}  # what every manifest of this run records as its input
    try:
        for step in range(start_step, session.end_step):
            stats, stopping = train_step(session, trainee, batches, loader, step, timer, stop)
            done = step + 1
            if done == start_step + 1:
                clock.lap("first step")
                stats.update(startup_seconds=clock.total(), op_build_seconds=clock.excluded,
                             **estimated_gib(session.estimate))
                log.info("start-up %.1fs to the end of step %d (%s; op builds %.1fs excluded)", clock.total(), done,
                         clock.summary(), clock.excluded)
                trainee.host_memory.update(ledger.measure(engine, trainee.model))
                record_host_memory(session, trainee)
            if config.eval_every and (done % config.eval_every == 0 or done == session.end_step):
                stats["eval/val_loss"] = validation_loss(engine, val, session.micro_batch_size, config.eval_tokens,
                                                         session.rank, session.world_size)
            stats.update(memory.sample())
            metrics.log(done, stats)
            if done % config.log_every == 0 or done in (start_step + 1, session.end_step) or "eval/val_loss" in stats:
                log.info("%s", step_line(done, config.max_steps, stats))
            if stopping or (config.checkpoint_every and (done % config.checkpoint_every == 0
                                                         or done == session.end_step)):
                save_checkpoint(session, trainee, done, run_inputs, clock.started)
            if stopping:
                log.warning("stopped after step %d on %s, with a checkpoint: run the same command to continue", done,
                            stop.received or "another rank's signal")
                break
    finally:  # also on an error: the signal handlers and the event files
        stop.close()
        metrics.close()
    return done


def train_step(session: Session, trainee: Trainee, batches: TrainBatches, loader: Iterator, step: int,
               timer: PhaseTimer, stop: StopSignal) -> tuple[dict[str, Any], bool]:
    """One optimizer step over `grad_accum` micro-batches: its metrics, and whether any rank was asked to stop.
    The host waits for the device once
    per step, at the end (the loss, reduced over ranks with the stop flag in the same collective), never per
    micro-step — except with --on-nonfinite skip, which must look at each micro-batch's loss before its backward."""
    config, engine = session.config, trainee.engine
    started, waited, lr = time.perf_counter(), 0.0, engine.get_lr()[0]
    fp16 = session.precision.precision == "fp16"
    scale = engine.optimizer.loss_scaler.cur_scale if fp16 else None
    losses = []
    timer.start()
    for micro_step in range(session.grad_accum):
        asked = time.perf_counter()
        inputs, targets = (t.to(engine.device, non_blocking=True) for t in next(loader))
        waited += time.perf_counter() - asked
        loss = engine(inputs, targets)
        if config.on_nonfinite == "skip" and not _all_finite(loss):
            loss = _skip(engine, batches.sample_indices(step, micro_step, session.rank), step, micro_step,
                         session.rank, inputs, targets)
        timer.mark("forward")
        engine.backward(loss)  # with ZeRO-2 offload this also moves the gradients to the CPU
        timer.mark("backward")
        if trainee.swap_meter is not None and micro_step == session.grad_accum - 1:
            trainee.swap_meter.optimizer_begins()
        engine.step()  # the weights change on the last micro-step only: CPU Adam, then the upload
        timer.mark("optimizer")
        losses.append(loss.detach().float())
    local = torch.stack(losses)
    loss_sum, stop_requested = all_reduce_sum(torch.cat([local.sum().reshape(1),
                                                         local.new_tensor([float(stop.received is not None)])]))
    mean_loss = float(loss_sum) / (session.grad_accum * session.world_size)
    if not math.isfinite(mean_loss):
        _stop_on_nonfinite(local, batches, step, session.rank)
    phases = timer.seconds()
    seconds = time.perf_counter() - started
    grad_norm = engine.get_global_grad_norm()
    tokens_per_second = session.tokens_per_step / seconds
    tflops = trainee.flops_per_token * tokens_per_second / session.world_size / 1e12  # per device, as MFU is
    peak = trainee.peak_tflops
    return {"loss": mean_loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens_per_second": tokens_per_second, "tflops": tflops, "mfu": tflops / peak if peak else None,
            "step_seconds": seconds, **{f"{phase}_seconds": phases.get(phase, 0.0) for phase in PHASES},
            "data_wait_seconds": waited, **(loss_scaling(engine, scale, step) if fp16 else {}),
            **(trainee.swap_meter.step_ends() if trainee.swap_meter is not None else {})}, \
        bool(stop_requested > 0)


def loss_scaling(engine: Any, scale_before: float, step: int) -> dict[str, float]:
    """After an fp16 optimizer step: the loss scale, and the steps skipped so far because their gradients
    overflowed (DeepSpeed then halves the scale and leaves the weights and the schedule as they were). A step that
    overflows with the scale already at its floor stops the run: a smaller scale cannot help any more."""
    scaler = engine.optimizer.loss_scaler
    floor = getattr(scaler, "min_scale", scaler.cur_scale)  # a static scale is its own floor
    if engine.optimizer.overflow and scale_before <= floor:
        raise PipelineError(
            f"fp16 gradients overflowed at step {step + 1} with the loss scale at its floor ({scale_before:g}; "
            f"skipped steps so far: {engine.skipped_steps}): they do not fit in fp16 even unscaled, so the run has "
            "diverged. Stopped without saving: the latest checkpoint is the last good state. Resume it with a lower "
            "--lr, or in bf16 or fp32 (--precision ... --allow-precision-change).")
    return {"loss_scale": scaler.cur_scale, "skipped_steps": engine.skipped_steps}


PHASES = ("forward", "backward", "optimizer")


def step_line(done: int, max_steps: int, stats: dict[str, Any]) -> str:
    """The console line of a step."""
    eta = (max_steps - done) * stats["step_seconds"]
    val = stats.get("eval/val_loss")
    return (f"step {done}/{max_steps} | loss {stats['loss']:.4f}"
            + (f" | val loss {val:.4f} (perplexity {math.exp(val):.2f})" if val is not None else "")
            + f" | lr {stats['lr']:.2e} | grad norm "
            + ("-" if stats["grad_norm"] is None else f"{stats['grad_norm']:.3f}")
            + (f" | loss scale {stats['loss_scale']:g}, skipped steps {stats['skipped_steps']}"
               if "loss_scale" in stats else "")
            + (f" | NVMe {stats['swap_read_gb']:.1f} GB in, {stats['swap_write_gb']:.1f} out"
               + (f" at {stats['swap_gbps']:.2f} GB/s" if stats["swap_gbps"] else "")
               + (f", {100 * stats['swap_overlap']:.0f}% behind Adam" if stats["swap_overlap"] is not None else "")
               if "swap_read_gb" in stats else "")
            + f" | {stats['tokens_per_second']:.0f} tokens/s | {stats['tflops']:.1f} TFLOP/s"
            + (f" ({100 * stats['mfu']:.1f}% MFU)" if stats["mfu"] is not None else "")
            + f" | {stats['step_seconds']:.2f}s/step (fwd {stats['forward_seconds']:.2f}, bwd "
              f"{stats['backward_seconds']:.2f}, opt {stats['optimizer_seconds']:.2f}) | {_memory_summary(stats)}"
            + f" | eta {int(eta // 60)}m{int(eta % 60):02d}s")


def save_checkpoint(session: Session, trainee: Trainee, done: int, run_inputs: dict[str, Any],
                    started: float) -> None:
    """A checkpoint after step `done`, with the data position and RNG states; the run's manifest follows it. What
    the save adds to host memory at its peak is measured (the kernel's peak RSS, reset before it) and recorded."""
    _check_disk([checkpoint.next_checkpoint_need(session.ckpt_dir, trainee.n_params, session.ds)])
    progress = {"step": done, "tokens_seen": done * session.tokens_per_step}
    state = {**progress, "rng": checkpoint.rng_states(), **checkpoint.universal_info()}
    base = start_rss_rise()
    checkpoint.save(trainee.engine, trainee.model, session.ckpt_dir, done, state, session.config.keep_checkpoints,
                    {"identity": session.identity, "inputs": run_inputs, "counts": progress, "started": started})
    rise = rss_rise(base)
    if rise is not None:
        trainee.host_memory["save"] = max(trainee.host_memory.get("save", 0), rise)
        record_host_memory(session, trainee)
    if session.rank == 0:
        checkpoint.write_run_manifest(session.ckpt_dir, session.identity, run_inputs, progress, started)


def record_host_memory(session: Session, trainee: Trainee) -> None:
    """Log the host-memory ledger beside the memory model's estimate, and keep both in run.json."""
    log.info("host memory by kind, GiB: %s", ledger.table(trainee.host_memory, session.host_estimate))
    if session.rank == 0:
        checkpoint.update_run_file(session.ckpt_dir, host_memory={"measured": trainee.host_memory,
                                                                  "estimated": session.host_estimate})


def _check_disk(needs: list[DiskNeed]) -> None:
    """Every rank checks its own disks, the needs that share a filesystem summed; all raise together."""
    problem = None
    try:
        require_disk(needs, "then run the same command again")
    except PipelineError as error:
        problem = str(error)
    if any_rank(problem is not None):
        raise PipelineError(problem or "another rank's disk is too full to go on: see its log.")


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether every rank's loss is finite."""
    return not any_rank(not bool(torch.isfinite(loss.detach()).all()))


def _where(step: int, micro_step: int, rank: int, sequences: np.ndarray) -> str:
    return f"step {step + 1}, micro-step {micro_step}, rank {rank}: train sequences {sequences.tolist()}"


def _stop_on_nonfinite(local_losses: torch.Tensor, batches: TrainBatches, step: int, rank: int) -> None:
    """The step's loss is NaN/inf on some rank: stop without saving (the optimizer step has run, but the
    weights it made are never written), naming this rank's first bad micro-batch."""
    bad = torch.nonzero(~torch.isfinite(local_losses.cpu())).flatten().tolist()
    where = (_where(step, bad[0], rank, batches.sample_indices(step, bad[0], rank)) if bad
             else f"step {step + 1} on another rank")
    raise PipelineError(
        f"non-finite loss at {where}. Stopped without saving: the latest checkpoint is the last good state. "
        "Lower --lr, raise the warmup, or run again with --on-nonfinite skip to train past this batch."
    )


def _skip(engine: Any, sequences: np.ndarray, step: int, micro_step: int, rank: int, inputs: torch.Tensor,
          targets: torch.Tensor) -> torch.Tensor:
    """A NaN/inf loss at (step, micro step) under --on-nonfinite skip: a zero-gradient loss of one token instead."""
    where = _where(step, micro_step, rank, sequences)
    log.warning("non-finite loss at %s: skipped (the micro-batch contributes no gradient)", where)
    # A fresh forward on one token: a graph through the same parameters (so ZeRO's hooks run as always),
    # scaled to zero gradient.
    zero = engine(inputs[:1, :1], targets[:1, :1]) * 0.0
    if not _all_finite(zero):
        raise PipelineError(f"the model itself gives non-finite outputs at {where}: the weights have diverged. "
                            "Resume from the last checkpoint with a lower --lr.")
    return zero


def _memory_summary(readings: dict[str, Any]) -> str:
    parts = [f"host RSS {readings['host_rss_gib']:.1f} GiB"]
    if readings["peak_gpu_reserved_gib"] is not None:
        parts.insert(0, f"GPU peak {readings['peak_gpu_reserved_gib']:.1f} GiB reserved")
    if readings["peak_gpu_nvml_gib"] is not None:
        parts.insert(1, f"{readings['peak_gpu_nvml_gib']:.1f} GiB NVML")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    stage_main(TrainConfig, run, argv)


if __name__ == "__main__":
    main()
