#!/usr/bin/env bash
# Training on several machines (or several GPUs) with a DeepSpeed hostfile, started on every node without ssh:
#
#   # hosts: one line per machine, "<hostname> slots=<GPUs>", the same file on every node
#   node0$ launch/train_nodes.sh hosts 0 node0 --deepspeed ds_configs/zero2_offload.json --preset gpt2-xl
#   node1$ launch/train_nodes.sh hosts 1 node0 --deepspeed ds_configs/zero2_offload.json --preset gpt2-xl
#
# Arguments: HOSTFILE NODE_RANK MASTER_ADDR, then train's options. MASTER_PORT (default 29500) must be free on
# the master. Every node needs the same shards under its data directory (ONECARD_DATA) and a shared or
# identical checkpoint folder to resume. With passwordless ssh, `deepspeed --hostfile hosts launch/train.py ...`
# on one node starts them all instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
hostfile=${1:?usage: launch/train_nodes.sh HOSTFILE NODE_RANK MASTER_ADDR [train options]}
node_rank=${2:?node rank missing}
master=${3:?master address missing}
shift 3
exec "${VIRTUAL_ENV:-.venv}/bin/deepspeed" --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" \
  --master_addr "$master" --master_port "${MASTER_PORT:-29500}" launch/train.py "$@"
