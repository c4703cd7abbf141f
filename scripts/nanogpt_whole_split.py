"""Score a finished nanoGPT CPU-quickstart run on the whole validation split, the way llmjax's
trainer scores its last step: non-overlapping windows of 64 targets (each window's first input is
the previous window's last target), every token of the split after the first a target exactly once,
mean cross-entropy over all 111,539 targets.

    cd WORKDIR_OF_A_NANOGPT_RUN && $TORCH_PY path/to/scripts/nanogpt_whole_split.py

Run it inside the folder `../shared/anchors/nanogpt_cpu.sh` trained in (it imports that folder's
model.py and reads out-shakespeare-char/ckpt.pt and data/shakespeare_char/val.bin). Prints one line.
"""

import sys

import numpy as np
import torch

sys.path.insert(0, ".")
from model import GPT, GPTConfig  # noqa: E402  (nanoGPT's, from the run folder)

T = 64
ckpt = torch.load("out-shakespeare-char/ckpt.pt", map_location="cpu")
model = GPT(GPTConfig(**ckpt["model_args"]))
model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
model.eval()
val = np.fromfile("data/shakespeare_char/val.bin", dtype=np.uint16).astype(np.int64)
total, count = 0.0, 0
starts = list(range(0, len(val) - 1, T))
with torch.no_grad():
    for i in range(0, len(starts), 256):
        xs, ys, masks = [], [], []
        for s in starts[i : i + 256]:
            w = val[s : s + T + 1]
            n = len(w) - 1
            x, y = np.zeros(T, np.int64), np.zeros(T, np.int64)
            x[:n], y[:n] = w[:-1], w[1:]
            xs.append(x), ys.append(y), masks.append(np.arange(T) < n)
        x, y, mask = (torch.tensor(np.stack(a)) for a in (xs, ys, masks))
        logits, _ = model(x, y)
        nll = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="none").view(y.shape)
        total += float((nll * mask).sum())
        count += int(mask.sum())
print(f"iteration {ckpt['iter_num']}: whole-split val loss {total / count:.4f} over {count} targets")
