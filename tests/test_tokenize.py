"""The tokenize stage: trained BPE, GPT-2-format and hub tokenizers, lossless ids, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
from helpers import REPO, english_documents, subprocess_env, write_gpt2_format, write_jsonl, write_sentencepiece_style

from pipeline.artifacts import read_manifest
from pipeline.documents import read_documents
from pipeline.download import DownloadConfig
from pipeline.download import run as download
from pipeline.shard import ShardConfig
from pipeline.shard import run as shard
from pipeline.shard_format import load_index, read_shard, read_token_part
from pipeline.stage import PipelineError
from pipeline.tokenize import TokenizeConfig, run
from pipeline.tokenizer import EOT, load_tokenizer

TEXTS = [*english_documents(60, 40), "Unicode survives: naïve café — ünïcödé ✓", "a<|endoftext|>b"]


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    download(DownloadConfig(data_dir=tmp_path, source=str(write_jsonl(tmp_path / "docs.jsonl", TEXTS))))
    return tmp_path


def token_documents(data_dir: Path, corpus: str = "docs", vocab_size: int = 1 << 16) -> list[list[int]]:
    ids, offsets = read_token_part(data_dir / "tokens" / corpus, "part_00000", vocab_size)
    return [ids[a:b].tolist() for a, b in pairwise(offsets)]


def gpt2_format_folder(folder: Path) -> Path:
    """A tokenizer trained here, in GPT-2's original release format: see helpers.write_gpt2_format."""
    return write_gpt2_format(folder, TEXTS * 3, 400)


def test_trained_bpe_is_lossless_and_recorded(raw: Path) -> None:
    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer="bpe:300"))
    tokenizer = load_tokenizer(raw / "tokenizer" / "docs-bpe300")
    docs = token_documents(raw)
    assert [tokenizer.decode(ids) for ids in docs] == list(read_documents(raw / "raw" / "docs"))
    manifest = read_manifest(raw / "tokens" / "docs", "tokenize")
    assert manifest["counts"] == {"documents": len(TEXTS), "tokens": sum(map(len, docs))}
    assert manifest["params"] == {"tokenizer": "docs-bpe300", "vocab_size": len(tokenizer),
                                  "eot_id": tokenizer.convert_tokens_to_ids(EOT), "max_tokens": None}
    assert (raw / "tokens" / "docs" / "part_00000.ids").stat().st_size == 2 * manifest["counts"]["tokens"]  # uint16
    assert manifest["encoder"] == "tiktoken"  # a byte-level BPE: the fast path, checked against tokenizers
    assert tokenizer("a<|endoftext|>b")["input_ids"][1] == manifest["params"]["eot_id"]


def gpt2_reference_ids(folder: Path) -> list[list[int]]:
    """TEXTS through transformers' own (slow, pure-Python) GPT2Tokenizer from the folder's vocab.json and
    merges.txt; "<|endoftext|>" inside a document is text (test_special_token_strings_inside_documents_are_...)."""
    from transformers import GPT2Tokenizer

    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    reference = GPT2Tokenizer(vocab=vocab, merges=merges)
    return [reference(text, split_special_tokens=True)["input_ids"] for text in TEXTS]


def test_gpt2_format_folder_gives_the_ids_of_transformers_gpt2_tokenizer(raw: Path) -> None:
    folder = gpt2_format_folder(raw / "my-gpt2")
    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer=str(folder)))
    assert token_documents(raw) == gpt2_reference_ids(folder)
    assert (raw / "tokenizer" / "my-gpt2" / "tokenizer.json").is_file()
    assert read_manifest(raw / "tokens" / "docs", "tokenize")["encoder"] == "tiktoken"


def test_a_tokenizer_folder_with_custom_code_never_runs_it(raw: Path) -> None:
    """trust_remote_code stays off: a folder whose tokenizer_config.json points at its own Python class is loaded
    as the standard tokenizer its tokenizer.json describes, and that code is never imported or copied."""
    import shutil

    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer=str(gpt2_format_folder(raw / "my-gpt2"))))
    folder = raw / "remote-code"
    shutil.copytree(raw / "tokenizer" / "my-gpt2", folder)
    (folder / "manifest.json").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    marker = raw / "code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import GPT2TokenizerFast as EvilTokenizer\n")
    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer=str(folder), force=True))
    assert not marker.exists()
    assert not list((raw / "tokenizer").rglob("*.py"))
    tokenizer = load_tokenizer(raw / "tokenizer" / "remote-code")
    assert [tokenizer.decode(ids) for ids in token_documents(raw)] == TEXTS


def test_hub_name_is_loaded_through_the_hub_cache(raw: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config, PreTrainedTokenizerFast

    folder = gpt2_format_folder(tmp_path / "src")
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")), eos_token=EOT)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--testorg--tiny-gpt2"
    tokenizer.save_pretrained(repo / "snapshots" / commit)
    GPT2Config(vocab_size=len(tokenizer)).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**subprocess_env(raw), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-m", "pipeline.tokenize", "--corpus", "docs", "--tokenizer",
                             "testorg/tiny-gpt2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert token_documents(raw) == gpt2_reference_ids(folder)
    assert read_manifest(raw / "tokenizer" / "tiny-gpt2", "tokenizer")["params"]["spec"] == "testorg/tiny-gpt2"


def test_missing_raw_corpus_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"raw/nothing/manifest\.json is missing.*make download"):
        run(TokenizeConfig(data_dir=tmp_path, corpus="nothing"))


def test_a_unigram_tokenizer_with_its_own_document_tokens_and_over_65536_of_them(raw: Path) -> None:
    """A Llama-2/Mistral-style tokenizer.json: each document starts with its <s> and the shards put its </s>
    between documents; ids above 65,535 are stored as uint32, in the ids and in the shards."""
    from transformers import AutoTokenizer

    folder = write_sentencepiece_style(raw / "unigram", TEXTS, filler=70_000)
    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer=str(folder)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    params = read_manifest(raw / "tokens" / "docs", "tokenize")["params"]
    assert (params["eot_id"], params["bos_id"], params["vocab_size"]) == (2, 1, len(tokenizer))
    assert len(tokenizer) > 70_000
    documents = token_documents(raw, vocab_size=params["vocab_size"])
    assert documents == [tokenizer(text)["input_ids"] for text in TEXTS]  # <s> first, as the tokenizer puts it
    assert all(ids[0] == 1 for ids in documents) and max(max(ids) for ids in documents) > 70_000
    assert [tokenizer.decode(ids, skip_special_tokens=True) for ids in documents[:60]] == TEXTS[:60]
    shard(ShardConfig(data_dir=raw, corpus="docs", val_fraction=0.1))
    index = load_index(raw / "shards" / "docs")
    header, tokens = read_shard(raw / "shards" / "docs" / index["shards"][0]["file"])
    assert header.dtype.itemsize == 4 and tokens[:2].tolist() == [2, 1]  # </s> <s> document ...
    assert index["eot_id"] == 2


SPELLED = ["code that prints '<|endoftext|>' and more", "an HTML-ish <s>struck</s> word", "</s><s>", "<|endoftext|>"]


@pytest.mark.parametrize("encoder", ["tiktoken", "tokenizers", "unigram"])
def test_special_token_strings_inside_documents_are_ordinary_text(tmp_path: Path, encoder: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the separator the stages add is a control id: "<|endoftext|>", "<s>" or "</s>" written in a document
    is encoded as those characters (a page about tokenizers must not be cut in two by a real end-of-text)."""
    from transformers import AutoTokenizer

    from pipeline import tokenize

    texts = [*english_documents(20, 30), *SPELLED]
    download(DownloadConfig(data_dir=tmp_path, source=str(write_jsonl(tmp_path / "docs.jsonl", texts))))
    if encoder == "tokenizers":
        monkeypatch.setattr(tokenize, "tiktoken_encoding", lambda path: None)
    spec = str(write_sentencepiece_style(tmp_path / "unigram", texts)) if encoder == "unigram" else "bpe:300"
    run(TokenizeConfig(data_dir=tmp_path, corpus="docs", tokenizer=spec))
    manifest = read_manifest(tmp_path / "tokens" / "docs", "tokenize")
    assert manifest["encoder"] == ("tiktoken" if encoder == "tiktoken" else "tokenizers")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer" / manifest["params"]["tokenizer"])
    documents = token_documents(tmp_path, vocab_size=manifest["params"]["vocab_size"])
    control = set(tokenizer.all_special_ids)
    for text, ids in zip(texts, documents, strict=True):
        body = ids[1:] if encoder == "unigram" else ids  # a Llama-style tokenizer's own <s> starts each document
        assert not control & set(body), (text, ids)
        assert tokenizer.decode(body) == (text if encoder != "unigram" else tokenizer.decode(
            tokenizer(text, split_special_tokens=True, add_special_tokens=False)["input_ids"]))
    if encoder == "unigram":
        assert [ids[0] for ids in documents] == [tokenizer.bos_token_id] * len(texts)


def test_tokenizer_without_end_of_text_is_refused(raw: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, show_progress=False)
    (raw / "no-eot").mkdir()
    bpe.save_model(str(raw / "no-eot"))
    with pytest.raises(PipelineError, match=r"has no end-of-text token \(no eos_token .*, no <\|endoftext\|> in"):
        run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer=str(raw / "no-eot")))
    assert not (raw / "tokens" / "docs").exists()


def test_retokenizing_with_another_tokenizer_needs_force(raw: Path) -> None:
    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer="bpe:300"))
    with pytest.raises(PipelineError, match=r"tokens/docs already exists.*--force"):
        run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer="bpe:320"))
    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer="bpe:320", force=True))
    assert read_manifest(raw / "tokens" / "docs", "tokenize")["params"]["tokenizer"] == "docs-bpe320"


def test_bad_vocabulary_size_is_refused(raw: Path) -> None:
    with pytest.raises(PipelineError, match="at least 258"):
        run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer="bpe:100"))


def test_max_tokens_stops_at_a_document_boundary(raw: Path) -> None:
    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer="bpe:300", max_tokens=500))
    docs = token_documents(raw)
    assert sum(map(len, docs)) >= 500 > sum(map(len, docs[:-1]))
    assert read_manifest(raw / "tokens" / "docs", "tokenize")["counts"]["tokens"] == sum(map(len, docs))


def test_download_max_tokens_counts_with_the_tokenizer_that_tokenize_uses(tmp_path: Path) -> None:
    folder = gpt2_format_folder(tmp_path / "my-gpt2")
    source = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    raw_dir = download(DownloadConfig(data_dir=tmp_path, source=str(source), max_tokens=700,
                                      count_tokenizer=str(folder)))
    counted = read_manifest(raw_dir, "download")["counts"]
    run(TokenizeConfig(data_dir=tmp_path, corpus="docs", tokenizer=str(folder)))
    docs = token_documents(tmp_path)
    assert len(docs) < len(TEXTS)
    assert counted["documents"] == len(docs) and counted["tokens"] == sum(map(len, docs))
    assert sum(map(len, docs)) >= 700 > sum(map(len, docs[:-1]))
    with pytest.raises(PipelineError, match=r"--count-tokenizer bpe:300.*--max-bytes"):
        download(DownloadConfig(data_dir=tmp_path / "b", source=str(source), max_tokens=700,
                                count_tokenizer="bpe:300"))


def test_an_interrupted_run_resumes_at_the_unfinished_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline import download, shard_format

    monkeypatch.setattr(download, "PART_BYTES", 4000)  # several raw parts
    source = write_jsonl(tmp_path / "docs.jsonl", english_documents(80, 40))
    download.run(DownloadConfig(data_dir=tmp_path / "a", source=str(source)))
    download.run(DownloadConfig(data_dir=tmp_path / "b", source=str(source)))
    assert len(list((tmp_path / "a" / "raw" / "docs").glob("docs_*.jsonl"))) >= 3
    run(TokenizeConfig(data_dir=tmp_path / "a", corpus="docs", tokenizer="bpe:300"))  # uninterrupted

    closes = []
    original_close = shard_format.TokenPartWriter.close

    def crash_on_second_part(writer: shard_format.TokenPartWriter) -> dict:
        closes.append(writer.name)
        if len(closes) == 2:
            raise KeyboardInterrupt  # as if killed while writing part 1
        return original_close(writer)

    monkeypatch.setattr(shard_format.TokenPartWriter, "close", crash_on_second_part)
    with pytest.raises(KeyboardInterrupt):
        run(TokenizeConfig(data_dir=tmp_path / "b", corpus="docs", tokenizer="bpe:300"))
    assert not (tmp_path / "b" / "tokens" / "docs").exists()  # nothing that looks finished
    monkeypatch.setattr(shard_format.TokenPartWriter, "close", lambda writer: (closes.append(writer.name),
                                                                         original_close(writer))[1])
    closes.clear()
    run(TokenizeConfig(data_dir=tmp_path / "b", corpus="docs", tokenizer="bpe:300"))
    assert "part_00000" not in closes  # finished before the interruption: not encoded again
    for name in ("part_00000.ids", "part_00001.ids", "part_00000.offsets.npy", "part_00002.offsets.npy"):
        assert (tmp_path / "a" / "tokens" / "docs" / name).read_bytes() == (
            tmp_path / "b" / "tokens" / "docs" / name).read_bytes()


def test_both_encoders_give_the_same_ids(raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from pipeline import tokenize

    tokenizer = str(gpt2_format_folder(tmp_path / "tok"))
    shutil.copytree(raw, tmp_path / "other")
    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer=tokenizer))
    monkeypatch.setattr(tokenize, "tiktoken_encoding", lambda path: None)  # the `tokenizers` path
    run(TokenizeConfig(data_dir=tmp_path / "other", corpus="docs", tokenizer=tokenizer))
    assert read_manifest(tmp_path / "other" / "tokens" / "docs", "tokenize")["encoder"] == "tokenizers"
    assert token_documents(raw) == token_documents(tmp_path / "other")


@pytest.mark.slow
def test_the_encoder_processes_end_with_a_killed_tokenize(raw: Path) -> None:
    """kill -9 leaves tokenize no moment to stop its pool. An idle encoder process waits on a queue whose pipe it
    holds both ends of, so nothing would ever wake it: it watches its parent and exits with it, not an orphan."""
    import time

    import psutil

    run(TokenizeConfig(data_dir=raw, corpus="docs", tokenizer="bpe:300", max_tokens=1))  # the tokenizer, once
    kill_with_idle_encoders = (
        "import os, signal, sys, psutil\n"
        "from pathlib import Path\n"
        "from pipeline.tokenize import Encoder\n"
        f"encoder = Encoder(Path({str(raw / 'tokenizer' / 'docs-bpe300')!r}), 300, ['a text'], None)\n"
        "assert encoder.library == 'tiktoken'\n"
        "encoder.pool.submit(int).result()  # the workers are up, and idle\n"
        "print(*[child.pid for child in psutil.Process().children() if 'spawn_main' in ' '.join(child.cmdline())])\n"
        "sys.stdout.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.Popen([sys.executable, "-c", kill_with_idle_encoders], cwd=REPO, env=subprocess_env(raw),
                              stdout=subprocess.PIPE, text=True)  # an orphan would hold the pipe: read one line
    workers = [psutil.Process(int(pid)) for pid in killed.stdout.readline().split()]
    assert killed.wait(timeout=120) == -9
    killed.stdout.close()
    assert workers, "tokenize started no encoder processes"
    deadline = time.monotonic() + 10
    while (alive := [w for w in workers if _running(w)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    for worker in alive:
        worker.kill()
    assert not alive, f"{len(alive)} encoder processes outlived the killed tokenize"


def _running(process) -> bool:
    """Whether a process is still running (an exited one nobody has reaped yet is a zombie, not running)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
