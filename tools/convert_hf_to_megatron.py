"""Hugging Face Qwen2.5-VL folder -> megatron-core distributed checkpoint (loadable under any TP/PP).

    python tools/convert_hf_to_megatron.py --hf /models/Qwen2.5-VL-7B-Instruct --out ckpt/qwen7b
    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py --hf ... --out ... --tp 2 --pp 2

Each rank reads only its own TP/PP shards, tensor by tensor from memory-mapped safetensors, so a
72B model converts with one copy of each rank's part in memory. The output root holds the
checkpoint (``latest`` -> ``step_00000000``) and ``hf_config/`` (config, tokenizer, processor
files). Train from it with ``model.hf_path=<out>/hf_config checkpoint.init_weights=<out>``.
Exit codes: 0 converted, 2 bad input (message names the file / field).
"""

from __future__ import annotations

import argparse
import sys

import _launch

from megatron_papo.errors import exit_on_user_error  # floor 0: imports nothing


@exit_on_user_error  # any UserError not caught below: "error: <message>", exit 2 (errors.py)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="checkpoint root to write")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size used while converting")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size used while converting")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="parameter dtype of the checkpoint (auto: the HF config's dtype)")
    a = p.parse_args(argv)
    from megatron_papo.convert import convert_hf_to_megatron
    from megatron_papo.models.hf_qwen2_5_vl import HFCheckpointError
    from megatron_papo.models.qwen2_5_vl import UnsupportedArchitectureError

    try:
        pg = _launch.init(a.tp, a.pp)
        path = convert_hf_to_megatron(a.hf, a.out, pg, precision=a.precision)
    except (FileNotFoundError, HFCheckpointError, UnsupportedArchitectureError, ValueError) as e:
        return _launch.fail(str(e))
    if pg.rank == 0:
        print(f"wrote {path} (tp={a.tp}, pp={a.pp}; loadable under any layout) and {a.out}/hf_config")
    return 0


if __name__ == "__main__":
    sys.exit(main())
