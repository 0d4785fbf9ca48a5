#!/usr/bin/env bash
# Single- or multi-node launch with torchrun; hpckd.dist.init() reads RANK/WORLD_SIZE/LOCAL_RANK. Usage:
#   NPROC=4 launchers/torchrun.sh distill configs/quickstart.yaml optim.lr=0.05
#   NPROC=4 launchers/torchrun.sh train my.yaml dist.backend=deepspeed dist.zero_stage=2 train.precision=bf16
# Multi-node: set NNODES, NODE_RANK and MASTER_ADDR (and MASTER_PORT) on every node.
# PYTHON picks the interpreter (default: python on PATH, e.g. an activated venv).
set -euo pipefail
PY=${PYTHON:-python}
NPROC=${NPROC:-$("$PY" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
if [ -n "${NNODES:-}" ] && [ "${NNODES}" != 1 ]; then
  exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "${NODE_RANK:?}" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" -m hpckd "$@"
fi
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m hpckd "$@"
