"""GPU table, memory cap and memory readings."""

from __future__ import annotations

import types

import pytest
import torch

from pipeline import hardware
from pipeline.hardware import GIB, MemoryProbe, cap_gpu_memory, lookup_gpu
from pipeline.stage import PipelineError


@pytest.mark.parametrize(("name", "tflops"), [
    ("NVIDIA H100 80GB HBM3", 989.4),
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA GeForce RTX 4070 Ti", 80.2),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", 88.2),
    ("NVIDIA GeForce RTX 3060", 25.6),
])
def test_known_gpus(name: str, tflops: float) -> None:
    assert lookup_gpu(name).peak_bf16_tflops == tflops


def test_unknown_gpu_has_no_peak() -> None:
    assert lookup_gpu("Some Future Accelerator") is None
    assert hardware.peak_tflops() is None  # this machine has no GPU
    assert hardware.peak_tflops(123.0) == 123.0


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


def test_memory_cap_without_a_gpu_is_refused() -> None:
    with pytest.raises(PipelineError, match="needs a CUDA GPU"):
        cap_gpu_memory(11)


def test_memory_probe_on_cpu() -> None:
    readings = MemoryProbe().sample()
    assert 0 < readings["host_rss_gib"] <= readings["peak_host_rss_gib"]
    assert readings["peak_gpu_reserved_gib"] is None and readings["peak_gpu_nvml_gib"] is None
