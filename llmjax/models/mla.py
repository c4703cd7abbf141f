"""`mla`: DeepSeek-V2 multi-head latent attention (DeepSeek-AI, 2024) on the modern stack
(RMSNorm, SwiGLU, no biases, tied embedding).

Keys and values are compressed jointly into one latent per token:

    c_BTr      = RMSNorm(x W_dkv[:, :r])              the latent (kv_lora_rank r)
    kr_BTp     = RoPE(x W_dkv[:, r:])                 one decoupled RoPE key, shared by all heads
    [k_nope, v] = c W_ukv                             per head: qk_nope_dim and v_head_dim
    q = [q_nope, RoPE(q_rope)] = x W_q                (or x W_dq -> RMSNorm -> W_uq with q_lora_rank > 0)
    score_h(t, s) = (q_nope_h . k_nope_h(s) + q_rope_h . kr(s)) / sqrt(qk_nope_dim + qk_rope_dim)

Training expands k_nope and v and runs ordinary (flash) attention. Decoding caches only c and kr,
r + p numbers per token and layer (288 at the default, against 2 * 12 * 64 = 1536 for GPT-2), and
never re-expands keys and values: W_uk is absorbed into the query (q_nope W_uk^T scores directly
against the latent) and W_uv is applied after the weighted sum of latents; on a GPU the attention
against the latents, with both cache writes, is one fused kernel per layer
(decode_attention.latent_decode_attention, `model.decode_attention_impl`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax import runtime
from llmjax.config import ConfigError, ModelConfig
from llmjax.models import decode_attention
from llmjax.models.attention import causal_attention, visible_mask, write_cache
from llmjax.models.layers import DecoderLM, PreNormBlock, SwiGLU, apply_rope, dense, dot32, residual_std, rms_norm
from llmjax.registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class MLAConfig(ModelConfig):
    # (its decode step's fused kernel is decode_attention.latent_decode_attention: decode_attention_impl applies)
    n_head: int
    d_ff: int
    rope_base: float
    kv_lora_rank: int  # r: width of the cached latent
    q_lora_rank: int  # 0: full-rank query projection; > 0: compress queries too
    qk_nope_dim: int  # per-head key/query width without rotary
    qk_rope_dim: int  # width of the decoupled rotary key (shared) and query (per head)
    v_head_dim: int

    def __post_init__(self):
        super().__post_init__()
        if self.qk_rope_dim % 2 or self.qk_rope_dim <= 0:
            raise ConfigError(f"model.qk_rope_dim={self.qk_rope_dim} must be positive and even")
        for name in ("kv_lora_rank", "qk_nope_dim", "v_head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.q_lora_rank < 0:
            raise ConfigError(f"model.q_lora_rank must be 0 (no query compression) or positive, got {self.q_lora_rank}")

    def decode_attention_unmet(self, decode_attention) -> list[str]:
        return decode_attention.latent_unmet(self.kv_lora_rank, self.qk_rope_dim, None)


class MultiHeadLatentAttention(nnx.Module):
    """Decode cache per layer: {'latent': (B, S, r), 'k_rope': (B, S, p)}."""

    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs):
        H, D = cfg.n_head, cfg.d_model
        self.n_head, self.r, self.nope, self.rope, self.vd = H, cfg.kv_lora_rank, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim
        self.rope_base, self.impl, self.dtype = cfg.rope_base, cfg.attention_impl, cfg.compute_dtype
        self.decode_impl = cfg.decode_attention_impl
        self.narrow = cfg.narrow_matmuls
        self.scale = 1.0 / math.sqrt(cfg.qk_nope_dim + cfg.qk_rope_dim)
        qk = cfg.qk_nope_dim + cfg.qk_rope_dim
        if cfg.q_lora_rank > 0:
            self.q_down = dense(cfg, D, cfg.q_lora_rank, rngs=rngs)
            self.q_norm = rms_norm(cfg, cfg.q_lora_rank, rngs=rngs)
            self.q_up = dense(cfg, cfg.q_lora_rank, H * qk, rngs=rngs)
        else:
            self.q_proj = dense(cfg, D, H * qk, rngs=rngs)
        self.kv_down = dense(cfg, D, cfg.kv_lora_rank + cfg.qk_rope_dim, rngs=rngs)
        self.kv_norm = rms_norm(cfg, cfg.kv_lora_rank, rngs=rngs)
        self.kv_up = dense(cfg, cfg.kv_lora_rank, H * (cfg.qk_nope_dim + cfg.v_head_dim), rngs=rngs)
        self.o_proj = dense(cfg, H * cfg.v_head_dim, D, std=residual_std(cfg), rngs=rngs)

    def _queries(self, x_BTD):
        """(q_nope (B, T, H, nope), q_rope (B, T, H, p) not yet rotated)."""
        B, T, _ = x_BTD.shape
        q = self.q_up(self.q_norm(self.q_down(x_BTD))) if hasattr(self, "q_down") else self.q_proj(x_BTD)
        return jnp.split(q.reshape(B, T, self.n_head, self.nope + self.rope), [self.nope], axis=-1)

    def __call__(self, x_BTD, positions_BT, cache):
        B, T, _ = x_BTD.shape
        H = self.n_head
        q_nope, q_rope = self._queries(x_BTD)
        # Decoding, XLA's GPU compiler merges the two products of x (q_proj's, kv_down's) into one by
        # joining their weights, a copy it cannot fuse into the GEMM (kv_down's r + p columns are no
        # multiple of its tiles) and makes every token (4.4 MB a layer for the default config):
        # a barrier on kv_down's x keeps them two GEMMs there. (Training keeps the merge: one copy a step.)
        x_kv = x_BTD if cache is None else jax.lax.optimization_barrier(x_BTD)
        kv_BTc = self.kv_down(x_kv)
        latent, k_rope = jnp.split(kv_BTc, [self.r], axis=-1)  # (B, T, r), (B, T, p)
        if cache is not None and self._decode_kernel(T, cache["latent"].shape[1]):
            # the queries' and the key's rotary parts rotated together, one kernel (apart, XLA made two a layer)
            qk_rope = apply_rope(jnp.concatenate([q_rope, k_rope[:, :, None, :]], axis=2), positions_BT, self.rope_base)
            out, cache = self._fused_decode(q_nope, qk_rope, kv_BTc, cache, positions_BT)
            return self.o_proj(out.reshape(B, T, H * self.vd)), cache
        latent = self.kv_norm(latent)
        q_rope = apply_rope(q_rope, positions_BT, self.rope_base)
        k_rope = apply_rope(k_rope[:, :, None, :], positions_BT, self.rope_base)[:, :, 0, :]
        if cache is None:
            kv = self.kv_up(latent).reshape(B, T, H, self.nope + self.vd)
            k_nope, v = jnp.split(kv, [self.nope], axis=-1)
            q = jnp.concatenate([q_nope, q_rope], axis=-1)  # (B, T, H, nope + p)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (B, T, H, self.rope))], axis=-1)
            out = causal_attention(q, k, v, impl=self.impl, scale=self.scale)  # (v narrower: see there)
        else:
            cache = {"latent": write_cache(cache["latent"], latent, positions_BT), "k_rope": write_cache(cache["k_rope"], k_rope, positions_BT)}
            out = self._absorbed_attention(q_nope, q_rope, cache, positions_BT)
        return self.o_proj(out.reshape(B, T, H * self.vd)), cache

    def _rounded(self, a):
        """`a` as the products take it: under model.matmul_dtype the expanded path multiplies the
        latent and W_ukv rounded to it, so the absorbed one rounds them the same way."""
        return a.astype(self.narrow).astype(self.dtype) if self.narrow is not None else a.astype(self.dtype)

    def _absorbing_weights(self):
        """(W_uk (r, H, nope), W_uv (r, H, v)): kv_up's kernel, split."""
        w_ukv = self._rounded(self.kv_up.kernel[...]).reshape(self.r, self.n_head, self.nope + self.vd)
        return w_ukv[..., : self.nope], w_ukv[..., self.nope :]

    def _fused_decode(self, q_nope_BTHn, qk_rope_BTHp, kv_BTc, cache, positions_BT):
        """One token per row through decode_attention.latent_decode_attention, given the rotated
        rotary parts of the H queries and, as head H, the key, and kv_down's output (the latent
        before kv_norm, then the rotary key): the kernel normalises the latent, writes it and the
        rotary key into the caches and attends against the latents (XLA's path: the norm's two
        kernels, two scatters, the two score products, the mask, the softmax's reductions and the
        weighted sum, about 12 kernels a layer, most reading every cache slot)."""
        w_uk_rHn, w_uv_rHv = self._absorbing_weights()
        q_lat_BHr = jnp.einsum("bthn,rhn->bthr", q_nope_BTHn, w_uk_rHn)[:, 0]
        norm = self.kv_norm
        o_lat_BHr, c_cache, kr_cache = decode_attention.latent_decode_attention(
            q_lat_BHr, qk_rope_BTHp[:, 0], kv_BTc[:, 0], cache["latent"], cache["k_rope"],
            positions_BT[:, 0], scale=self.scale, narrow=self.narrow,
            norm_scale=norm.scale[...] if norm.scale is not None else jnp.ones((self.r,), jnp.float32),
            norm_eps=float(norm.epsilon), norm_dtype=jnp.dtype(norm.dtype or kv_BTc.dtype), norm_param_dtype=norm.dtype,
            interpret=runtime.backend() != "gpu")
        return jnp.einsum("bthr,rhv->bthv", o_lat_BHr[:, None], w_uv_rHv), {"latent": c_cache, "k_rope": kr_cache}

    def _decode_kernel(self, T: int, S: int) -> bool:
        """Whether one decoded token's attention runs as the fused kernel: 'pallas' (an error where
        the shapes do not fit), or 'auto' on a GPU where they do (as attention.Attention's)."""
        if T != 1 or self.decode_impl == "xla":
            return False
        unmet = decode_attention.latent_unmet(self.r, self.rope, S)
        if self.decode_impl == "pallas" and unmet:
            raise ConfigError(f"model.decode_attention_impl='pallas' needs {' and '.join(unmet)}; use 'auto' or 'xla'")
        return not unmet and (self.decode_impl == "pallas" or runtime.backend() == "gpu")

    def _absorbed_attention(self, q_nope_BTHn, q_rope_BTHp, cache, positions_BT):
        """Attention straight against the cached latents: W_uk folded into the queries, W_uv applied
        to the attended latent. Logits and softmax in float32."""
        w_uk_rHn, w_uv_rHv = self._absorbing_weights()
        c_BSr = self._rounded(cache["latent"])
        kr_BSp = cache["k_rope"].astype(self.dtype)
        q_lat_BTHr = jnp.einsum("bthn,rhn->bthr", q_nope_BTHn, w_uk_rHn)
        scores_BHTS = jnp.einsum("bthr,bsr->bhts", q_lat_BTHr, c_BSr, preferred_element_type=jnp.float32)
        scores_BHTS += jnp.einsum("bthp,bsp->bhts", q_rope_BTHp, kr_BSp, preferred_element_type=jnp.float32)
        scores_BHTS = jnp.where(visible_mask(positions_BT, c_BSr.shape[1]), scores_BHTS * self.scale, -jnp.inf)
        probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(self.dtype)
        # (the weighted sum of latents accumulated in float32, as the expanded path's sum of values:
        # XLA's CPU backend sums this bf16 x bf16 -> bf16 product in bf16, an error growing with the
        # number of cached positions, 3.5% of the output scale at 256 against 0.5% expanded)
        o_lat_BTHr = dot32("bhts,bsr->bthr", probs_BHTS, c_BSr).astype(self.dtype)
        return jnp.einsum("bthr,rhv->bthv", o_lat_BTHr, w_uv_rHv)

    @staticmethod
    def cache_slots(cache) -> int:
        return cache["latent"].shape[-2]  # (B, S, r), with a leading layer axis when stacked

    def init_cache(self, batch_size: int, max_len: int, dtype):
        return {
            "latent": jnp.zeros((batch_size, max_len, self.r), dtype),
            "k_rope": jnp.zeros((batch_size, max_len, self.rope), dtype),
        }


def block(cfg: MLAConfig, rngs: nnx.Rngs) -> PreNormBlock:
    return PreNormBlock(
        norm_1=rms_norm(cfg, cfg.d_model, rngs=rngs),
        attn=MultiHeadLatentAttention(cfg, rngs=rngs),
        norm_2=rms_norm(cfg, cfg.d_model, rngs=rngs),
        mlp=SwiGLU(cfg, cfg.d_ff, rngs=rngs),
        decode_norm_impl=cfg.decode_norm_impl,
    )


@register("mla")
class MLA(DecoderLM):
    config_class = MLAConfig

    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, make_block=lambda r: block(cfg, r), final_norm=rms_norm, learned_positions=False, rngs=rngs)

    @classmethod
    def mixer_flops_per_token(cls, cfg, seq_len):
        # As trained (expanded keys/values): scores over qk_nope + qk_rope, weighted sum over v_head_dim.
        return cfg.n_layer * 2 * seq_len * cfg.n_head * (cfg.qk_nope_dim + cfg.qk_rope_dim + cfg.v_head_dim)
