"""`linformer`: a strictly causal Linformer (after Wang et al., 2020) on the GPT-2 stack (learned
positions, LayerNorm, GELU MLP, biases).

Linformer compresses the keys and values of the whole sequence with learned projections along the
sequence axis: applied to a causal model that way, every summary mixes in future tokens. Here the
sequence is cut into blocks of `block_size` tokens, and a query at position t in block i attends to

  - the keys and values of its own block up to t, exactly (causal attention inside the block), and
  - `rank` summary keys and values of the *completed* blocks 0..i-1: each completed block j is
    projected along its positions by learned matrices P_k, P_v (rank x block_size), and the
    summaries of blocks 0..i-1 are averaged: K~_i = mean_{j<i} P_k K_j (likewise V~_i).

No summary ever contains a token at or after the current block, so no position sees a later token.
Cost: each query scores block_size + rank keys, so a layer's attention costs
O(T * (block_size + rank) * d) instead of O(T^2 * d), plus O(T * rank * d) to build the summaries:
linear in the context length for a fixed block size and rank. The decode state is bounded: the
current block's keys and values and the sums of the completed blocks' (the summaries are linear
in them): 4 * block_size * d numbers per layer, whatever the length.

Training runs all blocks at once (summaries by an exclusive cumulative sum over blocks); decoding
with a cache runs the same computation one token at a time (each token adds the previous block's
key and value in its slot into the sums as it overwrites them), so prefill with a cache is sequential.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax.config import ConfigError, ModelConfig
from llmjax.models.layers import (MLP, DecoderLM, PreNormBlock, count_params, dense, layer_norm, linear_without_bias, param_einsum,
                                  residual_std)
from llmjax.registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class LinformerConfig(ModelConfig):
    fused_decode_attention = False  # its own decode state: decode_attention_impl='pallas' refused (config.ModelConfig)
    n_head: int
    head_dim: int
    d_ff: int
    block_size: int  # tokens attended exactly (the current block)
    rank: int  # summary keys/values of all completed blocks

    def __post_init__(self):
        super().__post_init__()
        for name in ("block_size", "rank"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")

    def check_run(self) -> None:
        super().check_run()
        # (a saved run of such a model is still read: it is plain attention, and says what it is)
        if self.block_size >= self.context_len:
            raise ConfigError(f"model.block_size={self.block_size} is not below model.context_len={self.context_len}: the whole context is "
                              f"one block, attended exactly, so the Linformer's summaries never take part and it trains as plain "
                              f"causal attention; set model.block_size below {self.context_len} (the shipped configs: context_len / 4 or / 8)")


def _attend(q, keys, values, mask, scale, dtype):
    """softmax(q k^T) v over the last key axis with a boolean mask; float32 logits and softmax. Both
    products go through `param_einsum`, so that with 16-bit operands their backward passes round
    the incoming gradient to them rather than widening q and k to float32 (tf32 GEMMs on a GPU),
    and every product, forward and backward, accumulates in float32: XLA's CPU backend summed the
    probabilities' gradient (over the head width) in bfloat16 as a plain bf16 einsum's transpose,
    1% off in q's and k's gradients against 0.3% for `jax.nn.dot_product_attention`'s."""
    lead = "abcefg"[: q.ndim - 3]
    scores = param_einsum(f"{lead}thd,{lead}shd->{lead}hts", q, keys, dtype) * scale
    scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return param_einsum(f"{lead}hts,{lead}shd->{lead}thd", probs, values, dtype).astype(dtype)


class CausalLinformerAttention(nnx.Module):
    """Decode cache per layer: {'k_block', 'v_block': (B, H, hd, block), the current block's keys and
    values; 'k_sum', 'v_sum': (B, H, hd, block) float32, the completed blocks' keys and values summed
    slot by slot (see `_decode`)}."""

    def __init__(self, cfg: LinformerConfig, *, rngs: nnx.Rngs):
        H, hd, b, r = cfg.n_head, cfg.head_dim, cfg.block_size, cfg.rank
        self.H, self.hd, self.b, self.r, self.dtype = H, hd, b, r, cfg.compute_dtype
        self.scale = 1.0 / math.sqrt(hd)
        self.qkv_proj = dense(cfg, cfg.d_model, 3 * H * hd, bias=True, rngs=rngs)
        self.o_proj = dense(cfg, H * hd, cfg.d_model, bias=True, std=residual_std(cfg), rngs=rngs)
        init = nnx.initializers.normal(b**-0.5)  # Johnson-Lindenstrauss-style random projections
        self.proj_k = nnx.Param(init(rngs.params(), (r, b), jnp.float32))
        self.proj_v = nnx.Param(init(rngs.params(), (r, b), jnp.float32))

    def __call__(self, x_BTD, positions_BT, cache):
        out, cache = self._heads(x_BTD, positions_BT, cache)
        return self.o_proj(out), cache

    def without_out_bias(self, x_BTD, positions_BT, cache):
        """(y minus the output projection's bias, that bias, cache): see attention.Attention."""
        out, cache = self._heads(x_BTD, positions_BT, cache)
        y, bias = linear_without_bias(self.o_proj, out)
        return y, bias, cache

    def _heads(self, x_BTD, positions_BT, cache):
        B, T, _ = x_BTD.shape
        q, k, v = jnp.split(self.qkv_proj(x_BTD).reshape(B, T, 3 * self.H, self.hd), 3, axis=2)  # (B, T, H, hd)
        if cache is None:
            out = self._blocks(q, k, v)
        else:
            out, cache = self._decode(q, k, v, positions_BT, cache)
        return out.reshape(B, T, self.H * self.hd), cache

    def _blocks(self, q, k, v):
        """All blocks at once (training, and forward passes without a cache)."""
        B, T = q.shape[:2]
        b, r, dt = self.b, self.r, self.dtype
        nb = -(-T // b)
        pad = lambda a: jnp.pad(a, ((0, 0), (0, nb * b - T), (0, 0), (0, 0))).reshape(B, nb, b, self.H, self.hd)  # noqa: E731
        qb, kb, vb = pad(q), pad(k), pad(v)  # (B, nb, b, H, hd)
        # Per-block summaries, then the mean over strictly earlier blocks (exclusive cumsum).
        sk = jnp.einsum("rs,bnshd->bnrhd", self.proj_k[...].astype(dt), kb)
        sv = jnp.einsum("rs,bnshd->bnrhd", self.proj_v[...].astype(dt), vb)
        count = jnp.maximum(jnp.arange(nb, dtype=jnp.float32), 1)[None, :, None, None, None]

        def earlier_mean(s):  # mean over blocks j < i, never touching block i's own summary
            csum = jnp.cumsum(s.astype(jnp.float32), axis=1)
            return (jnp.concatenate([jnp.zeros_like(csum[:, :1]), csum[:, :-1]], axis=1) / count).astype(dt)

        mean_k, mean_v = earlier_mean(sk), earlier_mean(sv)
        keys = jnp.concatenate([mean_k, kb], axis=2)  # (B, nb, r + b, H, hd)
        values = jnp.concatenate([mean_v, vb], axis=2)
        has_summary = (jnp.arange(nb) > 0)[:, None, None]  # (nb, 1, 1): block 0 has none
        summary_mask = jnp.broadcast_to(has_summary, (nb, b, r))
        causal = jnp.broadcast_to(jnp.tril(jnp.ones((b, b), bool)), (nb, b, b))
        mask = jnp.concatenate([summary_mask, causal], axis=-1)[None, :, None]  # (1, nb, 1, b, r + b)
        out = _attend(qb, keys, values, mask, self.scale, dt)  # (B, nb, b, H, hd)
        return out.reshape(B, nb * b, self.H, self.hd)[:, :T]

    def _decode(self, q, k, v, positions_BT, cache):
        """Token by token through the bounded state (prefill and decoding with a cache). The
        summaries are linear in the keys, mean_j P K_j = P (sum_j K_j) / n, so the state keeps the
        sum of the completed blocks' raw keys (and values), slot by slot, and projects onto the
        summaries only the scores and the attention weights, never the keys: a query's summary
        scores are (q . sum_j K_j) P^T / n, and the summary values' share of its output is
        (sum_j V_j) (P^T p) / n. A token at slot s adds the key it overwrites (slot s of the
        previous block, complete once this block began) into the sums, so the sum of blocks
        0..i-1 is the state's sums plus the block's slots after s, which still hold the previous
        block's keys. Every write is in place, one slot per row (rows at position -1 write
        nothing); each token reads the block and the sums once. Computing the rank x d summaries
        of the whole block every token and adding them into running sums moved 7.3 GB per step
        for the default config decoding 64 rows, compiled for an H100 (docs/benchmarks.md)."""
        b, r, f32 = self.b, self.r, jnp.float32
        # (rounded to the compute dtype first, as the full forward's summaries take them; likewise the
        # probabilities below before the value products: the first block then decodes as `_attend` computes it)
        pk, pv = (p[...].astype(self.dtype).astype(f32) for p in (self.proj_k, self.proj_v))
        B = q.shape[0]
        rows = jnp.arange(B)

        def step(c, inputs):
            q_t, k_t, v_t, pos = inputs  # (B, H, hd) x3, (B,)
            valid = pos >= 0
            slot = jnp.where(valid, pos % b, 0)
            n = jnp.where(valid, pos // b, 0)  # completed blocks (positions run from 0 in a cache)
            # the key and value this token overwrites, read before the write below (the barrier
            # orders them, so that XLA updates the block in place instead of copying it first)
            old, kv_block = jax.lax.optimization_barrier((c["kv_block"][rows, :, :, :, slot], c["kv_block"]))
            folding = jnp.where(valid & (n > 0), rows, B)  # (B: dropped)
            kv_sum = c["kv_sum"].at[folding, :, :, :, slot].add(old.astype(f32), mode="drop")
            writing = jnp.where(valid, rows, B)
            kv_block = kv_block.at[writing, :, :, :, slot].set(jnp.stack([k_t, v_t], axis=1).astype(kv_block.dtype), mode="drop")
            later = (jnp.arange(b)[None, :] > slot[:, None])[:, None, :]  # (B, 1, b): the previous block's slots
            inv = (1.0 / jnp.maximum(n, 1).astype(f32))[:, None, None]  # the sums' mean
            q32 = q_t.astype(f32)
            s_blk = jnp.einsum("bhd,bhds->bhs", q32, kv_block[:, 0].astype(f32))  # (B, H, b)
            s_prev = jnp.einsum("bhd,bhds->bhs", q32, kv_sum[:, 0]) + jnp.where(later, s_blk, 0.0)  # q . sum_j K_j, per slot
            s_sum = jnp.einsum("bhs,rs->bhr", s_prev, pk) * (self.scale * inv)
            s_sum = jnp.where((n > 0)[:, None, None], s_sum, -jnp.inf)
            s_blk = jnp.where(later, -jnp.inf, s_blk * self.scale)
            probs = jax.nn.softmax(jnp.concatenate([s_sum, s_blk], axis=-1), axis=-1).astype(self.dtype).astype(f32)  # (B, H, r + b)
            w = jnp.einsum("bhr,rs->bhs", probs[..., :r], pv) * inv  # each slot's weight in the summary values
            out = jnp.einsum("bhs,bhds->bhd", w, kv_sum[:, 1]) + jnp.einsum(
                "bhs,bhds->bhd", jnp.where(later, w, probs[..., r:]), kv_block[:, 1].astype(f32))
            return {"kv_block": kv_block, "kv_sum": kv_sum}, out.astype(self.dtype)

        xs = (q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1), positions_BT.swapaxes(0, 1))
        cache, outs = jax.lax.scan(step, cache, xs)
        return outs.swapaxes(0, 1), cache

    def init_cache(self, batch_size: int, max_len: int, dtype):
        del max_len  # bounded: one block and the completed blocks' sums
        shape = (batch_size, 2, self.H, self.hd, self.b)  # keys and values together (one write each); slots last
        return {"kv_block": jnp.zeros(shape, dtype), "kv_sum": jnp.zeros(shape, jnp.float32)}  # (the sums stay float32)


def block(cfg: LinformerConfig, rngs: nnx.Rngs) -> PreNormBlock:
    return PreNormBlock(
        norm_1=layer_norm(cfg, cfg.d_model, rngs=rngs),
        attn=CausalLinformerAttention(cfg, rngs=rngs),
        norm_2=layer_norm(cfg, cfg.d_model, rngs=rngs),
        mlp=MLP(cfg, cfg.d_ff, rngs=rngs),
        decode_norm_impl=cfg.decode_norm_impl,
    )


@register("linformer")
class Linformer(DecoderLM):
    config_class = LinformerConfig

    def __init__(self, cfg: LinformerConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, make_block=lambda r: block(cfg, r), final_norm=layer_norm, learned_positions=True, rngs=rngs)

    @classmethod
    def mixer_params(cls, cfg, params):
        return count_params(params, "proj_k", "proj_v")  # (their products are the summaries below)

    @classmethod
    def mixer_flops_per_token(cls, cfg, seq_len):
        # scores and weighted sum over block_size + rank keys (2 * 2 * (b + r) * H * hd), plus the
        # summaries: each token's key and value projected into rank slots (2 * 2 * r * H * hd).
        del seq_len  # independent of the context length
        width = cfg.n_head * cfg.head_dim
        return cfg.n_layer * (4 * (cfg.block_size + cfg.rank) * width + 4 * cfg.rank * width)
