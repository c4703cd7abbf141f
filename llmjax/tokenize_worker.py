"""What a dataset-preparation worker process runs (llmjax.prepare). Kept light: it imports
tiktoken and NumPy, not JAX, so `spawn`ed workers start in a fraction of a second and a parent
that already runs JAX threads is never forked."""

from __future__ import annotations

import signal

import numpy as np

from llmjax.tokenizer import gpt2_encoding


def init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def encode_documents(docs: list[str], starts: list[bool] | None = None) -> np.ndarray:
    """The GPT-2 tokens of each text, concatenated (uint16), each preceded by end-of-text where it
    starts a document (`starts`, default all): a long document's later pieces continue it."""
    enc = gpt2_encoding()
    ids = enc.encode_ordinary_batch(docs, num_threads=1)
    starts = [True] * len(ids) if starts is None else starts
    out = np.empty(sum(len(x) for x in ids) + sum(starts), np.uint16)
    i = 0
    for x, start in zip(ids, starts):
        if start:
            out[i] = enc.eot_token
            i += 1
        out[i : i + len(x)] = x
        i += len(x)
    return out
