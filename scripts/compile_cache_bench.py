"""The CPU quickstart's first 20 steps with JAX's own persistent compilation cache or llmjax's
FolderCache (docs/benchmarks.md, "The persistent compilation cache").

    .venv/bin/python scripts/compile_cache_bench.py {jax|ours} CACHE_FOLDER RUN_DIR

Give each run its own copy of the same cache folder (and a new RUN_DIR): prints the wall time and
how many programs were written to and loaded from the cache.
"""

import os
import runpy
import sys
import time

which, cache, workdir = sys.argv[1:4]
if which not in ("jax", "ours"):
    sys.exit("usage: compile_cache_bench.py {jax|ours} CACHE_FOLDER RUN_DIR")
os.environ["LLMJAX_COMPILATION_CACHE"] = cache
if which == "jax":
    import llmjax.compile_cache

    llmjax.compile_cache.install = lambda: False  # runtime.enable_compilation_cache then leaves JAX's own

from jax._src import monitoring  # noqa: E402

events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
start = time.time()
sys.argv = ["llmjax.train", "--config", "configs/shakespeare_char.py", "--config.train.max_steps=20",
            "--config.eval.every_steps=10", "--config.eval.num_batches=2", "--config.eval.sample_tokens=20",
            "--workdir", workdir]
try:
    runpy.run_module("llmjax.train", run_name="__main__")
except SystemExit:
    pass
print(f"{which}: {time.time() - start:.1f} s, {events.count('/jax/compilation_cache/cache_misses')} programs written, "
      f"{events.count('/jax/compilation_cache/cache_hits')} loaded", file=sys.stderr)
