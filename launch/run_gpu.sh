#!/usr/bin/env bash
# Train the example ResNet (launch/train.py) on GPUs with NCCL: one node, or many.
#
#   bash launch/run_gpu.sh                                   # every GPU of this node
#   NGPU=4 bash launch/run_gpu.sh --amp bf16 --channels-last # extra arguments go to train.py
#
# Several nodes: run the same command on every node, with the address of node 0. The nodes meet
# through torchrun's c10d rendezvous, hosted by node 0 on MASTER_ADDR:MASTER_PORT.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/run_gpu.sh    # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/run_gpu.sh    # on node 1
#
# MAX_RESTARTS=3 has torchrun restart the workers (of every node) after a failure; with --ckpt and
# --resume they continue from the last checkpoint.
#
# Without a GPU, launch/run_cpu.sh trains the same model on CPU processes.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-syncbn-train}   # the same on every node of one job, different between jobs
BACKEND=${BACKEND:-nccl}
MAX_RESTARTS=${MAX_RESTARTS:-0}   # times torchrun restarts the workers after one fails
# A fresh rendezvous store for every attempt: a restarted group that reuses torchrun's shared
# store can read the previous attempt's addresses (README, Troubleshooting, Elastic restarts).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
    echo "run_gpu.sh: MAX_RESTARTS=$MAX_RESTARTS is not a number of restarts (0, 1, ...)" >&2
    exit 1
fi
# --help from one process, not from every rank.
for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then exec python "$ROOT/launch/train.py" --help; fi
done
# Checked before torchrun starts: a rank without a GPU would fail with a traceback of its own.
VISIBLE=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$VISIBLE" -eq 0 ]; then
    echo "run_gpu.sh: torch sees no CUDA device on this machine; on CPU, run bash launch/run_cpu.sh" \
        "(it takes the same options)" >&2
    exit 1
fi
NGPU=${NGPU:-$VISIBLE}
if ! [[ "$NGPU" =~ ^[0-9]+$ ]] || [ "$NGPU" -lt 1 ] || [ "$NGPU" -gt "$VISIBLE" ]; then
    echo "run_gpu.sh: NGPU=$NGPU, but this node has $VISIBLE visible GPU(s): set NGPU between 1 and $VISIBLE" >&2
    exit 1
fi
# A bad option stops here, in one process, not on every rank followed by torchrun's report of
# the failed workers.
python -c 'import os, sys; sys.argv.pop(0); sys.path.insert(0, os.path.dirname(sys.argv[0]))
import train; train.parse_config()' "$ROOT/launch/train.py" --backend "$BACKEND" "$@"

if [ "$NNODES" -eq 1 ]; then
    RDZV_ENDPOINT=localhost:0   # one node: any free port
    IS_HOST=1
else
    RDZV_ENDPOINT=$MASTER_ADDR:$MASTER_PORT
    IS_HOST=$([ "$NODE_RANK" -eq 0 ] && echo 1 || echo 0)   # node 0 hosts the rendezvous store
fi

exec torchrun \
    --nnodes "$NNODES" \
    --nproc-per-node "$NGPU" \
    --rdzv-backend c10d \
    --rdzv-endpoint "$RDZV_ENDPOINT" \
    --rdzv-id "$RDZV_ID" \
    --rdzv-conf "is_host=$IS_HOST" \
    --max-restarts "$MAX_RESTARTS" \
    "$ROOT/launch/train.py" --backend "$BACKEND" "$@"
