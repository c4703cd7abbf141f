#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,wandb,prepare,eval,hf
bash scripts/setup_aot.sh --no-cudnn  # JAX's CUDA plugin, compile-only, for tests/test_aot.py (./.aot)
# Python's bytecode caches (__pycache__, gitignored) on even where PYTHONDONTWRITEBYTECODE is set, as on
# our machines: each of the suite's ~400 Python processes then starts 0.15 s sooner (llmjax's modules
# not compiled again) and each worker collects the tests in 2.6 s, not 6.0 (pytest's rewritten tests)
unset PYTHONDONTWRITEBYTECODE
# --dist load: the tests go one by one to whichever worker is free. (--dist loadgroup, used before,
# grouped nothing with pytest 9.2 and pytest-xdist 3.8: xdist_group marks were ignored; and a crashed
# worker's replacement could hang the run under it: pytest-dev/pytest-xdist#1323, #1327.)
# --max-worker-restart=0: a worker that crashes fails the run at once.
exec .venv/bin/python -m pytest -n 2 --dist load --max-worker-restart=0 -q "$@"
