#!/usr/bin/env bash
# Single- or multi-node launch with torchrun. Usage:
#   NPROC=4 launchers/torchrun.sh distill configs/quickstart.yaml optim.lr=0.05
# Multi-node: set NNODES, NODE_RANK and MASTER_ADDR (and MASTER_PORT) on every node.
set -euo pipefail
NPROC=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
if [ -n "${NNODES:-}" ] && [ "${NNODES}" != 1 ]; then
  exec torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?}" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?}:${MASTER_PORT:-29500}" -m hpckd "$@"
fi
exec torchrun --standalone --nproc_per_node "$NPROC" -m hpckd "$@"
