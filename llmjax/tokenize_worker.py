"""What a dataset-preparation worker process runs (llmjax.prepare). Kept light: it imports
tiktoken and NumPy, not JAX, so `spawn`ed workers start in a fraction of a second and a parent
that already runs JAX threads is never forked."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np

from llmjax.tokenizer import gpt2_encoding


def init(parent: int | None = None) -> None:
    """`parent`: the preparing process's pid (given, not read here: it may be gone already)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # a parent killed outright (SIGKILL, the OOM killer) cannot shut its pool down, and a worker
    # waits on its task queue for ever: leave once the parent is gone
    parent = os.getppid() if parent is None else parent

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


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
