#!/usr/bin/env bash
# Every GPU check in one go, for one short slot on a GPU machine. Usage: scripts/gpu_check.sh OUTDIR
# - installs missing Python packages from ./.whl (wheels carried to the machine) when present;
# - runs the GPU-only tests (tests/gpu) and the CPU contract suite on the GPU backend;
# - writes logs, JUnit XML and environment facts into OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
} 2>&1 | tee "$out/env.txt"
status=0
"$py" -m pytest -p no:cacheprovider -q tests/gpu --junitxml="$out/gpu_tests.xml" 2>&1 | tee "$out/gpu_tests.log" || status=1
JAX_DEFAULT_MATMUL_PRECISION=highest "$py" -m pytest -p no:cacheprovider -q tests/test_models.py tests/test_layers.py -x --junitxml="$out/contract_on_gpu.xml" 2>&1 | tail -5 | tee "$out/contract_on_gpu.log" || status=1
echo "gpu_check: exit $status" | tee -a "$out/env.txt"
exit $status
