#!/usr/bin/env bash
# One prepared GPU acceptance run of megatron_papo: a single call, at most 9 minutes on one H200,
# that prints one table (and writes it to $OUT/acceptance.md for docs/BENCHMARKS.md).
#
#   1. On a CPU machine with access to the package index (the lent GPU machine has no network),
#      download the cp312 wheels the GPU machine lacks into the git-ignored .gpu_wheels/ (under
#      64 MiB: megatron-core, a transformers new enough for setup.py, and the small pure-Python
#      dependencies; torch, triton and CUDA are already there):
#          tools/gpu_acceptance.sh --prepare-wheels            # -> .gpu_wheels/, prints the size
#   2. On the GPU machine (the wheels travel with the working tree: `carry: [".gpu_wheels"]`):
#          tools/gpu_acceptance.sh                             # install offline, run, print the table
#   3. Anywhere, CI included (CPU, no GPU, no wheels): the same stages at toy sizes in fp32, so the
#      script's own logic (stages, parsing, the table, exit codes) is tested:
#          tools/gpu_acceptance.sh --dry-run
#
# Stages (each under its own time limit; a failing stage is a FAIL row, the others still run):
#   a  3 RL steps of the tiny VLM and of the tiny Qwen2.5-VL, bf16, local specs, PAPO-G with the
#      masked branch, a checkpoint, then --resume for one more step (metrics must be finite, no
#      skipped update, steps 1-4 present once each)
#   b  the Triton kernel tests compiled (pytest -m gpu tests/unit/test_ops_triton.py) and the op
#      benchmark grid T in {4096, 16384} x V_local in {38016, 76032, 152064} with floor ratios, and
#      the fused linear op against the logits op from hidden states (T 4096, H 2048, V 152064)
#   c  benchmarks/bench_step.py: GRPO vs PAPO-G vs PAPO-D update step, tokens/s and MFU
#   d  the memory planner's estimate against torch.cuda.max_memory_allocated() of the stage-a runs
#
# Options: --out DIR (default gpu_acceptance_out/), --wheels DIR (default .gpu_wheels/),
#          --peak-tflops N (dense bf16 peak for MFU; default 989, H100/H200 SXM).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=run
OUT=gpu_acceptance_out
WHEELS=.gpu_wheels
PEAK_TFLOPS=989
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) MODE=dry ;;
    --prepare-wheels) MODE=prepare ;;
    --out) OUT="$2"; shift ;;
    --wheels) WHEELS="$2"; shift ;;
    --peak-tflops) PEAK_TFLOPS="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python}

# Wheels the lent GPU machine (Python 3.12, torch 2.11 + CUDA 13, triton 3.6, transformers 5.17)
# lacks, pinned to what setup.py asks for; --no-deps each: everything else is already there.
# (The versions CI installs on the CPU machine, so the GPU run uses the tested set.)
WHEEL_SPECS=(
  "megatron-core==0.16.1"
  "transformers==5.24.0"
  "huggingface-hub==2.4.0"
  "tokenizers==0.23.3"
  "safetensors==0.8.0"
  "math-verify==0.9.0"
  "latex2sympy2_extended==1.11.0"
  "antlr4-python3-runtime==4.13.2"
  "easy-vqa==1.0"
  "psutil==7.2.2"
)

prepare_wheels() {
  mkdir -p "$WHEELS"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$WHEELS" "${WHEEL_SPECS[@]}"
  du -sh "$WHEELS"
  ls "$WHEELS"
}

if [[ $MODE == prepare ]]; then
  prepare_wheels
  exit 0
fi

mkdir -p "$OUT"
ROWS="$OUT/rows.tsv"
: > "$ROWS"
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$ROWS"; }  # stage, item, value, PASS/FAIL

if [[ $MODE == run ]]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA device visible; use --dry-run on a CPU machine" >&2
    exit 2
  fi
  if [[ -d $WHEELS ]] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps "$WHEELS"/*.whl
  fi
  "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e . \
    || echo "note: editable install failed; running from the checkout (PYTHONPATH)" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  PRECISION=bf16; STEPS=3; LIMIT_A=150; LIMIT_B=200; LIMIT_C=120
else
  PRECISION=fp32; STEPS=1; LIMIT_A=240; LIMIT_B=120; LIMIT_C=240
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" | tee "$OUT/device.txt"

# ---------------------------------------------------------------- a: RL steps, checkpoint, resume
run_a() {  # name config extra-overrides...
  local name=$1 config=$2; shift 2
  local dir="$OUT/a_$name"
  rm -rf "$dir"
  local common=(model.precision="$PRECISION" model.transformer_impl=local train.sft_warmup_steps=0
                evaluation.interval=-1 logging.dir="$dir" logging.tensorboard=false logging.progress_bar=false
                checkpoint.dir="$dir/ckpt" checkpoint.save_interval=1000 rollout.prompts_per_step=4
                train.update_prompts=4 train.micro_batch_size=8 loss.kl_prcp_mode=full
                loss.entropy_mode=full "$@")
  local ok=PASS
  timeout "$LIMIT_A" "$PY" -m megatron_papo.train --config "$config" "${common[@]}" train.steps="$STEPS" \
    > "$dir.log" 2>&1 || ok=FAIL
  timeout "$LIMIT_A" "$PY" -m megatron_papo.train --config "$config" "${common[@]}" \
    train.steps=$((STEPS + 1)) --resume >> "$dir.log" 2>&1 || ok=FAIL
  "$PY" - "$dir/metrics.jsonl" "$STEPS" "$ok" "$name" >> "$ROWS" <<'EOF'
import json, math, sys
path, steps, ok, name = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    rows = [json.loads(line) for line in open(path)]
except OSError:
    rows = []
seen = [r["step"] for r in rows if "loss" in r]
finite = all(r.get("loss") is not None and math.isfinite(r["loss"]) for r in rows if "loss" in r)
skipped = sum(r.get("update_skipped", 0) or 0 for r in rows)
good = ok == "PASS" and seen == list(range(1, steps + 2)) and finite and skipped == 0
last = rows[-1] if rows else {}
peak = max((r.get("peak_memory_gb") or 0.0 for r in rows), default=0.0)
print(f"a\t{name}: steps {seen}, loss {last.get('loss', float('nan')):.4f}, kl_prcp "
      f"{last.get('kl_prcp', float('nan')):.4g}, {last.get('step_time', float('nan')):.2f} s/step, "
      f"peak {peak:.3f} GiB\t{peak:.4f}\t{'PASS' if good else 'FAIL'}")
EOF
}
run_a tiny_vlm examples/tiny_papo_g.yaml data.limit=400
QWEN_HF="$OUT/tiny_qwen_hf"
if "$PY" -m megatron_papo.testing.tiny_qwen --out "$QWEN_HF" --bpe-tokenizer > "$OUT/tiny_qwen_hf.log" 2>&1; then
  run_a tiny_qwen examples/tiny_qwen2_5_vl_papo_g.yaml model.hf_path="$QWEN_HF" \
    checkpoint.init_weights="$QWEN_HF" data.limit=64
else
  row a "tiny_qwen: making the HF folder failed (see $OUT/tiny_qwen_hf.log)" - FAIL
fi

# ---------------------------------------------------------------- b: Triton kernels + op grid
if [[ $MODE == run ]]; then
  if timeout "$LIMIT_B" "$PY" -m pytest -q -m gpu tests/unit/test_ops_triton.py -p no:cacheprovider \
      > "$OUT/b_triton_tests.log" 2>&1; then ok=PASS; else ok=FAIL; fi
  row b "triton tests: $(grep -Eo '[0-9]+ (passed|failed|skipped)' "$OUT/b_triton_tests.log" | paste -sd, -)" - "$ok"
  OP_ARGS=(--device cuda --dtype bfloat16 --T "4096,16384" --V-local "38016,76032,152064")
else
  OP_ARGS=(--device cpu --dtype float32 --T 256 --V-local 1024 --variants torch --repeats 1)
fi
if timeout "$LIMIT_B" "$PY" benchmarks/bench_papo_op.py "${OP_ARGS[@]}" > "$OUT/b_op_grid.txt" 2>&1; then
  ok=PASS; else ok=FAIL; fi
# floor/measured is the last column of every data line of the op table; report its range per variant
for variant in naive torch triton; do
  ratios=$(awk -F'|' -v v="$variant" '$2 ~ "^ *"v" *$" {r = $(NF-1); gsub(/ /, "", r); print r}' "$OUT/b_op_grid.txt" \
           | sort -g | paste -sd' ' -)
  [[ -n $ratios ]] && row b "op grid, $variant: floor/measured over the grid: ${ratios// /, }" - "$ok"
done
grep -q '^| *torch ' "$OUT/b_op_grid.txt" || row b "op grid: no table (see $OUT/b_op_grid.txt)" - FAIL
# the fused linear op (loss.fused_linear) against the logits op, both from hidden states + weight
if [[ $MODE == run ]]; then
  LIN_ARGS=(--device cuda --dtype bfloat16 --T 4096 --V-local 152064 --H 2048 --variants "torch,linear")
else
  LIN_ARGS=(--device cpu --dtype float32 --T 256 --V-local 1024 --H 64 --variants "torch,linear" --repeats 1)
fi
if timeout "$LIMIT_B" "$PY" benchmarks/bench_papo_op.py "${LIN_ARGS[@]}" > "$OUT/b_linear.txt" 2>&1; then
  ok=PASS; else ok=FAIL; fi
for variant in torch linear; do  # columns: fwd+bwd ms = $9, working MB = $11
  got=$(awk -F'|' -v v="$variant" '$2 ~ "^ *"v" *$" {gsub(/ /, "", $9); gsub(/ /, "", $11); print $9 " ms, working " $11 " MB"}' \
        "$OUT/b_linear.txt")
  if [[ -n $got ]]; then
    row b "from hidden states, $variant: fwd+bwd $got" - "$ok"
  else
    row b "from hidden states, $variant: no row (see $OUT/b_linear.txt)" - FAIL
  fi
done

# ---------------------------------------------------------------- c: update step, MFU
if [[ $MODE == run ]]; then
  STEP_ARGS=(--device cuda --precision bf16 --peak-tflops "$PEAK_TFLOPS")
else
  STEP_ARGS=(--device cpu --tiny --steps 1 --warmup 0 --batch 2 --seq 64 --prompt 32 --image-tokens 8)
fi
if timeout "$LIMIT_C" "$PY" benchmarks/bench_step.py "${STEP_ARGS[@]}" --algorithms grpo,papo_g,papo_d \
    > "$OUT/c_step.txt" 2>&1; then ok=PASS; else ok=FAIL; fi
for algo in grpo papo_g papo_d; do  # columns: algorithm, step s, tokens/s, vs GRPO, TFLOP/step, MFU
  line=$(awk -F'|' -v a="$algo" '$2 ~ "^ *"a" *$" {printf "step %s s, %s tokens/s, %s x GRPO, MFU %s", \
         $3, $4, $5, $7}' "$OUT/c_step.txt" | tr -s ' ')
  if [[ -n $line ]]; then row c "$algo: $line" - "$ok"; else row c "$algo: missing" - FAIL; fi
done

# ---------------------------------------------------------------- d: planner vs measured peak
plan_row() {  # name config measured_gib extra-overrides...
  local name=$1 config=$2 measured=$3; shift 3
  local planned
  planned=$("$PY" tools/plan_memory.py --config "$config" --precision "$PRECISION" --impl local \
            --micro-batch 8 --override "$@" 2>/dev/null | awk '/^total \(update\)/ {print $3}')
  "$PY" - "$name" "${planned:-nan}" "$measured" "$MODE" >> "$ROWS" <<'EOF'
import math, sys
name, planned, measured, mode = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
if mode == "dry":  # no CUDA allocator on CPU: the planner side is what runs here
    good = math.isfinite(planned)
    print(f"d\t{name}: planned {planned:.3f} GiB (measured: needs CUDA)\t{planned:.4f}\t{'PASS' if good else 'FAIL'}")
else:
    ratio = planned / measured if measured > 0 else float("nan")
    print(f"d\t{name}: planned {planned:.3f} GiB vs max_memory_allocated {measured:.3f} GiB "
          f"(planned/measured {ratio:.2f})\t{ratio:.3f}\t{'PASS' if math.isfinite(ratio) else 'FAIL'}")
EOF
}
peak_of() { awk -F'\t' -v n="$1" '$1 == "a" && index($2, n ":") == 1 {print $3}' "$ROWS" | head -1; }
plan_row tiny_vlm examples/tiny_papo_g.yaml "$(peak_of tiny_vlm)"
plan_row tiny_qwen examples/tiny_qwen2_5_vl_papo_g.yaml "$(peak_of tiny_qwen)" model.hf_path="$QWEN_HF"

# ---------------------------------------------------------------- the table
{
  echo "| stage | result | value | verdict |"
  echo "|---|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$ROWS"
  echo
  echo "Op grid (benchmarks/bench_papo_op.py ${OP_ARGS[*]}):"
  echo
  grep -E '^(#|\|)' "$OUT/b_op_grid.txt" || true
  echo
  echo "Update step (benchmarks/bench_step.py ${STEP_ARGS[*]}):"
  echo
  grep -E '^(#|\|)' "$OUT/c_step.txt" || true
} > "$OUT/acceptance.md"
echo
echo "== GPU acceptance ($MODE): $(cat "$OUT/device.txt")"
cat "$OUT/acceptance.md"
if grep -q $'\tFAIL$' "$ROWS"; then
  exit 1
fi
