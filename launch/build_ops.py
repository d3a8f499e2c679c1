"""Build DeepSpeed's ops once, at install time (`make install` runs it): python launch/build_ops.py"""

import sys
from pathlib import Path

# Run as a script by the Makefile: make the repository importable even without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.dsconfig import build_ops

if __name__ == "__main__":
    for op, (seconds, built) in build_ops().items():
        print(f"DeepSpeed op {op}: {'built' if built else 'already built'} ({seconds:.1f}s)")
