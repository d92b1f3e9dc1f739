"""The config tree described from its field docstrings (the ``--help`` text)."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing

from megatron_papo.config.schema import (
    PapoConfig,
    type_name,
)

# ----------------------------------------------------------------------------- self-description


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring} of a config dataclass: the string literal written under each
    field (the convention of this tree), whitespace folded to one line; "" where none is."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): fields stay undocumented
        return {f.name: "" for f in dataclasses.fields(cls)}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    out: dict[str, str] = {}
    for node, nxt in zip(body, [*body[1:], None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            doc = ""
            if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                doc = " ".join(nxt.value.value.split())
            out[node.target.id] = doc
    return out


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def describe_config(cls: type | None = None) -> str:
    """The config tree as text: one block per section, one line per field with its type, default
    and docstring (what ``--help`` of train and evaluate prints)."""
    cls = cls or PapoConfig
    hints = typing.get_type_hints(cls)
    lines = ["config sections (YAML keys, or section.key=value on the command line):"]
    for section in dataclasses.fields(cls):
        sub = hints[section.name]
        lines.append(f"\n  {section.name}: {' '.join((sub.__doc__ or '').split())}")
        sub_hints, docs = typing.get_type_hints(sub), field_docs(sub)
        for f in dataclasses.fields(sub):
            lines.append(f"    {section.name}.{f.name}  ({type_name(sub_hints[f.name])}, "
                         f"default {_default_text(f)})")
            if docs.get(f.name):
                lines.append(f"        {docs[f.name]}")
    return "\n".join(lines)
