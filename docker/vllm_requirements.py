"""Print vLLM's declared requirements without torch and its kin (installed --no-deps over the
NGC image's torch; see the Dockerfile). ``--check-torch``: exit 1 unless the image's torch is the
release vLLM's wheel was built for (vLLM pins ``torch==X``; NVIDIA's builds read ``X[a0]+nvYY.MM``)."""

import importlib.metadata as md
import sys

from packaging.requirements import Requirement
from packaging.version import Version

SKIP = {"torch", "torchvision", "torchaudio", "xformers", "triton"}


def check_torch() -> int:
    pins = [Requirement(t) for t in md.requires("vllm") or [] if Requirement(t).name.lower() == "torch"]
    have = Version(md.version("torch"))
    for pin in pins:
        wanted = [s.version for s in pin.specifier if s.operator == "=="]
        if wanted and Version(wanted[0]).release != have.release:
            print(f"vLLM {md.version('vllm')} is built for torch {wanted[0]}, the image has {have}: "
                  "pick an NGC tag with that torch, or build vLLM from source (docs/SCALING.md)")
            return 1
    return 0


if __name__ == "__main__" and "--check-torch" in sys.argv:
    sys.exit(check_torch())

for text in md.requires("vllm") or []:
    req = Requirement(text)
    if req.name.lower() in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    print(f"{req.name}{req.specifier}")
