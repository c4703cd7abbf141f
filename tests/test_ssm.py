"""The selective state-space layer: the chunked parallel scan against the step-by-step recurrence,
state carried across calls, padding, and stability over long sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmjax
import reference
from helpers import config
from llmjax.config import ConfigError
from llmjax.models import selective_scan as fused
from llmjax.models.ssm import SelectiveSSM, causal_conv, scan_chunked, scan_reference


def _inputs(key, B=2, T=37, E=6, N=4):
    k = jax.random.split(jax.random.key(key), 6)
    delta = jax.nn.softplus(jax.random.normal(k[0], (B, T, E)))
    u = jax.random.normal(k[1], (B, T, E))
    Bm = jax.random.normal(k[2], (B, T, N))
    Cm = jax.random.normal(k[3], (B, T, N))
    A = -jnp.exp(jax.random.normal(k[4], (E, N)))
    h0 = jax.random.normal(k[5], (B, E, N))
    return delta, u, Bm, Cm, A, h0


@pytest.mark.parametrize("chunk", [1, 4, 16, 37, 64])
def test_parallel_scan_equals_the_recurrence(chunk):
    delta, u, Bm, Cm, A, h0 = _inputs(0)
    valid = jnp.ones(u.shape[:2], bool)
    y, h = jax.jit(scan_chunked, static_argnums=7)(delta, u, Bm, Cm, A, h0, valid, chunk)
    y_ref, h_ref = jax.jit(scan_reference)(delta, u, Bm, Cm, A, h0)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)


def test_gradients_of_the_chunked_scan_match_the_recurrence():
    delta, u, Bm, Cm, A, h0 = _inputs(1)
    valid = jnp.ones(u.shape[:2], bool)
    f = lambda *a: jnp.sum(scan_chunked(*a, h0, valid, 8)[0] ** 2)  # noqa: E731
    g = lambda *a: jnp.sum(scan_reference(*a, h0)[0] ** 2)  # noqa: E731
    for a, b in zip(jax.grad(f, argnums=(0, 1, 2, 3, 4))(delta, u, Bm, Cm, A), jax.grad(g, argnums=(0, 1, 2, 3, 4))(delta, u, Bm, Cm, A)):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()), rtol=1e-4)


@pytest.mark.parametrize("B,T,E,N", [(2, 37, 16, 4), (1, 8, 24, 2), (3, 1, 64, 8), (1, 40, 72, 16)])
def test_the_fused_kernel_equals_the_recurrence_in_values_and_gradients(B, T, E, N):
    """The Pallas kernel (in the interpreter here; compiled for a GPU in tests/test_aot.py) and its
    hand-written backward pass against the step-by-step recurrence differentiated by JAX: y, the last
    state, and the gradient of every input including the starting state and the last state's
    cotangent; odd lengths (padded to a power of two inside) and channel blocks of 8 to 64."""
    delta, u, Bm, Cm, A, h0 = _inputs(2, B, T, E, N)
    y, h = fused.selective_scan(delta, u, Bm, Cm, A, h0, True)
    y_ref, h_ref = scan_reference(delta, u, Bm, Cm, A, h0)
    np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    k1, k2 = jax.random.split(jax.random.key(9))
    wy, wh = jax.random.normal(k1, y.shape), jax.random.normal(k2, h.shape)

    def loss(scan_fn):
        return lambda *a: jnp.sum(scan_fn(*a)[0] * wy) + jnp.sum(scan_fn(*a)[1] * wh)

    got = jax.grad(loss(lambda *a: fused.selective_scan(*a, True)), argnums=range(6))(delta, u, Bm, Cm, A, h0)
    want = jax.grad(loss(scan_reference), argnums=range(6))(delta, u, Bm, Cm, A, h0)
    for name, a, b in zip(("delta", "u", "B", "C", "A", "h0"), got, want):
        assert float(jnp.abs(b).max()) > 0, name
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()), rtol=1e-4, err_msg=name)


def test_the_fused_backward_keeps_one_state_a_chunk_not_every_state():
    """The gradient's pass recomputes the states a chunk at a time from checkpoints (one state
    every `CHUNK` steps) instead of writing every step's (B, T, E, N) state and reading it back:
    3.2 GB a layer and step for the default ssm at batch 16 x 1024, 2.5 of its 3.9 GB outside GEMMs
    (compiled for an H100, docs/benchmarks.md)."""
    B, T, E, N = 2, 37, 16, 4
    delta, u, Bm, Cm, A, h0 = _inputs(2, B, T, E, N)
    states = _kept_states(delta, u, Bm, Cm, A, h0)
    assert states and all(s[1] <= -(-64 // fused.CHUNK) for s in states), states


def _kept_states(delta, u, Bm, Cm, A, h0):
    """The shapes (B, n, E, N) of every state-sized array the fused scan's gradient makes, traced
    afresh (a new function: make_jaxpr keeps a function's trace)."""
    grad = jax.grad(lambda *a: jnp.sum(fused.selective_scan(*a, True)[0] ** 2), argnums=range(6))

    def shapes(jaxpr):
        out = [v.aval.shape for e in jaxpr.eqns for v in e.outvars if hasattr(v.aval, "shape")]
        for sub in jax.extend.core.subjaxprs(jaxpr):
            out += shapes(sub)
        return out

    return [s for s in shapes(jax.make_jaxpr(grad)(delta, u, Bm, Cm, A, h0).jaxpr) if len(s) == 4 and s[0] == u.shape[0] and s[2:] == A.shape]


def test_the_backward_chunk_changes_no_gradient(monkeypatch):
    """LLMJAX_SSM_BACKWARD_CHUNK (gpu_check's sweep) moves the backward's kept states, not its
    values: chunks of 1 and 16 steps give the default's gradients; a bad value is one line. Each
    setting really runs (the kept states (B, 32 / chunk, E, N)): once read inside the kernels' jits,
    the first setting's trace served every later one in the process (jit's cache keys no environment),
    and this test compared the default with itself."""
    from llmjax.config import ConfigError

    delta, u, Bm, Cm, A, h0 = _inputs(3, 2, 19, 16, 4)  # (padded to 32 steps; 46 s of the suite with 37 and 1, 4, 64)
    grad = lambda: jax.grad(lambda *a: jnp.sum(fused.selective_scan(*a, True)[0] ** 2), argnums=range(6))(delta, u, Bm, Cm, A, h0)  # noqa: E731
    want = grad()
    for every in ("1", "16"):
        monkeypatch.setenv("LLMJAX_SSM_BACKWARD_CHUNK", every)
        assert fused.backward_chunk() == int(every)
        assert set(_kept_states(delta, u, Bm, Cm, A, h0)) == {(2, 32 // int(every), 16, 4)}, every
        for a, b in zip(grad(), want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(jnp.abs(b).max()))
    monkeypatch.setenv("LLMJAX_SSM_BACKWARD_CHUNK", "6")
    with pytest.raises(ConfigError, match=r"^LLMJAX_SSM_BACKWARD_CHUNK must be a power of two .* got '6'$"):
        fused.backward_chunk()


def test_the_fused_kernel_block_and_support():
    assert [fused.block_e(e) for e in (1536, 768, 128, 24, 8, 6, 100)] == [64, 64, 64, 8, 8, None, None]
    assert fused.supported(1536, 16) and not fused.supported(1536, 12) and not fused.supported(6, 4)


def test_the_layer_runs_the_fused_kernel_alike():
    """scan_impl='pallas' (the GPU default) and 'xla' give the same layer outputs, decode state and
    parameter gradients, with padding positions in the input."""
    cfgs = {impl: llmjax.model_config(config("ssm", scan_impl=impl)) for impl in ("xla", "pallas")}
    layers = {impl: SelectiveSSM(c, rngs=nnx.Rngs(3)) for impl, c in cfgs.items()}
    x = jax.random.normal(jax.random.key(4), (2, 21, 64))
    pos = jnp.concatenate([jnp.full((2, 3), -1), jnp.broadcast_to(jnp.arange(18), (2, 18))], axis=1)

    def run(m):
        out, cache = m(x, pos, m.init_cache(2, 0, jnp.float32))
        return jnp.sum(out**2) + jnp.sum(cache["h"]), (out, cache["h"])

    results = {impl: nnx.grad(run, has_aux=True)(m) for impl, m in layers.items()}
    (g_x, (o_x, h_x)), (g_p, (o_p, h_p)) = results["xla"], results["pallas"]
    np.testing.assert_allclose(o_p, o_x, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h_p, h_x, atol=1e-5, rtol=1e-5)
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(g_p)), jax.tree_util.tree_leaves_with_path(nnx.state(g_x))):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()) + 1e-7, rtol=1e-3, err_msg=str(path))


@pytest.mark.parametrize("d_conv", [0, 2, 4])
def test_two_halves_with_the_state_carried_equal_one_pass(d_conv):
    ssm = SelectiveSSM(llmjax.model_config(config("ssm", d_conv=d_conv)), rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 30, 64))
    pos = jnp.broadcast_to(jnp.arange(30), (2, 30))
    full, cache = ssm(x, pos, ssm.init_cache(2, 0, jnp.float32))
    first, mid = ssm(x[:, :13], pos[:, :13], ssm.init_cache(2, 0, jnp.float32))
    second, end = ssm(x[:, 13:], pos[:, 13:], mid)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, atol=1e-5, rtol=1e-5)
    assert set(end) == ({"h", "conv"} if d_conv else {"h"})
    for key in end:
        np.testing.assert_allclose(end[key], cache[key], atol=1e-5, rtol=1e-5)
    # Padding tokens (position -1) leave the state exactly as it was.
    _, same = ssm(x[:, :5], jnp.full((2, 5), -1), mid)
    for key in mid:
        np.testing.assert_array_equal(same[key], mid[key])


def conv_reference(u, valid, w, b, state):
    """Each row's tokens that are not padding, one at a time, after the K-1 held inputs: float64."""
    u, w, b = (np.asarray(a, np.float64) for a in (u, w, b))
    K, (B, T, E) = w.shape[0], u.shape
    y, new = np.zeros((B, T, E)), []
    for r in range(B):
        held = list(np.asarray(state[r], np.float64))
        for t in np.flatnonzero(valid[r]):
            held.append(u[r, t])
            y[r, t] = (w * np.stack(held[-K:])).sum(0) + b
        new.append(np.stack(held[-(K - 1) :]))
    return y, np.stack(new)


@pytest.mark.parametrize("K", [2, 4, 7])
def test_the_causal_convolution_skips_padding_wherever_it_sits(K):
    """With a held state (decoding): every token's window is its own row's last K tokens that are not
    padding, padding anywhere in the row (a ragged prefill pads on the right, the sampler on the
    left, a finished row's step is all padding); the new state is the row's last K-1 inputs.
    Without one: zeros before the start, padding before or after the tokens as a zero input."""
    rng = np.random.default_rng(K)
    B, T, E = 4, 11, 6
    u, st = rng.normal(size=(B, T, E)), rng.normal(size=(B, K - 1, E))
    w, b = rng.normal(size=(K, E)), rng.normal(size=(E,))
    valid = rng.random((B, T)) > 0.4
    valid[2] = False  # a row that is all padding keeps its state
    valid[3, :5], valid[3, 5:] = False, True  # left padding
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    y, new = jax.jit(causal_conv)(f32(u), jnp.asarray(valid), f32(w), f32(b), f32(st))
    y_ref, new_ref = conv_reference(u, valid, w, b, st)
    np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(new, new_ref, atol=1e-6)
    np.testing.assert_array_equal(new[2], f32(st[2]))
    # one decoded token per row (its own path): a padding row keeps its state exactly
    held = f32(st)
    for t in range(T):
        y1, held = jax.jit(causal_conv)(f32(u[:, t : t + 1]), jnp.asarray(valid[:, t : t + 1]), f32(w), f32(b), held)
        np.testing.assert_allclose(np.asarray(y1[:, 0])[valid[:, t]], y_ref[:, t][valid[:, t]], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(held, new_ref, atol=1e-6)
    np.testing.assert_array_equal(held[2], f32(st[2]))
    # no state: the start of each sequence, left or right padding as zeros
    ends = np.arange(T)[None] < np.array([[T], [7], [T], [T]])  # row 1 right-padded
    starts = np.arange(T)[None] >= np.array([[0], [0], [4], [0]])  # row 2 left-padded
    valid = ends & starts
    y, _ = jax.jit(causal_conv)(f32(u), jnp.asarray(valid), f32(w), f32(b))
    y_ref, _ = conv_reference(u, valid, w, b, np.zeros((B, K - 1, E)))
    np.testing.assert_allclose(np.asarray(y)[valid], y_ref[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d_conv", [0, 4])
def test_the_layer_matches_a_float64_reference_of_mambas_mixer(d_conv):
    """The whole mixer (projections, convolution and SiLU, step sizes, scan, D skip, gate) against
    tests/reference.py's token-by-token float64 version, in one pass and decoded in pieces."""
    cfg = llmjax.model_config(config("ssm", d_conv=d_conv))
    m = SelectiveSSM(cfg, rngs=nnx.Rngs(5))
    if d_conv:  # larger than at initialisation, so that a wrong tap or offset shows
        m.conv_weight[...] = 3 * m.conv_weight[...]
    m.D[...] = m.D[...] + jax.random.normal(jax.random.key(8), m.D.shape)  # (ones at initialisation: a dropped D would pass)
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
    x = jax.random.normal(jax.random.key(7), (2, 19, cfg.d_model))
    want = np.stack([reference.selective_ssm(x[r], p, cfg) for r in range(2)])
    pos = jnp.broadcast_to(jnp.arange(19), (2, 19))
    got, _ = m(x, pos, None)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    cache, outs = m.init_cache(2, 0, jnp.float32), []
    for a, b in ((0, 6), (6, 7), (7, 8), (8, 19)):
        out, cache = m(x[:, a:b], pos[:, a:b], cache)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=1e-5, rtol=1e-4)
    if d_conv:  # and the convolution matters
        assert np.abs(want - reference.selective_ssm(x[0], {**p, "conv_weight": 0 * p["conv_weight"]}, cfg)[None]).max() > 1e-3


def test_bad_convolution_widths_are_one_line_errors():
    for bad in (-1, 1):
        with pytest.raises(ConfigError, match=f"model.d_conv must be 0 \\(no convolution\\) or a width of at least 2 \\(Mamba: 4\\), got {bad}"):
            llmjax.model_config(config("ssm", d_conv=bad))


def test_state_stays_finite_and_bounded_over_16k_steps():
    m = llmjax.build_model(config("ssm"), seed=5)
    toks = jax.random.randint(jax.random.key(6), (1, 16384), 0, 65)
    gd, st = nnx.split(m)

    @jax.jit
    def run(st, toks):
        def step(cache, tok_pos):
            tok, pos = tok_pos
            _, cache, _ = nnx.merge(gd, st)(tok[None, None], positions=pos[None, None], cache=cache)
            return cache, jnp.abs(cache["h"]).max()

        cache = nnx.merge(gd, st).init_cache(1, 1)
        return jax.lax.scan(step, cache, (toks[0], jnp.arange(toks.shape[1])))

    cache, peaks = run(st, toks)
    assert bool(jnp.isfinite(peaks).all())
    assert float(peaks.max()) < 100.0
    assert float(peaks[-4096:].max()) <= 2 * float(peaks[:4096].max()) + 1.0  # no drift upwards


def test_the_step_size_bias_is_added_in_float32_in_a_bf16_model():
    """delta = softplus(dt_in W_dt + b_dt): the bias (about -4.6 to -6.9 at initialisation) is added in
    float32, as Mamba adds its delta_bias; added in bf16 it put delta off by 0.7% (median) and 3%
    (max) of its float64 value; now only the bf16 product's rounding remains. (Without the
    convolution, so that u is in_proj's output here as in the model.)"""
    m = SelectiveSSM(llmjax.model_config(config("ssm", dtype="bfloat16", d_conv=0)), rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (4, 64, 64)).astype(jnp.bfloat16)
    delta = np.asarray(m._inputs(x)[0], np.float64)
    u, _ = jnp.split(m.in_proj(x), 2, axis=-1)
    dt_in = np.asarray(jnp.split(m.x_proj(u), [m.R, m.R + m.N], axis=-1)[0], np.float64)
    want = np.log1p(np.exp(dt_in @ np.asarray(m.dt_proj.kernel[...], np.float64) + np.asarray(m.dt_proj.bias[...], np.float64)))
    rel = np.abs(delta - want) / want
    assert np.median(rel) < 1e-3 and rel.max() < 5e-3, (np.median(rel), rel.max())
