"""Step-for-step parity of llmjax's trainer with PyTorch nanoGPT on the CPU quickstart recipe.

    NANOGPT_SRC=path/to/nanoGPT $TORCH_PY scripts/nanogpt_parity.py   # rewrites tests/fixtures/nanogpt_parity.json

Both sides start from the same weights (drawn here with NumPy by GPT-2's init rule: N(0, 0.02), the
residual projections N(0, 0.02 / sqrt(2 * n_layer)), LayerNorm scales 1) and train on the same
batches of the shipped tinyshakespeare text. nanoGPT (karpathy/nanoGPT, model.py) trains with its
own `configure_optimizers`, `get_lr` and gradient clipping, exactly as its train.py does with the
recipe of configs/shakespeare_char.py; the fixture records its loss, gradient norm and learning
rate at every step. tests/test_train.py::test_train_step_matches_nanogpt replays the same steps
through llmjax's jitted train step and compares.

The NumPy helpers import neither torch nor JAX, so the test imports them from here.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "nanogpt_parity.json"
TEXT = ROOT / "llmjax" / "assets" / "tinyshakespeare.txt"
STEPS = 60
# configs/shakespeare_char.py, in nanoGPT's names
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, learning_rate=1e-3, min_lr=1e-4,
              warmup_iters=100, lr_decay_iters=2000, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0)


def vocabulary() -> list[str]:
    return sorted(set(TEXT.read_text(encoding="utf-8")))


def init_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """nanoGPT state_dict (bias=False, torch layouts: Linear weights are (out, in)), float32."""
    r, L, D, V, T = RECIPE, RECIPE["n_layer"], RECIPE["n_embd"], len(vocabulary()), RECIPE["block_size"]
    rng = np.random.default_rng(seed)
    normal = lambda shape, std=0.02: (rng.standard_normal(shape) * std).astype(np.float32)  # noqa: E731
    resid = 0.02 / math.sqrt(2 * r["n_layer"])
    w = {"transformer.wte.weight": normal((V, D)), "transformer.wpe.weight": normal((T, D))}
    for i in range(L):
        p = f"transformer.h.{i}."
        w[p + "ln_1.weight"] = np.ones(D, np.float32)
        w[p + "attn.c_attn.weight"] = normal((3 * D, D))
        w[p + "attn.c_proj.weight"] = normal((D, D), resid)
        w[p + "ln_2.weight"] = np.ones(D, np.float32)
        w[p + "mlp.c_fc.weight"] = normal((4 * D, D))
        w[p + "mlp.c_proj.weight"] = normal((D, 4 * D), resid)
    w["transformer.ln_f.weight"] = np.ones(D, np.float32)
    return w


def batches(seed: int = 1) -> np.ndarray:
    """(STEPS, batch, block_size + 1) int32 windows of the first 90% of the text (nanoGPT's train split)."""
    text = TEXT.read_text(encoding="utf-8")
    stoi = {c: i for i, c in enumerate(vocabulary())}
    ids = np.array([stoi[c] for c in text[: int(len(text) * 0.9)]], np.int32)
    n = RECIPE["block_size"] + 1
    starts = np.random.default_rng(seed).integers(0, len(ids) - n + 1, (STEPS, RECIPE["batch_size"]))
    return np.stack([np.stack([ids[s : s + n] for s in row]) for row in starts])


def to_llmjax(w: dict[str, np.ndarray], padded_vocab: int) -> dict:
    """The same weights as an llmjax `vanilla` parameter tree (scanned layout, kernels (in, out))."""
    g = lambda k: w["transformer." + k]  # noqa: E731
    L = RECIPE["n_layer"]
    stack = lambda f: np.stack([f(i) for i in range(L)])  # noqa: E731
    wte = g("wte.weight")
    emb = np.zeros((padded_vocab, wte.shape[1]), np.float32)
    emb[: len(wte)] = wte
    return {
        "embed": {"embedding": emb},
        "pos_embed": {"embedding": g("wpe.weight")},
        "norm_f": {"scale": g("ln_f.weight")},
        "blocks": {"layers": {
            "norm_1": {"scale": stack(lambda i: g(f"h.{i}.ln_1.weight"))},
            "norm_2": {"scale": stack(lambda i: g(f"h.{i}.ln_2.weight"))},
            "attn": {"qkv_proj": {"kernel": stack(lambda i: g(f"h.{i}.attn.c_attn.weight").T)},
                     "o_proj": {"kernel": stack(lambda i: g(f"h.{i}.attn.c_proj.weight").T)}},
            "mlp": {"fc": {"kernel": stack(lambda i: g(f"h.{i}.mlp.c_fc.weight").T)},
                    "proj": {"kernel": stack(lambda i: g(f"h.{i}.mlp.c_proj.weight").T)}},
        }},
    }


def main() -> None:
    src = os.environ.get("NANOGPT_SRC")
    if not src or not (Path(src) / "model.py").is_file():
        sys.exit("set NANOGPT_SRC to a nanoGPT checkout (see ../shared/anchors/README.md)")
    sys.path.insert(0, src)
    import torch
    from model import GPT, GPTConfig

    r = RECIPE
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=r["n_layer"], n_head=r["n_head"], n_embd=r["n_embd"], block_size=r["block_size"],
                          bias=False, vocab_size=len(vocabulary()), dropout=0.0))
    state = {k: torch.from_numpy(v) for k, v in init_weights().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied, as in nanoGPT
    model.load_state_dict(state)
    opt = model.configure_optimizers(r["weight_decay"], r["learning_rate"], (r["beta1"], r["beta2"]), "cpu")

    def get_lr(it):  # nanoGPT train.py's schedule
        if it < r["warmup_iters"]:
            return r["learning_rate"] * (it + 1) / (r["warmup_iters"] + 1)
        ratio = (it - r["warmup_iters"]) / (r["lr_decay_iters"] - r["warmup_iters"])
        return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r["learning_rate"] - r["min_lr"])

    rows = []
    for it, b in enumerate(batches()):
        lr = get_lr(it)
        for group in opt.param_groups:
            group["lr"] = lr
        _, loss = model(torch.from_numpy(b[:, :-1]).long(), torch.from_numpy(b[:, 1:]).long())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append({"step": it + 1, "loss": loss.item(), "grad_norm": norm.item(), "lr": lr})
    FIXTURE.write_text(json.dumps({
        "source": "karpathy/nanoGPT model.py + train.py's optimizer, schedule and clipping; written by scripts/nanogpt_parity.py",
        "torch": torch.__version__, "recipe": r, "steps": rows,
    }, indent=1) + "\n")
    print(f"wrote {FIXTURE}: loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f} over {len(rows)} steps")


if __name__ == "__main__":
    main()
