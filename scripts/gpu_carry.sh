#!/usr/bin/env bash
# Prepare what a lent, offline GPU machine needs beside the repo, in two git-ignored folders to carry:
# - .whl: the wheels that scripts/gpu_check.sh installs there. The machine's image has JAX, Flax,
#   Optax, Orbax, tiktoken, NumPy, safetensors, PyTorch and transformers but not the rest of llmjax's
#   needs: grain (and its array_record and portpicker), ml_collections, and gguf for the export tests;
#   and cloudpickle, which grain imports (so every llmjax command does): the H200's image had it; a
#   small pure-Python wheel, carried in case another image lacks it.
#   Versions are constraints.txt's pins; CPython 3.12, manylinux x86-64. lm-eval is not fetched:
#   gpu_check.sh uses the built-in scorer, and lm-eval's own needs (datasets, ...) are missing there too.
# - .task: HellaSwag's validation file (from ../shared/data, or LLMJAX_TASK_DIR), for the items/s figure.
#
#   bash scripts/gpu_carry.sh
#   then, on the machine, with .whl and .task carried:
#   LLMJAX_TASK_DIR=.task bash scripts/gpu_check.sh "$OUT"
set -euo pipefail
# (a relative LLMJAX_TASK_DIR is from the folder the script is run in, as in gpu_check.sh)
[ -n "${LLMJAX_TASK_DIR:-}" ] && [[ "$LLMJAX_TASK_DIR" != /* ]] && LLMJAX_TASK_DIR="$PWD/$LLMJAX_TASK_DIR"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
pin() { # NAME -> NAME==VERSION from constraints.txt
  local line
  line=$(grep -i -E "^$1==" constraints.txt) || { echo "gpu_carry: $1 is not pinned in constraints.txt" >&2; exit 1; }
  echo "$line"
}
# (both are git-ignored by .gitignore: writing .git/info/exclude here failed where .git is a file, in a
# `git worktree`, or absent, in a copy of the files, and set -e ended the script there)
mkdir -p .whl .task
platforms=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
if ! "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  "$(pin grain)" "$(pin array_record)" "$(pin portpicker)" "$(pin ml_collections)" "$(pin gguf)" "$(pin cloudpickle)" 2>.whl/.pip.log; then
  grep -v "is ignored" .whl/.pip.log >&2
  echo "gpu_carry: pip download failed (above)" >&2
  exit 1
fi
rm -f .whl/.pip.log
for src in "${LLMJAX_TASK_DIR:-}/hellaswag_val.jsonl" "${LLMJAX_TASK_DIR:-}/hellaswag/hellaswag_val.jsonl" ../shared/data/hellaswag/hellaswag_val.jsonl; do
  if [ -f "$src" ]; then cp "$src" .task/hellaswag_val.jsonl; break; fi
done
[ -f .task/hellaswag_val.jsonl ] || echo "gpu_carry: no hellaswag_val.jsonl found; the HellaSwag items/s step will be skipped" >&2
ls -1 .whl .task
du -sh .whl .task
