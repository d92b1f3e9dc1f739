"""The package's import map (megatron_papo.testing.imports, tools/import_graph.py) and the entry
points' --help: no import circle, every function-level import says why, --help answers."""

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_papo.testing.imports import collapse, cycles, floors, import_graph

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_papo"


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_reader_finds_circles_at_any_depth_and_floors(tmp_path):
    # a -> b (top level), b -> c (inside a function), c -> a (relative): one circle of three
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.sub.c import x\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from .. import a\nx = 1\n",
        "pkg/d.py": "import pkg.a\n",
    })
    graph = import_graph(pkg)
    assert graph.edges["pkg.b"] == {"pkg.sub.c"} and graph.edges["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph.edges) == [["pkg.a", "pkg.b", "pkg.sub.c"]]
    assert [(z.module, z.target, z.reason) for z in graph.lazy] == [("pkg.b", "pkg.sub.c", "")]
    with pytest.raises(ValueError, match="circles"):
        floors(graph.edges)
    # break the circle: floors are defined and count up from the module that imports nothing
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    graph = import_graph(pkg)
    assert cycles(graph.edges) == []
    assert floors(graph.edges) == {"pkg.a": 2, "pkg.b": 1, "pkg.d": 3, "pkg.sub.c": 0}
    assert collapse(graph.edges, "pkg") == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub"}, "pkg.d": {"pkg.a"}}


def test_megatron_papo_has_no_import_circle():
    graph = import_graph(PACKAGE)
    assert len(graph.modules) > 50 and graph.num_arrows > 100  # it read the real package
    assert cycles(graph.edges) == []
    assert cycles(collapse(graph.edges, "megatron_papo")) == []  # nor between sub-packages


def test_every_function_level_import_of_the_package_says_why():
    unexplained = [f"{z.module}:{z.line} -> {z.target}" for z in import_graph(PACKAGE).lazy if not z.reason]
    assert unexplained == []


def test_the_maths_never_imports_the_loop():
    edges = collapse(import_graph(PACKAGE).edges, "megatron_papo")
    low = ("megatron_papo.ops", "megatron_papo.losses", "megatron_papo.algorithms", "megatron_papo.rewards",
           "megatron_papo.masking", "megatron_papo.compat", "megatron_papo.planner")
    high = {"megatron_papo.training", "megatron_papo.train", "megatron_papo.evaluate",
            "megatron_papo.convert", "megatron_papo.models", "megatron_papo.rollout", "megatron_papo.data"}
    for module in low:
        assert not (edges.get(module, set()) & high), (module, edges[module] & high)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_train_help_lists_the_config_tree_with_docs():
    out = _run("-m", "megatron_papo.train", "--help")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("usage: python -m megatron_papo.train --config PATH")
    for flag in ("--resume", "--save-init DIR", "--config PATH"):
        assert any(line.strip().startswith(flag) for line in lines), flag
    i = next(k for k, line in enumerate(lines) if line.strip().startswith("loss.gamma "))
    assert "(float, default 0.02)" in lines[i]
    assert lines[i + 1].strip().startswith("Weight of the Implicit Perception Loss KL_prcp")
    assert "Apex" not in out.stderr  # --help does not import megatron-core


def test_a_wrong_flag_exits_2_with_the_usage():
    out = _run("-m", "megatron_papo.train", "--resum")
    assert out.returncode == 2
    assert "unknown flag --resum" in out.stderr and "usage: python -m megatron_papo.train" in out.stderr


def test_evaluate_help():
    out = _run("-m", "megatron_papo.evaluate", "--help")
    assert out.returncode == 0, out.stderr
    assert "--checkpoint DIR" in out.stdout and "evaluation.k " in out.stdout


@pytest.mark.parametrize("tool", sorted(p.name for p in (ROOT / "tools").glob("*.py")))
def test_every_tool_answers_help(tool):
    out = _run(f"tools/{tool}", "--help")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) >= 2, out.stdout
