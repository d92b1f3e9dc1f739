"""Print vLLM's declared requirements without torch and its kin (installed --no-deps over the
NGC image's torch; see docker/Dockerfile)."""

import importlib.metadata as md

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "xformers", "triton"}

for text in md.requires("vllm") or []:
    req = Requirement(text)
    if req.name.lower() in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    print(f"{req.name}{req.specifier}")
