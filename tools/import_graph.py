"""The import map of megatron_papo, read from its source: modules, arrows, floors, circles, lazy imports.

    python tools/import_graph.py                 # the collapsed map (one node per sub-package)
    python tools/import_graph.py --files         # one node per file
    python tools/import_graph.py --check         # exit 1 on an import circle or an unexplained lazy import

Floor 0 imports nothing of the package; a module's floor is 1 + the highest floor it imports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from megatron_papo.testing.imports import collapse, cycles, floors, import_graph

WINGS = ("megatron_papo.training", "megatron_papo.compat", "megatron_papo.planner")
"""Sub-packages shown file by file in the collapsed map (their rooms are the point of the map)."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", action="store_true", help="one node per file instead of per sub-package")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on an import circle or a function-level import without a reason comment")
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "megatron_papo"),
                   help="the package folder (default: this checkout's megatron_papo/)")
    args = p.parse_args(argv)
    graph = import_graph(Path(args.root))
    edges = graph.edges if args.files else collapse(graph.edges, "megatron_papo", keep=WINGS)
    for module in graph.modules:
        edges.setdefault(module if args.files else next(iter(collapse({module: ()}, "megatron_papo", WINGS))),
                         set())
    found = cycles(edges)
    arrows = sum(len(v) for v in edges.values())
    if found:
        print(f"{len(edges)} nodes, {arrows} arrows, {len(found)} import circles:")
        for c in found:
            print("  circle: " + " <-> ".join(c))
    else:
        levels = floors(edges)
        top = max(levels.values())
        print(f"{len(edges)} nodes on {top + 1} floors, {arrows} arrows, no import circle")
        for f in range(top, -1, -1):
            print(f"  floor {f:2d}: " + ", ".join(m.removeprefix("megatron_papo.") or "megatron_papo"
                                                  for m, lv in levels.items() if lv == f))
    unexplained = [z for z in graph.lazy if not z.reason]
    print(f"{len(graph.lazy)} function-level imports of the package, {len(unexplained)} without a reason")
    for z in unexplained:
        print(f"  {z.module}:{z.line} -> {z.target}")
    return 1 if args.check and (found or unexplained) else 0


if __name__ == "__main__":
    sys.exit(main())
