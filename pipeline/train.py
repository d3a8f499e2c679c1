"""Stage 4, train: GPT-2 under DeepSpeed ZeRO with CPU/NVMe offload, resumable exactly.

    deepspeed launch/train.py --deepspeed ds_configs/zero3_offload.json [--preset gpt2-xl] [--max-steps N] ...

The DeepSpeed JSON decides ZeRO stage, offload, precision, batch sizes and AdamW hyper-parameters; the flags
below may override the batch sizes, precision and learning rate, and the merged config is logged and saved
with the checkpoints. The learning rate follows a linear warmup then a cosine decay to --min-lr-ratio.
Checkpoints go to `checkpoints/<run>/`, TensorBoard events and `metrics.jsonl` to `runs/<run>/`; starting
the same command again resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pipeline import checkpoint
from pipeline.artifacts import input_entry, require_free_space, write_json_atomic
from pipeline.config import DataDir, PipelineError, StageConfig, setup_logging, stage_main
from pipeline.data import Prefetcher, TokenSequences, TrainBatches
from pipeline.dsconfig import check_nvme, describe, load_ds_config, merge_ds_config, offload_devices, precision
from pipeline.hardware import MemoryProbe, cap_gpu_memory, device_name, peak_tflops
from pipeline.metrics import Metrics
from pipeline.model import (
    TrainingModel,
    build_model,
    flops_per_token,
    optimizer_groups,
    parameter_count,
    preset_context,
)
from pipeline.shard import load_index

log = logging.getLogger("onecard")


@dataclass
class TrainConfig(StageConfig):
    deepspeed: str = field(default="ds_configs/zero3_offload.json", metadata={"help": "DeepSpeed JSON config"})
    corpus: str = field(default="builtin", metadata={"help": "corpus to train on (a folder under shards/)"})
    preset: str = field(default="tiny", metadata={"help": "tiny | gpt2 | gpt2-medium | gpt2-large | gpt2-xl"})
    run: str | None = field(default=None, metadata={
        "help": "run name (default: <corpus>-<preset>-<config>-<YYYYMMDD>, the newest such run if one exists)"})
    seq_len: int | None = field(default=None, metadata={"help": "sequence length (default: the preset's context)"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps to train for, in total"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warmup steps (default: 5%% of max)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine decays to this fraction of the peak"})
    micro_batch_size: int | None = field(default=None, metadata={"help": "override the JSON's micro-batch"})
    grad_accum: int | None = field(default=None, metadata={"help": "override gradient_accumulation_steps"})
    precision: Literal["bf16", "fp16", "fp32"] | None = field(default=None, metadata={"help": "override precision"})
    lr: float | None = field(default=None, metadata={"help": "override the optimizer's peak learning rate"})
    activation_checkpointing: int = field(
        default=0, metadata={"help": "recompute activations of every k-th transformer block in the backward "
                             "pass: 0 off, 1 every block, k every k-th (less memory, more compute)"})
    activation_offload: bool = field(
        default=False, metadata={"help": "keep the checkpointed activations in pinned host memory"})
    loss_chunk_tokens: int = field(
        default=2048, metadata={"help": "compute the output layer and loss this many tokens at a time, so the "
                                "full logits never exist (0: all at once)"})
    gpu_mem_cap: float | None = field(
        default=None, metadata={"help": "cap this process's GPU allocator at this many GiB (emulate a smaller card)"})
    peak_tflops: float | None = field(
        default=None, metadata={"help": "the GPU's dense bf16 peak for MFU (default: from the built-in table)"})
    seed: int = field(default=1337, metadata={"help": "seeds the weights and the data order"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability (GPT-2 pre-training: 0)"})
    stop_after: int | None = field(
        default=None, metadata={"help": "stop with a checkpoint after this step, e.g. to fit a job's time limit "
                                "(the schedule still runs to --max-steps; run again to continue)"})
    checkpoint_every: int = field(
        default=100, metadata={"help": "save a checkpoint every N steps and at the end (0: never, for benchmarks)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many of the newest checkpoints to keep"})
    eval_every: int = field(
        default=100, metadata={"help": "validation loss every N steps and at the end, into TensorBoard (0: never)"})
    eval_tokens: int = field(default=1 << 17, metadata={"help": "validation tokens scored each time"})
    log_every: int = field(default=10, metadata={"help": "console line every N steps"})
    nvme_path: str | None = field(default=None, metadata={"help": "NVMe swap root (relative: under --data-dir)"})
    verify_data: bool = field(default=True, metadata={"help": "check shard checksums before training"})
    on_nonfinite: Literal["stop", "skip"] = field(
        default="stop", metadata={"help": "a NaN/inf loss: stop (exit non-zero, the last checkpoint is the last good "
                                  "state) or skip (that micro-batch contributes no gradient)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})


def run_name(config: TrainConfig) -> str:
    return config.run or DataDir(config.data_dir).default_run(config.corpus, config.preset, config.deepspeed,
                                                              fresh=config.force)


def lr_ratio(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warmup to the peak over `warmup_steps`, then cosine decay to `min_ratio` at `max_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(config: TrainConfig) -> partial[float]:
    # A partial, not a lambda: LambdaLR then checkpoints no copy of it, so a resumed run with a longer
    # --max-steps follows the new schedule.
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, config.max_steps // 20)
    return partial(lr_ratio, warmup_steps=warmup, max_steps=config.max_steps, min_ratio=config.min_lr_ratio)


def init_distributed() -> None:
    """Join the process group set up by the deepspeed launcher, or form a group of one without it."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(verbose=False)


def deepspeed_config(config: TrainConfig, world_size: int, data_root: Path, name: str) -> dict[str, Any]:
    """The run's DeepSpeed config: the JSON with the command-line overrides merged in, checked for what
    this trainer needs before anything is allocated."""
    ds = merge_ds_config(
        load_ds_config(config.deepspeed), config.deepspeed, world_size=world_size, max_steps=config.max_steps,
        data_dir=data_root, run=name, nvme_path=config.nvme_path, micro_batch_size=config.micro_batch_size,
        grad_accum=config.grad_accum, precision_override=config.precision, lr=config.lr,
    )
    if "scheduler" in ds:
        raise PipelineError(
            f"{config.deepspeed} has a \"scheduler\" section; onecard sets the schedule itself (warmup + cosine: "
            "--warmup-steps, --min-lr-ratio). Remove the section."
        )
    if ds.get("zero_optimization", {}).get("stage", 0) == 0:
        raise PipelineError(f"{config.deepspeed} does not enable ZeRO; use stage 1, 2 or 3 (see ds_configs/).")
    check_nvme(ds)
    return ds


def run_identity(config: TrainConfig, ds: dict[str, Any], index: dict[str, Any], shards_dir: Path, seq_len: int,
                 world_size: int) -> dict[str, Any]:
    """What a resumed run must keep (max_steps may change: it extends the run), and its layout (LAYOUT), which
    may change as long as the global batch stays the same."""
    identity = {"corpus": config.corpus, "shards": input_entry(shards_dir)["manifest_sha256"],
                "vocab_size": index["vocab_size"], "preset": config.preset, "seq_len": seq_len,
                "seed": config.seed, "dropout": config.dropout, "train_batch_size": ds["train_batch_size"],
                "world_size": world_size, "micro_batch_size": ds["train_micro_batch_size_per_gpu"],
                "grad_accum": ds["gradient_accumulation_steps"],
                "zero_stage": ds["zero_optimization"]["stage"], "offload": offload_devices(ds),
                "precision": precision(ds), "optimizer": ds["optimizer"],
                "gradient_clipping": ds.get("gradient_clipping")}
    return json.loads(json.dumps(identity))  # as it reads back from run.json (tuples become lists)


# Ranks, micro-batch and accumulation may change between a run's sessions: batches are addressed by their
# place in the global batch, so the same global batch continues with the same sequences.
LAYOUT = ("world_size", "micro_batch_size", "grad_accum")


def _check_resume(ckpt_dir: Path, identity: dict[str, Any]) -> None:
    path = ckpt_dir / checkpoint.RUN_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())["identity"]
    changed = sorted(key for key in set(saved) | set(identity)
                     if key not in LAYOUT and saved.get(key) != identity.get(key))
    if changed:
        raise PipelineError(
            f"{ckpt_dir} holds a run made with different settings ({', '.join(changed)}), so it cannot be "
            "resumed with these. Start a separate run with --run NAME, or start this one over with --force."
            + (" (The number of ranks, the micro-batch and the accumulation may change, as long as their product, "
               "the global batch, does not.)" if "train_batch_size" in changed else "")
        )


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


class StopSignal:
    """SIGTERM or SIGINT (preemption, Ctrl-C): the first lets the current step finish, then the run saves a
    checkpoint and exits 0; a second stops the process at once (a checkpoint becomes `latest` only once
    complete, so nothing half-written is ever taken for one). Under the deepspeed launcher the ranks leave
    SIGINT to the launcher, which passes Ctrl-C on to them as SIGTERM."""

    def __init__(self, launched: bool) -> None:
        self.received: str | None = None
        self._signals = [signal.SIGTERM] + ([] if launched else [signal.SIGINT])
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self._signals}
            if launched:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if signal.SIGINT in self._signals:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)", self.received)

    def requested(self) -> bool:
        """Whether any rank was signalled: all stop after the same step."""
        return any_rank(self.received is not None)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def any_rank(condition: bool) -> bool:
    """Whether the condition holds on any rank. A collective: every rank must call it, and all get the same
    answer, so they take the same branch and none is left waiting in the next collective."""
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    flag = torch.tensor(float(condition), device=get_accelerator().current_device_name())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def under_deepspeed_launcher() -> bool:
    import psutil

    parent = psutil.Process().parent()
    return parent is not None and "deepspeed.launcher.launch" in " ".join(parent.cmdline())


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


def run(config: TrainConfig) -> Path:
    import deepspeed
    from deepspeed import comm as dist
    from deepspeed.accelerator import get_accelerator

    started = time.time()
    init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    setup_logging(rank)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    data, name = DataDir(config.data_dir), run_name(config)
    ckpt_dir, log_dir = data.checkpoints(name), data.runs(name)
    shards_dir = data.shards(config.corpus)
    index = load_index(shards_dir, checksums=config.verify_data)
    seq_len = config.seq_len or preset_context(config.preset)
    if seq_len > preset_context(config.preset):
        raise PipelineError(
            f"--seq-len {seq_len} is longer than the {config.preset} context of {preset_context(config.preset)}."
        )
    ds = deepspeed_config(config, world_size, data.root, name)
    if config.gpu_mem_cap is not None:  # checked before anything is written
        cap_gpu_memory(config.gpu_mem_cap)
    identity = run_identity(config, ds, index, shards_dir, seq_len, world_size)
    if rank == 0 and config.force:
        for folder in (ckpt_dir, log_dir, data.nvme(name)):
            shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    _check_resume(ckpt_dir, identity)
    end_step = min(config.max_steps, config.stop_after or config.max_steps)
    tokens_per_step = ds["train_batch_size"] * seq_len
    if checkpoint.latest_step(ckpt_dir) >= end_step:
        log.info("run %s is already trained to step %d: nothing to do", name, checkpoint.latest_step(ckpt_dir))
        return ckpt_dir
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(ckpt_dir / checkpoint.RUN_FILE, {"identity": identity, "config": asdict(config),
                                                           "tokenizer": index["tokenizer"]})
        write_json_atomic(ckpt_dir / "ds_config.json", ds)
    dist.barrier()
    log.info("run %s: %s", name, describe(ds))
    merged = json.dumps({"train": asdict(config), "deepspeed": ds}, indent=2, default=str)
    log.info("merged config:\n%s", merged)

    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    batches = TrainBatches(TokenSequences(shards_dir, index, "train", seq_len), config.seed, micro, accum, world_size)
    val = TokenSequences(shards_dir, index, "val", seq_len)
    torch.manual_seed(config.seed)
    model = build_model(config.preset, index["vocab_size"], index["eot_id"], config.dropout).train()
    if config.activation_checkpointing:
        model.activation_checkpointing_enable(every_n_layers=config.activation_checkpointing,
                                              offload=config.activation_offload)
    n_params, flops = parameter_count(model), flops_per_token(model, seq_len)
    needs = checkpoint.disk_needs(ckpt_dir, n_params, ds, nvme_too=True)
    _check_disk(needs if config.checkpoint_every else needs[1:])  # [0] is the checkpoint
    weight_decay = ds["optimizer"].get("params", {}).get("weight_decay", 0.0)
    schedule = lr_schedule(config)
    resharding = _resharding(ckpt_dir, ds, world_size)
    engine, *_ = deepspeed.initialize(
        model=TrainingModel(model, config.loss_chunk_tokens), model_parameters=optimizer_groups(model, weight_decay),
        config={**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}} if resharding else ds,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
    )
    client_state = checkpoint.load_latest(engine, ckpt_dir, universal=resharding)
    if resharding:  # loaded on every rank: the conversion (as big as the checkpoint's fp32 states) has done its job
        dist.barrier()
        if rank == 0:
            shutil.rmtree(ckpt_dir / checkpoint.UNIVERSAL)
    start_step = client_state["step"] if client_state else 0
    if client_state:
        checkpoint.restore_rng_states(client_state["rng"])
        # The checkpoint holds the learning rate of its own schedule; a resumed run with a new --max-steps
        # must continue on the new one (for an unchanged schedule this sets the same value).
        scheduler = engine.lr_scheduler
        for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * schedule(start_step)

    peak = peak_tflops(config.peak_tflops)
    log.info("model %s: %.2fM parameters, %.2f GFLOP/token, %d tokens per step, training steps %d..%d of %d on %s",
             config.preset, n_params / 1e6, flops / 1e9, tokens_per_step, start_step + 1, end_step, config.max_steps,
             device_name())
    metrics, memory = Metrics(log_dir, rank == 0, start_step), MemoryProbe()
    if start_step == 0:
        metrics.text("config", f"```\n{merged}\n```")
    sync = get_accelerator().synchronize  # so that the time of each phase is the device's, not the launch's
    prefetch = Prefetcher(batches, rank, start_step, end_step, pin=torch.cuda.is_available())
    stop, done = StopSignal(under_deepspeed_launcher()), start_step
    run_inputs = {"shards": input_entry(shards_dir)}  # what every manifest of this run records as its input
    try:
        for step in range(start_step, end_step):
            step_started = time.perf_counter()
            lr = engine.get_lr()[0]
            loss_sum = torch.zeros((), device=engine.device)
            times = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
            waited = prefetch.waited
            for micro_step in range(accum):
                inputs, targets = (t.to(engine.device, non_blocking=True) for t in prefetch.next())
                started_micro = time.perf_counter()
                loss = engine(inputs, targets)
                if not _all_finite(loss):
                    loss = _nonfinite(config, engine, batches, step, micro_step, rank, inputs, targets)
                sync()
                forward_done = time.perf_counter()
                engine.backward(loss)  # with ZeRO-Offload this also moves the gradients to the CPU
                sync()
                backward_done = time.perf_counter()
                engine.step()  # the weights change on the last micro-step only: CPU Adam, then the upload
                sync()
                times["forward"] += forward_done - started_micro
                times["backward"] += backward_done - forward_done
                times["optimizer"] += time.perf_counter() - backward_done
                loss_sum += loss.detach().float()
            dist.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / (accum * world_size)
            step_seconds = time.perf_counter() - step_started
            grad_norm = engine.get_global_grad_norm()
            tokens_per_second = tokens_per_step / step_seconds
            tflops = flops * tokens_per_second / world_size / 1e12  # per device, as MFU is
            done = step + 1
            val_loss = None
            if config.eval_every and (done % config.eval_every == 0 or done == end_step):
                val_loss = validation_loss(engine, val, micro, config.eval_tokens, rank, world_size)
                if val_loss is not None:
                    log.info("step %d: val loss %.4f (perplexity %.2f)", done, val_loss, math.exp(val_loss))
            readings = memory.sample()
            metrics.log(done, {
                "loss": mean_loss, "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm),
                "tokens_per_second": tokens_per_second, "tflops": tflops, "mfu": tflops / peak if peak else None,
                "step_seconds": step_seconds, **{f"{phase}_seconds": value for phase, value in times.items()},
                "data_wait_seconds": prefetch.waited - waited, "eval/val_loss": val_loss,
                **readings,
            })
            if done % config.log_every == 0 or done in (start_step + 1, end_step):
                eta = (config.max_steps - done) * step_seconds
                log.info("step %d/%d | loss %.4f | lr %.2e | grad norm %s | %.0f tokens/s | %.1f TFLOP/s%s | "
                         "%.2fs/step (fwd %.2f, bwd %.2f, opt %.2f) | %s | eta %dm%02ds", done, config.max_steps,
                         mean_loss, lr,
                         "-" if grad_norm is None else f"{float(grad_norm):.3f}", tokens_per_second, tflops,
                         f" ({100 * tflops / peak:.1f}% MFU)" if peak else "", step_seconds, times["forward"],
                         times["backward"], times["optimizer"], _memory_summary(readings), eta // 60, eta % 60)
            stopping = stop.requested()
            if stopping or (config.checkpoint_every and (done % config.checkpoint_every == 0 or done == end_step)):
                _check_disk(checkpoint.disk_needs(ckpt_dir, n_params, ds, nvme_too=False))
                progress = {"step": done, "tokens_seen": done * tokens_per_step}
                state = {**progress, "rng": checkpoint.rng_states(), **checkpoint.universal_info()}
                checkpoint.save(engine, model, ckpt_dir, done, state,
                                config.keep_checkpoints, {"identity": identity, "inputs": run_inputs,
                                                          "counts": progress, "started": started})
                if rank == 0:
                    checkpoint.write_run_manifest(ckpt_dir, identity, run_inputs, progress, started)
            if stopping:
                log.warning("stopped after step %d on %s, with a checkpoint: run the same command to continue", done,
                            stop.received or "another rank's signal")
                break
    finally:  # also on an error: the signal handlers, the reader thread and the event files
        stop.close()
        prefetch.close()
        metrics.close()
    log.info("trained %s to step %d of %d in %.0fs; checkpoints in %s", name, done, config.max_steps,
             time.time() - started, ckpt_dir)
    return ckpt_dir


def _check_disk(needs: list[tuple[Path, float, str]]) -> None:
    """Every rank checks its own disks; all raise together."""
    problem = None
    for folder, needed, what in needs:
        try:
            require_free_space(folder, needed, what, "then run the same command again")
        except PipelineError as error:
            problem = str(error)
            break
    if any_rank(problem is not None):
        raise PipelineError(problem or "another rank's disk is too full to go on: see its log.")


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether every rank's loss is finite."""
    return not any_rank(not bool(torch.isfinite(loss.detach()).all()))


def _nonfinite(config: TrainConfig, engine: Any, batches: TrainBatches, step: int, micro_step: int, rank: int,
               inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A NaN/inf loss at (step, micro step): stop, or replace it by a zero-gradient loss of one token."""
    where = (f"step {step + 1}, micro-step {micro_step}, rank {rank}: train sequences "
             f"{batches.sample_indices(step, micro_step, rank).tolist()}")
    if config.on_nonfinite == "stop":
        raise PipelineError(
            f"non-finite loss at {where}. Stopped without saving: the latest checkpoint is the last good state. "
            "Lower --lr, raise the warmup, or run again with --on-nonfinite skip to train past this batch."
        )
    log.warning("non-finite loss at %s: skipped (the micro-batch contributes no gradient)", where)
    # A fresh forward on one token: a graph through the same parameters (so ZeRO's hooks run as always),
    # scaled to zero gradient.
    zero = engine(inputs[:1, :1], targets[:1, :1]) * 0.0
    if not _all_finite(zero):
        raise PipelineError(f"the model itself gives non-finite outputs at {where}: the weights have diverged. "
                            "Resume from the last checkpoint with a lower --lr.")
    return zero


def _memory_summary(readings: dict[str, float | None]) -> str:
    parts = [f"host RSS {readings['host_rss_gib']:.1f} GiB"]
    if readings["peak_gpu_reserved_gib"] is not None:
        parts.insert(0, f"GPU peak {readings['peak_gpu_reserved_gib']:.1f} GiB reserved")
    if readings["peak_gpu_nvml_gib"] is not None:
        parts.insert(1, f"{readings['peak_gpu_nvml_gib']:.1f} GiB NVML")
    return ", ".join(parts)


def main() -> None:
    stage_main(TrainConfig, run)


if __name__ == "__main__":
    main()
