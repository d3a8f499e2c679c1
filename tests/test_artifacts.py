"""Stage outputs: atomic completion, manifests with checksums, skip-when-up-to-date, refusal of mismatches."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.artifacts import MANIFEST, StageOutput, read_manifest, sha256_file, verify_files
from pipeline.stage import PipelineError


def build(final: Path, params: dict, text: str = "hello", **options) -> StageOutput:
    out = StageOutput(final, "shard", 1, params, **options)
    if not out.up_to_date():
        with out.building() as folder:
            (folder / "a.txt").write_text(text)
            out.counts["n"] = 1
    return out


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path: Path) -> None:
    build(tmp_path / "out", {"x": 1})
    manifest = read_manifest(tmp_path / "out", "shard")
    assert manifest["files"] == [{"path": "a.txt", "bytes": 5, "sha256": sha256_file(tmp_path / "out" / "a.txt")}]
    assert manifest["params"] == {"x": 1} and manifest["counts"] == {"n": 1}
    assert {"python", "torch", "deepspeed"} <= set(manifest["versions"])


def test_a_crash_leaves_nothing_that_looks_finished(tmp_path: Path) -> None:
    out = StageOutput(tmp_path / "out", "shard", 1, {})
    with pytest.raises(RuntimeError), out.building() as folder:
        (folder / "a.txt").write_text("partial")
        raise RuntimeError("killed")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_crash_during_rebuild_keeps_the_previous_output(tmp_path: Path) -> None:
    build(tmp_path / "out", {"x": 1}, text="old")
    out = StageOutput(tmp_path / "out", "shard", 1, {"x": 2}, force=True)
    with pytest.raises(RuntimeError), out.building() as folder:
        (folder / "a.txt").write_text("new")
        raise RuntimeError("killed")
    assert (tmp_path / "out" / "a.txt").read_text() == "old"
    verify_files(tmp_path / "out", read_manifest(tmp_path / "out", "shard"))


def test_up_to_date_output_is_skipped(tmp_path: Path) -> None:
    build(tmp_path / "out", {"x": 1})
    before = (tmp_path / "out" / MANIFEST).stat().st_mtime_ns
    assert build(tmp_path / "out", {"x": 1}).up_to_date()
    assert (tmp_path / "out" / MANIFEST).stat().st_mtime_ns == before


def test_output_from_other_parameters_is_refused_then_rebuilt_with_force(tmp_path: Path) -> None:
    build(tmp_path / "out", {"x": 1}, text="old")
    with pytest.raises(PipelineError, match=r"different inputs or parameters \(differs in: x\).*--force"):
        build(tmp_path / "out", {"x": 2})
    assert (tmp_path / "out" / "a.txt").read_text() == "old"
    build(tmp_path / "out", {"x": 2}, text="new", force=True)
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert read_manifest(tmp_path / "out", "shard")["params"] == {"x": 2}


def test_stale_report_is_replaced_when_asked(tmp_path: Path) -> None:
    build(tmp_path / "out", {"x": 1}, text="old")
    build(tmp_path / "out", {"x": 2}, text="new", replace_stale=True)
    assert (tmp_path / "out" / "a.txt").read_text() == "new"


def test_changed_input_manifest_makes_output_out_of_date(tmp_path: Path) -> None:
    build(tmp_path / "in", {"v": 1})
    build(tmp_path / "out", {}, inputs={"in": tmp_path / "in"})
    build(tmp_path / "in", {"v": 2}, force=True)
    with pytest.raises(PipelineError, match="differs in: input in"):
        build(tmp_path / "out", {}, inputs={"in": tmp_path / "in"})


def test_verify_files_catches_truncation_and_corruption(tmp_path: Path) -> None:
    build(tmp_path / "out", {})
    manifest = read_manifest(tmp_path / "out", "shard")
    (tmp_path / "out" / "a.txt").write_text("HELLO")
    with pytest.raises(PipelineError, match=r"a\.txt does not match the sha256"):
        verify_files(tmp_path / "out", manifest)
    (tmp_path / "out" / "a.txt").write_text("hi")
    with pytest.raises(PipelineError, match=r"a\.txt has 2 bytes but its manifest says 5"):
        verify_files(tmp_path / "out", manifest, checksums=False)


def test_missing_or_foreign_manifest_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"manifest\.json is missing.*make tokenize"):
        read_manifest(tmp_path / "nothing", "tokenize")
    build(tmp_path / "out", {})
    with pytest.raises(PipelineError, match="belongs to stage 'shard', expected 'download'"):
        read_manifest(tmp_path / "out", "download")
    (tmp_path / "out" / MANIFEST).write_text("{not json")
    with pytest.raises(PipelineError, match="is not valid JSON"):
        read_manifest(tmp_path / "out", "shard")
