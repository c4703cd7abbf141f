"""The Mixture-of-Experts layer against a per-token reference, its capacity mode, and its
auxiliary losses and statistics in the trainer."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmjax
import llmjax.models  # noqa: F401
from conftest import ROOT
from helpers import config, perturb_vectors
from llmjax.models import moe as M
from llmjax.models.moe import MoEFeedForward


def _layer(**opts):
    return MoEFeedForward(llmjax.model_config(config("moe", **opts)), rngs=nnx.Rngs(3))


def _reference(layer, x, gates=None, experts=None):
    """Each token through its top-k experts one by one, float64 (the router's choices unless given)."""
    if gates is None:
        _, _, gates, experts = layer.route(x)
    w_in, b_in = np.asarray(layer.w_in[...], np.float64), np.asarray(layer.b_in[...], np.float64)
    w_out, b_out = np.asarray(layer.w_out[...], np.float64), np.asarray(layer.b_out[...], np.float64)
    xs, g, e = np.asarray(x, np.float64), np.asarray(gates, np.float64), np.asarray(experts)
    out = np.zeros_like(xs)
    for b in range(xs.shape[0]):
        for t in range(xs.shape[1]):
            for j in range(e.shape[2]):
                k = e[b, t, j]
                h = xs[b, t] @ w_in[k] + b_in[k]
                h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
                out[b, t] += g[b, t, j] * (h @ w_out[k] + b_out[k])
    return out


def test_dropless_matches_a_per_token_reference():
    layer = _layer()
    x = jax.random.normal(jax.random.key(0), (2, 9, 64))
    y, aux = layer(x)
    np.testing.assert_allclose(y, _reference(layer, x), atol=1e-5, rtol=1e-4)
    assert float(aux["stats"]["dropped"]) == 0.0
    np.testing.assert_allclose(float(aux["stats"]["expert_load"].sum()), 1.0, rtol=1e-6)


def _routed(layer, x, route):
    """(gates, experts) of the layer's router, or a forced routing: 'skewed' sends every token's
    first choice to expert 0 and its second to expert 1 (two groups of every token, two empty
    experts), 'one_empty' keeps the router's choices but never expert 3."""
    _, _, gates, experts = layer.route(x)
    if route == "skewed":
        experts = jnp.broadcast_to(jnp.arange(layer.k, dtype=experts.dtype), experts.shape)
    elif route == "one_empty":
        experts = jnp.where(experts == 3, jnp.where(experts[..., :1] == 2, 1, 2), experts)
    return gates, experts


@pytest.mark.parametrize("route", ["router", "skewed", "one_empty"])
@pytest.mark.parametrize("impl,block", [("blocked", 1), ("blocked", 4), ("blocked", 5), ("blocked", 512), ("dense", 0), ("gather", 0), ("ragged_dot", 0)])
def test_every_dropless_impl_matches_the_reference_and_each_other_in_gradients(impl, block, route):
    """Each way of running the experts, each block size (1, a power of two, not one, larger than
    any group), on the router's choices and on routings that leave experts empty or put every
    token in one group: outputs against a float64 per-token reference, gradients (input, every
    weight) against `ragged_dot`'s autodiff."""
    layer = _layer(moe_block_rows=max(block, 1))
    x = jax.random.normal(jax.random.key(5), (3, 7, 64))
    gates, experts = _routed(layer, x, route)
    if route == "one_empty":
        assert not bool(jnp.any(experts == 3))
    y = layer._dropless(x, gates, experts, impl=impl)
    np.testing.assert_allclose(y, _reference(layer, x, gates, experts), atol=1e-5, rtol=1e-4)
    graphdef, state = nnx.split(layer)
    cot = jax.random.normal(jax.random.key(6), x.shape)

    def loss(state, x, impl):
        return jnp.sum(nnx.merge(graphdef, state)._dropless(x, gates, experts, impl=impl) * cot)

    got, want = jax.grad(loss, argnums=(0, 1))(state, x, impl), jax.grad(loss, argnums=(0, 1))(state, x, "ragged_dot")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), got, want)
    assert float(jnp.abs(got[1]).max()) > 0


@pytest.mark.parametrize("impl", ["blocked", "dense", "gather"])
def test_dropless_impls_in_bfloat16(impl):
    """In bfloat16 (the default configs' dtype) each path stays within bfloat16 rounding of the
    float64 reference, in the compute dtype, and its input gradient of `ragged_dot`'s."""
    layer = _layer(dtype="bfloat16", moe_block_rows=8)
    x = jax.random.normal(jax.random.key(13), (3, 11, 64)).astype(jnp.bfloat16)
    gates, experts = _routed(layer, x, "router")
    y = layer._dropless(x, gates, experts, impl=impl)
    assert y.dtype == jnp.bfloat16
    want = _reference(layer, x.astype(jnp.float32), gates, experts)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=3e-2 * np.abs(want).max(), rtol=0)
    cot = jax.random.normal(jax.random.key(14), x.shape).astype(jnp.bfloat16)
    grad = lambda impl: jax.grad(lambda x: jnp.sum((layer._dropless(x, gates, experts, impl=impl) * cot).astype(jnp.float32)))(x)  # noqa: E731
    got, ref = np.asarray(grad(impl), np.float32), np.asarray(grad("ragged_dot"), np.float32)
    np.testing.assert_allclose(got, ref, atol=3e-2 * np.abs(ref).max(), rtol=0)


def test_bias_gradients_in_bfloat16_sum_in_float32():
    """In bfloat16 each path's expert-bias gradients (a sum over every row an expert took: here
    about 1,500) stay within 2% of the float32 model's. `ragged_dot`'s gathered the biases after
    rounding them, so their gradient was a bfloat16 scatter-add: 5% off here, 6-7% at the default
    width, where tests/gpu compares the blocked and dense paths against it (that test failed on
    the CPU)."""
    x32 = jax.random.normal(jax.random.key(21), (4, 768, 64))
    cot = jax.random.normal(jax.random.key(22), x32.shape)

    def bias_grads(dtype, impl):
        layer = _layer(dtype=dtype)
        graphdef, state = nnx.split(layer)
        x = x32.astype(dtype)
        _, _, gates, experts = _layer(dtype="float32").route(x32)  # (the same routing in both dtypes)

        def loss(state):
            y = nnx.merge(graphdef, state)._dropless(x, gates, experts, impl=impl)
            return jnp.sum(y.astype(jnp.float32) * cot)

        g = jax.grad(loss)(state)
        return {k: np.asarray(g[k][...], np.float32) for k in ("b_in", "b_out")}

    for impl in ("ragged_dot", "blocked", "dense", "gather"):
        got, want = bias_grads("bfloat16", impl), bias_grads("float32", impl)
        for k in got:
            err = np.abs(got[k] - want[k]).max() / np.abs(want[k]).max()
            assert err < 0.02, (impl, k, err)


def test_take_experts_gradient_is_autodiffs():
    """take_experts' one-hot backward equals autodiff's scatter-add (blocks sorted by expert, one
    expert with no block, one with three), float32 and bfloat16."""
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)):
        w = jax.random.normal(jax.random.key(15), (4, 3, 5)).astype(dtype)
        block_e = jnp.array([0, 0, 2, 3, 3, 3])
        g = jax.random.normal(jax.random.key(16), (6, 3, 5)).astype(dtype)
        np.testing.assert_array_equal(M.take_experts(w, block_e), w[block_e])
        got = jax.vjp(lambda w: M.take_experts(w, block_e), w)[1](g)[0]
        want = jax.vjp(lambda w: w[block_e], w)[1](g)[0]
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


def test_blocks_bound_holds_for_every_group_size():
    """`n_blocks` rows suffice for any split of the assignments over the experts (each group padded
    to whole blocks), and `block_rows` never pads a group by a block or more."""
    import itertools

    for rows, E, block in [(12, 4, 4), (9, 3, 2), (16, 4, 512), (10, 4, 3)]:
        b = M.block_rows(rows, E, block)
        assert b <= block and (b == 1 or b // 2 < -(-rows // E))
        for sizes in itertools.product(range(rows + 1), repeat=E):
            if sum(sizes) == rows:
                assert sum(-(-s // b) for s in sizes) <= M.n_blocks(rows, E, b), (rows, E, b, sizes)


def _flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_dropless_flops_are_the_routed_rows_not_every_expert():
    """The blocked layout multiplies the routed rows (plus padding to whole blocks); `ragged_dot`,
    as XLA's CPU and NVIDIA backends run it, multiplies every row by every expert, as dense does;
    gather multiplies the routed rows alone. `auto` picks blocked for a training-sized batch, dense
    for decoding's few tokens and gather for fewer assignments than experts (a row or two)."""
    layer = _layer(n_experts=8, moe_block_rows=16)
    x = jax.random.normal(jax.random.key(7), (4, 64, 64))
    gates, experts = _routed(layer, x, "router")
    routed = 2 * 2 * x.shape[0] * x.shape[1] * layer.k * 64 * 64  # two matmuls of the routed rows
    rows = x.shape[0] * x.shape[1] * layer.k
    padded = M.n_blocks(rows, 8, M.block_rows(rows, 8, 16)) * M.block_rows(rows, 8, 16)
    flops = {impl: _flops(lambda x, impl=impl: layer._dropless(x, gates, experts, impl=impl), x) for impl in ("blocked", "dense", "gather", "ragged_dot")}
    assert flops["blocked"] < 1.1 * routed * padded / rows, (flops, routed)
    assert 0.9 * routed < flops["gather"] < 1.1 * routed, (flops, routed)
    assert flops["ragged_dot"] > 0.9 * routed * 8 / layer.k and flops["dense"] > 0.9 * routed * 8 / layer.k
    default = M.MoEConfig.moe_block_rows
    assert M.dropless_plan(16 * 1024, 2, 8, default) == "blocked" and M.dropless_plan(16 * 1024, 2, 8, 2048) == "blocked"
    assert M.dropless_plan(64, 2, 8, default) == "dense" and M.dropless_plan(4, 2, 8, default) == "dense"
    assert M.dropless_plan(1, 2, 8, default) == "gather" and M.dropless_plan(3, 2, 8, default) == "gather"
    assert M.dropless_plan(7, 1, 8, default) == "gather" and M.dropless_plan(1, 2, 2, default) == "dense"


def _gshard_capacity(layer, x):
    """The capacity mode as GShard writes it: one-hot dispatch and combine einsums (plain autodiff)."""
    B, T, D = x.shape
    k, E = layer.k, layer.E
    C = max(1, int(np.ceil(layer.cf * T * k / E)))
    _, _, gates, experts = layer.route(x)
    onehot = jax.nn.one_hot(experts.reshape(B, T * k), E, dtype=jnp.int32)
    slot = jnp.cumsum(onehot, axis=1) * onehot - 1
    kept = (slot < C) & (onehot > 0)
    dispatch = jax.nn.one_hot(jnp.where(kept, slot, -1), C, dtype=x.dtype)  # (B, T*k, E, C)
    buffers = jnp.einsum("bsec,bsd->becd", dispatch, jnp.repeat(x, k, axis=1))
    out = M.expert_ffn(buffers, layer.w_in[...], layer.b_in[...], layer.w_out[...], layer.b_out[...])
    combined = jnp.einsum("bsec,becd->bsd", dispatch, out).reshape(B, T, k, D)
    return jnp.einsum("btkd,btk->btd", combined, gates * kept.any(axis=-1).reshape(B, T, k))


@pytest.mark.parametrize("factor", [0.5, 8.0])
def test_capacity_gathers_equal_gshards_einsums_in_values_and_gradients(factor):
    """The gathers (and their gather-shaped gradients) against GShard's one-hot einsums under plain
    autodiff, with drops (factor 0.5) and without."""
    layer = _layer(moe_mode="capacity", capacity_factor=factor)
    x = jax.random.normal(jax.random.key(9), (2, 16, 64))
    cot = jax.random.normal(jax.random.key(10), x.shape)
    graphdef, state = nnx.split(layer)

    def loss(state, x, reference):
        m = nnx.merge(graphdef, state)
        return jnp.sum((_gshard_capacity(m, x) if reference else m(x)[0]) * cot)

    np.testing.assert_allclose(layer(x)[0], _gshard_capacity(layer, x), atol=1e-5, rtol=1e-5)
    got, want = jax.grad(loss, argnums=(0, 1))(state, x, False), jax.grad(loss, argnums=(0, 1))(state, x, True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), got, want)


def test_take_rows_gradient_is_autodiffs():
    """take_rows' gather-shaped backward equals autodiff's scatter-add, for a routing-like index
    (each row read twice or not at all, some outputs reading past the end)."""
    x = jax.random.normal(jax.random.key(11), (5, 3))
    index = jnp.array([4, 0, 5, 2, 0, 4, 2, 5, 5, 1, 1])  # 5: past the end (zeros); row 3 never read
    inverse = jnp.array([[1, 4], [9, 10], [3, 6], [11, 11], [0, 5]])  # 11 = len(index): none
    g = jax.random.normal(jax.random.key(12), (11, 3))
    np.testing.assert_array_equal(M.take_rows(x, index, inverse), x.at[index].get(mode="fill", fill_value=0))
    got = jax.vjp(lambda x: M.take_rows(x, index, inverse), x)[1](g)[0]
    want = jax.vjp(lambda x: x.at[index].get(mode="fill", fill_value=0), x)[1](g)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_capacity_dispatch_is_gathers_not_one_hot_products():
    """The capacity mode's FLOPs are its experts' (E x C slots per sequence): rows reach their
    slots and come back by gathers. GShard's one-hot dispatch and combine einsums would add
    2 x 2 B (T k) E C D."""
    layer = _layer(moe_mode="capacity", capacity_factor=1.25)
    B, T, D, F, E, k = 4, 64, 64, 64, 4, 2
    x = jax.random.normal(jax.random.key(8), (B, T, D))
    C = int(np.ceil(1.25 * T * k / E))
    experts_flops = 2 * 2 * B * E * C * D * F
    assert _flops(lambda x: layer(x)[0], x) < 1.15 * experts_flops


def test_capacity_mode_without_drops_equals_dropless_and_drops_latest_first():
    x = jax.random.normal(jax.random.key(1), (2, 16, 64))
    # (the experts' biases, zeros at initialisation, made nonzero: the capacity path's own expert_ffn
    # adds them, and dropping one there passed every test, GShard's reference calling the same function)
    biased = lambda layer: perturb_vectors(layer, seed=4)  # noqa: E731  (the same weights in both: nnx.Rngs(3))
    dropless, _ = biased(_layer())(x)
    roomy, aux = biased(_layer(moe_mode="capacity", capacity_factor=8.0))(x)
    np.testing.assert_allclose(roomy, dropless, atol=1e-5, rtol=1e-5)
    assert float(aux["stats"]["dropped"]) == 0.0
    tight = _layer(moe_mode="capacity", capacity_factor=0.5)
    y, aux = tight(x)
    assert 0.0 < float(aux["stats"]["dropped"]) < 1.0
    # Slots go by position: an expert's kept assignments are its earliest ones in each row.
    _, _, gates, experts = tight.route(x)
    _, kept = tight._capacity(x, gates, experts)
    C = int(np.ceil(0.5 * 16 * 2 / 4))
    for b in range(2):
        for e in range(4):
            hits = [bool(k) for t in range(16) for j in range(2) if int(experts[b, t, j]) == e for k in [kept[b, t, j]]]
            assert hits == [True] * min(C, len(hits)) + [False] * max(0, len(hits) - C)


def test_a_capacity_model_decodes_dropless():
    """With a decode cache (the sampler's prefill and steps) every token reaches its experts, whatever
    the capacity factor: a capacity-mode model that drops (factor 0.25) decodes the logits of its
    dropless twin's full forward (float32, 1e-4) at the prefill and every step."""
    from helpers import load_params, params, perturb_vectors, scale_params

    tight = perturb_vectors(scale_params(llmjax.build_model(config("moe", moe_mode="capacity", capacity_factor=0.25), seed=3), 4.0))
    twin = load_params(llmjax.build_model(config("moe", moe_mode="dropless"), seed=0), params(tight))
    toks = jax.random.randint(jax.random.key(5), (2, 20), 0, 65)
    full = np.asarray(twin(toks)[0])
    assert np.abs(np.asarray(tight(toks)[0]) - full).max() > 0.1  # (the full forward drops: the check can fail)
    pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
    logits, cache, _ = tight(toks[:, :16], positions=pos[:, :16], cache=tight.init_cache(2, 32))
    np.testing.assert_allclose(logits, full[:, :16], atol=1e-4, rtol=1e-4)
    for t in range(16, 20):
        logits, cache, _ = tight(toks[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache)
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-4, rtol=1e-4, err_msg=f"step {t}")


def test_the_router_decides_from_float32_logits_in_a_bf16_model():
    """With bf16 compute the router still takes float32 operands and returns float32 logits (a bf16
    product flipped the top-2 set of 0.13% of tokens), also after the sampler casts a model's
    kernels for inference."""
    from llmjax.sample import inference_params

    layer = _layer(dtype="bfloat16")
    x = jax.random.normal(jax.random.key(3), (2, 64, 64))
    logits = np.asarray(layer.route(x)[0], np.float64)
    want = np.asarray(x, np.float64) @ np.asarray(layer.router.kernel[...], np.float64)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)  # (bf16 rounding would be ~1e-2)
    cast = inference_params({"router": {"kernel": layer.router.kernel[...]}, "w_in": layer.w_in[...]}, jnp.bfloat16)
    assert cast["router"]["kernel"].dtype == jnp.float32 and cast["w_in"].dtype == jnp.bfloat16


def test_the_routers_products_ask_for_float32_precision_forward_and_backward():
    """A float32 product at the default precision runs on a GPU as a tf32 GEMM (operands rounded to
    10-bit mantissas; jax.lax.Precision), which the CPU computes exactly: so the router's float32
    logits hold on a GPU only if its products, and the two of its backward pass, ask for HIGHEST."""
    layer = _layer(dtype="bfloat16")
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(3), (2, 16, 64), jnp.bfloat16)

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params).route(x)[0] ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x)
    E = layer.router.kernel.shape[1]
    dots = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    routing = [e for e in dots if E in e.outvars[0].aval.shape or any(E in v.aval.shape for v in e.invars)]
    assert len(routing) == 3, routing  # the logits, their gradient to the input and to the kernel
    for e in routing:
        assert all(v.aval.dtype == jnp.float32 for v in e.invars), e
        assert e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2, e


def test_balanced_router_gives_load_balance_one():
    layer = _layer()
    layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])  # uniform probabilities
    x = jax.random.normal(jax.random.key(2), (4, 32, 64))
    _, aux = layer(x)
    # P_e = 1/E for every e, so E * sum f_e P_e = sum f_e = 1 whatever the (tie-broken) choices
    np.testing.assert_allclose(float(aux["load_balance"]), 1.0, rtol=1e-5)


def test_router_losses_and_statistics_follow_their_formulas():
    """`load_balance` (E * sum_e f_e P_e), `router_z` (the mean of logsumexp(logits)^2) and `expert_load`
    against their definitions, from the router's float64 logits. test_balanced_router_gives_load_balance_one
    pins only load_balance at uniform probabilities, where any f with sum 1 gives 1; the z-loss was checked
    nowhere: a z-loss without its square, or a load over tokens rather than assignments, trained on."""
    layer = _layer()
    x = jax.random.normal(jax.random.key(7), (2, 16, 64))
    _, aux = layer(x)
    logits = np.asarray(x, np.float64) @ np.asarray(layer.router.kernel[...], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-logits, axis=-1)[..., : layer.k]  # (B, T, k)
    load = np.bincount(top.reshape(-1), minlength=layer.E) / top.size
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    np.testing.assert_allclose(aux["stats"]["expert_load"], load, rtol=1e-6)
    np.testing.assert_allclose(float(aux["load_balance"]), layer.E * np.sum(load * probs.mean(axis=(0, 1))), rtol=1e-5)
    np.testing.assert_allclose(float(aux["router_z"]), np.mean(lse**2), rtol=1e-5)


def test_trainer_logs_router_losses_and_expert_load(tmp_path):
    """The router's losses and statistics are logged; the validation loss of a capacity-mode MoE is
    the dropless model's, which sampling and evaluation run (it was measured with drops, and a
    token's loss depended on its batch-mates): with the learning rate at 0, a capacity run and a
    dropless run of the same weights give the same validation loss, and different training losses."""
    from llmjax.train import train

    over = {"train.max_steps": 2, "train.batch_size": 4, "eval.sample_tokens": 0, "eval.num_batches": 1, "train.lr": 0.0,
            "train.min_lr": 0.0, "logging.progress_bar": False, "model.context_len": 32, "model.moe_mode": "capacity",
            "model.capacity_factor": 0.5}
    run = train(llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", over), tmp_path / "run", devices=jax.devices()[:1], quiet=True)
    last = run.metrics[-1]
    assert {"aux_load_balance", "aux_router_z", "stat_dropped", "stat_expert_load"} <= set(last)
    assert len(last["stat_expert_load"]) == 4 and abs(sum(last["stat_expert_load"]) - 1) < 1e-5
    assert 0.0 < last["stat_dropped"] < 1.0
    over.update({"model.moe_mode": "dropless", "train.max_steps": 1})
    dropless = train(llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", over), tmp_path / "dropless", devices=jax.devices()[:1], quiet=True)
    assert dropless.metrics[-1]["stat_dropped"] == 0.0 and dropless.metrics[0]["train_loss"] != run.metrics[0]["train_loss"]
    assert dropless.metrics[-1]["val_loss"] == pytest.approx(last["val_loss"], rel=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_language_model_loss_trains_the_router(top_k):
    """The output's gradient reaches the router for every top_k: the gates are the top-k
    probabilities renormalised, and with top_k=1 the probability itself (Switch). Renormalised, a
    single gate was 1 and the router's gradient from the output 0 (5e-10)."""
    layer = _layer(top_k=top_k)
    x = jax.random.normal(jax.random.key(4), (2, 16, 64))
    _, probs, gates, _ = layer.route(x)
    top = jnp.sort(probs, axis=-1)[..., ::-1][..., :top_k]
    np.testing.assert_allclose(gates, top if top_k == 1 else top / top.sum(-1, keepdims=True), rtol=1e-6)
    graphdef, state = nnx.split(layer)
    cot = jax.random.normal(jax.random.key(5), x.shape)
    grads = jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s)(x)[0] * cot))(state)
    router = np.abs(np.asarray(grads["router"]["kernel"][...])).max()
    expert = np.abs(np.asarray(grads["w_out"][...])).max()
    assert router > 1e-3 * expert, (router, expert)


@pytest.mark.parametrize("mode", ["dropless", "blocked", "capacity"])
def test_expert_parallel_training_matches_one_device(mode, tmp_path):
    """Experts sharded over an `expert` mesh axis of 4 fake CPU devices give the losses of one device
    (dropless: `auto`, which is dense at this size, and the blocked layout's gathered weights)."""
    from llmjax.sharding import make_mesh, param_shardings
    from llmjax.train import train

    over = {"train.max_steps": 6, "train.batch_size": 8, "eval.sample_tokens": 0, "eval.num_batches": 1,
            "eval.every_steps": 0, "logging.progress_bar": False, "model.context_len": 32,
            "model.moe_mode": "capacity" if mode == "capacity" else "dropless", "model.capacity_factor": 1.0}
    if mode == "blocked":
        over.update({"model.moe_impl": "blocked", "model.moe_block_rows": 16})
    one = train(llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", over), tmp_path / "one", devices=jax.devices()[:1], quiet=True)
    ep = {**over, "train.mesh.data": 1, "train.mesh.expert": 4}
    cfg = llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", ep)
    four = train(cfg, tmp_path / "four", devices=jax.devices()[:4], quiet=True)
    a = [m["train_loss"] for m in one.metrics]
    b = [m["train_loss"] for m in four.metrics]
    np.testing.assert_allclose(b, a, rtol=2e-5)
    assert [m["stat_dropped"] for m in four.metrics] == pytest.approx([m["stat_dropped"] for m in one.metrics], abs=1e-6)
    # and the experts really are split: each device holds one of the 4 experts
    shardings = param_shardings(nnx.to_pure_dict(nnx.state(llmjax.build_model(cfg), nnx.Param)), make_mesh(cfg.train.mesh, jax.devices()[:4]))
    assert shardings["blocks"]["layers"]["mlp"]["w_in"].spec[1] == "expert"


def test_an_fsdp_and_expert_mesh_never_gathers_activations_whole(tmp_path, capfd):
    """With train.mesh fsdp and expert both above 1, XLA's partitioner warned of an "Involuntary
    full rematerialization" (an activation gathered whole on every device) twice per step: the
    embedding lookup's output, split along embed over fsdp, could not reach the batch's split over
    (fsdp, expert); in capacity mode its all-to-alls' shard_map named the batch axes in the old
    order too. With fsdp the mesh's minor axis it compiles without (compiled here, not loaded from
    the persistent cache, which would skip the partitioner)."""
    from llmjax.train import train

    over = {"train.max_steps": 1, "train.batch_size": 8, "eval.sample_tokens": 0, "eval.num_batches": 1, "eval.every_steps": 0,
            "logging.progress_bar": False, "model.context_len": 32, "model.moe_mode": "capacity",
            "train.mesh.data": 1, "train.mesh.fsdp": 2, "train.mesh.expert": 4}
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        capfd.readouterr()
        train(llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", over), tmp_path / "run", devices=jax.devices()[:8], quiet=True)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    err = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in err, err[-2000:]


def test_capacity_mode_exchanges_tokens_with_all_to_all():
    """Under a mesh with an expert axis the capacity-mode layer sends buffers to the experts' devices
    (two all-to-alls), and computes what one device computes."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llmjax.sharding import BATCH_AXES, make_mesh, param_shardings

    layer = _layer(moe_mode="capacity", capacity_factor=1.0)
    graphdef, state = nnx.split(layer)
    pure = nnx.to_pure_dict(state)
    x = jax.random.normal(jax.random.key(4), (8, 16, 64))
    want = layer(x)[0]
    mesh = make_mesh({"data": 1, "fsdp": 1, "expert": 4}, jax.devices()[:4])
    shardings = param_shardings({"blocks": {"layers": {0: {"mlp": pure}}}}, mesh)["blocks"]["layers"][0]["mlp"]
    with jax.set_mesh(mesh):
        f = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0], in_shardings=(shardings, NamedSharding(mesh, P(BATCH_AXES))))
        hlo = f.lower(pure, x).compile().as_text()
        got = f(pure, x)
    assert hlo.count("all-to-all") >= 2
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_capacity_mode_with_bfloat16_matmuls_trains_on_an_expert_mesh():
    """model.matmul_dtype=bfloat16 with the experts split over an `expert` axis (capacity mode:
    the experts under shard_map, rows split over data and expert): the layer's output and its
    gradients (every parameter's and the input's) are one device's. The experts' weight gradient
    was refused by JAX's custom-VJP check (varying over the rows' axes, its weight not): a
    traceback at the first training step."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llmjax.sharding import BATCH_AXES, make_mesh, param_shardings

    layer = _layer(moe_mode="capacity", capacity_factor=1.0, matmul_dtype="bfloat16")
    graphdef, state = nnx.split(layer)
    pure = nnx.to_pure_dict(state)
    x = jax.random.normal(jax.random.key(4), (8, 16, 64))
    cot = jax.random.normal(jax.random.key(5), x.shape)

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x)[0] * cot)

    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(pure, x)
    mesh = make_mesh({"data": 2, "fsdp": 1, "expert": 2}, jax.devices()[:4])
    shardings = param_shardings({"blocks": {"layers": {0: {"mlp": pure}}}}, mesh)["blocks"]["layers"][0]["mlp"]
    with jax.set_mesh(mesh):
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), in_shardings=(shardings, NamedSharding(mesh, P(BATCH_AXES))))
        got = f(pure, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got[1])[0], jax.tree.leaves(want[1])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(np.abs(w).max()), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("impl", ["blocked", "dense"])
def test_data_parallel_dropless_splits_the_expert_work(impl):
    """On a 4-device data mesh each device sorts and runs only its own rows (`batch_groups`): the
    compiled step's FLOPs per device are about a quarter of one device's. (Sorting the whole batch
    had every device run every expert row: 0.52 of one device's FLOPs for `blocked` here.)"""
    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps

    flops = {}
    for n in (1, 4):
        cfg = llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", {"train.batch_size": 16, "model.moe_impl": impl,
                                                                "model.moe_block_rows": 64, "train.mesh.data": n})
        mesh = make_mesh(cfg.train.mesh, jax.devices()[:n])
        s = build_steps(cfg, mesh)
        with jax.set_mesh(mesh):
            toks = jax.ShapeDtypeStruct((1, 16, 65), jnp.int32, sharding=s.tok_shard)
            flops[n] = s.train_step.lower(jax.eval_shape(s.init_state), toks).compile().cost_analysis()["flops"]
    assert flops[4] < 0.3 * flops[1], flops


@pytest.mark.parametrize("impl", ["blocked", "dense", "gather", "ragged_dot", "capacity"])
def test_bfloat16_experts_keep_no_float32_hidden_activations(impl):
    """In bfloat16 the experts round each product to bf16 before its bias and GELU, as the dense
    MLP does, and their GELU runs under jax.checkpoint (layers.biased_gelu): every (rows, d_ff)
    tensor the backward pass keeps is bf16. Float32 ones (the product, its GELU, their gradient)
    moved 18 GB more per step of the default config, compiled for an H100 (docs/benchmarks.md)."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    opts = {"moe_mode": "capacity"} if impl == "capacity" else {"moe_block_rows": 8}
    layer = _layer(dtype="bfloat16", d_ff=96, **opts)
    graphdef, state = nnx.split(layer)
    x = jax.random.normal(jax.random.key(21), (2, 11, 64)).astype(jnp.bfloat16)

    def loss(state, x):
        m = nnx.merge(graphdef, state)
        y = m(x)[0] if impl == "capacity" else m._dropless(x, *_routed(m, x, "router"), impl=impl)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(loss, state, x)
    hidden = [line for line in printed.getvalue().splitlines() if ",96]" in line.split(" ")[0] and "from the argument" not in line]
    assert hidden and all(line.startswith("bf16[") for line in hidden), hidden
