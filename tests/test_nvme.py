"""NVMe offload with a model whose layers DeepSpeed really swaps: buffers derived from the model (and numbers that
cannot hold what is in flight refused before anything is written), the same math as plain AdamW with activation
checkpointing, an exact resume in new processes, the swap traffic of each step, no swap files left behind, and
the disk needs that share a filesystem checked together."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import REPO, deepspeed_launcher, plain_adamw, reference_device, subprocess_env

from pipeline import nvme, precision
from pipeline.checkpoint import load_weights
from pipeline.data import TokenSequences, TrainBatches
from pipeline.dsconfig import load_ds_config
from pipeline.families import config_from, for_training, shape_of
from pipeline.metrics import read_metrics
from pipeline.model import FUSED_GELU, build, preset_model_shape
from pipeline.shard_format import load_index
from pipeline.stage import PipelineError
from pipeline.train import TrainConfig
from pipeline.train import run as train_run

# Four GPT-2 layers of width 384: their query-key-value and MLP matrices (1.8 and 2.4 MB in fp32) are above the
# 1 MiB DeepSpeed swaps from, so 12 of them go to NVMe and the buffers must hold several at once.
MID = {"model_type": "gpt2", "n_layer": 4, "n_embd": 384, "n_head": 6, "n_positions": 64}
OPTIONS = {"seq_len": 32, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 4, "log_every": 1, "precision": "fp32",
           "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 100, "eval_every": 0, "activation_checkpointing": 1}


def shipped(name: str) -> dict:
    return load_ds_config(REPO / "ds_configs" / f"{name}.json")


def test_the_old_buffers_are_refused_for_xl_and_auto_derives_ones_that_hold_it() -> None:
    """GPT-2 XL under zero3_nvme as it shipped (5 buffers, reuse distance 1e9) died in step 2 with DeepSpeed's
    'Not enough buffers'; the preflight names the settings to change, and "auto" derives settings that pass."""
    xl = preset_model_shape("gpt2-xl")
    old = precision.apply(shipped("zero3_nvme"), "bf16")
    old["zero_optimization"]["offload_param"].update(buffer_count=5, buffer_size=100_000_000)
    old["zero_optimization"]["stage3_max_reuse_distance"] = 1_000_000_000
    (problem,) = nvme.param_buffer_problems(old, xl, 1, "zero3_nvme.json")
    assert "buffer_count is 5" in problem and "stage3_max_reuse_distance to at most" in problem
    settled = nvme.settle(precision.apply(shipped("zero3_nvme"), "bf16"), xl)
    offload = settled["zero_optimization"]["offload_param"]
    assert offload["buffer_size"] == 50257 * 1600  # the largest swapped matrix: the token embedding
    assert 2 <= offload["buffer_count"] <= 12 and settled["zero_optimization"]["stage3_max_reuse_distance"] > 0
    assert nvme.param_buffer_problems(settled, xl, 1, "zero3_nvme.json") == []


@pytest.mark.parametrize("preset", ["tiny", "gpt2", "gpt2-medium", "gpt2-xl", "llama-1.7b"])
def test_derived_buffers_hold_every_model_on_one_and_two_ranks(preset: str) -> None:
    shape = preset_model_shape(preset)
    for ranks in (1, 2):
        settled = nvme.settle(precision.apply(shipped("zero3_nvme"), "fp32"), shape, ranks)
        assert nvme.param_buffer_problems(settled, shape, ranks, "zero3_nvme.json") == []


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory, builtin_data: Path) -> Path:
    index = load_index(builtin_data / "shards" / "builtin")
    path = tmp_path_factory.mktemp("mid") / "config.json"
    path.write_text(json.dumps({**MID, "vocab_size": index["vocab_size"], "bos_token_id": index["eot_id"],
                                "eos_token_id": index["eot_id"]}))
    return path


def train(data_dir: Path, config: str, run: str, model: Path, **options) -> list[dict]:
    train_run(TrainConfig(data_dir=data_dir, deepspeed=str(REPO / "ds_configs" / f"{config}.json"), run=run,
                          model=str(model), **{**OPTIONS, **options}))
    return read_metrics(data_dir / "runs" / run)


def reference(data_dir: Path, config: str, model: Path) -> tuple[list[float], dict]:
    """The same steps in plain PyTorch: torch.optim.AdamW, no DeepSpeed, no offload, no recomputation."""
    shards = data_dir / "shards" / "builtin"
    batches = TrainBatches(TokenSequences(shards, load_index(shards), "train", OPTIONS["seq_len"]), 1337,
                           OPTIONS["micro_batch_size"], OPTIONS["grad_accum"], 1)
    torch.manual_seed(1337)
    lm = build(for_training(config_from(json.loads(model.read_text()), str(model)), 0.0, FUSED_GELU),
               reference_device(config))
    losses = plain_adamw(lm, batches, OPTIONS["max_steps"], OPTIONS["grad_accum"], lr=OPTIONS["lr"],
                         warmup_steps=OPTIONS["warmup_steps"])
    return losses, lm.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero3_nvme", "zero3_nvme_optimizer"])
def test_swapped_layers_with_checkpointing_change_no_math(data_copy: Path, mid_model: Path, config: str) -> None:
    expected, weights = reference(data_copy, config, mid_model)
    metrics = train(data_copy, config, "mid", mid_model)
    assert [m["loss"] for m in metrics] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    _, saved = load_weights(data_copy / "checkpoints" / "mid")
    for name, value in saved.items():
        torch.testing.assert_close(value, weights[name], rtol=1e-4, atol=1e-5, msg=name)
    # each step's swap traffic is measured, and is what the planner counts for it
    ds = json.loads((data_copy / "checkpoints" / "mid" / "ds_config.json").read_text())
    read, written = nvme.step_traffic(ds, shape_of(config_from(json.loads(mid_model.read_text()), "")))
    for step in metrics[1:]:
        assert step["swap_read_gb"] == pytest.approx(read / 1e9, rel=0.1)
        assert step["swap_write_gb"] == pytest.approx(written / 1e9, rel=0.1)
    assert not any(folder.exists() for folder in nvme.swap_folders(ds))  # scratch, removed at the end


@pytest.mark.slow
def test_resume_with_swapped_layers_is_exact_in_a_new_process(data_copy: Path, mid_model: Path) -> None:
    """A restart is a new process; DeepSpeed names its swap files after per-process parameter ids (so both
    sessions are processes of their own, as a user's are), and the Adam moments come back one sub-group at a time
    (checkpoint._restore_nvme_optimizer_state)."""
    import subprocess

    straight = train(data_copy, "zero3_nvme", "straight", mid_model)
    flags = [item for key, value in OPTIONS.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    for session in (["--stop-after", "2"], []):
        result = subprocess.run([*deepspeed_launcher(), "launch/train.py", "--deepspeed", "ds_configs/zero3_nvme.json",
                                 "--model", str(mid_model), "--run", "resumed", *flags, *session], cwd=REPO,
                                env=subprocess_env(data_copy), capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = read_metrics(data_copy / "runs" / "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    (_, a), (_, b) = (load_weights(data_copy / "checkpoints" / run) for run in ("straight", "resumed"))
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_buffers_too_few_for_the_model_are_refused_before_anything_is_written(data_copy: Path, mid_model: Path,
                                                                               tmp_path: Path) -> None:
    ds = shipped("zero3_nvme")
    ds["zero_optimization"]["offload_param"].update(buffer_count=5, buffer_size=1_000_000)
    ds["zero_optimization"]["stage3_max_reuse_distance"] = 1_000_000_000
    config = tmp_path / "few-buffers.json"
    config.write_text(json.dumps(ds))
    with pytest.raises(PipelineError, match=r"few-buffers\.json: offload_param\.buffer_count is 5, but .* keep 12 .*"
                                            r"Set buffer_count to at least 12, or stage3_max_reuse_distance"):
        train_run(TrainConfig(data_dir=data_copy, deepspeed=str(config), run="few", model=str(mid_model),
                              **OPTIONS))
    assert not (data_copy / "checkpoints" / "few").exists() and not (data_copy / "nvme").exists()


@pytest.mark.slow
def test_a_failed_run_leaves_no_swap_files(data_copy: Path, mid_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import train as train_module

    step = train_module.train_step

    def fails_at_step_two(session, trainee, batches, loader, index, *args):
        if index == 1:
            raise RuntimeError("a fault in step 2")
        return step(session, trainee, batches, loader, index, *args)

    monkeypatch.setattr(train_module, "train_step", fails_at_step_two)
    with pytest.raises(RuntimeError, match="a fault in step 2"):
        train(data_copy, "zero3_nvme", "fails", mid_model, nvme_path=str(data_copy / "elsewhere"))
    assert (data_copy / "elsewhere").is_dir() and not (data_copy / "elsewhere" / "fails").exists()


@pytest.mark.slow
def test_swap_and_checkpoint_on_one_filesystem_are_checked_together(data_copy: Path, mid_model: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each need alone fits, their sum does not: refused at start, naming both, before anything is written."""
    params = sum(p.numel() for p in build(for_training(config_from(json.loads(mid_model.read_text()), ""), 0.0,
                                                       FUSED_GELU), "meta").parameters())
    swap, checkpoint = 1.02 * (16 + 4) * params, 1.05 * 16 * params  # the optimizer's and the fp32 parameters'
    usage = shutil.disk_usage(data_copy)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=int(0.9 * (swap + checkpoint))))
    with pytest.raises(PipelineError, match=r"the NVMe optimizer swap needs about .* and the NVMe parameter swap "
                                            r"needs about .* and the next checkpoint needs about .* in all, on one "
                                            r"filesystem\), but that filesystem has"):
        train(data_copy, "zero3_nvme", "summed", mid_model)
    assert not (data_copy / "checkpoints" / "summed").exists() and not (data_copy / "nvme").exists()
