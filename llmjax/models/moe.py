"""`moe`: a Mixture-of-Experts GPT: the GPT-2 stack (learned positions, LayerNorm, multi-head
attention, biases) whose MLP is `n_experts` GELU experts behind a top-k router (Shazeer et al. 2017;
Switch Transformer, Fedus et al. 2021; GShard).

Router: logits = x W_r (float32); the top_k experts by softmax probability get the token, with
their probabilities renormalised to sum to 1. Auxiliary outputs (mean over layers):
  - `load_balance`: Switch's E * sum_e f_e P_e, where f_e is the fraction of routed assignments
    that went to expert e and P_e the mean router probability of e (1.0 when balanced);
  - `router_z`: mean of logsumexp(logits)^2 (ST-MoE's z-loss), keeping the logits small;
  - stats: `expert_load` (f_e per expert) and `dropped` (the fraction of assignments dropped).
The trainer weighs the losses with `train.aux_loss_weights` (configs/moe.py sets them).

Two ways to run the experts:
  - `dropless`: every assignment is computed: tokens are sorted by expert and each expert's group
    multiplies its weights with `jax.lax.ragged_dot` (no padding, no drops);
  - `capacity`: each expert takes at most C = ceil(capacity_factor * T * top_k / n_experts)
    assignments per sequence, into fixed-size (E, C) buffers (dispatch and combine are one-hot
    einsums, static shapes); assignments over capacity are dropped (the token keeps its residual).
    Slots are given in order of position (all of a token's choices before the next token's), per
    sequence, so a later token can never take an earlier token's slot: the layer stays causal.
Decoding with a cache always runs dropless (per-token routing, no drops), so cached decoding equals
the full forward exactly when the full forward dropped nothing.

Expert parallelism: with a mesh `expert` axis of size n (`train.mesh.expert`), each device holds
n_experts / n experts. In capacity mode the (expert, slot) buffers travel to their experts' devices
and back by two all-to-alls under `jax.shard_map` (`expert_parallel`). The dropless mode's ragged
groups are left to XLA's partitioner, which gathers rather than exchanges (an all-to-all of ragged
groups is still to do).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llmjax.config import ConfigError, ModelConfig
from llmjax.models.attention import Attention
from llmjax.models.layers import DecoderLM, PreNormBlock, dense, layer_norm, normal, param_einsum, residual_std
from llmjax.registry import register

MODES = ("dropless", "capacity")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig(ModelConfig):
    n_head: int
    head_dim: int
    d_ff: int  # hidden width of each expert
    n_experts: int
    top_k: int
    moe_mode: str  # dropless | capacity
    capacity_factor: float  # capacity mode: slots per expert = ceil(factor * T * top_k / n_experts)

    def __post_init__(self):
        super().__post_init__()
        if self.moe_mode not in MODES:
            raise ConfigError(f"model.moe_mode='{self.moe_mode}' is not one of {', '.join(MODES)}")
        if not 0 < self.top_k <= self.n_experts:
            raise ConfigError(f"model.top_k={self.top_k} must be between 1 and model.n_experts={self.n_experts}")
        if self.capacity_factor <= 0:
            raise ConfigError(f"model.capacity_factor must be positive, got {self.capacity_factor}")


class MoEFeedForward(nnx.Module):
    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        E, D, F = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.E, self.k, self.mode, self.cf, self.dtype = E, cfg.top_k, cfg.moe_mode, cfg.capacity_factor, cfg.compute_dtype
        self.narrow = cfg.narrow_matmuls  # (the experts' operand dtype under model.matmul_dtype)
        self.router = dense(cfg, D, E, rngs=rngs, narrow=False)  # routing decisions in full precision
        self.w_in = nnx.Param(normal(cfg.init_std)(rngs.params(), (E, D, F), jnp.float32))
        self.b_in = nnx.Param(jnp.zeros((E, F), jnp.float32))
        self.w_out = nnx.Param(normal(residual_std(cfg))(rngs.params(), (E, F, D), jnp.float32))
        self.b_out = nnx.Param(jnp.zeros((E, D), jnp.float32))

    def route(self, x_BTD):
        logits = self.router(x_BTD).astype(jnp.float32)  # (B, T, E)
        probs = jax.nn.softmax(logits, axis=-1)
        top_p, top_e = jax.lax.top_k(probs, self.k)  # (B, T, k)
        return logits, probs, top_p / jnp.sum(top_p, axis=-1, keepdims=True), top_e

    def __call__(self, x_BTD, dropless: bool | None = None):
        B, T, D = x_BTD.shape
        logits, probs, gates, experts = self.route(x_BTD)
        if dropless if dropless is not None else self.mode == "dropless":
            y, kept = self._dropless(x_BTD, gates, experts), jnp.ones(experts.shape, bool)
        else:
            y, kept = self._capacity(x_BTD, gates, experts)
        onehot = jax.nn.one_hot(experts, self.E, dtype=jnp.float32)  # (B, T, k, E)
        load = onehot.sum(axis=(0, 1, 2)) / (B * T * self.k)  # f_e
        aux = {
            "load_balance": self.E * jnp.sum(load * probs.mean(axis=(0, 1))),
            "router_z": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
            "stats": {"expert_load": load, "dropped": jnp.mean(~kept, dtype=jnp.float32)},
        }
        return y, aux

    def _dropless(self, x_BTD, gates, experts):
        B, T, D = x_BTD.shape
        N, k, dt = B * T, self.k, self.dtype
        flat_e = experts.reshape(N * k)
        order = jnp.argsort(flat_e, stable=True)
        sorted_e = flat_e[order]
        rows = x_BTD.reshape(N, D)[order // k].astype(dt)  # (N*k, D), grouped by expert
        sizes = jnp.bincount(flat_e, length=self.E).astype(jnp.int32)
        mm = self.narrow or dt  # (autodiff's backward here: exact gradients of the rounded operands)
        h = jax.lax.ragged_dot(rows.astype(mm), self.w_in[...].astype(mm), sizes, preferred_element_type=jnp.float32)
        h = jax.nn.gelu(h + self.b_in[...][sorted_e], approximate=True).astype(dt)
        out = jax.lax.ragged_dot(h.astype(mm), self.w_out[...].astype(mm), sizes, preferred_element_type=jnp.float32)
        out = out + self.b_out[...][sorted_e]
        unsorted = jnp.zeros_like(out).at[order].set(out).reshape(B, T, k, D)
        return jnp.einsum("btkd,btk->btd", unsorted, gates).astype(dt)

    def _capacity(self, x_BTD, gates, experts):
        B, T, D = x_BTD.shape
        k, E, dt = self.k, self.E, self.dtype
        C = max(1, math.ceil(self.cf * T * k / E))
        onehot = jax.nn.one_hot(experts.reshape(B, T * k), E, dtype=jnp.int32)  # position-major order
        slot = jnp.cumsum(onehot, axis=1) * onehot - 1  # (B, T*k, E): slot in the expert's buffer, -1 if not routed
        kept = (slot < C) & (onehot > 0)
        dispatch = (jax.nn.one_hot(jnp.where(kept, slot, -1), C, dtype=dt))  # (B, T*k, E, C); -1 -> all zeros
        rows = jnp.repeat(x_BTD.astype(dt), k, axis=1)  # (B, T*k, D)
        buffers = jnp.einsum("bsec,bsd->becd", dispatch, rows)  # (B, E, C, D)
        weights = (self.w_in[...].astype(dt), self.b_in[...], self.w_out[...].astype(dt), self.b_out[...])
        out = expert_parallel(functools.partial(expert_ffn, narrow=self.narrow), buffers, *weights)
        combined = jnp.einsum("bsec,becd->bsd", dispatch, out).reshape(B, T, k, D)
        kept_BTk = kept.any(axis=-1).reshape(B, T, k)
        return jnp.einsum("btkd,btk->btd", combined, (gates * kept_BTk).astype(dt)), kept_BTk


def expert_ffn(buffers_BECD, w_in, b_in, w_out, b_out, narrow=None):
    """Each expert's GELU FFN on its (C, D) buffer of every row (matmul operands in `narrow` when
    given: model.matmul_dtype)."""
    dt = buffers_BECD.dtype
    h = param_einsum("becd,edf->becf", buffers_BECD, w_in, dt, narrow)
    h = jax.nn.gelu(h + b_in[None, :, None], approximate=True).astype(dt)
    out = param_einsum("becf,efd->becd", h, w_out, dt, narrow)
    return (out + b_out[None, :, None]).astype(dt)


def expert_parallel(ffn, buffers_BECD, *weights):
    """Run `ffn` with the experts split over the mesh's `expert` axis, when the surrounding
    computation runs under one (`jax.set_mesh`, as the trainer does) and it has more than one
    device: rows arrive split over the batch axes, an all-to-all sends each expert's buffers to the
    device that holds that expert, and a second all-to-all brings the results back. Elsewhere it
    is a plain call."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
        return ffn(buffers_BECD, *weights)
    batch = tuple(a for a in ("data", "fsdp", "expert") if a in mesh.axis_names)

    def local(buffers, *local_weights):  # buffers: (B / n_batch_shards, E, C, D); weights: E / n_expert
        buffers = jax.lax.all_to_all(buffers, "expert", split_axis=1, concat_axis=0, tiled=True)
        out = ffn(buffers, *local_weights)  # this device's experts, for the rows of its expert group
        return jax.lax.all_to_all(out, "expert", split_axis=0, concat_axis=1, tiled=True)

    weight_specs = tuple(P("expert") for _ in weights)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(batch), *weight_specs), out_specs=P(batch))(buffers_BECD, *weights)


class MoEBlock(PreNormBlock):
    """Pre-norm block whose MLP is the MoE layer; with a decode cache the experts run dropless."""

    def __call__(self, x_BTD, positions_BT, cache):
        h_BTD, cache = self.attn(self.norm_1(x_BTD), positions_BT, cache)
        x_BTD = x_BTD + h_BTD
        out, aux = self.mlp(self.norm_2(x_BTD), dropless=True if cache is not None else None)
        return x_BTD + out, cache, aux


def block(cfg: MoEConfig, rngs: nnx.Rngs) -> MoEBlock:
    return MoEBlock(
        norm_1=layer_norm(cfg, cfg.d_model, rngs=rngs),
        attn=Attention(cfg, n_kv_head=cfg.n_head, head_dim=cfg.head_dim, bias=True, rope_base=None, rngs=rngs),
        norm_2=layer_norm(cfg, cfg.d_model, rngs=rngs),
        mlp=MoEFeedForward(cfg, rngs=rngs),
    )


@register("moe")
class MoE(DecoderLM):
    config_class = MoEConfig

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, make_block=lambda r: block(cfg, r), final_norm=layer_norm, learned_positions=True, rngs=rngs)

    @classmethod
    def params_active(cls, cfg: MoEConfig, params: dict) -> int:
        """Parameters one token uses: everything but the (n_experts - top_k) experts it skips."""
        total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        per_expert = 2 * cfg.d_model * cfg.d_ff + cfg.d_ff + cfg.d_model
        return total - cfg.n_layer * (cfg.n_experts - cfg.top_k) * per_expert
