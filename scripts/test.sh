#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,wandb,prepare,eval,hf
exec .venv/bin/python -m pytest -n 2 --dist loadgroup -q "$@"
