#!/usr/bin/env bash
# Create ./.venv with Python 3.12 and install llmjax with the pinned set (constraints.txt).
# Idempotent: a second run installs nothing unless pyproject.toml or constraints.txt changed.
# Usage: bash scripts/setup.sh [EXTRAS]      e.g. EXTRAS=dev (default) or dev,wandb,eval
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"

find_python() {
  # 1. an explicit choice; 2. python3.12 on PATH; 3. any pyenv 3.12 (pyenv's global may be 3.11);
  # 4. uv's managed Pythons.
  if [ -n "${LLMJAX_PYTHON:-}" ]; then echo "$LLMJAX_PYTHON"; return; fi
  if command -v python3.12 >/dev/null 2>&1 && python3.12 -c '' 2>/dev/null; then command -v python3.12; return; fi
  local root
  root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
  for p in "$root"/versions/3.12*/bin/python3.12; do
    if [ -x "$p" ]; then echo "$p"; return; fi
  done
  if command -v uv >/dev/null 2>&1 && uv python find 3.12 >/dev/null 2>&1; then uv python find 3.12; return; fi
  echo "error: Python 3.12 not found; install it (e.g. 'pyenv install 3.12') or set LLMJAX_PYTHON=/path/to/python3.12" >&2
  exit 1
}

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  py="$(find_python)"
  echo "setup: creating .venv with $py"
  rm -rf .venv
  "$py" -m venv .venv
fi

stamp=".venv/.llmjax-installed"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) $extras"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing llmjax[$extras] with constraints.txt"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]"
echo "$want" > "$stamp"
