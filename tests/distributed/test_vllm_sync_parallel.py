"""The vLLM weight sync on 2 gloo ranks, in ONE spawned run: with TP=2, PP=2 and CP=2 every rank
of the model-parallel group hands its (fake) vLLM the same full Hugging Face tensors, bit-identical
to the source folder (vLLM's loaders then cut each rank's shard). With PP=2 only the first stage's
vLLM generates and every stage gets its responses; with CP=2 each rank's vLLM answers its slice of
the prompts, with the seeds those rows have in the whole request, and every rank gets all rows."""

import pytest
import torch

from megatron_papo.testing import run_distributed

pytestmark = pytest.mark.slow


class _RecordingBackend:
    def __init__(self):
        self.loaded, self.calls = {}, []

    def load_weights(self, weights):
        self.calls.append(len(weights))
        for name, t in weights:
            assert name not in self.loaded, f"{name} loaded twice"
            self.loaded[name] = t.clone()

    def wake_up(self, tags):
        self.calls.append(tuple(tags))

    def sleep(self, level):
        self.calls.append(level)

    def reset_prefix_cache(self):
        pass

    def generate(self, prompts, sampling):
        """Rank-dependent tokens: a stage that generated for itself would differ from stage 0."""
        from types import SimpleNamespace

        import torch.distributed as dist

        self.calls.append("generate")
        self.seeds = [kw["seed"] for kw in sampling]
        tok = 10 + dist.get_rank()
        return [SimpleNamespace(outputs=[SimpleNamespace(index=k, token_ids=[tok, 2], finish_reason="stop",
                                                         logprobs=[{tok: SimpleNamespace(logprob=-1.0)},
                                                                   {2: SimpleNamespace(logprob=-0.5)}])
                                         for k in range(kw["n"])]) for kw in sampling]


def _run(rank: int, world: int, hf_dir: str, work: str) -> dict:
    from pathlib import Path

    from megatron_papo.convert import build_for_conversion, convert_hf_to_megatron
    from megatron_papo.distributed import init_distributed
    from megatron_papo.rollout.vllm_engine import VLLMRolloutEngine
    from megatron_papo.training.checkpointing import load_checkpoint

    out = {}
    pg = init_distributed(tp=2, seed=0)
    convert_hf_to_megatron(hf_dir, Path(work) / "tp2", pg)
    for layout in ("tp2", "pp2", "cp2"):
        if layout != "tp2":
            pg = init_distributed(**{layout[:2]: 2}, seed=0)
        model = build_for_conversion(hf_dir, pg)
        load_checkpoint(Path(work) / "tp2", [model], None, pg, load_optimizer=False, load_rng=False)
        backend = _RecordingBackend()
        engine = VLLMRolloutEngine(backend, eos_id=2, pp_group=pg.pp if layout == "pp2" else None,
                                   cp_group=pg.cp if layout == "cp2" else None)
        engine.release()
        stats = engine.sync_weights([model], pg, bucket_bytes=256 * 1024)
        out[layout] = {"loaded": backend.loaded, "buckets": stats["buckets"], "calls": backend.calls[:2]}
        if layout != "tp2":
            from megatron_papo.rollout import RolloutRequest, SamplingParams

            engine.resume()
            prompts = [[1, 5, 6]] if layout == "pp2" else [[1, 5, 6], [1, 7], [1, 8]]
            request = RolloutRequest(prompts, images=[[]] * len(prompts))
            res = engine.generate(request, SamplingParams(n=2, seed=3))
            out[f"{layout}_responses"] = res.response_ids
            out[f"{layout}_indices"] = res.prompt_indices
            out[f"{layout}_generated_here"] = backend.calls.count("generate")
            out[f"{layout}_seeds"] = getattr(backend, "seeds", None)
    return out


def test_every_model_parallel_rank_receives_the_full_tensors(tmp_path):
    from safetensors.torch import load_file

    from megatron_papo.testing.tiny_qwen import make_tiny_qwen2_5_vl

    hf = make_tiny_qwen2_5_vl(tmp_path / "hf", seed=5)
    ref = load_file(str(hf / "model.safetensors"))
    results = run_distributed(_run, 2, args=(str(hf), str(tmp_path)), timeout=600)
    for rank, out in enumerate(results):
        for layout in ("tp2", "pp2", "cp2"):
            got = out[layout]["loaded"]
            assert sorted(got) == sorted(ref), f"rank {rank} {layout}: names differ"
            for name, t in ref.items():
                same = got[name].dtype == t.dtype and torch.equal(got[name].view(-1).view(torch.uint8),
                                                                  t.view(-1).view(torch.uint8))
                assert same, f"rank {rank} {layout}: {name} differs from the HF file"
            assert out[layout]["buckets"] > 3
            assert out[layout]["calls"][:2] == [2, ("weights",)]  # slept, then only the weights woke
        # PP=2: stage 0's (global rank 0's) responses everywhere; only stage 0 generated
        assert [list(r) for r in out["pp2_responses"]] == [[10, 2], [10, 2]]
        assert out["pp2_generated_here"] == (1 if rank == 0 else 0)
        # CP=2: prompts 0-1 answered by cp rank 0, prompt 2 by cp rank 1, all rows on both ranks
        assert [list(r) for r in out["cp2_responses"]] == [[10, 2]] * 4 + [[11, 2]] * 2
        assert out["cp2_indices"] == [0, 0, 1, 1, 2, 2] and out["cp2_generated_here"] == 1
        assert out["cp2_seeds"] == ([3, 5] if rank == 0 else [7])  # seed + prompt * n, as unsplit
