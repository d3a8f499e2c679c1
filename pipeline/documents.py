"""The raw-document format between download and tokenize: numbered JSON-lines parts `docs_NNNNN.jsonl` in
`raw/<corpus>/`, one document per line as `{"text": ..., "source": ...}`, in corpus order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

PART_PREFIX = "docs_"


def part_name(number: int) -> str:
    return f"{PART_PREFIX}{number:05d}.jsonl"


def document_parts(raw_dir: Path) -> list[Path]:
    return sorted(Path(raw_dir).glob(f"{PART_PREFIX}*.jsonl"))


def document_line(text: str, source: str) -> str:
    return json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n"


def document_text(line: str | bytes) -> str:
    return json.loads(line)["text"]


def read_documents(raw_dir: Path) -> Iterator[str]:
    """The texts of a download output, in order."""
    for part in document_parts(raw_dir):
        with open(part, encoding="utf-8") as f:
            for line in f:
                yield document_text(line)
