"""Released weights to start training from: a Hugging Face hub id (`openai-community/gpt2-xl`, `gpt2`, ...) or a
local folder with config.json + model.safetensors (an onecard export is one), of one of the families
(pipeline/families.py). Loaded through transformers' own classes from safetensors only (no pickle), never with the
folder's own code; checked against the tokenizer the shards were made with before anything is allocated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.artifacts import sha256_file
from pipeline.model import PRESETS
from pipeline.stage import PipelineError
from pipeline.tokenizer import differences_from

WEIGHTS = "model.safetensors"
# larger models' weights come in shards, listed by an index (Mistral-7B: model-00001-of-00003.safetensors, ...)
SHARDED_WEIGHTS = ("model.safetensors.index.json", "model-*-of-*.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def locate(spec: str) -> Path:
    """The folder of `spec`: a local folder as it is, a hub id from the local Hugging Face cache (fetched into it
    first when the hub can be reached)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PipelineError(f"--init-from {spec}: no such folder. Give a folder with config.json and "
                            f"{WEIGHTS}, or a Hugging Face hub id such as openai-community/gpt2-xl.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=["config.json", WEIGHTS, *SHARDED_WEIGHTS,
                                                            *TOKENIZER_FILES]))
    except Exception as error:  # the hub client raises many kinds for "not reachable" and "no such repo"
        raise PipelineError(
            f"--init-from {spec}: cannot get it from the Hugging Face hub or its local cache ({error}). Check the "
            "name, fetch it once with network, or give a local folder with config.json and model.safetensors."
        ) from error


def read_config(folder: Path, spec: str) -> dict[str, Any]:
    """The weights' config.json, after checking that the folder holds safetensors weights."""
    if not (folder / "config.json").is_file():
        raise PipelineError(f"--init-from {spec}: {folder} has no config.json, so it is not a Hugging Face model "
                            "folder. Give the folder that `save_pretrained` (or onecard's evaluate export) wrote.")
    if not weight_files(folder):
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        raise PipelineError(
            f"--init-from {spec}: {folder} has no {WEIGHTS} (nor sharded safetensors with their index)"
            + (f", only {', '.join(pickled)} (pickle, which onecard never loads)" if pickled else "")
            + ". Convert it once with transformers: `AutoModelForCausalLM.from_pretrained(folder)"
              ".save_pretrained(folder, safe_serialization=True)` in a session you trust."
        )
    return json.loads((folder / "config.json").read_text())


def preset_of(config: dict[str, Any]) -> str | None:
    """The preset the weights have the shape of (every value the preset sets is the weights' too), if any."""
    for name, values in PRESETS.items():
        if all(config.get(key) == value for key, value in values.items()):
            return name
    return None


def check_tokenizer(folder: Path, spec: str, config: dict[str, Any], shards_tokenizer: Path,
                    shards_vocab_size: int) -> None:
    """The shards must be made with the weights' tokenizer: a vocabulary the model's embedding holds (released
    models often pad it: Qwen2.5's 151,936 rows for 151,665 tokens) and, when the weights come with their
    tokenizer, the same tokenizer whole, as tokenize would make it from their folder."""
    fix = (f"Tokenize with the model's tokenizer: python -m pipeline.tokenize --tokenizer {spec} --force "
           "(then shard again).")
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
    rows = config.get("vocab_size")
    if not isinstance(rows, int) or rows < shards_vocab_size or (rows != shards_vocab_size and not has_tokenizer):
        raise PipelineError(f"--init-from {spec} has a vocabulary of {rows} tokens, and the shards were made with "
                            f"{shards_vocab_size} ({shards_tokenizer.name}). {fix}")
    if has_tokenizer:
        differences = differences_from(str(folder), shards_tokenizer)
        if differences:
            raise PipelineError(f"--init-from {spec}: its tokenizer differs from the one the shards were made with "
                                f"({shards_tokenizer}) in {', '.join(differences)}. {fix}")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: model.safetensors, or the shards its index lists."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    index = folder / SHARDED_WEIGHTS[0]
    if not index.is_file():
        return []
    return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]


def source(spec: str, folder: Path) -> dict[str, Any]:
    """Where the weights came from, for the run's identity: the hub revision, or the weights files' sha256."""
    if "snapshots" in folder.parts:  # the hub cache: snapshots/<commit>/
        return {"init_from": spec, "revision": folder.name}
    files = weight_files(folder)
    if len(files) == 1:
        return {"init_from": spec, "sha256": sha256_file(files[0])}
    return {"init_from": spec, "sha256": {path.name: sha256_file(path) for path in files}}


def load(folder: Path, config: Any) -> Any:
    """The weights as transformers' own class of their family, configured by `config` (the weights' config.json
    as onecard trains it), in float32 on the CPU, from safetensors, with no code of the folder's."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=False)
