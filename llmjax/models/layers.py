"""Shared building blocks: dense layers, norms, MLPs, rotary embeddings, the tied embedding/head,
the layer stack (scanned or unrolled, with rematerialisation) and the decoder skeleton.

Shape letters: B batch, T query length, S key length, D model, H heads, K kv heads, F ffn, V vocab,
L layers. Parameters are float32; compute runs in `cfg.compute_dtype`; norm statistics, softmax,
logits and the loss are float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax import runtime
from llmjax.config import ConfigError, ModelConfig
from llmjax.models import decode_norm

# Logit given to padded vocabulary rows: exp() of it underflows to exactly 0 in float32.
PADDED_LOGIT = -1e9

Cache = Any  # an architecture's decode-state pytree (dicts of arrays), or None


def normal(std: float):
    return nnx.initializers.normal(std)


def residual_std(cfg: ModelConfig) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layer)


# ---------------------------------------------------------------------------------------------
# Parameter matmuls with narrow operands (model.matmul_dtype)


def dot32(spec: str, a, b):
    """einsum of two narrow arrays, accumulated and returned in float32. XLA's CPU runtime has no
    narrow x narrow -> float32 kernel for dots with batch axes (an index in all three operands):
    there the rounded operands are widened first, which gives the same numbers (a product of two
    bfloat16 values is exact in float32), at the float32 speed."""
    inputs, out = spec.split("->")
    x, y = inputs.split(",")
    if runtime.backend() == "cpu" and any(i in x and i in y for i in out):
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _narrow_einsum(spec: str, x, w, dtype):
    return dot32(spec, x.astype(dtype), w.astype(dtype))


def _narrow_einsum_fwd(spec, x, w, dtype):
    xn, wn = x.astype(dtype), w.astype(dtype)
    # (zero-size arrays carry the operands' own dtypes to the backward pass)
    residuals = (xn, wn, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))
    return dot32(spec, xn, wn), residuals


def _narrow_einsum_bwd(spec, dtype, residuals, g):
    xn, wn, x_like, w_like = residuals
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    gn = g.astype(dtype)
    dx = dot32(f"{out},{b}->{a}", gn, wn)
    dw = dot32(f"{a},{out}->{b}", xn, gn)
    return dx.astype(x_like.dtype), dw.astype(w_like.dtype)


_narrow_einsum.defvjp(_narrow_einsum_fwd, _narrow_einsum_bwd)


def narrow_matmul(spec: str, x, w, dtype):
    """`einsum(spec, x, w)` of an activation x and a parameter w with both operands rounded to
    `dtype` (bfloat16), accumulated and returned in float32. The backward pass rounds the incoming
    gradient to `dtype` as well and returns float32-accumulated gradients for x and w (the usual
    mixed-precision rule), so all three products run as narrow x narrow -> float32 dots: on the CPU
    (jaxlib 0.11, AVX-512 BF16) about 1.7x the float32 rate, where a dot that rounds its result to
    bfloat16 is several times slower than float32. `spec` is a plain or batched matrix product (each
    index in two of the three operands, or in all three for a batch axis), so the gradients are
    einsums too."""
    inputs, out = spec.split("->")
    a, b = inputs.split(",")
    ops = (a, b, out)
    if not all(o.isalpha() and len(set(o)) == len(o) for o in ops) or any(sum(i in o for o in ops) < 2 for i in a + b + out):
        raise ValueError(f"narrow_matmul: every index of '{spec}' must appear in two or three operands, once each (no '...')")
    return _narrow_einsum(spec, x, w, jnp.dtype(dtype))


def param_einsum(spec: str, x, w, compute_dtype, narrow_dtype=None):
    """A parameter matmul with a float32 result: operands in `narrow_dtype` when given (the model's
    `cfg.narrow_matmuls`), else in the compute dtype. With 16-bit operands either way it goes
    through `narrow_matmul`, whose backward pass rounds the incoming float32 gradient to the operand
    dtype: a plain `einsum(..., preferred_element_type=float32)` would instead widen the weights to
    float32 for its two gradient products (JAX's transpose of a mixed-precision dot), which on a
    GPU runs them as tf32 GEMMs at about half the bf16 rate (measured on an H200: the tied head's two
    backward products took 7.8 ms of a 39 ms `vanilla` step at batch 16, against 1.7 ms for its
    bf16 forward product; docs/benchmarks.md)."""
    if narrow_dtype is not None:
        return narrow_matmul(spec, x, w, narrow_dtype)
    if jnp.dtype(compute_dtype).itemsize < 4:
        return narrow_matmul(spec, x, w, compute_dtype)
    return jnp.einsum(spec, x.astype(compute_dtype), w.astype(compute_dtype), preferred_element_type=jnp.float32)


def _narrow_dot_general(dtype, x, w, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    """nnx.Linear's contraction (x's last axis with the kernel's first) through `narrow_matmul`;
    the result comes back in x's dtype (the compute dtype)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if tuple(lhs_contract) != (x.ndim - 1,) or tuple(rhs_contract) != (0,) or lhs_batch or rhs_batch or w.ndim != 2:
        raise ValueError(f"narrow matmuls support Linear's plain contraction only, got {dimension_numbers}")
    lead = "abcdefgh"[: x.ndim - 1]  # (no reshape: leading axes keep their sharding)
    return narrow_matmul(f"{lead}y,yz->{lead}z", x, w, dtype).astype(x.dtype)


def dense(
    cfg: ModelConfig, d_in: int, d_out: int, *, rngs: nnx.Rngs, bias: bool = False, std: float | None = None, narrow: bool = True,
    float32: bool = False,
):
    """A Linear layer in the compute dtype; its matmul takes `model.matmul_dtype` operands when set
    (unless `narrow=False`). `float32=True`: operands and product in float32 whatever the compute
    dtype (the MoE router: its top-k choices are made from float32 logits), at HIGHEST precision,
    forward and backward: on a GPU the default precision runs a float32 product as a tf32 GEMM,
    rounding its operands to 10-bit mantissas."""
    narrow_dtype = cfg.narrow_matmuls if narrow and not float32 else None
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=bias,
        dtype=jnp.float32 if float32 else cfg.compute_dtype,
        param_dtype=jnp.float32,
        kernel_init=normal(cfg.init_std if std is None else std),
        bias_init=nnx.initializers.zeros_init(),
        dot_general=jax.lax.dot_general if narrow_dtype is None else functools.partial(_narrow_dot_general, narrow_dtype),
        precision=jax.lax.Precision.HIGHEST if float32 else None,
        rngs=rngs,
    )


def linear_without_bias(layer: nnx.Linear, x):
    """(x @ kernel, bias) of a `dense` layer, the product computed as nnx.Linear computes it (its
    dtype promotion and dot_general), the bias (or None) as stored, not yet added nor cast to the
    layer's dtype: for a kernel that does both where it reads the product (models/decode_attention;
    a cast outside it would be one more GPU kernel per layer and token)."""
    kernel = layer.kernel[...]
    x, kernel = layer.promote_dtype((x, kernel), dtype=layer.dtype)
    kw = {} if layer.preferred_element_type is None else {"preferred_element_type": layer.preferred_element_type}
    y = layer.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision, **kw)
    return y, (layer.bias[...] if layer.bias is not None else None)


def layer_norm(cfg: ModelConfig, d: int, *, rngs: nnx.Rngs, bias: bool = True):
    return nnx.LayerNorm(d, epsilon=cfg.norm_eps, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32, rngs=rngs)


def rms_norm(cfg: ModelConfig, d: int, *, rngs: nnx.Rngs):
    return nnx.RMSNorm(d, epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32, rngs=rngs)


# The feed-forward activations under jax.checkpoint: the backward pass keeps only their inputs (the
# up-projections' products, which it keeps anyway for those products' own gradients, and the bias)
# and recomputes the activation's inner values where it needs them, in the same fused kernel. Without
# it JAX keeps tanh's (or the sigmoid's) output as well, and XLA writes the biased product apart from
# the plain one: for GPT-2 small at batch 16 x 1024, compiled for an H100, 200 MB more written and
# read per layer and step, and 1.2 GB more memory (docs/benchmarks.md). Values are unchanged.
@jax.checkpoint
def biased_gelu(y, bias=None, rows=None):
    """tanh-GELU of y + bias (bias[rows] in y's dtype when `rows` is given: a per-row gather of a
    small table, done inside so that the backward pass keeps the table, not the gathered rows; the
    table gathered, then rounded, so that its gradient, a scatter-add over the rows, sums in the
    table's dtype)."""
    if bias is not None:
        y = y + (bias if rows is None else bias[rows].astype(y.dtype))
    return jax.nn.gelu(y, approximate=True)


@jax.checkpoint
def swiglu(gate, up):
    return jax.nn.silu(gate) * up


class MLP(nnx.Module):
    """GPT-2's feed-forward block: Linear(D, F) -> tanh-GELU -> Linear(F, D), with biases by default."""

    def __init__(self, cfg: ModelConfig, d_ff: int, *, rngs: nnx.Rngs, bias: bool = True):
        self.fc = dense(cfg, cfg.d_model, d_ff, bias=bias, rngs=rngs)
        self.proj = dense(cfg, d_ff, cfg.d_model, bias=bias, std=residual_std(cfg), rngs=rngs)

    def __call__(self, x_BTD):
        y, bias = linear_without_bias(self.fc, x_BTD)  # (the bias added as nnx.Linear adds it: in y's dtype)
        return self.proj(biased_gelu(y, None if bias is None else bias.astype(y.dtype)))


class SwiGLU(nnx.Module):
    """Llama's feed-forward block: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: ModelConfig, d_ff: int, *, rngs: nnx.Rngs):
        self.gate = dense(cfg, cfg.d_model, d_ff, rngs=rngs)
        self.up = dense(cfg, cfg.d_model, d_ff, rngs=rngs)
        self.down = dense(cfg, d_ff, cfg.d_model, std=residual_std(cfg), rngs=rngs)

    def __call__(self, x_BTD):
        return self.down(swiglu(self.gate(x_BTD), self.up(x_BTD)))


def apply_rope(x_BTHd, positions_BT, base: float):
    """Rotary embedding, rotate-half convention (GPT-NeoX / Llama): the pair (x[i], x[i + d/2]) is
    rotated by the angle position * base^(-2i/d). Computed in float32, returned in x's dtype."""
    d = x_BTHd.shape[-1]
    if d % 2:
        raise ValueError(f"rotary dimension must be even, got {d}")
    inv_freq = base ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2 / d)  # (d/2,)
    angles_BTf = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BTf)[:, :, None, :]  # (B, T, 1, d/2)
    sin = jnp.sin(angles_BTf)[:, :, None, :]
    x1, x2 = jnp.split(x_BTHd.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHd.dtype)


class Embedding(nnx.Module):
    """Token embedding whose transpose is the output head (weight tying).

    The table has `padded_vocab_size` rows; logits of rows >= `vocab_size` are set to PADDED_LOGIT,
    so no loss, argmax or sampler ever gives them probability.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.vocab_size = cfg.vocab_size
        self.dtype, self.narrow = cfg.compute_dtype, cfg.narrow_matmuls
        self.embedding = nnx.Param(normal(cfg.init_std)(rngs.params(), (cfg.padded_vocab_size, cfg.d_model), jnp.float32))

    def __call__(self, tokens_BT):
        return jnp.take(self.embedding[...], tokens_BT, axis=0).astype(self.dtype)

    def attend(self, x_BTD):
        return mask_padded_vocab(self.raw_logits(x_BTD), self.vocab_size)

    def raw_logits(self, x_BTD):
        """float32 logits over every row of the table, padding rows unmasked (`loss.token_losses`
        masks them inside its loss)."""
        return param_einsum("btd,vd->btv", x_BTD, self.embedding[...], self.dtype, self.narrow)

    def attend_rows(self, x_BTD, rows_RD, first_row):
        """`attend` against a slice of the table, rows `first_row`.. (a traced offset is fine): the
        same logits as `attend`'s columns there, padded rows masked alike."""
        logits_BTR = param_einsum("btd,vd->btv", x_BTD, rows_RD, self.dtype, self.narrow)
        valid = first_row + jnp.arange(rows_RD.shape[0]) < self.vocab_size
        return jnp.where(valid, logits_BTR, jnp.asarray(PADDED_LOGIT, logits_BTR.dtype))


def mask_padded_vocab(logits, vocab_size: int):
    if logits.shape[-1] == vocab_size:
        return logits
    valid = jnp.arange(logits.shape[-1]) < vocab_size
    return jnp.where(valid, logits, jnp.asarray(PADDED_LOGIT, logits.dtype))


class PositionEmbedding(nnx.Module):
    """GPT-2's learned absolute positions. A position >= context_len gives NaN (jnp.take's fill);
    padding (position < 0) reads position 0."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.compute_dtype
        self.embedding = nnx.Param(normal(cfg.init_std)(rngs.params(), (cfg.context_len, cfg.d_model), jnp.float32))

    def __call__(self, positions_BT):
        return jnp.take(self.embedding[...], jnp.maximum(positions_BT, 0), axis=0).astype(self.dtype)


_REMAT = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nnx.Module):
    """`n_layer` blocks, either stacked and applied with `nnx.scan` (one traced layer: fast compiles)
    or held in an `nnx.List` and applied in a Python loop (unrolled: faster steps on the H100).

    A block is called as `block(x, positions, cache) -> (x, cache)`. The decode cache follows the
    layout: scanned layers take one pytree whose leaves have a leading L axis, unrolled layers a
    tuple of L per-layer pytrees (so a decode step updates each layer's buffers in place).
    """

    def __init__(self, cfg: ModelConfig, make_block: Callable[[nnx.Rngs], nnx.Module], *, rngs: nnx.Rngs):
        self.scan = cfg.scan_layers
        self.n_layer = cfg.n_layer
        self.remat = cfg.remat
        if self.scan:

            @nnx.split_rngs(splits=cfg.n_layer)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def build(rngs):
                return make_block(rngs)

            self.layers = build(rngs)
        else:
            self.layers = nnx.List([make_block(rngs) for _ in range(cfg.n_layer)])

    def __call__(self, x, positions, cache: Cache):
        """-> (x, cache, aux): aux is the mean over layers of each block's auxiliary outputs."""

        # Functional (split/merge + jax.lax.scan / jax.checkpoint) rather than nnx.scan/nnx.remat,
        # so the stack also runs inside a caller's own jax transforms (a decode loop's lax.scan).
        def apply(graphdef, state, x, cache):
            x, cache, aux = nnx.merge(graphdef, state)(x, positions, cache)
            return x, (cache, aux)

        if self.remat != "none":
            apply = jax.checkpoint(apply, policy=_REMAT[self.remat], static_argnums=(0,))
        if self.scan:
            graphdef, state = nnx.split(self.layers)

            def body(x, state_and_cache):
                return apply(graphdef, state_and_cache[0], x, state_and_cache[1])

            x, (cache, aux) = jax.lax.scan(body, x, (state, cache))
            return x, cache, jax.tree.map(lambda a: a.mean(axis=0), aux)
        new_cache, auxes = [], []
        for i, block in enumerate(self.layers):
            graphdef, state = nnx.split(block)
            x, (layer_cache, aux) = apply(graphdef, state, x, None if cache is None else cache[i])
            new_cache.append(layer_cache)
            auxes.append(aux)
        aux = jax.tree.map(lambda *a: sum(a) / len(a), *auxes)
        return x, None if cache is None else tuple(new_cache), aux

    def cache_slots(self, cache: Cache) -> int | None:
        """The positions a decode cache holds (its `max_len`), or None where the mixer's state has
        no slots (a recurrent state; Linformer's bounded summaries)."""
        block = self.layers if self.scan else self.layers[0]
        slots = getattr(block.attn, "cache_slots", None)
        return None if slots is None else slots(cache if self.scan else cache[0])

    def init_cache(self, batch_size: int, max_len: int, dtype) -> Cache:
        block = self.layers if self.scan else self.layers[0]
        one = block.init_cache(batch_size, max_len, dtype)
        if self.scan:
            return jax.tree.map(lambda a: jnp.zeros((self.n_layer, *a.shape), a.dtype), one)
        return tuple(jax.tree.map(jnp.zeros_like, one) for _ in range(self.n_layer))


class PreNormBlock(nnx.Module):
    """A pre-norm residual block: x + attn(norm_1(x)), then x + mlp(norm_2(x)).

    `attn(x, positions, cache) -> (y, cache)` and `attn.init_cache(batch, max_len, dtype)` are the
    mixer's whole contract, so a new token mixer drops in without touching the stack. `mlp(x)`
    returns y, or (y, aux) with a dict of auxiliary outputs (a router's losses and statistics).
    Returns (x, cache, aux).

    `decode_norm_impl` (model.decode_norm_impl): for one decoded token per row, the two norms (the
    second with the residual add before it, and the bias of the mixer's output projection when the
    mixer offers `without_out_bias`) as one fused kernel each (models/decode_norm.py):
    'auto' on a GPU, 'pallas' anywhere (Pallas' interpreter on a CPU), 'xla' never.
    """

    def __init__(self, *, norm_1, attn, norm_2, mlp, decode_norm_impl: str = "xla"):
        self.norm_1, self.attn, self.norm_2, self.mlp = norm_1, attn, norm_2, mlp
        self.decode_norm_impl = decode_norm_impl

    def _fused_norms(self, x_BTD, cache) -> bool:
        if cache is None or x_BTD.shape[1] != 1 or self.decode_norm_impl == "xla":
            return False
        D = x_BTD.shape[2]
        fits = decode_norm.supports(self.norm_1, D) and decode_norm.supports(self.norm_2, D)
        if self.decode_norm_impl == "pallas" and not fits:
            raise ConfigError(f"model.decode_norm_impl='pallas' needs {' and '.join(decode_norm.unmet(D)) or 'LayerNorm or RMSNorm norms'}; "
                              "use 'auto' or 'xla'")
        return fits and (self.decode_norm_impl == "pallas" or runtime.backend() == "gpu")

    def attend(self, x_BTD, positions_BT, cache):
        """(x + attn(norm_1(x)), norm_2 of that, cache): the block up to its feed-forward input."""
        if self._fused_norms(x_BTD, cache):
            interpret = runtime.backend() != "gpu"
            normed = decode_norm.norm(self.norm_1, x_BTD, interpret=interpret)
            if hasattr(self.attn, "without_out_bias"):  # the residual norm's kernel adds that bias
                h_BTD, h_bias, cache = self.attn.without_out_bias(normed, positions_BT, cache)
            else:
                (h_BTD, cache), h_bias = self.attn(normed, positions_BT, cache), None
            x_BTD, normed = decode_norm.add_norm(self.norm_2, x_BTD, h_BTD, h_bias=h_bias, interpret=interpret)
            return x_BTD, normed, cache
        h_BTD, cache = self.attn(self.norm_1(x_BTD), positions_BT, cache)
        x_BTD = x_BTD + h_BTD
        return x_BTD, self.norm_2(x_BTD), cache

    def __call__(self, x_BTD, positions_BT, cache):
        x_BTD, normed, cache = self.attend(x_BTD, positions_BT, cache)
        out = self.mlp(normed)
        out, aux = out if isinstance(out, tuple) else (out, {})
        return x_BTD + out, cache, aux

    def init_cache(self, batch_size: int, max_len: int, dtype):
        return self.attn.init_cache(batch_size, max_len, dtype)


class DecoderLM(nnx.Module):
    """The calling convention every architecture follows (the trainer, sampler and evaluator rely on
    nothing else):

        logits_BTV, cache, aux = model(tokens_BT, positions=None, cache=None)
        cache = model.init_cache(batch_size, max_len, dtype=None)

    - `tokens` int32 (B, T). `positions` int32 (B, T): each token's index in its own sequence
      (default 0..T-1 for every row). Rows may sit at different positions.
    - `logits` float32 (B, T, padded_vocab_size); padded rows are PADDED_LOGIT.
    - Without a cache the call is a causal forward over the T tokens. With a cache (from
      `init_cache`), the tokens' decode state is written at their positions, and each token attends
      to every cached position <= its own: prefill with the prompt, then feed one token per step.
      Positions must be below `max_len`, and below context_len where positions are learned
      (vanilla, gqa, moe, linformer). An eager call with positions past either end is a
      ValueError (`check_positions`); under jit the positions are traced and nothing is checked
      (no device sync in a step): a position past the learned table gives NaN logits for its
      whole row (so the sampler's non-finite check stops), one past the cache writes nothing and
      attends to every slot, which is a wrong result that stays finite. A token at a negative position is padding: it leaves the
      decode state unchanged (its logits are meaningless), so prompts of different lengths are
      prefilled together right-padded with position -1 (recurrent states cannot be rewound, so
      padding must be marked rather than overwritten later).
    - `model(...)` is `model.head(model.features(...)[0])`, the head being the tied token table
      (`model.embed`): the trainer can compute its loss from the features a slice of the vocabulary
      at a time (`train.loss_chunks`).
    - `aux`: a dict of auxiliary losses averaged over layers (empty for dense models; the MoE
      router's), which the trainer adds with `train.aux_loss_weights`; under the key "stats", values
      the trainer only logs (expert load, dropped tokens).

    This skeleton is embed (+ learned positions) -> LayerStack of `block` -> final norm -> tied head.
    Subclasses pick the block and the norm.
    """

    config_class = ModelConfig

    def __init__(self, cfg: ModelConfig, *, make_block, final_norm, learned_positions: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embedding(cfg, rngs=rngs)
        self.pos_embed = PositionEmbedding(cfg, rngs=rngs) if learned_positions else None
        self.blocks = LayerStack(cfg, make_block, rngs=rngs)
        self.norm_f = final_norm(cfg, cfg.d_model, rngs=rngs)

    def __call__(self, tokens_BT, *, positions=None, cache: Cache = None):
        x_BTD, cache, aux = self.features(tokens_BT, positions=positions, cache=cache)
        return self.head(x_BTD), cache, aux

    def features(self, tokens_BT, *, positions=None, cache: Cache = None):
        """Everything but the output head: the final-normed features (B, T, d_model), cache, aux."""
        B, T = tokens_BT.shape
        if positions is None:
            if self.pos_embed is not None and T > self.cfg.context_len:  # (positions past the table: NaN logits)
                raise ValueError(f"{T} tokens per row, but this model's learned positions stop at model.context_len="
                                 f"{self.cfg.context_len}: feed at most {self.cfg.context_len} tokens (keep the last ones)")
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        elif not isinstance(positions, jax.core.Tracer):  # (an eager call; under jit nothing is checked: see the class doc)
            self.check_positions(positions, cache)
        x_BTD = self.embed(tokens_BT)
        if self.pos_embed is not None:
            x_BTD = x_BTD + self.pos_embed(positions)
        x_BTD, cache, aux = self.blocks(x_BTD, positions, cache)
        return self.norm_f(x_BTD), cache, aux

    def check_positions(self, positions_BT, cache: Cache = None) -> None:
        """Refuse, with a ValueError, positions that no result is defined for: at or past
        model.context_len where positions are learned (the table's end), at or past the cache's
        `max_len` in a call with a cache (the slots' end). Rotary and recurrent models have no
        such end without a cache. Reads the positions' values (a device sync for a device array):
        `features` calls it in eager calls only."""
        L = self.cfg.context_len
        slots = None if cache is None else self.blocks.cache_slots(cache)
        if self.pos_embed is None and slots is None:
            return  # (nothing to read)
        hi = int(np.max(np.asarray(positions_BT), initial=-1))
        if self.pos_embed is not None and hi >= L:
            raise ValueError(f"positions reach {hi}, but this model's learned positions stop at model.context_len={L}: keep every "
                             f"position below {L} (feed at most {L} tokens of a sequence, the last ones)")
        if slots is not None and hi >= slots:
            raise ValueError(f"positions reach {hi}, but the cache holds {slots} positions (init_cache(batch_size, max_len={slots})): "
                             f"keep every position below {slots}, or make the cache with a larger max_len (at most context_len={L})")

    def head(self, x_BTD):
        """Logits (float32, padded rows masked) of final-normed features: the tied output head."""
        return self.embed.attend(x_BTD)

    def init_cache(self, batch_size: int, max_len: int | None = None, dtype=None) -> Cache:
        """Zeroed decode state for `batch_size` sequences of up to `max_len` (default context_len)
        tokens, in `dtype` (default the compute dtype; a recurrent state may stay float32)."""
        max_len = self.cfg.context_len if max_len is None else max_len
        return self.blocks.init_cache(batch_size, max_len, dtype or self.cfg.compute_dtype)

    @classmethod
    def mixer_params(cls, cfg: ModelConfig, params: dict) -> int:
        """Parameters whose FLOPs `mixer_flops_per_token` counts (so not 6 per parameter and token as
        well, in llmjax.summary's flops_per_token): none here."""
        return 0

    @classmethod
    def mixer_flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> int:
        """Forward FLOPs per token that no parameter accounts for: attention scores Q.K^T and the
        weighted sum of V, 2 * seq_len * n_head * head_dim each per layer, counted over the full
        `seq_len` keys as nanoGPT and PaLM do. Architectures with another mixer override this."""
        return cfg.n_layer * 2 * seq_len * cfg.n_head * 2 * cfg.head_dim


def count_params(params: dict, *names: str) -> int:
    """How many numbers the parameters called one of `names` hold, in every layer."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(math.prod(x.shape) for path, x in leaves if getattr(path[-1], "key", None) in names)


def convert_layer_layout(params: dict, scan_layers: bool) -> dict:
    """Convert a pure-dict parameter tree (nnx.to_pure_dict) between the two LayerStack layouts:
    scanned (`blocks.layers.<leaf>` with a leading L axis) and unrolled (`blocks.layers.<i>.<leaf>`).
    A tree already in the asked-for layout is returned unchanged."""
    layers = params["blocks"]["layers"]
    unrolled = all(isinstance(k, int) for k in layers)
    if unrolled == (not scan_layers):
        return params
    if scan_layers:
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *[layers[i] for i in sorted(layers)])
    else:
        n_layer = jax.tree.leaves(layers)[0].shape[0]
        stacked = {i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n_layer)}
    return {**params, "blocks": {**params["blocks"], "layers": stacked}}
