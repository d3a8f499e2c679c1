"""Faults during training: signals, non-finite losses, a save cut short, a manifest behind its checkpoint,
a metrics line cut off by a kill. Nothing that looks complete may be partial, and the same command resumes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, deepspeed_launcher, english_documents, free_port, subprocess_env, write_jsonl

from pipeline import checkpoint
from pipeline.checkpoint import latest_step, latest_tag, load_weights
from pipeline.metrics import Metrics, read_metrics
from pipeline.model import TrainingModel
from pipeline.stage import PipelineError
from pipeline.train import TrainConfig
from pipeline.train import run as train_run

FLAGS = ["--seq-len", "32", "--micro-batch-size", "2", "--precision", "fp32", "--lr", "2e-3", "--warmup-steps", "2",
         "--log-every", "1", "--eval-every", "0"]


def start(data_dir: Path, run: str, *extra: str, launcher: bool = False) -> subprocess.Popen:
    """A training process as a user starts it, in its own process group (as a terminal's job is)."""
    program = ([*deepspeed_launcher(), "launch/train.py"] if launcher
               else [sys.executable, "launch/train.py"])
    return subprocess.Popen([*program, "--deepspeed", "ds_configs/zero2_offload.json", "--run", run, *FLAGS, *extra],
                            cwd=REPO, env=subprocess_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_steps(data_dir: Path, run: str, steps: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(read_metrics(data_dir / "runs" / run)) < steps:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, "training did not start in time"
        time.sleep(0.2)


def assert_complete_or_absent(ckpt_dir: Path) -> None:
    """`latest`, if there is one, names a checkpoint with every file written."""
    from safetensors.torch import load_file

    tag = latest_tag(ckpt_dir)
    if tag is not None:
        files = {p.name for p in (ckpt_dir / tag).iterdir()}
        assert {checkpoint.WEIGHTS, "mp_rank_00_model_states.pt"} <= files, files
        assert load_file(str(ckpt_dir / tag / checkpoint.WEIGHTS))


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_step_boundary_and_exits_0(data_copy: Path) -> None:
    process = start(data_copy, "term", "--max-steps", "5000", "--checkpoint-every", "0")
    wait_for_steps(data_copy, "term", 3, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    stopped = len(read_metrics(data_copy / "runs" / "term"))
    assert latest_step(data_copy / "checkpoints" / "term") == stopped < 5000
    assert "SIGTERM: stopping after this step" in output and f"stopped after step {stopped}" in output
    load_weights(data_copy / "checkpoints" / "term")  # complete and recorded in the manifest

    # The same command carries on from there (to a nearer end, to keep the test short: a schedule made shorter
    # jumps, which it is told to accept).
    again = start(data_copy, "term", "--max-steps", str(stopped + 2), "--checkpoint-every", "0",
                  "--allow-schedule-change")
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output[-3000:]
    assert f"resumed from {data_copy / 'checkpoints' / 'term' / checkpoint.tag_for(stopped)}" in output
    assert [m["step"] for m in read_metrics(data_copy / "runs" / "term")] == list(range(1, stopped + 3))


@pytest.mark.slow
def test_ctrl_c_under_the_deepspeed_launcher_still_checkpoints(data_copy: Path) -> None:
    process = start(data_copy, "ctrl-c", "--max-steps", "5000", "--checkpoint-every", "0", launcher=True)
    wait_for_steps(data_copy, "ctrl-c", 3, process)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    output, _ = process.communicate(timeout=300)
    ckpt_dir = data_copy / "checkpoints" / "ctrl-c"
    deadline = time.time() + 60  # the launcher returns at once; its ranks finish the step and save
    while latest_tag(ckpt_dir) is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    assert latest_step(ckpt_dir) == len(read_metrics(data_copy / "runs" / "ctrl-c")) < 5000, output[-3000:]
    assert_complete_or_absent(ckpt_dir)


@pytest.mark.slow
def test_a_second_signal_stops_at_once_without_a_partial_checkpoint(data_copy: Path) -> None:
    process = start(data_copy, "twice", "--max-steps", "5000", "--checkpoint-every", "2")
    wait_for_steps(data_copy, "twice", 3, process)
    process.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode in (-signal.SIGTERM, 0), output[-3000:]
    assert_complete_or_absent(data_copy / "checkpoints" / "twice")


def nan_at(step_call: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the forward pass number `step_call` (counted from 1) return NaN."""
    forward, calls = TrainingModel.forward, []

    def poisoned(self: TrainingModel, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        loss = forward(self, inputs, targets)
        return loss * float("nan") if len(calls) == step_call else loss

    monkeypatch.setattr(TrainingModel, "forward", poisoned)


def train(data_dir: Path, run: str, **options) -> None:
    settings = {"seq_len": 32, "micro_batch_size": 2, "precision": "fp32", "lr": 2e-3, "warmup_steps": 2,
                "log_every": 1, "eval_every": 0, **options}
    train_run(TrainConfig(data_dir=data_dir, deepspeed=str(REPO / "ds_configs" / "zero2_offload.json"), run=run,
                          **settings))


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data_copy: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    train(data_copy, "nan", max_steps=2)
    good = load_weights(data_copy / "checkpoints" / "nan")[1]
    nan_at(2, monkeypatch)  # the second forward of the resumed run: step 4
    with pytest.raises(PipelineError, match=r"non-finite loss at step 4, micro-step 0, rank 0: train sequences "
                                            r"\[\d+, \d+\]\. Stopped without saving"):
        train(data_copy, "nan", max_steps=6, checkpoint_every=1)
    assert latest_step(data_copy / "checkpoints" / "nan") == 3  # step 3 was fine and was saved
    assert torch.isfinite(load_weights(data_copy / "checkpoints" / "nan")[1]["transformer.wte.weight"]).all()
    assert set(good) == set(load_weights(data_copy / "checkpoints" / "nan")[1])


@pytest.mark.slow
def test_nonfinite_loss_can_be_skipped(data_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    nan_at(3, monkeypatch)
    train(data_copy, "skip", max_steps=5, grad_accum=2, on_nonfinite="skip")
    assert "non-finite loss at step 2, micro-step 0, rank 0: train sequences [" in capsys.readouterr().err
    metrics = read_metrics(data_copy / "runs" / "skip")
    assert len(metrics) == 5 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    weights = load_weights(data_copy / "checkpoints" / "skip")[1]
    assert all(torch.isfinite(value).all() for value in weights.values())


@pytest.mark.slow
def test_a_save_cut_short_leaves_the_previous_checkpoint_in_charge(data_copy: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    train(data_copy, "cut", max_steps=2)
    ckpt_dir = data_copy / "checkpoints" / "cut"

    def killed(folder: Path) -> None:
        raise KeyboardInterrupt("killed after DeepSpeed wrote its files, before the commit")

    monkeypatch.setattr(checkpoint, "fsync_tree", killed)
    with pytest.raises(KeyboardInterrupt):
        train(data_copy, "cut", max_steps=4)
    assert latest_tag(ckpt_dir) == "step_00000002" and (ckpt_dir / "step_00000004").is_dir()
    monkeypatch.undo()
    train(data_copy, "cut", max_steps=4)  # the half-written step_00000004 is replaced
    assert latest_tag(ckpt_dir) == "step_00000004"
    load_weights(ckpt_dir)


TWO_DEVICES = """
import os
# Each rank's device chooses another precision for `auto` (card A: bf16, card B: fp32), and rank 1's own
# optimizer-state file of step 2 cannot be written.
import pipeline.precision
rank = os.environ.get("RANK")
pipeline.precision.detect = lambda: pipeline.precision.Choice(*{"0": ("bf16", "auto: card A"),
                                                                "1": ("fp32", "auto: card B")}[rank])
if rank == "1":
    import errno
    import torch
    _save = torch.save
    def _failing_save(obj, f, *args, **kwargs):
        if "step_00000002" in str(f):
            raise OSError(errno.EIO, "Input/output error (injected on rank 1)", str(f))
        return _save(obj, f, *args, **kwargs)
    torch.save = _failing_save
"""


@pytest.mark.slow
def test_two_ranks_settle_auto_precision_together_and_fail_a_save_together(data_copy: Path, tmp_path: Path) -> None:
    """Two ranks started without the launcher (so none is killed for the other, as on two nodes), on devices whose
    `auto` differs: both train in the precision both run natively. Then rank 1 cannot write its part of step 2's
    checkpoint: both ranks stop with the same clear error instead of one waiting for ever in the save's next
    collective, and step 1 stays `latest`."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(TWO_DEVICES)
    port = free_port()
    ranks = [subprocess.Popen(
        [sys.executable, "launch/train.py", "--deepspeed", "ds_configs/zero2_offload.json", "--run", "ranks", *FLAGS,
         "--precision", "auto", "--max-steps", "2", "--checkpoint-every", "1"], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env={**subprocess_env(data_copy), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
             "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "PYTHONPATH": str(tmp_path / "hook")}) for rank in (0, 1)]
    try:
        outputs = [rank.communicate(timeout=300)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    ckpt_dir = data_copy / "checkpoints" / "ranks"
    agreed = {"precision": "fp32", "reason": "auto, the precision every rank runs natively (rank 0: bf16 (auto: card "
                                             "A); rank 1: fp32 (auto: card B))"}
    assert json.loads((ckpt_dir / checkpoint.RUN_FILE).read_text())["precision"] == agreed
    for rank, output in zip(ranks, outputs, strict=True):
        assert rank.returncode == 2, output[-3000:]
    assert "injected on rank 1" in outputs[1]  # the cause, from the rank that hit it
    # rank 0 is told by the save itself, not by a collective broken by rank 1's exit (on GPUs NCCL would wait)
    assert "failed (on another rank: its log says why)" in outputs[0], outputs[0][-3000:]
    assert latest_tag(ckpt_dir) == "step_00000001" and not (ckpt_dir / "step_00000002").exists()
    load_weights(ckpt_dir)


@pytest.mark.slow
def test_each_checkpoint_has_its_own_manifest_and_the_run_manifest_lists_no_checkpoint(data_copy: Path) -> None:
    train(data_copy, "manifests", max_steps=4, checkpoint_every=2, keep_checkpoints=1)
    ckpt_dir = data_copy / "checkpoints" / "manifests"
    run_files = {f["path"] for f in json.loads((ckpt_dir / "manifest.json").read_text())["files"]}
    assert run_files == {"run.json", "config.json", "ds_config.json"}  # nothing a later save or prune changes
    assert [p.name for p in ckpt_dir.glob("step_*")] == ["step_00000004"]  # step 2 pruned after 4 became latest
    manifest = json.loads((ckpt_dir / "step_00000004" / "manifest.json").read_text())
    assert manifest["stage"] == "checkpoint" and manifest["counts"]["step"] == 4
    assert {f["path"] for f in manifest["files"]} >= {checkpoint.WEIGHTS, "mp_rank_00_model_states.pt"}
    weights = ckpt_dir / "step_00000004" / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(PipelineError, match=r"step_00000004/model_fp32\.safetensors does not match the sha256"):
        load_weights(ckpt_dir)


@pytest.mark.parametrize("content", ["", "step_0000", "../../etc"])
def test_a_damaged_latest_pointer_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "latest").write_text(content)
    with pytest.raises(PipelineError, match=r"latest does not name a checkpoint.*--force"):
        latest_tag(tmp_path)


def test_a_metrics_line_cut_off_by_a_kill_is_dropped(tmp_path: Path) -> None:
    lines = [json.dumps({"step": step, "loss": 5.0 - step}) + "\n" for step in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "lo')
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]
    Metrics(tmp_path, True, start_step=2).close()  # a resume from step 2
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]


def no_space(monkeypatch: pytest.MonkeyPatch, free: int = 1000) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def tree_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", ["download", "tokenize", "shard"])
def test_a_full_disk_stops_data_stages_before_they_write(data_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                         stage: str) -> None:
    from pipeline import download, shard, tokenize

    if stage == "tokenize":  # (--force would retrain the tokenizer first, which needs little space)
        shutil.rmtree(data_copy / "tokens")
    before = tree_digest(data_copy)
    no_space(monkeypatch)
    source = write_jsonl(data_copy.parent / "docs.jsonl", english_documents(50, 20))  # a source of known size
    configs = {"download": lambda: download.run(download.DownloadConfig(data_dir=data_copy, source=str(source))),
               "tokenize": lambda: tokenize.run(tokenize.TokenizeConfig(data_dir=data_copy, tokenizer="bpe:512")),
               "shard": lambda: shard.run(shard.ShardConfig(data_dir=data_copy, val_fraction=0.1, force=True))}
    with pytest.raises(PipelineError, match=rf"needs about .* in {data_copy}/.* 1\.0 KB free\. Free some space"):
        configs[stage]()
    assert tree_digest(data_copy) == before  # not a byte changed, --force or not


@pytest.mark.slow
def test_a_full_disk_stops_training_before_it_starts(data_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_space(monkeypatch)
    with pytest.raises(PipelineError, match=r"the next checkpoint needs about \d+\.\d MB in .*checkpoints/full"):
        train(data_copy, "full", max_steps=2)
    with pytest.raises(PipelineError, match=r"the NVMe optimizer swap needs about .* in .*nvme/full-nvme"):
        train_run(TrainConfig(data_dir=data_copy, deepspeed=str(REPO / "ds_configs" / "zero3_nvme.json"),
                              run="full-nvme", seq_len=32, micro_batch_size=2, max_steps=2, checkpoint_every=0))


@pytest.mark.slow
def test_a_disk_that_fills_during_a_save_keeps_the_previous_checkpoint(data_copy: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    train(data_copy, "fills", max_steps=2)
    ckpt_dir = data_copy / "checkpoints" / "fills"

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(ckpt_dir / "step_00000004"))

    monkeypatch.setattr(checkpoint, "write_fp32_weights", full)
    with pytest.raises(PipelineError, match=r"writing checkpoint .*step_00000004 failed .*No space left on device.*"
                                            r"never became `latest`; .*step_00000002 is intact"):
        train(data_copy, "fills", max_steps=4)
    assert latest_tag(ckpt_dir) == "step_00000002" and not (ckpt_dir / "step_00000004").exists()
    load_weights(ckpt_dir)
    monkeypatch.undo()
    train(data_copy, "fills", max_steps=4)
    assert latest_tag(ckpt_dir) == "step_00000004"


def test_a_disk_that_fills_during_a_data_stage_gives_a_clear_exit(data_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from pipeline import shard_format, tokenize
    from pipeline.stage import stage_main

    before = tree_digest(data_copy / "tokens" / "builtin")

    def full(self: shard_format.TokenPartWriter, documents: list) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.folder / f"{self.name}.ids"))

    monkeypatch.setattr(shard_format.TokenPartWriter, "add", full)
    with pytest.raises(SystemExit) as exit_info:
        stage_main(tokenize.TokenizeConfig, tokenize.run,
                   ["--data-dir", str(data_copy), "--tokenizer", "bpe:512", "--force"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "Tokenize: the disk is full (No space left on device) while writing" in message
    assert "part_00000.ids" in message and "run the same command again" in message
    assert tree_digest(data_copy / "tokens" / "builtin") == before  # the finished tokens are untouched
    assert (data_copy / "tokens" / ".builtin.partial").is_dir()  # what the next run resumes from


@pytest.mark.slow
def test_kill_9_then_the_same_command_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    """A trial of bench/kill_bench.py (docs/RELIABILITY.md has the full tally of every target): training with
    everything swapped to NVMe (zero3_nvme), killed with SIGKILL mid-step and run again. (A killed data stage and a
    save cut short have their own tests: test_tokenize.py, and above.)"""
    out = tmp_path / "kill.json"
    result = subprocess.run(
        [sys.executable, "bench/kill_bench.py", "--trials", "1", "--targets", "nvme", "--train-steps", "4",
         "--work", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert (record["trials"], record["resumed_identical"], record["corrupt_artifacts"]) == (1, 1, 0), record
    (trial,) = record["per_trial"]
    assert (trial["target"], trial["killed"]) == ("nvme", True)
    assert any("NVMe swap" in item for item in trial["left_partial"]), trial
