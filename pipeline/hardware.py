"""What the hardware can do and what the process uses: GPU peak rates, memory caps, memory readings."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import psutil
import torch

from pipeline.stage import PipelineError

GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_bf16_tflops: float  # dense tensor-core bf16 with fp32 accumulation, no sparsity (vendor datasheets)
    watts: float  # board power (TDP), for energy estimates


# Longer names first: "RTX 4070 Ti" must not be taken for "RTX 4070".
GPUS = (
    GPU("H100 80GB HBM3", 80, 989.4, 700),  # H100 SXM
    GPU("H100 PCIe", 80, 756.5, 350),
    GPU("H200", 141, 989.4, 700),
    GPU("A100-SXM4-80GB", 80, 312.0, 400),
    GPU("A100-SXM4-40GB", 40, 312.0, 400),
    GPU("A100 80GB PCIe", 80, 312.0, 300),
    GPU("A100-PCIE-40GB", 40, 312.0, 250),
    GPU("RTX 4090", 24, 165.2, 450),
    GPU("RTX 4070 Ti SUPER", 16, 88.2, 285),
    GPU("RTX 4070 Ti", 12, 80.2, 285),
    GPU("RTX 3090", 24, 71.0, 350),
    GPU("RTX 3060", 12, 25.6, 170),
)


def lookup_gpu(device_name: str) -> GPU | None:
    for gpu in GPUS:
        if gpu.name.lower() in device_name.lower():
            return gpu
    return None


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_tflops(override: float | None = None) -> float | None:
    """The device's dense bf16 peak, for MFU: --peak-tflops if given, else the table; None when unknown."""
    if override is not None:
        return override
    gpu = lookup_gpu(device_name())
    return gpu.peak_bf16_tflops if gpu and torch.cuda.is_available() else None


def cap_gpu_memory(cap_gib: float) -> None:
    """Make a big GPU behave like a small one: the caching allocator refuses to grow past `cap_gib`."""
    if not torch.cuda.is_available():
        raise PipelineError(f"--gpu-mem-cap {cap_gib} needs a CUDA GPU, and none is visible to this process.")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    if cap_gib <= 0 or cap_gib * GIB > total:
        raise PipelineError(
            f"--gpu-mem-cap {cap_gib} GiB is not within this GPU's {total / GIB:.1f} GiB "
            f"({device_name()}); give a cap between 0 and {total / GIB:.1f}."
        )
    torch.cuda.set_per_process_memory_fraction(cap_gib * GIB / total)


class MemoryProbe:
    """Peak memory of this process: the CUDA allocator's reservation, the device memory NVML charges to the
    process (CUDA context included), and host RSS."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.nvml_handle = None
        self.peak_nvml = 0
        self.peak_rss = 0
        if torch.cuda.is_available():
            try:
                import pynvml

                pynvml.nvmlInit()
                self.nvml_handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            except Exception:  # no NVML (or no permission): report the allocator's view only
                self.nvml_handle = None

    def nvml_used_bytes(self) -> int | None:
        if self.nvml_handle is None:
            return None
        import pynvml

        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self.nvml_handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        # In a container the process list may not show our pid; the device total is then the upper bound.
        return int(pynvml.nvmlDeviceGetMemoryInfo(self.nvml_handle).used)

    def sample(self) -> dict[str, float | None]:
        """Current and peak readings in GiB (None where the reading does not exist on this machine)."""
        used = self.nvml_used_bytes()
        if used is not None:
            self.peak_nvml = max(self.peak_nvml, used)
        cuda = torch.cuda.is_available()
        rss = self.process.memory_info().rss
        # ru_maxrss (KiB on Linux) also covers peaks between samples, but lags the current reading a little.
        self.peak_rss = max(self.peak_rss, rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10)
        return {
            "gpu_reserved_gib": torch.cuda.memory_reserved() / GIB if cuda else None,
            "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
            "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
            "gpu_nvml_gib": used / GIB if used is not None else None,
            "peak_gpu_nvml_gib": self.peak_nvml / GIB if used is not None else None,
            "host_rss_gib": rss / GIB,
            "peak_host_rss_gib": self.peak_rss / GIB,
        }
