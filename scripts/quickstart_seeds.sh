#!/usr/bin/env bash
# The CPU quickstart's loss over many seeds, nanoGPT and llmjax alternating (issue 3's loss target
# is a mean over seeds). For each K given: nanoGPT with torch seed 1337+K (a copy of its source with
# that one line changed), its final checkpoint scored on the whole validation split
# (scripts/nanogpt_whole_split.py); then llmjax with train.seed=K. Prints one line per run, with
# its wall time (whole process).
#
#   NANOGPT_SRC=path/to/nanoGPT TORCH_PY=path/to/python-with-torch scripts/quickstart_seeds.sh 0 1 2 [...]
#
# Scratch folders go under ${SCRATCH:-/tmp/quickstart_seeds}. CONFIG=configs/shakespeare_char.py:modern
# trains another variant of the recipe; NANOGPT=0 runs llmjax only (then NANOGPT_SRC and TORCH_PY are
# not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
config="${CONFIG:-configs/shakespeare_char.py}"
with_nanogpt="${NANOGPT:-1}"
[ "$with_nanogpt" = 0 ] || : "${NANOGPT_SRC:?set NANOGPT_SRC to a nanoGPT checkout}" "${TORCH_PY:?set TORCH_PY to a python with torch}"
py="${PYTHON:-.venv/bin/python}"
scratch="${SCRATCH:-/tmp/quickstart_seeds}"
mkdir -p "$scratch"
now() { date +%s.%N; }
for k in "$@"; do
  if [ "$with_nanogpt" != 0 ]; then
    seed=$((1337 + k)) src="$scratch/nanogpt_src$k" run="$scratch/nanogpt$k"
    rm -rf "$src" "$run"
    cp -r "$NANOGPT_SRC" "$src"
    sed -i "s/torch.manual_seed(1337 + seed_offset)/torch.manual_seed($seed + seed_offset)/" "$src/train.py"
    grep -q "manual_seed($seed + seed_offset)" "$src/train.py" || { echo "could not set nanoGPT's seed in $src/train.py"; exit 1; }
    t0=$(now)
    NANOGPT_SRC="$src" WORKDIR="$run" bash ../shared/anchors/nanogpt_cpu.sh >"$run.log" 2>&1
    t1=$(now)
    whole=$(cd "$run" && "$TORCH_PY" "$OLDPWD/scripts/nanogpt_whole_split.py" | tail -1)
    echo "nanoGPT seed $seed: wall $(echo "$t1 - $t0" | bc) s | $(grep 'step 2000' "$run.log") | $whole"
  fi
  rm -rf "$scratch/llmjax$k"
  t0=$(now)
  "$py" -m llmjax.train --config "$config" --config.train.seed="$k" --workdir "$scratch/llmjax$k" \
    --config.logging.progress_bar=False >"$scratch/llmjax$k.log" 2>&1
  t1=$(now)
  echo "llmjax seed $k: wall $(echo "$t1 - $t0" | bc) s | $(grep '^done' "$scratch/llmjax$k.log")"
done
