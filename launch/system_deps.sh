#!/usr/bin/env sh
# What onecard needs from the system besides Python packages, checked before `make test` and `make run`:
# a C++ compiler and Python's headers (DeepSpeed JIT-builds its CPU Adam and communication ops) and libaio's
# headers (its async_io op, for NVMe offload). Installs what is missing through apt-get when this user may
# (root, or sudo without a password); otherwise names the one command to run and exits 1.
#
#   sh launch/system_deps.sh [PYTHON]      (PYTHON: the interpreter whose headers the ops build against)
set -eu
PYTHON=${1:-python3}
AIO_HEADER=${ONECARD_AIO_HEADER:-libaio.h}

missing=""
# libaio's header wherever the compiler finds it, as DeepSpeed's build will: /usr/include, or a folder that CPATH or
# CFLAGS names (a libaio unpacked without root, as on the GPU host).
# shellcheck disable=SC2086
printf '#include "%s"\n' "$AIO_HEADER" | c++ ${CFLAGS:-} -E -x c++ - >/dev/null 2>&1 || missing="$missing libaio-dev"
command -v c++ >/dev/null 2>&1 || missing="$missing g++"
"$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  2>/dev/null || missing="$missing python3-dev"
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  sudo=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo="sudo"
else
  echo "onecard needs these system packages:$missing. Install them, then run the same command again:" >&2
  echo "    sudo apt-get install -y$missing" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "onecard needs:$missing (on Debian/Ubuntu: apt-get install -y$missing); install their equivalents with" \
       "this system's package manager, then run the same command again." >&2
  exit 1
fi
echo "installing system packages:$missing" >&2
# shellcheck disable=SC2086
$sudo apt-get install -y -q $missing >&2 || { $sudo apt-get update -q >&2 && $sudo apt-get install -y -q $missing >&2; }
