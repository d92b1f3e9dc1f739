"""megatron-core checkpoint (converted or trained, any TP/PP) -> Hugging Face Qwen2.5-VL folder.

    python tools/convert_megatron_to_hf.py --megatron runs/papo/checkpoints --out hf/papo-step100
    torchrun --nproc-per-node 2 tools/convert_megatron_to_hf.py --megatron ... --out ... --tp 2

The architecture comes from ``<megatron>/hf_config`` (written by convert_hf_to_megatron.py), the
``model.hf_path`` recorded in a training checkpoint, or ``--hf-config``. The exporter gathers one
parameter at a time across TP/PP; rank 0 writes safetensors shards (``--max-shard-gb``) as they
fill, plus the index and the config/tokenizer files, so transformers loads the folder directly.
Exit codes: 0 converted, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys

import _launch

from megatron_papo.errors import exit_on_user_error  # floor 0: imports nothing


@exit_on_user_error  # any UserError not caught below: "error: <message>", exit 2 (errors.py)
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron", required=True, help="checkpoint root (follows 'latest') or a step_* dir")
    p.add_argument("--out", required=True, help="Hugging Face folder to write")
    p.add_argument("--hf-config", default=None, help="folder with the model's config.json (default: found "
                   "next to the checkpoint)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="dtype to load and write (auto: the HF config's dtype)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file, GiB")
    a = p.parse_args(argv)
    from megatron_papo.convert import convert_megatron_to_hf
    from megatron_papo.models.hf_qwen2_5_vl import HFCheckpointError
    from megatron_papo.models.qwen2_5_vl import UnsupportedArchitectureError
    from megatron_papo.training.checkpointing import CheckpointError

    try:
        pg = _launch.init(a.tp, a.pp)
        info = convert_megatron_to_hf(a.megatron, a.out, pg, hf_config=a.hf_config, precision=a.precision,
                                      max_shard_bytes=int(a.max_shard_gb * (1 << 30)))
    except (FileNotFoundError, CheckpointError, HFCheckpointError, UnsupportedArchitectureError,
            ValueError) as e:
        return _launch.fail(str(e))
    if pg.rank == 0:
        print(f"wrote {info['tensors']} tensors ({info['bytes'] / 2**20:.1f} MiB) in "
              f"{len(info['shards'])} file(s) to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
