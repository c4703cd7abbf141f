#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,wandb,prepare,eval,hf
bash scripts/setup_aot.sh --no-cudnn  # JAX's CUDA plugin, compile-only, for tests/test_aot.py (./.aot)
exec .venv/bin/python -m pytest -n 2 --dist loadgroup -q "$@"
