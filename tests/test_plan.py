"""`onecard plan` against arithmetic anyone can check, DeepSpeed's own estimator, and the GPU-host measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import nvme
from pipeline import plan as plan_module
from pipeline.dsconfig import CONFIGS, load_ds_config
from pipeline.model import build_model, flops_per_token, parameter_count, preset_model_shape
from pipeline.plan import (
    MEASURED,
    PlanConfig,
    dense_training_flops,
    plan,
    run,
    token_count,
)
from pipeline.stage import PipelineError, stage_main


def test_the_known_compute_budgets() -> None:
    assert dense_training_flops(1.5e9, 10e9) == pytest.approx(9e19, rel=0.01)  # GPT-2's own budget
    assert dense_training_flops(1.4e9, 300e9) == pytest.approx(2.5e21, rel=0.02)
    assert dense_training_flops(124e6, 3.3e9) == pytest.approx(2.4e18, rel=0.03)  # GPT-2 small, nanoGPT's run
    assert token_count("10B") == token_count("10e9") == 1e10 and token_count("300b") == 3e11
    with pytest.raises(PipelineError, match="--tokens 'lots' is not a token count"):
        token_count("lots")


def test_model_arithmetic_is_the_trainers() -> None:
    for preset in ("tiny", "gpt2", "gpt2-xl"):
        with torch.device("meta"):
            model = build_model(preset, 50257, 50256)
        assert preset_model_shape(preset).parameters == parameter_count(model)
        result = plan(PlanConfig(preset=preset, seq_len=1024 if preset != "tiny" else 256))
        assert result["compute"]["flops_per_token"] == flops_per_token(model, result["inputs"]["seq_len"])
        assert result["compute"]["compute_optimal_tokens"] == 20 * parameter_count(model)


def test_deepspeeds_estimator_for_gpt2_xl() -> None:
    result = plan(PlanConfig(preset="gpt2-xl"))
    states = {c["config"]: c["gpu_gib"]["model_states"] for c in result["configs"]}
    assert states["ds_configs/zero2_offload.json"] == pytest.approx(2.9, abs=0.05)  # 2 bytes per parameter
    assert states["ds_configs/zero3_offload.json"] < 0.5  # the largest layer only


def test_the_estimate_matches_the_gpu_host_measurement() -> None:
    """At each measured setting (GPT-2 XL, checkpointing, 11 GiB cap, its batch layout, its gradients summed in
    bf16 as DeepSpeed then did), the estimate of the real GPU memory is within 15% of what NVML reported, and not
    below it."""
    from pipeline.memory import gpu_memory_bytes
    from pipeline.precision import apply

    compared = []
    for record in sorted(MEASURED.glob("onecard-*.json")):
        measured = json.loads(record.read_text())
        if measured["peak_gpu_mem_nvml_gib"] is None:  # ZeRO-3 NVMe has not been measured on a GPU
            continue
        shipped = load_ds_config(CONFIGS / f"{record.stem.removeprefix('onecard-')}.json")
        ds = apply({**shipped, "train_micro_batch_size_per_gpu": measured["micro_batch_size"],
                    "gradient_accumulation_steps": measured["grad_accum"],
                    "data_types": {"grad_accum_dtype": "bf16"}}, "bf16")
        estimate = gpu_memory_bytes(ds, preset_model_shape("gpt2-xl"), measured["seq_len"],
                                    measured["micro_batch_size"], 1)["total"] / (1 << 30)
        assert measured["peak_gpu_mem_nvml_gib"] <= estimate <= 1.15 * measured["peak_gpu_mem_nvml_gib"], record.name
        compared.append(record.stem)
    assert compared == ["onecard-zero2_offload", "onecard-zero3_offload"]


def test_summing_gradients_in_fp32_leaves_a_12_gb_card_the_zero3_configs_for_gpt2_xl() -> None:
    """ZeRO-1 and 2 sum a bf16 run's micro-steps in an fp32 buffer on the GPU (4 bytes a parameter: 5.8 GiB for
    XL), which a 12 GB card cannot add to XL's bf16 weights; ZeRO-3 sums on the host."""
    result = plan(PlanConfig(preset="gpt2-xl", gpu="RTX 4070 Ti", host_ram_gib=64, nvme_free_gib=200))
    on_gpu = {Path(c["config"]).stem: c["fits_detail"]["gpu"] for c in result["configs"]}
    assert on_gpu == {"zero1_offload": False, "zero2_offload": False, "zero2_offload_bf16_states": False,
                      "zero3_offload": True, "zero3_nvme": True, "zero3_nvme_optimizer": True}
    accumulating = {Path(c["config"]).stem: c["gpu_gib"]["gradients"] for c in result["configs"]}
    assert accumulating["zero2_offload"] == pytest.approx(4 * preset_model_shape("gpt2-xl").parameters / (1 << 30))


@pytest.mark.parametrize(("ram_gib", "learning_cost"), [(32, 0.004), (40, 0.004), (40, 0.02)])
def test_a_desktop_gets_the_fastest_config_that_fits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture, ram_gib: int,
                                                     learning_cost: float) -> None:
    """GPT-2 XL on a 16 GB card: the fp32 host states of CPU offload fit neither 32 nor 40 GB; bf16 states fit 40
    (not 32: a resume reads their 8.7 GiB optimizer file and the 2.9 GiB of weights beside 18 GiB of states), NVMe
    both. The fastest by the days is recommended, bf16 states only if they cost learning at most 1%."""
    monkeypatch.setattr(plan_module, "bf16_states_loss", lambda: learning_cost)
    written, report = tmp_path / "mine.json", tmp_path / "plan.json"
    stage_main(PlanConfig, run, ["--preset", "gpt2-xl", "--gpu", "RTX 4070 Ti SUPER", "--host-ram-gib", str(ram_gib),
                                 "--nvme-free-gib", "200", "--disk-read-gbps", "3", "--disk-write-gbps", "2",
                                 "--nvme-path", str(tmp_path / "fast"), "--write-config", str(written),
                                 "--json", str(report)])
    result = json.loads(report.read_text())
    configs = {Path(c["config"]).stem: c for c in result["configs"]}
    assert {name: c["fits"] for name, c in configs.items()} == {
        "zero1_offload": False, "zero2_offload": False, "zero3_offload": False,  # 53-60 GiB of host RAM
        "zero2_offload_bf16_states": ram_gib > 32, "zero3_nvme": True, "zero3_nvme_optimizer": True}
    assert all(c["host_gib"] < 0.9 * ram_gib for c in configs.values() if c["fits"])
    nvme_configs = [configs["zero3_nvme"], configs["zero3_nvme_optimizer"]]
    assert all(c["days"] > c["nvme_days"] > 0 for c in nvme_configs)  # compute plus the swap at the disk's speed
    bf16_wins = ram_gib > 32 and learning_cost <= 0.01
    expected = "zero2_offload_bf16_states" if bf16_wins else "zero3_nvme_optimizer"
    assert result["recommended"] == f"ds_configs/{expected}.json"
    assert f"recommended: ds_configs/{expected}.json" in capfd.readouterr().err
    chosen, ds = configs[expected], load_ds_config(written)  # a config train accepts as it is
    tokens = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 1024
    assert (ds["train_micro_batch_size_per_gpu"], tokens) == (chosen["micro_batch_size"], 1 << 19)
    if expected == "zero3_nvme_optimizer":
        assert ds["zero_optimization"]["offload_optimizer"]["nvme_path"] == str(tmp_path / "fast")


def test_the_disk_is_measured_through_deepspeeds_async_io_and_its_best_settings_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nvme, "AIO_SWEEP", {"queue_depth": [8, 32], "thread_count": [1, 2]})
    monkeypatch.setattr(plan_module, "bf16_states_loss", lambda: 0.02)  # NVMe wins: its config gets the settings
    written = tmp_path / "mine.json"
    result = run(PlanConfig(preset="gpt2-xl", host_ram_gib=32, nvme_free_gib=200, nvme_path=tmp_path / "fast",
                            measure_disk=True, disk_test_gib=1 / 32, write_config=written))
    disk = result["disk"]
    assert len(disk["trials"]) == 3 and all(t["read_gbps"] > 0 and t["write_gbps"] > 0 for t in disk["trials"])
    assert disk["best"]["queue_depth"] in (8, 32) and disk["best"]["thread_count"] in (1, 2)
    assert not list((tmp_path / "fast").iterdir())  # its probe files are gone
    assert load_ds_config(written)["aio"] == nvme.aio_section(disk["best"])
    assert all("nvme_days" in c for c in result["configs"] if "nvme_step_gb" in c)


def test_time_and_energy_follow_from_the_mfu() -> None:
    result = plan(PlanConfig(preset="gpt2", tokens="10B", gpu="RTX 4090", mfu=0.25))
    entry = result["configs"][0]
    seconds = result["compute"]["training_flops"] / (0.25 * 165.2e12)
    assert entry["days"] == pytest.approx(seconds / 86400)
    assert entry["energy_kwh"] == pytest.approx(seconds * 450 / 3.6e6)
    assert entry["mfu_source"] == "--mfu"


def test_an_unknown_card_needs_its_numbers() -> None:
    with pytest.raises(PipelineError, match=r"--gpu 'Voodoo 5' is not in the table.*--gpu-memory-gib"):
        plan(PlanConfig(gpu="Voodoo 5"))
    with pytest.raises(PipelineError, match=r"--gpu 'RTX 3060 Ti' is not in the table"):  # 8 GB, not the 3060's 12
        plan(PlanConfig(gpu="RTX 3060 Ti"))
    result = plan(PlanConfig(gpu="Voodoo 5", gpu_memory_gib=16, gpu_peak_tflops=100))
    assert result["gpu"] == {"name": "Voodoo 5", "memory_gib": 16, "precision": "bf16", "peak_tflops": 100,
                             "precision_reason": "auto: a card not in the table, taken to have bf16 tensor cores",
                             "watts": None}
    assert all(c.get("energy_kwh") is None for c in result["configs"])
    assert max(c["gpu_gib"]["total"] for c in result["configs"] if c["fits"]) <= 16


@pytest.mark.parametrize(("gpu", "precision", "peak"), [("RTX 2080 Ti", "fp16", 53.8), ("Tesla T4", "fp16", 65.0),
                                                        ("GTX 1080 Ti", "fp32", 11.3), ("RTX 4070 Ti", "bf16", 80.2)])
def test_a_card_is_planned_in_the_precision_training_picks_there(gpu: str, precision: str, peak: float) -> None:
    result = plan(PlanConfig(preset="gpt2", tokens="10B", gpu=gpu, mfu=0.25))
    assert (result["gpu"]["precision"], result["gpu"]["peak_tflops"]) == (precision, peak)
    seconds = result["compute"]["training_flops"] / (0.25 * peak * 1e12)  # MFU of that precision's peak
    assert result["configs"][0]["days"] == pytest.approx(seconds / 86400)


def test_fp32_holds_twice_the_bytes_of_bf16_on_the_gpu() -> None:
    """A card without tensor cores trains in fp32: weights, gradients, buffers and activations take 4 bytes a value
    where bf16 takes 2 (the fp32 logits chunk is the same)."""
    def memory(precision: str) -> dict[str, dict[str, float]]:
        result = plan(PlanConfig(preset="gpt2", gpu="GTX 1080 Ti", precision=precision, micro_batch_size=4))
        return {c["config"]: c["gpu_gib"] for c in result["configs"]}

    fp32, bf16 = memory("auto"), memory("bf16")
    for config, terms in fp32.items():
        for term in ("model_states", "buffers", "activations"):
            assert terms[term] == pytest.approx(2 * bf16[config][term]), (config, term)
        assert terms["logits"] == bf16[config]["logits"]
        # fp32 sums the micro-steps in its own gradients; bf16 in an fp32 buffer beside them (ZeRO-1: instead)
        if "zero3" not in config:
            assert bf16[config]["gradients"] == pytest.approx(4 * preset_model_shape("gpt2").parameters / (1 << 30))
    with pytest.raises(PipelineError, match="--precision fp8: choose one of auto, bf16, fp16, fp32"):
        plan(PlanConfig(precision="fp8"))


def test_a_plain_install_plans_like_the_source_tree(tmp_path: Path) -> None:
    """`pip install` of the wheel (not editable) into a fresh venv, run from another folder: the planner finds the
    shipped configs and the GPU-host measurements inside the package."""
    import os
    import subprocess
    import sys

    from helpers import REPO

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    # no pip of its own (seconds to install): this environment's pip installs into it
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python*/site-packages"))
    # onecard's dependencies from this environment, wherever they are (site-packages, a PYTHONPATH folder), as plain
    # path entries: its editable onecard is not loaded, and the source tree is left out
    folders = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != REPO.resolve()]
    (site / "dependencies.pth").write_text("\n".join(folders) + "\n")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    wheel = next((tmp_path / "dist").glob("onecard-*.whl"))
    # --ignore-installed: this environment's editable onecard, seen through those entries, is not this install
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q", "--no-deps",
                    "--no-index", "--ignore-installed", str(wheel)], env=env, check=True, capture_output=True,
                   timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([str(venv / "bin" / "onecard"), "plan", "--preset", "gpt2-xl", "--gpu", "RTX 4070 Ti",
                             "--json", "plan.json"], cwd=elsewhere, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((elsewhere / "plan.json").read_text())
    configs = {Path(c["config"]).stem: c for c in report["configs"]}
    assert set(configs) == {p.stem for p in (REPO / "ds_configs").glob("*.json")}
    assert configs["zero2_offload"]["mfu"] == pytest.approx(0.094, abs=0.001)  # the H100 measurement
    located = subprocess.run([str(venv / "bin" / "python"), "-c", "import pipeline; print(pipeline.__file__)"],
                             cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60).stdout
    assert located.startswith(str(site))  # the installed package, not the source tree
