"""A decoded token's layer norms as one fused GPU kernel each (Pallas, Triton), the residual add
before the second one included (and the bias of the layer whose output it adds: the attention's
output projection, which XLA would otherwise add in a kernel of its own).

XLA compiles each LayerNorm / RMSNorm of a decode step into two kernels: a reduction for the row's
statistics (with the residual add before it fused in), then the normalisation, which reads the row
again. With one token per row the rows are tiny (GPT-2 small: 768 values), so each kernel costs its
launch, not its bytes: compiled for an H200 (llmjax.aot) they are 4 of a decode layer's 11 kernels.
Here one program per row loads the row (`chunk` values at a time, kept in registers), sums x and x^2
in float32, and writes the normalised row (and, for `add_norm`, the residual sum) once.

Numerics as flax's nnx.LayerNorm / nnx.RMSNorm (statistics in float32, the fast variance
E[x^2] - E[x]^2, scale and bias rounded to the layer's dtype as flax rounds them, then applied in
float32, the result cast to the layer's dtype); the residual sum is rounded to its dtype before it
is normalised, as `norm(x + h)` does. Only the order of float32 additions differs. On a CPU (tests, `model.decode_norm_impl='pallas'`) it runs in Pallas'
interpreter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def chunk_size(D: int) -> int | None:
    """Values per load for rows of D: the largest power of two dividing D, at most 1024 and at least
    16 (None: unsupported), in at most 16 chunks."""
    c = 1024
    while c >= 16 and D % c:
        c //= 2
    return c if c >= 16 and D // c <= 16 else None


def unmet(D: int) -> list[str]:
    """What the kernel needs of rows of D values that they lack (none: it takes them)."""
    return [] if chunk_size(D) is not None else [f"d_model a multiple of 16 (at most 16 x 1024), got {D}"]


def supports(norm, D: int) -> bool:
    """Whether `norm` (a model's norm layer) can run as the kernel on rows of D values."""
    return isinstance(norm, (nnx.LayerNorm, nnx.RMSNorm)) and chunk_size(D) is not None and norm.feature_axes == -1


def _decode_norm_kernel(*refs, rms: bool, eps: float, has_delta: bool, has_delta_bias: bool, has_bias: bool, chunk: int, D: int, param_dtype):
    it = iter(refs)
    x_ref = next(it)
    delta_ref = next(it) if has_delta else None
    delta_bias_ref = next(it) if has_delta_bias else None
    scale_ref = next(it)
    bias_ref = next(it) if has_bias else None
    sum_ref = next(it) if has_delta else None
    y_ref = next(it)
    r = pl.program_id(0)
    rows = []
    for c in range(D // chunk):
        part = pl.ds(c * chunk, chunk)
        v = x_ref[r, part]
        if has_delta:  # the residual sum, rounded to its dtype (as x + h), then normalised
            h = delta_ref[r, part]
            if has_delta_bias:  # h's layer's bias, in h's dtype (as that layer adds it)
                h = (h.astype(jnp.float32) + delta_bias_ref[part].astype(h.dtype).astype(jnp.float32)).astype(h.dtype)
            v = (v.astype(jnp.float32) + h.astype(jnp.float32)).astype(sum_ref.dtype)
            sum_ref[r, part] = v
        rows.append(v.astype(jnp.float32))
    mean2 = sum(jnp.sum(v * v) for v in rows) / D
    if rms:
        mean, mul = jnp.float32(0.0), jax.lax.rsqrt(mean2 + eps)
    else:
        mean = sum(jnp.sum(v) for v in rows) / D
        mul = jax.lax.rsqrt(jnp.maximum(mean2 - mean * mean, 0.0) + eps)  # (flax's fast variance, clipped at 0 too)
    for c, v in enumerate(rows):
        part = pl.ds(c * chunk, chunk)
        y = (v - mean) * (mul * scale_ref[part].astype(param_dtype).astype(jnp.float32))
        if has_bias:
            y = y + bias_ref[part].astype(param_dtype).astype(jnp.float32)
        y_ref[r, part] = y.astype(y_ref.dtype)


@functools.partial(jax.jit, static_argnames=("rms", "eps", "dtype", "param_dtype", "interpret"))
def decode_norm_rows(x, delta, scale, bias, *, rms: bool, eps: float, dtype, interpret: bool, delta_bias=None, param_dtype=None):
    """`scale` and `bias` are rounded to `param_dtype` (if any) inside the kernel: rounded by XLA
    before it, in a decode loop each would be a kernel of its own per token (XLA does not hoist
    them out of the loop), 4 per layer."""
    R, D = x.shape
    assert delta_bias is None or delta is not None
    args = [x] + [a for a in (delta, delta_bias) if a is not None] + [scale] + ([bias] if bias is not None else [])
    outs = ([jax.ShapeDtypeStruct((R, D), jnp.result_type(x, delta))] if delta is not None else []) + [jax.ShapeDtypeStruct((R, D), dtype)]
    return pl.pallas_call(
        functools.partial(_decode_norm_kernel, rms=rms, eps=eps, has_delta=delta is not None,
                          has_delta_bias=delta_bias is not None, has_bias=bias is not None, chunk=chunk_size(D), D=D,
                          param_dtype=jnp.dtype(param_dtype or jnp.float32)),
        out_shape=tuple(outs),
        grid=(R,),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(*args)


def _params(norm, D: int):
    """(is it an RMSNorm, its scale (ones where it has none), its bias or None, the dtype the kernel
    rounds them to first, as flax's layer rounds them: `promote_dtype` with the layer's dtype, so a
    bfloat16 layer multiplies by the bfloat16 scale and adds the bfloat16 bias, in float32)."""
    rms = isinstance(norm, nnx.RMSNorm)
    scale = norm.scale[...] if norm.scale is not None else jnp.ones((D,), jnp.float32)
    bias = None if rms or norm.bias is None else norm.bias[...]
    return rms, scale, bias, norm.dtype


def norm(norm_layer, x_BTD, *, interpret: bool):
    """norm_layer(x) (an nnx.LayerNorm or nnx.RMSNorm over the last axis) as one kernel."""
    B, T, D = x_BTD.shape
    rms, scale, bias, param_dtype = _params(norm_layer, D)
    (y,) = decode_norm_rows(x_BTD.reshape(B * T, D), None, scale, bias, rms=rms, eps=float(norm_layer.epsilon),
                 dtype=jnp.dtype(norm_layer.dtype or x_BTD.dtype), interpret=interpret, param_dtype=param_dtype)
    return y.reshape(B, T, D)


def add_norm(norm_layer, x_BTD, h_BTD, *, interpret: bool, h_bias=None):
    """(x + h, norm_layer(x + h)) as one kernel; with `h_bias` (h's layer's bias, not yet added:
    layers.linear_without_bias), h + h_bias in h's dtype takes h's place."""
    B, T, D = x_BTD.shape
    rms, scale, bias, param_dtype = _params(norm_layer, D)
    s, y = decode_norm_rows(x_BTD.reshape(B * T, D), h_BTD.reshape(B * T, D), scale, bias, rms=rms, eps=float(norm_layer.epsilon),
                 dtype=jnp.dtype(norm_layer.dtype or jnp.result_type(x_BTD, h_BTD)), interpret=interpret, delta_bias=h_bias,
                 param_dtype=param_dtype)
    return s.reshape(B, T, D), y.reshape(B, T, D)
