"""How the language model's layers are split over pipeline stages (pure arithmetic, no torch).

Even split: ``num_layers / pp`` layers per stage (``pp`` must divide ``num_layers``). Uneven:
``parallel.first_stage_layers`` and/or ``parallel.last_stage_layers`` fix the first / last
stage's count and the remaining layers split evenly over the other stages, megatron-core's
``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``. Real layer
counts (28, 36, 64, 80) rule out many even pp sizes; e.g. 28 layers at pp = 3: 10 + 9 + 9 is
``first_stage_layers=10``. With interleaving (vpp) every stage's count must split into vpp
chunks.

    >>> stage_layers(28, 3, first=10)
    [10, 9, 9]
    >>> stage_layers(3, 2, first=1)
    [1, 2]
"""

from __future__ import annotations

__all__ = ["stage_layers", "transformer_config_fields"]


def stage_layers(num_layers: int, pp: int, *, first: int | None = None, last: int | None = None,
                 vpp: int | None = None) -> list[int]:
    """Layers on each of the ``pp`` stages (stage 0 first).

    Raises:
        ValueError: naming the ``parallel.*`` field when the split is impossible (a fixed stage
            count outside [0, num_layers], leftovers that the middle stages cannot share evenly,
            or a stage whose count vpp does not divide).
    """
    if num_layers < 1 or pp < 1:
        raise ValueError(f"need num_layers >= 1 and pp >= 1, got {num_layers} and {pp}")
    uneven = first is not None or last is not None
    if uneven and pp < 2:
        raise ValueError("parallel.first_stage_layers / last_stage_layers need parallel.pp >= 2, "
                         f"got pp={pp}")
    for name, value in (("first_stage_layers", first), ("last_stage_layers", last)):
        if value is not None and not 0 <= value <= num_layers:
            raise ValueError(f"parallel.{name}={value} must lie in [0, {num_layers}] "
                             f"(the model has {num_layers} layers)")
    if not uneven:
        if num_layers % pp:
            raise ValueError(f"parallel.pp={pp} does not divide the model's {num_layers} layers: set "
                             "parallel.first_stage_layers and/or last_stage_layers for an uneven split")
        counts = [num_layers // pp] * pp
    else:
        left = num_layers - (first or 0) - (last or 0)
        middle = pp - (first is not None) - (last is not None)
        if left < 0 or (middle == 0 and left != 0) or (middle > 0 and left % middle):
            raise ValueError(f"parallel.first_stage_layers={first}, last_stage_layers={last}: the "
                             f"other {middle} stage(s) cannot share the remaining {left} of "
                             f"{num_layers} layers evenly")
        even = left // middle if middle else 0
        counts = [even] * pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
    if vpp is not None and vpp > 1:
        bad = [c for c in counts if c % vpp]
        if bad:
            raise ValueError(f"parallel.vpp={vpp} must divide every stage's layer count, got {counts}")
    return counts


def transformer_config_fields(first: int | None, last: int | None) -> dict[str, int]:
    """The megatron-core TransformerConfig fields of an uneven split (empty for an even one)."""
    out = {}
    if first is not None:
        out["num_layers_in_first_pipeline_stage"] = first
    if last is not None:
        out["num_layers_in_last_pipeline_stage"] = last
    return out
