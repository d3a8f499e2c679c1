"""`onecard <command> [options]`: the stages and the planner under one command (each is also
`python -m pipeline.<command>`)."""

from __future__ import annotations

import importlib
import sys

# command -> the module whose main(argv) runs it
COMMANDS = {"plan": "pipeline.plan", "download": "pipeline.download", "tokenize": "pipeline.tokenize",
            "shard": "pipeline.shard", "train": "pipeline.train", "evaluate": "pipeline.evaluate"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: onecard {{{','.join(COMMANDS)}}} [options]   (onecard <command> --help for its options)")
    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
