"""What the hardware can do and what the process uses: GPU peak rates, memory caps, memory readings."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import psutil
import torch

from pipeline.precision import Choice, for_gpu
from pipeline.stage import PipelineError

GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    capability: tuple[int, int]  # CUDA compute capability: what `auto` precision picks (pipeline/precision.py)
    # Dense peaks in TFLOP/s, no sparsity, from the vendor's datasheets: tensor cores with fp32 accumulation for
    # bf16 and fp16 (GeForce cards run that at half their fp16-accumulate rate), CUDA cores for fp32 (PyTorch
    # leaves TF32 off for matmuls); None where the card has no tensor cores for that type.
    bf16_tflops: float | None
    fp16_tflops: float | None
    fp32_tflops: float
    watts: float  # board power (TDP), for energy estimates
    aliases: tuple[str, ...] = ()  # other names torch reports for the same board (its memory variants)

    def peak_tflops(self, precision: str) -> float | None:
        return {"bf16": self.bf16_tflops, "fp16": self.fp16_tflops, "fp32": self.fp32_tflops}[precision]

    @property
    def auto(self) -> Choice:
        """The precision `auto` picks on this card."""
        return for_gpu(self.name, self.capability)


# Sources: NVIDIA's H100 and H200 datasheets, the A100 datasheet, the Ada (RTX 40), Ampere GA102 (RTX 30) and
# Turing (RTX 20, Titan RTX) architecture whitepapers' appendix tables, the T4 and V100 datasheets, and the
# GeForce GTX 1080 Ti / Titan Xp specifications (Pascal: boost clock x 2 x CUDA cores). Names are matched whole
# (see `lookup_gpu`): an "RTX 3060 Ti" (8 GB) is not an "RTX 3060" (12 GB), and a laptop part is not its desktop
# namesake.
GPUS = (
    GPU("H100 80GB HBM3", 80, (9, 0), 989.4, 989.4, 66.9, 700, ("H100 SXM",)),
    GPU("H100 PCIe", 80, (9, 0), 756.5, 756.5, 51.2, 350),
    GPU("H200", 141, (9, 0), 989.4, 989.4, 66.9, 700),
    GPU("A100-SXM4-80GB", 80, (8, 0), 312.0, 312.0, 19.5, 400),
    GPU("A100-SXM4-40GB", 40, (8, 0), 312.0, 312.0, 19.5, 400),
    GPU("A100 80GB PCIe", 80, (8, 0), 312.0, 312.0, 19.5, 300),
    GPU("A100-PCIE-40GB", 40, (8, 0), 312.0, 312.0, 19.5, 250),
    GPU("RTX 4090", 24, (8, 9), 165.2, 165.2, 82.6, 450),
    GPU("RTX 4070 Ti SUPER", 16, (8, 9), 88.2, 88.2, 44.1, 285),
    GPU("RTX 4070 Ti", 12, (8, 9), 80.2, 80.2, 40.1, 285),
    GPU("RTX 3090", 24, (8, 6), 71.0, 71.0, 35.6, 350),
    GPU("RTX 3060", 12, (8, 6), 25.6, 25.6, 12.7, 170),
    # Before Ampere: no bf16 tensor cores (bf16 runs emulated); `auto` trains these in fp16 (Volta, Turing) or
    # fp32 (Pascal).
    GPU("TITAN RTX", 24, (7, 5), None, 130.5, 16.3, 280),
    GPU("RTX 2080 Ti", 11, (7, 5), None, 53.8, 13.4, 250),  # reference clocks (Founders Edition: 56.9, 14.2)
    # the 12 GB board (2176 CUDA cores; the 6 GB one has 1920)
    GPU("RTX 2060", 12, (7, 5), None, 28.7, 7.2, 184, ("RTX 2060 12GB",)),
    GPU("Tesla T4", 16, (7, 5), None, 65.0, 8.1, 70),
    GPU("V100-SXM2", 16, (7, 0), None, 125.0, 15.7, 300, ("V100-SXM2-16GB", "V100-SXM2-32GB")),  # same peaks
    GPU("V100-PCIE", 16, (7, 0), None, 112.0, 14.0, 250, ("V100-PCIE-16GB", "V100-PCIE-32GB")),
    GPU("GTX 1080 Ti", 11, (6, 1), None, None, 11.3, 250),
    GPU("TITAN Xp", 12, (6, 1), None, None, 12.1, 250),
)


def lookup_gpu(device_name: str) -> GPU | None:
    """The table's card whose name or alias is `device_name`, as torch reports it ("NVIDIA GeForce RTX 4070 Ti")
    or as a person writes it ("RTX 4070 Ti"); None for a card that is not in the table."""
    wanted = _bare_name(device_name)
    return next((gpu for gpu in GPUS if wanted in map(_bare_name, (gpu.name, *gpu.aliases))), None)


def _bare_name(name: str) -> str:
    """A GPU's name without the brand words torch puts before some of them, case and spacing aside."""
    return " ".join(word for word in name.lower().split() if word not in ("nvidia", "geforce", "tesla"))


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def peak_tflops(precision: str, override: float | None = None) -> float | None:
    """The device's dense peak in the precision a run computes in, for MFU: --peak-tflops if given, else the
    table; None when unknown (a CPU, a card not in the table)."""
    if override is not None:
        return override
    gpu = lookup_gpu(device_name())
    return gpu.peak_tflops(precision) if gpu and torch.cuda.is_available() else None


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


def reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS reading (VmHWM) anew from the current RSS; False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The kernel's peak RSS of this process since it started or since `reset_peak_rss` (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


def start_rss_rise() -> int | None:
    """Start measuring how far the RSS rises at its peak over a stretch of work (a checkpoint save, a resume's
    load): the kernel's peak reading reset, the RSS now as the base for `rss_rise`; None where it cannot be reset."""
    return psutil.Process().memory_info().rss if reset_peak_rss() else None


def rss_rise(base: int | None) -> int | None:
    """How far the RSS rose above `base` (from `start_rss_rise`) at its peak since; None where unmeasurable."""
    return None if base is None else peak_rss_bytes() - base


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
