#!/usr/bin/env python
"""The original playground's `run_benchmarks.py`: an alias of `python -m llmjax.evaluate`, with
the same flags (`--checkpoint_path runs/NAME --tasks hellaswag,arc_easy --batch_size 4 --dtype
bfloat16 --device cuda:0 [--limit N] [--output_json metrics.json]`)."""

from absl import flags

from llmjax import cli, evaluate
from llmjax.evaluate import define_flags, main

if __name__ == "__main__":
    define_flags()
    flags.adopt_module_key_flags(evaluate)  # (--help lists llmjax.evaluate's flags: they are this script's)
    cli.run(main)
