#!/usr/bin/env bash
# Install JAX's CUDA plugin for compile-only use (llmjax.aot: compile for a GPU on a machine with
# none) into ./.aot, outside .venv: installed there, it would make every JAX process look for a GPU
# and print an error where there is none. The plugin's version is the installed jaxlib's.
# Usage: bash scripts/setup_aot.sh [--no-cudnn]   (cuDNN, ~0.9 GB on disk, is needed for cuDNN attention)
# Idempotent: a second run installs nothing unless jaxlib's version or the choice changed.
set -euo pipefail
cd "$(dirname "$0")/.."
cudnn=1
for arg in "$@"; do
  case "$arg" in
    --no-cudnn) cudnn=0 ;;
    *) echo "error: unknown argument $arg (usage: bash scripts/setup_aot.sh [--no-cudnn])" >&2; exit 2 ;;
  esac
done
[ -x .venv/bin/python ] || bash scripts/setup.sh
version="$(.venv/bin/python -c 'import jaxlib; print(jaxlib.__version__)')"
want="jaxlib=$version cudnn=$cudnn"
stamp=.aot/.installed
if [ -f "$stamp" ] && { [ "$(cat "$stamp")" = "$want" ] || { [ "$cudnn" = 0 ] && [ "$(cat "$stamp")" = "jaxlib=$version cudnn=1" ]; }; }; then
  exit 0
fi
packages=("jax-cuda13-plugin==$version" "jax-cuda13-pjrt==$version")
# cuDNN's version: the one the GPU machine's plugin was built against or later (9.x)
[ "$cudnn" = 1 ] && packages+=("nvidia-cudnn-cu13>=9.12,<10")
echo "setup_aot: installing ${packages[*]} into .aot"
rm -rf .aot.tmp
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --target .aot.tmp "${packages[@]}"
rm -rf .aot
mv .aot.tmp .aot
echo "$want" > "$stamp"
