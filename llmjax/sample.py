"""`python -m llmjax.sample --checkpoint_path=runs/NAME --prompt="Once upon a time" --max_new_tokens=100`

The sampler for every architecture: prefill the prompts once, then one jitted decode loop
(`lax.while_loop`) over a fixed-size state, stopping per row at end-of-text or at max tokens.
The loop tests whether to stop every `DECODE_UNROLL` steps (an inner loop of that many steps has a
known trip count; on a GPU every data-dependent test costs a copy to the host and a wait).

- The decode state is what the model's `init_cache` gives (keys and values; GQA's shared heads;
  MLA's latent and RoPE key; Linformer's block and summaries; the SSM's recurrent state), plus the
  tokens drawn so far. Rows that are done are fed at position -1 (padding: their state stays put).
- Prompts are left-padded to a bucket length (powers of two from 16, capped at the context), so a
  new prompt length compiles nothing new within its bucket; a row's tokens sit at positions
  0..n-1 whatever its padding, so batching never changes a row's computation.
- Row r's random stream is `fold_in(fold_in(key(seed), r), t)` for its t-th new token: it depends on
  the seed and the row's index, not on its batch-mates.
- Past the context a row slides: its last `context - context // 2` tokens are prefilled again and
  decoding goes on (every row is re-prefilled with its own window at that moment).
- On a GPU: a batch of one decodes as two rows (`DECODE_MIN_ROWS`), and the cache starts small and
  doubles as the rows advance (`DECODE_GROW`); neither changes a token.
- Sampling: temperature, then top-k, then top-p (nucleus) on the rest; greedy is argmax. Padded
  vocabulary rows are never drawn.

Python API: `load(path)` -> `Loaded` (model, tokenizer, config, step); `generate(model, prompts, ...)`
on token ids; `Loaded.generate_text(prompts, ...)` on strings.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from llmjax import cli
from llmjax.config import DTYPES, ConfigError, closest, model_config
from llmjax.models.layers import convert_layer_layout
from llmjax.registry import build_model
from llmjax.tokenizer import TokenizerError, from_description

MIN_BUCKET = 16
DECODE_UNROLL = 16  # decode steps per test of the loop's stop condition (see `_decode`)


class SampleError(ValueError):
    """A sampler problem a user can fix (one line)."""


class PromptTruncated(UserWarning):
    """A prompt longer than the context: its last tokens are kept."""


# ---------------------------------------------------------------------------------------------
# Choosing tokens


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. `greedy` (or temperature 0) is argmax; otherwise logits are
    divided by `temperature`, cut to the `top_k` largest (None or 0: all), then to the smallest set
    whose probability reaches `top_p` (1.0: all), and sampled."""

    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self):
        if not isinstance(self.greedy, (bool, np.bool_)):  # ("no" was greedy, being truthy)
            raise SampleError(f"greedy must be True or False, got {self.greedy!r}")
        for name in ("temperature", "top_p"):  # ("1" was Python's TypeError from the comparison below)
            if isinstance(getattr(self, name), (bool, np.bool_)) or not isinstance(getattr(self, name), (int, float, np.integer, np.floating)):
                raise SampleError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not 0 <= self.temperature <= float(np.finfo(np.float32).max):  # (NaN fails too)
            raise SampleError(f"temperature must be a finite number >= 0 (at most {np.finfo(np.float32).max:.3g}: logits are float32), "
                              f"got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer))):
            raise SampleError(f"top_k must be a whole number of tokens (0 or None: no top-k), got {self.top_k!r}")  # (2.5: JAX's shape error)
        if self.top_k is not None and self.top_k < 0:
            raise SampleError(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SampleError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0:
            object.__setattr__(self, "top_k", None)
        if self.temperature < np.finfo(np.float32).tiny:  # 0, or too small for float32 to divide by
            object.__setattr__(self, "greedy", True)


def filter_logits(logits_BV, vocab_size: int, s: Sampling):
    """float32 logits / temperature with every token that may not be drawn set to -inf: padded
    vocabulary rows, those outside the top-k, and those outside the top-p nucleus (the most likely
    tokens whose probabilities, summed in decreasing order, first reach top_p). A row with a logit
    that is not finite (NaN or +-inf) in the real vocabulary is NaN (greedy: that logit is)."""
    return _filter(logits_BV, vocab_size, s)[0]


def _filter(logits_BV, vocab_size: int, s: Sampling):
    """`filter_logits`, and per row (B,) whether every real logit is finite (None when greedy: the
    argmax picks a non-finite one where there is one, see `_finite`). The check adds no pass over
    the vocabulary: a logit that is not finite enters as NaN, which the row's max (the shift below,
    made anyway) propagates, so the max is NaN exactly when the row holds one, whatever the top-k or
    the nucleus then drops (a NaN they dropped was missed when only the drawn token's logit was
    read). The greedy path's select fuses into its argmax."""
    B, V = logits_BV.shape
    rows = jnp.arange(B)[:, None]
    valid = jnp.arange(V) < vocab_size
    logits = logits_BV.astype(jnp.float32)
    logits = jnp.where(valid, jnp.where(jnp.isfinite(logits), logits, jnp.nan), -jnp.inf)
    if s.greedy:
        return logits, None
    # Shifted so that the largest is 0 before the division: a tiny temperature then sends the others
    # towards -inf (never to NaN), and tied maxima stay exactly tied. Padded rows are -inf after it
    # too, whatever the division gives.
    top = jnp.max(logits, axis=-1, keepdims=True)  # (NaN: the row holds a logit that is not finite)
    logits = jnp.where(valid, (logits - top) / s.temperature, -jnp.inf)
    k = min(s.top_k or V, vocab_size)
    if k < vocab_size:
        vals, idx = jax.lax.top_k(logits, k)
        logits = jnp.full_like(logits, -jnp.inf).at[rows, idx].set(vals)
    if s.top_p < 1:
        if k < vocab_size:  # already sorted, descending
            vals, idx = jax.lax.top_k(logits, k)
        else:
            idx = jnp.argsort(-logits, axis=-1)
            vals = jnp.take_along_axis(logits, idx, axis=-1)
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = before < s.top_p
        logits = jnp.full_like(logits, -jnp.inf).at[rows, idx].set(jnp.where(keep, vals, -jnp.inf))
    return logits, ~jnp.isnan(top[:, 0])


def choose(logits_BV, keys_B, vocab_size: int, s: Sampling):
    """One token per row: argmax when greedy, else a draw from the filtered distribution with that
    row's key."""
    return _choose(logits_BV, keys_B, vocab_size, s)[0]


def _choose(logits_BV, keys_B, vocab_size: int, s: Sampling):
    """`choose`'s tokens (B,), and per row whether all its real logits were finite (B,)."""
    logits, finite = _filter(logits_BV, vocab_size, s)
    if s.greedy:
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return nxt, _finite(logits_BV, nxt)
    return jax.vmap(jax.random.categorical)(keys_B, logits).astype(jnp.int32), finite


# ---------------------------------------------------------------------------------------------
# The jitted parts: prefill (and the first token), then the decode loop


def _record(state, nxt, max_new: int, eot, active=None, finite=None):
    """Append `nxt` to the rows that are still going (`active`, default: not done); mark rows done
    at end-of-text (`eot`, a traced int32 scalar; -1: none) or max tokens. `finite` (B,): whether
    the logits `nxt` was drawn from were all finite; a row going whose were not notes the index of
    that new token in "nonfinite" (the first only; -1: none), which `generate` turns into an error."""
    B = nxt.shape[0]
    active = ~state["done"] if active is None else active
    if finite is not None:
        bad = active & ~finite & (state["nonfinite"] < 0)
        state = {**state, "nonfinite": jnp.where(bad, state["n_gen"], state["nonfinite"])}
    slot = jnp.where(active, state["n_gen"], max_new)  # max_new is out of range: dropped
    out = state["out"].at[jnp.arange(B), slot].set(nxt, mode="drop")
    n_gen = state["n_gen"] + active
    done = state["done"] | (active & ((nxt == eot) | (n_gen >= max_new)))
    return {**state, "out": out, "n_gen": n_gen, "done": done, "last": jnp.where(active, nxt, state["last"])}


def start_state(B: int, max_new: int, seed: int) -> dict:
    """The decode loop's state before the prefill adds the cache: no tokens drawn, every row going,
    row r's random key `fold_in(key(seed), r)`."""
    return {
        "out": jnp.zeros((B, max_new), jnp.int32),
        "n_gen": jnp.zeros((B,), jnp.int32),
        "done": jnp.zeros((B,), bool),
        "last": jnp.zeros((B,), jnp.int32),
        "nonfinite": jnp.full((B,), -1, jnp.int32),  # a row's first new token drawn from non-finite logits (-1: none)
        "row_keys": jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), jnp.arange(B)),
    }


def _keys(state):
    return jax.vmap(jax.random.fold_in)(state["row_keys"], state["n_gen"])


def _finite(logits_BV, nxt_B):
    """Per row: is the logit of the greedy pick finite? A float16 forward that overflowed gives NaN
    logits, from which a draw picks some token: text with nothing wrong to see. The greedy argmax
    runs over the logits with every non-finite one made NaN (`_filter`), and argmax picks a NaN
    where there is one, so this notes any without another pass over the vocabulary (an
    all(isfinite) reduction was 2 more kernels per decoded token on an H100, compiled: 120.4 ->
    122.4 at batch 1). A draw's check is its filter's max (`_filter`)."""
    return jnp.isfinite(jnp.take_along_axis(logits_BV, nxt_B[:, None], axis=-1)[:, 0])


def _prefill_fn(graphdef, params, state, tokens_BT, lengths_B, *, cache_len: int, sampling: Sampling, eot):
    """Prefill each row's window (left-padded to T; row b's last lengths[b] tokens are real, at
    positions 0..lengths[b]-1) into a fresh cache of `cache_len` slots and draw each row's next token."""
    model = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    positions = jnp.arange(T, dtype=jnp.int32)[None, :] - (T - lengths_B[:, None])
    cache = model.init_cache(B, cache_len)
    logits, cache, _ = model(tokens_BT, positions=positions, cache=cache)
    nxt, finite = _choose(logits[:, -1], _keys(state), model.cfg.vocab_size, sampling)
    state = _record(state, nxt, state["out"].shape[1], eot, finite=finite)
    return {**state, "cache": cache, "pos": lengths_B, "limit": jnp.int32(cache_len)}


def _halted(i, st, num_steps):
    """The decode loop's stop test: `num_steps` steps taken, every row done, or a row that is still
    going at `limit` (the end of the cache or the context: the caller slides it)."""
    active = ~st["done"]
    return (i >= num_steps) | ~jnp.any(active) | jnp.any(active & (st["pos"] >= st["limit"]))


def _decode_fn(graphdef, params, state, num_steps, *, sampling: Sampling, eot, unroll: int = 1):
    """Up to `num_steps` decode steps; stops early when `_halted`. The loop tests its stop condition
    every `unroll` steps: an outer `lax.while_loop` around an inner loop of exactly `unroll` steps
    (a known trip count, so XLA's GPU runtime runs it without copying a predicate to the host and
    waiting for it after every token). Steps taken after the stop condition holds inside a chunk
    change nothing (every row is fed at position -1 and nothing is recorded), so the tokens are
    the same for every `unroll`."""
    vocab_size, max_new = nnx.merge(graphdef, params).cfg.vocab_size, state["out"].shape[1]

    def step(_, carry):
        i, st = carry
        go = ~st["done"] & ~_halted(i, st, num_steps)
        pos = jnp.where(go, st["pos"], -1)  # finished (or halted) rows are padding: nothing changes
        logits, cache, _ = nnx.merge(graphdef, params)(st["last"][:, None], positions=pos[:, None], cache=st["cache"])
        nxt, finite = _choose(logits[:, -1], _keys(st), vocab_size, sampling)
        st = _record({**st, "cache": cache}, nxt, max_new, eot, active=go, finite=finite)
        return i + jnp.any(go), {**st, "pos": st["pos"] + go}

    def body(carry):
        return jax.lax.fori_loop(0, unroll, step, carry)

    return jax.lax.while_loop(lambda c: ~_halted(*c, num_steps), body, (jnp.int32(0), state))[1]


# Rows the sampler decodes at least, per platform. XLA's GPU compiler rewrites a product whose one
# side is a vector (no dimension but the contracting ones: every parameter product at batch 1) into
# an elementwise multiply and a reduction ("dot strength reduction", a pass with no switch in jaxlib
# 0.11: the `xla_gpu_enable_dot_strength_reduction` option is gone); on an H200 each became two
# kernels, the first writing the whole elementwise product out and the second reading it back: 8 of
# a layer's 17 kernels and about 60% of its 46 us per token. A second row (a copy of the first,
# done from the start, so it changes nothing and is not returned) keeps every product a GEMM: for
# GPT-2 124M compiled for an H200 (llmjax.aot) 182 kernels per token instead of 222, and 0.03 GB
# moved outside the GEMMs instead of 0.52. LLMJAX_DECODE_MIN_ROWS overrides (1: no padding row).
DECODE_MIN_ROWS = {"gpu": 2}


def decode_min_rows(platform: str) -> int:
    """The fewest rows the sampler decodes on `platform` (a batch below it gets padding rows)."""
    env = os.environ.get("LLMJAX_DECODE_MIN_ROWS")
    if not env:
        return DECODE_MIN_ROWS.get(platform, 1)
    if not env.strip().isdigit():
        raise SampleError(f"LLMJAX_DECODE_MIN_ROWS must be a whole number of rows (1: no padding row), got {env!r}")
    return max(1, int(env))


# Whether the decode cache grows as the rows do, per platform. Each step's attention reads every
# slot of the cache, written or not: for batch 64 on an H200 that was 36% of the device time with
# 320 slots for 272 tokens (session 11's profile). Growing, the cache starts with room for the prompt
# and 64 tokens and doubles (up to what the run needs) when a row reaches its end: zero slots
# appended, so nothing already computed changes; each size compiles its own decode loop (three for
# 256 new tokens after a short prompt), so it is on where steps are cheap and compiles are not the
# cost (a GPU). LLMJAX_DECODE_GROW=1/0 overrides.
DECODE_GROW = {"gpu": True}
GROW_FIRST = 64  # room for this many new tokens in the first cache


def decode_grows(platform: str) -> bool:
    env = os.environ.get("LLMJAX_DECODE_GROW")
    if env is None or env == "":
        return DECODE_GROW.get(platform, False)
    if env.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise SampleError(f"LLMJAX_DECODE_GROW must be 1 or 0, got {env!r}")
    return env.strip().lower() in ("1", "true", "yes", "on")


@functools.partial(jax.jit, static_argnames=("pads",))
def _pad_cache(cache, pads):
    """The decode cache with zero slots appended: `pads` gives each leaf's (before, after) widths."""
    leaves, treedef = jax.tree.flatten(cache)
    return jax.tree.unflatten(treedef, [jnp.pad(a, p) if any(after for _, after in p) else a for a, p in zip(leaves, pads)])


def grow_cache(model, state, new_len: int) -> dict:
    """`state` with its cache grown to `new_len` slots (the model's own `init_cache` says which axis
    of each leaf holds the slots: the one whose size changes with the length; a bounded state has
    none and stays as it is)."""
    B, old_len = state["out"].shape[0], int(state["limit"])
    old, new = (jax.eval_shape(lambda n=n: model.init_cache(B, n)) for n in (old_len, new_len))
    pads = tuple(tuple((0, b - a) for a, b in zip(o.shape, n.shape)) for o, n in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
    return {**state, "cache": _pad_cache(state["cache"], pads), "limit": jnp.int32(new_len)}


@functools.cache
def _jitted():
    """(prefill, decode) jitted: pure functions of the model's graph definition (static) and
    parameters, so a call flattens a plain pytree rather than the module graph (nnx.jit walks every
    module on every call: milliseconds per call, twice per `generate`). The end-of-text id is an
    argument, not part of the program: another id compiles nothing."""
    prefill = jax.jit(_prefill_fn, static_argnames=("graphdef", "cache_len", "sampling"))
    decode = jax.jit(_decode_fn, static_argnames=("graphdef", "sampling", "unroll"), donate_argnames=("state",))
    return prefill, decode


def platform_of(params) -> str:
    """The platform that holds `params` (JAX's default backend for host arrays)."""
    leaf = next((x for x in jax.tree.leaves(params) if isinstance(x, jax.Array)), None)
    return next(iter(leaf.devices())).platform if leaf is not None else jax.default_backend()


def split_for_jit(model):
    """(graph definition, parameters) of `model` for the plain `jax.jit` functions that take them
    (the sampler's, the scorer's): host (NumPy) parameters, as the trainer's end-of-run sample has
    them, go to the device here, once, instead of at every call."""
    graphdef, params = nnx.split(model)
    return graphdef, jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), params)


def _prefill(model, state, tokens_BT, lengths_B, **kw):
    """`_prefill_fn` on a model (one call; `generate` splits the model once for all its calls)."""
    graphdef, params = nnx.split(model)
    return _jitted()[0](graphdef, params, state, tokens_BT, lengths_B, **kw)


def _decode(model, state, num_steps, **kw):
    """`_decode_fn` on a model (one call)."""
    graphdef, params = nnx.split(model)
    return _jitted()[1](graphdef, params, state, num_steps, **kw)


def bucket(n: int, context: int) -> int:
    """Prompt length bucket: the next power of two from MIN_BUCKET, capped at the context."""
    return min(context, max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------------------------
# The host loop


def _token_ids(prompt, i: int) -> list[int]:
    """Prompt `i`'s token ids as Python ints; anything but a sequence of integers (a flat list of ids
    given as the prompts, whose rows were ints; a string; float ids, which were cut to integers) is
    refused."""
    try:
        a = None if isinstance(prompt, (str, bytes)) else np.asarray(prompt)
    except ValueError:  # (ragged nesting)
        a = None
    if a is None or a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise SampleError(f"prompt {i + 1} is not a sequence of token ids (got {type(prompt).__name__} {str(prompt)[:40]}); "
                          "the prompts are one list of int ids per row, e.g. [[1, 2, 3], [4]]")
    return a.tolist()


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling | None = None,
    seed: int = 0,
    eot_id: int | None = None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    stream_every: int = DECODE_UNROLL,
    unroll: int = DECODE_UNROLL,
) -> list[list[int]]:
    """Up to `max_new_tokens` new tokens after each prompt (token ids, at least one each), decoded
    as one batch. A row ends early at `eot_id` (not included in its output). `on_tokens(row, ids)`,
    when given, receives each row's new tokens as they arrive (every `stream_every` steps).
    `unroll`: decode steps per test of the loop's stop condition (1: every step); it changes the
    speed, never the tokens. Runs shorter than `unroll` steps test every step."""
    if sampling is not None and not isinstance(sampling, Sampling):  # ("greedy" was AttributeError's traceback, deep in the loop)
        raise SampleError(f"sampling must be a Sampling, e.g. Sampling(greedy=True) (None: the defaults), got {sampling!r}")
    sampling = sampling or Sampling()
    cfg = model.cfg
    if not isinstance(prompts, Iterable):  # (an iterator, taken as a list: it was len()'s TypeError)
        raise SampleError(f"prompts must be a list of token-id lists, e.g. [[1, 2, 3], [4]], got {type(prompts).__name__}")
    prompts = list(prompts)
    context, B = cfg.context_len, len(prompts)
    whole = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))  # noqa: E731
    # (a negative count gave no tokens, as 0 does; 5.0 was JAX's "Shapes must be 1D sequences of concrete values of integer type")
    if not whole(max_new_tokens) or not 0 <= max_new_tokens < 2**31:
        raise SampleError(f"max_new_tokens must be in [0, 2**31), a whole number (the decode loop counts in int32), got {max_new_tokens!r}")
    # (JAX's keys hold 32 bits: 2**32 gave seed 0's text, -1 seed 2**32 - 1's; 1.5 was "PRNG key seed must be an integer; got JitTracer")
    if not whole(seed) or not 0 <= seed < 2**32:
        raise SampleError(f"seed must be in [0, 2**32), a whole number (JAX's random keys hold 32 bits), got {seed!r}")
    prompts = [_token_ids(p, i) for i, p in enumerate(prompts)]
    # (2.5 was JAX's fori_loop TypeError, deep in the trace, and True the same; a float stream_every was cut silently)
    if not whole(unroll) or not whole(stream_every) or unroll < 1 or stream_every < 1:
        raise SampleError(f"unroll and stream_every must be whole numbers >= 1, got {unroll!r} and {stream_every!r}")
    if on_tokens is not None and not callable(on_tokens):
        raise SampleError(f"on_tokens must be a function (row, ids) or None, got {type(on_tokens).__name__}")
    # (checked whatever max_new_tokens is: with 0, an empty or out-of-vocabulary prompt was taken and gave [])
    if any(len(p) == 0 for p in prompts):
        raise SampleError("every prompt needs at least one token (start an empty one from end-of-text)")
    if any(not 0 <= t < cfg.vocab_size for p in prompts for t in p):
        raise SampleError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    if eot_id is not None and (isinstance(eot_id, (bool, np.bool_)) or not isinstance(eot_id, (int, np.integer))
                               or not 0 <= eot_id < cfg.vocab_size):  # (one outside the vocabulary never ended a row, silently)
        raise SampleError(f"eot_id must be a token id in [0, {cfg.vocab_size}) or None (no end-of-text), got {eot_id!r}")
    if B == 0 or max_new_tokens == 0:
        return [[] for _ in prompts]
    eot = -1 if eot_id is None else int(eot_id)
    chunk = context // 2  # (a slide keeps the last context - chunk >= 1 tokens)
    graphdef, params = split_for_jit(model)
    jit_prefill, jit_decode = _jitted()
    n_rows = max(B, decode_min_rows(platform_of(params)))  # padding rows (DECODE_MIN_ROWS) copy row 0
    prompts = list(prompts) + [prompts[0]] * (n_rows - B)
    seqs = [list(p) for p in prompts]
    starts = [max(0, len(p) - context) for p in prompts]  # each row's window is seqs[r][starts[r]:]

    state = start_state(n_rows, max_new_tokens, seed)
    state["done"] = jnp.arange(n_rows) >= B  # padding rows: done from the start, nothing drawn

    def prefill(state, cache_len):
        windows = [s[st:] for s, st in zip(seqs, starts)]
        T = bucket(max(len(w) for w in windows), context)
        toks = np.zeros((n_rows, T), np.int32)
        for r, w in enumerate(windows):
            toks[r, T - len(w) :] = w
        lengths = jnp.asarray([len(w) for w in windows], jnp.int32)
        state = {k: v for k, v in state.items() if k not in ("cache", "pos", "limit")}
        return jit_prefill(graphdef, params, state, jnp.asarray(toks), lengths, cache_len=cache_len, sampling=sampling, eot=eot)

    T0 = bucket(max(len(s) - st for s, st in zip(seqs, starts)), context)
    full_len = min(context, _round_up(T0 + max_new_tokens, 64))  # the cache this run needs at most
    grows = decode_grows(platform_of(params))
    state = prefill(state, min(full_len, _round_up(T0 + GROW_FIRST, 64)) if grows else full_len)
    emitted = [0] * B
    while True:
        nonfinite, done, pos, limit = jax.device_get((state["nonfinite"], state["done"], state["pos"], state["limit"]))
        nonfinite = nonfinite[:B]
        if (nonfinite >= 0).any():  # (before any of those tokens is streamed)
            r = int(np.argmax(nonfinite >= 0))
            raise SampleError(
                f"the model's logits were not finite (NaN or inf) for {int((nonfinite >= 0).sum())} of {B} rows (the first: row {r + 1}, "
                f"at its new token {int(nonfinite[r]) + 1}); its forward overflowed (float16 holds at most 65504: sample with "
                f"--dtype bfloat16 or float32) or its parameters are not finite")
        if on_tokens is not None:
            out, n_gen = jax.device_get((state["out"], state["n_gen"]))
            for r in range(B):
                new = [int(t) for t in out[r, emitted[r] : n_gen[r]] if t != eot]
                if new:
                    on_tokens(r, new)
                emitted[r] = int(n_gen[r])
        if done.all():
            break
        if (pos[~done] >= limit).any() and limit < full_len:  # some row is at the end of a growing cache
            state = grow_cache(model, state, min(full_len, 2 * int(limit)))
            continue
        if (pos[~done] >= limit).any():  # some row is at the end of the context: slide
            out, n_gen = jax.device_get((state["out"], state["n_gen"]))
            for r in range(n_rows):
                seqs[r] = list(prompts[r]) + [int(t) for t in out[r, : n_gen[r]]]
                if done[r]:
                    starts[r] = len(seqs[r]) - 1  # prefilled, not used
                elif len(seqs[r]) - starts[r] > context:
                    starts[r] = len(seqs[r]) - (context - chunk)
            state = prefill(state, context)
            continue
        steps = stream_every if on_tokens is not None else max_new_tokens
        k = unroll if steps >= unroll else 1
        state = jit_decode(graphdef, params, state, jnp.int32(steps), sampling=sampling, eot=eot, unroll=k)
    out, n_gen = jax.device_get((state["out"], state["n_gen"]))
    return [[int(t) for t in out[r, : n_gen[r]] if t != eot] for r in range(B)]


# ---------------------------------------------------------------------------------------------
# Loading a run's checkpoint


def start_ids(tokenizer) -> list[int]:
    """What an empty prompt starts from: end-of-text; for a character vocabulary (no end-of-text)
    a newline, or its first character where it has no newline."""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    return tokenizer.encode("\n") if "\n" in getattr(tokenizer, "chars", "\n") else [0]


def _check_utf8(text: str, name: str) -> None:
    """Refuse a prompt holding a lone surrogate: a byte of argv that is not UTF-8 (Python keeps it as
    U+DC80 + byte), as a terminal not set to UTF-8 gives (latin-1's é, 0xE9). GPT-2's BPE replaced it
    with U+FFFD, silently (a character vocabulary named '\\udce9'); its raw byte would not be the
    character the user typed either (é is 0xC3 0xA9 in the UTF-8 text the model learnt)."""
    bad = next((k for k, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
    if bad is None:
        return
    code = ord(text[bad])
    if 0xDC80 <= code <= 0xDCFF:
        raise SampleError(f"{name} holds the byte 0x{code - 0xDC00:02x}, which is not UTF-8, at character {bad + 1}: is the "
                          "terminal's encoding UTF-8? give the prompt as UTF-8 text (e.g. in a UTF-8 --prompt_file)")
    raise SampleError(f"{name} holds a lone surrogate U+{code:04X} at character {bad + 1}, which is no character; remove it")


@dataclasses.dataclass
class Loaded:
    """A model restored from a training run, ready to sample."""

    model: nnx.Module
    tokenizer: object
    config: dict  # the run's resolved config (config.json)
    step: int
    path: Path

    def encode_prompts(self, prompts: Sequence[str], names: Sequence[str] | None = None) -> list[list[int]]:
        """Token ids of each prompt: an empty prompt starts from end-of-text (a newline for a
        character vocabulary); a prompt longer than the context keeps its last tokens (warning).
        `names`: how errors and warnings name each prompt (default 'prompt N'; the command line
        names a --prompt_file's line)."""
        context = self.model.cfg.context_len
        tok = self.tokenizer
        out = []
        for i, text in enumerate(prompts):
            name = names[i] if names is not None else f"prompt {i + 1}"
            if not isinstance(text, str):  # (token ids, bytes or None were Python's TypeError from deep inside)
                raise SampleError(f"{name} is not a string (got {type(text).__name__} {str(text)[:40]}); the prompts are a list of "
                                  "strings (token ids go to generate)")
            _check_utf8(text, name)
            try:
                ids = tok.encode_prompt(text) if text else []  # ("<|endoftext|>": the token, as nanoGPT's sampler reads it)
            except TokenizerError as e:
                raise SampleError(f"{name}: {e}") from None
            if not ids:
                ids = start_ids(tok)
            if len(ids) > context:
                warnings.warn(
                    f"{name} has {len(ids)} tokens, more than the model's context of {context}; keeping its last {context}",
                    PromptTruncated,
                    stacklevel=2,
                )
                ids = ids[-context:]
            out.append(ids)
        return out

    def generate_text(
        self, prompts: Sequence[str], max_new_tokens: int = 100, *, num_samples: int = 1, sampling: Sampling | None = None,
        seed: int = 0, on_text: Callable[[int, str], None] | None = None,
    ) -> list[str]:
        """`num_samples` continuations of each prompt (without the prompt), prompt-major: row
        r = i * num_samples + j is prompt i's j-th sample. `on_text(row, text)` streams."""
        if isinstance(prompts, (str, bytes)):  # (each character was a prompt)
            raise SampleError(f"prompts is a list of strings; got one string: pass [{str(prompts)[:40]!r}]")
        if isinstance(num_samples, (bool, np.bool_)) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            # (0 gave no text, silently; 1.5 or "2" was Python's TypeError)
            raise SampleError(f"num_samples must be >= 1, a whole number, got {num_samples!r}")
        ids = [p for p in self.encode_prompts(prompts) for _ in range(num_samples)]
        decoders = [StreamDecoder(self.tokenizer) for _ in ids]

        def stream(row, new):
            text = decoders[row].add(new)
            if text:
                on_text(row, text)

        outs = generate(self.model, ids, max_new_tokens, sampling=sampling, seed=seed, eot_id=self.tokenizer.eot_id,
                        on_tokens=stream if on_text is not None else None)
        if on_text is not None:  # a row that ended inside a character: its last bytes, as decode gives them
            for row, d in enumerate(decoders):
                if text := d.flush():
                    on_text(row, text)
        return [self.tokenizer.decode(o) for o in outs]


class StreamDecoder:
    """Text of a token stream as it arrives: bytes are buffered until they form whole UTF-8
    characters (a BPE token may end inside one)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, ids: list[int]) -> str:
        return self.utf8.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """What is left at the end of the stream: an unfinished character as U+FFFD (as decode gives it)."""
        return self.utf8.decode(b"", final=True)


def resolve(path: str | Path, which: str = "latest") -> tuple[Path, int]:
    """(run directory, checkpoint step) for a run directory (its latest or best checkpoint), its
    checkpoints/ directory, or one checkpoints/<step> directory."""
    from llmjax.checkpoint import CheckpointError, read_only_manager

    p = Path(path).expanduser()
    if not p.exists() and p.name.isdigit() and p.parent.name == "checkpoints" and p.parent.is_dir():
        steps = sorted(int(c.name) for c in p.parent.iterdir() if c.name.isdigit())
        raise SampleError(f"{p.parent} has no checkpoint {p.name} (it has {steps})")
    if not p.exists():
        raise SampleError(f"no such run or checkpoint: {path}; pass a training --workdir (e.g. runs/NAME) or one of its checkpoints/<step>")
    step = None
    if p.name.isdigit() and p.parent.name == "checkpoints":
        run, step = p.parent.parent, int(p.name)
    elif p.name == "checkpoints" and (p.parent / "config.json").is_file():
        run = p.parent
    else:
        run = p
    if not (run / "config.json").is_file() or not (run / "checkpoints").is_dir():
        try:  # (a Hugging Face folder of another model, an export of `modern` say: GPT-2's are read, not through here)
            hf_type = json.loads((run / "config.json").read_text()).get("model_type")
        except (OSError, ValueError, AttributeError):
            hf_type = None
        if isinstance(hf_type, str):
            raise SampleError(f"{path} is a Hugging Face '{hf_type}' model folder; llmjax reads its own training runs and "
                              "Hugging Face GPT-2 folders only")
        missing = " and ".join(n for n, ok in (("config.json", (run / "config.json").is_file()), ("checkpoints/", (run / "checkpoints").is_dir())) if not ok)
        raise SampleError(f"{path} is not an llmjax training run (it has no {missing}); pass the --workdir of a training run")
    if which not in ("latest", "best"):
        raise SampleError(f"--which must be 'latest' or 'best', got {which!r}")
    if step is not None and which == "best":  # (it was ignored: step N read, whatever the run's best)
        raise SampleError(f"--which=best picks among a run's checkpoints, and {path} names one (step {step}); pass the run "
                          f"directory {run} with --which=best, or drop --which to read step {step}")
    if step is None:
        try:
            with read_only_manager(run / "checkpoints", best_fn=lambda m: m["val_loss"], best_mode="min") as mgr:
                latest = mgr.latest_step()
                step = latest if which == "latest" else mgr.best_step()
        except CheckpointError as e:
            raise SampleError(str(e)) from None
        if latest is None:  # (with --which=best it said to pass --which=latest, which found nothing either)
            raise SampleError(f"{run / 'checkpoints'} holds no checkpoint; train it first")
        if step is None:
            raise SampleError(f"{run / 'checkpoints'} holds no checkpoint with a validation loss; train longer or pass --which=latest")
    return run, step


def inference_params(params: dict, dtype) -> dict:
    """Kernels, the MoE's expert weights, the Linformer's projections and the token table cast to the
    compute dtype once, as every forward casts them anyway (the logits are identical; decoding reads
    half the bytes in bf16, and converts nothing per token: left float32, the MoE's experts were
    converted at every step, 57 MB per layer and token for the default config compiled for an H200;
    the Linformer's two projections, 2 kernels per layer and token). Everything else stays float32."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return params

    def cast(path, x):
        names = [getattr(k, "key", None) for k in path]
        if "router" in names:  # (the MoE router computes in float32)
            return x
        if names[-1] in ("kernel", "w_in", "w_out", "proj_k", "proj_v") or names[-2:] == ["embed", "embedding"]:
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map_with_path(cast, params)


def load(
    path: str | Path, which: str = "latest", *, dtype: str | None = None, scan_layers: bool = False, device=None,
    model_overrides: dict | None = None, quantize: str | None = None, quantize_embeddings: bool = False,
) -> Loaded:
    """The model of a training run's checkpoint (see `resolve`), in `dtype` (default: the run's
    dtype and matmul_dtype; given, every matmul computes in it too),
    with unrolled layers (decoding writes each layer's cache in place), on `device` (default: the
    first). `model_overrides` may change execution options of the model config (not its shapes);
    `quantize='int8'` gives llmjax.quant's int8 weight-only model (from the float32 weights)."""
    from llmjax import export
    from llmjax.checkpoint import CheckpointError, restore_params

    if not isinstance(path, (str, os.PathLike)) or not str(path):  # (None or a number was pathlib's TypeError, deep inside)
        raise SampleError(f"path must be a training run's folder, one of its checkpoints or GPT-2 weights (e.g. 'runs/NAME'), got {path!r}")
    if dtype not in (None, "") and dtype not in DTYPES:  # (it was "RUN: model.dtype='foo' is not one of ...", as if the run's own)
        raise SampleError(f"dtype (--dtype) must be one of {', '.join(DTYPES)}, got {dtype!r}{closest(str(dtype), DTYPES)}")
    if quantize_embeddings and quantize in (None, "", "none"):
        raise SampleError("quantize_embeddings (--quantize_embeddings) needs quantize='int8' (--quantize int8)")
    if export.is_gpt2_source(path):  # OpenAI GPT-2 from the hub, or an exported / HF GPT-2 folder
        if which == "best":  # (it was ignored)
            raise SampleError(f"--which=best picks among a training run's checkpoints; {path} is GPT-2 weights (one set): drop --which")
        try:
            return export.load_gpt2(path, dtype=dtype, device=device, quantize=quantize, quantize_embeddings=quantize_embeddings,
                                    scan_layers=scan_layers)
        except (export.ExportError, ValueError) as e:
            raise SampleError(str(e)) from None
    run, step = resolve(path, which)
    try:
        config = json.loads((run / "config.json").read_text())
        # a dtype given computes everything, matmuls included (the run's matmul_dtype set aside)
        overrides = {"scan_layers": scan_layers, **({"dtype": dtype, "matmul_dtype": ""} if dtype else {}), **(model_overrides or {})}
        mcfg = model_config({**config["model"], **overrides})
        tokenizer = from_description(json.loads((run / "tokenizer.json").read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SampleError(f"{run} is not a readable llmjax run ({type(e).__name__}: {e})") from None
    except (ConfigError, TokenizerError) as e:
        raise SampleError(f"{run}: {e}") from None
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise SampleError(f"{run} is not a consistent llmjax run: its tokenizer.json has {tokenizer.vocab_size} tokens, "
                          f"its model {mcfg.vocab_size}")

    canonical = mcfg.replace(scan_layers=True)  # the checkpoint's layout
    abstract = jax.eval_shape(lambda: nnx.to_pure_dict(nnx.state(build_model(canonical, seed=0), nnx.Param)))
    device = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    target = {"params": jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)}
    given = Path(path).expanduser()
    named = given.name.isdigit() and given.parent.name == "checkpoints"  # one step (else its run's latest or best, as resolve reads)
    for _ in range(20):
        try:
            params = convert_layer_layout(restore_params(run / "checkpoints", step, target, config["model"]), mcfg.scan_layers)
            break
        except CheckpointError as e:
            # a trainer still running in the run saved a newer checkpoint and deleted this one (train.keep_checkpoints)
            # while it was read: it said "has no checkpoint N" or "damaged"; a run folder reads the step that replaced it
            newer = None if named else resolve(path, which)[1]
            if newer is not None and newer != step:
                step = newer
                continue
            if not (run / "checkpoints" / str(step)).is_dir():
                raise SampleError(f"checkpoint {run / 'checkpoints' / str(step)} was deleted while it was read (a training run still "
                                  f"running there keeps its last train.keep_checkpoints and the best); pass the run folder {run}, "
                                  f"which reads its {which} checkpoint, or a later step") from None
            raise SampleError(str(e)) from None
    else:
        raise SampleError(f"{run / 'checkpoints'}: each checkpoint read was deleted by a newer one before it was read whole (a training "
                          f"run saving there very often); pass a checkpoints/<step> the run keeps, or read it once the run stops")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(mcfg, seed=0)))
    if quantize not in (None, "", "none"):
        from llmjax import quant

        try:
            model = quant.apply(nnx.merge(graphdef, params), quantize, embeddings=quantize_embeddings)
        except ValueError as e:
            raise SampleError(str(e)) from None
    else:
        model = nnx.merge(graphdef, inference_params(params, mcfg.compute_dtype))
    return Loaded(model=model, tokenizer=tokenizer, config=config, step=step, path=run)


# ---------------------------------------------------------------------------------------------
# The command line

def define_flags():
    cli.define_checkpoint_flags()
    flags.adopt_module_key_flags(cli)  # (--help lists them with the tool's own flags)
    flags.DEFINE_string("prompt", None, "the prompt (empty: start from end-of-text)")
    flags.DEFINE_string("prompt_file", None, "a file with one prompt per line (after --prompt, if given); - for standard input")
    flags.DEFINE_integer("max_new_tokens", 100, "new tokens per sample")
    flags.DEFINE_float("temperature", 0.8, "softmax temperature (0: greedy)")
    flags.DEFINE_integer("top_k", 200, "sample among the k most likely tokens (0: all)")
    flags.DEFINE_float("top_p", 1.0, "then among the most likely tokens whose probability reaches p (1: all)")
    flags.DEFINE_bool("greedy", False, "always take the most likely token")
    flags.DEFINE_integer("num_samples", 1, "samples per prompt")
    flags.DEFINE_integer("seed", 0, "random seed")
    define_dtype_flag()
    define_quantize_flags()


def define_dtype_flag():
    flags.DEFINE_enum("dtype", None, list(DTYPES), "compute dtype, matmuls included (default: the run's model.dtype and matmul_dtype)")


def define_quantize_flags():
    flags.DEFINE_enum("quantize", "none", ["none", "int8"], "int8: per-channel int8 weights, dequantized inside the jitted step")
    flags.DEFINE_bool("quantize_embeddings", False, "with --quantize int8: the token table too")


def _prompts(FLAGS) -> list[str]:
    return [text for text, _ in _named_prompts(FLAGS)]


def _named_prompts(FLAGS) -> list[tuple[str, str]]:
    """(text, name) of each prompt: --prompt's, then each line of --prompt_file that is not blank,
    named by its line (errors and warnings say '--prompt_file F line N', not its place among the
    prompts, which blank lines and --prompt shift)."""
    prompts = [] if FLAGS.prompt is None else [(FLAGS.prompt, "--prompt")]
    if FLAGS.prompt_file is not None:
        if not FLAGS.prompt_file:  # (`--prompt_file=`, a shell variable that was empty, say: it was ignored)
            raise SampleError("--prompt_file is empty; name a file with one prompt per line")
        if FLAGS.prompt_file == "-" and sys.stdin is None:  # (`<&-`: it was AttributeError's traceback)
            raise SampleError("--prompt_file - reads standard input, which is closed; pipe the prompts in, one per line, or name a file")
        try:
            # utf-8-sig: a byte-order mark is not text; not splitlines: it also splits at \f, \x1c, \u2028, ...
            # ('-': standard input, as Unix tools read it: `... | python -m llmjax.sample --prompt_file=-`)
            raw = sys.stdin.buffer.read() if FLAGS.prompt_file == "-" else Path(FLAGS.prompt_file).read_bytes()
            lines = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n").split("\n")  # (as text mode reads line ends)
        except OSError as e:
            raise SampleError(f"cannot read --prompt_file {FLAGS.prompt_file}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:  # (Python's words named neither line nor remedy: "can't decode byte 0xe9 in position 3")
            if FLAGS.prompt_file != "-":
                from llmjax.prepare import not_utf8

                why = not_utf8(Path(FLAGS.prompt_file)) or f"{FLAGS.prompt_file} is not UTF-8 text ({e.reason})"  # (changed since)
                raise SampleError(f"--prompt_file {why}") from None
            raise SampleError(f"--prompt_file - (standard input) line {raw.count(b'\n', 0, e.start) + 1} holds the byte "
                              f"0x{raw[e.start]:02x}, which is not UTF-8; convert the text, e.g. with iconv -f latin1 -t utf-8") from None
        lines = [(line, f"--prompt_file {FLAGS.prompt_file} line {k}") for k, line in enumerate(lines, start=1) if line.strip()]
        if not lines:  # (with --prompt too: the file's prompts were silently none)
            raise SampleError(f"--prompt_file {FLAGS.prompt_file} holds no prompt (every line is blank)")
        prompts += lines
    return prompts or [("", "--prompt")]


def main(argv):
    FLAGS = flags.FLAGS
    cli.start_run_reader(argv, "runs/shakespeare_char")
    for name, more in (("prompt", "more prompts go in a --prompt_file, one per line"), ("prompt_file", "join the files into one")):
        values = [v for _, v in cli.given(cli.command_line(), (name,))]
        if len(set(values)) > 1:  # (absl keeps the last: the others were dropped, silently)
            shown = ", ".join(repr(v if len(v) <= 40 else v[:37] + "...") for v in values)
            cli.fail(f"--{name} is given {len(values)} times ({shown}) and only the last would be read; give one ({more})")
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    try:
        if FLAGS.num_samples < 1:
            raise SampleError(f"--num_samples must be >= 1, got {FLAGS.num_samples}")
        if not 0 <= FLAGS.max_new_tokens < 2**31:
            raise SampleError(f"--max_new_tokens must be in [0, 2**31) (the decode loop counts in int32), got {FLAGS.max_new_tokens}")
        if not 0 <= FLAGS.seed < 2**32:
            raise SampleError(f"--seed must be in [0, 2**32), got {FLAGS.seed}")  # (JAX's keys hold 32 bits: larger seeds wrap)
        sampling = Sampling(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p, greedy=FLAGS.greedy)
        prompts, names = zip(*_named_prompts(FLAGS))
        loaded = load(FLAGS.checkpoint_path, FLAGS.which, dtype=FLAGS.dtype, quantize=FLAGS.quantize,
                      quantize_embeddings=FLAGS.quantize_embeddings)
        n = FLAGS.num_samples
        rows = [p for p in prompts for _ in range(n)]
        loaded.encode_prompts(prompts, names)  # their errors and warnings (naming a --prompt_file's line) before any text
        out = cli.TextOut()  # (a character stdout's encoding lacks: an escape and a warning, not a traceback mid-text)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (said above)
                if len(rows) == 1:  # one sample: plain text, streamed
                    out.write(rows[0], flush=True)
                    try:
                        loaded.generate_text(rows, FLAGS.max_new_tokens, sampling=sampling, seed=FLAGS.seed,
                                             on_text=lambda row, text: out.write(text, flush=True))
                    finally:  # (also on Ctrl-C: the text's line ends before the one-line error)
                        out.write("\n", flush=True)
                else:
                    texts = loaded.generate_text(list(prompts), FLAGS.max_new_tokens, num_samples=n, sampling=sampling, seed=FLAGS.seed)
                    for k, (prompt, text) in enumerate(zip(rows, texts), start=1):
                        out.write(f"--- sample {k} ---\n{prompt}{text}\n")
        finally:
            out.warn()
    except (SampleError, ConfigError) as e:
        cli.fail(str(e))
    except jax.errors.JaxRuntimeError as e:
        if cli.out_of_memory(e) is None:  # (XLA's RESOURCE_EXHAUSTED at a result, or INTERNAL at a dispatch)
            raise
        cli.fail(f"out of device memory decoding {FLAGS.max_new_tokens} new tokens for {FLAGS.num_samples} sample(s) per prompt "
                 f"(the new tokens are kept on the device); lower --max_new_tokens or --num_samples")


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    from absl import flags

    from llmjax import cli

    sample = cli.tool("llmjax.sample")
    sample.define_flags()
    flags.adopt_module_key_flags(sample)  # (--help lists the key flags of __main__, which defines none now)
    cli.run(sample.main)
