"""`make run`: the five stages end to end on the embedded default corpus, through the Makefile."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

from pipeline.precision import detect
from pipeline.stage import DataDir

pytestmark = pytest.mark.slow  # trains with a DeepSpeed engine: left out of `make test-fast`

STAGE_OUTPUTS = ["raw/builtin", "tokenizer/builtin-bpe4096", "tokens/builtin", "shards/builtin",
                 "checkpoints/{run}", "eval/{run}", "export/{run}"]
SETTINGS = ("STEPS=12",
            "TRAIN_ARGS=--seq-len 64 --micro-batch-size 4 --checkpoint-every 6 --lr 3e-3 --eval-tokens 8192",
            "EVAL_ARGS=--eval-tokens 8192")


def make(data_dir: Path, *args: str, dry_run: bool = False) -> subprocess.CompletedProcess:
    env = {**subprocess_env(data_dir), "VIRTUAL_ENV": sys.prefix}  # use this environment, do not make a venv
    command = ["make", *(["-n"] if dry_run else []), *args, f"DATA={data_dir}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def files_outside(data_dir: Path) -> dict[str, int]:
    """Every file of the project tree and beside the data directory, with its modification time — what a stage
    must not touch (the project's environment, caches and the data directory itself left out)."""
    skip = {".git", ".venv", "data", "__pycache__", ".pytest_cache", ".ruff_cache", "onecard.egg-info"}
    files = [p for p in REPO.rglob("*") if not skip & set(p.relative_to(REPO).parts)]
    files += [p for p in data_dir.parent.rglob("*") if data_dir not in (p, *p.parents)]
    return {str(p): p.stat().st_mtime_ns for p in files if p.is_file()}


@pytest.fixture(scope="module")
def made_and_outside(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int], dict[str, int]]:
    data_dir = tmp_path_factory.mktemp("make-run") / "data"
    before = files_outside(data_dir)
    result = make(data_dir, "run", *SETTINGS)
    (data_dir / "console.txt").write_text(result.stdout + result.stderr)
    return data_dir, before, files_outside(data_dir)


def test_the_console_shows_what_a_person_reads(made: Path) -> None:
    """The plan of the run, the steps, the result; the merged config and library warnings go to train.log."""
    console = (made / "console.txt").read_text()
    lines = [line for line in console.replace("\r", "\n").splitlines() if line.strip()]
    progress = [line for line in lines if re.search(r"\[\d\d:\d\d[,<]", line)]  # bar frames, "[00:02, 50kB/s]"
    assert len(lines) - len(progress) < 60, console
    assert "val loss" in console and "untrained model" in console and "start-up" in console
    # the shipped config says "auto": the precision this machine computes fastest in, and why
    assert f"precision {detect()}" in console
    for noise in ("merged config", "FutureWarning", "attention_mask", "[launch.py", "[INFO] [runner.py"):
        assert noise not in console, noise
    train_log = (made / "runs" / run_of(made) / "train.log").read_text()
    assert "merged config" in train_log and "step 12/12" in train_log


@pytest.fixture(scope="module")
def made(made_and_outside: tuple[Path, dict[str, int], dict[str, int]]) -> Path:
    return made_and_outside[0]


def test_no_stage_writes_outside_the_data_directory(made_and_outside: tuple[Path, dict[str, int], dict[str, int]]
                                                     ) -> None:
    _, before, after = made_and_outside
    assert after == before


def run_of(data_dir: Path) -> str:
    """The run `make run` made: builtin-tiny-zero3_offload-<the day it started>."""
    return DataDir(data_dir).default_run("builtin", "tiny", "ds_configs/zero3_offload.json")


def test_make_run_builds_every_stage_and_learns(made: Path) -> None:
    run = run_of(made)
    assert (made / "checkpoints" / run).is_dir()
    for folder in STAGE_OUTPUTS:
        manifest = json.loads((made / folder.format(run=run) / "manifest.json").read_text())
        assert manifest["files"], folder
    report = json.loads((made / "eval" / run / "report.json").read_text())
    assert report["step"] == 12
    assert report["val_loss"] < report["start_val_loss"] - 1.0
    assert list((made / "runs" / run).glob("events.out.tfevents.*"))


def test_second_make_run_changes_nothing(made: Path) -> None:
    def snapshot() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in made.rglob("*") if p.is_file() and "runs" not in p.parts}

    before = snapshot()
    result = make(made, "run", *SETTINGS)
    assert snapshot() == before
    assert result.stderr.count("is up to date, skipping") == 6  # raw, tokenizer, tokens, shards, eval, export
    assert "already trained to step 12" in result.stderr


def test_make_train_runs_whatever_upstream_stage_is_missing(made: Path, tmp_path: Path) -> None:
    fresh = make(tmp_path / "empty", "train", dry_run=True).stdout
    order = [fresh.find(f"pipeline.{stage}") for stage in ("download", "tokenize", "shard")] + [
        fresh.find("launch/train.py")]
    assert -1 not in order and order == sorted(order), fresh
    os.rename(made / "shards", tmp_path / "shards-moved")
    try:
        partial = make(made, "train", dry_run=True).stdout
    finally:
        os.rename(tmp_path / "shards-moved", made / "shards")
    assert "pipeline.shard" in partial and "launch/train.py" in partial
    assert "pipeline.download" not in partial and "pipeline.tokenize" not in partial


def test_tensorboard_is_served_on_localhost_only(tmp_path: Path) -> None:
    command = make(tmp_path / "data", "tensorboard", dry_run=True).stdout
    assert "tensorboard --logdir" in command and "--host 127.0.0.1" in command
