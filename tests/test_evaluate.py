"""The evaluate stage: validation loss against the untrained model, samples, and a faithful HF export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO

from pipeline.config import PipelineError
from pipeline.data import TokenSequences
from pipeline.evaluate import EvaluateConfig, run
from pipeline.shard import load_index
from pipeline.train import TrainConfig
from pipeline.train import run as train_run


def train(data_dir: Path, run_name: str, config: str = "zero2_offload", **options) -> None:
    settings = {"seq_len": 32, "micro_batch_size": 4, "max_steps": 30, "lr": 3e-3, "warmup_steps": 3,
                "precision": "fp32", **options}
    train_run(TrainConfig(data_dir=data_dir, deepspeed=str(REPO / "ds_configs" / f"{config}.json"), run=run_name,
                          **settings))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, builtin_data: Path) -> Path:
    import shutil

    data_dir = tmp_path_factory.mktemp("evaluated") / "data"
    shutil.copytree(builtin_data, data_dir)
    train(data_dir, "run")
    run(EvaluateConfig(data_dir=data_dir, run="run", eval_tokens=4096))
    return data_dir


def test_report_shows_learning_against_the_untrained_model(evaluated: Path) -> None:
    report = json.loads((evaluated / "eval" / "run" / "report.json").read_text())
    assert report["step"] == 30 and report["tokens_seen"] == 30 * 4 * 32
    assert report["untrained_val_loss"] == pytest.approx(math.log(512), abs=0.1)  # uniform over the vocabulary
    assert report["val_loss"] < report["untrained_val_loss"] - 0.5
    assert report["val_perplexity"] == pytest.approx(math.exp(report["val_loss"]))
    assert report["eval_tokens"] == 4096
    assert len(report["samples"]) == 3 and all(s["text"].startswith(s["prompt"]) for s in report["samples"])
    markdown = (evaluated / "eval" / "run" / "report.md").read_text()
    assert f"{report['val_loss']:.4f}" in markdown and f"{report['untrained_val_loss']:.4f}" in markdown


def test_export_loads_with_transformers_and_gives_the_same_loss(evaluated: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    export = evaluated / "export" / "run"
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= {p.name for p in export.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert len(tokenizer) == model.config.vocab_size == 512
    shards = evaluated / "shards" / "builtin"
    val = TokenSequences(shards, load_index(shards), "val", 32)
    rows = torch.from_numpy(val.get(np.arange(4096 // 32)))
    with torch.no_grad():  # transformers' own loss (it shifts the labels itself), not onecard's
        loss = np.mean([model(input_ids=row[None], labels=row[None]).loss.item() for row in rows])
    report = json.loads((evaluated / "eval" / "run" / "report.json").read_text())
    assert loss == pytest.approx(report["val_loss"], rel=1e-5)
    assert report["export_val_loss"] == pytest.approx(report["val_loss"], rel=1e-6)
    generated = pipeline("text-generation", model=str(export), device="cpu")("The", max_new_tokens=5, do_sample=False)
    assert generated[0]["generated_text"].startswith("The")


def test_unchanged_run_is_not_evaluated_again_and_a_longer_run_is(evaluated: Path) -> None:
    report = evaluated / "eval" / "run" / "report.json"
    before = report.stat().st_mtime_ns
    run(EvaluateConfig(data_dir=evaluated, run="run", eval_tokens=4096))
    assert report.stat().st_mtime_ns == before
    train(evaluated, "run", max_steps=32)
    run(EvaluateConfig(data_dir=evaluated, run="run", eval_tokens=4096))
    assert json.loads(report.read_text())["step"] == 32


def test_nvme_checkpoints_are_evaluated_too(data_copy: Path) -> None:
    train(data_copy, "nvme", "zero3_nvme", max_steps=3)
    run(EvaluateConfig(data_dir=data_copy, eval_tokens=1024))  # the only run: no --run needed
    report = json.loads((data_copy / "eval" / "nvme" / "report.json").read_text())
    assert report["export_val_loss"] == pytest.approx(report["val_loss"], rel=1e-6)


def test_run_selection_and_damaged_checkpoints_give_clear_errors(data_copy: Path) -> None:
    with pytest.raises(PipelineError, match=r"holds 0 trained runs \(none\): train one first"):
        run(EvaluateConfig(data_dir=data_copy))
    train(data_copy, "a", max_steps=2)
    train(data_copy, "b", max_steps=2)
    with pytest.raises(PipelineError, match=r"holds 2 trained runs \(a, b\): choose one with --run"):
        run(EvaluateConfig(data_dir=data_copy))
    weights = data_copy / "checkpoints" / "a" / "step_00000002" / "model_fp32.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(PipelineError, match=r"model_fp32\.safetensors does not match the sha256"):
        run(EvaluateConfig(data_dir=data_copy, run="a"))
    assert not (data_copy / "eval" / "a").exists()
