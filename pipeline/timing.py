"""Clocks for the trainer: the phases of a step on the device's own clock, and where start-up time goes."""

from __future__ import annotations

import time
from collections import defaultdict
from itertools import pairwise
from typing import Any

import torch


class PhaseTimer:
    """Seconds per phase of a step, without making the host wait for the device: on a GPU each mark is a CUDA
    event recorded in the stream, and the events are read once, by `seconds()`, after the step's one sync. On a
    CPU, where the work is done when the call returns, the wall clock is the device's clock."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[tuple[str, Any]] = []

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.marks = [("start", self._now())]

    def mark(self, phase: str) -> None:
        """The time since the previous mark was spent in `phase`."""
        self.marks.append((phase, self._now()))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase since `start()`; on a GPU this waits for the last mark's event."""
        if self.cuda:
            self.marks[-1][1].synchronize()
        totals: dict[str, float] = defaultdict(float)
        for (_, begin), (phase, end) in pairwise(self.marks):
            totals[phase] += begin.elapsed_time(end) / 1000 if self.cuda else end - begin
        return dict(totals)


class StartupClock:
    """Where the seconds before the first step go: laps from `started` (the user's command, launcher included),
    with one-time op builds kept apart so that the start-up a resumed run pays again is visible."""

    def __init__(self, started: float, imported: float) -> None:
        self.started = started
        self.laps: dict[str, float] = {"launch and imports": imported - started}
        self._last = imported
        self.excluded = 0.0

    def lap(self, name: str, excluded: float = 0.0) -> None:
        """The time since the previous lap was spent on `name`, less `excluded` seconds (op builds)."""
        now = time.time()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last - excluded
        self.excluded += excluded
        self._last = now

    def total(self) -> float:
        """Seconds from the command's start to the last lap, op builds excluded."""
        return self._last - self.started - self.excluded

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.1f}" for name, seconds in self.laps.items())
