"""Released weights to start training from: a Hugging Face hub id (`openai-community/gpt2-xl`, `gpt2`, ...) or a
local folder with config.json + model.safetensors (an onecard export is one). Loaded through transformers from
safetensors only (no pickle), never with the folder's own code; checked against a preset's shape and against the
tokenizer the shards were made with before anything is allocated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.artifacts import sha256_file
from pipeline.model import PRESETS
from pipeline.stage import PipelineError

WEIGHTS = "model.safetensors"
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
        return Path(snapshot_download(spec, allow_patterns=["config.json", WEIGHTS, *TOKENIZER_FILES]))
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
    if not (folder / WEIGHTS).is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        raise PipelineError(
            f"--init-from {spec}: {folder} has no {WEIGHTS}"
            + (f", only {', '.join(pickled)} (pickle, which onecard never loads)" if pickled else "")
            + ". Convert it once with transformers: `AutoModelForCausalLM.from_pretrained(folder)"
              ".save_pretrained(folder, safe_serialization=True)` in a session you trust."
        )
    return json.loads((folder / "config.json").read_text())


def preset_of(config: dict[str, Any], spec: str) -> str:
    """The preset with the weights' shape (layers, width, heads, context)."""
    shape = (config.get("n_layer"), config.get("n_embd"), config.get("n_head"), config.get("n_positions"))
    for name, preset in PRESETS.items():
        if preset == shape:
            return name
    raise PipelineError(
        f"--init-from {spec}: its shape (layers, width, heads, context) {shape} is none of onecard's GPT-2 presets "
        f"({', '.join(f'{n} {s}' for n, s in PRESETS.items())}).")


def check_tokenizer(folder: Path, spec: str, config: dict[str, Any], shards_tokenizer: Path,
                    shards_vocab_size: int) -> None:
    """The shards must be made with the weights' tokenizer: the same vocabulary and merges."""
    fix = (f"Tokenize with the model's tokenizer: python -m pipeline.tokenize --tokenizer {spec} --force "
           "(then shard again).")
    if config.get("vocab_size") != shards_vocab_size:
        raise PipelineError(f"--init-from {spec} has a vocabulary of {config.get('vocab_size')} tokens, and the "
                            f"shards were made with {shards_vocab_size} ({shards_tokenizer.name}). {fix}")
    ours = bpe(shards_tokenizer)
    theirs = bpe(folder)
    if theirs is not None and ours != theirs:
        raise PipelineError(f"--init-from {spec}: its tokenizer's vocabulary or merges differ from those the shards "
                            f"were made with ({shards_tokenizer}). {fix}")


def bpe(folder: Path) -> tuple[dict[str, int], list[tuple[str, ...]]] | None:
    """(vocabulary, merges) of a byte-level BPE tokenizer folder: tokenizer.json, or GPT-2's vocab.json +
    merges.txt; None when the folder has neither."""
    if (folder / "tokenizer.json").is_file():
        model = json.loads((folder / "tokenizer.json").read_text())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        return model.get("vocab", {}), merges
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        return json.loads((folder / "vocab.json").read_text(encoding="utf-8")), merges
    return None


def source(spec: str, folder: Path) -> dict[str, Any]:
    """Where the weights came from, for the run's identity: the hub revision, or the weights file's sha256."""
    if "snapshots" in folder.parts:  # the hub cache: snapshots/<commit>/
        return {"init_from": spec, "revision": folder.name}
    return {"init_from": spec, "sha256": sha256_file(folder / WEIGHTS)}


def load(folder: Path, activation: str) -> Any:
    """The weights as a GPT2LMHeadModel (float32, on the CPU), from safetensors, with no code of the folder's."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(folder, use_safetensors=True, trust_remote_code=False,
                                           activation_function=activation, use_cache=False)
