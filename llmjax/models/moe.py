"""`moe`: a Mixture-of-Experts GPT: the GPT-2 stack (learned positions, LayerNorm, multi-head
attention, biases) whose MLP is `n_experts` GELU experts behind a top-k router (Shazeer et al. 2017;
Switch Transformer, Fedus et al. 2021; GShard).

Router: logits = x W_r in float32 (operands and product, whatever the compute dtype: a bf16 product
flipped the top-2 set of 0.13% of tokens against float32 logits); the top_k experts by softmax probability get the token, with
their probabilities renormalised to sum to 1 (with top_k=1, Switch's gate: the probability itself,
so that the language-model loss reaches the router). Auxiliary outputs (mean over layers):
  - `load_balance`: Switch's E * sum_e f_e P_e, where f_e is the fraction of routed assignments
    that went to expert e and P_e the mean router probability of e (1.0 when balanced);
  - `router_z`: mean of logsumexp(logits)^2 (ST-MoE's z-loss), keeping the logits small;
  - stats: `expert_load` (f_e per expert) and `dropped` (the fraction of assignments dropped).
The trainer weighs the losses with `train.aux_loss_weights` (configs/moe.py sets them).

Two ways to run the experts:
  - `dropless`: every assignment is computed (no padding of the result, no drops). How the experts
    multiply their tokens is `moe_impl`:
      `blocked`: assignments sorted by expert into blocks of `moe_block_rows` rows, each expert's
        group padded to whole blocks, one batched matmul over the blocks with each block's expert
        weights gathered (megablocks' layout with dense ops: the FLOPs of the routed rows plus the
        padding, about 1/2 block per expert, plus one weight copy per block);
      `dense`: every expert on every token, the top_k results picked (n_experts / top_k times the
        FLOPs, but each weight read once and nothing copied: the right choice for a few tokens);
      `gather`: each assignment's expert weights gathered and its row multiplied alone: the weights
        of tokens * top_k experts read, not all n_experts' (decoding's one token per row, where
        reading the weights is nearly the whole cost: on an NVIDIA GPU XLA fuses each gather into
        its product, so nothing is copied: the default moe decoding one row, compiled for an H100,
        moves 0.39 GB per token instead of dense's 0.62; for a few rows only: on a training batch
        each assignment would get its own copy of its expert's weights and weight gradient);
      `ragged_dot`: `jax.lax.ragged_dot` over the sorted groups (sorted across the whole batch:
        jax cannot vmap it over the devices' groups here). Native on TPUs; XLA's CPU and
        NVIDIA GPU backends expand it to a dense dot over a group-masked copy of the rows
        (n_experts times the FLOPs and an n_experts times larger operand) unless XLA's cuDNN
        grouped-GEMM fusion is on (`--xla_gpu_experimental_use_ragged_dot_fusion`, cuDNN >= 9.22);
      `auto` (the default): the cheapest for the static shapes by a cost model (`dropless_plan`):
        gather where the assignments are fewer than the experts (decoding a row or two), dense
        for a few more tokens (decoding a larger batch), blocked for training.
    Under a mesh that splits the batch over G devices, `blocked` sorts each device's rows apart
    (`batch_groups`), so that each device runs its own rows' experts;
  - `capacity`: each expert takes at most C = ceil(capacity_factor * T * top_k / n_experts)
    assignments per sequence, into fixed-size (E, C) buffers (static shapes: one batched matmul per
    expert weight, no copies; assignments over capacity are dropped, the token keeps its residual).
    Rows go into and come back from the buffers by gathers (the same numbers as GShard's one-hot
    dispatch and combine einsums, without their O(T^2 * top_k^2 * d_model) FLOPs per sequence).
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

from llmjax.config import ConfigError, ModelConfig, closest
from llmjax.models.attention import Attention
from llmjax.models.layers import DecoderLM, PreNormBlock, biased_gelu, dense, layer_norm, normal, param_einsum, residual_std
from llmjax.registry import register
from llmjax.sharding import BATCH_AXES

MODES = ("dropless", "capacity")
IMPLS = ("auto", "blocked", "dense", "gather", "ragged_dot")
# `auto`'s cost model: a block's weight copy (the gather, and in training the block's float32 weight
# gradient, written and summed into its expert's) costs about as much time as this many rows' products
# (d x f elements moved at memory speed against 2 d f FLOPs per row: several hundred rows on an H100,
# tens on a 2-core CPU; the choice only matters where the two paths are close).
COPY_ROWS = 512


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig(ModelConfig):
    aux_losses = ("load_balance", "router_z")  # (MoEMLP's aux; tests/test_models.py checks the names against it)
    n_head: int
    head_dim: int
    d_ff: int  # hidden width of each expert
    n_experts: int
    top_k: int
    moe_mode: str  # dropless | capacity
    capacity_factor: float  # capacity mode: slots per expert = ceil(factor * T * top_k / n_experts)
    moe_impl: str = "auto"  # dropless mode's expert matmuls: auto | blocked | dense | gather | ragged_dot
    moe_block_rows: int = 1024  # blocked: rows per block (at most the next power of two >= rows / n_experts)

    def __post_init__(self):
        super().__post_init__()
        if self.moe_mode not in MODES:
            raise ConfigError(f"model.moe_mode='{self.moe_mode}' is not one of {', '.join(MODES)}{closest(self.moe_mode, MODES)}")
        if not 0 < self.top_k <= self.n_experts:
            raise ConfigError(f"model.top_k={self.top_k} must be between 1 and model.n_experts={self.n_experts}")
        if self.capacity_factor <= 0:
            raise ConfigError(f"model.capacity_factor must be positive, got {self.capacity_factor}")
        if self.moe_impl not in IMPLS:
            raise ConfigError(f"model.moe_impl='{self.moe_impl}' is not one of {', '.join(IMPLS)}{closest(self.moe_impl, IMPLS)}")
        if self.moe_block_rows <= 0:
            raise ConfigError(f"model.moe_block_rows must be positive, got {self.moe_block_rows}")


@jax.custom_vjp
def take_rows(x, index, inverse):
    """`x[index]` along the first axis, rows past the end of x reading zeros, whose gradient is a
    gather as well: `inverse` (len(x), r) lists, for each row of x, the output rows that read it
    (len(index): none). Autodiff would scatter-add instead (atomic, so order-dependent on GPUs);
    every routing step here is a permutation with known inverse, so the backward stays a gather."""
    return x.at[index].get(mode="fill", fill_value=0)


def _take_rows_fwd(x, index, inverse):
    return take_rows(x, index, inverse), (inverse, jnp.zeros((0,), x.dtype))


def _take_rows_bwd(res, g):
    inverse, like = res
    dx = jnp.sum(g.at[inverse].get(mode="fill", fill_value=0).astype(jnp.float32), axis=1).astype(like.dtype)
    return dx, None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def take_experts(w, block_e):
    """`w[block_e]`: each block's copy of its expert's weights. The gradient sums each expert's
    blocks by a one-hot contraction (exact ones and zeros, float32 accumulation), where autodiff
    would scatter-add the blocks into the experts (atomic, order-dependent on GPUs)."""
    return w[block_e]


def _take_experts_fwd(w, block_e):
    return w[block_e], (block_e, jnp.zeros((w.shape[0], 0), w.dtype))


def _take_experts_bwd(res, g):
    block_e, like = res  # (like: the experts' count and dtype)
    onehot = jax.nn.one_hot(block_e, like.shape[0], dtype=jnp.float32)  # (blocks, E)
    # (HIGHEST: a float32 GEMM on a GPU, where the default precision would round g to tf32 first)
    sums = jnp.einsum("je,j...->e...", onehot, g.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return sums.astype(like.dtype), None


take_experts.defvjp(_take_experts_fwd, _take_experts_bwd)


def batch_groups(batch: int) -> tuple[int, tuple[str, ...]]:
    """(G, axes): the number of devices the batch is split over under the surrounding mesh (the
    trainer's `data`, `fsdp` and `expert` axes; 1 without a mesh or when the batch does not divide),
    and those axes. The dropless layouts sort tokens within each such group: a sort across the
    whole batch would gather every token to every device and run every expert's rows on each."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1, ()
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    G = math.prod(mesh.shape[a] for a in axes)
    return (G, axes) if G > 1 and batch % G == 0 else (1, ())


def block_rows(rows: int, n_experts: int, block: int) -> int:
    """The blocked layout's rows per block: `block`, or less where the groups are small (the next
    power of two at or above rows / n_experts), so that padding stays under one block per expert."""
    return max(1, min(block, 1 << max(0, math.ceil(rows / n_experts) - 1).bit_length()))


def n_blocks(rows: int, n_experts: int, b: int) -> int:
    """Blocks enough for any routing: sum_e ceil(s_e / b) <= (rows + E (b - 1)) / b."""
    return (rows + n_experts * (b - 1)) // b


def dropless_plan(tokens: int, top_k: int, n_experts: int, block: int) -> str:
    """`moe_impl='auto'`: 'gather' when the assignments are fewer than the experts (it reads fewer
    expert weights than 'dense' and multiplies fewer rows), else 'dense' when every expert on every
    token costs no more than the blocked layout's padded rows and weight copies, else 'blocked' (a
    trace-time choice: shapes are static)."""
    rows = tokens * top_k
    if rows < n_experts:
        return "gather"
    b = block_rows(rows, n_experts, block)
    nb = n_blocks(rows, n_experts, b)
    return "dense" if tokens * n_experts <= nb * (b + COPY_ROWS) else "blocked"


class MoEFeedForward(nnx.Module):
    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        E, D, F = cfg.n_experts, cfg.d_model, cfg.d_ff
        self.E, self.k, self.mode, self.cf, self.dtype = E, cfg.top_k, cfg.moe_mode, cfg.capacity_factor, cfg.compute_dtype
        self.impl, self.block = cfg.moe_impl, cfg.moe_block_rows
        self.narrow = cfg.narrow_matmuls  # (the experts' operand dtype under model.matmul_dtype)
        self.router = dense(cfg, D, E, rngs=rngs, float32=True)  # routing decisions from float32 logits
        self.w_in = nnx.Param(normal(cfg.init_std)(rngs.params(), (E, D, F), jnp.float32))
        self.b_in = nnx.Param(jnp.zeros((E, F), jnp.float32))
        self.w_out = nnx.Param(normal(residual_std(cfg))(rngs.params(), (E, F, D), jnp.float32))
        self.b_out = nnx.Param(jnp.zeros((E, D), jnp.float32))

    def route(self, x_BTD):
        """(logits, probabilities, gates, experts): each token's top_k experts and their gates, the
        probabilities renormalised over the top_k (Mixtral, GShard), or with top_k=1 the expert's
        probability itself (Switch): renormalised, a single gate is 1 whatever the router says, and
        the router would learn from the auxiliary losses alone."""
        logits = self.router(x_BTD).astype(jnp.float32)  # (B, T, E)
        probs = jax.nn.softmax(logits, axis=-1)
        # the top_k of the logits (the probabilities' order), and the renormalised gates as the softmax of
        # those k: decoding (whose probabilities only the unused losses read) then computes no softmax
        # over every expert, a kernel a layer and token (the default moe at batch 1: 166.4 -> 154.4)
        top_l, top_e = jax.lax.top_k(logits, self.k)  # (B, T, k)
        gates = jnp.exp(top_l - jax.nn.logsumexp(logits, axis=-1, keepdims=True)) if self.k == 1 else jax.nn.softmax(top_l, axis=-1)
        return logits, probs, gates, top_e

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

    def _dropless(self, x_BTD, gates, experts, impl: str | None = None):
        """Every assignment through its expert: (B, T, D) in the compute dtype. `impl` overrides
        `moe_impl` (tests run every path)."""
        B, T, D = x_BTD.shape
        N, k = B * T, self.k
        G, batch_axes = batch_groups(B)
        impl = impl or self.impl
        if impl == "auto":
            impl = dropless_plan(N // G, k, self.E, self.block)
        run = {"blocked": self._blocked, "dense": self._dense, "gather": self._gathered, "ragged_dot": self._ragged}[impl]
        x = x_BTD.reshape(N, D).astype(self.dtype)
        if impl != "blocked" or G == 1:  # (dense sorts nothing; jax cannot vmap this ragged_dot)
            y = run(x, experts.reshape(N, k))  # (N, k, D) in the compute dtype
        else:  # sort within each device's rows of the batch, not across the whole batch
            shard = lambda a: jax.lax.with_sharding_constraint(a, P(batch_axes))  # noqa: E731
            y = jax.vmap(run)(shard(x.reshape(G, N // G, D)), shard(experts.reshape(G, N // G, k))).reshape(N, k, D)
        # the gate-weighted sum in float32 (both operands: a mixed product's transpose would widen)
        return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), gates.reshape(N, k)).reshape(B, T, D).astype(self.dtype)

    def _weights(self):
        """Expert weights in the matmul operand dtype (cast once, before any gather), biases float32."""
        mm = self.narrow or self.dtype
        return self.w_in[...].astype(mm), self.b_in[...], self.w_out[...].astype(mm), self.b_out[...]

    def _ffn(self, rows, w_in, b_in, w_out, b_out, spec_in, spec_out):
        """GELU FFN with float32 accumulation, each product rounded to the compute dtype before its bias
        is added (as nnx.Linear does in the dense models' MLP; float32 products, bias adds and GELU
        moved 18 GB more per step of the default config compiled for an H100); biases already
        broadcast to the products' shapes."""
        dt, narrow = self.dtype, self.narrow
        h = biased_gelu(param_einsum(spec_in, rows, w_in, dt, narrow).astype(dt), b_in.astype(dt))
        return param_einsum(spec_out, h, w_out, dt, narrow).astype(dt) + b_out.astype(dt)

    def _blocked(self, x_ND, experts_Nk):
        """Sorted, block-padded groups: one batched matmul over blocks of rows of one expert each."""
        N, D = x_ND.shape
        k, E = self.k, self.E
        M = N * k
        b = block_rows(M, E, self.block)
        nb = n_blocks(M, E, b)
        flat = experts_Nk.reshape(M)
        sizes = jnp.sum(jax.nn.one_hot(flat, E, dtype=jnp.int32), axis=0)  # (a reduction: no atomics)
        padded = (sizes + b - 1) // b * b
        starts, ends = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded)
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted position -> assignment
        sorted_e = flat[order]
        dest = (ends[sorted_e] - padded[sorted_e] + jnp.arange(M) - starts[sorted_e]).astype(jnp.int32)  # its padded slot
        slot = jnp.zeros(M, jnp.int32).at[order].set(dest, unique_indices=True)  # each assignment's padded slot
        holder = jnp.full(nb * b, M, jnp.int32).at[dest].set(order, unique_indices=True)  # each slot's assignment (M: none)
        token = jnp.where(holder < M, holder // k, N)  # each slot's token (N: padding, reads zeros)
        rows = take_rows(x_ND, token, slot.reshape(N, k)).reshape(nb, b, D)
        block_e = jnp.minimum(jnp.searchsorted(ends, jnp.arange(nb) * b, side="right", method="compare_all"), E - 1)
        w_in, b_in, w_out, b_out = (take_experts(w, block_e) for w in self._weights())
        out = self._ffn(rows, w_in, b_in[:, None], w_out, b_out[:, None], "jbd,jdf->jbf", "jbf,jfd->jbd")
        return take_rows(out.reshape(nb * b, D), slot, holder[:, None]).reshape(N, k, D)

    def _dense(self, x_ND, experts_Nk):
        """Every expert on every token; each token keeps its top_k results."""
        w_in, b_in, w_out, b_out = self._weights()
        x_END = jnp.broadcast_to(x_ND, (self.E, *x_ND.shape))
        out = self._ffn(x_END, w_in, b_in[:, None], w_out, b_out[:, None], "end,edf->enf", "enf,efd->end")  # (E, N, D)
        return out[experts_Nk, jnp.arange(x_ND.shape[0])[:, None]]

    def _gathered(self, x_ND, experts_Nk):
        """Each assignment's row through its own expert's gathered weights (take_experts: a
        gradient summed by a one-hot contraction, not scattered)."""
        N, D = x_ND.shape
        flat = experts_Nk.reshape(N * self.k)
        w_in, b_in, w_out, b_out = (take_experts(w, flat) for w in self._weights())
        rows = jnp.repeat(x_ND, self.k, axis=0)[:, None]  # (N*k, 1, D): assignment m is token m // k's
        out = self._ffn(rows, w_in, b_in[:, None], w_out, b_out[:, None], "mbd,mdf->mbf", "mbf,mfd->mbd")
        return out.reshape(N, self.k, D)

    def _ragged(self, x_ND, experts_Nk):
        """`jax.lax.ragged_dot` over the assignments sorted by expert."""
        N, D = x_ND.shape
        k, mm = self.k, self.narrow or self.dtype
        flat = experts_Nk.reshape(N * k)
        order = jnp.argsort(flat, stable=True)
        sorted_e = flat[order]
        rows = x_ND[order // k]  # (N*k, D), grouped by expert
        sizes = jnp.bincount(flat, length=self.E).astype(jnp.int32)
        w_in, b_in, w_out, b_out = self._weights()
        # (autodiff's backward here: exact gradients of the rounded operands)
        h = jax.lax.ragged_dot(rows.astype(mm), w_in, sizes, preferred_element_type=jnp.float32)
        # (the biases gathered in float32, then rounded: the same values as rounded then gathered, but
        # their gradient, a scatter-add over every row of an expert, sums in float32, not bf16)
        h = biased_gelu(h.astype(self.dtype), b_in, sorted_e)
        out = jax.lax.ragged_dot(h.astype(mm), w_out, sizes, preferred_element_type=jnp.float32).astype(self.dtype)
        out = out + b_out[sorted_e].astype(self.dtype)
        return jnp.zeros_like(out).at[order].set(out).reshape(N, k, D)

    def _capacity(self, x_BTD, gates, experts):
        B, T, D = x_BTD.shape
        k, E, dt = self.k, self.E, self.dtype
        S, C = T * k, max(1, math.ceil(self.cf * T * k / E))
        e_BS = experts.reshape(B, S)  # position-major order: all of a token's choices before the next token's
        onehot = jax.nn.one_hot(e_BS, E, dtype=jnp.int32)
        slot = jnp.sum(jnp.cumsum(onehot, axis=1) * onehot, axis=-1) - 1  # (B, S): its place in its expert's queue
        kept = slot < C
        target = jnp.where(kept, e_BS * C + slot, E * C)  # (B, S): index into the E*C slots; E*C: dropped

        # each slot's assignment (S: empty), per sequence; vmap keeps the batch a batch dimension
        filler = jax.vmap(lambda t: jnp.full(E * C, S, jnp.int32).at[t].set(jnp.arange(S, dtype=jnp.int32), mode="drop"))(target)
        dispatch = jax.vmap(lambda x, f, t: take_rows(x, f // k, t.reshape(T, k)))  # (empty slots: token T, zeros)
        buffers = dispatch(x_BTD.astype(dt), filler, target).reshape(B, E, C, D)
        weights = (self.w_in[...].astype(dt), self.b_in[...], self.w_out[...].astype(dt), self.b_out[...])
        out = expert_parallel(functools.partial(expert_ffn, narrow=self.narrow), buffers, *weights)
        back = jax.vmap(lambda o, t, f: take_rows(o, t, f[:, None]))(out.reshape(B, E * C, D), target, filler)
        kept_BTk = kept.reshape(B, T, k)
        return jnp.einsum("btkd,btk->btd", back.reshape(B, T, k, D), (gates * kept_BTk).astype(dt)), kept_BTk


def expert_ffn(buffers_BECD, w_in, b_in, w_out, b_out, narrow=None):
    """Each expert's GELU FFN on its (C, D) buffer of every row (matmul operands in `narrow` when
    given: model.matmul_dtype)."""
    dt = buffers_BECD.dtype
    h = param_einsum("becd,edf->becf", buffers_BECD, w_in, dt, narrow)
    h = biased_gelu(h.astype(dt), b_in[None, :, None].astype(dt))
    return param_einsum("becf,efd->becd", h, w_out, dt, narrow).astype(dt) + b_out[None, :, None].astype(dt)


def expert_parallel(ffn, buffers_BECD, *weights):
    """Run `ffn` with the experts split over the mesh's `expert` axis, when the surrounding
    computation runs under one (`jax.set_mesh`, as the trainer does) and it has more than one
    device: rows arrive split over the batch axes, an all-to-all sends each expert's buffers to the
    device that holds that expert, and a second all-to-all brings the results back. Elsewhere it
    is a plain call."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names or mesh.shape["expert"] == 1:
        return ffn(buffers_BECD, *weights)
    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    rows_only = tuple(a for a in batch if a != "expert")  # (the axes the rows vary over and the weights do not)

    def local(buffers, *local_weights):  # buffers: (B / n_batch_shards, E, C, D); weights: E / n_expert
        # the weights as varying over the rows' other axes as well: what jnp.einsum does by itself, its
        # transpose summing the weights' gradients over those axes; a custom-VJP product (the bfloat16
        # operands of model.matmul_dtype, layers.narrow_matmul) must be given such operands, or JAX
        # refuses the weight gradient it returns (varying over every batch axis) at the first step
        local_weights = jax.lax.pcast(local_weights, rows_only, to="varying") if rows_only else local_weights
        buffers = jax.lax.all_to_all(buffers, "expert", split_axis=1, concat_axis=0, tiled=True)
        out = ffn(buffers, *local_weights)  # this device's experts, for the rows of its expert group
        return jax.lax.all_to_all(out, "expert", split_axis=0, concat_axis=1, tiled=True)

    weight_specs = tuple(P("expert") for _ in weights)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(batch), *weight_specs), out_specs=P(batch))(buffers_BECD, *weights)


class MoEBlock(PreNormBlock):
    """Pre-norm block whose MLP is the MoE layer; with a decode cache the experts run dropless."""

    def __call__(self, x_BTD, positions_BT, cache):
        x_BTD, normed, cache = self.attend(x_BTD, positions_BT, cache)
        out, aux = self.mlp(normed, dropless=True if cache is not None else None)
        return x_BTD + out, cache, aux


def block(cfg: MoEConfig, rngs: nnx.Rngs) -> MoEBlock:
    return MoEBlock(
        norm_1=layer_norm(cfg, cfg.d_model, rngs=rngs),
        attn=Attention(cfg, n_kv_head=cfg.n_head, head_dim=cfg.head_dim, bias=True, rope_base=None, rngs=rngs),
        norm_2=layer_norm(cfg, cfg.d_model, rngs=rngs),
        mlp=MoEFeedForward(cfg, rngs=rngs),
        decode_norm_impl=cfg.decode_norm_impl,
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
