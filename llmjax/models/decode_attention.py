"""One decoded token's attention step as one fused GPU kernel (Pallas, Triton): add the projection's
bias, write the token's key and value into the decode cache, attend over the row's visible slots.

XLA runs this step (`attention.write_cache` twice, then `attention.cached_attention`) as several
kernels per layer: the bias add of the fused query-key-value projection, one scatter per cache, the
query-key product with the softmax, the probability-value product; and those read all S cache slots
whatever the row's position. Compiled for an H200 (llmjax.aot), GPT-2 small decoding spends 14
kernels per layer and token, 6 of them here; at batch 64 the attention products' roofline is half
of the step's (session 11's profile measured 36% of the step there).

This kernel is flash decoding without the split: one program per (row b, key/value head h). It
reads the new key and value (plus bias) where the projection wrote them, stores them at the row's
position in the caches (updated in place: the caches are aliased to the outputs), then walks the
slots before that position `block` at a time with the online softmax in float32 registers (running
max, running sum, unnormalised output), adds the new token from registers (it never reads back what
it wrote), and writes the outputs of the head's G query heads. Each query is a vector, so its
products with a block of keys (hd, block) or values are elementwise products and sums (a Triton
matrix product needs 16 rows; XLA's own decode does the same). The caches stay (B, K, hd, S).

Numerics as the XLA path: bias added in float32 and rounded to the projection's dtype, keys and
values rounded to the cache dtype, logits and softmax in float32, the value product accumulated in
float32. One difference beyond the order of float32 additions: the online softmax rounds each
probability to the cache dtype before it is normalised (exp(logit - running max), divided by the sum
at the end), where XLA rounds the normalised probability; in float32 nothing changes, in bfloat16
cached decoding ends 0.6-1.2% of the logit scale from the full forward (tiny models, weights x3-x5),
as flash attention's forward (cuDNN's on a GPU) differs from XLA's.
A padding token (position < 0) writes nothing and attends to slot 0 only, as `visible_mask` says;
one at or past the cache's S slots (unchecked under jit) writes nothing and attends to all S, as
XLA's path does (before, past S the loop read a block beyond the cache: on a GPU memory
after it, in the interpreter the last block again).
On a CPU (tests, `model.decode_attention_impl='pallas'`) it runs in Pallas' interpreter.

`latent_decode_attention` is the same step for MLA's absorbed attention: one program per (row, query
head), every head reading the cached latents (B, S, r) as its keys and values and the shared rotary
keys (B, S, p) for the rest of its logits; head 0 writes the token's latent and rotary key. XLA's
path (mla.MultiHeadLatentAttention._absorbed_attention) took about 10 kernels a layer for it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MAX_GROUP = 16  # query heads per key/value head the kernel takes (each is unrolled in it)


def block_slots(S: int) -> int | None:
    """Slots per loop step for a cache of S slots: 64, 32 or 16 dividing S (None: unsupported)."""
    return next((b for b in (64, 32, 16) if S % b == 0), None)


def unmet(head_dim: int, group: int, S: int | None) -> list[str]:
    """What the kernel needs of these shapes that they lack (none: it takes them): head_dim a power
    of two >= 16, at most 16 query heads per key/value head, S a multiple of 16 (None: not checked)."""
    return [need for ok, need in (
        (head_dim >= 16 and head_dim & (head_dim - 1) == 0, f"head_dim a power of two >= 16 (got {head_dim})"),
        (1 <= group <= MAX_GROUP, f"at most {MAX_GROUP} query heads per key/value head (got {group})"),
        (S is None or block_slots(S) is not None, f"a cache a multiple of 16 slots (got {S})"),
    ) if not ok]


def supported(head_dim: int, group: int, S: int) -> bool:
    """Whether the kernel takes these shapes (`unmet` says what it lacks)."""
    return not unmet(head_dim, group, S)


def _decode_attention_kernel(pos_ref, q_ref, k_ref, v_ref, *rest, offsets, group: int, scale: float, block: int, has_bias: bool):
    """Row b, key/value head h (see the module docstring)."""
    bias_ref, (kc_ref, vc_ref, o_ref, kc_out, vc_out) = (rest[0], rest[1:]) if has_bias else (None, rest)
    b, h = pl.program_id(0), pl.program_id(1)
    pos = pos_ref[b]
    q_off, k_off, v_off = offsets
    S = kc_ref.shape[3]

    def head(ref, i):
        """Head i of the projection's output for this row, bias added, in float32 after rounding to
        the projection's dtype (as the XLA path's add in that dtype)."""
        x = ref[b, i, :]
        if has_bias:  # the bias as stored, rounded to the projection's dtype first (as nnx.Linear)
            x = (x.astype(jnp.float32) + bias_ref[i, :].astype(x.dtype).astype(jnp.float32)).astype(x.dtype)
        return x.astype(jnp.float32)

    cache_dtype = kc_ref.dtype
    new_k = head(k_ref, k_off + h).astype(cache_dtype)
    new_v = head(v_ref, v_off + h).astype(cache_dtype)
    live = (pos >= 0) & (pos < S)  # a padding token (or one past the cache) writes nothing
    write = jnp.full(new_k.shape, live)
    plgpu.store(kc_out.at[b, h, :, jnp.maximum(pos, 0)], new_k, mask=write)
    plgpu.store(vc_out.at[b, h, :, jnp.maximum(pos, 0)], new_v, mask=write)
    new_k, new_v = new_k.astype(jnp.float32), new_v.astype(jnp.float32)

    qs = [head(q_ref, q_off + h * group + g) * scale for g in range(group)]  # (hd,) each
    # slots read from the cache: those before the token (padding: slot 0; a position past the cache, which only
    # an unchecked jitted call gives: all S, as XLA's path, never a block past the cache's end)
    cached = jnp.minimum(jnp.where(pos >= 0, pos, 1), S)
    lanes = jnp.arange(block)

    def step(i, carry):
        visible = i * block + lanes < cached
        keys = kc_ref[b, h, :, pl.ds(i * block, block)].astype(jnp.float32)  # (hd, block)
        values = vc_ref[b, h, :, pl.ds(i * block, block)].astype(jnp.float32)
        new = []
        for q, (out, run_max, run_sum) in zip(qs, carry):
            logits = jnp.where(visible, jnp.sum(q[:, None] * keys, axis=0), -jnp.inf)  # (block,)
            new_max = jnp.maximum(run_max, jnp.max(logits))
            probs = jnp.exp(logits - new_max)  # 0 where not visible
            correction = jnp.exp(run_max - new_max)
            pv = jnp.sum(probs.astype(cache_dtype).astype(jnp.float32)[None, :] * values, axis=1)
            new.append((out * correction + pv, new_max, run_sum * correction + jnp.sum(probs)))
        return tuple(new)

    init = tuple((jnp.zeros(q.shape, jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0.0)) for q in qs)
    final = jax.lax.fori_loop(0, pl.cdiv(cached, block), step, init)
    for g, (q, (out, run_max, run_sum)) in enumerate(zip(qs, final)):
        logit = jnp.where(live, jnp.sum(q * new_k), -jnp.inf)  # the new token itself
        new_max = jnp.maximum(run_max, logit)
        p, correction = jnp.exp(logit - new_max), jnp.exp(run_max - new_max)
        out = out * correction + p.astype(cache_dtype).astype(jnp.float32) * new_v
        o_ref[b, h, g, :] = (out / (run_sum * correction + p)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("offsets", "n_head", "scale", "interpret"))
def decode_attention(q_src, k_src, v_src, bias, k_cache, v_cache, positions_B, *, offsets: tuple[int, int, int],
                     n_head: int, scale: float | None = None, interpret: bool = False):
    """One token per row: write its key and value into the caches (B, K, hd, S) at positions[b]
    and attend over slots 0..positions[b]. The token's query heads are heads offsets[0] ..
    offsets[0] + n_head - 1 of q_src (B, N, hd) (query head k * G + g belongs to key/value head k,
    G = n_head / K), its key and value heads K heads from offsets[1] of k_src and offsets[2] of
    v_src: the three may be one array, the fused projection's output, read where it lies. `bias`
    (N, hd) or None, rounded to q_src's dtype, is added to every head read (the projection's bias,
    not yet added). Returns
    (out (B, K, G, hd) in q_src's dtype, k_cache, v_cache)."""
    B, K, d, S = k_cache.shape
    G = n_head // K
    if n_head % K or not supported(d, G, S):
        raise ValueError(f"decode_attention: head_dim {d}, {n_head} query heads for {K} key/value heads, {S} slots are not supported")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    args = [positions_B.astype(jnp.int32), q_src, k_src, v_src] + ([bias] if bias is not None else []) + [k_cache, v_cache]
    out, k_cache, v_cache = pl.pallas_call(
        functools.partial(_decode_attention_kernel, offsets=offsets, group=G, scale=scale, block=block_slots(S), has_bias=bias is not None),
        out_shape=(jax.ShapeDtypeStruct((B, K, G, d), q_src.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        grid=(B, K),
        input_output_aliases={len(args) - 2: 1, len(args) - 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(*args)
    return out, k_cache, v_cache


# --- multi-head latent attention (mla): one decoded token against the cached latents ----------------


def latent_unmet(rank: int, rope_dim: int, S: int | None) -> list[str]:
    """What the latent kernel needs of these shapes that they lack: the latent's width and the
    rotary key's powers of two (Triton's block shapes), S a multiple of 16 (None: not checked)."""
    return [need for ok, need in (
        (rank >= 16 and rank & (rank - 1) == 0, f"kv_lora_rank a power of two >= 16 (got {rank})"),
        (rope_dim >= 1 and rope_dim & (rope_dim - 1) == 0, f"qk_rope_dim a power of two (got {rope_dim})"),
        (S is None or block_slots(S) is not None, f"a cache a multiple of 16 slots (got {S})"),
    ) if not ok]


def _latent_attention_kernel(pos_ref, q_ref, qkr_ref, c_new_ref, *rest, scale: float, block: int, narrow, norm):
    """Row b, query head h: as `_decode_attention_kernel`, with one key/value head shared by every
    query head (the latent c, (S, r), both key and value; the rotary key (S, p) adds to the logits).
    Head 0 writes the token's latent and rotary key; every head reads only the slots before it.
    With `norm` (eps, its dtype, its scale's dtype), the token's latent is first RMS-normalised (the
    next ref holds the norm's scale), as decode_norm's kernel does it."""
    norm_scale_ref, (c_ref, kr_ref, o_ref, c_out, kr_out) = (rest[0], rest[1:]) if norm else (None, rest)
    b, h = pl.program_id(0), pl.program_id(1)
    pos = pos_ref[b]
    S, r = c_ref.shape[1], c_ref.shape[2]
    cache_dtype = c_ref.dtype
    new_c = c_new_ref[b, pl.ds(0, r)]  # (c_new may hold more after the latent: kv_down's output, read where it lies)
    if norm:  # statistics in float32, the scale rounded to its dtype, the result to the norm's (as flax's RMSNorm)
        eps, norm_dtype, param_dtype = norm
        x = new_c.astype(jnp.float32)
        mul = jax.lax.rsqrt(jnp.sum(x * x) / r + eps)
        new_c = (x * (mul * norm_scale_ref[...].astype(param_dtype).astype(jnp.float32))).astype(norm_dtype)
    new_c = new_c.astype(cache_dtype)
    new_kr = qkr_ref[b, q_ref.shape[1], :].astype(cache_dtype)  # (the rotary key: after the H queries')
    live = (pos >= 0) & (pos < S)  # a padding token (or one past the cache) writes nothing
    plgpu.store(c_out.at[b, jnp.maximum(pos, 0), :], new_c, mask=jnp.full(new_c.shape, live & (h == 0)))
    plgpu.store(kr_out.at[b, jnp.maximum(pos, 0), :], new_kr, mask=jnp.full(new_kr.shape, live & (h == 0)))

    def latent(x):  # the latent as the products take it: under model.matmul_dtype rounded to it first
        return (x if narrow is None else x.astype(narrow)).astype(jnp.float32)

    new_c, new_kr = latent(new_c), new_kr.astype(jnp.float32)
    q = q_ref[b, h, :].astype(jnp.float32) * scale  # (r,)
    qr = qkr_ref[b, h, :].astype(jnp.float32) * scale  # (p,)
    cached = jnp.minimum(jnp.where(pos >= 0, pos, 1), S)  # (as `_decode_attention_kernel`'s)
    lanes = jnp.arange(block)

    def step(i, carry):
        out, run_max, run_sum = carry
        visible = i * block + lanes < cached
        c = latent(c_ref[b, pl.ds(i * block, block), :])  # (block, r)
        kr = kr_ref[b, pl.ds(i * block, block), :].astype(jnp.float32)  # (block, p)
        logits = jnp.where(visible, jnp.sum(c * q[None, :], axis=1) + jnp.sum(kr * qr[None, :], axis=1), -jnp.inf)
        new_max = jnp.maximum(run_max, jnp.max(logits))
        probs = jnp.exp(logits - new_max)  # 0 where not visible
        correction = jnp.exp(run_max - new_max)
        pv = jnp.sum(probs.astype(cache_dtype).astype(jnp.float32)[:, None] * c, axis=0)  # (r,)
        return out * correction + pv, new_max, run_sum * correction + jnp.sum(probs)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.float32(-jnp.inf), jnp.float32(0.0))
    out, run_max, run_sum = jax.lax.fori_loop(0, pl.cdiv(cached, block), step, init)
    logit = jnp.where(live, jnp.sum(q * new_c) + jnp.sum(qr * new_kr), -jnp.inf)  # the new token itself
    new_max = jnp.maximum(run_max, logit)
    p, correction = jnp.exp(logit - new_max), jnp.exp(run_max - new_max)
    out = out * correction + p.astype(cache_dtype).astype(jnp.float32) * new_c
    o_ref[b, h, :] = (out / (run_sum * correction + p)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "narrow", "norm_eps", "norm_dtype", "norm_param_dtype", "interpret"))
def latent_decode_attention(q_lat, qk_rope, c_new, c_cache, kr_cache, positions_B, *, scale: float, narrow=None,
                            norm_scale=None, norm_eps: float = 1e-6, norm_dtype=None, norm_param_dtype=None,
                            interpret: bool = False):
    """MLA's absorbed attention for one token per row: write its latent c_new (B, r) and rotary key
    (qk_rope[:, H], (B, p)) into the caches (B, S, r) and (B, S, p) at positions[b], and attend with
    the absorbed queries q_lat (B, H, r) (W_uk folded in) and the rotary queries qk_rope[:, :H]
    over slots 0..positions[b]: softmax(scale (q_lat c + q_rope k_rope)) c, the latent attended
    (W_uv still to apply), in q_lat's dtype, with the caches: (out (B, H, r), c_cache, kr_cache).
    (The rotary queries and key come as one array (B, H + 1, p), rotated in one kernel, read where
    they lie.) `narrow` (model.matmul_dtype) rounds the latents as the products' operands.
    With `norm_scale` (r,), c_new is the latent before its RMSNorm (eps `norm_eps`, output in
    `norm_dtype`, the scale rounded to `norm_param_dtype` first, as flax's nnx.RMSNorm), normalised
    in the kernel: XLA made that norm two kernels a layer. c_new may be wider than r (B, r + ...):
    its first r values are the latent (kv_down's output, read where it lies)."""
    B, H, r = q_lat.shape
    S, p = c_cache.shape[1], kr_cache.shape[2]
    if latent_unmet(r, p, S) or qk_rope.shape != (B, H + 1, p) or c_new.shape[0] != B or c_new.shape[1] < r:
        raise ValueError(f"latent_decode_attention: kv_lora_rank {r}, qk_rope_dim {p}, {S} slots, rotary parts {qk_rope.shape}, "
                         f"latents {c_new.shape} are not supported")
    block = next(b for b in (32, 16) if S % b == 0)  # (a (block, r) tile of latents in registers)
    norm = None
    if norm_scale is not None:
        norm = (float(norm_eps), jnp.dtype(norm_dtype or c_new.dtype), jnp.dtype(norm_param_dtype or jnp.float32))
    args = [positions_B.astype(jnp.int32), q_lat, qk_rope, c_new] + ([norm_scale] if norm else []) + [c_cache, kr_cache]
    return pl.pallas_call(
        functools.partial(_latent_attention_kernel, scale=scale, block=block, narrow=narrow, norm=norm),
        out_shape=(jax.ShapeDtypeStruct((B, H, r), q_lat.dtype), jax.ShapeDtypeStruct(c_cache.shape, c_cache.dtype),
                   jax.ShapeDtypeStruct(kr_cache.shape, kr_cache.dtype)),
        grid=(B, H),
        input_output_aliases={len(args) - 2: 1, len(args) - 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
    )(*args)
