"""Bad input, table-driven: each case gives one clear paragraph naming the file or option and the fix, exits 2,
and leaves every existing artifact byte for byte as it was."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import REPO, rehash_shards, subprocess_env

from pipeline import download, evaluate, shard, tokenize, train
from pipeline.artifacts import sha256_file
from pipeline.stage import stage_main

STAGES = {"download": (download.DownloadConfig, download.run), "tokenize": (tokenize.TokenizeConfig, tokenize.run),
          "shard": (shard.ShardConfig, shard.run), "train": (train.TrainConfig, train.run),
          "evaluate": (evaluate.EvaluateConfig, evaluate.run)}
TRAIN = ["--seq-len", "32", "--micro-batch-size", "2", "--max-steps", "1", "--eval-every", "0"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_file(data: Path) -> Path:
    return data / "shards" / "builtin" / "train_000000.bin"


def truncate(data: Path) -> None:
    path = shard_file(data)
    path.write_bytes(path.read_bytes()[:-10])
    rehash_shards(data / "shards" / "builtin")


def wrong_magic(data: Path) -> None:
    path = shard_file(data)
    path.write_bytes(b"NOTSHARD" + path.read_bytes()[8:])
    rehash_shards(data / "shards" / "builtin")


def flip_a_byte(data: Path) -> None:
    path = shard_file(data)
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF
    path.write_bytes(bytes(raw))


def other_vocabulary(data: Path) -> None:
    """A run whose checkpoints were trained on a 300-token vocabulary; the shards now have 512."""
    run_file = data / "checkpoints" / "resume" / "run.json"
    saved = json.loads(run_file.read_text())
    saved["identity"]["vocab_size"] = 300
    run_file.write_text(json.dumps(saved))


def no_download(data: Path) -> None:
    pass


def arch_specific_cuda_target(data: Path) -> dict[str, str]:
    return {"TORCH_CUDA_ARCH_LIST": "8.0;9.0a"}  # set by some CUDA images; DeepSpeed's builder cannot parse it


def write(name: str, content: bytes) -> Callable[[Path], None]:
    def setup(data: Path) -> None:
        (data.parent / name).write_bytes(content)
    return setup


CASES = [
    # (name, setup (which may return environment variables), stage, arguments, what the message must say)
    ("truncated shard", truncate, "shard", ["--verify"], r"train_000000\.bin is truncated or padded.*--force"),
    ("wrong magic", wrong_magic, "shard", ["--verify"], r"train_000000\.bin is not a onecard shard: wrong magic"),
    ("checksum mismatch", flip_a_byte, "shard", ["--verify"],
     r"train_000000\.bin does not match the sha256 in .*manifest\.json"),
    ("vocabulary changed under a run", other_vocabulary, "train",
     ["--deepspeed", "ds_configs/zero2_offload.json", "--run", "resume", *TRAIN],
     r"holds a run made with different settings \(.*vocab_size.*\).*--run NAME.*--force"),
    ("missing upstream manifest", no_download, "tokenize", ["--corpus", "nothing-downloaded"],
     r"raw/nothing-downloaded.*python -m pipeline\.download"),
    ("malformed DeepSpeed JSON", write("bad.json", b'{"train_micro_batch_size_per_gpu": 2,}'), "train",
     ["--deepspeed", "{parent}/bad.json", *TRAIN], r"bad\.json is not valid JSON: .* line 1.*no trailing commas"),
    ("batch sizes against the world size",
     write("batch.json", json.dumps({"train_batch_size": 7, "train_micro_batch_size_per_gpu": 2,
                                     "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
                                     "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}).encode()),
     "train", ["--deepspeed", "{parent}/batch.json", "--seq-len", "32", "--max-steps", "1"],
     r"train_batch_size.*7.*2 .*1 .*1"),
    ("unknown preset", no_download, "train", ["--deepspeed", "ds_configs/zero2_offload.json", "--preset", "gpt5"],
     r"unknown --preset 'gpt5'; choose one of tiny, gpt2"),
    ("NVMe path not writable", write("a-file", b"x"), "train",
     ["--deepspeed", "ds_configs/zero3_nvme.json", "--nvme-path", "{parent}/a-file/nvme", *TRAIN],
     r"NVMe swap folder .*a-file/nvme.* is not writable.*--nvme-path"),
    ("CUDA arch list DeepSpeed cannot build for", arch_specific_cuda_target, "train",
     ["--deepspeed", "ds_configs/zero3_nvme.json", *TRAIN], r"TORCH_CUDA_ARCH_LIST='8\.0;9\.0a' has '9\.0a'.*unset it"),
    ("--gpu-mem-cap larger than the card", no_download, "train",
     ["--deepspeed", "ds_configs/zero2_offload.json", "--gpu-mem-cap", "999", *TRAIN],
     r"--gpu-mem-cap 999\.0 needs a CUDA GPU|--gpu-mem-cap 999\.0 GiB is not within this GPU"),
    ("corpus that is not UTF-8", write("latin1.txt", "café au lait".encode("latin-1")), "download",
     ["--source", "{parent}/latin1.txt"], r"latin1\.txt.*UTF-8"),
    ("empty corpus", write("empty.txt", b"\n\n"), "download", ["--source", "{parent}/empty.txt"],
     r"gave no documents with text: the corpus is empty"),
    # evaluate reads every input before it scores anything: these fail in a second, not minutes in
    ("empty LAMBADA file", write("lambada.jsonl", b""), "evaluate", ["--run", "resume", "--lambada",
                                                                      "{parent}/lambada.jsonl"],
     r"lambada\.jsonl holds no LAMBADA items: there is nothing to score"),
    ("HellaSwag label out of range",
     write("hellaswag.jsonl", json.dumps({"ctx_a": "A man", "ctx_b": "then", "activity_label": "Cooking",
                                          "endings": ["a", "b", "c", "d"], "label": 7}).encode() + b"\n"),
     "evaluate", ["--run", "resume", "--hellaswag", "{parent}/hellaswag.jsonl"],
     r"hellaswag\.jsonl:1: label 7 is not the index of one of its 4 endings"),
    ("a folder given as a benchmark file", no_download, "evaluate", ["--run", "resume", "--lambada", "{parent}"],
     r"is a folder\. Give the path of the benchmark's \.jsonl file in it"),
    ("malformed benchmark line", write("lambada.jsonl", b'{"text": "one two"}\n{"text": \n'), "evaluate",
     ["--run", "resume", "--eval-text", "{parent}/lambada.jsonl", "--lambada", "{parent}/lambada.jsonl"],
     r"lambada\.jsonl:2 is not a JSON line"),
    ("empty --eval-text", write("blank.txt", b"\n"), "evaluate", ["--run", "resume", "--eval-text",
                                                                   "{parent}/blank.txt"],
     r"--eval-text .*blank\.txt is empty: there is nothing to score"),
]


@pytest.fixture(scope="module")
def with_a_run(tmp_path_factory: pytest.TempPathFactory, builtin_data: Path) -> Path:
    """The builtin data plus a one-step run named `resume`."""
    import shutil

    data = tmp_path_factory.mktemp("bad-input") / "data"
    shutil.copytree(builtin_data, data)
    train.run(train.TrainConfig(data_dir=data, deepspeed=str(REPO / "ds_configs" / "zero2_offload.json"),
                                run="resume", seq_len=32, micro_batch_size=2, max_steps=1, eval_every=0))
    return data


@pytest.mark.slow  # the fixture trains one step with a DeepSpeed engine
@pytest.mark.parametrize(("name", "setup", "stage", "arguments", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_any_damage(with_a_run: Path, tmp_path: Path, capfd: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch, name: str,
                                                setup: Callable[[Path], dict[str, str] | None], stage: str,
                                                arguments: list[str], message: str) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(with_a_run, data)
    for variable, value in (setup(data) or {}).items():
        monkeypatch.setenv(variable, value)
    before = digest(data)
    argv = ["--data-dir", str(data), *(a.replace("{parent}", str(tmp_path)) for a in arguments)]
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        stage_main(*STAGES[stage], argv)
    assert exit_info.value.code == 2
    error = capfd.readouterr().err
    errors = [line for line in error.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in error, error[-2000:]  # one paragraph, no traceback
    assert re.search(message, errors[0]), errors[0]
    assert digest(data) == before, name  # nothing existing was changed


def test_a_hub_name_while_offline_is_a_clear_error(tmp_path: Path) -> None:
    env = {**subprocess_env(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "pipeline.download", "--source", "hf:someone/some-dataset",
                             "--data-dir", str(tmp_path / "data")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert re.search(r"someone/some-dataset.*(offline|reach|network)", result.stderr, re.IGNORECASE), result.stderr
    assert not (tmp_path / "data" / "raw" / "some-dataset").exists()
