"""The command lines: every stage runs as `python -m pipeline.<stage>`, and user errors exit cleanly."""

from __future__ import annotations

import re
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
    text = " ".join(result.stdout.split())
    assert not re.search(r"\(default: [^)]*\) \(default:", text)  # a help that states its default gets no second


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


def test_onecard_command_runs_the_planner_and_the_stages(tmp_path: Path) -> None:
    onecard = Path(sys.executable).with_name("onecard")  # the console script of this install
    result = subprocess.run([str(onecard), "plan", "--preset", "gpt2", "--gpu", "RTX 3090", "--tokens", "3.3B"],
                            cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RTX 3090: 24 GiB" in result.stderr and "recommended: ds_configs/" in result.stderr
    result = subprocess.run([str(onecard), "shard", "--help"], cwd=REPO, env=subprocess_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "--val-fraction" in result.stdout
    result = subprocess.run([str(onecard), "frobnicate"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "usage: onecard {plan,download" in result.stderr


def test_the_batch_scheduler_script_runs_a_stage(tmp_path: Path) -> None:
    env = {**subprocess_env(tmp_path), "VIRTUAL_ENV": sys.prefix}
    result = subprocess.run(["launch/stage.sh", "shard", "--corpus", "books"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "tokens/books/manifest.json is missing" in result.stderr
    result = subprocess.run(["launch/stage.sh", "train"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "launch/train_nodes.sh" in result.stderr


def test_every_numeric_option_states_its_range_and_refuses_a_value_outside_it(capsys: pytest.CaptureFixture
                                                                              ) -> None:
    """`--log-every 0` once divided by zero at step 1, `--keep-checkpoints 0` kept every checkpoint: each stage's
    numbers are checked when the command line is parsed, with argparse's exit 2 naming the option."""
    import dataclasses
    import typing

    from pipeline.download import DownloadConfig
    from pipeline.evaluate import EvaluateConfig
    from pipeline.plan import PlanConfig
    from pipeline.shard import ShardConfig
    from pipeline.stage import parse_config
    from pipeline.tokenize import TokenizeConfig
    from pipeline.train import TrainConfig

    checked = []
    for config in (DownloadConfig, TokenizeConfig, ShardConfig, TrainConfig, EvaluateConfig, PlanConfig):
        hints = typing.get_type_hints(config)
        with pytest.raises(SystemExit):
            parse_config(config, ["--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        for option in dataclasses.fields(config):
            kind = next((k for k in (int, float) if k in (typing.get_args(hints[option.name]) or [hints[option.name]])),
                        None)
            if kind is None:
                continue
            bound = option.metadata.get("range")
            assert bound is not None, f"{config.__name__}.{option.name} states no range"
            flag = "--" + option.name.replace("_", "-")
            step = 1 if kind is int else 0.25
            outside = [bound.low if bound.low_open else bound.low - step]
            if bound.high is not None:
                outside.append(bound.high if bound.high_open else bound.high + step)
            inside = bound.low + step if bound.low_open or bound.high_open else bound.low
            assert getattr(parse_config(config, [flag, str(inside)]), option.name) == inside
            for value in outside:
                with pytest.raises(SystemExit) as exited:
                    parse_config(config, [flag, str(value)])
                error = capsys.readouterr().err
                assert exited.value.code == 2 and f"argument {flag}" in error and "outside its range" in error, error
            assert f"({bound})" in help_text
            checked.append(flag)
    assert {"--log-every", "--keep-checkpoints", "--val-fraction", "--mfu", "--max-docs"} <= set(checked)
