"""Training metrics: TensorBoard event files plus a `metrics.jsonl` line per step, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# TensorBoard's "Custom Scalars" tab: memory and throughput side by side, each chart several curves.
OVERVIEW = {"memory and throughput": {
    "loss (train, validation)": ["Multiline", ["train/loss", "eval/val_loss"]],
    "tokens/s": ["Multiline", ["train/tokens_per_second"]],
    "MFU": ["Multiline", ["train/mfu"]],
    "step time split (s)": ["Multiline", [r"train/(step|forward|backward|optimizer|data_wait)_seconds"]],
    "GPU memory (GiB): reserved, NVML": ["Multiline", [r"train/(peak_)?gpu_\w+_gib"]],
    "host RSS (GiB)": ["Multiline", [r"train/(peak_)?host_rss_gib"]],
}}


class Metrics:
    """Scalars per step into `runs/<run>/`. On resume, everything logged after the resumed step is dropped
    (those steps are about to be trained again), so curves never hold two values for one step."""

    def __init__(self, log_dir: Path, enabled: bool, start_step: int) -> None:
        self.enabled = enabled
        self.path = Path(log_dir) / "metrics.jsonl"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        kept = [line for line in self._lines() if (record := _parse(line)) and record["step"] <= start_step]
        self.path.write_text("".join(kept))
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
        self.writer.add_custom_scalars(OVERVIEW)
        self.file = open(self.path, "a")

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines(keepends=True) if self.path.exists() else []

    def log(self, step: int, scalars: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        values = {name: float(value) for name, value in scalars.items() if value is not None}
        for name, value in values.items():  # "group/name" keeps its group, anything else is train/
            self.writer.add_scalar(name if "/" in name else f"train/{name}", value, step)
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.file.close()


def _parse(line: str) -> dict[str, Any] | None:
    """One metrics line; None for the cut-off last line of a process that was killed while writing it."""
    try:
        return json.loads(line) if line.endswith("\n") else None
    except json.JSONDecodeError:
        return None


def read_metrics(log_dir: Path) -> list[dict[str, Any]]:
    path = Path(log_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [record for line in path.read_text().splitlines(keepends=True) if (record := _parse(line))]
