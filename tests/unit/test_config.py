"""Config tree: YAML + dotted overrides, presets, strict validation with specific messages."""

import re
from pathlib import Path

import pytest

from megatron_papo.config import (
    ConfigError,
    PapoConfig,
    config_from_dict,
    load_config,
    parse_override,
    save_config,
    validate,
)

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def test_defaults_build_and_validate():
    cfg = load_config()
    assert isinstance(cfg, PapoConfig)
    assert cfg.algorithm.name == "papo_g" and cfg.loss.gamma == pytest.approx(0.02)


@pytest.mark.parametrize(
    "name,gamma,beta,high,filt",
    [
        ("grpo", 0.0, 0.01, 0.3, False),
        ("dapo", 0.0, 0.0, 0.28, True),
        ("papo_g", 0.02, 0.01, 0.3, False),
        ("papo_d", 0.01, 0.0, 0.28, True),
    ],
)
def test_algorithm_presets(name, gamma, beta, high, filt):
    cfg = load_config(overrides=[f"algorithm.name={name}"])
    assert (cfg.loss.gamma, cfg.loss.ref_kl_coef, cfg.loss.clip_ratio_high) == (gamma, beta, high)
    assert cfg.algorithm.group_filter is filt


def test_explicit_values_beat_the_preset(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algorithm:\n  name: papo_d\nloss:\n  gamma: 0.005\n")
    cfg = load_config(p, ["loss.entropy_coef_orig=0.0", "parallel.tp=2", "rollout.stop=['</answer>']"])
    assert cfg.loss.gamma == 0.005 and cfg.loss.entropy_coef_orig == 0.0
    assert cfg.loss.entropy_coef_mask == 0.03  # still from the preset
    assert cfg.parallel.tp == 2 and cfg.rollout.stop == ["</answer>"]


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(overrides=["loss.clip_ratio_dual=null", "train.lr=3e-6"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    assert cfg.loss.clip_ratio_dual is None and cfg.train.lr == 3e-6


@pytest.mark.parametrize(
    "override,match",
    [
        ("parallel.tpp=2", r"unknown key 'parallel.tpp'; did you mean 'tp'\?"),
        ("paralel.tp=2", r"unknown key 'paralel'; did you mean 'parallel'\?"),
        ("parallel.tp=two", r"parallel.tp: expected an integer, got 'two'"),
        ("parallel.tp=1.5", r"parallel.tp: expected an integer"),
        ("logging.tensorboard=1", r"logging.tensorboard: expected true or false"),
        ("loss.loss_agg=sum", r"loss.loss_agg: expected one of 'token-mean'"),
        ("loss.gamma=-1", r"PapoLossConfig.gamma"),
        ("masking.ratio=1.5", r"masking.*ratio"),
        ("algorithm.name=ppo", r"algorithm.name: expected one of"),
        ("rollout.top_p=0", r"rollout.top_p"),
        ("parallel.tp=3", r"parallel.tp=3 must divide model.num_attention_heads"),
        ("parallel.pp=3", r"parallel.pp=3 does not divide the model's 2 layers"),
        ("train.micro_batch_size=7", r"train.micro_batch_size=7 must divide"),
        ("checkpoint.resume=true", r"checkpoint.resume: needs checkpoint.dir"),
        ("gamma", r"expected key=value"),
        ("model.patch_size=24", r"model.patch_size=24 must divide model.image_size=64"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    base = ["model.num_attention_heads=4", "model.num_layers=2"]
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[*base, override])


def test_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.lr: expected a number, got 'fast'"):
        load_config(p)
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_world_size_divisibility():
    cfg = config_from_dict({"parallel": {"tp": 2, "pp": 2}})
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by tp\*pp\*cp = 2\*2\*1 = 4"):
        validate(cfg, world_size=6)


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("--a.b=x=y") == ("a.b", "x=y")


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_yaml_loads(path):
    validate(load_config(path))


def test_examples_exist():
    assert EXAMPLES, "examples/*.yaml should exist"


def test_every_numeric_field_has_a_bound():
    """A new int / float field must say what it accepts (config.NUMERIC_BOUNDS)."""
    from megatron_papo.config import NUMERIC_BOUNDS, numeric_fields

    fields = numeric_fields()
    assert len(fields) > 60
    assert sorted(set(fields) - set(NUMERIC_BOUNDS)) == []
    assert sorted(set(NUMERIC_BOUNDS) - set(fields)) == []


def _bad_values(bound, is_int):
    """Values just outside ``bound`` (and the non-finite ones for float fields)."""
    out = []
    if bound.lo is not None:
        below = bound.lo if bound.lo_open else bound.lo - (1 if is_int else 1e-3)
        if below not in bound.also:
            out.append(int(below) if is_int else below)
    if bound.hi is not None:
        above = bound.hi if bound.hi_open else bound.hi + (1 if is_int else 1e-3)
        out.append(int(above) if is_int else above)
    if not is_int:
        out += [".nan", ".inf", "-.inf"]
    return out


def _numeric_cases():
    import typing

    from megatron_papo.config import NUMERIC_BOUNDS, PapoConfig

    cases = []
    for path, bound in NUMERIC_BOUNDS.items():
        section, name = path.split(".")
        cls = typing.get_type_hints(PapoConfig)[section]
        tp = typing.get_type_hints(cls)[name]
        is_int = int in (typing.get_args(tp) or (tp,))
        cases += [(path, v) for v in _bad_values(bound, is_int)]
    return cases


@pytest.mark.parametrize("path,value", _numeric_cases())
def test_out_of_range_numbers_are_refused_naming_the_field(path, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{path}={value}"])
    assert path.split(".")[1] in str(err.value), str(err.value)


@pytest.mark.parametrize("override,match", [
    ("train.sft_lr=-1e-4", "train.sft_lr: expected a finite value in (0.0, 1.0]"),
    ("train.lr=1e6", "train.lr"), ("loss.gamma=.nan", "loss.gamma"),
    ("model.hidden_size=0", "model.hidden_size"), ("model.num_layers=0", "model.num_layers"),
    ("logging.log_interval=0", "logging.log_interval"), ("rollout.top_k=0", "rollout.top_k"),
    ("model.vocab_size=1", "model.vocab_size"), ("train.adam_beta2=1.0", "train.adam_beta2"),
    ("train.sft_lr_decay=linear", "train.sft_lr_decay"),
    ("train.sft_min_lr_ratio=2", "train.sft_min_lr_ratio"),
    ("train.sft_lr_warmup_steps=500", "train.sft_lr_warmup_steps=500 exceeds the warm start"),
])
def test_values_a_user_met_are_refused(override, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        load_config(str(Path(__file__).parents[2] / "examples/tiny_papo_g.yaml"), [override])


@pytest.mark.parametrize("name", ["grpo", "dapo", "papo_g", "papo_d"])
def test_one_response_per_prompt_is_refused_for_every_algorithm(name):
    with pytest.raises(ConfigError, match=f"algorithm {name} normalises advantages"):
        load_config(None, [f"algorithm.name={name}", "rollout.n=1"])


def test_tiny_vision_fields_are_refused_for_other_models():
    with pytest.raises(ConfigError, match=r"model\.vision_hidden_size: only model\.name=tiny_vlm reads it"):
        load_config(overrides=["model.name=qwen2_5_vl", "model.hf_path=/x", "model.vision_hidden_size=128"])
    cfg = load_config(overrides=["model.patch_size=8", "model.vision_hidden_size=96",
                                 "model.vision_num_layers=3"])
    from megatron_papo.models.tiny_vlm import TinyVLMConfig

    tiny = TinyVLMConfig.from_model_config(cfg.model, vocab_size=100, image_token_id=5)
    assert (tiny.patch_size, tiny.vision_hidden_size, tiny.vision_num_layers) == (8, 96, 3)
    assert tiny.image_tokens_per_image == 64
