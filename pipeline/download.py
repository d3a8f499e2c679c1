"""Stage 1, download: gather documents from a source into `data/raw/<corpus>/` as JSON-lines parts.

Sources:
  builtin                  real English that ships with every Python: the language reference topics
                           (`pydoc_data.topics`) and the docstrings of the standard library (read with `ast`,
                           nothing is imported). Works offline; the default.
  PATH                     a .txt / .jsonl / .parquet file (optionally .gz for .txt and .jsonl), a .tar(.gz/.xz/.bz2)
                           or .zip archive of them (read in memory: nothing is extracted), or a folder of these
  hf:DATASET[:CONFIG]      a Hugging Face dataset, streamed through `datasets` (stop it with --max-docs,
                           --max-bytes or --max-tokens)
  http(s)://URL            a file of one of the local formats, fetched first

Each document becomes one line `{"text": ..., "source": ...}` of `docs_00000.jsonl`, `docs_00001.jsonl`, ...
(the format: `pipeline/documents.py`).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import sysconfig
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any, Literal

from tqdm import tqdm

from pipeline.artifacts import StageOutput, require_free_space, write_json_atomic
from pipeline.documents import PART_PREFIX, document_line, part_name
from pipeline.stage import (
    ARCHIVE_SUFFIXES,
    AT_LEAST_ONE,
    DOCUMENT_SUFFIXES,
    LOCAL_SUFFIXES,
    DataDir,
    PipelineError,
    StageConfig,
    corpus_name,
    parse_part,
    part_corpus,
    stage_main,
)
from pipeline.tokenizer import token_counter

log = logging.getLogger("onecard")

FORMAT_VERSION = 1
PART_BYTES = 64 << 20
HUB_RETRY_SECONDS = (1, 2, 4, 8)  # the waits before each new try to open a hub dataset after a server error
PROGRESS = ".progress.json"
# Standard-library folders that are tests, tools or vendored code rather than library documentation.
STDLIB_SKIP = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "dist-packages",
               "ensurepip", "__pycache__", "__phello__"}


@dataclass
class DownloadConfig(StageConfig):
    source: str = field(default="builtin", metadata={"help": "builtin | PATH | hf:DATASET[:CONFIG] | http(s)://URL"})
    corpus: str | None = field(default=None, metadata={"help": "corpus name (default: derived from --source)"})
    text_field: str = field(default="text", metadata={"help": "column/key holding the text in jsonl, parquet, hf"})
    split: str = field(default="train", metadata={"help": "split of a hf: dataset"})
    max_docs: int | None = field(default=None, metadata={"range": AT_LEAST_ONE,
                                                         "help": "stop after this many documents"})
    max_bytes: int | None = field(default=None, metadata={"range": AT_LEAST_ONE,
                                                          "help": "stop after this many bytes of UTF-8 text"})
    max_tokens: int | None = field(default=None, metadata={"range": AT_LEAST_ONE,
        "help": "stop after the document that brings the corpus to this many tokens of --count-tokenizer"})
    count_tokenizer: str = field(default="gpt2", metadata={
        "help": "the tokenizer --max-tokens counts with: a hub name or a local folder (the one you will tokenize "
                "with)"})
    part: str | None = field(default=None, metadata={"help": "I/N: this process's share (0 <= I < N) of the "
                             "source, into <corpus>.part-I-of-N; see `python -m pipeline.shard --merge`"})
    doc_split: Literal["auto", "file", "blankline"] = field(
        default="auto",
        metadata={"help": "documents of .txt input: one per file, or one per blank-line-separated block "
                  "(auto: per file for a folder or an archive's members, per block for a single file)"},
    )


# --- the builtin corpus -------------------------------------------------------------------------------

def _module_text(path: Path, module: str) -> str:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = []
    if doc := ast.get_docstring(tree):
        parts.append(f"{module}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                if doc := ast.get_docstring(node):
                    parts.append(f"class {prefix}{node.name}:\n{doc}")
                visit(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (doc := ast.get_docstring(node)):
                parts.append(f"def {prefix}{node.name}({ast.unparse(node.args)}):\n{doc}")

    visit(tree.body, "")
    return "\n\n".join(parts)


def builtin_documents() -> Iterator[tuple[str, str]]:
    """(source, text) pairs: every language-reference topic, then one document per stdlib module."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_data.topics:{name}", topics[name]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if STDLIB_SKIP.intersection(relative.parts[:-1]):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        try:
            text = _module_text(path, module)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are templates or test data, not Python source
        if text:
            yield f"stdlib:{module}", text


# --- local files ----------------------------------------------------------------------------------------

def _open_text(name: str, raw: IO[bytes]) -> IO[str]:
    if name.endswith(".gz"):
        raw = gzip.open(raw, "rb")
    # utf-8-sig drops a byte-order mark; newline=None turns CRLF into LF.
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict", newline=None)


def _not_utf8(name: str, error: UnicodeDecodeError) -> PipelineError:
    return PipelineError(
        f"{name} is not UTF-8 text (byte {error.start} cannot be decoded: {error.reason}). Convert it first, "
        "e.g. with `iconv -f latin1 -t utf-8`, then pass the converted file to --source."
    )


def _txt_documents(name: str, raw: IO[bytes], per_block: bool) -> Iterator[str]:
    try:
        with _open_text(name, raw) as f:
            text = f.read()
    except UnicodeDecodeError as error:
        raise _not_utf8(name, error) from error
    if per_block:
        yield from re.split(r"\n\s*\n", text)
    else:
        yield text


def _jsonl_documents(name: str, raw: IO[bytes], text_field: str) -> Iterator[str]:
    try:
        with _open_text(name, raw) as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise PipelineError(
                        f"{name}:{line_number} is not valid JSON ({error.msg}). Every line of a .jsonl "
                        f"file must be one JSON object with a {text_field!r} field."
                    ) from error
                if not isinstance(record, dict) or text_field not in record:
                    raise PipelineError(
                        f"{name}:{line_number} has no {text_field!r} field. Name the field holding the text "
                        "with --text-field."
                    )
                yield record[text_field]
    except UnicodeDecodeError as error:
        raise _not_utf8(name, error) from error


def _parquet_documents(name: str, raw: IO[bytes], text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(raw if raw.seekable() else io.BytesIO(raw.read()))
    except Exception as error:
        raise PipelineError(f"{name} is not a readable parquet file ({error}).") from error
    if text_field not in parquet.schema_arrow.names:
        raise PipelineError(
            f"{name} has no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}). "
            "Name the text column with --text-field."
        )
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def _file_documents(name: str, raw: IO[bytes], config: DownloadConfig, per_block: bool) -> Iterator[str]:
    """The documents of one file of a local format, from its bytes; `name` picks the format and names it in
    errors."""
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_documents(name, raw, config.text_field)
    if name.endswith(".parquet"):
        return _parquet_documents(name, raw, config.text_field)
    return _txt_documents(name, raw, per_block)


def _archive_members(path: Path) -> Iterator[tuple[str, IO[bytes]]]:
    """(name, open file) of the regular files of a tar or zip archive that hold documents, in archive order.

    Nothing is extracted: each member is read from the archive into memory, so a member named `../x` or
    `/etc/x` writes nowhere, and links and device entries are skipped rather than followed."""
    import tarfile
    import zipfile

    try:
        if path.name.endswith(".zip"):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if not info.is_dir() and info.filename.endswith(DOCUMENT_SUFFIXES):
                        with archive.open(info) as raw:
                            yield info.filename, raw
        else:
            with tarfile.open(path) as archive:
                for member in archive:
                    if member.isreg() and member.name.endswith(DOCUMENT_SUFFIXES):
                        with archive.extractfile(member) as raw:
                            yield member.name, raw
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as error:
        raise PipelineError(f"{path} is not a readable archive ({error}). Download it again.") from error


def local_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise PipelineError(f"--source {root} does not exist. Give a file, a folder, builtin, hf:NAME or a URL.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(LOCAL_SUFFIXES))
    if not files:
        raise PipelineError(f"{root} holds no {', '.join(LOCAL_SUFFIXES)} files to read documents from.")
    return files


def local_documents(root: Path, config: DownloadConfig) -> Iterator[tuple[str, str]]:
    for path in local_files(root):
        label = str(path.relative_to(root)) if root.is_dir() else path.name
        if path.name.endswith(ARCHIVE_SUFFIXES):  # one document per member file unless told otherwise
            for member, raw in _archive_members(path):
                for text in _file_documents(f"{path}:{member}", raw, config, config.doc_split == "blankline"):
                    yield f"{label}:{member}", text
            continue
        per_block = config.doc_split == "blankline" or (config.doc_split == "auto" and root.is_file())
        with open(path, "rb") as raw:
            for text in _file_documents(str(path), raw, config, per_block):
                yield label, text


def _local_state(root: Path) -> list[list[Any]]:
    """What the local input looked like, so that a changed file makes the old output out of date."""
    base = root if root.is_dir() else root.parent
    return [[str(p.relative_to(base)), p.stat().st_size, p.stat().st_mtime_ns] for p in local_files(root)]


# --- remote sources -------------------------------------------------------------------------------------

class HubStream:
    """A Hugging Face dataset streamed through `datasets`, resumable from the state it reports."""

    def __init__(self, spec: str, config: DownloadConfig) -> None:
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.spec, self.text_field = spec, config.text_field
        name, _, subset = spec.partition(":")
        for wait in (*HUB_RETRY_SECONDS, None):
            try:
                self.dataset = datasets.load_dataset(name, subset or None, split=config.split, streaming=True)
                break
            except Exception as error:
                status = _server_error(error)
                if status is None or wait is None:
                    raise _hub_error(name, subset, config.split, error) from error
                log.warning("the hub answered %d while opening %s: trying again in %d s", status, name, wait)
                time.sleep(wait)
        if config.part:
            index, count = parse_part(config.part)
            self.dataset = split_dataset_by_node(self.dataset, rank=index, world_size=count)

    def state(self) -> Any:
        return self.dataset.state_dict()

    def restore(self, state: Any) -> None:
        self.dataset.load_state_dict(state)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for example in self.dataset:
            if self.text_field not in example:
                raise PipelineError(
                    f"dataset {self.spec!r} has no field {self.text_field!r} (fields: {', '.join(example)}). "
                    "Name the text field with --text-field."
                )
            yield f"hf:{self.spec}", example[self.text_field]


def _server_error(error: BaseException | None) -> int | None:
    """The HTTP status of a server-side error (5xx, or 429: too many requests) anywhere in the exception's chain:
    worth another try. A lost connection huggingface_hub has already retried itself."""
    while error is not None:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return status
        error = error.__cause__ or error.__context__
    return None


def _hub_error(name: str, subset: str, split: str, error: BaseException) -> PipelineError:
    from huggingface_hub import constants

    what = f"dataset {name!r}{f' config {subset!r}' if subset else ''} split {split!r}"
    if isinstance(error, ConnectionError):
        return PipelineError(f"cannot connect to the Hugging Face hub at {constants.ENDPOINT} to load {what} "
                             f"({error}). Check your network (and HF_ENDPOINT), or download the data yourself and "
                             "pass its local path to --source.")
    return PipelineError(f"cannot load {what} through `datasets` ({type(error).__name__}: {error}). Check the name "
                         "and your network, or download the data yourself and pass its local path to --source.")


def fetch_url(url: str, folder: Path) -> Path:
    name = Path(urllib.parse.urlparse(url).path).name or "download.txt"
    if not name.endswith(LOCAL_SUFFIXES):
        name += ".txt"
    target = folder / name
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"fetch {name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as error:
        raise PipelineError(f"cannot fetch {url}: {error}. Check the URL and your network.") from error
    return target


# --- the stage ------------------------------------------------------------------------------------------

class PartWriter:
    """Writes documents as JSON lines into numbered parts, stopping at the configured limits.

    A part appears under its final name only when complete, and `.progress.json` then records everything
    needed to carry on from there: counts, per-source digests, how many items of the source were consumed
    (or the stream's own state). An interrupted download restarts from its last complete part.
    """

    def __init__(self, folder: Path, config: DownloadConfig, count_tokens: Callable[[str], int] | None) -> None:
        self.folder, self.config, self.count_tokens = folder, config, count_tokens
        progress = json.loads((folder / PROGRESS).read_text()) if (folder / PROGRESS).is_file() else {}
        self.parts: list[str] = progress.get("parts", [])
        self.documents: int = progress.get("documents", 0)
        self.text_bytes: int = progress.get("text_bytes", 0)
        self.tokens: int = progress.get("tokens", 0)
        self.consumed: int = progress.get("consumed", 0)
        self.stream_state: Any = progress.get("stream_state")
        self.sources: dict[str, dict[str, Any]] = progress.get("sources", {})
        for stray in folder.glob(f".{PART_PREFIX}*.partial"):
            stray.unlink()  # the part being written when the last run stopped: its documents come again
        self._file: IO[str] | None = None
        self._part_bytes = 0

    def full(self) -> bool:
        limits = ((self.config.max_docs, self.documents), (self.config.max_bytes, self.text_bytes),
                  (self.config.max_tokens, self.tokens))
        return any(limit is not None and count >= limit for limit, count in limits)

    def add(self, source: str, text: str, stream_state: Any = None) -> None:
        """One item of the source (consumed even when it is empty and skipped)."""
        self.consumed += 1
        if isinstance(text, str) and text.strip():
            if self._file is None:
                self._file = open(self.folder / f".{part_name(len(self.parts))}.partial", "w", encoding="utf-8")
                self._part_bytes = 0
            line = document_line(text, source)
            self._file.write(line)
            data = text.encode("utf-8")
            self._part_bytes += len(line)
            self.text_bytes += len(data)
            self.documents += 1
            if self.count_tokens is not None:
                self.tokens += self.count_tokens(text)
            entry = self.sources.setdefault(source, {"documents": 0, "bytes": 0, "sha256_chain": ""})
            entry["documents"] += 1
            entry["bytes"] += len(data)
            # a chain of per-document digests, so the digest can be carried on after a restart
            entry["sha256_chain"] = hashlib.sha256(
                (entry["sha256_chain"] + hashlib.sha256(data).hexdigest()).encode()).hexdigest()
        if self._part_bytes >= PART_BYTES or self.full():
            self.finish_part(stream_state)

    def finish_part(self, stream_state: Any = None) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        name = part_name(len(self.parts))
        os.replace(self.folder / f".{name}.partial", self.folder / name)
        self.parts.append(name)
        self.stream_state = stream_state
        write_json_atomic(self.folder / PROGRESS, {
            "parts": self.parts, "documents": self.documents, "text_bytes": self.text_bytes, "tokens": self.tokens,
            "consumed": self.consumed, "stream_state": stream_state, "sources": self.sources})

    def source_list(self) -> list[dict[str, Any]]:
        return [{"source": name, **entry} for name, entry in self.sources.items()]


def _plan(config: DownloadConfig) -> tuple[dict[str, Any], Path | None]:
    """The parameters that define the output, and the local path when the source is one."""
    source = config.source
    local = None
    if source == "builtin":
        state: Any = {"python": platform.python_version(), "stdlib": sysconfig.get_paths()["stdlib"]}
    elif source.startswith("hf:") or re.match(r"https?://", source):
        state = None
    else:
        local = Path(source).expanduser().resolve()
        source = str(local)
        state = _local_state(local)
    params = {
        "source": source, "source_state": state, "text_field": config.text_field, "split": config.split,
        "max_docs": config.max_docs, "max_bytes": config.max_bytes, "doc_split": config.doc_split,
        "part": config.part, "max_tokens": config.max_tokens,
        "count_tokenizer": config.count_tokenizer if config.max_tokens is not None else None,
    }
    return params, local


def open_source(config: DownloadConfig, local: Path | None, scratch: Path) -> Iterable[tuple[str, str]]:
    """The (source label, text) items of --source, this part's share of them with --part."""
    if config.source.startswith("hf:"):
        return HubStream(config.source[3:], config)  # splits itself across parts, by data files where it can
    if config.source == "builtin":
        items: Iterable[tuple[str, str]] = builtin_documents()
    elif local is not None:
        items = local_documents(local, config)
    else:
        scratch.mkdir(exist_ok=True)
        items = local_documents(fetch_url(config.source, scratch), config)
    if not config.part:
        return items
    index, count = parse_part(config.part)
    return (item for position, item in enumerate(items) if position % count == index)


def run(config: DownloadConfig) -> Path:
    corpus = part_corpus(config.corpus or corpus_name(config.source), config.part)
    params, local = _plan(config)
    out = StageOutput(DataDir(config.data_dir).raw(corpus), "download", FORMAT_VERSION, params, force=config.force)
    if out.up_to_date():
        return out.final
    # the size to expect: the byte limit, else the size of plain-text input (compressed input has no good guess);
    # JSON lines take a little more than their text
    plain = local is not None and all(p.suffix in (".txt", ".jsonl") for p in local_files(local))
    total = config.max_bytes or (sum(p.stat().st_size for p in local_files(local)) if plain else None)
    require_free_space(out.final.parent, 1.2 * (total or 0), "the downloaded text")
    count_tokens = None
    if config.max_tokens is not None:
        count_tokens = token_counter(config.count_tokenizer, config.data_dir)
    with out.building(resumable=True) as folder:
        writer = PartWriter(folder, config, count_tokens)
        scratch = folder / ".fetched"
        items = open_source(config, local, scratch)
        if isinstance(items, HubStream) and writer.stream_state is not None:
            items.restore(writer.stream_state)
        elif writer.consumed:
            items = islice(items, writer.consumed, None)
        if writer.consumed:
            log.info("download: resuming after %d documents (%d parts)", writer.documents, len(writer.parts))
        with tqdm(desc=f"download {corpus}", total=total, initial=writer.text_bytes, unit="B",
                  unit_scale=True) as bar:
            for source, text in items:
                before = writer.text_bytes
                writer.add(source, text, items.state() if isinstance(items, HubStream) else None)
                bar.update(writer.text_bytes - before)
                if writer.full():
                    break
        writer.finish_part(items.state() if isinstance(items, HubStream) else None)
        shutil.rmtree(scratch, ignore_errors=True)
        (folder / PROGRESS).unlink(missing_ok=True)
        if writer.documents == 0:
            raise PipelineError(
                f"--source {config.source} gave no documents with text: the corpus is empty. "
                "Check the path, the --text-field, or the limits."
            )
        out.counts = {"documents": writer.documents, "text_bytes": writer.text_bytes, "parts": len(writer.parts)}
        if count_tokens is not None:
            out.counts["tokens"] = writer.tokens
        out.extra["sources"] = writer.source_list()
    log.info("download: %d documents, %.1f MB of text in %s", writer.documents, writer.text_bytes / 1e6, out.final)
    return out.final


def main(argv: list[str] | None = None) -> None:
    stage_main(DownloadConfig, run, argv)


if __name__ == "__main__":
    main()
