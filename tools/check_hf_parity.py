"""Logit parity of a Megatron checkpoint against its Hugging Face model on an image+text batch.

    python tools/check_hf_parity.py --hf /models/Qwen2.5-VL-7B-Instruct --megatron ckpt/qwen7b
    torchrun --nproc-per-node 2 tools/check_hf_parity.py --hf ... --megatron ... --tp 2
    torchrun --nproc-per-node 2 tools/check_hf_parity.py --hf ... --megatron ... --cp 2

The batch (two left-padded rows, three synthetic images of different sizes, one grayscale, a row
with two images) goes through transformers' Qwen2_5_VLForConditionalGeneration on rank 0 and
through the Megatron model under --tp/--pp/--cp (context parallel: zigzag-sharded sequences).
Prints the max absolute logit difference and the mean KL(hf || megatron) per token over the real
tokens; exit 1 when either is above its tolerance (defaults per precision: fp32 1e-3 / 1e-6, bf16
0.5 / 2e-2), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys

import _launch

from megatron_papo.errors import exit_on_user_error  # floor 0: imports nothing


@exit_on_user_error  # any UserError not caught below: "error: <message>", exit 2 (errors.py)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model folder")
    p.add_argument("--megatron", required=True, help="megatron checkpoint root or step_* dir")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="context-parallel size")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype both models run in")
    p.add_argument("--image-size", type=int, default=None, help="image side (multiple of 28)")
    p.add_argument("--max-abs-tol", type=float, default=None, help="largest allowed |logit difference|")
    p.add_argument("--kl-tol", type=float, default=None, help="largest allowed mean KL per token")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from megatron_papo.convert import run_parity_check
    from megatron_papo.models.hf_qwen2_5_vl import HFCheckpointError
    from megatron_papo.models.qwen2_5_vl import UnsupportedArchitectureError
    from megatron_papo.training.checkpointing import CheckpointError

    try:
        pg = _launch.init(a.tp, a.pp, a.cp)
        result = run_parity_check(a.hf, a.megatron, pg, precision=a.precision, image_size=a.image_size,
                                  seed=a.seed, max_abs_tol=a.max_abs_tol, kl_tol=a.kl_tol)
    except (FileNotFoundError, CheckpointError, HFCheckpointError, UnsupportedArchitectureError,
            ValueError) as e:
        return _launch.fail(str(e))
    if pg.rank == 0:
        print(f"tp={a.tp} pp={a.pp} cp={a.cp} precision={a.precision}: {result.line()}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
