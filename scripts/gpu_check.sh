#!/usr/bin/env bash
# Every GPU check in one go, for one short slot on a GPU machine.
#
#   scripts/gpu_check.sh OUTDIR            # tests, then benchmarks (default mode)
#   scripts/gpu_check.sh OUTDIR --sweep    # the settings sweep for vanilla and modern (no tests)
#
# It keeps to a time budget (GPU_CHECK_BUDGET seconds, default 480: 8 minutes; a 10-minute slot can give it 565).
# Steps run in order of importance, each under `timeout` with what is left of the budget (and its own
# cap, so that a slow step cannot starve the ones after it); a step that no longer fits is skipped and
# logged. Default mode:
#   0. a 20-second preflight of cuDNN attention (if it fails, the benchmarks use XLA's attention);
#   1. the GPU-only tests (tests/gpu: cuDNN against XLA attention, whole models in bf16, a bf16
#      training step per architecture, the MoE's expert paths against each other, bit-for-bit
#      repeats with train.deterministic), over xdist workers;
#   2. benchmarks (python -m llmjax.bench): vanilla and modern in full (training at batch 16 and 32
#      with memory in one process, then decoding at batch 1 and 64, greedy and top-k, in another;
#      vanilla's decoding again with XLA's decode instead of the fused decode kernels (for any
#      architecture whose decode row failed, too), and its batch-1 decoding without the padding row,
#      LLMJAX_DECODE_MIN_ROWS=1),
#      vanilla's HellaSwag items/s (when LLMJAX_TASK_DIR holds hellaswag_val.jsonl: carry it, the
#      machine is offline), then gqa, mla, moe, linformer, ssm short (training at batch 16, greedy
#      decoding; the SSM's scan is a Pallas kernel, first run on a GPU here: if its row fails, a row
#      with XLA's scan);
#   3. modern's HellaSwag items/s; nanoGPT's training at batch 32 on the same card (NANOGPT_SRC: its
#      source, carried); int8 weight-only decoding (vanilla);
#   4. the contract, sampler and scoring suites on the GPU backend, the exports against transformers;
#   5. a jax.profiler trace of vanilla (5 training steps at batch 16, decoding at batch 1 and 64),
#      summarised in its row (device busy fraction, time per kind of operation, top operations);
#      HellaSwag items/s of gqa, mla, moe, linformer and ssm on the first 2,000 items;
#   6. with what time is left, mla's decoding through XLA's attention and the MoE's batch-1 decoding with
#      dense experts (A/Bs of session 33's changes), a few sweep settings (vanilla: float32 loss logits, batch-64 decoding with
#      the whole cache from the start, the loss over 16 vocabulary slices at
#      batch 16, batch 64, scanned layers, remat; modern at batch 64; vanilla decoding with while loops
#      in CUDA graphs, and without; the MoE in capacity mode, with 2048- and 512-row blocks, and through
#      ragged_dot with XLA's cuDNN grouped GEMM; vanilla with XLA's deterministic ops), then the PyTorch anchors
#      (../shared/anchors/gpu_anchors.sh, NANOGPT_SRC set) if 4 minutes are left.
# --sweep: training tokens/s over batch x scanned/unrolled layers x remat x attention kernel x loss
# chunks, most telling settings first, as far as the budget goes, for vanilla and modern (or the
# architectures in GPU_CHECK_SWEEP_ARCHS; for moe: block sizes, capacity mode, dense experts; for
# ssm: the fused scan's backward with 4, 16 and 2 steps between its kept states, remat, without the
# convolution, and XLA's scan).
#
# Relative paths in OUTDIR, GPU_CHECK_WHEELS, GPU_CHECK_ANCHORS, LLMJAX_TASK_DIR, NANOGPT_SRC,
# LLMJAX_COMPILATION_CACHE and PYTHON are from the folder the script is run in (env.txt names them resolved).
# Missing Python packages are installed from the repository's .whl (or GPU_CHECK_WHEELS) when present: see
# scripts/gpu_carry.sh. OUTDIR receives at most seven files, since a lent machine returns only eight:
# env.txt, steps.log (each step's status, time and summary), bench.jsonl, bench_table.md, bench.err,
# logs.tgz (every log and JUnit XML, refreshed after each step) and traces.tgz (the profiler's
# traces and their summaries, at most 15 MiB); a rerun starts them afresh.
# GPU_CHECK_ONLY=REGEX runs only the steps whose names match (e.g. 'bench (vanilla|modern) decoding' on a
# second slot). GPU_CHECK_VARIANT=tiny runs the same steps on tiny configs (to check this script on a CPU).
set -uo pipefail
usage="usage: scripts/gpu_check.sh OUTDIR [--sweep]"
out="${1:?$usage}"
mode="${2:-default}"
# (a wrong argument refused in one line: '--sweep OUTDIR' made OUTDIR the mode, ran the default mode
# and wrote every file into /, none of them returned)
if [ $# -gt 2 ] || [[ "$out" == -* ]] || { [ "$mode" != default ] && [ "$mode" != --sweep ]; }; then
  echo "error: got '$*'; $usage (OUTDIR first)" >&2
  exit 2
fi
# (before the cd below: a relative OUTDIR is where the command was run)
if ! mkdir -p -- "$out" 2>/dev/null || ! out="$(cd -- "$out" 2>/dev/null && pwd)" || [ ! -w "$out" ]; then
  echo "error: OUTDIR $1 is not a folder that can be made and written; give another" >&2
  exit 2
fi
# so are relative paths in these variables (their defaults, .whl and ../shared/anchors, are the repository's)
for v in GPU_CHECK_WHEELS GPU_CHECK_ANCHORS LLMJAX_TASK_DIR NANOGPT_SRC LLMJAX_COMPILATION_CACHE PYTHON; do
  value="${!v:-}"
  [ "$v" = PYTHON ] && [[ "$value" != */* ]] && continue  # (a command name, looked up in PATH)
  [ -n "$value" ] && [[ "$value" != /* ]] && export "$v=$PWD/$value"
done
cd "$(dirname "$0")/.."
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
traces="$work.traces"
py="${PYTHON:-python3}"
variant="${GPU_CHECK_VARIANT:-default}"
budget="${GPU_CHECK_BUDGET:-480}"
only="${GPU_CHECK_ONLY:-.}"  # an extended regular expression: run only the steps whose names match
start=$SECONDS
status=0
rm -f "$out/steps.log" "$out/bench.jsonl" "$out/bench_table.md" "$out/bench.err" "$out/logs.tgz" "$out/traces.tgz"

wheels="${GPU_CHECK_WHEELS:-.whl}"
if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl 2>&1 | tail -3
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export LLMJAX_COMPILATION_CACHE="${LLMJAX_COMPILATION_CACHE:-/tmp/llmjax-jax-cache}"
{
  date -u
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  timeout 60 "$py" -c 'import jax, flax, optax, orbax.checkpoint as o, grain, ml_collections; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, "orbax", o.__version__, "grain", grain.__version__, jax.devices())'
  echo "mode $mode, variant $variant, budget ${budget}s"
  echo "wheels $(realpath -m "$wheels"), task dir ${LLMJAX_TASK_DIR:-(unset)}, nanoGPT ${NANOGPT_SRC:-(unset)}, anchors $(realpath -m "${GPU_CHECK_ANCHORS:-../shared/anchors}")"
} 2>&1 | tee "$out/env.txt"

left() { echo $((budget - (SECONDS - start))); }
log() { echo "$*" | tee -a "$out/steps.log"; }
cat >"$work/table.py" <<'EOF'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []
cols = ["arch", "batch_size", "scan_layers", "remat", "attention_impl", "loss_chunks", "deterministic", "moe_mode", "moe_impl", "moe_block_rows", "capacity_factor", "scan_chunk", "d_conv", "quantize", "train_tokens_per_sec", "mfu", "peak_memory_bytes",
        "compiled_memory_bytes", "compiled_flops_ratio", "decode_tokens_per_sec_b1", "decode_tokens_per_sec_b64", "decode_sampled_tokens_per_sec_b1",
        "decode_sampled_tokens_per_sec_b64", "hellaswag_items_per_sec", "decode_attention_impl", "decode_norm_impl", "decode_min_rows",
        "decode_grow", "decode_unroll", "config", "overrides", "error", "decode_error", "hellaswag_error", "xla_flags"]
print("| " + " | ".join(cols) + " |")
print("|" + "---|" * len(cols))
for r in rows:
    cells = []
    for c in cols:
        v = r.get(c)
        cells.append("-" if v is None or v == [] else " ".join(v) if isinstance(v, list) else str(v) if isinstance(v, bool) else f"{v:.3f}" if isinstance(v, float) and (v < 1 or c.endswith(("ratio", "factor")))
                     else f"{v:,.0f}" if isinstance(v, (int, float)) else str(v))
    print("| " + " | ".join(cells) + " |")
EOF
table() { "$py" "$work/table.py" "$out/bench.jsonl" >"$out/bench_table.md" 2>>"$work/table.log"; }
pack() { table; tar -czf "$out/logs.tgz.part" -C "$work" . 2>/dev/null && mv "$out/logs.tgz.part" "$out/logs.tgz"; }
# the profiler's traces, apart from the logs: a returned file may hold 16 MiB; past 15 only the summaries
pack_traces() {
  [ -d "$traces" ] || return 0
  tar -czf "$out/traces.tgz" -C "$traces" . 2>/dev/null
  if [ "$(stat -c %s "$out/traces.tgz" 2>/dev/null || echo 0)" -gt 15728640 ]; then
    log "== traces.tgz over 15 MiB: keeping only the summaries"
    (cd "$traces" && tar -czf "$out/traces.tgz" $(find . -name summary.md))
  fi
}

# step NAME CAP_SECONDS LOGFILE COMMAND...: run COMMAND under timeout min(CAP, budget left - 10 s),
# its output to $work/LOGFILE; skipped when under 20 s would be left for it.
step() {
  local name="$1" cap="$2" logf="$work/$3" rc t0=$SECONDS limit n0=0
  shift 3
  last_rc=skipped
  [[ "$name" =~ $only ]] || return 0
  [ -f "$logf" ] && n0=$(wc -l <"$logf")
  limit=$(($(left) - 10))
  [ "$cap" -lt "$limit" ] && limit=$cap
  if [ "$limit" -lt 20 ]; then
    log "== SKIP $name (out of time: $(left) s left)"
    status=1
    return
  fi
  log "== $(date -u +%T) $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >>"$logf" 2>&1
  rc=$?
  last_rc=$rc
  case $rc in
    0) log "   ok in $((SECONDS - t0)) s" ;;
    124 | 137) log "   TIMEOUT after $((SECONDS - t0)) s (rows written so far are kept)"; status=1 ;;
    *) log "   FAILED (exit $rc) in $((SECONDS - t0)) s"; status=1 ;;
  esac
  tail -n +$((n0 + 1)) "$logf" | grep -v '^{' | grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed|skipped|error)|Error:|^error:" | tail -8 | sed 's/^/   | /' | tee -a "$out/steps.log"
  pack
}

bench=("$py" -m llmjax.bench --json --out "$out/bench.jsonl")  # commands, not functions: timeout runs them
pytest=("$py" -m pytest -p no:cacheprovider -q)
# test files compile many small programs: spread them over worker processes (the GPU idles meanwhile)
if "$py" -c "import xdist" 2>/dev/null; then xdist() { echo "-n $1"; }; else xdist() { :; }; fi
anchors="${GPU_CHECK_ANCHORS:-../shared/anchors}"
[ -n "${NANOGPT_SRC:-}" ] && [ -d "$NANOGPT_SRC" ] && NANOGPT_SRC="$(cd "$NANOGPT_SRC" && pwd)" && export NANOGPT_SRC
last_rc=skipped
xla_attention=  # (set where cuDNN attention failed its preflight)
cfg() { echo "configs/$1.py:$variant"; }

# sweep ARCH "BATCH SCAN REMAT KERNEL [LOSS_CHUNKS]"...: one training row per setting, each in its own
# process (so that each row's peak memory is its own)
sweep() {
  local arch="$1" setting bs scan remat impl chunk
  shift
  for setting in "$@"; do
    read -r bs scan remat impl chunk <<<"$setting"
    chunk="${chunk:-0}"
    # (the tiny configs, or cuDNN failed its preflight: the --set that says so wins over this row's override, and its name says what runs)
    { [ "$variant" != default ] || [ -n "$xla_attention" ]; } && impl=xla
    step "sweep $arch batch $bs scan $scan remat $remat $impl loss_chunks $chunk" 120 sweep.log \
      "${bench[@]}" --config "$(cfg "$arch")" --suite=train,memory --steps=10 --repeats=3 --batch_size="$bs" \
      --config.model.scan_layers="$scan" --config.model.remat="$remat" --config.model.attention_impl="$impl" \
      --config.train.loss_chunks="$chunk"
  done
}

# sweep_overrides ARCH "--config.KEY=VALUE ..."...: one training row at batch 16 per set of overrides
sweep_overrides() {
  local arch="$1" over
  shift
  for over in "$@"; do
    # shellcheck disable=SC2086  # (each set is several words on purpose)
    step "sweep $arch $over" 120 sweep.log "${bench[@]}" --config "$(cfg "$arch")" --suite=train,memory --steps=10 --repeats=3 \
      --batch_size=16 $over
  done
}

if [ "$mode" = --sweep ]; then
  for arch in ${GPU_CHECK_SWEEP_ARCHS:-vanilla modern}; do  # the most telling settings first
    case $arch in
      moe) sweep_overrides moe "--config.model.moe_impl=blocked" "--config.model.moe_mode=capacity" \
        "--config.model.moe_impl=blocked --config.model.moe_block_rows=2048" \
        "--config.model.moe_impl=blocked --config.model.moe_block_rows=512" "--config.model.moe_impl=dense" \
        "--config.model.moe_mode=capacity --config.model.capacity_factor=1.0" ;;
      ssm)  # (the fused scan's backward with 4 and 16 steps between its kept states, against the default 8;
        # scan_chunk is XLA's scan's, used only with scan_impl=xla: one row of it to compare)
        sweep_overrides ssm ""
        for every in 4 16 2; do
          step "sweep ssm LLMJAX_SSM_BACKWARD_CHUNK=$every" 120 sweep.log env LLMJAX_SSM_BACKWARD_CHUNK=$every "${bench[@]}" \
            --config "$(cfg ssm)" --suite=train,memory --steps=10 --repeats=3 --batch_size=16
        done
        sweep_overrides ssm "--config.model.remat=dots" "--config.model.d_conv=0" \
          "--config.model.scan_impl=xla --config.model.scan_chunk=128" ;;  # (d_conv=0: without Mamba's convolution, its cost)
      *) sweep "$arch" "16 False none cudnn" "32 False none cudnn" "64 False none cudnn" "16 False none cudnn 16" \
        "32 True none cudnn" "64 False dots_no_batch cudnn" "32 False none cudnn 16" "32 False none xla" \
        "64 True dots_no_batch cudnn" "16 True none cudnn" "32 False dots_no_batch cudnn" "16 False none xla" ;;
    esac
  done
else
  if [ "$variant" = default ] || [ -n "${GPU_CHECK_PREFLIGHT:-}" ]; then
    # cuDNN's fused attention (the default kernel on a GPU) in 20 s: if it cannot run here, every
    # benchmark below falls back to XLA's attention (said in steps.log) rather than failing
    # (GPU_CHECK_PREFLIGHT=1 runs it with the tiny configs too: on a CPU it fails, so the fallback is tested)
    step "preflight: cuDNN attention forward and backward" 60 preflight.log "$py" -c '
import jax, jax.numpy as jnp
from llmjax.models.attention import causal_attention
for K in (12, 4):
    q = jax.random.normal(jax.random.key(0), (2, 256, 12, 64), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (2, 256, K, 64), jnp.bfloat16)
    f = jax.jit(jax.value_and_grad(lambda q, k: jnp.sum(causal_attention(q, k, k, impl="cudnn").astype(jnp.float32)), argnums=(0, 1)))
    v, g = f(q, k)
    assert bool(jnp.isfinite(v)), v
print("cuDNN attention ok on", jax.devices()[0].device_kind)'
    if [ "$last_rc" != 0 ] && [ "$last_rc" != skipped ]; then
      bench+=(--set model.attention_impl=xla)  # (--set: --config.* flags before --config are refused)
      xla_attention=1
      log "== cuDNN attention failed its preflight: the benchmarks below use attention_impl=xla"
    else
      # mla's values are narrower than its keys (64 against 96): cuDNN takes them unpadded on a Hopper
      # GPU (models/attention.causal_attention), first run here; if that fails, they are padded below
      step "preflight: cuDNN attention with narrower values (mla)" 60 preflight.log "$py" -c '
import jax, jax.numpy as jnp
from llmjax.models.attention import causal_attention
q = jax.random.normal(jax.random.key(0), (2, 256, 12, 96), jnp.bfloat16)
v = jax.random.normal(jax.random.key(1), (2, 256, 12, 64), jnp.bfloat16)
f = jax.jit(jax.value_and_grad(lambda q, v: jnp.sum(causal_attention(q, q, v, impl="cudnn").astype(jnp.float32)), argnums=(0, 1)))
print(jax.jit(lambda q, v: causal_attention(q, q, v, impl="cudnn")).lower(q, v).as_text().count("fmha"), "cuDNN calls")
val, g = f(q, v)
assert bool(jnp.isfinite(val)), val
print("cuDNN attention with narrower values ok")'
      if [ "$last_rc" != 0 ] && [ "$last_rc" != skipped ]; then
        export LLMJAX_CUDNN_PAD_VALUES=1
        log "== cuDNN attention with narrower values failed its preflight: the benchmarks below pad mla's values"
      fi
    fi
    # shellcheck disable=SC2046
    step "GPU-only tests" 180 gpu_tests.log "${pytest[@]}" $(xdist 8) tests/gpu --junitxml="$work/gpu_tests.xml"
  fi
  # training and decoding in separate steps: a slow training compile must not cost the decode figures
  for arch in vanilla modern; do
    step "bench $arch training (full)" 150 bench.log "${bench[@]}" --config "$(cfg $arch)" --suite=train,memory --batch_size=16,32 \
      --steps=20 --repeats=3
    step "bench $arch decoding (full)" 120 bench.log "${bench[@]}" --config "$(cfg $arch)" --suite=decode --repeats=3
    # on a GPU decoding's attention step and norms are Pallas (Triton) kernels (models/decode_attention.py,
    # decode_norm.py), first run here: if the row failed, the same row with XLA's decode (vanilla's
    # A/B with XLA's decode where its fused row ran comes after the other architectures' rows)
    [ "$arch" = vanilla ] && vanilla_fused_rc=$last_rc
    if [ "$last_rc" != 0 ] && [ "$last_rc" != skipped ]; then
      step "bench $arch decoding, XLA's (no fused decode kernels)" 100 bench.log "${bench[@]}" --config "$(cfg $arch)" \
        --suite=decode --repeats=3 --decode_modes=greedy --config.model.decode_attention_impl=xla --config.model.decode_norm_impl=xla
      # the fused kernels failed where XLA's decode ran (the norm kernel is every architecture's): every
      # later row decodes with XLA's, rather than losing each architecture's decode figures (and a step
      # each for modern)
      if [ "$arch" = vanilla ] && [ "$last_rc" = 0 ]; then
        bench+=(--set model.decode_attention_impl=xla --set model.decode_norm_impl=xla)
        log "== vanilla's fused decode kernels failed, XLA's decode did not: the benchmarks below decode with XLA's"
      fi
    fi
  done
  # HellaSwag items/s of the built-in scorer: vanilla (all 10,042 items) after the other architectures'
  # rows, then modern, and the other five on their first 2,000 items after the profile
  hellaswag() {
    local name="bench $1 HellaSwag items/s${2:+ ($2 items)}"
    [[ "$name" =~ $only ]] || return 0
    if [ "$variant" != default ]; then
      log "== SKIP $name (the tiny configs have a character vocabulary)"
    elif [ -n "${LLMJAX_TASK_DIR:-}" ] && { [ -f "$LLMJAX_TASK_DIR/hellaswag_val.jsonl" ] || [ -f "$LLMJAX_TASK_DIR/hellaswag/hellaswag_val.jsonl" ]; }; then
      step "$name" "${3:-100}" bench.log "${bench[@]}" --config "$(cfg "$1")" --suite=hellaswag --task_batch_size=64 ${2:+--task_limit=$2}
    else
      log "== SKIP $name (set LLMJAX_TASK_DIR to a folder holding hellaswag_val.jsonl: the machine is offline)"
    fi
  }
  for arch in gqa mla moe linformer ssm; do
    step "bench $arch (short)" 100 bench.log "${bench[@]}" --config "$(cfg $arch)" --suite=train,memory,decode --batch_size=16 --steps=10 \
      --repeats=2 --decode_modes=greedy
  done
  # the SSM's scan runs as a Pallas (Triton) kernel on a GPU, first run here: if its row failed, the
  # XLA scan's training row instead (slow, but a figure); not where only its decoding failed (the row
  # is written, with its training figures and decode_error; a row stopped in training is an error row)
  if [ "$last_rc" != 0 ] && [ "$last_rc" != skipped ] && ! grep -s '^{"arch": "ssm"' "$out/bench.jsonl" | grep -qv '"error":'; then
    step "bench ssm (short), XLA's scan" 100 bench.log "${bench[@]}" --config "$(cfg ssm)" --suite=train,memory --batch_size=16 \
      --steps=5 --repeats=2 --config.model.scan_impl=xla
  fi
  hellaswag vanilla
  # vanilla's decoding A/Bs, after every architecture's row (the budget may end before the last ones)
  if [ "${vanilla_fused_rc:-}" = 0 ]; then
    step "bench vanilla decoding, XLA's (no fused decode kernels)" 100 bench.log "${bench[@]}" --config "$(cfg vanilla)" \
      --suite=decode --repeats=3 --decode_modes=greedy --config.model.decode_attention_impl=xla --config.model.decode_norm_impl=xla
  fi
  # on a GPU the sampler decodes at least two rows (batch 1 gets a padding row, so that XLA's dot
  # strength reduction leaves its products GEMMs; llmjax/sample.py): the same rows without it
  step "bench vanilla decoding, no padding row at batch 1" 90 bench.log env LLMJAX_DECODE_MIN_ROWS=1 \
    "${bench[@]}" --config "$(cfg vanilla)" --suite=decode --repeats=3 --decode_modes=greedy --decode_batches=1
  hellaswag modern
  # PyTorch nanoGPT (torch.compile, bf16, 124M, T=1024, random tokens) at batch 32, its fastest, on
  # this card: the figure issue 8's training target is a ratio to (the full anchors run last)
  if [ -n "${NANOGPT_SRC:-}" ] && [ "$variant" = default ]; then
    step "anchor: nanoGPT training batch 32" 120 anchors.log bash -c 'cd "$NANOGPT_SRC" && python3 -c "
import sys, runpy, torch
sys.argv = [\"bench.py\", \"--real_data=False\", \"--batch_size=32\"]
runpy.run_path(\"bench.py\", run_name=\"__main__\")
print(\"nanogpt train bs=32 peak_mem_GB %.2f\" % (torch.cuda.max_memory_allocated() / 1e9))
"'
    grep -hsE "time per iteration|peak_mem" "$work/anchors.log" | tail -4 | sed 's/^/   | /' | tee -a "$out/steps.log"
  fi
  step "bench vanilla int8 weight-only decoding" 80 bench.log "${bench[@]}" --config "$(cfg vanilla)" --suite=decode --repeats=3 --quantize=int8
  if [ "$variant" = default ]; then
    step "contract and sampler suites on the GPU backend" 240 contract_on_gpu.log env JAX_DEFAULT_MATMUL_PRECISION=highest \
      "${pytest[@]}" $(xdist 8) tests/test_models.py tests/test_layers.py tests/test_sample.py -k "not cli" \
      --junitxml="$work/contract_on_gpu.xml"
    step "scoring engine on the GPU backend" 90 scoring_on_gpu.log env JAX_DEFAULT_MATMUL_PRECISION=highest \
      "${pytest[@]}" $(xdist 4) tests/test_evaluate.py -k "float64 or batch_size_does_not or rolling_loglikelihood" \
      --junitxml="$work/scoring_on_gpu.xml"
    step "exports against transformers" 90 export_parity.log "${pytest[@]}" tests/test_export.py -k transformers -rs \
      --junitxml="$work/export_parity.xml"
  fi
  # where the time goes: a jax.profiler trace of 5 training steps and of a decode run at batch 1 and
  # 64 (vanilla); summaries in the rows, the traces themselves in traces.tgz
  step "profile vanilla (training batch 16, decoding)" 120 bench.log "${bench[@]}" --config "$(cfg vanilla)" \
    --suite=train,decode --batch_size=16 --steps=5 --repeats=1 --decode_modes=greedy --profile="$traces"
  pack_traces
  for arch in gqa mla moe linformer ssm; do hellaswag "$arch" 2000 60; done
  # what time is left goes to the settings that most likely beat the configs' defaults: the loss over
  # vocabulary slices (memory at batch 16), training at batch 64, decoding with the whole while loop
  # in CUDA graphs (and with no command buffers at all); and decoding that tests its stop condition
  # after every token (a predicate copied to the host and waited for each step), the old loop
  # session 33's decoding changes, A/B against what they replaced: mla's attention through XLA
  # instead of its latent kernel; the MoE's batch-1 experts dense (all 8 read) instead of gathered
  step "bench mla decoding, XLA's attention (no latent kernel)" 80 bench.log "${bench[@]}" --config "$(cfg mla)" \
    --suite=decode --repeats=3 --decode_modes=greedy --config.model.decode_attention_impl=xla
  step "bench moe decoding at batch 1, dense experts" 60 bench.log "${bench[@]}" --config "$(cfg moe)" \
    --suite=decode --repeats=3 --decode_modes=greedy --decode_batches=1 --config.model.moe_impl=dense
  # the training loss's logits in float32 (train.logits_dtype; the default reads bf16 logits, as nanoGPT)
  step "sweep vanilla float32 logits" 80 sweep.log "${bench[@]}" --config "$(cfg vanilla)" --suite=train,memory --batch_size=16 \
    --steps=10 --repeats=2 --config.train.logits_dtype=float32
  # on a GPU the decode cache grows with the rows (llmjax/sample.py): batch 64 with the whole cache
  step "bench vanilla decoding, whole cache from the start" 80 bench.log env LLMJAX_DECODE_GROW=0 "${bench[@]}" \
    --config "$(cfg vanilla)" --suite=decode --repeats=3 --decode_modes=greedy --decode_batches=64
  step "bench vanilla decoding, stop test every step" 80 bench.log "${bench[@]}" --config "$(cfg vanilla)" --suite=decode \
    --repeats=3 --decode_modes=greedy --decode_unroll=1
  sweep vanilla "16 False none cudnn 16" "64 False none cudnn"
  step "bench vanilla decoding, while loops in command buffers" 80 bench.log env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
    "${bench[@]}" --config "$(cfg vanilla)" --suite=decode --repeats=3 --decode_modes=greedy
  sweep vanilla "32 True none cudnn"
  step "bench vanilla decoding, no command buffers" 80 bench.log env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
    "${bench[@]}" --config "$(cfg vanilla)" --suite=decode --repeats=3 --decode_modes=greedy
  sweep vanilla "64 False dots_no_batch cudnn"
  sweep modern "64 False none cudnn"
  # the MoE's ways to run its experts (the short row above: dropless, `auto` = blocks of 1024 rows)
  moe_train=("${bench[@]}" --config "$(cfg moe)" --suite=train,memory --batch_size=16 --steps=10 --repeats=2)
  step "sweep moe capacity mode" 80 sweep.log "${moe_train[@]}" --config.model.moe_mode=capacity
  step "sweep moe blocked 2048 rows" 80 sweep.log "${moe_train[@]}" --config.model.moe_impl=blocked --config.model.moe_block_rows=2048
  step "sweep moe blocked 512 rows" 80 sweep.log "${moe_train[@]}" --config.model.moe_impl=blocked --config.model.moe_block_rows=512
  step "sweep vanilla deterministic ops" 80 sweep.log "${bench[@]}" --config "$(cfg vanilla)" --suite=train,memory --batch_size=16 \
    --steps=10 --repeats=2 --config.train.deterministic=True
  step "sweep moe ragged_dot, cuDNN grouped GEMM" 80 sweep.log env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_experimental_use_ragged_dot_fusion=true" \
    "${moe_train[@]}" --config.model.moe_impl=ragged_dot
fi

table
cat "$out/bench_table.md"

if [ "$mode" != --sweep ] && [ -n "${NANOGPT_SRC:-}" ] && [ "$variant" = default ] && [ -f "$anchors/gpu_anchors.sh" ]; then
  if [ "$(left)" -ge 240 ]; then
    step "PyTorch anchors" 240 anchors.log bash "$anchors/gpu_anchors.sh"
  else
    log "== SKIP PyTorch anchors (they need about 4 minutes; $(left) s left)"
  fi
fi
[ -s "$work/bench.log" ] && grep -v '^{' "$work/bench.log" | grep -E "error|Error" | tail -20 >"$out/bench.err"
pack
log "== done in $((SECONDS - start)) s (exit $status)"
echo "gpu_check: exit $status" | tee -a "$out/env.txt"
rm -rf "$work" "$traces"
exit $status
