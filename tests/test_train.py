"""The train stage under DeepSpeed on CPU: every config learns, offload changes no math, resume is exact,
two ranks split the batch, and the launcher command works as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    deepspeed_launcher,
    english_documents,
    free_port,
    plain_adamw,
    prepare,
    reference_device,
    subprocess_env,
    write_jsonl,
)

from pipeline import preflight
from pipeline import schedule as schedules
from pipeline.checkpoint import latest_tag, load_weights
from pipeline.data import TokenSequences, TrainBatches
from pipeline.dsconfig import load_ds_config
from pipeline.hardware import peak_tflops
from pipeline.metrics import read_metrics
from pipeline.model import build_model
from pipeline.shard_format import load_index
from pipeline.stage import PipelineError
from pipeline.train import TrainConfig
from pipeline.train import run as train_run

pytestmark = pytest.mark.slow  # trains with a DeepSpeed engine: left out of `make test-fast`

CONFIGS = sorted(p.stem for p in (REPO / "ds_configs").glob("*.json"))
SEQ_LEN = 32


DEFAULTS = {"seq_len": SEQ_LEN, "micro_batch_size": 2, "max_steps": 6, "log_every": 1, "precision": "fp32",
            "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 100, "eval_every": 0}


def train(data_dir: Path, config: str, run: str, **options) -> list[dict]:
    """Train in this process, through pipeline.train.run."""
    train_run(TrainConfig(data_dir=data_dir, deepspeed=str(REPO / "ds_configs" / f"{config}.json"), run=run,
                          **{**DEFAULTS, **options}))
    return read_metrics(data_dir / "runs" / run)


def launch(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """A run under the deepspeed launcher, which must succeed and leave none of its ranks' shared memory behind
    (DeepSpeed's CPU collectives put a 66 MiB workspace per rank in /dev/shm, named after the rendezvous port)."""
    command = deepspeed_launcher()
    result = subprocess.run([*command, *args], cwd=REPO, env=subprocess_env(data_dir), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    port = command[command.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return result


def train_launched(data_dir: Path, config: str, run: str, *launcher_args: str, **options) -> list[dict]:
    """Train in a new process, exactly as a user does: deepspeed launch/train.py --deepspeed ..."""
    flags = [item for key, value in {**DEFAULTS, **options}.items()
             for item in (f"--{key.replace('_', '-')}", str(value))]
    launch(data_dir, *launcher_args, "launch/train.py", "--deepspeed", f"ds_configs/{config}.json", "--run", run,
           *flags)
    return read_metrics(data_dir / "runs" / run)


def losses(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics]


@pytest.fixture(scope="module")
def one_batch_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A corpus whose train split is a handful of sequences: with the micro-batch set to all of them, every
    step trains on the same batch."""
    folder = tmp_path_factory.mktemp("one-batch")
    source = write_jsonl(folder / "tiny.jsonl", english_documents(4, 60, seed=5))
    data_dir = prepare(folder / "data", str(source), "tiny", "bpe:300")
    train_tokens = sum(s["tokens"] for s in load_index(data_dir / "shards" / "tiny")["shards"] if s["split"] == "train")
    return data_dir, (train_tokens - 1) // SEQ_LEN


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_learns_a_repeated_batch(one_batch_data: tuple[Path, int], config: str) -> None:
    data_dir, sequences = one_batch_data
    assert 2 <= sequences <= 16
    metrics = train(data_dir, config, f"learn-{config}", corpus="tiny", micro_batch_size=sequences, max_steps=8,
                    lr=3e-3, precision=None)
    loss = losses(metrics)
    assert len(loss) == 8 and all(torch.isfinite(torch.tensor(loss)))
    assert loss[-1] < loss[0] - 1.0, loss
    assert latest_tag(data_dir / "checkpoints" / f"learn-{config}") == "step_00000008"


def reference_losses(data_dir: Path, config: str, steps: int, micro: int, accum: int) -> tuple[list[float], dict]:
    """The same recipe in plain PyTorch: torch.optim.AdamW, no DeepSpeed, no offload."""
    shards_dir = data_dir / "shards" / "builtin"
    index = load_index(shards_dir)
    batches = TrainBatches(TokenSequences(shards_dir, index, "train", SEQ_LEN), 1337, micro, accum, 1)
    torch.manual_seed(1337)
    model = build_model("tiny", index["vocab_size"], index["eot_id"], device=reference_device(config))
    result = plain_adamw(model, batches, steps, accum, lr=2e-3, warmup_steps=2)
    return result, model.state_dict()


@pytest.mark.parametrize("config", ["zero1_offload", "zero2_offload", "zero3_nvme"])
def test_offload_changes_no_math(data_copy: Path, config: str) -> None:
    expected, expected_weights = reference_losses(data_copy, config, steps=6, micro=2, accum=2)
    got = losses(train(data_copy, config, "math", grad_accum=2))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    _, weights = load_weights(data_copy / "checkpoints" / "math")
    assert set(weights) == set(expected_weights) - {"lm_head.weight"}  # tied to the token embedding
    for name, value in weights.items():
        torch.testing.assert_close(value, expected_weights[name], rtol=1e-4, atol=1e-5, msg=name)


def assert_same_run(data_dir: Path, straight: list[dict], resumed: list[dict]) -> None:
    assert [m["step"] for m in resumed] == [m["step"] for m in straight] == list(range(1, 7))
    assert losses(resumed) == losses(straight)
    assert [m["lr"] for m in resumed] == [m["lr"] for m in straight]
    _, a = load_weights(data_dir / "checkpoints" / "straight")
    _, b = load_weights(data_dir / "checkpoints" / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", ["zero1_offload", "zero2_offload", "zero2_offload_bf16_states", "zero3_offload"])
def test_resume_is_exact(data_copy: Path, config: str) -> None:
    # Resuming late matters: CPU Adam's bias correction must continue bit for bit (see checkpoint.py). bf16 states
    # train in bf16, which the config asks for (the others in fp32).
    options = {"precision": None} if "bf16_states" in config else {}
    straight = train(data_copy, config, "straight", checkpoint_every=3, **options)
    train(data_copy, config, "resumed", stop_after=5, **options)
    assert latest_tag(data_copy / "checkpoints" / "resumed") == "step_00000005"
    assert_same_run(data_copy, straight, train(data_copy, config, "resumed", **options))


def test_finished_run_is_not_trained_again_and_changed_settings_are_refused(data_copy: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    train(data_copy, "zero2_offload", "done", max_steps=2)
    events = sorted((data_copy / "runs" / "done").glob("events.*"))
    # a finished run asks nothing of the machine: no host memory left (another job) does not fail it
    with monkeypatch.context() as patch:
        patch.setattr(preflight, "read_machine", lambda cap: preflight.Machine(0, None, None))
        train(data_copy, "zero2_offload", "done", max_steps=2)
    assert sorted((data_copy / "runs" / "done").glob("events.*")) == events
    with pytest.raises(PipelineError, match=r"different settings \(seq_len\).*--force"):
        train(data_copy, "zero2_offload", "done", max_steps=4, seq_len=16)
    assert losses(train(data_copy, "zero2_offload", "done", max_steps=3, seq_len=16, force=True))[0] > 0


def test_tensorboard_gets_the_training_scalars(data_copy: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(data_copy, "zero2_offload", "tb", max_steps=3)
    events = EventAccumulator(str(data_copy / "runs" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    # the memory/throughput overview of the Custom Scalars tab, whose charts match logged scalars
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    assert {"tokens/s", "MFU", "step time split (s)", "GPU memory (GiB): reserved, NVML",
            "host RSS (GiB)"} <= set(charts)
    assert any(re.fullmatch(charts["step time split (s)"][0], tag) for tag in tags)
    assert any(re.fullmatch(charts["host RSS (GiB)"][0], tag) for tag in tags)
    assert "config" in {tag.split("/")[0] for tag in events.Tags()["tensors"]}  # the merged config, as text
    run_dir = data_copy / "checkpoints" / "tb"
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 2
    assert json.loads((run_dir / "run.json").read_text())["config"]["max_steps"] == 3


def test_memory_savers_change_no_math_and_metrics_are_logged(data_copy: Path) -> None:
    """Activation checkpointing and the chunked loss, under ZeRO-3: same losses, other memory."""
    plain = train(data_copy, "zero3_offload", "plain", max_steps=3, loss_chunk_tokens=0)
    saving = train(data_copy, "zero3_offload", "saving", max_steps=3, activation_checkpointing=1,
                   loss_chunk_tokens=24, peak_tflops=0.5)
    assert losses(saving) == pytest.approx(losses(plain), rel=1e-5)
    for metric in saving:
        assert metric["tflops"] > 0 and metric["mfu"] == pytest.approx(metric["tflops"] / 0.5)
        phases = metric["forward_seconds"] + metric["backward_seconds"] + metric["optimizer_seconds"]
        assert phases <= metric["step_seconds"] < phases + 0.5  # the rest: batches, loss all-reduce
        assert 0 <= metric["data_wait_seconds"] < 0.5
        assert metric["peak_host_rss_gib"] >= metric["host_rss_gib"] > 0
    assert ("mfu" in plain[0]) == (peak_tflops("fp32") is not None)  # a known card's peak; none for a CPU


def test_compiled_blocks_change_no_math(data_copy: Path) -> None:
    """--compile (torch.compile of every transformer block, here Inductor's CPU code) inside DeepSpeed's engine
    with activation checkpointing: the losses of the eager model."""
    eager = train(data_copy, "zero1_offload", "eager", max_steps=3, grad_accum=2, activation_checkpointing=1)
    compiled = train(data_copy, "zero1_offload", "compiled", max_steps=3, grad_accum=2, activation_checkpointing=1,
                     compile=True)
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-5)
    assert compiled[0]["step_seconds"] > compiled[-1]["step_seconds"]  # the first step compiled


@pytest.mark.parametrize(("mode", "per_step"), [("stop", 1), ("skip", 1 + 4)])
def test_the_host_waits_for_the_ranks_once_per_optimizer_step(data_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                               mode: str, per_step: int) -> None:
    """However many micro-steps, the loop reduces the loss and the stop flag in one collective per optimizer step
    (the only time the host waits for the device); --on-nonfinite skip adds one per micro-batch, to look at its
    loss before its backward."""
    import pipeline.train as trainer

    calls = []
    for name in ("all_reduce_sum", "any_rank"):
        real = getattr(trainer, name)
        monkeypatch.setattr(trainer, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    metrics = train(data_copy, "zero1_offload", "syncs", max_steps=3, grad_accum=4, checkpoint_every=0,
                    on_nonfinite=mode)
    assert len(metrics) == 3
    assert calls.count("all_reduce_sum") == 3  # the loss and the stop flag, together
    assert len(calls) == 2 + 3 * per_step  # 2: the preflight and the disk check, before the first step
    assert "startup_seconds" in metrics[0] and "startup_seconds" not in metrics[1]
    assert metrics[0]["startup_seconds"] > 0 and metrics[0]["op_build_seconds"] >= 0


def test_configs_the_trainer_cannot_use_are_refused(data_copy: Path, tmp_path: Path) -> None:
    stage0 = tmp_path / "stage0.json"
    stage0.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(PipelineError, match="does not enable ZeRO"):
        train_run(TrainConfig(data_dir=data_copy, deepspeed=str(stage0), run="x", seq_len=SEQ_LEN))
    scheduled = tmp_path / "scheduled.json"
    scheduled.write_text(json.dumps({**load_ds_config(REPO / "ds_configs" / "zero2_offload.json"),
                                     "scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(PipelineError, match='has a "scheduler" section'):
        train_run(TrainConfig(data_dir=data_copy, deepspeed=str(scheduled), run="x", seq_len=SEQ_LEN))
    with pytest.raises(PipelineError, match="unknown --preset 'gpt5'"):
        train(data_copy, "zero2_offload", "x", preset="gpt5")
    with pytest.raises(PipelineError, match=r"shards/missing/manifest\.json is missing.*make shard"):
        train(data_copy, "zero2_offload", "x", corpus="missing")
    assert not (data_copy / "checkpoints" / "x").exists()


def test_the_canonical_command_works_as_written(data_copy: Path) -> None:
    """The run is named after corpus, preset, config and the day it started; the same command on a later day
    continues that run rather than starting a new one."""
    command = ["launch/train.py", "--deepspeed", "ds_configs/zero3_offload.json", "--seq-len", str(SEQ_LEN),
               "--micro-batch-size", "2"]
    # stopped at 3 of 4 (so the schedule is the one the next run continues); the run that continues it evaluates
    result = launch(data_copy, *command, "--max-steps", "4", "--stop-after", "3", "--eval-every", "0")
    assert "ZeRO-3, parameters on CPU, optimizer on CPU" in result.stderr + result.stdout
    def runs() -> list[str]:  # the shared test data may hold other tests' runs
        return sorted(p.name for p in (data_copy / "checkpoints").glob("builtin-tiny-zero3_offload*"))

    (started,) = runs()
    assert re.fullmatch(r"builtin-tiny-zero3_offload-\d{8}", started)
    # the preflight's host estimate, against the peak RSS this process really reached; on a CPU accelerator ZeRO-3's
    # 200 MB gradient bucket is allocated but resident only as far as the tiny model's gradients fill it
    metrics = read_metrics(data_copy / "runs" / started)
    peak = max(m["peak_host_rss_gib"] for m in metrics)
    bucket = json.loads((data_copy / "checkpoints" / started / "run.json").read_text())["host_memory"]["estimated"][
        "device"] / (1 << 30)
    resident = metrics[0]["estimated_host_gib"] - bucket
    assert 0.6 * peak <= resident <= 1.6 * peak, (resident, peak)
    assert latest_tag(data_copy / "checkpoints" / started) == "step_00000003"
    for folder in ("checkpoints", "runs"):  # as if it had started on New Year's Day 2026
        (data_copy / folder / started).rename(data_copy / folder / "builtin-tiny-zero3_offload-20260101")
    launch(data_copy, *command, "--max-steps", "4", "--eval-tokens", "2048")
    assert runs() == ["builtin-tiny-zero3_offload-20260101"]
    assert [m["step"] for m in read_metrics(data_copy / "runs" / "builtin-tiny-zero3_offload-20260101")] == [1, 2, 3, 4]
    # --force starts a new run, dated today, and leaves the older one alone
    train_run(TrainConfig(data_dir=data_copy, deepspeed=str(REPO / "ds_configs" / "zero3_offload.json"), force=True,
                          **{**DEFAULTS, "max_steps": 1}))
    assert runs() == ["builtin-tiny-zero3_offload-20260101", started]


@pytest.mark.parametrize("config", ["zero2_offload", "zero3_offload"])
def test_resume_on_more_ranks_through_the_universal_checkpoint(data_copy: Path, config: str) -> None:
    """One rank with micro-batch 4 stops at step 3; two ranks with micro-batch 2 (the same global batch) go on
    from DeepSpeed's universal checkpoint, on the same sequences: the run an uninterrupted rank would make.
    (So two ranks split the global batch as one rank takes it.)"""
    whole = train(data_copy, config, "whole", micro_batch_size=4)
    train(data_copy, config, "grown", micro_batch_size=4, stop_after=3)
    result = launch(data_copy, "--num_gpus", "2", "launch/train.py", "--deepspeed", f"ds_configs/{config}.json",
                    "--run", "grown", *(item for key, value in {**DEFAULTS, "micro_batch_size": 2}.items()
                                        for item in (f"--{key.replace('_', '-')}", str(value))))
    assert "written by 1 rank(s), this run has 2: converting it" in result.stdout + result.stderr
    grown = read_metrics(data_copy / "runs" / "grown")
    assert [m["step"] for m in grown] == list(range(1, 7))
    assert losses(grown) == pytest.approx(losses(whole), rel=1e-5)  # the same up to the order of the sums
    run_dir = data_copy / "checkpoints" / "grown"
    assert len(list((run_dir / "step_00000006").rglob("*optim_states.pt"))) == 2  # now partitioned in two
    assert json.loads((run_dir / "step_00000006" / "manifest.json").read_text())["params"]["world_size"] == 2
    assert not (run_dir / "universal").exists()  # the conversion is dropped once loaded
    _, grown_weights = load_weights(run_dir)
    _, whole_weights = load_weights(data_copy / "checkpoints" / "whole")
    # every group with its own weight decay (DeepSpeed's ZeRO-3 universal load alone would decay the LayerNorm
    # gains too: off by 3e-4 here)
    assert all(torch.allclose(grown_weights[k], whole_weights[k], rtol=0, atol=1e-6) for k in whole_weights)


def test_a_wsd_run_extends_from_300_to_600_steps_without_a_jump(data_copy: Path) -> None:
    """A 300-step run on the default schedule (WSD) stopped in its stable phase, then given --max-steps 600: every
    step's rate, before the extension and after it, is the 600-step schedule's, so nothing jumps where the run was
    extended. (Steps 4 and 8 stand for any stable-phase stops: the schedules' whole shapes are
    tests/test_schedule.py's.)"""
    common = {"checkpoint_every": 0}
    train(data_copy, "zero2_offload", "wsd", max_steps=300, stop_after=4, **common)
    extended = train(data_copy, "zero2_offload", "wsd", max_steps=600, stop_after=8, **common)
    assert [m["step"] for m in extended] == list(range(1, 9))
    wsd = schedules.make("wsd", 600, 2, 0.1, 0.2)
    assert [m["lr"] for m in extended] == pytest.approx([2e-3 * wsd.ratio(k) for k in range(8)], rel=1e-6)
    assert [m["lr"] for m in extended[2:]] == pytest.approx([2e-3] * 6)  # the peak, on both sides of step 4


def test_a_cosine_run_resumed_with_another_length_is_refused_with_the_jump_named(data_copy: Path) -> None:
    train(data_copy, "zero2_offload", "cosine", schedule="cosine", max_steps=12, stop_after=6)
    with pytest.raises(PipelineError, match=r"resuming at step 7 would move the learning rate at once from 0\.\d+x "
                                            r"to 0\.\d+x of the peak.*--schedule wsd.*--allow-schedule-change"):
        train(data_copy, "zero2_offload", "cosine", max_steps=24)
    with pytest.raises(PipelineError, match=r"different settings \(schedule\)"):  # every setting but the length
        train(data_copy, "zero2_offload", "cosine", max_steps=12, min_lr_ratio=0.2)
    resumed = train(data_copy, "zero2_offload", "cosine", max_steps=24, allow_schedule_change=True)
    assert resumed[6]["lr"] == pytest.approx(2e-3 * schedules.make("cosine", 24, 2, 0.1, 0).ratio(6))


def test_cooldown_from_branches_a_decayed_run_from_a_stable_checkpoint(data_copy: Path) -> None:
    main = train(data_copy, "zero2_offload", "main", schedule="wsd", max_steps=12, checkpoint_every=4,
                 keep_checkpoints=3)
    cool = train(data_copy, "zero2_offload", "main-cool", schedule="wsd", decay=4,
                 cooldown_from="main/step_00000004")
    assert [m["step"] for m in cool] == [5, 6, 7, 8]  # from step 4, decaying over 4 steps to step 8
    assert cool[0]["loss"] == pytest.approx(main[4]["loss"], rel=1e-6)  # the same state, the same batch
    wsd = schedules.make("wsd", 8, 2, 0.1, 4)
    assert [m["lr"] for m in cool] == pytest.approx([2e-3 * wsd.ratio(k) for k in range(4, 8)])
    assert cool[0]["lr"] == pytest.approx(2e-3) and cool[-1]["lr"] < cool[-2]["lr"] < cool[0]["lr"]
    assert latest_tag(data_copy / "checkpoints" / "main") == "step_00000012"  # the run it came from: untouched
    assert latest_tag(data_copy / "checkpoints" / "main-cool") == "step_00000008"
    with pytest.raises(PipelineError, match=r"--cooldown-from main/step_00000099: no checkpoint there.*main"):
        train(data_copy, "zero2_offload", "other-cool", schedule="wsd", cooldown_from="main/step_00000099")


def test_the_layout_may_change_but_not_the_global_batch(data_copy: Path, tmp_path: Path) -> None:
    whole = train(data_copy, "zero2_offload", "whole", micro_batch_size=4)
    train(data_copy, "zero2_offload", "split", micro_batch_size=4, stop_after=3)
    with pytest.raises(PipelineError, match=r"\(train_batch_size\).*as long as their product, the global batch"):
        train(data_copy, "zero2_offload", "split", micro_batch_size=2)
    # 2 x 2 accumulated is the same global batch of 4: no re-partitioning, the same sequences
    split = train(data_copy, "zero2_offload", "split", micro_batch_size=2, grad_accum=2)
    assert losses(split) == pytest.approx(losses(whole), rel=1e-5)


def test_resume_on_other_ranks_with_nvme_offload_is_refused(data_copy: Path) -> None:
    import json

    train(data_copy, "zero3_nvme", "nvme", stop_after=1)
    run_dir = data_copy / "checkpoints" / "nvme"
    manifest = run_dir / "step_00000001" / "manifest.json"
    saved = json.loads(manifest.read_text())
    saved["params"]["world_size"] = 2  # as if two ranks had written it
    manifest.write_text(json.dumps(saved))
    with pytest.raises(PipelineError, match=r"written by 2 rank\(s\) and this run has 1.*does not cover NVMe"):
        train(data_copy, "zero3_nvme", "nvme")
    assert latest_tag(run_dir) == "step_00000001" and not (run_dir / "universal").exists()


def test_a_hostfile_launch_on_each_node_without_ssh(data_copy: Path, tmp_path: Path) -> None:
    """launch/train_nodes.sh, as node 0 of a one-machine hostfile with two slots: two ranks, no ssh."""
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    env = {**subprocess_env(data_copy), "VIRTUAL_ENV": sys.prefix, "MASTER_PORT": str(free_port())}
    result = subprocess.run(["launch/train_nodes.sh", str(tmp_path / "hosts"), "0", "127.0.0.1", "--deepspeed",
                             "ds_configs/zero2_offload.json", "--run", "nodes", "--max-steps", "2", "--seq-len",
                             str(SEQ_LEN), "--micro-batch-size", "2", "--eval-every", "0"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = data_copy / "checkpoints" / "nodes"
    assert json.loads((run_dir / "run.json").read_text())["identity"]["world_size"] == 2
    assert latest_tag(run_dir) == "step_00000002"


def test_a_deepspeed_other_than_the_pinned_one_is_refused(data_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from pipeline import checkpoint

    checkpoint.check_deepspeed()  # the installed one is the pinned one
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.21.0" if name == "deepspeed" else real(name))
    with pytest.raises(PipelineError, match=r"DeepSpeed 0\.21\.0 is installed, but onecard is tested with "
                                            r"deepspeed==0\.19\.8.*pip install 'deepspeed==0\.19\.8'"):
        train(data_copy, "zero2_offload", "pinned")
    assert not (data_copy / "checkpoints" / "pinned").exists()
