#!/usr/bin/env bash
# The whole GPU-host measurement in one command (bench/gpu_check.py says what it runs). From the project root on
# the GPU host, with .gpuhost (../shared/gpu-host/make_wheelhouse.sh) and data/shards/gutenberg carried:
#
#     RUNS=hf,today,best,nvme bash bench/gpu_check.sh
#
# Writes under $OUT (default ./gpu-check-out): gpu-check/<run>.json and table.md, host.json, ops.json. The ops
# DeepSpeed builds go to .torch_extensions/ in the project (ignored by git), which the GPU host keeps between
# calls while it stays warm: a second call loads them instead of building them (100+ MB: too big to carry).
# Finishes within DEADLINE seconds (default 560) of its start.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
DEADLINE=${DEADLINE:-560}
RUNS=${RUNS:-hf,today,best,nvme}
PRESET=${PRESET:-gpt2-xl}
CORPUS=${CORPUS:-gutenberg}
mkdir -p "$OUT"

# shellcheck disable=SC1091
source .gpuhost/bootstrap.sh
export PATH=/tmp/site/bin:$PATH  # the deepspeed launcher, installed beside the packages
# DeepSpeed's op builder cannot parse arch-specific entries such as 9.0a (onecard refuses them with this fix).
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST//a/}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.torch_extensions}

[ -f "data/shards/$CORPUS/index.json" ] || {
  echo "data/shards/$CORPUS is missing: make it on the CPU machine (docs/BENCHMARKS.md) and carry it" >&2; exit 2; }

python3 bench/gpu_host_info.py "$OUT"

# Build (or load) the ops every config needs before any run starts, so that no run's time cap pays for a build.
python3 - "$OUT" <<'PY'
import json, sys
from pipeline.dsconfig import load_ds_config, load_ops
ops = load_ops(load_ds_config("ds_configs/zero3_nvme.json"))
open(f"{sys.argv[1]}/ops.json", "w").write(json.dumps(ops, indent=2) + "\n")
print("ops:", ops)
PY

python3 bench/gpu_check.py --preset "$PRESET" --seq-len 1024 --precision bf16 --gpu-mem-cap 11 --corpus "$CORPUS" \
  --gradient-checkpointing --runs "$RUNS" --budget $((DEADLINE - SECONDS - 20)) --out "$OUT/gpu-check" || true

echo "gpu check done in ${SECONDS}s"
