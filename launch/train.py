"""The train stage's entry point for the DeepSpeed launcher:

    deepspeed launch/train.py --deepspeed ds_configs/zero3_offload.json [--preset gpt2-xl] [...]

Run `python launch/train.py --help` for every option; they are the fields of pipeline.train.TrainConfig.
"""

import sys
from pathlib import Path

# The launcher runs this file as a script: make the repository importable even without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.train import main

if __name__ == "__main__":
    main()
