#!/usr/bin/env bash
# Train the example ResNet (launch/train.py) on CPU processes of this machine, gloo backend,
# synthetic data: runs anywhere, downloads nothing, prints the final metrics after ~30 s.
#
#   bash launch/run_cpu.sh                          # 2 processes, the default short run
#   NPROC=4 bash launch/run_cpu.sh --epochs 5       # extra arguments go to launch/train.py
#   bash launch/run_cpu.sh --bn local --batch-size 4   # plain BatchNorm per rank, for comparison
#   MAX_RESTARTS=3 bash launch/run_cpu.sh --ckpt ckpt.pt --ckpt-every 50 --resume   # restart after a crash
set -euo pipefail

NPROC=${NPROC:-2}
MAX_RESTARTS=${MAX_RESTARTS:-0}   # times torchrun restarts the workers after one fails
# A fresh rendezvous store for every attempt: a restarted group that reuses torchrun's shared
# store can read the previous attempt's addresses (README, Troubleshooting, Elastic restarts).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# One thread per process: NPROC processes share the cores (torchrun would set 1 and warn).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Works from a clone without `pip install -e .` too.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
    echo "run_cpu.sh: NPROC=$NPROC is not a number of processes (1, 2, ...)" >&2
    exit 1
fi
if ! [[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]]; then
    echo "run_cpu.sh: MAX_RESTARTS=$MAX_RESTARTS is not a number of restarts (0, 1, ...)" >&2
    exit 1
fi
# --help from one process, not from every rank.
for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then exec python "$ROOT/launch/train.py" --help; fi
done
# A bad option stops here, in one process, not on every rank followed by torchrun's report of
# the failed workers.
python -c 'import os, sys; sys.argv.pop(0); sys.path.insert(0, os.path.dirname(sys.argv[0]))
import train; train.parse_config()' "$ROOT/launch/train.py" --backend gloo "$@"

exec torchrun --standalone --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" "$ROOT/launch/train.py" --backend gloo "$@"
