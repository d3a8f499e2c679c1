"""The command lines: every stage runs as `python -m pipeline.<stage>`, and user errors exit cleanly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env


def python(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(data_dir), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("stage", ["download", "tokenize", "shard", "evaluate"])
def test_every_stage_has_a_command_line(stage: str, tmp_path: Path) -> None:
    result = python(tmp_path, "-m", f"pipeline.{stage}", "--help")
    assert result.returncode == 0 and "--data-dir" in result.stdout and "--force" in result.stdout


def test_train_entry_point_shows_its_options(tmp_path: Path) -> None:
    result = python(tmp_path, "launch/train.py", "--help")
    assert result.returncode == 0
    for option in ("--deepspeed", "--preset", "--max-steps", "--micro-batch-size", "--precision", "--nvme-path"):
        assert option in result.stdout


def test_a_user_error_is_one_clear_line_and_exit_code_2(tmp_path: Path) -> None:
    result = python(tmp_path, "-m", "pipeline.shard", "--corpus", "books")
    assert result.returncode == 2
    assert "tokens/books/manifest.json is missing" in result.stderr and "make tokenize" in result.stderr
    assert "Traceback" not in result.stderr
    result = python(tmp_path, "launch/train.py", "--deepspeed", "nowhere.json")
    assert result.returncode == 2 and "Traceback" not in result.stderr
