"""runtime_checks: clear errors for TE / FP8 / vLLM asked for where they are missing (every branch
that CPU CI can reach), and the FP8 recipe-vs-GPU rules as a pure function."""

import pytest

from megatron_papo.compat import mcore_compat, runtime_checks
from megatron_papo.compat.mcore_compat import MissingDependencyError
from megatron_papo.compat.runtime_checks import check_runtime, fp8_support_problem
from megatron_papo.config import load_config

NO_TE = not mcore_compat.have_transformer_engine()
NO_VLLM = not mcore_compat.have_vllm()


def _cfg(*overrides):
    return load_config("examples/tiny_papo_g.yaml", list(overrides))


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])


def test_default_config_passes():
    check_runtime(_cfg())


def test_context_parallel_needs_no_transformer_engine():
    check_runtime(_cfg("parallel.cp=2"))  # models.cp_attention is megatron-core's attention


@pytest.mark.skipif(not NO_TE, reason="Transformer Engine is installed")
@pytest.mark.parametrize("override,field", [
    ("model.fp8=delayed", "model.fp8='delayed'"),
    ("model.transformer_impl=transformer_engine", "model.transformer_impl"),
])
def test_missing_transformer_engine_names_the_field(override, field):
    with pytest.raises(MissingDependencyError, match="transformer_engine is not available") as err:
        check_runtime(_cfg(override))
    assert field in str(err.value) and "pip install megatron_papo[gpu]" in str(err.value)


@pytest.mark.skipif(not NO_TE, reason="Transformer Engine is installed")
def test_sequence_parallel_without_te(monkeypatch):
    # on CPU the torch norms take sequence-parallel input (mcore_compat patch) ...
    monkeypatch.setattr(runtime_checks, "cuda_capability", lambda: None)
    check_runtime(_cfg("parallel.tp=2", "parallel.sequence_parallel=true"))
    # ... on a GPU it needs Transformer Engine's norms
    monkeypatch.setattr(runtime_checks, "cuda_capability", lambda: (9, 0))
    with pytest.raises(MissingDependencyError, match="sequence_parallel"):
        check_runtime(_cfg("parallel.tp=2", "parallel.sequence_parallel=true"))


def test_fp8_with_local_specs_is_refused():
    with pytest.raises(ValueError, match="transformer_impl is 'local'"):
        check_runtime(_cfg("model.fp8=current", "model.transformer_impl=local"))


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed")
def test_vllm_engine_without_vllm():
    with pytest.raises(MissingDependencyError, match=r"rollout.engine=vllm.*Megatron rollout engine"):
        check_runtime(_cfg("rollout.engine=vllm"))


def test_train_cli_stops_with_the_message(capsys):
    if not NO_TE:
        pytest.skip("Transformer Engine is installed")
    from megatron_papo.train import main

    assert main(["--config", "examples/tiny_papo_g.yaml", "model.fp8=delayed"]) == 2
    assert "model.fp8='delayed'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe,cap,te,expect", [
    ("delayed", (9, 0), "2.1", None),
    ("delayed", (8, 9), "1.13", None),
    ("delayed", (8, 0), "2.1", "compute capability >= 8.9; this GPU is 8.0"),
    ("current", (9, 0), "2.1", "Transformer Engine >= 2.2"),
    ("current", (8, 9), "2.4", None),
    ("blockwise", (8, 9), "2.4", "compute capability >= 9.0"),
    ("blockwise", (9, 0), "2.2", "Transformer Engine >= 2.3"),
    ("blockwise", (9, 0), "2.3.0+cu12", None),
    ("mxfp8", (9, 0), "2.4", "compute capability >= 10.0"),
    ("mxfp8", (10, 0), "2.0", None),
    ("delayed", None, "2.4", "needs a CUDA GPU"),
    ("delayed", (9, 0), None, "needs Transformer Engine"),
    ("fp4", (10, 0), "2.4", "expected one of none"),
])
def test_fp8_support_rules(recipe, cap, te, expect):
    problem = fp8_support_problem(recipe, cap, te)
    if expect is None:
        assert problem is None
    else:
        assert problem is not None and expect in problem
