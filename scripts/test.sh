#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,wandb,prepare,eval,hf
bash scripts/setup_aot.sh --no-cudnn  # JAX's CUDA plugin, compile-only, for tests/test_aot.py (./.aot)
# --max-worker-restart=0: a crashed worker fails the run at once (pytest-xdist 3.8 can hang replacing a
# crashed worker under --dist loadgroup: pytest-dev/pytest-xdist#1323, #1327)
exec .venv/bin/python -m pytest -n 2 --dist loadgroup --max-worker-restart=0 -q "$@"
