"""GPU table, memory cap and memory readings."""

from __future__ import annotations

import types

import pytest
import torch

from pipeline import hardware
from pipeline.hardware import GIB, MemoryProbe, cap_gpu_memory, lookup_gpu
from pipeline.stage import PipelineError


@pytest.mark.parametrize(("name", "auto", "tflops"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA GeForce RTX 4070 Ti", "bf16", 80.2),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", "bf16", 88.2),
    ("NVIDIA GeForce RTX 3060", "bf16", 25.6),
    # before Ampere: the precision `auto` picks, and that precision's dense peak (fp16 with fp32 accumulation;
    # GeForce Turing at half its fp16-accumulate rate; Pascal on CUDA cores)
    ("NVIDIA GeForce RTX 2080 Ti", "fp16", 53.8),
    ("NVIDIA GeForce RTX 2060", "fp16", 28.7),
    ("NVIDIA TITAN RTX", "fp16", 130.5),
    ("Tesla T4", "fp16", 65.0),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("Tesla V100-PCIE-32GB", "fp16", 112.0),
    ("NVIDIA GeForce GTX 1080 Ti", "fp32", 11.3),
    ("NVIDIA TITAN Xp", "fp32", 12.1),
])
def test_known_gpus(name: str, auto: str, tflops: float) -> None:
    gpu = lookup_gpu(name)
    assert gpu.auto.precision == auto and gpu.peak_tflops(auto) == tflops
    assert gpu.peak_tflops("fp32") < tflops or auto == "fp32"  # tensor cores beat CUDA cores
    assert (gpu.peak_tflops("bf16") is None) == (gpu.capability < (8, 0))  # no bf16 tensor cores before Ampere


@pytest.mark.parametrize(("name", "card"), [
    ("RTX 4070 Ti", "RTX 4070 Ti"), ("rtx  4070 ti", "RTX 4070 Ti"), ("GeForce RTX 3060", "RTX 3060"),
    ("T4", "Tesla T4"), ("H100 SXM", "H100 80GB HBM3"), ("V100-SXM2-32GB", "V100-SXM2"),
    # other cards whose names contain a card of the table: not that card
    ("RTX 3060 Ti", None), ("NVIDIA GeForce RTX 4070", None), ("NVIDIA GeForce RTX 4070 Laptop GPU", None),
    ("NVIDIA H200 NVL", None), ("NVIDIA GH200 480GB", None), ("Quadro RTX 4000", None),
])
def test_gpu_names_are_matched_whole(name: str, card: str | None) -> None:
    gpu = lookup_gpu(name)
    assert (gpu.name if gpu else None) == card


def test_unknown_gpu_has_no_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    assert lookup_gpu("Some Future Accelerator") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.peak_tflops("bf16") is None  # a machine without a GPU
    assert hardware.peak_tflops("bf16", 123.0) == 123.0


def test_mfu_is_against_the_peak_of_the_precision_the_run_used(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu(monkeypatch, 80)
    assert [hardware.peak_tflops(p) for p in ("bf16", "fp16", "fp32")] == [989.4, 989.4, 66.9]


def fake_gpu(monkeypatch: pytest.MonkeyPatch, total_gib: float) -> list[float]:
    fractions: list[float] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(total_memory=int(total_gib * GIB)))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda fraction: fractions.append(fraction))
    return fractions


def test_memory_cap_sets_the_allocator_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    fractions = fake_gpu(monkeypatch, 80)
    cap_gpu_memory(11)
    assert fractions == [pytest.approx(11 / 80)]


def test_memory_cap_larger_than_the_card_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fractions = fake_gpu(monkeypatch, 12)
    with pytest.raises(PipelineError, match=r"--gpu-mem-cap 24 GiB is not within this GPU's 12.0 GiB"):
        cap_gpu_memory(24)
    assert fractions == []


def test_memory_cap_without_a_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without one, also on a GPU host
    with pytest.raises(PipelineError, match="needs a CUDA GPU"):
        cap_gpu_memory(11)


def test_memory_probe_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    readings = MemoryProbe().sample()
    assert 0 < readings["host_rss_gib"] <= readings["peak_host_rss_gib"]
    assert readings["peak_gpu_reserved_gib"] is None and readings["peak_gpu_nvml_gib"] is None
