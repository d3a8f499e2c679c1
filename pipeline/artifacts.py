"""Stage outputs and their manifests: atomic completion, skip-when-up-to-date, and validation by readers.

A stage builds its output in a hidden sibling folder and renames it into place only after writing
`manifest.json` last, so a folder that has a manifest is complete. The manifest carries a fingerprint of
everything the output was made from (stage, format version, parameters, the digests of the input
manifests); a later run with the same fingerprint is skipped, a different one is refused unless forced.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.stage import PipelineError

log = logging.getLogger("onecard")

MANIFEST = "manifest.json"
RESUME_MARKER = ".fingerprint"
# The command that (re)builds each stage's output, for error messages that say what to run.
STAGE_COMMANDS = {
    "download": "python -m pipeline.download",
    "tokenizer": "python -m pipeline.tokenize",
    "tokenize": "python -m pipeline.tokenize",
    "shard": "python -m pipeline.shard",
    "train": "deepspeed launch/train.py --deepspeed <config>",
    "checkpoint": "deepspeed launch/train.py --deepspeed <config>",
    "evaluate": "python -m pipeline.evaluate",
}


def how_to_run(stage: str, force: bool = False) -> str:
    """`python -m pipeline.shard --force` (or `make shard`): the command for a stage, with its make target."""
    target = {"tokenizer": "tokenize", "checkpoint": "train"}.get(stage, stage)
    return f"`{STAGE_COMMANDS[stage]}{' --force' if force else ''}` (or `make {target}`)"


_LIBRARIES = ("torch", "deepspeed", "transformers", "tokenizers", "datasets", "numpy")


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # through one fixed buffer, whatever the size


def sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file so that a reader sees the old one or the new one, never half of one, even after a power
    cut: the data is flushed before the rename, and the rename before returning."""
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    _fsync(path.parent)


def fsync_tree(folder: Path) -> None:
    """Flush a folder written in place to the disk: every file, every folder's entries, and the folder's own
    entry in its parent, so that after a power cut it is all there or the reader can tell it is not."""
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):  # deepest first
        _fsync(path)
    _fsync(folder)
    _fsync(folder.parent)


def _fsync(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


class DiskNeed(NamedTuple):
    folder: Path
    bytes: float
    what: str


def nearest_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists: where a folder that is yet to be made would be."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return probe


def bytes_in(folder: Path) -> int:
    """What the files under `folder` take (0 when it does not exist)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def require_free_space(path: Path, needed: float, what: str, fix: str = "") -> None:
    """A clear error, before anything is written, when the filesystem of `path` has less than `needed` bytes."""
    require_disk([DiskNeed(Path(path), needed, what)], fix)


def require_disk(needs: list[DiskNeed], fix: str = "") -> None:
    """A clear error, before anything is written, when the needs that share a filesystem add up to more than it has
    free: each filesystem is checked for the sum of its needs, and the message names every one of them."""
    by_filesystem: dict[int, list[DiskNeed]] = {}
    for need in needs:
        by_filesystem.setdefault(os.stat(nearest_existing(need.folder)).st_dev, []).append(need)
    for shared in by_filesystem.values():
        free = shutil.disk_usage(nearest_existing(shared[0].folder)).free
        needed = sum(need.bytes for need in shared)
        if free >= needed:
            continue
        what = " and ".join(f"{need.what} needs about {human_bytes(need.bytes)} in {need.folder}" for need in shared)
        total = f" ({human_bytes(needed)} in all, on one filesystem)" if len(shared) > 1 else ""
        raise PipelineError(
            f"{what}{total}, but {'that' if len(shared) > 1 else 'its'} filesystem has {human_bytes(free)} free. "
            f"Free some space or point --data-dir at a bigger disk{', ' + fix if fix else ''}; nothing has been "
            "changed."
        )


def read_manifest(folder: Path, stage: str) -> dict[str, Any]:
    """The manifest of a completed stage output; a clear error naming the folder and the fix if there is none."""
    path = folder / MANIFEST
    if not path.is_file():
        raise PipelineError(
            f"{path} is missing: the {stage} stage has not completed for {folder}. "
            f"Run {how_to_run(stage)} first."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PipelineError(
            f"{path} is not valid JSON ({error}). Rebuild it with {how_to_run(stage, force=True)}."
        ) from error
    if manifest.get("stage") != stage:
        raise PipelineError(
            f"{path} belongs to stage {manifest.get('stage')!r}, expected {stage!r}: "
            f"the folder {folder} is not a {stage} output."
        )
    return manifest


def manifest_digest(folder: Path) -> str:
    return sha256_file(folder / MANIFEST)


def verify_files(folder: Path, manifest: dict[str, Any], checksums: bool = True) -> None:
    """Check that every file the manifest lists is there with its size (and checksum)."""
    rebuild = how_to_run(manifest["stage"], force=True)
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            raise PipelineError(f"{path} is listed in {folder / MANIFEST} but missing. Rebuild with {rebuild}.")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise PipelineError(
                f"{path} has {size} bytes but its manifest says {entry['bytes']}: the file is truncated or was "
                f"changed after it was written. Rebuild with {rebuild}."
            )
        if checksums and sha256_file(path) != entry["sha256"]:
            raise PipelineError(
                f"{path} does not match the sha256 in {folder / MANIFEST}: the file is corrupt or was changed "
                f"after it was written. Rebuild with {rebuild}."
            )


def write_manifest(
    folder: Path,
    stage: str,
    version: int,
    fingerprint: str,
    params: dict[str, Any],
    inputs: dict[str, Any],
    counts: dict[str, Any],
    started: float,
    extra: dict[str, Any] | None = None,
    immutable: dict[str, dict[str, Any]] | None = None,
    only: list[Path] | None = None,
) -> None:
    """Write `folder/manifest.json`, listing every other file in the folder (or the files in `only`) with its
    size and sha256.

    `immutable` maps paths of files known from elsewhere (hashed as they were written) to their entries,
    which are reused rather than hashed again when the size still matches.
    """
    files = sorted(only if only is not None else (p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST))
    immutable = immutable or {}

    def entry(p: Path) -> dict[str, Any]:
        path, size = str(p.relative_to(folder)), p.stat().st_size
        if path in immutable and immutable[path]["bytes"] == size:
            return immutable[path]
        return {"path": path, "bytes": size, "sha256": sha256_file(p)}

    manifest = {
        "stage": stage,
        "format_version": version,
        "fingerprint": fingerprint,
        "params": params,
        "inputs": inputs,
        "counts": counts,
        "files": [entry(p) for p in files],
        "versions": library_versions(),
        "timing": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 3),
        },
        **(extra or {}),
    }
    write_json_atomic(folder / MANIFEST, manifest)


def input_entry(folder: Path) -> dict[str, str]:
    """How a manifest names one of its inputs: the folder and the digest of the folder's manifest."""
    return {"path": str(folder), "manifest_sha256": manifest_digest(folder)}


class StageOutput:
    """One stage output folder, built in a hidden sibling and renamed into place when complete.

    Usage::

        out = StageOutput(final_dir, "shard", version=1, params=..., inputs={"tokens": tokens_dir})
        if out.up_to_date():
            return final_dir
        with out.building() as tmp:
            ...write files into tmp...
            out.counts["tokens"] = n
    """

    def __init__(
        self,
        final: Path,
        stage: str,
        version: int,
        params: dict[str, Any],
        inputs: dict[str, Path] | None = None,
        force: bool = False,
        replace_stale: bool = False,
    ) -> None:
        self.final = Path(final)
        self.stage = stage
        self.version = version
        self.params = params
        self.inputs = {name: input_entry(folder) for name, folder in (inputs or {}).items()}
        self.force = force
        self.replace_stale = replace_stale
        self.counts: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}
        self.hashed: dict[str, dict[str, Any]] = {}  # manifest entries of files the stage already hashed
        self.started = time.time()  # the manifest's timing covers the stage's work, not only the final writes
        self.fingerprint = sha256_json(
            {"stage": stage, "version": version, "params": params,
             "inputs": {name: entry["manifest_sha256"] for name, entry in self.inputs.items()}}
        )

    def up_to_date(self) -> bool:
        """True if the output exists and was made from exactly these inputs and parameters.

        An output made from something else is an error unless `force` asks to rebuild it: mixing the two
        silently is how a run ends up training on data it did not ask for. Reports, which lose nothing by
        being redone, pass `replace_stale` to be rebuilt instead.
        """
        path = self.final / MANIFEST
        if not path.is_file():
            return False
        if self.force:
            return False
        existing = json.loads(path.read_text())
        if existing.get("fingerprint") == self.fingerprint:
            verify_files(self.final, existing, checksums=False)
            log.info("%s: %s is up to date, skipping (use --force to rebuild)", self.stage, self.final)
            return True
        if self.replace_stale:
            return False
        changed = [key for key in self.params if existing.get("params", {}).get(key) != self.params[key]]
        changed += [
            f"input {name}"
            for name, value in self.inputs.items()
            if existing.get("inputs", {}).get(name, {}).get("manifest_sha256") != value["manifest_sha256"]
        ]
        raise PipelineError(
            f"{self.final} already exists but was made from different inputs or parameters "
            f"(differs in: {', '.join(changed) or 'format version'}). Re-run with --force to rebuild it, "
            f"or choose another name (--corpus / --run) to keep both."
        )

    @contextmanager
    def building(self, resumable: bool = False) -> Iterator[Path]:
        """The folder to build in. With `resumable`, an interrupted build of the same fingerprint is kept and
        handed back, so a stage that writes its pieces atomically can skip those already there."""
        partial = self.final.with_name(f".{self.final.name}.partial")
        marker = partial / RESUME_MARKER
        resuming = resumable and marker.is_file() and marker.read_text() == self.fingerprint
        if partial.exists() and not resuming:
            shutil.rmtree(partial)  # left over by a crashed run of something else; never renamed into place
        partial.mkdir(parents=True, exist_ok=True)
        marker.write_text(self.fingerprint)
        if resuming:
            log.info("%s: resuming the interrupted build in %s", self.stage, partial)
        try:
            yield partial
            marker.unlink()
            self._write_manifest(partial, self.started)
            self._move_into_place(partial)
        except BaseException:
            # keep what a resume can use; a build that failed before writing anything leaves nothing behind
            if not resumable or {p.name for p in partial.iterdir()} <= {RESUME_MARKER}:
                shutil.rmtree(partial, ignore_errors=True)
            raise

    def _write_manifest(self, folder: Path, started: float) -> None:
        write_manifest(folder, self.stage, self.version, self.fingerprint, self.params, self.inputs, self.counts,
                       started, self.extra, immutable=self.hashed)

    def _move_into_place(self, partial: Path) -> None:
        old = self.final.with_name(f".{self.final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(partial, self.final)
        shutil.rmtree(old, ignore_errors=True)
        log.info("%s: wrote %s", self.stage, self.final)
