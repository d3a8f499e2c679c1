"""Tokenizers: make or fetch one (a byte-level BPE trained on the corpus, GPT-2's files, any Hugging Face
tokenizer.json: BPE or Unigram, a hub tokenizer) into `tokenizer/<name>/` in Hugging Face format, find the tokens
that frame a document (the tokenizer's own end-of-text token, and its beginning-of-text token where it puts one
before a text), compare two tokenizers whole, load one, and encode with tiktoken where that is exact."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import StageOutput, read_manifest, verify_files, write_json_atomic
from pipeline.documents import read_documents
from pipeline.stage import DataDir, PipelineError

FORMAT_VERSION = 1
EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer regex, as OpenAI released it (and as `tokenizers`' ByteLevel uses it)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tokenizer_name(spec: str, corpus: str) -> str:
    if spec.startswith("bpe:"):
        return f"{corpus}-bpe{spec[4:]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(spec.rstrip("/")).name).strip("-.") or "tokenizer"


def _train_bpe(vocab_size: int, raw_dir: Path) -> Any:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        read_documents(raw_dir), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT], show_progress=False
    )
    return bpe._tokenizer


def _no_eot(spec: str) -> PipelineError:
    return PipelineError(f"tokenizer {spec!r} has no end-of-text token (no eos_token in its tokenizer_config.json, "
                         f"no {EOT} in its vocabulary); onecard separates documents with it. Add the model's "
                         "eos_token to its tokenizer_config.json, or train one with --tokenizer bpe:VOCAB_SIZE.")


def _gpt2_files(folder: Path, spec: str) -> Any:
    """GPT-2's original release format, vocab.json + merges.txt, as a `tokenizers` byte-level BPE."""
    from tokenizers import AddedToken, ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    if bpe.token_to_id(EOT) is None:
        raise _no_eot(spec)
    bpe.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])  # keeps its id, now special
    return bpe._tokenizer


def _save(backend: Any, folder: Path) -> None:
    """A `tokenizers` tokenizer as a Hugging Face tokenizer folder that AutoTokenizer loads."""
    backend.save(str(folder / "tokenizer.json"))
    write_json_atomic(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "clean_up_tokenization_spaces": False})


def _save_pretrained(spec: str, folder: Path) -> None:
    """A tokenizer of the Hugging Face hub, or a local folder with tokenizer.json, copied through transformers."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise PipelineError(
            f"cannot load tokenizer {spec!r} ({error}). Give a hub name you can reach (e.g. gpt2), a local folder "
            "with tokenizer.json or vocab.json + merges.txt, or bpe:VOCAB to train one offline."
        ) from error
    tokenizer.save_pretrained(folder)


def write_tokenizer(spec: str, folder: Path, raw_dir: Path | None = None) -> None:
    """The tokenizer files of `--tokenizer spec` (trained on `raw_dir` for bpe:) in `folder`, as tokenize uses
    them."""
    local = Path(spec).expanduser()
    if spec.startswith("bpe:"):
        _save(_train_bpe(int(spec[4:]), raw_dir), folder)
    elif local.is_dir() and not (local / "tokenizer.json").is_file():
        if not ((local / "vocab.json").is_file() and (local / "merges.txt").is_file()):
            raise PipelineError(
                f"{local} holds neither tokenizer.json nor vocab.json + merges.txt: it is not a tokenizer folder.")
        _save(_gpt2_files(local, spec), folder)
    else:
        _save_pretrained(str(local) if local.is_dir() else spec, folder)


def document_tokens(folder: Path, spec: str) -> dict[str, Any]:
    """The tokens that frame a document: the tokenizer's own end-of-text token (its eos_token: GPT-2's and
    Qwen2.5's <|endoftext|>, Llama 3's <|end_of_text|>, Mistral's </s>), written between documents, and the
    beginning-of-text token the tokenizer puts before a text when it has one of its own (Llama's <|begin_of_text|>,
    Mistral's <s>), written at the start of each document; None where it has none."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    eot = tokenizer.eos_token or (EOT if EOT in tokenizer.get_vocab() else None)
    if eot is None or eot not in tokenizer.get_vocab():
        raise _no_eot(spec)
    eot_id, bos_id = tokenizer.convert_tokens_to_ids(eot), tokenizer.bos_token_id
    puts_bos = bos_id is not None and bos_id != eot_id and tokenizer("a")["input_ids"][:1] == [bos_id]
    return {"eot": eot, "eot_id": eot_id, "bos_id": bos_id if puts_bos else None}


# What a tokenizer.json holds that does not change the ids: limits set for a batch, the file format's version.
NOT_ENCODING = ("truncation", "padding", "version")


def tokenizer_differences(ours: Path, theirs: Path) -> list[str]:
    """What differs between two tokenizer folders as tokenize writes them: the parts of tokenizer.json that
    make the ids (the model with its vocabulary and merges or pieces, normalizer, pre-tokenizer, post-processor,
    decoder, added tokens) and the tokens that frame a document."""
    a, b = (json.loads((folder / "tokenizer.json").read_text()) for folder in (ours, theirs))
    differences = []
    for key in sorted((set(a) | set(b)) - set(NOT_ENCODING)):
        if key == "model" and isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            differences += [f"model.{part}" for part in sorted(set(a[key]) | set(b[key]))
                            if a[key].get(part) != b[key].get(part)]
        elif a.get(key) != b.get(key):
            differences.append(key)
    framing_a, framing_b = document_tokens(ours, str(ours)), document_tokens(theirs, str(theirs))
    differences += [f"{name} {framing_a[name]!r} vs {framing_b[name]!r}" for name in framing_a
                    if framing_a[name] != framing_b[name]]
    return differences


def differences_from(spec: str, ours: Path) -> list[str]:
    """What differs between the tokenizer folder `ours` and the tokenizer tokenize would make of `spec`."""
    with tempfile.TemporaryDirectory(prefix="onecard-tokenizer-") as scratch:
        write_tokenizer(spec, Path(scratch))
        return tokenizer_differences(ours, Path(scratch))


def build_tokenizer(spec: str, data: DataDir, corpus: str, raw_dir: Path, force: bool = False) -> Path:
    """The tokenizer folder for `--tokenizer spec` (trained on `raw_dir` for bpe:), made once and reused."""
    params: dict[str, Any] = {"spec": spec}
    inputs = {}
    if spec.startswith("bpe:"):
        if not spec[4:].isdigit() or int(spec[4:]) < 258:
            raise PipelineError(f"--tokenizer {spec}: the vocabulary size must be an integer of at least 258.")
        inputs["raw"] = raw_dir  # a trained tokenizer depends on the corpus it was trained on
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser().resolve()
        params["spec"] = str(folder)
        params["files"] = sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in folder.iterdir())
    name = tokenizer_name(spec, corpus)
    out = StageOutput(data.tokenizer(name), "tokenizer", FORMAT_VERSION, params, inputs, force=force)
    if out.up_to_date():
        return out.final
    with out.building() as folder:
        write_tokenizer(spec, folder, raw_dir)
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        out.counts = {"vocab_size": backend.get_vocab_size(with_added_tokens=True), **document_tokens(folder, spec)}
    return out.final


def load_tokenizer(folder: Path) -> Any:
    """A tokenizer written by this stage (validated against its manifest)."""
    from transformers import AutoTokenizer

    verify_files(folder, read_manifest(folder, "tokenizer"))
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def tokenizer_info(folder: Path) -> dict[str, Any]:
    manifest = read_manifest(folder, "tokenizer")
    return {"name": folder.name, **manifest["counts"]}


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte, in the order of GPT-2's
    vocabulary (its first 256 ids): the printable bytes as themselves, then the others as chr(256 + n)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = {byte: chr(byte) for byte in printable}
    for n, byte in enumerate(b for b in range(256) if b not in chars):
        chars[byte] = chr(256 + n)
    return chars


def tiktoken_encoding(tokenizer_json: Path) -> Any:
    """The same byte-level BPE as a tiktoken Encoding (about 1.5x the speed of `tokenizers` here), or None
    when the tokenizer is not a plain GPT-2-style byte-level BPE."""
    import tiktoken

    spec = json.loads(Path(tokenizer_json).read_text())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or spec.get("normalizer") or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space") or not pre.get("use_regex", True)):
        return None
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    decoder = {char: byte for byte, char in gpt2_byte_chars().items()}
    try:
        ranks = {bytes(decoder[c] for c in token): rank for token, rank in model["vocab"].items()
                 if token not in specials}
    except KeyError:
        return None
    if len({bytes([b]) for b in range(256)} - ranks.keys()):
        return None
    return tiktoken.Encoding(name=Path(tokenizer_json).parent.name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


def token_counter(spec: str, data_dir: Path) -> Callable[[str], int]:
    """The number of tokens a text gets from `tokenize --tokenizer spec`, for `download --max-tokens`."""
    if spec.startswith("bpe:"):
        raise PipelineError(
            f"--count-tokenizer {spec}: a bpe: tokenizer is trained on the download itself, so it cannot count "
            "the download's tokens. Count with the GPT-2 tokenizer (--count-tokenizer gpt2, or a folder of its "
            "files), or limit the download with --max-bytes."
        )
    folder = build_tokenizer(spec, DataDir(data_dir), corpus="", raw_dir=Path())
    fast = tiktoken_encoding(folder / "tokenizer.json")
    if fast is not None:
        return lambda text: len(encode(fast, text))
    backend = text_tokenizer(folder / "tokenizer.json")
    return lambda text: len(backend.encode(text, add_special_tokens=False).ids)


# A document is text: the characters "<|endoftext|>", "<s>" or "</s>" written inside one (code, pages about
# tokenizers) are encoded as the text they are, never as the control ids they spell; the only control id in a
# token stream is the separator the tokenize stage puts between documents itself (as nanoGPT and llm.c do).

def text_tokenizer(tokenizer_json: Path) -> Any:
    """`tokenizers`' tokenizer from a tokenizer.json, encoding special-token strings as ordinary text."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_json))
    backend.encode_special_tokens = True
    return backend


def encode(encoding: Any, text: str) -> np.ndarray:
    """tiktoken's ids for a document, special-token strings in it encoded as ordinary text."""
    return encoding.encode_to_numpy(text, disallowed_special=())
