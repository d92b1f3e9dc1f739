# GPU image: NGC PyTorch (CUDA, torch, Transformer Engine, NVIDIA apex) + vLLM + megatron_papo.
# Build with docker/build.sh (it passes the versions from docker/versions.env; no defaults here).
# At the repository root so that `docker build .` finds it; the build context is the repository.
ARG NGC_PYTORCH_TAG
FROM nvcr.io/nvidia/pytorch:${NGC_PYTORCH_TAG}

ARG VLLM_VERSION
ARG MEGATRON_CORE_VERSION

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# vLLM over the image's torch: no dependency resolution (it would replace NVIDIA's torch, and with it
# the Transformer Engine and apex builds), then vLLM's own requirements minus torch and its kin.
COPY docker/vllm_requirements.py /tmp/vllm_requirements.py
RUN pip install --no-deps "vllm==${VLLM_VERSION}" \
 && python /tmp/vllm_requirements.py > /tmp/vllm-reqs.txt \
 && pip install -r /tmp/vllm-reqs.txt \
 && python /tmp/vllm_requirements.py --check-torch \
 && python -c "import torch, vllm, vllm._C, transformer_engine.pytorch, apex.optimizers; print(torch.__version__, vllm.__version__)"

WORKDIR /workspace/megatron_papo
COPY setup.py README.md ./
COPY megatron_papo ./megatron_papo
# the project's other requirements come from setup.py (the image's torch satisfies torch>=2.4)
RUN pip install "megatron-core==${MEGATRON_CORE_VERSION}" -e .
COPY examples ./examples
COPY tools ./tools

CMD ["bash"]
