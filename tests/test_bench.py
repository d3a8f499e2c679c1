"""The training benchmark harness runs every system on CPU with the tiny preset, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, subprocess_env

from pipeline.hardware import device_name

pytestmark = pytest.mark.slow  # trains with a DeepSpeed engine: left out of `make test-fast`

KEYS = {"system", "model", "config", "device", "gpu_mem_cap_gib", "seq_len", "tokens_per_second", "mfu",
        "peak_gpu_mem_nvml_gib", "peak_gpu_mem_reserved_gib", "peak_host_rss_gib", "steps", "first_loss",
        "last_loss", "status", "command", "date"}


# One config of each system the GPU check's test (below) does not run: it runs the Trainer and onecard's
# zero1_offload through the same worker code; the other onecard configs train in tests/test_train.py.
SYSTEMS = "onecard:zero3_offload,fsdp2:fsdp2,torch:plain"


def test_every_system_trains_the_same_model_on_the_same_data(builtin_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "bench/train_bench.py", "--data-dir", str(builtin_data), "--steps", "3", "--warmup-steps",
         "1", "--seq-len", "32", "--micro-batch-size", "2", "--gradient-checkpointing", "--systems", SYSTEMS,
         "--out", str(out)],
        cwd=REPO, env=subprocess_env(builtin_data), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}
    assert set(records) == {"onecard-zero3_offload", "fsdp2-fsdp2", "torch-plain"}
    for name, record in records.items():
        assert set(record) >= KEYS, name
        assert record["status"] == "ok" and record["steps"] == 3, (name, record.get("error"))
        assert record["tokens_per_second"] > 0 and record["peak_host_rss_gib"] > 0, name
        assert (record["model"], record["seq_len"], record["device"]) == ("tiny", 32, device_name())
    # The same initial weights and the same first batch give the same first loss (up to bf16 rounding).
    first = [records[n]["first_loss"] for n in ("onecard-zero3_offload", "torch-plain")]
    assert max(first) - min(first) < 0.02, first
    assert (out / "table.md").read_text().count("| ok |") == 3
    # --gradient-checkpointing reached every system (recomputation leaves the losses as they were, above)
    assert "--activation-checkpointing 1" in records["onecard-zero3_offload"]["command"]
    assert all("--gradient-checkpointing" in records[n]["command"] for n in ("fsdp2-fsdp2", "torch-plain"))


def test_the_gpu_check_sets_each_lever_beside_the_trainer(builtin_data: Path, tmp_path: Path) -> None:
    """bench/gpu_check.py, the GPU host's one command, on CPU with the tiny preset: every run with its own batch
    layout and levers, its start-up time, and its speed against the Trainer's row. Two runs, the Trainer's and
    onecard's candidate: the other onecard runs differ from it only in RUNS' settings."""
    out = tmp_path / "check"
    runs = ["hf", "best"]
    command = [sys.executable, "bench/gpu_check.py", "--data-dir", str(builtin_data), "--seq-len", "32",
               "--max-steps", "2", "--max-grad-accum", "2", "--warmup-steps", "1", "--gradient-checkpointing",
               "--out", str(out)]
    result = subprocess.run([*command, "--runs", ",".join(runs)], cwd=REPO, env=subprocess_env(builtin_data),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {label: json.loads((out / f"{label}.json").read_text()) for label in runs}
    layouts = {"hf": (8, 2), "best": (4, 2)}  # accumulation capped
    for label, record in records.items():
        assert record["status"] == "ok" and record["steps"] == 2, (label, record.get("error"))
        assert record["tokens_per_step"] == layouts[label][0] * layouts[label][1] * 32, label
        assert record["startup_seconds"] > 0 and record["tokens_per_second"] > 0, label
    assert records["best"]["config"] == "ds_configs/zero1_offload.json"
    assert "--activation-checkpointing 1" in records["best"]["command"]  # its levers reached the trainer
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in (out / "table.md").read_text().splitlines()}
    assert rows["hf"][6] == "1.00" and float(rows["best"][6]) > 0  # the "x Trainer" column
    # with no time left, a run is recorded as not run rather than started
    result = subprocess.run([*command, "--runs", "best", "--budget", "0"], cwd=REPO,
                            env=subprocess_env(builtin_data), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "best.json").read_text())["status"] == "not run: 0s of --budget left"


def test_a_system_past_its_timeout_is_killed_with_its_children(builtin_data: Path, tmp_path: Path) -> None:
    import psutil

    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "bench/train_bench.py", "--data-dir", str(builtin_data), "--steps", "1000", "--seq-len", "32",
         "--micro-batch-size", "2", "--systems", "onecard:zero2_offload", "--timeout", "10", "--out", str(out)],
        cwd=REPO, env=subprocess_env(builtin_data), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((out / "onecard-zero2_offload.json").read_text())
    assert record["status"] == "error" and record["error"].endswith("timed out after 10s (--timeout)")
    # the launcher's trainer process went with it (it would hold the GPU while the next system is measured)
    left = [p for p in psutil.process_iter(["cmdline"]) if "bench-zero2_offload" in " ".join(p.info["cmdline"] or [])]
    assert not left, [p.info["cmdline"] for p in left]


def test_tokenize_benchmark_compares_with_the_reference_on_identical_tokens(tmp_path: Path) -> None:
    from helpers import english_documents, write_gpt2_format

    books = tmp_path / "books"
    books.mkdir()
    texts = english_documents(30, 400)
    for i, text in enumerate(texts):
        (books / f"book{i}.txt").write_text(text)
    tokenizer = write_gpt2_format(tmp_path / "tokenizer", texts, 350)
    result = subprocess.run(
        [sys.executable, "bench/tokenize_bench.py", "--source", str(books), "--copies", "2", "--tokenizer",
         str(tokenizer), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
        cwd=REPO, env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")}
    assert set(records) == {"onecard", "onecard-tenth", "reference"}
    keys = {"system", "benchmark", "corpus_bytes", "tokens", "tokens_per_second", "peak_host_rss_gib", "cores",
            "command", "date"}
    for record in records.values():
        assert set(record) >= keys and record["benchmark"] == "tokenize" and record["tokens_per_second"] > 0
    assert records["onecard"]["tokens"] == records["reference"]["tokens"]  # same tokenizer, same corpus
    assert records["onecard"]["encoder"] == "tiktoken"
    assert records["onecard-tenth"]["corpus_bytes"] < records["onecard"]["corpus_bytes"] / 5


def test_loader_benchmark(builtin_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "loader.json"
    result = subprocess.run(
        [sys.executable, "bench/loader_bench.py", "--data-dir", str(builtin_data), "--seq-len", "64",
         "--batches", "50", "--out", str(out)], cwd=REPO, env=subprocess_env(builtin_data), capture_output=True,
        text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["loader_tokens_per_second"] > 0 and record["dataloader_tokens_per_second"] > 0
    assert 0 <= record["fed_wait_fraction"] < 1


def test_the_bf16_states_benchmark_trains_both_arms_on_the_same_batches(data_copy: Path, tmp_path: Path) -> None:
    """bench/bf16_states.py (docs/QUALITY.md): fp32 and bf16 optimizer states from the same weights and batches;
    the first loss is the same (the model computes from the same bf16 copy), the updates then differ."""
    out = tmp_path / "states"
    result = subprocess.run(
        [sys.executable, "bench/bf16_states.py", "--data-dir", str(data_copy), "--corpus", "builtin", "--layers", "1",
         "--width", "64", "--seq-len", "32", "--micro-batch-size", "2", "--steps", "6", "--warmup-steps", "1",
         "--eval-every", "3", "--eval-tokens", "1024", "--out", str(out)],
        cwd=REPO, env=subprocess_env(data_copy), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    fp32, bf16 = (json.loads((out / f"{arm}.json").read_text()) for arm in ("fp32", "bf16"))
    assert (fp32["states"], bf16["states"]) == ("float32", "bfloat16")
    assert [point["step"] for point in fp32["curve"]] == [3, 6] == [point["step"] for point in bf16["curve"]]
    assert fp32["losses"][0] == bf16["losses"][0] and fp32["losses"][1:] != bf16["losses"][1:]
    assert fp32["val_loss"] < fp32["losses"][0] and bf16["val_loss"] < bf16["losses"][0]


def test_recipe_benchmark_trains_both_recipes_on_the_same_tokens(data_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "recipe"
    result = subprocess.run(
        [sys.executable, "bench/recipe_bench.py", "--data-dir", str(data_copy), "--steps", "4", "--seq-len", "32",
         "--micro-batch-size", "2", "--precision", "fp32", "--lr-warmup", "1", "--eval-tokens", "2048",
         "--out", str(out)], cwd=REPO, env=subprocess_env(data_copy), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    onecard, reference = (json.loads((out / f"{name}.json").read_text()) for name in ("onecard", "reference"))
    for record in (onecard, reference):
        assert record["benchmark"] == "recipe" and len(record["losses"]) == 4 and record["tokens"] == 4 * 2 * 32
        assert record["val_loss"] < record["losses"][0]
    # same initial weights, same first batch, fp32: the first loss is the same number; the schedules differ
    # only in nanoGPT's warmup rounding, so the runs stay close but are not identical
    assert onecard["losses"][0] == pytest.approx(reference["losses"][0], rel=1e-6)
    assert onecard["losses"][1:] != reference["losses"][1:]
    assert onecard["relative_val_loss"] == pytest.approx(onecard["val_loss"] / reference["val_loss"])
    assert "final validation loss" in (out / "table.md").read_text()
