"""DeepSpeed configs: the shipped ones are valid DeepSpeed JSON; overrides merge and are validated."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from pipeline.dsconfig import check_nvme, describe, load_ds_config, merge_ds_config, offload_devices
from pipeline.model import preset_model_shape
from pipeline.nvme import settle
from pipeline.precision import PRECISIONS, apply, bf16_states, precision_of
from pipeline.stage import PipelineError

CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))


def merge(ds: dict, **options) -> dict:
    defaults = {"world_size": 1, "data_dir": Path("/data"), "run": "r"}
    return merge_ds_config(ds, "test.json", **{**defaults, **options})


def test_the_three_required_configs_ship() -> None:
    assert {"zero2_offload.json", "zero3_offload.json", "zero3_nvme.json"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid_deepspeed_json_in_every_precision(path: Path) -> None:
    """Every precision the config takes (the hardware chooses; bf16 only for bf16 states), its NVMe buffers
    settled for a model, is a config DeepSpeed accepts."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = load_ds_config(path)
    assert ds["optimizer"]["type"] == "AdamW" and "scheduler" not in ds
    assert ds["gradient_clipping"] == 1.0
    assert precision_of(ds) == ("bf16" if bf16_states(ds) else "auto")
    for chosen in ["bf16"] if bf16_states(ds) else PRECISIONS:
        parsed = DeepSpeedConfig(settle(apply(json.loads(path.read_text()), chosen), preset_model_shape("gpt2")))
        assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"] in (1, 2, 3)
        assert (parsed.bfloat16_config.enabled, parsed.float16_config.enabled) == (chosen == "bf16", chosen == "fp16")
        if chosen == "fp16":  # dynamic loss scaling from 2^16
            assert parsed.float16_config.loss_scale == 0 and parsed.float16_config.initial_dynamic_scale() == 2 ** 16


def test_config_offload_layout() -> None:
    layout = {p.stem: offload_devices(load_ds_config(p)) for p in CONFIGS}
    assert layout["zero1_offload"] == layout["zero2_offload"] == layout["zero2_offload_bf16_states"] == ("none", "cpu")
    assert layout["zero3_offload"] == ("cpu", "cpu")
    assert layout["zero3_nvme_optimizer"] == ("cpu", "nvme")
    assert layout["zero3_nvme"] == ("nvme", "nvme")


def test_overrides_are_merged_and_batch_size_computed() -> None:
    ds = merge(load_ds_config(REPO / "ds_configs" / "zero3_nvme.json"), world_size=2, micro_batch_size=3,
               grad_accum=4, lr=1e-3)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (3, 4, 24)
    assert precision_of(ds) == "auto" and ds["optimizer"]["params"]["lr"] == 1e-3  # settled by pipeline.precision
    assert ds["zero_optimization"]["offload_param"]["nvme_path"] == "/data/nvme/r"
    assert merge(load_ds_config(REPO / "ds_configs" / "zero3_nvme.json"), nvme_path="/mnt/fast")[
        "zero_optimization"]["offload_optimizer"]["nvme_path"] == "/mnt/fast/r"
    assert "batch 3 per rank x 4 accumulation x 2 ranks = 24 sequences" in describe(ds)


def test_inconsistent_batch_sizes_are_refused_with_the_arithmetic() -> None:
    ds = {"optimizer": {"type": "AdamW"}, "train_batch_size": 32, "train_micro_batch_size_per_gpu": 4,
          "gradient_accumulation_steps": 4}
    assert merge(ds, world_size=2)["train_batch_size"] == 32
    with pytest.raises(PipelineError, match=r"train_batch_size is 32, but .* 4 x .* 4 x 1 rank\(s\) = 16"):
        merge(ds, world_size=1)
    with pytest.raises(PipelineError, match="train_micro_batch_size_per_gpu is 0"):
        merge({"optimizer": {}, "train_micro_batch_size_per_gpu": 0})


@pytest.mark.parametrize(("ds", "message"), [
    ({"optimizer": {}, "train_micro_batch_size_per_gpu": "auto"}, r'train_micro_batch_size_per_gpu is "auto"'),
    ({"train_micro_batch_size_per_gpu": 1}, r'has no "optimizer" section'),
    ({"optimizer": {"params": {"lr": "auto"}}, "train_micro_batch_size_per_gpu": 1}, r'optimizer.params.lr is "auto"'),
    ({"optimizer": {}, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 4}}, "must be 0, 1, 2 or 3"),
])
def test_invalid_configs_are_refused(ds: dict, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        merge(ds)


def test_malformed_json_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_micro_batch_size_per_gpu": 4,\n}\n')
    with pytest.raises(PipelineError, match=r"broken\.json is not valid JSON: .* line 3"):
        load_ds_config(path)
    with pytest.raises(PipelineError, match=r"cannot read the DeepSpeed config .*missing\.json"):
        load_ds_config(tmp_path / "missing.json")


def test_unwritable_nvme_path_is_refused_before_training(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    ds = merge(load_ds_config(REPO / "ds_configs" / "zero3_nvme.json"), nvme_path=str(tmp_path / "a-file"))
    with pytest.raises(PipelineError, match=r"the NVMe swap folder .*a-file/r is not writable"):
        check_nvme(ds)
    check_nvme(merge(load_ds_config(REPO / "ds_configs" / "zero3_nvme.json"), nvme_path=str(tmp_path / "ok")))
    assert list(tmp_path.iterdir()) == [tmp_path / "a-file"]  # probed where it would be made: nothing created


def test_the_install_builds_every_op_the_configs_load() -> None:
    """`make install` runs launch/build_ops.py, so that no training run compiles DeepSpeed's ops at its start: CPU
    Adam, async I/O for NVMe offload (libaio is there: the Makefile installs it) and, on a CPU accelerator, its
    communication op. After it, a config's op loads build nothing."""
    from pipeline.dsconfig import build_ops, load_ops

    recipe = (REPO / "Makefile").read_text().split("$(INSTALLED): $(PACKAGES)")[1].split("\n\n")[0]
    assert "$(PY) launch/build_ops.py" in recipe
    from deepspeed.accelerator import get_accelerator

    ops = build_ops()
    on_cpu = get_accelerator().device_name() == "cpu"  # the shared-memory op is a CPU accelerator's only
    assert set(ops) == {"cpu_adam", "async_io", *(["deepspeed_shm_comm"] if on_cpu else [])}
    assert not any(built for _, built in load_ops(load_ds_config(REPO / "ds_configs" / "zero3_nvme.json")).values())
    # started by its path, the venv not activated: the system's ninja (another version, or none) would rebuild
    loaded = subprocess.run([sys.executable, "-c", "from pipeline.dsconfig import build_ops; print(build_ops())"],
                            cwd=REPO, env={**os.environ, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                            timeout=600)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "True" not in loaded.stdout.splitlines()[-1], loaded.stdout


@pytest.mark.slow
def test_deepspeed_asks_py_cpuinfo_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-cpuinfo answers each question from a new Python process (1.5 s); DeepSpeed asks at every op load and every
    CPU Adam. Loading a config's ops and building two CPU Adams ask once."""
    import cpuinfo
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from pipeline.dsconfig import load_ops

    answer, asked = cpuinfo.cpuinfo.get_cpu_info_json, []  # what get_cpu_info calls to start the process
    monkeypatch.setattr(cpuinfo.cpuinfo, "get_cpu_info_json", lambda: asked.append(1) or answer())
    # as a new process has it, whether or not this one has asked before
    monkeypatch.setattr(cpuinfo, "get_cpu_info", getattr(cpuinfo.get_cpu_info, "__wrapped__", cpuinfo.get_cpu_info))
    load_ops(load_ds_config(REPO / "ds_configs" / "zero2_offload.json"))
    for _ in range(2):
        DeepSpeedCPUAdam([torch.nn.Parameter(torch.zeros(4))])
    assert len(asked) == 1
