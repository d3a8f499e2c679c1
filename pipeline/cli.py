"""`onecard <stage> [options]`: the stages and the planner under one command (each is also
`python -m pipeline.<stage>`)."""

from __future__ import annotations

import runpy
import sys

COMMANDS = ("plan", "download", "tokenize", "shard", "train", "evaluate")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: onecard {{{','.join(COMMANDS)}}} [options]   (onecard <command> --help for its options)")
    command, sys.argv = argv[0], [f"onecard {argv[0]}", *argv[1:]]
    runpy.run_module(f"pipeline.{command}", run_name="__main__", alter_sys=True)
