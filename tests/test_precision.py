"""`auto` precision: each row of the decision table on faked devices, and how the JSON, --precision and the
hardware's choice merge into the config DeepSpeed runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from helpers import REPO

from pipeline import precision
from pipeline.dsconfig import load_ds_config
from pipeline.precision import Choice, resolve
from pipeline.stage import PipelineError

SAPPHIRE_RAPIDS = {"avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
ZEN4 = {"avx2", "avx512f", "avx512bw", "avx512_bf16"}
ICE_LAKE = {"avx2", "avx512f", "avx512bw", "avx512_vnni"}  # AVX-512 without bf16: emulated
ALDER_LAKE = {"avx2", "fma", "avx_vnni"}  # AVX2 only


@pytest.mark.parametrize(("capability", "expected"), [
    ((9, 0), "bf16"), ((8, 9), "bf16"), ((8, 6), "bf16"), ((8, 0), "bf16"),  # Hopper, Ada, Ampere
    ((7, 5), "fp16"), ((7, 0), "fp16"),  # Turing (RTX 20, T4), Volta (V100)
    ((6, 1), "fp32"), ((6, 0), "fp32"), ((5, 2), "fp32"),  # Pascal (GTX 10, P100), Maxwell
])
def test_a_cuda_card_gets_the_precision_of_its_tensor_cores(monkeypatch: pytest.MonkeyPatch,
                                                           capability: tuple[int, int], expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Test Card")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a: True)  # what torch says even when emulated
    choice = precision.detect()
    assert choice.precision == expected
    assert choice.reason.startswith(f"auto: NVIDIA Test Card, compute capability {capability[0]}.{capability[1]}")


@pytest.mark.parametrize(("flags", "isa_cap", "expected"), [
    (SAPPHIRE_RAPIDS, None, "bf16"), (ZEN4, None, "bf16"), ({"amx_bf16"}, None, "bf16"),
    (ICE_LAKE, None, "fp32"), (ALDER_LAKE, None, "fp32"), (set(), None, "fp32"),
    (ZEN4, "AVX2", "fp32"),  # oneDNN capped below its bf16 instructions: emulated again
    (ZEN4, "avx512_core_bf16", "bf16"), (SAPPHIRE_RAPIDS, "AVX512_CORE_AMX", "bf16"),
])
def test_a_cpu_gets_bf16_only_with_native_bf16_instructions(flags: set[str], isa_cap: str | None,
                                                            expected: str) -> None:
    choice = precision.for_cpu("Test CPU", flags, isa_cap)
    assert choice.precision == expected and choice.reason.startswith("auto: Test CPU")
    assert ("emulated" in choice.reason) == (expected == "fp32")


def test_cpu_flags_come_from_torchs_probe_or_proc_cpuinfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-12700\n"
                       "flags\t\t: fpu sse2 avx avx2 fma avx_vnni\n\nprocessor\t: 1\n")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.cpu_flags(cpuinfo) == {"avx512_bf16"}  # torch's own probe where it has one
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert precision.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx", "avx2", "fma", "avx_vnni"}
    assert precision.cpu_model(cpuinfo) == "Intel(R) Core(TM) i7-12700"
    assert precision.for_cpu(precision.cpu_model(cpuinfo), precision.cpu_flags(cpuinfo)).precision == "fp32"
    assert precision.cpu_model(tmp_path / "missing") == "this CPU" and precision.cpu_flags(tmp_path / "x") == set()


def test_this_machine_is_decided_from_its_own_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = set(Path("/proc/cpuinfo").read_text().partition("flags")[2].partition("\n")[0].split())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's CPU, also on a GPU host
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert precision.detect().precision == ("bf16" if native else "fp32")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert precision.detect().precision == "fp32"


SHIPPED = REPO / "ds_configs" / "zero2_offload.json"
GPUS = {"H100": Choice("bf16", "auto: H100"), "T4": Choice("fp16", "auto: T4"), "P100": Choice("fp32", "auto: P")}


@pytest.fixture()
def fp16_capable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device DeepSpeed trains fp16 on (this CPU may not be one)."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)


@pytest.mark.parametrize("device", GPUS)
def test_a_shipped_config_trains_in_the_devices_precision(fp16_capable: None, device: str) -> None:
    ds, choice = resolve(load_ds_config(SHIPPED), str(SHIPPED), None, device=lambda: GPUS[device])
    assert choice == GPUS[device]
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (choice.precision == "bf16", choice.precision == "fp16")
    assert ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 16  # dynamic loss scaling
    assert "auto" not in str(ds)


@pytest.mark.parametrize(("ranks", "agreed"), [
    (["H100", "H100"], "bf16"), (["H100", "T4"], "fp16"), (["T4", "H100", "P100"], "fp32"), (["P100", "T4"], "fp32"),
])
def test_ranks_on_mixed_devices_settle_auto_on_what_every_one_runs_natively(ranks: list[str], agreed: str) -> None:
    choice = precision.common([GPUS[rank] for rank in ranks])
    assert choice.precision == agreed
    if len(set(ranks)) == 1:
        assert choice == GPUS[ranks[0]]
    else:  # every rank's own choice is named
        assert all(f"rank {i}: {GPUS[rank]}" in choice.reason for i, rank in enumerate(ranks))


def test_an_explicit_precision_wins_over_auto(fp16_capable: None) -> None:
    shipped = load_ds_config(SHIPPED)
    ds, choice = resolve(shipped, str(SHIPPED), "fp32", device=lambda: GPUS["H100"])
    assert choice == Choice("fp32", "set by --precision") and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    json_bf16 = {**shipped, "bf16": {"enabled": True}, "fp16": {"enabled": False}}
    assert resolve(json_bf16, "mine.json", None, device=lambda: GPUS["H100"])[1] == Choice("bf16", "set by mine.json")
    assert resolve(json_bf16, "mine.json", "auto", device=lambda: GPUS["T4"])[1] == GPUS["T4"]  # --precision auto
    without = {key: value for key, value in shipped.items() if key not in ("bf16", "fp16")}
    assert resolve(without, "plain.json", None, device=lambda: GPUS["H100"])[1].precision == "fp32"  # DeepSpeed's
    # fp16 asked for by a JSON without loss-scale settings gets DeepSpeed's dynamic scaling, written out; a JSON's
    # own settings stay
    ds, _ = resolve({**without, "fp16": {"enabled": True, "initial_scale_power": 12}}, "x.json", None,
                    device=lambda: GPUS["T4"])
    assert ds["fp16"] == {**precision.FP16_LOSS_SCALING, "enabled": True, "initial_scale_power": 12}


def test_bf16_asked_for_on_a_device_without_it_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onecard"):
        _, choice = resolve(load_ds_config(SHIPPED), "x.json", "bf16", device=lambda: GPUS["P100"])
    assert choice.precision == "bf16"
    assert "no native bf16 (auto: P)" in caplog.text and "many times slower than fp32" in caplog.text


def test_fp16_where_deepspeed_cannot_run_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    with pytest.raises(PipelineError, match=r"fp16 is asked for, but DeepSpeed cannot train in fp16 on .*"
                                            r"--precision auto .* or --precision fp32"):
        resolve(load_ds_config(SHIPPED), "x.json", "fp16", device=lambda: GPUS["P100"])


@pytest.mark.parametrize(("sections", "override", "message"), [
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, None, "enables both bf16 and fp16"),
    ({"bf16": {"enabled": "yes"}}, None, r'bf16.enabled is \'yes\'; it must be true, false or "auto"'),
    ({}, "fp8", "--precision fp8: choose one of auto, bf16, fp16, fp32"),
])
def test_a_precision_that_means_nothing_is_refused(sections: dict, override: str | None, message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        resolve({"optimizer": {}, **sections}, "x.json", override, device=lambda: GPUS["H100"])


# --- training: fp16's loss scaling through DeepSpeed's engine, and a run's precision across resumes ---------

def train(data_dir: Path, ds: dict | Path, run: str, **options) -> list[dict]:
    """Train the tiny preset in this process on `ds` (a config, written beside the data, or a shipped one)."""
    from pipeline.metrics import read_metrics
    from pipeline.train import TrainConfig
    from pipeline.train import run as train_run

    if isinstance(ds, dict):
        path = data_dir / f"{run}.json"
        path.write_text(json.dumps(ds))
        ds = path
    settings = {"seq_len": 32, "micro_batch_size": 2, "max_steps": 6, "lr": 2e-3, "warmup_steps": 2,
                "checkpoint_every": 100, "eval_every": 0, **options}
    train_run(TrainConfig(data_dir=data_dir, deepspeed=str(ds), run=run, **settings))
    return read_metrics(data_dir / "runs" / run)


def fp16_config(**scaling: int) -> dict:
    ds = load_ds_config(SHIPPED)
    return {**ds, "fp16": {**ds["fp16"], **scaling}}


@pytest.mark.slow
def test_fp16_skips_overflowing_steps_counts_them_and_resumes_exactly(data_copy: Path, fp16_capable: None) -> None:
    """fp16 on the CPU (DeepSpeed's CPU accelerator told it may): a loss scale started far too high overflows the
    first steps, which DeepSpeed skips — weights and schedule unchanged — and halves the scale; metrics and
    TensorBoard count them, and a run resumed after them continues bit for bit, scaler and schedule included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.checkpoint import load_weights
    from pipeline.train import TrainConfig, lr_schedule

    ds = fp16_config(initial_scale_power=19, hysteresis=1)
    straight = train(data_copy, ds, "straight", precision="fp16", checkpoint_every=3)
    skipped = [m["skipped_steps"] for m in straight]
    assert skipped[0] == 1 and skipped == sorted(skipped), skipped
    scales = [m["loss_scale"] for m in straight]
    assert scales[0] == 2.0 ** 18 and scales == sorted(scales, reverse=True), scales  # halved at each overflow
    assert skipped[-1] < 5  # some steps were applied
    # a skipped step leaves the schedule where it was: step k runs at the schedule's value for the updates made
    schedule = lr_schedule(TrainConfig(max_steps=6, warmup_steps=2))
    made = [k - (skipped[k - 1] if k else 0) for k in range(6)]
    assert [m["lr"] for m in straight] == pytest.approx([2e-3 * schedule.ratio(n) for n in made])
    events = EventAccumulator(str(data_copy / "runs" / "straight"))
    events.Reload()
    assert {"train/skipped_steps", "train/loss_scale"} <= set(events.Tags()["scalars"])

    train(data_copy, ds, "resumed", precision="fp16", stop_after=4)
    resumed = train(data_copy, ds, "resumed", precision="fp16")
    for key in ("loss", "lr", "loss_scale", "skipped_steps"):
        assert [m[key] for m in resumed] == [m[key] for m in straight], key
    _, a = load_weights(data_copy / "checkpoints" / "straight")
    _, b = load_weights(data_copy / "checkpoints" / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_fp16_that_overflows_at_its_floor_stops_with_a_clear_error(data_copy: Path, fp16_capable: None) -> None:
    ds = fp16_config(initial_scale_power=30, min_loss_scale=2 ** 30, hysteresis=1)
    with pytest.raises(PipelineError, match=r"fp16 gradients overflowed at step 1 with the loss scale at its floor "
                                            r"\(1.07374e\+09; skipped steps so far: 1\).*diverged.*lower --lr"):
        train(data_copy, ds, "diverged", precision="fp16")
    assert not list((data_copy / "checkpoints" / "diverged").glob("step_*"))  # nothing saved from it


@pytest.mark.slow
def test_a_resumed_run_keeps_its_precision_unless_asked_to_change(data_copy: Path, fp16_capable: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Trained in fp32 where `auto` chose it; resumed on a machine where `auto` chooses fp16: refused, naming both,
    until asked for; then it goes on in fp16 with a loss scaler of its own (not the fp32 checkpoint's)."""
    monkeypatch.setattr(precision, "detect", lambda: Choice("fp32", "auto: machine A"))
    train(data_copy, SHIPPED, "moved", stop_after=3)
    monkeypatch.setattr(precision, "detect", lambda: Choice("fp16", "auto: machine B"))
    with pytest.raises(PipelineError, match=r"was trained in fp32 \(auto: machine A\), and this run would train in "
                                            r"fp16 \(auto: machine B\).*--precision fp32.*--allow-precision-change"):
        train(data_copy, SHIPPED, "moved")
    assert train(data_copy, SHIPPED, "moved", precision="fp32", stop_after=4)[-1]["step"] == 4  # kept: goes on
    metrics = train(data_copy, SHIPPED, "moved", allow_precision_change=True)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6] and all(torch.isfinite(torch.tensor(
        [m["loss"] for m in metrics])))
    assert "loss_scale" not in metrics[3] and metrics[4]["loss_scale"] == 2.0 ** 16  # a fresh dynamic scaler
    run_file = json.loads((data_copy / "checkpoints" / "moved" / "run.json").read_text())
    assert run_file["identity"]["precision"] == "fp16" and run_file["precision"]["reason"] == "auto: machine B"


def first_gradient(data_dir: Path, ds: dict | Path, run: str, **options) -> torch.Tensor:
    """The fp32 gradient CPU Adam gets at a bf16 run's first step (every config here offloads the optimizer): what
    the micro-steps summed to, unscaled and clipped."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    seen, step = [], DeepSpeedCPUAdam.step

    def recording(self: DeepSpeedCPUAdam, *args: object, **kwargs: object) -> object:
        seen.append(torch.cat([p.grad.float().flatten() for g in self.param_groups for p in g["params"]]))
        return step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DeepSpeedCPUAdam, "step", recording)
        train(data_dir, ds, run, precision="bf16", max_steps=1, warmup_steps=1, **options)
    return seen[0]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


@pytest.mark.slow
def test_bf16_gradients_accumulate_in_fp32_under_every_zero_stage(data_copy: Path) -> None:
    """Eight bf16 micro-batches of one sequence give the gradient one micro-batch of eight gives, within bf16's
    rounding of each micro-batch's gradient (measured on an AVX2 CPU: 0.23-0.25% of its norm), under ZeRO-1, 2
    and 3. Summed in bf16, as DeepSpeed does unless told otherwise, they drift further (0.42% there)."""
    shipped = {config: REPO / "ds_configs" / f"{config}.json"
               for config in ("zero1_offload", "zero2_offload", "zero3_offload")}
    # each stage against its own batch of eight: the order of CPU Adam's flat partition is the stage's own
    at_once = {config: first_gradient(data_copy, ds, f"{config}-once", micro_batch_size=8, grad_accum=1)
               for config, ds in shipped.items()}
    errors = {config: relative_error(first_gradient(data_copy, ds, config, micro_batch_size=1, grad_accum=8),
                                     at_once[config]) for config, ds in shipped.items()}
    in_bf16 = {**load_ds_config(shipped["zero2_offload"]), "data_types": {"grad_accum_dtype": "bf16"}}
    summed_in_bf16 = relative_error(first_gradient(data_copy, in_bf16, "bf16-sums", micro_batch_size=1, grad_accum=8),
                                    at_once["zero2_offload"])
    assert max(errors.values()) < 0.0035, errors
    assert summed_in_bf16 > max(errors.values()), (summed_in_bf16, errors)
    for config in shipped:  # what the run's merged config says it did
        settled = json.loads((data_copy / "checkpoints" / config / "ds_config.json").read_text())
        assert settled["data_types"] == {"grad_accum_dtype": "fp32"}, config
