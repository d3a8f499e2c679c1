"""Helpers for the tests: text of a known shape, and running the data stages."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import numpy as np

from pipeline import download, shard, tokenize
from pipeline.families import config_from, for_training
from pipeline.model import FUSED_GELU, PRESETS
from pipeline.shard_format import ShardHeader, ShardWriter
from pipeline.tokenizer import gpt2_byte_chars

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly",
    "judge", "boxing", "matches", "and", "the", "river", "carries", "old", "leaves", "past", "the", "mill",
]


# config.json values of a tiny model of each family onecard trains (the vocabulary is the test's): GPT-2 and Llama
# are presets; Qwen2 has biased query/key/value projections; Mistral an untied output layer and a sliding window
# shorter than the tests' sequences.
TINY = {
    "gpt2": PRESETS["tiny"],
    "llama": PRESETS["llama-tiny"],
    "qwen2": {"model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 352, "max_position_embeddings": 256,
              "rope_theta": 1000000.0, "tie_word_embeddings": True},
    "mistral": {"model_type": "mistral", "num_hidden_layers": 4, "hidden_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 1, "intermediate_size": 352, "max_position_embeddings": 256,
                "sliding_window": 16, "tie_word_embeddings": False},
}


def tiny_values(family: str, vocab_size: int, eot_id: int) -> dict:
    """The config.json values of TINY[family] with a vocabulary."""
    return {**TINY[family], "vocab_size": vocab_size, "bos_token_id": eot_id, "eos_token_id": eot_id}


def tiny_model(family: str, vocab_size: int, eot_id: int, seed: int = 0):
    """A freshly initialised tiny model of `family`, as the trainer builds it."""
    import torch

    from pipeline.model import build

    torch.manual_seed(seed)
    return build(for_training(config_from(tiny_values(family, vocab_size, eot_id), family), 0.0, FUSED_GELU))


def english_documents(count: int, words: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents for tests that need text of a known shape."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(count)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def prepare(data_dir: Path, source: str, corpus: str, tokenizer: str, part: str | None = None,
            **shard_options) -> Path:
    """download -> tokenize -> shard into data_dir, through the stages' run(config) entries."""
    download.run(download.DownloadConfig(data_dir=data_dir, source=source, corpus=corpus, part=part))
    tokenize.run(tokenize.TokenizeConfig(data_dir=data_dir, corpus=corpus, tokenizer=tokenizer, part=part))
    shard.run(shard.ShardConfig(data_dir=data_dir, corpus=corpus, part=part, **shard_options))
    return data_dir


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (for a rendezvous, or to stand for an unreachable host)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def deepspeed_launcher() -> list[str]:
    """The `deepspeed` command of this environment, on a free rendezvous port (its default, 29500, may be held
    by another run on this machine)."""
    return [str(Path(sys.executable).with_name("deepspeed")), "--master_port", str(free_port())]


def subprocess_env(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["ONECARD_DATA"] = str(data_dir)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        env.pop(name, None)  # set in this process by in-process training; a launched run gets its own
    env["PYTHONUNBUFFERED"] = "1"
    return env


def reference_device(config: str, parameters: float = 1e6) -> str:
    """Where the trainer draws a new model's weights under a shipped config (pipeline.train.build_device): a
    reference built from the same seed must be drawn there too."""
    from pipeline.dsconfig import load_ds_config
    from pipeline.train import build_device

    return build_device(load_ds_config(REPO / "ds_configs" / f"{config}.json"), parameters)


def plain_adamw(model, batches, steps: int, accum: int, lr: float, warmup_steps: int) -> list[float]:
    """The trainer's recipe in plain PyTorch from `model` as it is: torch.optim.AdamW with the shipped configs'
    hyper-parameters, the trainer's schedule, gradient clipping at 1 — no DeepSpeed, no offload. The losses of
    each step; the model is trained in place, on the device the trainer computes on (a GPU's fp32 differs from a
    CPU's in the last bits, which Adam's normalised steps carry into the weights), and left on the CPU."""
    import torch

    from pipeline.dsconfig import load_ds_config
    from pipeline.model import lm_loss, optimizer_groups
    from pipeline.train import TrainConfig, lr_schedule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    adam = load_ds_config(REPO / "ds_configs" / "zero2_offload.json")["optimizer"]["params"]
    optimizer = torch.optim.AdamW(optimizer_groups(model, adam["weight_decay"]), lr=lr, betas=adam["betas"],
                                  eps=adam["eps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_schedule(TrainConfig(max_steps=steps, warmup_steps=warmup_steps)).as_lambda())
    losses = []
    for step in range(steps):
        total = 0.0
        for micro_step in range(accum):
            loss = lm_loss(model, *(t.to(device) for t in batches.get(step, micro_step, 0)))
            (loss / accum).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(total / accum)
    model.to("cpu")
    return losses


def write_gpt2_format(folder: Path, texts: list[str], vocab_size: int) -> Path:
    """A byte-level BPE trained on `texts`, written as OpenAI released GPT-2's: vocab.json + merges.txt, the 256
    bytes first in GPT-2's order, then one token per merge in merge order, then <|endoftext|> as the last id.
    (The real files cannot be used: tests make their own data.)"""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, show_progress=False)
    folder.mkdir(parents=True)
    bpe.save_model(str(folder))
    merges = [line.split() for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    vocab = {char: i for i, char in enumerate(gpt2_byte_chars().values())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return folder


def write_sentencepiece_style(folder: Path, texts: list[str], filler: int = 0) -> Path:
    """A Unigram tokenizer.json in the way of Llama 2 and Mistral (Metaspace pieces, <unk> <s> </s> as ids 0-2, a
    post-processor that puts <s> before a text) with a tokenizer_config.json naming its tokens; `filler` unused
    pieces come before the text's own, so that those get ids above `filler`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = sorted({"\u2581" + word for text in texts for word in text.split()})
    chars = sorted({"\u2581", *(char for text in texts for char in text if not char.isspace())})
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), *((f"<unused{i}>", -30.0) for i in range(filler)),
             *((char, -10.0) for char in chars), *((word, -2.0) for word in words)]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=0))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


def rehash_shards(shards_dir: Path) -> None:
    """Record changed shard files in index.json and manifest.json, as if written that way: then only the shard
    format's own checks can catch what is wrong inside them."""
    from pipeline.artifacts import sha256_file

    for name, key, listed in (("index.json", "file", "shards"), ("manifest.json", "path", "files")):
        record = json.loads((shards_dir / name).read_text())
        for entry in record[listed]:
            path = shards_dir / entry[key]
            entry["sha256"], entry["bytes"] = sha256_file(path), path.stat().st_size
        (shards_dir / name).write_text(json.dumps(record))


def write_shard(path: Path, documents: list[np.ndarray], vocab_size: int, eot_id: int) -> ShardHeader:
    """A whole shard from a list of documents (token id arrays), through the shard stage's writer."""
    with ShardWriter(path, vocab_size, eot_id) as writer:
        for ids in documents:
            writer.add_document(ids)
        return writer.close()
