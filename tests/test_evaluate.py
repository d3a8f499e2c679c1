"""The evaluate stage: validation loss against the untrained model, samples, and a faithful HF export."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import (
    REPO,
    english_documents,
    prepare,
    subprocess_env,
    tiny_values,
    write_jsonl,
    write_sentencepiece_style,
)

from pipeline.data import TokenSequences
from pipeline.evaluate import EvaluateConfig, run
from pipeline.metrics import read_metrics
from pipeline.shard_format import load_index
from pipeline.stage import PipelineError
from pipeline.train import TrainConfig
from pipeline.train import run as train_run

pytestmark = pytest.mark.slow  # trains with a DeepSpeed engine: left out of `make test-fast`


def train(data_dir: Path, run_name: str, config: str = "zero2_offload", **options) -> None:
    # cosine: over 30 steps at 3e-3 its falling rate makes each validation lower than the one before, which the
    # tests read as learning (WSD holds the peak for 24 of them and ends above its step-20 loss)
    settings = {"seq_len": 32, "micro_batch_size": 4, "max_steps": 30, "lr": 3e-3, "warmup_steps": 3,
                "precision": "fp32", "eval_every": 0, "schedule": "cosine", **options}
    train_run(TrainConfig(data_dir=data_dir, deepspeed=str(REPO / "ds_configs" / f"{config}.json"), run=run_name,
                          **settings))


def benchmark_files(folder: Path) -> dict[str, str]:
    """Small HellaSwag, LAMBADA and held-out-text files in the benchmarks' published formats."""
    sentences = english_documents(40, 12, seed=3)
    hellaswag = [{"ind": i, "activity_label": f"Topic {i}", "ctx_a": sentences[i], "ctx_b": "then the",
                  "ctx": "", "split": "val", "split_type": "indomain", "label": i % 4, "source_id": str(i),
                  "endings": [sentences[8 + 4 * i + k][:20 + 9 * k] for k in range(4)]} for i in range(8)]
    (folder / "hellaswag_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hellaswag))
    (folder / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences[:10]))
    (folder / "held-out.txt").write_text("\n\n".join(english_documents(30, 25, seed=9)))
    return {"hellaswag": str(folder / "hellaswag_val.jsonl"), "lambada": str(folder / "lambada_test.jsonl"),
            "eval_text": str(folder / "held-out.txt")}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, builtin_data: Path) -> Path:
    import shutil

    data_dir = tmp_path_factory.mktemp("evaluated") / "data"
    shutil.copytree(builtin_data, data_dir)
    train(data_dir, "run", eval_every=10, eval_tokens=4096)
    files = benchmark_files(data_dir.parent)
    started = time.time()
    run(EvaluateConfig(data_dir=data_dir, run="run", eval_tokens=4096, eval_stride=16, **files))
    (data_dir / "evaluate-seconds").write_text(str(time.time() - started))
    return data_dir


@pytest.fixture(scope="module")
def llama_evaluated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama trained from its config.json on text tokenized by a Unigram tokenizer that puts <s> first,
    then evaluated and exported."""
    root = tmp_path_factory.mktemp("llama-evaluated")
    texts = english_documents(60, 80, seed=11)
    data_dir = prepare(root / "data", str(write_jsonl(root / "docs.jsonl", texts)), "builtin",
                       str(write_sentencepiece_style(root / "tokenizer", texts)))
    index = load_index(data_dir / "shards" / "builtin")
    (root / "config.json").write_text(json.dumps(tiny_values("llama", index["vocab_size"], index["eot_id"])))
    train(data_dir, "run", model=str(root / "config.json"), max_steps=10)
    run(EvaluateConfig(data_dir=data_dir, run="run", eval_tokens=1024, **benchmark_files(root)))
    return data_dir


def test_report_shows_learning_against_the_untrained_model(evaluated: Path) -> None:
    report = json.loads((evaluated / "eval" / "run" / "report.json").read_text())
    assert report["step"] == 30 and report["tokens_seen"] == 30 * 4 * 32
    assert report["start"] == "the untrained model"
    assert report["start_val_loss"] == pytest.approx(math.log(512), abs=0.1)  # uniform over the vocabulary
    assert report["val_loss"] < report["start_val_loss"] - 0.5
    assert report["val_perplexity"] == pytest.approx(math.exp(report["val_loss"]))
    assert report["eval_tokens"] == 4096
    # the manifest's timing is the stage's (it scored everything), not only the writing of its files
    seconds = float((evaluated / "evaluate-seconds").read_text())
    assert json.loads((evaluated / "eval" / "run" / "manifest.json").read_text())["timing"]["seconds"] > seconds / 2
    assert len(report["samples"]) == 3 and all(s["text"].startswith(s["prompt"]) for s in report["samples"])
    markdown = (evaluated / "eval" / "run" / "report.md").read_text()
    assert f"{report['val_loss']:.4f}" in markdown and f"{report['start_val_loss']:.4f}" in markdown


def test_validation_during_training_agrees_with_the_evaluate_stage(evaluated: Path) -> None:
    from pipeline.report import read_curves

    metrics = read_metrics(evaluated / "runs" / "run")
    during = {m["step"]: m["eval/val_loss"] for m in metrics if "eval/val_loss" in m}
    assert sorted(during) == [10, 20, 30]
    assert during[10] > during[20] > during[30]
    report = json.loads((evaluated / "eval" / "run" / "report.json").read_text())
    assert during[30] == pytest.approx(report["val_loss"], rel=1e-5)  # same weights, same 4096 tokens
    curves = read_curves(evaluated / "runs" / "run")  # what TensorBoard shows
    assert [step for step, _ in curves["eval/val_loss"]] == [10, 20, 30]
    assert len(curves["train/loss"]) == 30


def test_report_records_benchmarks_digests_and_a_loss_plot(evaluated: Path) -> None:
    report = json.loads((evaluated / "eval" / "run" / "report.json").read_text())
    assert report["benchmarks"]["hellaswag"]["items"] == 8 and report["benchmarks"]["lambada"]["items"] == 10
    assert 0 <= report["benchmarks"]["hellaswag"]["acc_norm"] <= 1
    assert report["benchmarks"]["lambada"]["perplexity"] > 1
    text = report["eval_text"]
    assert (text["window"], text["stride"]) == (256, 16) and text["tokens"] > 500
    assert text["loss"] < report["start_val_loss"]
    tokenizer_json = evaluated / "tokenizer" / report["tokenizer"]["name"] / "tokenizer.json"
    assert report["tokenizer_sha256"] == hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()
    assert report["shards"] == json.loads((evaluated / "checkpoints" / "run" / "run.json").read_text())[
        "identity"]["shards"]
    plot = evaluated / "eval" / "run" / "loss.png"
    assert report["loss_plot"] == "loss.png" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (evaluated / "eval" / "run" / "report.md").read_text()
    assert "![loss curves](loss.png)" in markdown and "hellaswag (zero-shot)" in markdown
    assert f"{report['benchmarks']['lambada']['perplexity']:.4f}" in markdown


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


def harness_task(folder: Path, harness_yaml: str, name: str, split: str, data: str) -> None:
    """A harness task that is the harness's own definition (included from its package) on a local file."""
    import lm_eval

    included = Path(lm_eval.__file__).parent / "tasks" / harness_yaml
    (folder / f"{name}.yaml").write_text(
        f"include: {included}\ntask: {name}\ndataset_path: json\ndataset_name: null\ntraining_split: null\n"
        f"dataset_kwargs:\n  data_files:\n    {split}: {data}\n")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lm_evaluation_harness_agrees_with_the_evaluate_stage(family: str, request: pytest.FixtureRequest,
                                                              tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import zeroshot

    evaluated = request.getfixturevalue({"gpt2": "evaluated", "llama": "llama_evaluated"}[family])
    files = benchmark_files(evaluated.parent)
    harness_task(tmp_path, "hellaswag/hellaswag.yaml", "onecard_hellaswag", "validation", files["hellaswag"])
    harness_task(tmp_path, "lambada/lambada_openai.yaml", "onecard_lambada", "test", files["lambada"])
    export = evaluated / "export" / "run"
    env = {**subprocess_env(evaluated), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={export},dtype=float32",
         "--tasks", "onecard_hellaswag,onecard_lambada", "--include_path", str(tmp_path), "--device", "cpu",
         "--batch_size", "4", "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    harness = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    ours = json.loads((evaluated / "eval" / "run" / "report.json").read_text())["benchmarks"]
    assert harness["onecard_hellaswag"]["acc,none"] == ours["hellaswag"]["acc"]
    assert harness["onecard_hellaswag"]["acc_norm,none"] == ours["hellaswag"]["acc_norm"]
    assert harness["onecard_lambada"]["acc,none"] == ours["lambada"]["acc"]
    assert harness["onecard_lambada"]["perplexity,none"] == pytest.approx(ours["lambada"]["perplexity"], rel=1e-4)

    # item by item: the same (context, continuation) requests and the same log-likelihoods
    model, tokenizer = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert type(model).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
    items = zeroshot.hellaswag_items(files["hellaswag"])
    pairs = [(item.query, " " + choice) for item in items for choice in item.choices]
    prefix = tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id
    scores = zeroshot.loglikelihoods(model, tokenizer, pairs, prefix, 256)
    samples = sorted((json.loads(line) for line in next((tmp_path / "out").rglob("samples_onecard_hellaswag_*"))
                      .read_text().splitlines()), key=lambda sample: sample["doc_id"])
    harness_pairs = [(a["arg_0"], a["arg_1"]) for sample in samples for a in sample["arguments"].values()]
    harness_scores = [float(resp[0][0]) for sample in samples for resp in sample["resps"]]
    assert harness_pairs == pairs
    assert [score for score, _ in scores] == pytest.approx(harness_scores, rel=1e-4)


def test_unchanged_run_is_not_evaluated_again_and_a_longer_run_is(evaluated: Path) -> None:
    report = evaluated / "eval" / "run" / "report.json"
    files = benchmark_files(evaluated.parent)  # the same contents again: nothing changed
    before = report.stat().st_mtime_ns
    run(EvaluateConfig(data_dir=evaluated, run="run", eval_tokens=4096, eval_stride=16, **files))
    assert report.stat().st_mtime_ns == before
    train(evaluated, "run", max_steps=32, allow_schedule_change=True)  # a decayed run made longer: its rate jumps
    run(EvaluateConfig(data_dir=evaluated, run="run", eval_tokens=4096, eval_stride=16, **files))
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
        run(EvaluateConfig(data_dir=data_copy, run="a", eval_tokens=1024))
    assert not (data_copy / "eval" / "a").exists()
