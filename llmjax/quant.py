"""int8 weight-only quantization for inference (`--quantize int8` in sample, evaluate and bench).

Every matmul weight - the `kernel` of each dense layer, the MoE experts' `w_in`/`w_out`, the
Linformer's position projections `proj_k`/`proj_v` - is stored as int8 with one float32 scale per
output channel (symmetric: scale = max |w| over the contracted axis / 127, q = round(w / scale)).
With `embeddings=True` the token table is quantized too, one scale per row (its rows are looked up
and it is the tied output head, which contracts over d_model). The MoE router stays in float (a
rounding there changes which experts a token sees), as do norms, biases, positions and the SSM's
recurrence parameters.

`Int8LM(model)` wraps any llmjax model and follows its calling convention: each call dequantizes the
weights to the compute dtype inside the caller's jitted computation (int8 is what sits in memory
and what a decode step reads), then runs the original model. The rounding is bounded:
|w - dequant(q)| <= scale / 2 per element (tests/test_quant.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# leaf name -> the axis the matmul contracts (scales are per slice of the other axes)
CONTRACTED = {"kernel": -2, "w_in": -2, "w_out": -2, "proj_k": -1, "proj_v": -1}
FLOAT_MODULES = ("router",)
MODES = ("none", "int8")


class QuantWeight(nnx.Variable):
    """An inference-only weight of a quantized model (int8 values, their scales, or a float leaf)."""


def quantize_array(w, axis: int):
    """(int8 values, float32 scales with the contracted axis kept as 1)."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, scale


def _names(path) -> list:
    return [getattr(k, "key", getattr(k, "idx", None)) for k in path]


def quantize_params(params: dict, *, embeddings: bool = False, compute_dtype=jnp.float32) -> dict:
    """A pure-dict parameter tree with every matmul weight as {'q': int8, 'scale': float32}; other
    leaves as in `sample.inference_params` (the unquantized token table in the compute dtype)."""

    def leaf(path, x):
        names = _names(path)
        name = names[-1]
        if name in CONTRACTED and not any(m in names for m in FLOAT_MODULES) and x.ndim >= 2:
            q, scale = quantize_array(x, CONTRACTED[name])
            return {"q": q, "scale": scale}
        if names[-2:] == ["embed", "embedding"]:
            if embeddings:
                q, scale = quantize_array(x, -1)
                return {"q": q, "scale": scale}
            return jnp.asarray(x).astype(compute_dtype)
        return x

    return jax.tree_util.tree_map_with_path(leaf, params)


def _is_quantized(x) -> bool:
    return isinstance(x, dict) and set(x) == {"q", "scale"}


def dequantize_params(qparams: dict, dtype) -> dict:
    """The float tree back: q * scale, computed in float32 and rounded once to `dtype`, for the
    quantized leaves. (Rounding the scale to float16 first lost up to 7e-3 of a channel whose
    largest weight is below ~7.7e-3: float16's subnormals; bfloat16 rounded twice.)"""
    return jax.tree.map(lambda x: (x["q"].astype(jnp.float32) * x["scale"].astype(jnp.float32)).astype(dtype) if _is_quantized(x) else x,
                        qparams, is_leaf=_is_quantized)


class Int8LM(nnx.Module):
    """A quantized copy of an llmjax model with the same calling convention (see module docstring)."""

    def __init__(self, model, *, embeddings: bool = False):
        self.cfg = model.cfg
        self.quantized_embeddings = embeddings
        self.graphdef = nnx.graphdef(model)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        q = quantize_params(params, embeddings=embeddings, compute_dtype=model.cfg.compute_dtype)
        self.weights = nnx.data(jax.tree.map(QuantWeight, q))

    def _float_model(self):
        pure = jax.tree.map(lambda v: v[...], self.weights, is_leaf=lambda x: isinstance(x, nnx.Variable))
        return nnx.merge(self.graphdef, dequantize_params(pure, self.cfg.compute_dtype))

    def __call__(self, tokens_BT, *, positions=None, cache=None):
        return self._float_model()(tokens_BT, positions=positions, cache=cache)

    def features(self, tokens_BT, *, positions=None, cache=None):
        return self._float_model().features(tokens_BT, positions=positions, cache=cache)

    def head(self, x_BTD):
        return self._float_model().head(x_BTD)

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype=None):
        return self._float_model().init_cache(batch_size, max_len, dtype)


def weight_bytes(model) -> int:
    """Bytes of a model's parameters as held in memory (int8 + scales for a quantized one)."""
    return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))


def apply(model, mode: str | None, *, embeddings: bool = False):
    """`model` itself for mode None/'none', else its Int8LM."""
    if mode in (None, "", "none"):
        return model
    if mode != "int8":
        raise ValueError(f"--quantize must be one of {', '.join(MODES)}, got {mode!r}")
    return Int8LM(model, embeddings=embeddings)
