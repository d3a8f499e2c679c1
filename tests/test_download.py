"""The download stage: every source kind, limits, manifests, idempotence and clear errors."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import english_documents, write_jsonl

from pipeline import download as download_stage
from pipeline.artifacts import read_manifest
from pipeline.documents import read_documents
from pipeline.download import DownloadConfig, builtin_documents, run
from pipeline.stage import PipelineError, corpus_name


def download(data_dir: Path, source: str, **options) -> list[str]:
    folder = run(DownloadConfig(data_dir=data_dir, source=str(source), **options))
    return list(read_documents(folder))


def test_builtin_corpus_is_python_documentation(tmp_path: Path) -> None:
    docs = list(builtin_documents())
    sources = [source for source, _ in docs]
    assert any(s.startswith("pydoc_data.topics:") for s in sources)
    assert {"stdlib:json", "stdlib:argparse", "stdlib:collections"} <= set(sources)
    text = " ".join(t for _, t in docs)
    assert len(text) > 1_000_000  # a real corpus, not filler
    assert text.count(" the ") > 10_000
    assert not any(s.startswith(("stdlib:test.", "stdlib:idlelib", "stdlib:lib2to3")) for s in sources)


def test_builtin_download_records_what_went_in(tmp_path: Path) -> None:
    texts = download(tmp_path, "builtin", max_docs=30)
    manifest = read_manifest(tmp_path / "raw" / "builtin", "download")
    assert len(texts) == manifest["counts"]["documents"] == 30
    assert manifest["params"]["source_state"]["python"]
    assert sum(s["documents"] for s in manifest["sources"]) == 30
    first = manifest["sources"][0]
    assert texts[0] == dict(builtin_documents())[first["source"]]
    chain = ""  # the recorded digest: a chain of the documents' sha256, so it survives a restart
    for text in texts[: first["documents"]]:
        chain = hashlib.sha256((chain + hashlib.sha256(text.encode()).hexdigest()).encode()).hexdigest()
    assert first["sha256_chain"] == chain


def test_folder_of_text_files_gives_one_document_per_file(tmp_path: Path) -> None:
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "a.txt").write_bytes("\ufeffFirst book.\r\n\r\nSecond paragraph.".encode())
    (folder / "b.txt").write_text("Second book.")
    with gzip.open(folder / "c.txt.gz", "wt") as f:
        f.write("Third book, compressed.")
    (folder / "notes.md").write_text("ignored")
    texts = download(tmp_path / "data", folder)
    assert texts == ["First book.\n\nSecond paragraph.", "Second book.", "Third book, compressed."]
    assert (tmp_path / "data" / "raw" / "books").is_dir()


def test_single_text_file_is_split_at_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "play.txt").write_text("ROMEO:\nHello.\n\nJULIET:\nHi.\n\n\n\nROMEO:\nBye.\n")
    assert download(tmp_path / "data", tmp_path / "play.txt") == ["ROMEO:\nHello.", "JULIET:\nHi.", "ROMEO:\nBye.\n"]


def test_jsonl_and_parquet_sources(tmp_path: Path) -> None:
    texts = english_documents(20, 30)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    assert download(tmp_path / "data", tmp_path / "docs.jsonl") == texts
    pq.write_table(pa.table({"body": texts, "id": list(range(20))}), tmp_path / "docs.parquet")
    assert download(tmp_path / "data2", tmp_path / "docs.parquet", text_field="body") == texts


def test_archives_are_read_in_memory_and_never_extracted(tmp_path: Path) -> None:
    """tar and zip archives give one document per member file; members named to escape (`../`, absolute
    paths) write nothing anywhere, and links are skipped, not followed."""
    import io
    import tarfile
    import zipfile

    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET outside the archive")
    texts = english_documents(4, 80, seed=11)

    def add(archive: tarfile.TarFile, name: str, text: str) -> None:
        data = text.encode()
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))

    with tarfile.open(tmp_path / "books.tar.gz", "w:gz") as archive:
        add(archive, "books/a.txt", texts[0])
        add(archive, "../../escaped.txt", texts[1])
        add(archive, "/tmp/absolute.txt", texts[2])
        link = tarfile.TarInfo("books/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, str(secret)
        archive.addfile(link)
        add(archive, "books/notes.md", "not a document format")
    with zipfile.ZipFile(tmp_path / "more.zip", "w") as archive:
        archive.writestr("sub/c.txt", texts[3])
        archive.writestr("../d.jsonl", json.dumps({"text": texts[0]}) + "\n")
    before = sorted(p for p in tmp_path.parent.rglob("*") if "data" not in p.relative_to(tmp_path.parent).parts)

    assert download(tmp_path / "data", tmp_path / "books.tar.gz") == texts[:3]
    assert download(tmp_path / "data", tmp_path / "more.zip") == [texts[3], texts[0]]
    after = sorted(p for p in tmp_path.parent.rglob("*") if "data" not in p.relative_to(tmp_path.parent).parts)
    assert after == before  # nothing was extracted, inside or outside the data directory
    raw = (tmp_path / "data" / "raw" / "books").glob("docs_*.jsonl")
    sources = [json.loads(line)["source"] for part in raw for line in part.read_text().splitlines()]
    assert sources == ["books.tar.gz:books/a.txt", "books.tar.gz:../../escaped.txt", "books.tar.gz:/tmp/absolute.txt"]
    (tmp_path / "broken.tar.gz").write_bytes((tmp_path / "books.tar.gz").read_bytes()[:100])
    with pytest.raises(PipelineError, match=r"broken\.tar\.gz is not a readable archive.*Download it again"):
        download(tmp_path / "data", tmp_path / "broken.tar.gz")


def test_limits_stop_the_stream(tmp_path: Path) -> None:
    texts = english_documents(50, 20)
    write_jsonl(tmp_path / "docs.jsonl", texts)
    assert download(tmp_path / "d1", tmp_path / "docs.jsonl", max_docs=7) == texts[:7]
    limited = download(tmp_path / "d2", tmp_path / "docs.jsonl", max_bytes=500)
    assert sum(len(t) for t in limited[:-1]) < 500 <= sum(len(t) for t in limited)


def test_hf_dataset_through_the_datasets_library(tmp_path: Path) -> None:
    repo = tmp_path / "hub-dataset"
    repo.mkdir()
    texts = english_documents(40, 25)
    write_jsonl(repo / "train.jsonl", texts)
    assert download(tmp_path / "data", f"hf:{repo}", max_docs=15) == texts[:15]
    manifest = read_manifest(tmp_path / "data" / "raw" / "hub-dataset", "download")
    assert manifest["params"]["source"] == f"hf:{repo}"


def test_http_source_is_fetched(tmp_path: Path) -> None:
    served = tmp_path / "www"
    served.mkdir()
    texts = english_documents(5, 10)
    write_jsonl(served / "web.jsonl", texts)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/web.jsonl"
        assert download(tmp_path / "data", url) == texts
    finally:
        server.shutdown()
    written = sorted(p.name for p in (tmp_path / "data" / "raw" / "web").iterdir())
    assert written == ["docs_00000.jsonl", "manifest.json"]


def test_rerun_is_skipped_and_a_changed_source_is_reported(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", english_documents(5, 10))
    download(tmp_path / "data", source)
    manifest = tmp_path / "data" / "raw" / "docs" / "manifest.json"
    before = manifest.read_text()
    download(tmp_path / "data", source)
    assert manifest.read_text() == before
    write_jsonl(source, english_documents(6, 10, seed=1))
    with pytest.raises(PipelineError, match=r"differs in: source_state.*--force"):
        download(tmp_path / "data", source)
    assert len(download(tmp_path / "data", source, force=True)) == 6


def test_non_utf8_file_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(PipelineError, match=r"latin\.txt is not UTF-8 text.*iconv"):
        download(tmp_path / "data", tmp_path / "latin.txt")
    assert not (tmp_path / "data" / "raw" / "latin").exists()


def test_bad_sources_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        download(tmp_path, tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    with pytest.raises(PipelineError, match="the corpus is empty"):
        download(tmp_path, tmp_path / "blank.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(PipelineError, match=r"bad\.jsonl:2 is not valid JSON"):
        download(tmp_path, tmp_path / "bad.jsonl")
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PipelineError, match=r"other\.jsonl:1 has no 'text' field.*--text-field"):
        download(tmp_path, tmp_path / "other.jsonl")
    with pytest.raises(PipelineError, match="cannot load dataset"):
        download(tmp_path, f"hf:{tmp_path / 'no-such-dataset'}")


@pytest.mark.parametrize(("source", "name"), [
    ("builtin", "builtin"),
    ("hf:HuggingFaceFW/fineweb-edu:sample-10BT", "fineweb-edu-sample-10BT"),
    ("hf:Skylion007/openwebtext", "openwebtext"),
    ("/data/books/", "books"),
    ("../input.txt.gz", "input"),
    ("https://example.com/files/shakespeare.txt?x=1", "shakespeare"),
])
def test_corpus_names(source: str, name: str) -> None:
    assert corpus_name(source) == name


def interrupt_after(monkeypatch: pytest.MonkeyPatch, documents: int) -> None:
    """Make the next download die (as if killed) after this many documents."""
    original = download_stage.PartWriter.add

    def add(writer, source, text, stream_state=None):
        if writer.documents >= documents:
            raise KeyboardInterrupt
        original(writer, source, text, stream_state)

    monkeypatch.setattr(download_stage.PartWriter, "add", add)


@pytest.mark.parametrize("kind", ["jsonl", "hf"])
def test_an_interrupted_download_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         kind: str) -> None:
    monkeypatch.setattr(download_stage, "PART_BYTES", 1500)
    texts = english_documents(60, 30)
    (tmp_path / "repo").mkdir()
    write_jsonl(tmp_path / "repo" / "train.jsonl", texts)
    source = f"hf:{tmp_path / 'repo'}" if kind == "hf" else str(tmp_path / "repo" / "train.jsonl")
    with monkeypatch.context() as patch:
        interrupt_after(patch, 25)
        with pytest.raises(KeyboardInterrupt):
            download(tmp_path / "data", source)
    partial = next((tmp_path / "data" / "raw").glob(".*.partial"))
    done = sorted(p.name for p in partial.glob("docs_*.jsonl"))
    assert done and not (tmp_path / "data" / "raw" / partial.name[1:].removesuffix(".partial")).exists()
    before = {name: (partial / name).stat().st_mtime_ns for name in done}
    consumed = []
    original = download_stage.PartWriter.add
    monkeypatch.setattr(download_stage.PartWriter, "add", lambda writer, src, text, state=None: (
        consumed.append(text), original(writer, src, text, state)))
    assert download(tmp_path / "data", source) == texts
    folder = next(p for p in (tmp_path / "data" / "raw").iterdir() if not p.name.startswith("."))
    assert {name: (folder / name).stat().st_mtime_ns for name in done} == before  # finished parts kept
    assert len(consumed) < len(texts) and consumed[-1] == texts[-1]  # only what was not written yet
    manifest = read_manifest(folder, "download")
    assert manifest["counts"]["documents"] == 60 and not list(folder.glob(".*"))


def test_parts_split_the_source_disjointly(tmp_path: Path) -> None:
    texts = english_documents(30, 10)
    source = write_jsonl(tmp_path / "docs.jsonl", texts)
    shares = [download(tmp_path / "data", source, part=f"{i}/3") for i in range(3)]
    assert sorted(text for share in shares for text in share) == sorted(texts) and all(shares)
    assert {p.name for p in (tmp_path / "data" / "raw").iterdir()} == {f"docs.part-{i}-of-3" for i in range(3)}
    with pytest.raises(PipelineError, match="must be I/N with 0 <= I < N"):
        download(tmp_path / "data", source, part="3/3")
