"""Llama, Qwen2 and Mistral through the train stage (GPT-2's cases are test_train.py's): from a config.json under
ZeRO-2 CPU offload as plain AdamW would train it, resumed exactly, and from saved weights under ZeRO-3 CPU offload
starting at transformers' own loss; a Llama from scratch through `make train`, and evaluated and exported."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    REPO,
    english_documents,
    plain_adamw,
    prepare,
    reference_device,
    tiny_values,
    write_jsonl,
    write_sentencepiece_style,
)

from pipeline import shard, tokenize
from pipeline.checkpoint import load_weights
from pipeline.data import TokenSequences, TrainBatches
from pipeline.evaluate import EvaluateConfig
from pipeline.evaluate import run as evaluate_run
from pipeline.families import config_from, for_training
from pipeline.metrics import read_metrics
from pipeline.model import FUSED_GELU, build
from pipeline.shard_format import load_index
from pipeline.stage import PipelineError
from pipeline.train import TrainConfig
from pipeline.train import run as train_run

pytestmark = pytest.mark.slow  # trains with a DeepSpeed engine: left out of `make test-fast`

SEQ_LEN, STEPS, ACCUM = 32, 6, 2
SETTINGS = {"seq_len": SEQ_LEN, "micro_batch_size": 2, "grad_accum": ACCUM, "max_steps": STEPS, "log_every": 1,
            "precision": "fp32", "lr": 2e-3, "warmup_steps": 2, "eval_every": 0}
# Qwen2 with a byte-level BPE (as Qwen2.5's); Llama and Mistral with a Unigram tokenizer that puts <s> first
CORPUS = {"llama": "spm", "qwen2": "bpe", "mistral": "spm"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One corpus tokenized two ways: a byte-level BPE trained on it, and a sentencepiece-style Unigram."""
    root = tmp_path_factory.mktemp("families")
    texts = english_documents(60, 80, seed=11)
    source = str(write_jsonl(root / "docs.jsonl", texts))
    prepare(root / "data", source, "bpe", "bpe:400")
    return prepare(root / "data", source, "spm", str(write_sentencepiece_style(root / "spm-tokenizer", texts)))


def write_config(folder: Path, family: str, data_dir: Path) -> Path:
    index = load_index(data_dir / "shards" / CORPUS[family])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_values(family, index["vocab_size"], index["eot_id"])))
    return folder / "config.json"


def batches(data_dir: Path, family: str) -> TrainBatches:
    shards = data_dir / "shards" / CORPUS[family]
    return TrainBatches(TokenSequences(shards, load_index(shards), "train", SEQ_LEN), 1337, 2, ACCUM, 1)


def train(data_dir: Path, family: str, config: str, run: str, **options) -> list[dict]:
    train_run(TrainConfig(data_dir=data_dir, corpus=CORPUS[family], deepspeed=str(REPO / "ds_configs" / config),
                          run=run, **{**SETTINGS, **options}))
    return read_metrics(data_dir / "runs" / run)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_each_family_trains_as_plain_adamw_resumes_exactly_and_starts_from_saved_weights(
        data: Path, tmp_path: Path, family: str) -> None:
    config_json = write_config(tmp_path / "model", family, data)
    # from scratch, ZeRO-2 with CPU offload: the losses and weights of plain AdamW from the same initialisation
    straight = train(data, family, "zero2_offload.json", f"{family}-straight", model=str(config_json))
    torch.manual_seed(1337)  # the run's seed, then the model: the trainer's order
    model = build(for_training(config_from(json.loads(config_json.read_text()), family), 0.0, FUSED_GELU),
                  reference_device("zero2_offload"))
    expected = plain_adamw(model, batches(data, family), STEPS, ACCUM, lr=2e-3, warmup_steps=2)
    assert [m["loss"] for m in straight] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    _, weights = load_weights(data / "checkpoints" / f"{family}-straight")
    expected_weights = model.state_dict()
    for name, value in weights.items():
        torch.testing.assert_close(value, expected_weights[name], rtol=1e-4, atol=1e-5, msg=name)
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in weights  # tied: saved once, as the token embedding
    else:
        assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])

    # resumed after step 3: the same run, bit for bit
    train(data, family, "zero2_offload.json", f"{family}-resumed", model=str(config_json), stop_after=3)
    resumed = train(data, family, "zero2_offload.json", f"{family}-resumed", model=str(config_json))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    _, again = load_weights(data / "checkpoints" / f"{family}-resumed")
    assert all(torch.equal(again[name], weights[name]) for name in weights)

    # from the trained weights as save_pretrained writes them, with the shards' tokenizer beside them, under
    # ZeRO-3 with CPU offload: step 1's loss is transformers' own forward on that batch
    saved = tmp_path / "saved"
    # Mistral's in shards with an index, as larger models are released (Mistral-7B's three)
    model.save_pretrained(saved, safe_serialization=True, max_shard_size="1MB" if family == "mistral" else "5GB")
    tokenizer = data / "tokenizer" / load_index(data / "shards" / CORPUS[family])["tokenizer"]["name"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, saved / name)
    tuned_data = data
    if family == "qwen2":
        # transformers loads the tokenizer of a qwen2 folder as Qwen2Tokenizer, whose own pre-tokenizer (Qwen's
        # regex) and NFC normalizer replace the byte-level BPE's: not the shards' tokenizer, and the check says so
        with pytest.raises(PipelineError, match=r"its tokenizer differs from .* in .*normalizer, pre_tokenizer"):
            train(data, family, "zero3_offload.json", f"{family}-tuned", init_from=str(saved), max_steps=2)
        # the fix it names, as `make run INIT_FROM=...` does: tokenize with the model's folder, then shard
        tuned_data = shutil.copytree(data, tmp_path / "retokenized")
        tokenize.run(tokenize.TokenizeConfig(data_dir=tuned_data, corpus="bpe", tokenizer=str(saved), force=True))
        shard.run(shard.ShardConfig(data_dir=tuned_data, corpus="bpe", force=True))
    tuned = train(tuned_data, family, "zero3_offload.json", f"{family}-tuned", init_from=str(saved), max_steps=2)
    reloaded = type(model).from_pretrained(saved).eval()
    with torch.no_grad():
        own = [F.cross_entropy(reloaded(input_ids=inputs).logits.flatten(0, 1), targets.flatten()).item()
               for inputs, targets in (batches(tuned_data, family).get(0, step, 0) for step in range(ACCUM))]
    assert tuned[0]["loss"] == pytest.approx(sum(own) / ACCUM, rel=1e-5)
    assert tuned[1]["loss"] < tuned[0]["loss"]
    # evaluated and exported like any run: the export reloads and gives the same loss, and its tokenizer, as
    # AutoTokenizer loads it, is the run's
    evaluate_run(EvaluateConfig(data_dir=tuned_data, run=f"{family}-tuned", eval_tokens=1024))
    report = json.loads((tuned_data / "eval" / f"{family}-tuned" / "report.json").read_text())
    assert report["family"] == family and report["export_val_loss"] == pytest.approx(report["val_loss"], rel=1e-6)
    assert report["start_val_loss"] == pytest.approx(tuned[0]["loss"], rel=0.05)  # the saved weights' own
    assert report["export_tokenizer_differences"] == []
    if family == "qwen2":  # ... except a qwen2 trained with another tokenizer: the report says what differs
        evaluate_run(EvaluateConfig(data_dir=data, run=f"{family}-straight", eval_tokens=1024))
        straight_report = json.loads((data / "eval" / f"{family}-straight" / "report.json").read_text())
        assert {"normalizer", "pre_tokenizer"} <= set(straight_report["export_tokenizer_differences"])
    weights_digest = json.loads((tuned_data / "checkpoints" / f"{family}-tuned" / "run.json").read_text())[
        "identity"]["init"]["sha256"]
    assert len(weights_digest) > 1 if family == "mistral" else len(weights_digest) == 64  # each shard's digest


def test_a_llama_from_its_config_through_make_train_then_evaluated_and_exported(data: Path, tmp_path: Path) -> None:
    from test_end_to_end import make
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_json = write_config(tmp_path / "tiny-llama", "llama", data)
    tokenizer_dir = data / "tokenizer" / load_index(data / "shards" / "spm")["tokenizer"]["name"]
    result = make(data, "train", f"MODEL={config_json}", "SOURCE=spm", "CORPUS=spm", f"TOKENIZER={tokenizer_dir}",
                  "CONFIG=ds_configs/zero3_offload.json", "STEPS=4",
                  "TRAIN_ARGS=--seq-len 32 --micro-batch-size 2 --precision fp32", "RUN=tiny-llama")
    assert "model tiny-llama/config.json (llama, 6 layers, width 192" in result.stderr.replace(str(tmp_path) + "/", "")
    evaluate_run(EvaluateConfig(data_dir=data, run="tiny-llama", eval_tokens=1024))
    report = json.loads((data / "eval" / "tiny-llama" / "report.json").read_text())
    assert report["family"] == "llama" and report["export_val_loss"] == pytest.approx(report["val_loss"], rel=1e-6)
    export = data / "export" / "tiny-llama"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    assert sys.modules["pipeline.train"].model_name(TrainConfig(model=str(config_json))) == "tiny-llama"


@pytest.mark.parametrize(("case", "message"), [
    ("small vocabulary", r"has a vocabulary of 100 tokens and the shards' tokenizer \d+: the model cannot take"),
    ("not a family", r"model_type 'bert' is not a family onecard trains; it takes gpt2, llama, qwen2, mistral"),
    ("with a preset", r"--model .* with --preset: give one of --preset, --model .* and --init-from"),
])
def test_a_config_the_run_cannot_use_is_refused_before_anything_is_written(data: Path, tmp_path: Path, case: str,
                                                                          message: str) -> None:
    values = tiny_values("llama", 100 if case == "small vocabulary" else 400, 2)
    if case == "not a family":
        values["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(values))
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    with pytest.raises(PipelineError, match=message):
        train(data, "llama", "zero2_offload.json", "refused", model=str(tmp_path / "config.json"),
              preset="llama-tiny" if case == "with a preset" else None)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
