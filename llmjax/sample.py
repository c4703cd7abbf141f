"""Decoding with the decode cache: prefill once, then one jitted loop of single-token steps.

`generate` is the plain loop the trainer uses for its end-of-run sample; it works for every
architecture through the calling convention (model(tokens, positions=, cache=)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def sample_logits(logits_BV, key, temperature: float, top_k: int | None):
    """One token per row: greedy at temperature 0, else softmax sampling, optionally top-k."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1)
    logits_BV = logits_BV / temperature
    if top_k:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1)


@nnx.jit(static_argnames=("max_new_tokens", "temperature", "top_k"))
def _generate(model, prompt_1T, n_prompt, key, max_new_tokens: int, temperature: float, top_k: int | None):
    """The prompt is left-padded to T: its first T - n_prompt tokens are padding (position < 0)."""
    T = prompt_1T.shape[1]
    cache = model.init_cache(1, T + max_new_tokens)
    logits, cache, _ = model(prompt_1T, positions=(jnp.arange(T) - (T - n_prompt))[None], cache=cache)
    keys = jax.random.split(key, max_new_tokens)
    first = sample_logits(logits[:, -1], keys[0], temperature, top_k)

    graphdef, state = nnx.split(model)  # a plain pytree inside lax.scan; nnx modules cannot cross it

    def step(carry, key_and_pos):
        tok, cache = carry
        key, pos = key_and_pos
        logits, cache, _ = nnx.merge(graphdef, state)(tok[:, None], positions=jnp.full((1, 1), pos), cache=cache)
        nxt = sample_logits(logits[:, -1], key, temperature, top_k)
        return (nxt, cache), tok

    (last, _), toks = jax.lax.scan(step, (first, cache), (keys[1:], n_prompt + jnp.arange(max_new_tokens - 1)))
    return jnp.concatenate([toks[:, 0], last])


def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.8, top_k: int | None = 200, seed: int = 0) -> list[int]:
    """`max_new_tokens` tokens after `prompt_ids` (at least one token). Past the context length it
    slides: each chunk of half a context is decoded after re-prefilling the last tokens. Prompts are
    left-padded (padding positions are negative) and chunks all have one size (the last is cut),
    so one shape is compiled."""
    context = model.cfg.context_len
    chunk = max(context // 2, 1)
    if top_k is not None:
        top_k = min(top_k, model.cfg.vocab_size)
    key = jax.random.key(seed)
    tokens, out = list(prompt_ids), []
    while len(out) < max_new_tokens:
        prompt = tokens[-(context - chunk) :]
        padded = [0] * (context - chunk - len(prompt)) + prompt
        key, sub = jax.random.split(key)
        new = _generate(model, jnp.asarray([padded], jnp.int32), len(prompt), sub, chunk, float(temperature), top_k)
        new = [int(t) for t in new]
        tokens += new
        out += new
    return out[:max_new_tokens]
