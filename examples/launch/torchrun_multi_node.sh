#!/usr/bin/env bash
# Several nodes: run this same command on every node (c10d rendezvous).
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 examples/launch/torchrun_multi_node.sh \
#       examples/qwen2_5_vl_32b_papo_g.yaml [section.key=value ...]
# Env:
#   NNODES         number of nodes (required)
#   NODE_RANK      this node's rank 0..NNODES-1 (informational with c10d; torchrun assigns ranks)
#   MASTER_ADDR    host of the rendezvous store (node 0), MASTER_PORT (default 29500)
#   RDZV_ENDPOINT  host:port, overrides MASTER_ADDR:MASTER_PORT
#   RDZV_ID        job id shared by all nodes (default: papo)
#   GPUS_PER_NODE  default 8
# NCCL: NCCL_SOCKET_IFNAME / NCCL_IB_HCA pick the interfaces (site specific); NCCL_DEBUG=WARN.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: NNODES=N MASTER_ADDR=host $0 CONFIG.yaml [section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift

: "${NNODES:?set NNODES (number of nodes)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-${MASTER_ADDR:?set MASTER_ADDR or RDZV_ENDPOINT}:${MASTER_PORT:-29500}}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

echo "node ${NODE_RANK:-?}/${NNODES}: ${GPUS_PER_NODE} GPUs, rendezvous ${RDZV_ENDPOINT}" >&2
exec torchrun --nnodes "${NNODES}" --nproc-per-node "${GPUS_PER_NODE}" \
  --rdzv-backend c10d --rdzv-endpoint "${RDZV_ENDPOINT}" --rdzv-id "${RDZV_ID:-papo}" \
  -m megatron_papo.train --config "${CONFIG}" "$@"
