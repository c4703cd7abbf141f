"""Hugging Face transformers GPT-2 (124M, random weights, float32) greedy decoding on the CPU: the
anchor for `python -m llmjax.bench --suite=decode` on a machine without a GPU. Run it with a Python
that has torch and transformers (not llmjax's environment):

    $TORCH_PY scripts/decode_anchor_cpu.py [--new 64] [--batches 1,8]

Prompt of 16 random tokens, greedy, every new token forced (min_new_tokens); one warm-up call, then
the median of 3 timed calls. Dynamic (default) cache and static cache.
"""
import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

p = argparse.ArgumentParser()
p.add_argument("--new", type=int, default=64)
p.add_argument("--batches", default="1,8")
a = p.parse_args()
torch.manual_seed(0)
m = GPT2LMHeadModel(GPT2Config()).eval()
for bs in [int(b) for b in a.batches.split(",")]:
    x = torch.randint(0, 50257, (bs, 16))
    for cache in ("dynamic", "static"):
        kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
        if cache == "static":
            kw["cache_implementation"] = "static"
        with torch.no_grad():
            m.generate(x, **kw)
            times = []
            for _ in range(3):
                t = time.perf_counter()
                m.generate(x, **kw)
                times.append(time.perf_counter() - t)
        print(f"hf {cache} cache float32 bs={bs} new={a.new}: {bs * a.new / statistics.median(times):.1f} tok/s", flush=True)
