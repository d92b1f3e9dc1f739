#!/usr/bin/env bash
# Build the GPU image with the versions pinned in docker/versions.env.
#   docker/build.sh [IMAGE_TAG]        (default megatron_papo:latest-local)
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
while IFS='=' read -r key value; do
  [[ -z ${key} || ${key} == \#* ]] && continue
  args+=(--build-arg "${key}=${value}")
done < docker/versions.env
exec docker build "${args[@]}" -f Dockerfile -t "${1:-megatron_papo:local}" .
