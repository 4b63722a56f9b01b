#!/usr/bin/env bash
# A p2pswarm swarm over torch.distributed, launched with torchrun: one agent per process (rank).
#
#   scripts/train_torch.sh [NUM_NODES] [NUM_PROC_PER_NODE] [extra `p2pswarm run` options...]
#
#   scripts/train_torch.sh 1 4 --rounds 100          # one machine, 4 ranks
#   MASTER_ADDR=10.0.0.1 scripts/train_torch.sh 2 8  # on each of 2 machines: 16 ranks in all
#
# Environment (RL Swarm / GenRL names; the positional numbers win over the variables):
#   NUM_NODES            machines taking part (default 1)
#   NUM_PROC_PER_NODE    ranks per machine (default: its GPU count, or 2 without a GPU)
#   MASTER_ADDR          address of the machine that hosts the rendezvous, reachable by all (multi-node: required)
#   MASTER_PORT          its port (default 29500)
#   NODE_RANK            optional, multi-node: this machine's index (0..NUM_NODES-1); fixes which ranks run
#                        where, so each rank finds its identity and output again after a restart
#   RDZV_ID              optional: rendezvous id shared by the machines (default p2pswarm-<EXPERIMENT_NAME>)
#   PYTHON               the interpreter (default: the project's .venv if present, else python3)
# and every p2pswarm setting: MODEL_NAME, EXPERIMENT_NAME, NODE_ID, P2PSWARM_* (see docs/torch-distributed.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
is_count() { [[ "${1:-}" =~ ^[1-9][0-9]*$ ]]; }
if is_count "${1:-}"; then NUM_NODES=$1; shift; fi
if is_count "${1:-}"; then NUM_PROC_PER_NODE=$1; shift; fi

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -z "${VIRTUAL_ENV:-}" && -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
NUM_NODES=${NUM_NODES:-1}
if [[ -z "${NUM_PROC_PER_NODE:-}" ]]; then
    NUM_PROC_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
is_count "$NUM_NODES" || { echo "error: NUM_NODES must be a positive integer, got '$NUM_NODES'" >&2; exit 2; }
is_count "$NUM_PROC_PER_NODE" || { echo "error: NUM_PROC_PER_NODE must be a positive integer, got '$NUM_PROC_PER_NODE'" >&2; exit 2; }
MASTER_PORT=${MASTER_PORT:-29500}

if [[ "$NUM_NODES" == 1 ]]; then
    # One machine: rendezvous on loopback (gloo then stays on loopback too).
    rdzv=(--nnodes 1 --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$MASTER_PORT")
elif [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "error: NUM_NODES=$NUM_NODES needs MASTER_ADDR: the address of one of the machines, reachable by all" >&2
    exit 2
elif [[ -n "${NODE_RANK:-}" ]]; then
    # Fixed placement: machine k runs ranks k*NUM_PROC_PER_NODE ... (k+1)*NUM_PROC_PER_NODE-1.
    rdzv=(--nnodes "$NUM_NODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
else
    # Elastic rendezvous like GenRL's scripts/train.sh: machines may start in any order.
    rdzv=(--nnodes "$NUM_NODES" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
          --rdzv-id "${RDZV_ID:-p2pswarm-${EXPERIMENT_NAME:-default}}")
fi

export P2PSWARM_COMM=torch
echo "p2pswarm: $NUM_NODES node(s) x $NUM_PROC_PER_NODE rank(s) over torch.distributed" >&2
exec "$PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$NUM_PROC_PER_NODE" \
    -m p2pswarm run --headless "$@"
