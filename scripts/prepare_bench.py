"""Benchmark of `python -m llmjax.prepare` (docs/benchmarks.md): whole-pipeline tokens/s against
tiktoken's raw `encode_ordinary_batch` on the same text and cores, and the pipeline's peak memory.

    python scripts/prepare_bench.py --mb 1024 --dir /tmp/pb

Writes a synthetic TinyStories-format text of about --mb MB (documents of 200-3,000 characters cut
from the shipped tinyshakespeare.txt at random, separated by <|endoftext|>), then
1. raw: reads it in 64 MB pieces and times only `encode_ordinary_batch(docs, num_threads=cores)`;
2. pipeline: runs `python -m llmjax.prepare` on it as a separate process, timed whole (start-up,
   reading, workers, writing shards), with its peak resident memory (the process and its workers,
   sampled every 50 ms with psutil).
"""
import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

from llmjax.tokenizer import ASSETS, gpt2_encoding

p = argparse.ArgumentParser()
p.add_argument("--mb", type=int, default=1024)
p.add_argument("--dir", default="/tmp/llmjax-prepare-bench")
a = p.parse_args()
d = Path(a.dir)
d.mkdir(parents=True, exist_ok=True)
src = d / f"synthetic_{a.mb}mb.txt"
EOT = "<|endoftext|>"
if not src.is_file():
    text = (ASSETS / "tinyshakespeare.txt").read_text()
    rng = random.Random(0)
    with open(src, "w") as f:
        written = 0
        while written < a.mb << 20:
            n = rng.randint(200, 3000)
            i = rng.randrange(len(text) - n)
            f.write(text[i : i + n] + EOT)
            written += n + len(EOT)
cores = os.cpu_count()
enc = gpt2_encoding()
raw_t, raw_tokens = 0.0, 0
with open(src) as f:
    rest = ""
    while True:
        block = f.read(64 << 20)
        if not block:
            break
        docs = (rest + block).split(EOT)
        rest = docs.pop()
        t = time.perf_counter()
        ids = enc.encode_ordinary_batch(docs, num_threads=cores)
        raw_t += time.perf_counter() - t
        raw_tokens += sum(len(x) + 1 for x in ids)
print(f"raw encode_ordinary_batch ({cores} threads): {raw_tokens:,} tokens in {raw_t:.1f} s = {raw_tokens / raw_t:,.0f} tok/s", flush=True)

out = d / "out"
subprocess.run(["rm", "-rf", str(out)])
t = time.perf_counter()
proc = subprocess.Popen([sys.executable, "-m", "llmjax.prepare", "bench", f"--source={src}", f"--out={out}", "--noprogress"])
ps, peak = psutil.Process(proc.pid), 0
while proc.poll() is None:
    try:
        rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
        peak = max(peak, rss)
    except psutil.Error:
        pass
    time.sleep(0.05)
dt = time.perf_counter() - t
import json

m = json.loads((out / "manifest.json").read_text())
tokens = sum(s["tokens"] for v in m["splits"].values() for s in v)
print(f"pipeline (python -m llmjax.prepare, {cores} workers): {tokens:,} tokens in {dt:.1f} s = {tokens / dt:,.0f} tok/s; "
      f"{tokens / dt / (raw_tokens / raw_t):.1%} of raw; peak RSS (all processes) {peak / 2**30:.2f} GiB", flush=True)
