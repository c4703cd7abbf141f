"""Causal attention: the kernel switch, the decode-cache write, and the grouped-query attention
module shared by `vanilla`, `gqa` and `modern`.

Kernels (`attention_impl`): `cudnn` is cuDNN's fused flash attention (GPU, bf16/fp16 only); `xla`
is the plain softmax(QK^T)V that runs everywhere; `auto` picks cuDNN on a GPU for bf16/fp16 compute
and XLA otherwise. Both go through `jax.nn.dot_product_attention`, whose XLA path keeps the logits
and the softmax in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.config import ConfigError, ModelConfig
from llmjax.models.layers import apply_rope, dense, residual_std


def resolve_impl(impl: str, dtype) -> str:
    """'auto' -> 'cudnn' on a GPU for 16-bit compute, else 'xla'. Asking for cuDNN where it cannot
    run is a one-line error rather than a silent fallback."""
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":
        return "cudnn" if on_gpu and half else "xla"
    if impl == "cudnn" and not on_gpu:
        raise ConfigError("model.attention_impl='cudnn' needs a CUDA GPU; use 'auto' or 'xla' here")
    if impl == "cudnn" and not half:
        raise ConfigError("model.attention_impl='cudnn' needs model.dtype bfloat16 or float16; use 'auto' or 'xla'")
    return impl


def causal_attention(q_BTHd, k_BSKd, v_BSKd, *, impl: str, scale: float | None = None):
    """Causal self-attention over one sequence chunk (T == S). K may divide H (grouped queries)."""
    return jax.nn.dot_product_attention(
        q_BTHd, k_BSKd, v_BSKd, scale=scale, is_causal=True, implementation=resolve_impl(impl, q_BTHd.dtype)
    )


def visible_mask(positions_BT, max_len: int):
    """(B, 1, T, S) True where cached position s may be seen by the query at positions[b, t].
    A padding query (position < 0) sees slot 0 only, so its (unused) output stays finite."""
    return (jnp.arange(max_len)[None, None, :] <= jnp.maximum(positions_BT, 0)[:, :, None])[:, None]


def cached_attention(q_BTHd, k_BSKd, v_BSKd, positions_BT, *, scale: float | None = None):
    """Attention of T new queries over a decode cache of S slots: slot s is visible to the query at
    position p when s <= p. Used for prefill and decode; XLA kernel (the mask is arbitrary)."""
    mask = visible_mask(positions_BT, k_BSKd.shape[1])
    return jax.nn.dot_product_attention(
        q_BTHd, k_BSKd.astype(q_BTHd.dtype), v_BSKd.astype(q_BTHd.dtype), scale=scale, mask=mask, implementation="xla"
    )


def write_cache(buf_BS, new_BT, positions_BT):
    """Write each token's entry into its row's cache buffer at the token's position. Padding tokens
    (position < 0) and positions past the buffer write nothing."""
    B, S = buf_BS.shape[:2]
    slots = jnp.where(positions_BT >= 0, positions_BT, S)  # S is out of range: dropped
    return buf_BS.at[jnp.arange(B)[:, None], slots].set(new_BT.astype(buf_BS.dtype), mode="drop")


def check_kv_heads(cfg) -> None:
    if cfg.n_kv_head <= 0 or cfg.n_head % cfg.n_kv_head:
        raise ConfigError(f"model.n_head={cfg.n_head} must be a multiple of model.n_kv_head={cfg.n_kv_head}")


class Attention(nnx.Module):
    """Causal multi-head attention with `n_kv_head` shared key/value heads (grouped-query attention;
    n_kv_head == n_head is plain multi-head attention) and optional rotary embeddings.

    Decode cache per layer: {'k': (B, S, K, hd), 'v': (B, S, K, hd)} - only the K shared heads.
    """

    def __init__(self, cfg: ModelConfig, *, n_kv_head: int, head_dim: int, bias: bool, rope_base: float | None, rngs: nnx.Rngs):
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, n_kv_head, head_dim
        self.rope_base = rope_base
        self.impl = cfg.attention_impl
        # One fused projection for queries, keys and values: (D, (H + 2K) * hd).
        self.qkv_proj = dense(cfg, cfg.d_model, (cfg.n_head + 2 * n_kv_head) * head_dim, bias=bias, rngs=rngs)
        self.o_proj = dense(cfg, cfg.n_head * head_dim, cfg.d_model, bias=bias, std=residual_std(cfg), rngs=rngs)

    def __call__(self, x_BTD, positions_BT, cache):
        B, T, _ = x_BTD.shape
        qkv = self.qkv_proj(x_BTD).reshape(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = jnp.split(qkv, [self.n_head, self.n_head + self.n_kv_head], axis=2)  # (B, T, H|K|K, hd)
        if self.rope_base is not None:
            q = apply_rope(q, positions_BT, self.rope_base)
            k = apply_rope(k, positions_BT, self.rope_base)
        if cache is None:
            out = causal_attention(q, k, v, impl=self.impl)
        else:
            cache = {"k": write_cache(cache["k"], k, positions_BT), "v": write_cache(cache["v"], v, positions_BT)}
            out = cached_attention(q, cache["k"], cache["v"], positions_BT)
        return self.o_proj(out.reshape(B, T, self.n_head * self.head_dim)), cache

    def init_cache(self, batch_size: int, max_len: int, dtype):
        shape = (batch_size, max_len, self.n_kv_head, self.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
