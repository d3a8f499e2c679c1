"""The package's shape: stages depend on library modules, never on each other, and nothing imports in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

STAGES = {"download", "tokenize", "shard", "train", "evaluate"}


def pipeline_imports() -> dict[str, set[str]]:
    """module -> the pipeline modules it imports, at the top or inside a function."""
    graph = {}
    for path in sorted((REPO / "pipeline").glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        graph[path.stem] = imported - {path.stem}
    return graph


def test_no_stage_imports_another_stage() -> None:
    graph = pipeline_imports()
    assert set(graph) >= STAGES
    assert {stage: graph[stage] & STAGES for stage in STAGES} == {stage: set() for stage in STAGES}


def test_no_import_cycle() -> None:
    graph = pipeline_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, " -> ".join([*path, module])
        if module in done:
            return
        for imported in graph.get(module, set()):
            visit(imported, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])


def test_the_makefile_needs_only_the_standard_library(tmp_path: Path) -> None:
    """The Makefile computes CORPUS and RUN with the system python3 before anything is installed: what it imports
    must load without site-packages (python -S)."""
    import re
    import subprocess
    import sys

    makefile = (REPO / "Makefile").read_text()
    snippets = re.findall(r"python3 -c '([^']*)'", makefile)
    assert len(snippets) == 3  # CORPUS, RUN, MASTER_PORT
    for snippet in snippets:
        result = subprocess.run([sys.executable, "-S", "-c", snippet, str(tmp_path), "builtin", "tiny",
                                 "ds_configs/zero3_offload.json"], cwd=REPO, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0 and result.stdout.strip(), result.stderr
