#!/usr/bin/env bash
# Every GPU check in one go, for one short slot on a GPU machine.
#
#   scripts/gpu_check.sh OUTDIR            # tests, then benchmarks (default mode, about 8 minutes)
#   scripts/gpu_check.sh OUTDIR --sweep    # tests, then the settings sweep for vanilla and modern
#
# - installs missing Python packages from ./.whl (wheels carried to the machine) when present: the
#   machine lacks grain, ml_collections (core), safetensors and gguf (export tests), lm-eval (harness);
# - runs the GPU-only tests (tests/gpu: cuDNN against XLA attention, a bf16 training step per
#   architecture) and the contract suite on the GPU backend;
# - benchmarks (python -m llmjax.bench): full figures for vanilla and modern (train at batch 16 and
#   32, memory, decode at batch 1 and 64), short ones for the rest; with --sweep, training tokens/s
#   over scanned/unrolled layers x remat x batch x attention kernel, as one table;
# - HellaSwag items/s of the built-in scorer for vanilla and modern when LLMJAX_TASK_DIR holds
#   hellaswag_val.jsonl (carry it: the machine is offline);
# - the PyTorch anchors (../shared/anchors/gpu_anchors.sh) when NANOGPT_SRC is set;
# - writes logs, JUnit XML, JSON rows and the tables into OUTDIR.
# GPU_CHECK_VARIANT=tiny runs the same steps on tiny configs (to check this script on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/gpu_check.sh OUTDIR [--sweep]}"
mode="${2:-default}"
mkdir -p "$out"
py="${PYTHON:-python3}"
variant="${GPU_CHECK_VARIANT:-default}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export LLMJAX_COMPILATION_CACHE="${LLMJAX_COMPILATION_CACHE:-/tmp/llmjax-jax-cache}"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$out/env.txt"
status=0
step() { echo "== $(date -u +%T) $*" | tee -a "$out/steps.log"; }

if [ "$variant" = default ]; then
  step "GPU tests"
  "$py" -m pytest -p no:cacheprovider -q tests/gpu --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" | tail -15 || status=1
  step "contract suite on the GPU backend"
  JAX_DEFAULT_MATMUL_PRECISION=highest "$py" -m pytest -p no:cacheprovider -q tests/test_models.py tests/test_layers.py tests/test_sample.py -x \
    -k "not cli" --junitxml="$out/contract_on_gpu.xml" 2>&1 | tail -5 | tee "$out/contract_on_gpu.log" || status=1
  step "exports against transformers (needs torch + transformers)"
  "$py" -m pytest -p no:cacheprovider -q tests/test_export.py -k transformers -rs --junitxml="$out/export_parity.xml" 2>&1 | tail -5 | tee "$out/export_parity.log" || status=1
  step "scoring engine on the GPU backend"
  JAX_DEFAULT_MATMUL_PRECISION=highest "$py" -m pytest -p no:cacheprovider -q tests/test_evaluate.py -x \
    -k "float64 or batch_size_does_not or rolling_loglikelihood" --junitxml="$out/scoring_on_gpu.xml" 2>&1 | tail -5 | tee "$out/scoring_on_gpu.log" || status=1
fi

bench() { "$py" -m llmjax.bench --json --out "$out/bench.jsonl" "$@" 2>>"$out/bench.err" | tee -a "$out/bench.log" | cut -c1-300 || status=1; }
cfg() { echo "configs/$1.py:$variant"; }
if [ "$mode" = --sweep ]; then
  step "sweep"
  for arch in vanilla modern; do
    for scan in False True; do
      for remat in none dots_no_batch; do
        for bs in 16 32 64; do
          for impl in cudnn xla; do
            [ "$variant" != default ] && [ "$impl" = cudnn ] && continue
            bench --config "$(cfg $arch)" --suite=train,memory --steps=10 --repeats=3 --batch_size=$bs \
              --config.model.scan_layers=$scan --config.model.remat=$remat --config.model.attention_impl=$impl
          done
        done
      done
    done
  done
else
  step "benchmarks: vanilla, modern (full)"
  for arch in vanilla modern; do
    for bs in 16 32; do
      bench --config "$(cfg $arch)" --suite=train,memory --batch_size=$bs --steps=20 --repeats=3
    done
    bench --config "$(cfg $arch)" --suite=decode --repeats=3
  done
  step "benchmarks: int8 weight-only decoding (vanilla)"
  bench --config "$(cfg vanilla)" --suite=decode --repeats=3 --quantize=int8
  step "benchmarks: HellaSwag items/s (built-in scorer)"
  if [ "$variant" != default ]; then
    echo "skipped: the tiny configs have a character vocabulary" | tee -a "$out/steps.log"
  elif [ -n "${LLMJAX_TASK_DIR:-}" ] && { [ -f "$LLMJAX_TASK_DIR/hellaswag_val.jsonl" ] || [ -f "$LLMJAX_TASK_DIR/hellaswag/hellaswag_val.jsonl" ]; }; then
    for arch in vanilla modern; do
      bench --config "$(cfg $arch)" --suite=hellaswag --task_batch_size=64
    done
  else
    echo "skipped: set LLMJAX_TASK_DIR to a folder holding hellaswag_val.jsonl (the machine is offline)" | tee -a "$out/steps.log"
  fi
  step "benchmarks: the rest (short)"
  for arch in gqa mla moe linformer ssm; do
    bench --config "$(cfg $arch)" --suite=train,memory --batch_size=16 --steps=10 --repeats=2
    bench --config "$(cfg $arch)" --suite=decode --repeats=1
  done
fi
step "tables"
"$py" - "$out/bench.jsonl" >"$out/bench_table.md" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cols = ["arch", "batch_size", "scan_layers", "remat", "attention_impl", "train_tokens_per_sec", "mfu", "peak_memory_bytes", "decode_tokens_per_sec_b1", "decode_tokens_per_sec_b64",
        "decode_sampled_tokens_per_sec_b1", "decode_sampled_tokens_per_sec_b64", "config"]
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    cells = []
    for c in cols:
        v = r.get(c)
        cells.append("-" if v is None else str(v) if isinstance(v, bool) else f"{v:.3f}" if isinstance(v, float) and v < 1 else f"{v:,.0f}" if isinstance(v, (int, float)) else str(v))
    print("| " + " | ".join(cells) + " |")
EOF
cat "$out/bench_table.md"

if [ -n "${NANOGPT_SRC:-}" ] && [ "$variant" = default ]; then
  step "PyTorch anchors"
  bash ../shared/anchors/gpu_anchors.sh 2>&1 | tee "$out/anchors.log" | tail -12 || true
fi
step "done (exit $status)"
echo "gpu_check: exit $status" | tee -a "$out/env.txt"
exit $status
