"""kill -9 at random moments, then the same command again: does every job finish with the result of an
uninterrupted run, and is no artifact that looks complete ever partial?

    python bench/kill_bench.py --trials 24 --source ../shared/data/gutenberg \
        --tokenizer ../shared/data/gpt2-tokenizer --out docs/bench/kill-resume.json

Each trial picks a target in turn — the download, tokenize or shard stage, training, a checkpoint being
written, or training with the parameters and optimizer swapped to NVMe (zero3_nvme: the kill lands mid-swap) —
starts it as a user would (`python -m pipeline.<stage>`, `python launch/train.py`), kills it with
SIGKILL at a random moment (a data stage: while it writes its output; training: a random fraction into a
random step; a checkpoint write: as soon as its folder appears), checks what is on disk, and runs the same
command again until it succeeds. Then it compares with a reference run made without any
kill: the data stages' files byte for byte (by their manifests' sha256), training's loss at every step and
its final weights exactly (fp32 on CPU). An artifact counts as corrupt when its manifest (or `latest`) says it
is complete but its files do not match.
"""

from __future__ import annotations

import json
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import REPO

from pipeline.artifacts import read_manifest, verify_files
from pipeline.checkpoint import latest_tag, load_weights, tag_for
from pipeline.metrics import read_metrics
from pipeline.stage import PipelineError, parse_config

TARGETS = ("download", "tokenize", "shard", "train", "checkpoint", "nvme")
STAGE_OF = {"download": "raw", "tokenize": "tokens", "shard": "shards"}
# The training targets' config and run name: `train` and `checkpoint` share their reference run.
TRAIN_RUNS = {"train": ("zero2_offload", "kill"), "checkpoint": ("zero2_offload", "kill"),
              "nvme": ("zero3_nvme", "kill-nvme")}
TRAIN_FLAGS = ["--seq-len", "64", "--micro-batch-size", "4", "--precision", "fp32", "--lr", "2e-3",
               "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0"]


@dataclass
class KillConfig:
    trials: int = field(default=20, metadata={"help": "number of kill-and-resume trials"})
    targets: str = field(default=",".join(TARGETS), metadata={"help": "what to kill, in turn (comma-separated)"})
    source: str = field(default="builtin", metadata={"help": "download --source for the data stages"})
    tokenizer: str = field(default="bpe:1024", metadata={"help": "tokenize --tokenizer"})
    train_steps: int = field(default=16, metadata={"help": "steps of the training trials"})
    checkpoint_every: int = field(default=2, metadata={"help": "checkpoint interval of the training trials"})
    seed: int = field(default=0, metadata={"help": "seeds the kill moments"})
    work: Path = field(default=Path("/tmp/onecard-kill-bench"), metadata={"help": "scratch folder"})
    out: Path = field(default=Path("kill-resume.json"), metadata={"help": "where the JSON record goes"})


def stage_command(target: str, config: KillConfig, data_dir: Path) -> list[str]:
    flags = {"download": ["--source", config.source, "--corpus", "corpus"],
             "tokenize": ["--corpus", "corpus", "--tokenizer", config.tokenizer],
             "shard": ["--corpus", "corpus"]}
    if target in flags:
        return [sys.executable, "-m", f"pipeline.{target}", "--data-dir", str(data_dir), *flags[target]]
    ds_config, run = TRAIN_RUNS[target]
    return [sys.executable, "launch/train.py", "--data-dir", str(data_dir), "--corpus", "corpus", "--deepspeed",
            f"ds_configs/{ds_config}.json", "--run", run, *TRAIN_FLAGS, "--max-steps", str(config.train_steps),
            "--checkpoint-every", str(config.checkpoint_every)]


def building(data_dir: Path, target: str) -> bool:
    """Whether a data stage has started writing its output (its hidden `.partial` folder exists)."""
    return (data_dir / STAGE_OF[target] / ".corpus.partial").is_dir()


def work_seconds(command: list[str], data_dir: Path, target: str) -> float:
    """Seconds a data stage spends writing its output in an uninterrupted run (from its `.partial` folder's
    appearance to its exit): the window its kills are aimed at, rather than the Python start-up."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not building(data_dir, target):
        time.sleep(0.002)
    started = time.perf_counter()
    if process.wait() != 0:
        raise SystemExit(f"{shlex.join(command)} failed")
    return time.perf_counter() - started


def run_to_end(command: list[str], attempts: int = 5) -> float:
    """Run a command until it succeeds (a stage that was killed may need one more go); its last duration."""
    for _ in range(attempts):
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if finished.returncode == 0:
            return time.perf_counter() - started
    raise SystemExit(f"{shlex.join(command)} keeps failing:\n{finished.stdout[-2000:]}{finished.stderr[-2000:]}")


def prepare(config: KillConfig, folder: Path, upto: str) -> Path:
    """A data directory with every stage before `upto` done (copied from the reference)."""
    data_dir = folder / "data"
    reference = config.work / "reference" / "data"
    order = ["download", "tokenize", "shard", "train"]
    for stage in order[: order.index(upto if upto in order else "train")]:
        for sub in [STAGE_OF[stage]] + (["tokenizer"] if stage == "tokenize" else []):
            shutil.copytree(reference / sub, data_dir / sub, dirs_exist_ok=True)
    return data_dir


def kill_when(process: subprocess.Popen, target: str, data_dir: Path, moment: float, step_seconds: float) -> bool:
    """SIGKILL the process at `moment`: for a data stage, seconds after it starts writing; for training, a step
    (the kill falls a random fraction of a step after that step is logged: of 0.1 s, or with NVMe of the step's
    `step_seconds`, so that it lands anywhere in the next step's swapping); for a checkpoint write, the step
    whose checkpoint is hit as soon as its folder appears, before `latest` names it. Whether it was killed
    (it may have finished first)."""
    if target in STAGE_OF:
        while process.poll() is None and not building(data_dir, target):
            time.sleep(0.002)
    started = time.perf_counter()
    run = TRAIN_RUNS.get(target, (None, "kill"))[1]
    ckpt_dir = data_dir / "checkpoints" / run
    while process.poll() is None:
        if target in STAGE_OF and time.perf_counter() - started >= moment:
            break
        if target in ("train", "nvme") and len(read_metrics(data_dir / "runs" / run)) >= int(moment):
            time.sleep((moment % 1) * (step_seconds if target == "nvme" else 0.1))
            break
        if target == "checkpoint" and (ckpt_dir / tag_for(int(moment))).is_dir():
            try:
                if latest_tag(ckpt_dir) != tag_for(int(moment)):
                    break
            except PipelineError:
                break
        time.sleep(0.002)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    return process.wait() == -signal.SIGKILL


def partial_state(data_dir: Path) -> list[str]:
    """What the kill left half-done: stage outputs still being built, checkpoints not (yet) `latest`, NVMe swap
    files (which the next start replaces)."""
    found = [str(p.relative_to(data_dir)) for p in sorted(data_dir.glob("*/.*.partial"))]
    for ckpt_dir in sorted((data_dir / "checkpoints").glob("*")):
        try:
            current = latest_tag(ckpt_dir)
        except PipelineError as error:
            return [*found, f"latest unreadable: {error}"]
        found += [f"checkpoints/{ckpt_dir.name}/{p.name} (not latest)" for p in sorted(ckpt_dir.glob("step_*"))
                  if current is None or p.name > current]
    return found + [f"{p.relative_to(data_dir)} (NVMe swap)" for p in sorted((data_dir / "nvme").glob("*"))]


def corrupt_outputs(data_dir: Path) -> list[str]:
    """Outputs that say they are complete (a manifest, a `latest`) but whose files do not match: every stage
    output, the run's manifest, every checkpoint that has a manifest, and the one `latest` names."""
    problems = []
    for manifest in sorted([*data_dir.glob("*/*/manifest.json"), *data_dir.glob("checkpoints/*/step_*/manifest.json")]):
        folder = manifest.parent
        try:
            verify_files(folder, read_manifest(folder, json.loads(manifest.read_text())["stage"]))
        except (PipelineError, ValueError, KeyError) as error:
            problems.append(f"{folder}: {error}")
    for ckpt_dir in sorted((data_dir / "checkpoints").glob("*")):
        try:
            if latest_tag(ckpt_dir) is not None:
                load_weights(ckpt_dir)
        except PipelineError as error:
            problems.append(f"{ckpt_dir}: {error}")
    return problems


def stage_files(data_dir: Path, target: str) -> list[tuple[str, int, str]]:
    folder = data_dir / STAGE_OF[target] / "corpus"
    return sorted((f["path"], f["bytes"], f["sha256"]) for f in read_manifest(folder, target)["files"])


def training_result(data_dir: Path, run: str) -> tuple[list[tuple[int, float]], dict[str, Any]]:
    metrics = [(m["step"], m["loss"]) for m in read_metrics(data_dir / "runs" / run)]
    return metrics, load_weights(data_dir / "checkpoints" / run)[1]


def same_training(a: tuple[list, dict], b: tuple[list, dict]) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(a[1][k].equal(b[1][k]) for k in a[1])


def main() -> None:
    config = parse_config(KillConfig, sys.argv[1:])
    rng = random.Random(config.seed)
    shutil.rmtree(config.work, ignore_errors=True)
    reference = config.work / "reference" / "data"
    durations = {target: work_seconds(stage_command(target, config, reference), reference, target)
                 for target in STAGE_OF}
    expected_training = {}
    for target in dict.fromkeys(t for t in config.targets.split(",") if t in TRAIN_RUNS):
        run = TRAIN_RUNS[target][1]
        if run not in expected_training:
            durations[run] = run_to_end(stage_command(target, config, reference))
            expected_training[run] = training_result(reference, run)
    step_seconds = {run: statistics.median(m["step_seconds"] for m in read_metrics(reference / "runs" / run))
                    for run in expected_training}
    trials = []
    for number in range(config.trials):
        targets = config.targets.split(",")
        target = targets[number % len(targets)]
        if target in STAGE_OF:
            moment = rng.uniform(0.0, 0.95) * durations[target]
        elif target in ("train", "nvme"):
            moment = rng.randrange(1, config.train_steps) + rng.random()
        else:
            moment = rng.randrange(config.checkpoint_every, config.train_steps + 1, config.checkpoint_every)
        # A data stage may finish before a moment late in its window (its reference run was slower: the first to
        # run on a cold machine); it is started anew with the moment halved, so that every trial is a kill.
        for _ in range(4):
            shutil.rmtree(config.work / f"trial{number:03d}", ignore_errors=True)
            data_dir = prepare(config, config.work / f"trial{number:03d}", target)
            command = stage_command(target, config, data_dir)
            process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            run = TRAIN_RUNS.get(target, (None, ""))[1]
            killed = kill_when(process, target, data_dir, moment, step_seconds.get(run, 0.0))
            if killed or target not in STAGE_OF:
                break
            moment /= 2
        corrupt, partial = corrupt_outputs(data_dir), partial_state(data_dir)
        run_to_end(command)
        if target in STAGE_OF:
            identical = stage_files(data_dir, target) == stage_files(reference, target)
        else:
            run = TRAIN_RUNS[target][1]
            identical = same_training(training_result(data_dir, run), expected_training[run])
        trials.append({"target": target, "killed": killed, "moment": round(moment, 3),
                       "left_partial": partial,
                       "identical": identical, "corrupt": corrupt})
        print(f"trial {number}: {target} killed at {moment:.2f}, leaving {partial or 'nothing partial'}: "
              f"{'identical' if identical else 'DIFFERENT'}{', CORRUPT ' + str(corrupt) if corrupt else ''}",
              file=sys.stderr, flush=True)
        shutil.rmtree(config.work / f"trial{number:03d}", ignore_errors=True)
    record = {
        "benchmark": "kill-resume", "trials": len(trials), "resumed_identical": sum(t["identical"] for t in trials),
        "corrupt_artifacts": sum(bool(t["corrupt"]) for t in trials),
        "command": shlex.join(["python", "bench/kill_bench.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d"),
        "reference_seconds": {k: round(v, 2) for k, v in durations.items()},  # data stages: writing only
        "per_trial": trials,
    }
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "per_trial"}, indent=2))


if __name__ == "__main__":
    main()
