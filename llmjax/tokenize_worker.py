"""What a dataset-preparation worker process runs (llmjax.prepare). Kept light: it imports
tiktoken and NumPy, not JAX, so `spawn`ed workers start in a fraction of a second and a parent
that already runs JAX threads is never forked."""

from __future__ import annotations

import signal

import numpy as np

from llmjax.tokenizer import gpt2_encoding


def init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def encode_documents(docs: list[str]) -> np.ndarray:
    """End-of-text + the GPT-2 tokens of each document, concatenated (uint16)."""
    enc = gpt2_encoding()
    ids = enc.encode_ordinary_batch(docs, num_threads=1)
    out = np.empty(sum(len(x) for x in ids) + len(ids), np.uint16)
    i = 0
    for x in ids:
        out[i] = enc.eot_token
        out[i + 1 : i + 1 + len(x)] = x
        i += len(x) + 1
    return out
