#!/usr/bin/env bash
# One node, all its GPUs: torchrun starts one process per GPU.
#   examples/launch/torchrun_single_node.sh examples/qwen2_5_vl_7b_papo_g.yaml [section.key=value ...]
# Env: GPUS_PER_NODE (default: every visible GPU), MASTER_PORT (default 29500).
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [section.key=value ...]" >&2
  exit 2
fi
CONFIG=$1
shift

GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi --list-gpus 2>/dev/null | wc -l)}
if [[ ${GPUS_PER_NODE} -lt 1 ]]; then
  echo "no GPU visible: set GPUS_PER_NODE (or run on CPU with torchrun --nproc-per-node N)" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron TP comm/compute overlap

exec torchrun --standalone --nnodes 1 --nproc-per-node "${GPUS_PER_NODE}" \
  --master-port "${MASTER_PORT:-29500}" \
  -m megatron_papo.train --config "${CONFIG}" "$@"
