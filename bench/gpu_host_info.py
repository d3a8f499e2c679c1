"""What the GPU host runs (device, library versions), for the records of bench/gpu_check.sh and bench/gpu_suite.sh:
python3 bench/gpu_host_info.py OUT_DIR writes OUT_DIR/host.json and prints it."""

import json
import platform
import shutil
import sys
from pathlib import Path

import datasets
import deepspeed
import torch
import transformers

if __name__ == "__main__":
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "python": platform.python_version(),
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30, "make": shutil.which("make")}
    (Path(sys.argv[1]) / "host.json").write_text(json.dumps(info, indent=2) + "\n")
    print(info)
