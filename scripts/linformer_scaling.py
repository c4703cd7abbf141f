"""Linformer against vanilla attention at context 1k, 4k and 16k: FLOPs per token (summary), time
of a jitted forward+backward and the compiled temporary memory. A benchmark, not a test.

    python scripts/linformer_scaling.py [--layers 1] [--d_model 128] [--heads 2] [--batch 1] [--vocab 256]

Both models get the same width, depth and a small vocabulary (256, so the logits do not hide the
mixer); Linformer keeps its default block_size 128 and rank 256.
Run on a GPU for real figures; on a CPU it finishes in a few minutes at these small widths.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
from flax import nnx

import llmjax
from llmjax.runtime import tune_host_allocator
from llmjax.summary import summarize

ROOT = Path(__file__).resolve().parent.parent


def measure(arch: str, T: int, args) -> dict:
    over = {
        "model.context_len": T,
        "model.n_layer": args.layers,
        "model.d_model": args.d_model,
        "model.n_head": args.heads,
        "model.head_dim": args.d_model // args.heads,
        "model.d_ff": 4 * args.d_model,
        "model.dtype": args.dtype,
        "model.scan_layers": False,
        "model.vocab_size": args.vocab,  # a small vocabulary keeps the logits from hiding the mixer
        "model.padded_vocab_size": args.vocab,
    }
    cfg = llmjax.load_config(f"{ROOT}/configs/{arch}.py", over)
    model = llmjax.build_model(cfg)
    graphdef, params = nnx.split(model)
    toks = jax.random.randint(jax.random.key(0), (args.batch, T + 1), 0, args.vocab)

    def loss(p, t):
        return llmjax.cross_entropy(nnx.merge(graphdef, p)(t[:, :-1])[0], t[:, 1:])

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(params, toks).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, toks))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, toks))
        times.append(time.perf_counter() - t0)
    s = summarize(cfg)
    return {
        "arch": arch,
        "context": T,
        "flops_per_token": s["flops_per_token"],
        "fwd_bwd_ms": 1e3 * sorted(times)[len(times) // 2],
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "decode_state_bytes": s["decode_state_bytes"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--d_model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if jax.default_backend() == "cpu":
        tune_host_allocator()
    rows = [measure(a, int(T), args) for T in args.contexts.split(",") for a in ("vanilla", "linformer")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{jax.devices()[0].device_kind}; {args.layers} layer(s), d_model {args.d_model}, {args.heads} heads, batch {args.batch}")
    print(f"{'arch':<10} {'context':>7} {'MFLOP/token':>12} {'fwd+bwd ms':>11} {'temp MiB':>9} {'decode state MiB':>17}")
    for r in rows:
        temp = "-" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        print(f"{r['arch']:<10} {r['context']:>7} {r['flops_per_token'] / 1e6:>12.2f} {r['fwd_bwd_ms']:>11.1f} {temp:>9} {r['decode_state_bytes'] / 2**20:>17.2f}")


if __name__ == "__main__":
    main()
