"""The evaluation report a person reads: `report.md` with the numbers and `loss.png`, drawn from the run's
TensorBoard events (the same curves `make tensorboard` shows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CURVES = {"train/loss": "training loss", "eval/val_loss": "validation loss (during training)"}


def read_curves(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of each curve in CURVES that the run's event files hold; the last write of a step wins,
    as after a resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, dict[int, float]] = {}
    for events in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in set(CURVES) & set(accumulator.Tags()["scalars"]):
            curves.setdefault(tag, {}).update((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(points.items()) for tag, points in curves.items()}


def plot_loss(curves: dict[str, list[tuple[int, float]]], final: tuple[int, float] | None, path: Path,
              title: str) -> bool:
    """Draw the loss curves into a PNG; False when there is nothing to draw."""
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for tag, points in curves.items():
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, label=CURVES[tag], marker="o" if len(points) < 20 else None)
    if final is not None:
        axes.scatter([final[0]], [final[1]], color="black", zorder=3, label="validation loss (evaluate)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def markdown(report: dict[str, Any], plot: str | None) -> str:
    rows = [
        ("checkpoint", f"{report['checkpoint']} (step {report['step']}, {report['tokens_seen']:,} tokens seen)"),
        ("validation loss", f"{report['val_loss']:.4f} (perplexity {report['val_perplexity']:.2f}) over "
                            f"{report['eval_tokens']:,} tokens"),
        (report["start"], f"{report['start_val_loss']:.4f} (perplexity {report['start_val_perplexity']:.2f})"),
        ("exported model", f"{report['export_val_loss']:.4f}"),
    ]
    text = report.get("eval_text")
    if text:
        rows.append((f"held-out text `{Path(text['path']).name}`",
                     f"{text['loss']:.4f} (perplexity {text['perplexity']:.2f}, {text['bits_per_byte']:.3f} bits/byte) "
                     f"over {text['tokens']:,} tokens, window {text['window']}, stride {text['stride']}"))
    for name, scores in report.get("benchmarks", {}).items():
        numbers = ", ".join(f"{metric} {value:.4f}" for metric, value in scores.items() if metric != "items")
        rows.append((f"{name} (zero-shot)", f"{numbers} on {scores['items']:,} items"))
    rows += [("tokenizer", f"{report['tokenizer']['name']} (tokenizer.json sha256 {report['tokenizer_sha256'][:16]}…)"),
             ("data", f"shards manifest sha256 {report['shards'][:16]}…")]
    lines = [f"# Evaluation of run `{report['run']}`", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    if plot:
        lines += ["", f"![loss curves]({plot})"]
    lines += ["", "## Samples", ""]
    for sample in report["samples"]:
        lines += [f"**{sample['prompt']}**", "", "```", sample["text"], "```", ""]
    return "\n".join(lines)
