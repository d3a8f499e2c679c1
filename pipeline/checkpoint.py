"""Checkpoints: DeepSpeed's own save and load, plus the client state that makes a resume exact.

A checkpoint is `checkpoints/<run>/step_NNNNNNNN/` written by `engine.save_checkpoint`; DeepSpeed updates the
`latest` pointer only after every file is written, so a crash mid-save leaves the previous checkpoint in
charge. The client state carries the next step (the data position: batches are addressed by step) and the
RNG states. Beside DeepSpeed's partitioned files each checkpoint holds `model_fp32.safetensors`: the fp32
master weights gathered from every rank's partition (and from NVMe) with DeepSpeed's
`safe_get_full_fp32_param`, which evaluation and export load without pickle and without DeepSpeed. After
each save the run's `manifest.json` is rewritten with every file, size and checksum.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.artifacts import MANIFEST, read_manifest, sha256_json, verify_files, write_manifest
from pipeline.config import PipelineError

log = logging.getLogger("onecard")

FORMAT_VERSION = 1
TAG_PREFIX = "step_"
RUN_FILE = "run.json"
WEIGHTS = "model_fp32.safetensors"


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


def save(engine: Any, model: torch.nn.Module, ckpt_dir: Path, step: int, client_state: dict[str, Any],
         keep: int) -> None:
    """Save on every rank (ZeRO writes one shard per rank), then drop all but the newest `keep` checkpoints.
    `model` is the GPT-2 model inside the engine, whose weights go to the checkpoint's safetensors file."""
    from deepspeed import comm as dist

    tag = tag_for(step)
    folder = Path(ckpt_dir) / tag
    if folder.exists():
        if latest_tag(ckpt_dir) == tag:
            return  # already saved: a periodic checkpoint that is also the final one
        if dist.get_rank() == 0:
            shutil.rmtree(folder)  # half-written by a run that crashed while saving; `latest` never pointed here
        dist.barrier()
    weights = gather_fp32_weights(model)  # a collective: every rank takes part
    if dist.get_rank() == 0:
        folder.mkdir(parents=True)
        save_file(weights, str(folder / WEIGHTS))
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    dist.barrier()
    if dist.get_rank() == 0:
        for old in checkpoint_tags(ckpt_dir)[:-keep]:
            shutil.rmtree(Path(ckpt_dir) / old, ignore_errors=True)
    dist.barrier()


def load_latest(engine: Any, ckpt_dir: Path) -> dict[str, Any] | None:
    """Restore engine, optimizer and scheduler from the latest checkpoint; its client state, or None."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise PipelineError(f"DeepSpeed could not load {Path(ckpt_dir) / tag}. Start over with --force.")
    if engine.zero_nvme_offload_optimizer():
        _restore_nvme_optimizer_state(engine, Path(ckpt_dir), tag)
    log.info("resumed from %s (step %d)", Path(ckpt_dir) / tag, client_state["step"])
    return client_state


def _restore_nvme_optimizer_state(engine: Any, ckpt_dir: Path, tag: str) -> None:
    """Finish DeepSpeed 0.19's resume of ZeRO-3 with the optimizer on NVMe.

    On load DeepSpeed copies its swap files back from the checkpoint but restores only the fp32 weights of
    the swapped sub-groups: in a new process the swapper does not know the Adam moment files yet, so the
    first step starts them from zero with step count 0; and the sub-groups too small to swap (under 1 MiB,
    e.g. every bias and LayerNorm gain of GPT-2 small) keep their initial values altogether. Everything is
    in the checkpoint (the ZeRO file and the swap files); put it back before the first step, after which
    the swapper adopts the restored moments. Checked by
    tests/test_train.py::test_resume_is_exact_with_nvme_offload_in_new_processes.
    """
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT
    from deepspeed.checkpoint.ds_to_universal import dp_index_to_str

    zero = engine.optimizer
    saved = engine._get_all_zero_checkpoints(str(ckpt_dir), tag)[engine.global_rank]
    swap_files = ckpt_dir / tag / "offloaded_tensors" / f"rank{dp_index_to_str(engine.global_rank)}"
    subgroups = range(len(zero.fp32_partitioned_groups_flat))
    # The inner optimizer's state is numbered as its param groups list the flat sub-groups.
    order = sorted(subgroups, key=lambda i: (zero.sub_group_to_group_id[i], i))
    for i in subgroups:
        flat = zero.fp32_partitioned_groups_flat[i]
        state = saved[OPTIMIZER_STATE_DICT]["state"][order.index(i)]
        if zero._swappable_optimizer_subgroup(i):
            numel = int(zero.fp16_partitioned_groups_flat_numel[i])
            zero.optimizer.state[flat] = {
                name: _read_swap_file(swap_files / f"{name}-{flat.ds_id}.tensor.swp", numel)
                if torch.is_tensor(value) else value for name, value in state.items()}
        else:
            flat.data.copy_(saved[FP32_FLAT_GROUPS][i])
            zero.optimizer.state[flat] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
            zero._reassign_or_swap_out_partitioned_parameters(i)


def _read_swap_file(path: Path, numel: int) -> torch.Tensor:
    """One tensor DeepSpeed swapped to NVMe: raw fp32 values, padded to its I/O alignment."""
    if not path.is_file():
        raise PipelineError(f"{path} is missing: this NVMe checkpoint cannot be resumed exactly. Resume it with "
                            "the same world size and config it was written with, or start over with --force.")
    return torch.from_numpy(np.fromfile(path, dtype=np.float32, count=numel))


def write_run_manifest(ckpt_dir: Path, identity: dict[str, Any], inputs: dict[str, Any],
                       counts: dict[str, Any], started: float) -> None:
    """The train stage's manifest: run identity, input shards, progress, and every checkpoint file."""
    ckpt_dir = Path(ckpt_dir)
    previous = read_manifest(ckpt_dir, "train")["files"] if (ckpt_dir / MANIFEST).is_file() else []
    written = {f["path"]: f for f in previous if f["path"].startswith(TAG_PREFIX)}
    write_manifest(ckpt_dir, "train", FORMAT_VERSION, sha256_json(identity), identity, inputs, counts, started,
                   immutable=written)


def gather_fp32_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full fp32 master weights of a model DeepSpeed trains, on rank 0 (an empty dict elsewhere).
    Tied weights appear once."""
    from deepspeed import comm as dist
    from deepspeed.utils import safe_get_full_fp32_param

    weights = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param)
        if dist.get_rank() == 0:
            weights[name] = full.detach().to("cpu", torch.float32, copy=True).contiguous()
    return weights


def load_weights(ckpt_dir: Path, tag: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(tag, fp32 weights) of the latest (or the given) checkpoint, checked against the run's manifest."""
    ckpt_dir = Path(ckpt_dir)
    manifest = read_manifest(ckpt_dir, "train")
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise PipelineError(f"{ckpt_dir} has no checkpoint yet (no `latest` file). Train first: make train.")
    verify_files(ckpt_dir, {**manifest, "files": [f for f in manifest["files"] if f["path"].startswith(tag + "/")]})
    return tag, load_file(str(ckpt_dir / tag / WEIGHTS))
