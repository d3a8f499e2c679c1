"""What every stage shares: the data directory, the stage folders in it, logging and command-line parsing.

Each stage is configured by one dataclass that extends `StageConfig`; `stage_main` turns the command line
into that dataclass (flags are the field names, `--data-dir` and `--data_dir` both work) and runs the stage.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

DATA_DIR_ENV = "ONECARD_DATA"
# The file kinds the download stage reads (also stripped from a file name to name its corpus).
DOCUMENT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.gz", ".jsonl.gz")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2", ".zip")
LOCAL_SUFFIXES = DOCUMENT_SUFFIXES + ARCHIVE_SUFFIXES
log = logging.getLogger("onecard")


class PipelineError(Exception):
    """A problem the user can fix: the message names the file or option and says how."""


@dataclass(frozen=True)
class Range:
    """The values a numeric option takes, checked when the command line is parsed (`metadata={"range": ...}`
    on every int and float field of a stage's config)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is outside
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_ONE = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1, high_open=True)  # dropout, a held-out fraction: 1 would leave nothing
RATIO = Range(0, 1)


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


@dataclass
class StageConfig:
    """Options every stage has."""

    data_dir: Path = field(
        default_factory=default_data_dir,
        metadata={"help": f"root of the data directory shared by all stages (env {DATA_DIR_ENV})"},
    )
    force: bool = field(
        default=False,
        metadata={"help": "rebuild the output even when an up-to-date or a different one is already there"},
    )


def corpus_name(source: str) -> str:
    """A folder-safe corpus name derived from a source: 'hf:a/b:c' -> 'b-c', '/x/books.txt' -> 'books'."""
    if source == "builtin":
        return "builtin"
    if source.startswith("hf:"):
        dataset, _, config = source[3:].partition(":")
        name = dataset.rstrip("/").split("/")[-1] + (f"-{config}" if config else "")
    else:
        path = urllib.parse.urlparse(source).path if re.match(r"https?://", source) else source
        name = Path(path.rstrip("/")).name
        for suffix in sorted(LOCAL_SUFFIXES, key=len, reverse=True):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "corpus"


def parse_part(part: str) -> tuple[int, int]:
    """'I/N' -> (I, N): the share I (counted from 0) of a source split N ways."""
    index, _, count = part.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise PipelineError(f"--part {part!r} must be I/N with 0 <= I < N, e.g. --part 0/4 ... --part 3/4.")
    return int(index), int(count)


def part_corpus(corpus: str, part: str | None) -> str:
    """The corpus name of one share of a split source: books -> books.part-0-of-4."""
    if not part:
        return corpus
    index, count = parse_part(part)
    return f"{corpus}.part-{index}-of-{count}"


class DataDir:
    """The folders of the data-directory contract (docs/STAGES.md); the only place that spells them."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def raw(self, corpus: str) -> Path:
        return self.root / "raw" / corpus

    def tokenizer(self, name: str) -> Path:
        return self.root / "tokenizer" / name

    def tokens(self, corpus: str) -> Path:
        return self.root / "tokens" / corpus

    def shards(self, corpus: str) -> Path:
        return self.root / "shards" / corpus

    def checkpoints(self, run: str) -> Path:
        return self.root / "checkpoints" / run

    def default_run(self, corpus: str, preset: str, deepspeed_config: str, fresh: bool = False) -> str:
        """`<corpus>-<preset>-<config>-<YYYYMMDD>`, dated the day the run started: the newest existing run of
        that corpus, preset and config (so the same command resumes it, or finds it finished), else — or when
        `fresh` — today's."""
        stem = f"{corpus}-{preset}-{Path(deepspeed_config).stem}"
        dated = re.compile(rf"{re.escape(stem)}-\d{{8}}")
        started = sorted(p.name for p in (self.root / "checkpoints").glob(f"{stem}-*") if dated.fullmatch(p.name))
        return started[-1] if started and not fresh else f"{stem}-{time.strftime('%Y%m%d')}"

    def runs(self, run: str) -> Path:
        return self.root / "runs" / run

    def eval(self, run: str) -> Path:
        return self.root / "eval" / run

    def export(self, run: str) -> Path:
        return self.root / "export" / run


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Console logging for the pipeline: rank 0 only, so N ranks do not print N copies of every line. Below
    `level` (DEBUG), records go only to the files `log_to_file` adds."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    handler.setLevel(level if rank == 0 else logging.ERROR)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    log.propagate = False


def log_to_file(path: Path) -> None:
    """Everything, DEBUG included, also to `path`, and Python warnings (library deprecations and the like)
    there only, not to the console."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.DEBUG)
    log.handlers = [h for h in log.handlers if not isinstance(h, logging.FileHandler)] + [handler]
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler]
    warnings_log.propagate = False


def close_log_file() -> None:
    """Stop what `log_to_file` started (a process may run several stages or runs one after another)."""
    for logger in (log, logging.getLogger("py.warnings")):
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
            handler.close()
    logging.captureWarnings(False)
    logging.getLogger("py.warnings").propagate = True


ConfigT = TypeVar("ConfigT")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_config(cls: type[ConfigT], argv: Sequence[str] | None = None) -> ConfigT:
    """A config dataclass from the command line: one flag per field (`--max-steps` or `--max_steps`), booleans as
    `--flag` / `--no-flag`, `Literal` fields as choices. (Not transformers' HfArgumentParser: importing
    transformers costs every stage seconds of start-up.)"""
    parser = argparse.ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n\n")[0],
                                     formatter_class=_DefaultsHelp)
    hints = get_type_hints(cls)
    for item in fields(cls):
        flags = [f"--{item.name.replace('_', '-')}"] + ([f"--{item.name}"] if "_" in item.name else [])
        default = item.default if item.default is not MISSING else item.default_factory()
        kind = hints[item.name]
        if get_origin(kind) in (Union, UnionType):  # X | None: the flag takes an X
            kind = next(arg for arg in get_args(kind) if arg is not type(None))
        help_text = item.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif get_origin(kind) is Literal:
            parser.add_argument(*flags, choices=get_args(kind), default=default, help=help_text)
        elif "range" in item.metadata:
            bound = item.metadata["range"]
            parser.add_argument(*flags, type=_within(kind, bound), default=default, help=f"{help_text} ({bound})")
        else:
            parser.add_argument(*flags, type=kind, default=default, help=help_text)
    return cls(**vars(parser.parse_args(argv)))


def _within(kind: type, bound: Range) -> Callable[[str], Any]:
    """argparse's `type` for a number that must lie in `bound`: outside it, argparse's usage error (exit 2)
    names the option, the value and the range."""

    def parse(text: str) -> Any:
        value = kind(text)
        if not bound.holds(value):
            raise argparse.ArgumentTypeError(f"{text} is outside its range, {bound}")
        return value

    parse.__name__ = kind.__name__  # argparse says "invalid int value" for text that is no number
    return parse


def stage_main(cls: type[ConfigT], run: Callable[[ConfigT], Any], argv: Sequence[str] | None = None) -> None:
    """The `python -m pipeline.<stage>` entry: parse, run, and turn a PipelineError into a clean exit 2."""
    setup_logging()
    config = parse_config(cls, argv)
    try:
        run(config)
    except PipelineError as error:
        log.error("%s", error)
        sys.exit(2)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.error("%s: the disk is full (%s) while writing %s. Free some space (or point --data-dir at a bigger "
                  "disk) and run the same command again: finished outputs and checkpoints are untouched, and an "
                  "interrupted download or tokenize carries on where it stopped.", cls.__name__.removesuffix("Config"),
                  error.strerror, error.filename or "its output")
        sys.exit(2)
