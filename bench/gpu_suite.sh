#!/usr/bin/env bash
# The test suite on the GPU host (a GPU machine must pass the same tests as a CPU one). From the project root on
# the GPU host, with .gpuhost carried (the wheels the suite needs beside the host's own packages: docs/TESTING.md
# gives the make_wheelhouse.sh command):
#
#     bash bench/gpu_suite.sh [PYTEST ARGS]
#
# Installs onecard (editable, no dependencies) and its wheels, starts building the DeepSpeed ops, then runs pytest
# with WORKERS processes. Writes under $OUT (default ./gpu-suite-out): host.json, outcomes.txt and failures.txt
# (written as each test ends), pytest.log and junit.xml. Finishes within DEADLINE seconds (default 540) of its
# start. Measured on an H200 host (16 cores): the ops take 1.5-2.5 minutes to build; the whole suite more than the
# 9 minutes one command may take there, so pass it half the test files at a time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-suite-out}
DEADLINE=${DEADLINE:-540}
WORKERS=${WORKERS:-12}
mkdir -p "$OUT"

# shellcheck disable=SC1091
source .gpuhost/bootstrap.sh || exit 2
BIN=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
# The tests start `deepspeed` and `onecard` from beside the interpreter, as in an installed environment.
ln -sf /tmp/site/bin/deepspeed "$BIN/deepspeed"
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . || exit 2
# This environment is installed (the bundle's wheels): `make run` in the end-to-end tests must not install again.
touch "$BIN/../.onecard-packages" "$BIN/../.onecard-installed" "$BIN/../.onecard-test-installed"
# DeepSpeed's op builder cannot parse arch-specific entries such as 9.0a.
[ -n "${TORCH_CUDA_ARCH_LIST:-}" ] && export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST//a/}
# Outside the project: the end-to-end test copies the project tree.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}

python3 bench/gpu_host_info.py "$OUT"

# Each test's outcome written as it comes (a run cut short by DEADLINE still says which tests failed, and why).
mkdir -p /tmp/gpu_suite_plugin && cat > /tmp/gpu_suite_plugin/outcomes.py <<'PY'
import os

def pytest_runtest_logreport(report):
    if "PYTEST_XDIST_WORKER" in os.environ:  # the controller writes what every worker reports
        return
    if report.when == "call" or report.outcome != "passed":
        out = os.environ["OUT"]
        with open(f"{out}/outcomes.txt", "a") as f:
            f.write(f"{report.outcome} {report.when} {report.duration:.1f}s {report.nodeid}\n")
        if report.failed:
            with open(f"{out}/failures.txt", "a") as f:
                f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")
PY
export OUT PYTHONPATH=/tmp/gpu_suite_plugin:$PYTHONPATH
# The ops build while the tests run (a test that needs one waits on its build lock).
python3 launch/build_ops.py > "$OUT/build_ops.log" 2>&1 &

timeout $((DEADLINE - SECONDS)) python3 -m pytest -q -n "$WORKERS" --dist loadfile -p no:cacheprovider -p outcomes \
  --timeout 300 --junitxml "$OUT/junit.xml" --durations 30 "$@" 2>&1 | tee "$OUT/pytest.log"
echo "gpu suite done in ${SECONDS}s"
