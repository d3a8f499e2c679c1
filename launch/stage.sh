#!/usr/bin/env bash
# One pipeline stage, for a batch scheduler (sbatch, qsub) or a cron job: the project's virtualenv, the data
# directory from ONECARD_DATA (default ./data), and the exit code of the stage (2: bad input, nothing written).
#
#   launch/stage.sh download --source hf:HuggingFaceFW/fineweb-edu:sample-10BT --max-tokens 10e9
#   launch/stage.sh tokenize --corpus fineweb-edu-sample-10bt --tokenizer gpt2
#   sbatch --cpus-per-task 32 launch/stage.sh shard --corpus fineweb-edu-sample-10bt
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stage=${1:?usage: launch/stage.sh download|tokenize|shard|evaluate|plan [options]}
shift
case $stage in download|tokenize|shard|evaluate|plan) ;; *) echo "unknown stage $stage; for training use launch/train_nodes.sh" >&2; exit 2;; esac
python=${VIRTUAL_ENV:-.venv}/bin/python
exec "$python" -m "pipeline.$stage" "$@"
