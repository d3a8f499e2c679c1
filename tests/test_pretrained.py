"""--init-from: training starts from released weights (a local folder or a hub id), checked against the shards'
tokenizer and the preset before anything is allocated, and trains as plain AdamW would from the same start."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, english_documents, plain_adamw, prepare, subprocess_env, write_gpt2_format, write_jsonl

from pipeline.checkpoint import load_weights
from pipeline.data import TokenSequences, TrainBatches
from pipeline.evaluate import EvaluateConfig
from pipeline.evaluate import run as evaluate_run
from pipeline.metrics import read_metrics
from pipeline.model import build_model
from pipeline.shard_format import load_index
from pipeline.stage import PipelineError
from pipeline.train import TrainConfig
from pipeline.train import run as train_run

SEQ_LEN = 32
SETTINGS = {"seq_len": SEQ_LEN, "micro_batch_size": 2, "max_steps": 3, "warmup_steps": 1, "precision": "fp32",
            "lr": 1e-3, "eval_every": 0, "log_every": 1}


def released_model(folder: Path, tokenizer: Path, vocab_size: int, eot_id: int, seed: int = 7) -> Path:
    """A small GPT-2 as `save_pretrained` writes it (safetensors), with its GPT-2-format tokenizer beside it."""
    torch.manual_seed(seed)
    build_model("tiny", vocab_size, eot_id).save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data directory tokenized with the model's tokenizer, the model's folder)."""
    root = tmp_path_factory.mktemp("released")
    texts = english_documents(80, 120, seed=3)
    tokenizer = write_gpt2_format(root / "tokenizer", texts, 300)
    data_dir = prepare(root / "data", str(write_jsonl(root / "docs.jsonl", texts)), "docs", str(tokenizer))
    index = load_index(data_dir / "shards" / "docs")
    return data_dir, released_model(root / "gpt2-small", tokenizer, index["vocab_size"], index["eot_id"])


def adamw_from(model_dir: Path, data_dir: Path, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same recipe in plain PyTorch from the same released weights."""
    from transformers import GPT2LMHeadModel

    shards = data_dir / "shards" / "docs"
    batches = TrainBatches(TokenSequences(shards, load_index(shards), "train", SEQ_LEN), 1337, 2, 1, 1)
    torch.manual_seed(1337)
    model = GPT2LMHeadModel.from_pretrained(model_dir, use_safetensors=True)
    return plain_adamw(model, batches, steps, 1, lr=1e-3, warmup_steps=1), model.state_dict()


@pytest.mark.slow
def test_training_from_released_weights_is_adamw_from_them(released: tuple[Path, Path], tmp_path: Path) -> None:
    data_dir, model_dir = released
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    train_run(TrainConfig(data_dir=data, corpus="docs", deepspeed=str(REPO / "ds_configs" / "zero2_offload.json"),
                          run="tuned", init_from=str(model_dir), **SETTINGS))
    expected, expected_weights = adamw_from(model_dir, data, 3)
    got = [m["loss"] for m in read_metrics(data / "runs" / "tuned")]
    assert got == pytest.approx(expected, rel=1e-5)  # step 1 is the released model's own loss on that batch
    _, weights = load_weights(data / "checkpoints" / "tuned")
    for name, value in weights.items():
        torch.testing.assert_close(value, expected_weights[name], rtol=1e-4, atol=1e-5, msg=name)
    saved = json.loads((data / "checkpoints" / "tuned" / "run.json").read_text())
    assert saved["identity"]["preset"] == "tiny" and saved["identity"]["init"]["init_from"] == str(model_dir)
    assert len(saved["identity"]["init"]["sha256"]) == 64
    # a resume must come from the same weights
    other = released_model(tmp_path / "other", data_dir.parent / "tokenizer", saved["identity"]["vocab_size"], 0, 8)
    with pytest.raises(PipelineError, match=r"different settings \(init\)"):
        train_run(TrainConfig(data_dir=data, corpus="docs", deepspeed=str(REPO / "ds_configs" / "zero2_offload.json"),
                              run="tuned", init_from=str(other), **{**SETTINGS, "max_steps": 4}))
    # evaluate measures what training changed from the released weights, not from a random model
    evaluate_run(EvaluateConfig(data_dir=data, run="tuned", eval_tokens=2048))
    report = json.loads((data / "eval" / "tuned" / "report.json").read_text())
    assert report["start"] == f"the starting weights ({model_dir})"
    assert report["start_val_loss"] < 6  # a random model of this vocabulary starts near log(300) = 5.7
    assert report["val_loss"] < report["start_val_loss"]


def write_bin_only(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"n_layer": 6, "n_embd": 192, "n_head": 6, "n_positions": 256}))
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    return folder


@pytest.mark.parametrize(("case", "message"), [
    ("missing folder", r"--init-from .*nowhere: no such folder"),
    (".bin only", r"has no model\.safetensors \(nor sharded .*\), only pytorch_model\.bin \(pickle, which onecard"),
    ("other vocabulary", r"has a vocabulary of 400 tokens, and the shards were made with \d+.*--tokenizer"),
    ("other merges", r"its tokenizer differs from .* in model\.merges\. .*python -m pipeline\.tokenize --tokenizer"),
    ("other shape", r"--preset gpt2, but --init-from .* is of the tiny shape"),
])
def test_weights_that_do_not_fit_the_run_are_refused_before_anything_is_written(
        released: tuple[Path, Path], tmp_path: Path, case: str, message: str) -> None:
    data_dir, model_dir = released
    options = {}
    if case == "missing folder":
        source = tmp_path / "nowhere"
    elif case == ".bin only":
        source = write_bin_only(tmp_path / "bin-only")
    elif case == "other vocabulary":
        source = tmp_path / "big-vocabulary"
        torch.manual_seed(0)
        build_model("tiny", 400, 399).save_pretrained(source, safe_serialization=True)
    elif case == "other merges":
        source = shutil.copytree(model_dir, tmp_path / "other-merges")
        merges = (source / "merges.txt").read_text().splitlines()
        (source / "merges.txt").write_text("\n".join([merges[0], merges[2], merges[1], *merges[3:]]) + "\n")
    else:
        source, options = model_dir, {"preset": "gpt2"}
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))
    with pytest.raises(PipelineError, match=message):
        train_run(TrainConfig(data_dir=data_dir, corpus="docs", run="refused", init_from=str(source),
                              deepspeed=str(REPO / "ds_configs" / "zero2_offload.json"), **{**SETTINGS, **options}))
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before


def test_a_hub_id_is_found_in_the_local_hub_cache(released: tuple[Path, Path], tmp_path: Path) -> None:
    """`--init-from org/name` goes through huggingface_hub's snapshot_download; offline, from its cache layout."""
    _, model_dir = released
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-gpt2"
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {**subprocess_env(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    script = ("import json; from pipeline import pretrained; from transformers import AutoConfig; "
              "folder = pretrained.locate('someone/tiny-gpt2'); "
              "model = pretrained.load(folder, AutoConfig.from_pretrained(folder)); "
              "print(json.dumps([str(folder), pretrained.source('someone/tiny-gpt2', folder), "
              "pretrained.preset_of(pretrained.read_config(folder, 'x')), model.config.n_layer]))")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    folder, source, preset, layers = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(folder).name == revision and preset == "tiny" and layers == 6
    assert source == {"init_from": "someone/tiny-gpt2", "revision": revision}
    env.pop("HF_HOME")
    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    result = subprocess.run([sys.executable, "-c", script.replace("someone/", "nobody/")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "cannot get it from the Hugging Face hub or its local cache" in result.stderr
