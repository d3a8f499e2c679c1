"""The download stage's hub path against a hub on 127.0.0.1 (tests/fake_hub.py): `download --source hf:NAME` run as a
user runs it, with HF_ENDPOINT pointed at the server, through `datasets` streaming and huggingface_hub's HTTP."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fake_hub import FakeHub
from helpers import REPO, english_documents, free_port, subprocess_env, write_jsonl

from pipeline.artifacts import read_manifest
from pipeline.documents import read_documents
from pipeline.download import DownloadConfig, run

pytestmark = pytest.mark.slow  # waits out retries, backoffs and a throttled file: left out of `make test-fast`
TEXTS = english_documents(60, 30)


def jsonl_bytes(texts: list[str], tmp: Path) -> bytes:
    return write_jsonl(tmp / "train.jsonl", texts).read_bytes()


def parquet_bytes(texts: list[str]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), out, row_group_size=16)
    return out.getvalue()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    server = FakeHub()
    folder = tmp_path_factory.mktemp("hub-files")
    server.repos["me/jsonl"] = {"README.md": b"# a jsonl dataset\n", "data/train.jsonl": jsonl_bytes(TEXTS, folder)}
    server.repos["me/parquet"] = {"data/train-00000-of-00001.parquet": parquet_bytes(TEXTS)}
    # six files, which `datasets` streams one after another (each read whole before its documents come)
    server.repos["me/shards"] = {f"data/train-{i:05d}-of-00006.jsonl": jsonl_bytes(TEXTS[10 * i:10 * i + 10], folder)
                                 for i in range(6)}
    yield server
    server.close()


def download(data_dir: Path, endpoint: str, source: str, *, part_bytes: int | None = None,
             wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m pipeline.download` against the hub at `endpoint` (with smaller parts, to have several)."""
    env = {**subprocess_env(data_dir), "HF_ENDPOINT": endpoint, "HF_HOME": str(data_dir.parent / "hf-home"),
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    patch = f"download.PART_BYTES = {part_bytes}; " if part_bytes else ""
    command = [sys.executable, "-c", f"from pipeline import download; {patch}download.main()", "--source", source,
               "--corpus", "hub", "--data-dir", str(data_dir)]
    if not wait:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def documents(data_dir: Path) -> list[str]:
    return list(read_documents(data_dir / "raw" / "hub"))


@pytest.mark.parametrize("repo", ["me/jsonl", "me/parquet"])
def test_a_hub_dataset_downloads_as_its_files_do_locally(hub: FakeHub, tmp_path: Path, repo: str) -> None:
    (tmp_path / "local").mkdir()
    for name, data in hub.repos[repo].items():
        if name.startswith("data/"):
            (tmp_path / "local" / Path(name).name).write_bytes(data)
    local = list(read_documents(run(DownloadConfig(data_dir=tmp_path / "local-data", source=str(tmp_path / "local"),
                                                   corpus="local"))))
    result = download(tmp_path / "data", hub.url, f"hf:{repo}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert documents(tmp_path / "data") == local == TEXTS
    assert read_manifest(tmp_path / "data" / "raw" / "hub", "download")["params"]["source"] == f"hf:{repo}"


@pytest.mark.parametrize("fault", ["unavailable", "dropped"])
def test_a_503_or_a_connection_dropped_mid_file_is_retried_and_no_document_is_lost_or_doubled(
        hub: FakeHub, tmp_path: Path, fault: str) -> None:
    setattr(hub.faults, fault, 1)
    before = len(hub.data_requests("me/jsonl", "data/train.jsonl"))
    result = download(tmp_path / "data", hub.url, "hf:me/jsonl")
    assert result.returncode == 0, result.stderr[-3000:]
    assert getattr(hub.faults, fault) == 0  # the fault happened
    assert len(hub.data_requests("me/jsonl", "data/train.jsonl")) - before >= 2  # and the file was asked again
    assert documents(tmp_path / "data") == TEXTS


def test_kill_9_mid_download_resumes_from_the_saved_state_to_the_same_result(hub: FakeHub, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    assert download(whole, hub.url, "hf:me/shards", part_bytes=1500).returncode == 0
    hub.faults.bytes_per_second = 2000  # each 2 KB file over about a second
    try:
        process = download(tmp_path / "data", hub.url, "hf:me/shards", part_bytes=1500, wait=False)
        raw = tmp_path / "data" / "raw"
        deadline = time.time() + 120
        while not (raw / ".hub.partial" / ".progress.json").is_file() and time.time() < deadline:
            assert process.poll() is None, process.communicate()[0][-3000:]
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # a file or more later: the stream is in its second file or beyond
        process.communicate(timeout=60)
    finally:
        hub.faults.bytes_per_second = None
    partial = raw / ".hub.partial"
    recorded = json.loads((partial / ".progress.json").read_text())["parts"]  # a part the kill cut off comes again
    done = {name: (partial / name).stat().st_mtime_ns for name in recorded}
    assert done and not (raw / "hub").exists()  # stopped half-way: only a partial folder, never the corpus
    result = download(tmp_path / "data", hub.url, "hf:me/shards", part_bytes=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {name: (raw / "hub" / name).stat().st_mtime_ns for name in done} == done  # its finished parts kept
    assert documents(tmp_path / "data") == TEXTS
    parts = sorted(p.name for p in (whole / "raw" / "hub").glob("docs_*.jsonl"))
    assert sorted(p.name for p in (raw / "hub").glob("docs_*.jsonl")) == parts
    assert all((raw / "hub" / name).read_bytes() == (whole / "raw" / "hub" / name).read_bytes() for name in parts)


@pytest.mark.parametrize("case", ["missing", "gated", "unreachable"])
def test_a_missing_gated_or_unreachable_dataset_is_one_clear_line_and_nothing_is_written(
        hub: FakeHub, tmp_path: Path, case: str) -> None:
    hub.faults.gated = {"me/gated"}
    endpoint = f"http://127.0.0.1:{free_port()}" if case == "unreachable" else hub.url
    source = {"missing": "hf:me/missing", "gated": "hf:me/gated", "unreachable": "hf:me/jsonl"}[case]
    started = time.time()
    result = download(tmp_path / "data", endpoint, source)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line or "Traceback" in line]
    assert len(errors) == 1 and source.removeprefix("hf:") in errors[0], result.stderr[-3000:]
    assert {"missing": "doesn't exist", "gated": "gated", "unreachable": "cannot connect"}[case] in errors[0], errors
    assert not list((tmp_path / "data").rglob("*.jsonl")) and not (tmp_path / "data" / "raw" / "hub").exists()
    assert time.time() - started < 120
