"""The trainer's process group: joining it, agreeing across ranks, and stopping cleanly on a signal."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch

from pipeline.dsconfig import ask_for_the_cpu_once, use_this_environments_ninja

log = logging.getLogger("onecard")
LAUNCHER = "deepspeed.launcher.launch"
T = TypeVar("T")
SHARED_MEMORY = Path("/dev/shm")


def init_distributed() -> None:
    """Join the process group set up by the deepspeed launcher, or form a group of one without it."""
    import deepspeed

    use_this_environments_ninja()  # before DeepSpeed loads its communication op
    ask_for_the_cpu_once()
    if "RANK" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(verbose=False)
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))  # each rank's own GPU before its first collective
    release_shared_memory_name()


def shared_memory_segment(rank: int) -> Path:
    """Where DeepSpeed's CPU collectives put a rank's shared-memory workspace (ops/csrc/cpu/comm/shm.cpp names it
    after the user, the rendezvous address and port, and the rank)."""
    return SHARED_MEMORY / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shared_memory_name() -> None:
    """Unlink this rank's shared-memory workspace once every rank has mapped it. Under the launcher (which sets
    LOCAL_SIZE) DeepSpeed's CPU communication op creates one 66 MiB file per rank in /dev/shm and never removes
    it, so each run left memory behind that the kernel cannot reclaim until a reboot (a test suite's worth of
    runs left a 24 GB machine 0.9 GiB). The mappings stay valid until the process exits; only the names go."""
    from deepspeed import comm as dist

    if dist.get_world_size() > 1:
        dist.barrier()  # every rank has opened every other rank's segment: its name is no longer needed
    shared_memory_segment(dist.get_rank()).unlink(missing_ok=True)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a device tensor (one collective), on the host."""
    from deepspeed import comm as dist

    dist.all_reduce(values)
    return values.cpu()


def any_rank(condition: bool) -> bool:
    """Whether the condition holds on any rank. A collective: every rank must call it, and all get the same
    answer, so they take the same branch and none is left waiting in the next collective."""
    from deepspeed.accelerator import get_accelerator

    flag = torch.tensor([float(condition)], device=get_accelerator().current_device_name())
    return bool(all_reduce_sum(flag)[0] > 0)


def every_rank(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank. A collective, like any_rank."""
    from deepspeed import comm as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def under_deepspeed_launcher() -> bool:
    parent = psutil.Process().parent()
    return parent is not None and LAUNCHER in " ".join(parent.cmdline())


def launch_time() -> float:
    """When the user's command started: the `deepspeed` runner that started this process's launcher, else this
    process (so that start-up times include the launcher's own imports)."""
    started = psutil.Process().create_time()
    for ancestor in psutil.Process().parents():
        try:
            if "deepspeed" not in " ".join(ancestor.cmdline()):
                break
            started = ancestor.create_time()
        except psutil.Error:
            break
    return started


class StopSignal:
    """SIGTERM or SIGINT (preemption, Ctrl-C): the first lets the current step finish, then the run saves a
    checkpoint and exits 0; a second stops the process at once (a checkpoint becomes `latest` only once
    complete, so nothing half-written is ever taken for one). Under the deepspeed launcher the ranks leave
    SIGINT to the launcher, which passes Ctrl-C on to them as SIGTERM."""

    def __init__(self, launched: bool) -> None:
        self.received: str | None = None
        self._signals = [signal.SIGTERM] + ([] if launched else [signal.SIGINT])
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self._signals}
            if launched:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if signal.SIGINT in self._signals:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)", self.received)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
