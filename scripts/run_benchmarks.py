#!/usr/bin/env python
"""The original playground's `run_benchmarks.py`: an alias of `python -m llmjax.evaluate`, with
the same flags (`--checkpoint_path runs/NAME --tasks hellaswag,arc_easy --batch_size 4 --dtype
bfloat16 --device cuda:0 [--limit N] [--output_json metrics.json]`)."""

import llmjax

if __name__ == "__main__":  # (a Ctrl-C while JAX imports is one line, as under `python -m llmjax.evaluate`; cli.run sets Python's back)
    llmjax._set_start_up_handler()

from absl import flags  # noqa: E402

from llmjax import cli, evaluate  # noqa: E402
from llmjax.evaluate import define_flags, main  # noqa: E402

if __name__ == "__main__":
    define_flags()
    flags.adopt_module_key_flags(evaluate)  # (--help lists llmjax.evaluate's flags: they are this script's)
    cli.run(main)
