"""int8 weight-only quantization: the rounding bound, exact on-the-fly dequantization, logits within a
stated bound of the float model for every architecture, decoding and scoring through the quantized
model, memory, and the command-line flags."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from helpers import config, scale_params
from llmjax import quant
from llmjax.sample import Sampling, generate

ARCHS = sorted(llmjax.ARCHS)


def test_per_channel_rounding_bound():
    w = np.random.default_rng(0).normal(size=(3, 40, 24)).astype(np.float32)
    w[:, :, 5] = 0.0  # an all-zero channel
    q, scale = quant.quantize_array(w, -2)
    assert q.dtype == jnp.int8 and scale.shape == (3, 1, 24) and int(jnp.abs(q).max()) == 127
    np.testing.assert_allclose(scale[:, 0, 0], np.abs(w[..., 0]).max(-1) / 127, rtol=1e-6)
    err = np.abs(np.asarray(q, np.float32) * np.asarray(scale) - w)
    assert (err <= np.asarray(scale) / 2 * (1 + 1e-6)).all() and not np.asarray(q)[:, :, 5].any()


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_dequantized_weights_are_rounded_once(dtype):
    """q * scale in a 16-bit dtype is the exact product rounded once to it: small weights (std 2e-4,
    scales ~6e-6, below float16's normal range) lost up to 7e-3 of a channel's largest weight when
    the scale was rounded to float16 first (float16's own rounding there is 4.9e-4)."""
    w = np.random.default_rng(1).normal(scale=2e-4, size=(256, 64)).astype(np.float32)
    q, scale = quant.quantize_array(w, -2)
    exact = np.asarray(q, np.float64) * np.asarray(scale, np.float64)
    got = np.asarray(quant.dequantize_params({"k": {"q": q, "scale": scale}}, dtype)["k"].astype(jnp.float32), np.float64)
    per_channel = np.abs(got - exact).max(0) / np.abs(exact).max(0)
    assert per_channel.max() <= 2.0 ** -(11 if dtype == jnp.float16 else 8), per_channel.max()


def _float_of(qm):
    """The float model whose weights are exactly the dequantized ones."""
    return qm._float_model()


@pytest.mark.parametrize("arch", ARCHS)
def test_int8_logits_are_close_to_float(arch):
    m = scale_params(llmjax.build_model(config(arch, scan_layers=False), seed=3), 3.0)
    qm = quant.Int8LM(m)
    toks = jax.random.randint(jax.random.key(0), (2, 48), 0, 65)
    lq = np.asarray(qm(toks)[0])[..., :65]
    # on-the-fly dequantization is exactly the float model on the dequantized weights
    np.testing.assert_allclose(lq, np.asarray(_float_of(qm)(toks)[0])[..., :65], rtol=0, atol=1e-5)
    dlogp = np.abs(np.asarray(jax.nn.log_softmax(lq)) - np.asarray(jax.nn.log_softmax(np.asarray(m(toks)[0])[..., :65])))
    if arch == "moe":  # a rounding upstream can flip a near-tied routing decision: bound the mean
        assert dlogp.mean() < 0.03 and dlogp.max() < 1.0, (dlogp.mean(), dlogp.max())
    else:  # measured at most 0.027 over these models
        assert dlogp.max() < 0.05, dlogp.max()
    # int8 + per-channel scales: about a quarter of float32 (unquantized norms, biases, the token table)
    assert quant.weight_bytes(qm) < 0.4 * quant.weight_bytes(m)


def test_embeddings_optionally_quantized():
    m = scale_params(llmjax.build_model(config("modern", scan_layers=False), seed=1), 3.0)
    plain, emb = quant.Int8LM(m), quant.Int8LM(m, embeddings=True)
    assert plain.weights["embed"]["embedding"][...].dtype == jnp.float32
    assert emb.weights["embed"]["embedding"]["q"][...].dtype == jnp.int8 and quant.weight_bytes(emb) < quant.weight_bytes(plain)
    assert plain.weights["blocks"]["layers"][0]["norm_1"]["scale"][...].dtype == jnp.float32
    toks = jax.random.randint(jax.random.key(1), (1, 32), 0, 65)
    d = np.abs(np.asarray(jax.nn.log_softmax(emb(toks)[0][..., :65])) - np.asarray(jax.nn.log_softmax(m(toks)[0][..., :65])))
    assert d.max() < 0.08


@pytest.mark.parametrize("arch", ["vanilla", "moe"])
def test_every_weight_is_rounded_by_its_own_output_channels_scale(arch):
    """Dense kernels and expert weights (in, out) get one scale per output channel (the largest of
    its inputs' weights / 127), the token table one per row: each dequantized weight is within half
    its own channel's scale. (Scales over the contracted axis, the input channel, kept the rounding
    bound of test_per_channel_rounding_bound and logits within test_int8_logits_are_close_to_float's
    tolerance, yet rounded a small output channel with a large one's step.)"""
    from flax import nnx

    m = scale_params(llmjax.build_model(config(arch, scan_layers=False), seed=3), 3.0)
    want = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    qm = quant.Int8LM(m, embeddings=True)
    pure = jax.tree.map(lambda v: v[...], qm.weights, is_leaf=lambda x: isinstance(x, nnx.Variable))
    got = quant.dequantize_params(pure, jnp.float32)
    leaves = jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in leaves] == [p for p, _ in jax.tree_util.tree_flatten_with_path(got)[0]]
    checked = set()
    for (path, w), d in zip(leaves, jax.tree.leaves(got)):
        names = [getattr(k, "key", None) for k in path]
        if "router" in names:
            continue
        if names[-1] in ("kernel", "w_in", "w_out"):
            axis = -2  # the contracted (input) axis: the channel's own weights lie along it
        elif names[-2:] == ["embed", "embedding"]:
            axis = -1  # a row of the table
        else:
            continue
        w, d = np.asarray(w, np.float64), np.asarray(d, np.float64)
        half_step = np.abs(w).max(axis, keepdims=True) / 254
        assert (np.abs(w - d) <= half_step * (1 + 1e-5) + 1e-12).all(), names
        checked.add(names[-1])
    assert {"kernel", "embedding"} <= checked and (arch != "moe" or {"w_in", "w_out"} <= checked), checked


def test_moe_router_stays_float():
    qm = quant.Int8LM(llmjax.build_model(config("moe", scan_layers=False), seed=0))
    layer = qm.weights["blocks"]["layers"][0]["mlp"]
    assert layer["router"]["kernel"][...].dtype == jnp.float32 and layer["w_in"]["q"][...].dtype == jnp.int8


@pytest.mark.parametrize("arch", ["vanilla", "ssm", "mla"])
def test_decoding_through_the_quantized_model(arch):
    m = scale_params(llmjax.build_model(config(arch, scan_layers=False), seed=4), 3.0)
    qm = quant.Int8LM(m)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    got = generate(qm, prompts, 12, sampling=Sampling(greedy=True))
    assert got == generate(_float_of(qm), prompts, 12, sampling=Sampling(greedy=True))


def test_scoring_through_the_quantized_model():
    from llmjax.scoring import Scorer

    m = scale_params(llmjax.build_model(config("gqa", scan_layers=False), seed=4), 3.0)
    qm = quant.Int8LM(m)
    pairs = [([1, 2, 3], [4, 5]), ([9] * 30, [3])]
    got = Scorer.for_model(qm, 2).score(pairs)
    want = Scorer.for_model(_float_of(qm), 2).score(pairs)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-5)
    assert quant.apply(m, "none") is m
    with pytest.raises(ValueError, match="--quantize must be"):
        quant.apply(m, "int4")
