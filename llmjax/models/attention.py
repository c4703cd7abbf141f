"""Causal attention: the kernel switch, the decode-cache write, and the grouped-query attention
module shared by `vanilla`, `gqa` and `modern`.

Kernels (`attention_impl`): `cudnn` is cuDNN's fused flash attention (GPU, bf16/fp16 only); `xla`
is the plain softmax(QK^T)V that runs everywhere; `auto` picks cuDNN on a GPU for bf16/fp16 compute
and XLA otherwise. Both go through `jax.nn.dot_product_attention`, whose XLA path keeps the logits
and the softmax in float32.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # (see causal_attention)

from llmjax import runtime
from llmjax.config import ConfigError, ModelConfig
from llmjax.models import decode_attention
from llmjax.models.layers import dot32, apply_rope, dense, linear_without_bias, residual_std


def resolve_impl(impl: str, dtype) -> str:
    """'auto' -> 'cudnn' on a GPU for 16-bit compute, else 'xla'. Asking for cuDNN where it cannot
    run is a one-line error rather than a silent fallback."""
    on_gpu = runtime.backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "auto":
        return "cudnn" if on_gpu and half else "xla"
    if impl == "cudnn" and not on_gpu:
        raise ConfigError("model.attention_impl='cudnn' needs a CUDA GPU; use 'auto' or 'xla' here")
    if impl == "cudnn" and not half:
        raise ConfigError("model.attention_impl='cudnn' needs model.dtype bfloat16 or float16; use 'auto' or 'xla'")
    return impl


def causal_attention(q_BTHd, k_BSKd, v_BSKe, *, impl: str, scale: float | None = None):
    """Causal self-attention over one sequence chunk (T == S). K may divide H (grouped queries).
    The values may have another width than the queries and keys (e != d). Narrower ones (`mla`, as
    DeepSeek's) go to cuDNN as they are where JAX's cuDNN path allows it (a Hopper or later GPU and
    cuDNN 9.10 or later, checked when traced; LLMJAX_CUDNN_PAD_VALUES=1 turns it off); otherwise
    the narrower side is zero-padded, since `jax.nn.dot_product_attention` wants one head width, and
    the output's padding columns dropped."""
    impl = resolve_impl(impl, q_BTHd.dtype)
    d, e = q_BTHd.shape[-1], v_BSKe.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if impl == "xla" and q_BTHd.dtype == jnp.float16 and runtime.backend() == "cpu":
        # XLA's CPU backend has no float16 x float16 -> float32 batched dot (the XLA path's logits):
        # widened, as dot32 does (the products are exact in float32)
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        return causal_attention(f32(q_BTHd), f32(k_BSKd), f32(v_BSKe), impl=impl, scale=scale).astype(jnp.float16)
    if e == d:
        return jax.nn.dot_product_attention(q_BTHd, k_BSKd, v_BSKe, scale=scale, is_causal=True, implementation=impl)
    if impl == "cudnn" and e < d and os.environ.get("LLMJAX_CUDNN_PAD_VALUES", "0") != "1":
        try:  # (the function jax.nn.dot_product_attention calls for cuDNN, without its same-width check)
            return cudnn_attention.dot_product_attention(q_BTHd, k_BSKd, v_BSKe, scale=scale, mask_type=cudnn_attention.MaskType.CAUSAL)
        except NotImplementedError:  # (no such GPU or cuDNN: padded below)
            pass
    pad = lambda a: jnp.pad(a, ((0, 0),) * 3 + ((0, max(d, e) - a.shape[-1]),))  # noqa: E731  (zeros change no score)
    return jax.nn.dot_product_attention(pad(q_BTHd), pad(k_BSKd), pad(v_BSKe), scale=scale, is_causal=True, implementation=impl)[..., :e]


def visible_mask(positions_BT, max_len: int):
    """(B, 1, T, S) True where cached position s may be seen by the query at positions[b, t].
    A padding query (position < 0) sees slot 0 only, so its (unused) output stays finite."""
    return (jnp.arange(max_len)[None, None, :] <= jnp.maximum(positions_BT, 0)[:, :, None])[:, None]


def cached_attention(q_BTHd, k_BKdS, v_BKdS, positions_BT, *, scale: float | None = None):
    """Attention of T new queries over a decode cache of S slots, stored (B, K, hd, S): slot s is
    visible to the query at position p when s <= p. Used for prefill and decode. The numerics of
    `jax.nn.dot_product_attention`'s XLA path (float32 logits and softmax, masked logits at its
    large negative value), written as two batched products over (B, K) that read the cache where
    it lies. Stored as (B, S, K, hd), the layout that function takes, the cache had to be copied
    into a heads-first layout for those products, for every layer, key and value, at every decoded
    token (the whole cache: at batch 64 and 124M parameters several times the weights' bytes).
    Heads first and slots last is also the layout XLA's CPU backend gives the full forward's keys
    and values, so cached decoding computes the same products as full recomputation (bit for bit
    there, which keeps models with bfloat16 matmul operands within 1e-4 of it)."""
    B, T, H, d = q_BTHd.shape
    K = k_BKdS.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q = q_BTHd.reshape(B, T, K, H // K, d)
    k, v = k_BKdS.astype(q.dtype), v_BKdS.astype(q.dtype)
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    # (dot32: XLA's CPU runtime has no bf16 x bf16 -> f32 product with batch axes; there it widens first)
    logits = dot32("btkgd,bkds->bkgts", q, k).astype(logits_dtype) * jnp.asarray(scale, logits_dtype)
    mask = visible_mask(positions_BT, k.shape[3])[:, :, None]  # (B, 1, 1, T, S)
    logits = jnp.where(mask, logits, -0.7 * jnp.finfo(logits_dtype).max)  # as jax.nn.dot_product_attention
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
    return jnp.einsum("bkgts,bkds->btkgd", probs, v).reshape(B, T, H, d)


def write_cache(buf, new_BT, positions_BT, *, slot_axis: int = 1):
    """Write each token's entry into its row's cache buffer at the token's position, along the
    buffer's `slot_axis`: 1 for (B, S, ...) buffers, 3 for the keys and values (B, K, hd, S), with
    new entries (B, T, ...) either way. Padding tokens (position < 0) and positions past the buffer
    write nothing."""
    B, S = buf.shape[0], buf.shape[slot_axis]
    slots = jnp.where(positions_BT >= 0, positions_BT, S)  # S is out of range: dropped
    # advanced indices apart (batch, then slots): numpy puts their (B, T) first, then the rest
    index = (jnp.arange(B)[:, None],) + (slice(None),) * (slot_axis - 1) + (slots,)
    return buf.at[index].set(new_BT.astype(buf.dtype), mode="drop")


def check_kv_heads(cfg) -> None:
    if cfg.n_kv_head <= 0 or cfg.n_head % cfg.n_kv_head:
        raise ConfigError(f"model.n_head={cfg.n_head} must be a multiple of model.n_kv_head={cfg.n_kv_head}")


class Attention(nnx.Module):
    """Causal multi-head attention with `n_kv_head` shared key/value heads (grouped-query attention;
    n_kv_head == n_head is plain multi-head attention) and optional rotary embeddings.

    Decode cache per layer: {'k': (B, K, hd, S), 'v': (B, K, hd, S)} - only the K shared heads,
    heads first, slots last (see `cached_attention`).
    """

    def __init__(self, cfg: ModelConfig, *, n_kv_head: int, head_dim: int, bias: bool, rope_base: float | None, rngs: nnx.Rngs):
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, n_kv_head, head_dim
        self.rope_base = rope_base
        self.impl = cfg.attention_impl
        self.decode_impl = cfg.decode_attention_impl
        # (a config class that declares its attention is not the plain kind, a bias or a window in
        # the scores, keeps every decoded token off the fused kernel, which would drop the change)
        self.fused_decode = type(cfg).fused_decode_attention
        # One fused projection for queries, keys and values: (D, (H + 2K) * hd).
        self.qkv_proj = dense(cfg, cfg.d_model, (cfg.n_head + 2 * n_kv_head) * head_dim, bias=bias, rngs=rngs)
        self.o_proj = dense(cfg, cfg.n_head * head_dim, cfg.d_model, bias=bias, std=residual_std(cfg), rngs=rngs)

    def __call__(self, x_BTD, positions_BT, cache):
        out, cache = self._heads(x_BTD, positions_BT, cache)
        return self.o_proj(out), cache

    def without_out_bias(self, x_BTD, positions_BT, cache):
        """(y minus the output projection's bias, that bias or None, cache): for a caller that adds
        the bias itself, in a kernel that reads y anyway (PreNormBlock's fused residual norm)."""
        out, cache = self._heads(x_BTD, positions_BT, cache)
        y, bias = linear_without_bias(self.o_proj, out)
        return y, bias, cache

    def _heads(self, x_BTD, positions_BT, cache):
        """(the heads' outputs side by side (B, T, H * hd), the output projection's input; cache)."""
        B, T, _ = x_BTD.shape
        if cache is not None and self._decode_kernel(T, cache["k"].shape[3]):
            return self._fused_decode(x_BTD, positions_BT, cache)
        qkv = self.qkv_proj(x_BTD).reshape(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)
        q, k, v = jnp.split(qkv, [self.n_head, self.n_head + self.n_kv_head], axis=2)  # (B, T, H|K|K, hd)
        if self.rope_base is not None:
            q = apply_rope(q, positions_BT, self.rope_base)
            k = apply_rope(k, positions_BT, self.rope_base)
        if cache is None:
            out = causal_attention(q, k, v, impl=self.impl)
        else:
            cache = {"k": write_cache(cache["k"], k, positions_BT, slot_axis=3), "v": write_cache(cache["v"], v, positions_BT, slot_axis=3)}
            # one updated buffer for both the carried cache and the products (at batch 1 XLA's CPU
            # fusion otherwise writes the cache twice and copies it to keep both writes in place)
            cache = jax.lax.optimization_barrier(cache)
            out = cached_attention(q, cache["k"], cache["v"], positions_BT)
        return out.reshape(B, T, self.n_head * self.head_dim), cache

    def _fused_decode(self, x_BTD, positions_BT, cache):
        """One token per row through models/decode_attention: the kernel adds the projection's bias,
        writes the cache and attends, reading the queries, keys and values where the projection
        (or, with rotary embeddings, the rotation) wrote them."""
        B, H, K, hd = x_BTD.shape[0], self.n_head, self.n_kv_head, self.head_dim
        raw, bias = linear_without_bias(self.qkv_proj, x_BTD[:, 0])
        raw = raw.reshape(B, H + 2 * K, hd)
        bias = None if bias is None else bias.reshape(H + 2 * K, hd)
        if self.rope_base is None:
            srcs, offsets = (raw, raw, raw), (0, H, H + K)
        else:  # rotated queries and keys: the bias (if any) is added before the rotation, by XLA
            raw, bias = (raw, None) if bias is None else (raw + bias.astype(raw.dtype), None)
            # queries and keys rotated together: one kernel (rotated apart, XLA made each its own, 2 a layer)
            qk = apply_rope(raw[:, None, : H + K], positions_BT, self.rope_base)[:, 0]
            srcs, offsets = (qk, qk, raw), (0, H, H + K)
        out, k_cache, v_cache = decode_attention.decode_attention(
            *srcs, bias, cache["k"], cache["v"], positions_BT[:, 0], offsets=offsets, n_head=H,
            interpret=runtime.backend() != "gpu",
        )
        return out.reshape(B, 1, H * hd), {"k": k_cache, "v": v_cache}

    def _decode_kernel(self, T: int, S: int) -> bool:
        """Whether one decoded token's attention runs as the fused kernel (models/decode_attention):
        'pallas' (an error where the shapes do not fit), or 'auto' on a GPU where they do."""
        if T != 1 or self.decode_impl == "xla" or not self.fused_decode:
            return False
        unmet = decode_attention.unmet(self.head_dim, self.n_head // self.n_kv_head, S)
        fits = not unmet
        if self.decode_impl == "pallas" and unmet:  # (only what is not met: the line named every need, met or not)
            raise ConfigError(f"model.decode_attention_impl='pallas' needs {' and '.join(unmet)}; use 'auto' or 'xla'")
        return fits and (self.decode_impl == "pallas" or runtime.backend() == "gpu")

    @staticmethod
    def cache_slots(cache) -> int:
        return cache["k"].shape[-1]  # (B, K, hd, S), with a leading layer axis when stacked

    def init_cache(self, batch_size: int, max_len: int, dtype):
        shape = (batch_size, self.n_kv_head, self.head_dim, max_len)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
