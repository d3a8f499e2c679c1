"""The DeepSpeed JSON: load it, merge the command-line overrides into it, and validate the result.

The JSON is the single source of truth for ZeRO stage, offload, precision, batch sizes and optimizer
hyper-parameters. The few values a command line may change are merged in here, the merged config is checked
before DeepSpeed sees it (with errors that name the file and the field), and it is what gets logged and saved.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import sys
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

from pipeline.artifacts import nearest_existing
from pipeline.nvme import AUTO_KEYS, swap_folders
from pipeline.precision import precision_of
from pipeline.stage import PipelineError


def shipped(package: str, folder: str) -> Any:
    """A folder of the repository that a wheel carries inside the package (pyproject.toml maps ds_configs/ and
    the GPU-host measurements there), so that an installed onecard plans as the source tree does; in a source
    tree or an editable install, the folder itself."""
    try:
        return files(package)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / folder


CONFIGS = shipped("pipeline.ds_configs", "ds_configs")


def shipped_configs() -> list[Any]:
    """The DeepSpeed configs onecard ships (ds_configs/*.json), by name."""
    return sorted((p for p in CONFIGS.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)


def load_ds_config(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise PipelineError(
            f"cannot read the DeepSpeed config {path}: {error.strerror}. Pass one of ds_configs/*.json to --deepspeed."
        ) from error
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise PipelineError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}. "
            "Fix the file (DeepSpeed configs are plain JSON: no comments, no trailing commas)."
        ) from error
    if not isinstance(config, dict):
        raise PipelineError(f"{path} must hold a JSON object, not a {type(config).__name__}.")
    return config


def offload_devices(ds: dict[str, Any]) -> tuple[str, str]:
    """(parameter offload device, optimizer offload device): each 'none', 'cpu' or 'nvme'."""
    zero = ds.get("zero_optimization", {})
    return (zero.get("offload_param", {}).get("device", "none"),
            zero.get("offload_optimizer", {}).get("device", "none"))


def describe(ds: dict[str, Any]) -> str:
    params, optimizer = offload_devices(ds)
    world = ds["train_batch_size"] // (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"])
    return (f"ZeRO-{ds.get('zero_optimization', {}).get('stage', 0)}, parameters on {_place(params)}, optimizer on "
            f"{_place(optimizer)}, {precision_of(ds)}, batch {ds['train_micro_batch_size_per_gpu']} per rank x "
            f"{ds['gradient_accumulation_steps']} accumulation x {world} ranks = {ds['train_batch_size']} sequences")


def _place(device: str) -> str:
    return {"none": "the accelerator", "cpu": "CPU", "nvme": "NVMe"}[device]


# Where a config may say "auto": the precision, which pipeline.precision settles by the hardware, and the NVMe
# parameter buffers, which pipeline.nvme derives from the model.
AUTO_ALLOWED = ("bf16.enabled", "fp16.enabled", *AUTO_KEYS)


def _find_auto(value: Any, where: str = "") -> str | None:
    if value == "auto" and where not in AUTO_ALLOWED:
        return where or "(top level)"
    if isinstance(value, dict):
        for key, item in value.items():
            if found := _find_auto(item, f"{where}.{key}" if where else key):
                return found
    return None


def merge_ds_config(
    ds: dict[str, Any],
    source: Path | str,
    *,
    world_size: int,
    data_dir: Path,
    run: str,
    nvme_path: str | None = None,
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    lr: float | None = None,
) -> dict[str, Any]:
    """The config DeepSpeed will run: `ds` with the command-line values merged in, validated.

    NVMe swap files go to `<nvme_path>/<run>` (--nvme-path, else the JSON's), where a relative nvme_path is
    taken under the data directory: they follow --data-dir, and two runs never share them.
    """
    ds = copy.deepcopy(ds)
    if where := _find_auto(ds):
        raise PipelineError(
            f"{source}: {where} is \"auto\". That is a Hugging Face Trainer placeholder, which onecard takes only "
            f"for the precision and the NVMe parameter buffers ({', '.join(AUTO_ALLOWED)}); give a value (or leave "
            "the key out)."
        )
    if micro_batch_size is not None:
        ds["train_micro_batch_size_per_gpu"] = micro_batch_size
    if grad_accum is not None:
        ds["gradient_accumulation_steps"] = grad_accum
    if "optimizer" not in ds:
        raise PipelineError(
            f"{source} has no \"optimizer\" section. onecard lets DeepSpeed build the optimizer (so it can be "
            'offloaded); add e.g. {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.1}}.'
        )
    if lr is not None:
        ds["optimizer"].setdefault("params", {})["lr"] = lr
    _check_batch(ds, source, world_size)
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise PipelineError(f"{source}: zero_optimization.stage is {zero.get('stage')!r}; it must be 0, 1, 2 or 3.")
    for key in ("offload_param", "offload_optimizer"):
        offload = zero.get(key, {})
        if offload.get("device") == "nvme":
            path = Path(nvme_path or offload.get("nvme_path") or "nvme")
            offload["nvme_path"] = str((path if path.is_absolute() else data_dir / path) / run)
    return ds


def _check_batch(ds: dict[str, Any], source: Path | str, world_size: int) -> None:
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.setdefault("gradient_accumulation_steps", 1)
    for name, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PipelineError(
                f"{source}: {name} is {value!r}; it must be a positive integer (set it in the JSON, or with "
                "--micro-batch-size / --grad-accum)."
            )
    expected = micro * accum * world_size
    given = ds.get("train_batch_size")
    if given is not None and given != expected:
        raise PipelineError(
            f"{source}: train_batch_size is {given}, but train_micro_batch_size_per_gpu {micro} x "
            f"gradient_accumulation_steps {accum} x {world_size} rank(s) = {expected}. Remove train_batch_size "
            "from the JSON (onecard computes it) or make the three agree for this world size."
        )
    ds["train_batch_size"] = expected


def check_nvme(ds: dict[str, Any]) -> None:
    """Before anything is allocated or written: NVMe offload needs libaio, and a swap folder that can be made and
    written (probed in its nearest existing parent)."""
    folders = swap_folders(ds)
    if not folders:
        return
    _check_cuda_arch_list()
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        raise PipelineError(
            "NVMe offload needs DeepSpeed's async_io op, which needs libaio: install it with "
            "`sudo apt-get install libaio-dev` (or set CFLAGS/LDFLAGS to a libaio you built), or pick a config "
            "without NVMe offload such as ds_configs/zero3_offload.json."
        )
    for folder in folders:
        existing = nearest_existing(folder)  # probed where it would be made: nothing is created before the preflight
        try:
            if not existing.is_dir():
                raise NotADirectoryError(20, "Not a directory")
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".probe-"):
                pass
        except OSError as error:
            raise PipelineError(
                f"the NVMe swap folder {folder} is not writable ({error.strerror}). Point --nvme-path at a "
                "writable folder on a fast local disk (a relative path is taken under the data directory)."
            ) from error


def _check_cuda_arch_list() -> None:
    """NVMe offload JIT-builds DeepSpeed's async_io op, whose builder reads TORCH_CUDA_ARCH_LIST as plain
    `major.minor[+PTX]` entries and dies on an arch-specific one such as `9.0a` (which some CUDA images set):
    `ValueError: invalid literal for int() with base 10: '0a'`, after the model is built."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    entries = [entry for entry in re.split(r"[;\s]+", value) if entry]
    unparsable = [entry for entry in entries if not re.fullmatch(r"\d+\.\d+(\+PTX)?", entry)]
    if unparsable:
        raise PipelineError(
            f"TORCH_CUDA_ARCH_LIST={value!r} has {', '.join(map(repr, unparsable))}, which DeepSpeed's op builder "
            "cannot parse when it builds the async_io op that NVMe offload needs. Set it to plain compute "
            "capabilities (e.g. TORCH_CUDA_ARCH_LIST=8.9 for an RTX 40-series card, 9.0 for an H100) or unset it."
        )


def build_ops() -> dict[str, tuple[float, bool]]:
    """Build (once per machine) every DeepSpeed op the shipped configs load: CPU Adam, async I/O for NVMe offload
    where libaio is there, and on a CPU accelerator its shared-memory communication op. `make install` runs this,
    so that no training run pays minutes of compilation at its first start (async I/O alone took 5 minutes on a
    2-core machine). {op: (seconds, whether it was built now)}."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder import AsyncIOBuilder

    names = ["CPUAdamBuilder"] + (["AsyncIOBuilder"] if AsyncIOBuilder().is_compatible(verbose=False) else [])
    return _load_ops(names + (["ShareMemCommBuilder"] if get_accelerator().device_name() == "cpu" else []))


def load_ops(ds: dict[str, Any]) -> dict[str, tuple[float, bool]]:
    """Load (JIT-building the first time) the DeepSpeed ops this config needs before the engine does, so that
    their time is known: {op: (seconds, whether it was built now)}. A build is paid once per machine; a load
    at every start."""
    params_device, optimizer_device = offload_devices(ds)
    return _load_ops((["CPUAdamBuilder"] if optimizer_device != "none" else [])
                     + (["AsyncIOBuilder"] if "nvme" in (params_device, optimizer_device) else []))


def use_this_environments_ninja() -> None:
    """Put this interpreter's `ninja` first on PATH. DeepSpeed builds its ops with whichever ninja PATH finds
    first, and a ninja of another version than the one that built them rebuilds them all (minutes): a venv's
    python started without activating the venv would otherwise take the system's ninja, and rebuild again
    whenever the other one runs."""
    tools = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (tools / "ninja").exists() and not path.startswith(f"{tools}{os.pathsep}"):
        os.environ["PATH"] = f"{tools}{os.pathsep}{path}"


def ask_for_the_cpu_once() -> None:
    """Make py-cpuinfo's get_cpu_info answer once per process. It starts a Python subprocess at every call (1.5 s on
    a 2-core machine), and DeepSpeed calls it three times in every start on the CPU (its op builders' CPU checks,
    then CPU Adam's constructor), and again for every engine a process builds."""
    import cpuinfo

    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


def _load_ops(names: list[str]) -> dict[str, tuple[float, bool]]:
    import time

    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    use_this_environments_ninja()
    ask_for_the_cpu_once()
    loaded = {}
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        library = Path(_get_build_directory(builder.name, verbose=False)) / f"{builder.name}.so"
        before = library.stat().st_mtime_ns if library.exists() else None
        started = time.perf_counter()
        builder.load(verbose=False)
        loaded[builder.name] = (time.perf_counter() - started, library.stat().st_mtime_ns != before)
    return loaded
