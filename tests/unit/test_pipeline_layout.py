"""pipeline_layout.stage_layers: even and uneven splits of the language model's layers, and the
errors that name the parallel.* field; the planner counts each stage's own layers."""

import pytest

from megatron_papo.pipeline_layout import stage_layers, transformer_config_fields


@pytest.mark.parametrize("args,kw,want", [
    ((4, 2), {}, [2, 2]),
    ((28, 3), {"first": 10}, [10, 9, 9]),
    ((28, 3), {"last": 8}, [10, 10, 8]),
    ((80, 6), {"first": 12, "last": 12}, [12, 14, 14, 14, 14, 12]),
    ((3, 2), {"first": 1}, [1, 2]),
    ((36, 4), {"first": 6, "last": 6}, [6, 12, 12, 6]),
    ((8, 2), {"vpp": 2}, [4, 4]),
])
def test_splits(args, kw, want):
    assert stage_layers(*args, **kw) == want
    assert sum(want) == args[0]


@pytest.mark.parametrize("args,kw,match", [
    ((3, 2), {}, "parallel.pp=2 does not divide the model's 3 layers"),
    ((28, 3), {"first": 9}, "cannot share the remaining 19 of 28 layers"),
    ((4, 2), {"first": 1, "last": 1}, "cannot share the remaining 2 of 4 layers"),
    ((4, 2), {"first": 5}, r"parallel.first_stage_layers=5 must lie in \[0, 4\]"),
    ((4, 1), {"first": 1}, "need parallel.pp >= 2"),
    ((6, 2), {"first": 3, "vpp": 2}, "parallel.vpp=2 must divide every stage's layer count"),
])
def test_impossible_splits_name_the_field(args, kw, match):
    with pytest.raises(ValueError, match=match):
        stage_layers(*args, **kw)


def test_megatron_fields():
    assert transformer_config_fields(None, None) == {}
    assert transformer_config_fields(1, None) == {"num_layers_in_first_pipeline_stage": 1}
    assert transformer_config_fields(2, 3) == {"num_layers_in_first_pipeline_stage": 2,
                                               "num_layers_in_last_pipeline_stage": 3}


def test_planner_counts_each_stages_layers():
    from megatron_papo.planner import PRESETS
    from megatron_papo.planner.memory import RunShape, check_layout, language_layer_params, stage_params

    arch = PRESETS["qwen2_5_vl_7b"]  # 28 layers
    even = stage_params(arch, 1, 4, "first")
    fewer = stage_params(arch, 1, 4, "first", stage_layers=4)
    assert even.language - fewer.language == 3 * language_layer_params(arch.language, 1)  # 7 - 4 layers
    with pytest.raises(ValueError, match="do not divide"):
        check_layout(arch, RunShape(pp=3))
    check_layout(arch, RunShape(pp=3, first_stage_layers=10))
