"""Checkpoints: DeepSpeed's own save and load, plus the client state that makes a resume exact.

A checkpoint is `checkpoints/<run>/step_NNNNNNNN/` written by `engine.save_checkpoint`. It becomes the one a
resume loads only when every rank's files are written and flushed to disk: then rank 0 replaces the `latest`
pointer atomically (DeepSpeed's own pointer is a plain overwrite, which a kill can leave empty), so a crash
mid-save leaves the previous checkpoint in charge and the half-written folder is removed on the next save.
Each checkpoint has its own `manifest.json` (every file, size and sha256, the step and tokens seen), written
before it becomes `latest`; the run's `manifest.json` covers the run's own files (run.json, ds_config.json),
so no manifest ever lists a file that a later save or prune changes.
The client state carries the next step (the data position: batches are addressed by step) and the
RNG states. Beside DeepSpeed's partitioned files each checkpoint holds `model_fp32.safetensors`: the fp32
master weights gathered from every rank's partition (and from NVMe) with DeepSpeed's
`safe_get_full_fp32_param`, which evaluation and export load without pickle and without DeepSpeed.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.artifacts import (
    DiskNeed,
    bytes_in,
    fsync_tree,
    read_manifest,
    sha256_json,
    verify_files,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)
from pipeline.distributed import any_rank
from pipeline.stage import PipelineError

log = logging.getLogger("onecard")

FORMAT_VERSION = 1
TAG_PREFIX = "step_"
RUN_FILE = "run.json"
MODEL_CONFIG = "config.json"  # the model's transformers config, as the run built it
WEIGHTS = "model_fp32.safetensors"
UNIVERSAL = "universal"  # the latest checkpoint re-partitioned for another number of ranks


def check_deepspeed() -> None:
    """Resuming exactly relies on DeepSpeed internals (its checkpoint file lists, the NVMe optimizer swapper's
    sub-groups, CPU Adam's update call), which change between releases: refuse a DeepSpeed other than the one
    pyproject.toml pins, before any work. (Nothing to check when onecard runs from a source tree it was not
    installed from.)"""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    try:
        pinned = next(r for r in map(Requirement, requires("onecard") or []) if r.name == "deepspeed")
    except (PackageNotFoundError, StopIteration):
        return
    installed = version("deepspeed")
    if installed not in pinned.specifier:
        raise PipelineError(
            f"DeepSpeed {installed} is installed, but onecard is tested with deepspeed{pinned.specifier} and its "
            "checkpoints rely on that version's internals. Install it: pip install "
            f"'deepspeed{pinned.specifier}' (or `make install`)."
        )


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def latest_tag(ckpt_dir: Path) -> str | None:
    pointer = Path(ckpt_dir) / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not re.fullmatch(rf"{TAG_PREFIX}\d{{8}}", tag):
        raise PipelineError(
            f"{pointer} does not name a checkpoint ({tag[:40]!r}). Write the name of the newest complete step_* "
            "folder into it, or start the run over with --force."
        )
    if not (Path(ckpt_dir) / tag).is_dir():
        raise PipelineError(
            f"{pointer} points at {tag}, which is not in {ckpt_dir}. Restore that folder, point `latest` at an "
            "existing step_* folder, or start the run over with --force."
        )
    return tag


def latest_step(ckpt_dir: Path) -> int:
    """The step of the latest checkpoint; 0 for a run that has none."""
    tag = latest_tag(ckpt_dir)
    return int(tag.removeprefix(TAG_PREFIX)) if tag else 0


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in Path(ckpt_dir).glob(f"{TAG_PREFIX}*") if p.is_dir())


def next_checkpoint_need(ckpt_dir: Path, n_params: int, ds: dict[str, Any]) -> DiskNeed:
    """The next checkpoint: as big as the latest one, or for the first 16 bytes per parameter (the fp32 weights
    for evaluate, the fp32 master copy and two Adam moments, in DeepSpeed's files or its copy of the NVMe swap)
    plus the 16-bit or fp32 model weights DeepSpeed saves under ZeRO-1/2."""
    from pipeline.nvme import element_bytes

    tag = latest_tag(ckpt_dir) if Path(ckpt_dir).is_dir() else None
    if tag:
        checkpoint_bytes = bytes_in(Path(ckpt_dir) / tag)
    else:
        module = element_bytes(ds) if ds["zero_optimization"]["stage"] < 3 else 0
        checkpoint_bytes = n_params * (16 + module)
    return DiskNeed(Path(ckpt_dir), checkpoint_bytes * 1.05, "the next checkpoint")


def save(engine: Any, model: torch.nn.Module, ckpt_dir: Path, step: int, client_state: dict[str, Any],
         keep: int, record: dict[str, Any]) -> None:
    """Save on every rank (ZeRO writes one shard per rank), then drop all but the newest `keep` checkpoints.
    `model` is the GPT-2 model inside the engine, whose weights go to the checkpoint's safetensors file;
    `record` (identity, inputs, counts, started) goes into the checkpoint's manifest."""
    from deepspeed import comm as dist

    tag = tag_for(step)
    folder = Path(ckpt_dir) / tag
    if folder.exists() and latest_tag(ckpt_dir) == tag:
        return  # already saved: a periodic checkpoint that is also the final one
    dist.barrier()  # every rank has looked at the folder before rank 0 makes it (a rank that looked later would wait)
    # A write that fails on one rank is recorded, not raised, until every rank has been through every collective
    # of the save; then all ranks learn of it together and stop with the same error, none left waiting.
    failures: list[Exception] = []
    if dist.get_rank() == 0:
        _recorded(failures, _fresh_folder, folder)  # a crashed save's half-written folder: never `latest`
    # a collective: every rank takes part, rank 0 too when its folder could not be made (its open then fails)
    _recorded(failures, write_fp32_weights, model, folder / WEIGHTS)
    if not any_rank(bool(failures)):
        with _writes_recorded(engine, failures):
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        _recorded(failures, fsync_tree, folder)  # each rank its own files (on a shared filesystem some twice)
    if any_rank(bool(failures)):
        if dist.get_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
        previous = latest_tag(ckpt_dir)
        failure = failures[0] if failures else None
        raise PipelineError(
            f"writing checkpoint {folder} failed ({failure or 'on another rank: its log says why'}). It was removed "
            "and never became `latest`; " + (f"{Path(ckpt_dir) / previous} is intact. " if previous else "")
            + "If the disk is full, free some space (or use --keep-checkpoints 1) and run the same command again."
        ) from failure
    if dist.get_rank() == 0:
        write_manifest(folder, "checkpoint", FORMAT_VERSION, sha256_json(record["identity"]), record["identity"],
                       record["inputs"], record["counts"], record["started"])
        write_text_atomic(Path(ckpt_dir) / "latest", tag)
        for old in checkpoint_tags(ckpt_dir)[:-keep]:
            if old != tag:
                shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    dist.barrier()



def load_latest(engine: Any, ckpt_dir: Path, universal: bool = False,
                new_precision: bool = False) -> dict[str, Any] | None:
    """Restore engine, optimizer and scheduler from the latest checkpoint — from its universal form
    (`convert_to_universal`) when the engine was configured to load one; its client state, or None. With
    `new_precision` (a run resumed in another precision) the engine keeps its own loss scaler: the checkpoint's
    belongs to the precision it was written in."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    load_dir = Path(ckpt_dir) / UNIVERSAL if universal else Path(ckpt_dir)
    groups = engine.optimizer.optimizer.param_groups
    # DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group the first group's hyperparameters,
    # which would put weight decay on biases and LayerNorm gains; they are this run's, as configured.
    configured = [{k: v for k, v in group.items() if k in ("weight_decay", "betas", "eps")} for group in groups]
    scaling = {name: getattr(engine.optimizer, name) for name in ("loss_scaler", "dynamic_loss_scale")
               if hasattr(engine.optimizer, name)}
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise PipelineError(f"DeepSpeed could not load {load_dir / tag}. Start over with --force.")
    if new_precision:
        for name, value in scaling.items():
            setattr(engine.optimizer, name, value)
    for group, hyperparameters in zip(groups, configured, strict=True):
        group.update(hyperparameters)
    if engine.zero_nvme_offload_optimizer():
        _restore_nvme_optimizer_state(engine, Path(ckpt_dir), tag)
    _replay_cpu_adam_bias_correction(engine, client_state["step"])
    log.info("resumed from %s (step %d)", Path(ckpt_dir) / tag, client_state["step"])
    return client_state


def convert_to_universal(ckpt_dir: Path, tag: str) -> None:
    """Write checkpoint `tag` as DeepSpeed's universal checkpoint — every parameter's fp32 weights and Adam
    moments whole, in no rank's partition — into `<ckpt_dir>/universal/<tag>`, from which any number of ranks
    can load it. Written beside and renamed into place, so that a crash leaves no half-converted folder."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    target = Path(ckpt_dir) / UNIVERSAL
    if (target / tag).is_dir():
        return
    partial = target.with_name(f"{UNIVERSAL}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    ds_to_universal.main(argparse.Namespace(
        input_folder=str(Path(ckpt_dir) / tag), output_folder=str(partial / tag), num_extract_workers=1,
        num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    shutil.rmtree(target, ignore_errors=True)  # an older conversion
    partial.rename(target)


def universal_info() -> dict[str, Any]:
    """The client state entry that lets DeepSpeed's universal conversion read a checkpoint (ZeRO-1/2 ask for it)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def _restore_nvme_optimizer_state(engine: Any, ckpt_dir: Path, tag: str) -> None:
    """Finish DeepSpeed 0.19's resume of ZeRO-3 with the optimizer on NVMe.

    On load DeepSpeed copies its swap files back from the checkpoint but restores only the fp32 weights of
    the swapped sub-groups: in a new process the swapper does not know the Adam moment files yet, so the
    first step starts them from zero with step count 0; and the sub-groups too small to swap (under 1 MiB,
    e.g. every bias and LayerNorm gain of GPT-2 small) keep their initial values altogether. Everything is
    in the checkpoint (the ZeRO file and the swap files): the small sub-groups are put back now, and each swapped
    sub-group's moments just after DeepSpeed swaps it in for its first step, which then adopts and swaps them out —
    so one sub-group's moments are in memory at a time, never the model's (12 bytes per parameter: 18.7 GB for
    GPT-2 XL, which killed its resume on a 24 GB machine). Checked by
    tests/test_nvme.py::test_resume_with_swapped_layers_is_exact_in_a_new_process.
    """
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT
    from deepspeed.checkpoint.ds_to_universal import dp_index_to_str

    zero = engine.optimizer
    saved = engine._get_all_zero_checkpoints(str(ckpt_dir), tag)[engine.global_rank]
    swap_files = ckpt_dir / tag / "offloaded_tensors" / f"rank{dp_index_to_str(engine.global_rank)}"
    subgroups = range(len(zero.fp32_partitioned_groups_flat))
    # The inner optimizer's state is numbered as its param groups list the flat sub-groups.
    order = sorted(subgroups, key=lambda i: (zero.sub_group_to_group_id[i], i))
    pending = {}
    for i in subgroups:
        flat = zero.fp32_partitioned_groups_flat[i]
        state = saved[OPTIMIZER_STATE_DICT]["state"][order.index(i)]
        if zero._swappable_optimizer_subgroup(i):
            # the step count now (CPU Adam's bias correction is replayed from it); the moments when swapped in
            zero.optimizer.state[flat] = {name: value for name, value in state.items() if not torch.is_tensor(value)}
            pending[i] = [name for name, value in state.items() if torch.is_tensor(value)]
        else:
            flat.data.copy_(saved[FP32_FLAT_GROUPS][i])
            zero.optimizer.state[flat] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
            zero._reassign_or_swap_out_partitioned_parameters(i)
    if not pending:
        return
    swap_in = zero._optimizer_states_and_gradient_swap_in

    def swap_in_restoring(sub_group_id: int, *args: Any, **kwargs: Any) -> None:
        swap_in(sub_group_id, *args, **kwargs)
        if sub_group_id in pending:
            flat = zero.fp32_partitioned_groups_flat[sub_group_id]
            numel = int(zero.fp16_partitioned_groups_flat_numel[sub_group_id])
            for name in pending.pop(sub_group_id):
                path = swap_files / f"{name}-{flat.ds_id}.tensor.swp"
                zero.optimizer.state[flat][name] = _read_swap_file(path, numel)
        if not pending:
            del zero._optimizer_states_and_gradient_swap_in  # DeepSpeed's own method again

    zero._optimizer_states_and_gradient_swap_in = swap_in_restoring


def _replay_cpu_adam_bias_correction(engine: Any, steps: int) -> None:
    """Make DeepSpeed's CPU Adam continue bit for bit after a resume.

    Its C++ side keeps beta1**t and beta2**t as running products, one multiplication per step; a fresh process
    starts them with std::pow(beta, t) instead, which differs in the last bit, and so do all later updates
    (found by bench/kill_bench.py). Replaying the steps on a one-element dummy rebuilds the same products.
    """
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = getattr(engine.optimizer, "optimizer", None)
    if not isinstance(optimizer, DeepSpeedCPUAdam):
        return
    # the updates Adam really made (fp16 loss scaling skips some), where its state says
    steps = next((int(state["step"]) for state in optimizer.state.values() if "step" in state), steps)
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    dummy = [torch.zeros(1) for _ in range(4)]  # parameter, gradient, two moments
    for step in range(1, steps + 1):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], beta1, beta2, group["eps"],
                                          group["weight_decay"], group["bias_correction"], *dummy)


def _read_swap_file(path: Path, numel: int) -> torch.Tensor:
    """One tensor DeepSpeed swapped to NVMe: raw fp32 values, padded to its I/O alignment."""
    if not path.is_file():
        raise PipelineError(f"{path} is missing: this NVMe checkpoint cannot be resumed exactly. Resume it with "
                            "the same world size and config it was written with, or start over with --force.")
    return torch.from_numpy(np.fromfile(path, dtype=np.float32, count=numel))


def update_run_file(ckpt_dir: Path, **entries: Any) -> None:
    """Add (or replace) top-level entries of the run's run.json."""
    path = Path(ckpt_dir) / RUN_FILE
    write_json_atomic(path, {**json.loads(path.read_text()), **entries})


def write_run_manifest(ckpt_dir: Path, identity: dict[str, Any], inputs: dict[str, Any],
                       counts: dict[str, Any], started: float) -> None:
    """The train stage's manifest: run identity, input shards, progress, and the run's own files (each
    checkpoint has its own manifest)."""
    ckpt_dir = Path(ckpt_dir)
    own = [ckpt_dir / name for name in (RUN_FILE, MODEL_CONFIG, "ds_config.json") if (ckpt_dir / name).is_file()]
    write_manifest(ckpt_dir, "train", FORMAT_VERSION, sha256_json(identity), identity, inputs, counts, started,
                   only=own)


def _fresh_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def _recorded(failures: list[Exception], action: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run `action`, even after an earlier failure (it may be a collective the other ranks are in); a failure of
    its own is appended to `failures`."""
    try:
        action(*args, **kwargs)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        failures.append(error)


@contextmanager
def _writes_recorded(engine: Any, failures: list[Exception]) -> Iterator[None]:
    """DeepSpeed's own file writes on this rank with a failure recorded in `failures` instead of raised, so that
    DeepSpeed goes on through the collectives of its save that the other ranks are waiting in."""
    writer = engine.checkpoint_engine
    writer.save = partial(_recorded, failures, writer.save)
    try:
        yield
    finally:
        del writer.save  # the class's own again


def write_fp32_weights(model: torch.nn.Module, path: Path) -> None:
    """Write the full fp32 master weights of a model DeepSpeed trains as a safetensors file, on rank 0, one tensor
    at a time: the host holds one whole tensor at most, never the model (GPT-2 XL's 6.2 GB, which a 32 GB desktop
    may not have to spare at a save). Every rank takes part (each tensor is gathered from all their partitions);
    tied weights appear once. A failed write is raised on rank 0 after the last gather, so that no rank is left
    waiting in one."""
    from deepspeed import comm as dist

    params = list(model.named_parameters())
    header, offset = {}, 0
    for name, param in params:
        shape = list(getattr(param, "ds_shape", param.shape))
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    failure, file = None, None
    try:
        if dist.get_rank() == 0:
            file = open(path, "wb")  # closed below, after the last gather
            file.write(len(text).to_bytes(8, "little") + text)
    except OSError as error:
        failure = error
    with file if file is not None else nullcontext():
        for name, value in _fp32_values(params):
            if file is not None and failure is None:
                try:
                    file.write(value.detach().to("cpu", torch.float32).contiguous().numpy().data)
                except OSError as error:
                    failure = error
                assert failure is not None or file.tell() == 8 + len(text) + header[name]["data_offsets"][1]
            del value  # before the next one is gathered: one whole tensor at a time
    if failure is not None:
        raise failure


def _fp32_values(params: list[tuple[str, torch.nn.Parameter]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each parameter's full fp32 master weights, in order. On one rank with the optimizer on NVMe, each swapped
    sub-group's weights are read from its swap file once for all its parameters: DeepSpeed's own accessor swaps
    the whole sub-group in and out again for every parameter (for GPT-2 XL, hundreds of GB of reads per save)."""
    from deepspeed import comm as dist
    from deepspeed.utils import safe_get_full_fp32_param

    optimizer = getattr(params[0][1], "_z3_optimizer", None) if params else None
    if optimizer is None or not optimizer.swap_optimizer or dist.get_world_size() > 1:
        for name, param in params:
            yield name, safe_get_full_fp32_param(param)
        return
    group, values = None, None
    for name, param in params:
        index, begin, numel = optimizer.grad_position[optimizer.get_param_id(param)]
        if index != group:
            group, flat = index, optimizer.fp32_partitioned_groups_flat[index]
            values = flat if not optimizer._swappable_optimizer_subgroup(index) else torch.from_numpy(np.fromfile(
                optimizer.optimizer_swapper.swap_params_info[flat.ds_id].tensors[0].swap_path, dtype=np.float32,
                count=int(optimizer.fp16_partitioned_groups_flat_numel[index])))
        yield name, values.narrow(0, begin, numel).view(param.ds_shape)


def checkpoint_manifest(ckpt_dir: Path, tag: str | None = None) -> tuple[str, dict[str, Any]]:
    """(tag, manifest) of the latest (or the given) checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    read_manifest(ckpt_dir, "train")
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise PipelineError(f"{ckpt_dir} has no checkpoint yet (no `latest` file). Train first: make train.")
    return tag, read_manifest(ckpt_dir / tag, "checkpoint")


def load_weights(ckpt_dir: Path, tag: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(tag, fp32 weights) of the latest (or the given) checkpoint, its files checked against its manifest."""
    tag, manifest = checkpoint_manifest(ckpt_dir, tag)
    verify_files(Path(ckpt_dir) / tag, manifest)
    return tag, load_file(str(Path(ckpt_dir) / tag / WEIGHTS))
