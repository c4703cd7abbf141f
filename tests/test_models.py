"""The contract suite: every registered architecture passes the same tests, under every config
option that changes its computation. A new architecture joins by registering itself and shipping
configs/<arch>.py with a `tiny` variant; OPTIONS and EXACT_PARAMS below must name it (a test fails
until they do)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import llmjax
import llmjax.models  # noqa: F401  (registers every architecture)
from llmjax import runtime
from helpers import config, load_params, model, params, perturb_vectors, scale_params, tokens
from llmjax.models.layers import PADDED_LOGIT, convert_layer_layout

ARCHS = sorted(llmjax.ARCHS)

# Config options that change the computation, per architecture (on top of the tiny variant).
COMMON = [{}, {"scan_layers": False}, {"remat": "full"}, {"remat": "dots", "scan_layers": False}, {"matmul_dtype": "bfloat16"}]
OPTIONS = {
    # (attention narrower than d_model, no padded vocabulary rows, the remat policy COMMON lacks)
    "vanilla": COMMON + [{"bias": False, "head_dim": 8, "padded_vocab_size": 65, "remat": "dots_no_batch"}],
    "gqa": COMMON + [{"n_kv_head": 1}, {"n_kv_head": 4}],
    "modern": COMMON + [{"n_kv_head": 2, "head_dim": 12, "rope_base": 500.0}, {"n_kv_head": 1, "scan_layers": False}],
    "mla": COMMON + [{"q_lora_rank": 24}, {"v_head_dim": 32, "kv_lora_rank": 8}, {"qk_rope_dim": 16, "scan_layers": False}],
    "linformer": COMMON + [{"block_size": 3, "rank": 5}, {"block_size": 48, "rank": 2, "scan_layers": False}],
    "moe": COMMON
    + [
        {"moe_mode": "capacity", "capacity_factor": 8.0},
        {"moe_mode": "capacity", "capacity_factor": 0.5},  # drops: still causal
        {"top_k": 1, "scan_layers": False},
        {"moe_impl": "blocked", "moe_block_rows": 4},  # (the tiny shapes' `auto` is dense)
        {"moe_impl": "ragged_dot", "scan_layers": False, "top_k": 4},  # (every expert)
        {"moe_impl": "gather"},  # (`auto` picks it for decoding one row)
    ],
    "ssm": COMMON
    + [
        # a convolution window (7) longer than the 4-token and 1-token decode steps
        {"scan_chunk": 3, "d_conv": 7, "dt_rank": 1},
        # the S6 layer alone (the tiny variant has Mamba's width 4)
        {"scan_chunk": 64, "d_state": 4, "scan_layers": False, "d_conv": 0},
        {"scan_impl": "pallas", "d_conv": 2},
    ],
}
CASES = [(arch, opts) for arch in ARCHS for opts in OPTIONS.get(arch, [{}])]
# Cached decoding routes every token (no capacity drops), so it equals the full forward only where
# the full forward drops nothing.
# Options that change decoding only (the full forward is the same computation): cached-decoding cases.
DECODE_OPTIONS = {  # the fused decode kernels (Pallas' interpreter here): attention step, norms
    # (vanilla's second case without biases: LayerNorm without one in the norm kernel, no output projection's bias
    # for the residual norm's kernel to add; gqa and moe run both kernels with them)
    "vanilla": [{"decode_attention_impl": "pallas"}, {"bias": False, "decode_attention_impl": "pallas", "decode_norm_impl": "pallas"},
                {"decode_attention_impl": "pallas", "matmul_dtype": "bfloat16"}],
    "gqa": [{"decode_attention_impl": "pallas"},
            {"n_kv_head": 1, "decode_attention_impl": "pallas", "decode_norm_impl": "pallas", "scan_layers": False},
            {"decode_attention_impl": "pallas", "matmul_dtype": "bfloat16"}],
    "modern": [{"n_kv_head": 2, "decode_attention_impl": "pallas", "decode_norm_impl": "pallas"},
               {"decode_attention_impl": "pallas", "matmul_dtype": "bfloat16"}],
    "moe": [{"decode_attention_impl": "pallas", "decode_norm_impl": "pallas", "scan_layers": False},
            {"decode_attention_impl": "pallas", "matmul_dtype": "bfloat16"}],
    "mla": [{"decode_norm_impl": "pallas", "decode_attention_impl": "pallas"},
            {"decode_attention_impl": "pallas", "matmul_dtype": "bfloat16", "q_lora_rank": 24}],
    "linformer": [{"decode_norm_impl": "pallas", "scan_layers": False}],
    "ssm": [{"decode_norm_impl": "pallas"}],
}
CACHE_CASES = [(arch, opts) for arch, opts in CASES if opts.get("capacity_factor", 1.0) >= 1.0] + [
    (arch, opts) for arch in ARCHS for opts in DECODE_OPTIONS.get(arch, [])
]


def case_id(case):
    arch, opts = case
    return arch + ("" if not opts else "-" + "-".join(f"{k}={v}" for k, v in opts.items()))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_has_options_and_counts(arch):
    """A new architecture is asked for its entries here (selectable with -k ARCH)."""
    assert arch in OPTIONS, f"add {arch}'s computation-changing config options to OPTIONS in tests/test_models.py"
    assert arch in DECODE_OPTIONS, (f"add {arch}'s decode-only options (decode_norm_impl='pallas', and decode_attention_impl='pallas' "
                                    "where its config has fused_decode_attention) to DECODE_OPTIONS in tests/test_models.py")
    assert arch in EXACT_PARAMS, f"add {arch}'s parameter-count formula, f(ModelConfig) -> int, to EXACT_PARAMS in tests/test_models.py"


# Optional model keys that need no decode case of their own with the fused decode-attention kernel:
# the kernels' own switches, and the MoE's expert products (after the attention).
DECODE_KERNEL_AGNOSTIC = {"decode_attention_impl", "decode_norm_impl", "moe_impl", "moe_block_rows"}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_optional_model_key_runs_through_the_contract_suite(arch):
    """A config option added to an architecture (a field with a default, as the README asks, e.g.
    `qk_norm: bool = False`) is never run by the contract suite at its default: the tiny variant
    keeps it off. So every such key must be set to another value in OPTIONS (causality, cached
    decoding, ...) or DECODE_OPTIONS, and, where the architecture decodes through the fused
    attention kernel (on a GPU by default), in a DECODE_OPTIONS case with
    decode_attention_impl='pallas' too: a change made in the full forward but not in
    Attention._fused_decode passes every CPU test otherwise and is silently dropped when a GPU decodes."""
    cls = llmjax.ARCHS[arch].config_class
    optional = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    if not cls.fused_decode_attention:
        optional.pop("decode_attention_impl")  # (refused for it)
    cases = OPTIONS.get(arch, []) + DECODE_OPTIONS.get(arch, [])
    untested = [k for k, d in optional.items() if not any(k in c and c[k] != d for c in cases)]
    assert not untested, (f"add a case with model.{untested[0]} set to another value than its default {optional[untested[0]]!r} to "
                          f"OPTIONS['{arch}'] in tests/test_models.py (DECODE_OPTIONS where it changes decoding only)")
    if cls.fused_decode_attention:
        fused = [c for c in DECODE_OPTIONS.get(arch, []) if c.get("decode_attention_impl") == "pallas"]
        untested = [k for k, d in optional.items() if k not in DECODE_KERNEL_AGNOSTIC and not any(k in c and c[k] != d for c in fused)]
        assert not untested, (f"add a case with model.{untested[0]} set to another value than its default and "
                              f"decode_attention_impl='pallas' to DECODE_OPTIONS['{arch}'] in tests/test_models.py: a GPU decodes "
                              "through that kernel (Attention._fused_decode), which the other cases never run")


@pytest.mark.parametrize("arch", ARCHS)
def test_the_aux_losses_a_config_declares_are_those_its_model_returns(arch):
    """config_class.aux_losses (what validate lets train.aux_loss_weights name) against the model's
    own `aux` (the trainer refuses a returned loss without a weight)."""
    m = model(arch)
    aux = jax.eval_shape(lambda t: m(t)[2], jax.ShapeDtypeStruct((1, 8), jnp.int32))
    assert sorted(k for k in aux if k != "stats") == sorted(type(m.cfg).aux_losses)


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_dtypes(arch):
    m = model(arch)
    cfg = m.cfg
    toks = tokens(0, 3, 17)
    logits, cache, aux = m(toks)
    assert logits.shape == (3, 17, cfg.padded_vocab_size) and logits.dtype == jnp.float32
    assert cache is None and isinstance(aux, dict)
    # Float leaves in the requested dtype, except running sums and recurrent states, which may
    # stay float32 for accuracy; integer leaves (counters) are allowed.
    floats = lambda c: [a for a in jax.tree.leaves(c) if jnp.issubdtype(a.dtype, jnp.floating)]  # noqa: E731
    assert all(a.dtype == jnp.float32 for a in floats(m.init_cache(3, 32)))
    assert all(a.dtype in (jnp.bfloat16, jnp.float32) for a in floats(m.init_cache(3, 32, jnp.bfloat16)))
    assert any(a.dtype == jnp.bfloat16 for a in floats(m.init_cache(3, 32, jnp.bfloat16))) or arch == "ssm"
    for p in jax.tree.leaves(params(m)):
        assert p.dtype == jnp.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_a_16bit_models_default_cache_is_16bit(arch):
    """init_cache without a dtype, as the sampler calls it, makes a bfloat16 model's cache in bfloat16 (a
    recurrent state may stay float32), as init_cache(..., bfloat16) does. A float32 default passes every
    value test (a bfloat16 key widened to float32 and read back as bfloat16 is itself) and doubles the
    memory of every decode (test_shapes_and_dtypes builds float32 models, where the two agree)."""
    m = nnx.eval_shape(lambda: llmjax.build_model(config(arch, dtype="bfloat16"), seed=0))
    dtypes = lambda *a: jax.tree.map(lambda x: x.dtype, jax.eval_shape(lambda: m.init_cache(2, 32, *a)))  # noqa: E731
    assert dtypes() == dtypes(jnp.bfloat16)


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_eps_and_rope_base_reach_the_model(arch):
    """Config numbers that change no parameter's shape, model.norm_eps and (rotary architectures)
    model.rope_base, change the logits of the same weights. The contract suite compares a model with
    itself, and every config and reference test runs norm_eps 1e-5 and rope_base 10000: LayerNorms
    built without their epsilon (flax's default, 1e-6) or attention built with a fixed rotary base
    passed every test."""
    base = scale_params(llmjax.build_model(config(arch), seed=8), 3.0)
    toks = tokens(12, 2, 16)
    fwd = lambda m: np.asarray(nnx.jit(lambda m, t: m(t)[0])(m, toks)[..., : base.cfg.vocab_size])  # noqa: E731
    want = fwd(base)
    keys = [("norm_eps", 0.25)] + ([("rope_base", 37.0)] if hasattr(base.cfg, "rope_base") else [])
    for key, value in keys:
        other = load_params(llmjax.build_model(config(arch, **{key: value}), seed=0), params(base))
        got = fwd(other)
        assert np.abs(got - want).max() > 1e-2 * np.abs(want).max(), f"model.{key}={value} changed no logit"


@pytest.mark.parametrize("arch", ARCHS)
def test_jit_equals_eager(arch):
    m = model(arch)
    toks = tokens(1, 2, 20)
    eager = m(toks)[0]
    jitted = nnx.jit(lambda m, t: m(t)[0])(m, toks)
    np.testing.assert_allclose(jitted, eager, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_half_precision_close_to_float32(arch, dtype):
    """Same weights, bf16 (or fp16) compute: logits within bf16 rounding of float32 (about 1% of
    their size). (float16 failed to compile on CPUs for the architectures with XLA's attention.)"""
    m32 = scale_params(llmjax.build_model(config(arch), seed=3), 2.0)
    m16 = load_params(llmjax.build_model(config(arch, dtype=dtype), seed=0), params(m32))
    toks = tokens(2, 4, 48)
    V = m32.cfg.vocab_size
    l32, l16 = m32(toks)[0][..., :V], m16(toks)[0][..., :V]
    err = jnp.abs(l32 - l16)
    assert err.mean() < 0.02 * jnp.abs(l32).mean(), err.mean()
    if arch != "moe":  # a router's top-k choice may flip under bf16 rounding: large, rare, expected
        assert err.max() < 0.05 * jnp.abs(l32).max(), err.max()
    loss32 = llmjax.cross_entropy(l32[:, :-1], toks[:, 1:])
    loss16 = llmjax.cross_entropy(l16[:, :-1], toks[:, 1:])
    assert abs(float(loss32 - loss16)) < 1e-3 * float(loss32)


@pytest.mark.parametrize("arch", ARCHS)
def test_narrow_matmuls_close_to_float32(arch):
    """Same weights, matmul_dtype='bfloat16': logits within bfloat16 rounding of float32, and not
    equal to them (the parameter matmuls did take rounded operands)."""
    m32 = scale_params(llmjax.build_model(config(arch), seed=3), 2.0)
    mbf = load_params(llmjax.build_model(config(arch, matmul_dtype="bfloat16"), seed=0), params(m32))
    assert mbf.cfg.narrow_matmuls == jnp.bfloat16 and m32.cfg.narrow_matmuls is None
    toks = tokens(2, 4, 48)
    V = m32.cfg.vocab_size
    l32, lbf = m32(toks)[0][..., :V], mbf(toks)[0][..., :V]
    assert lbf.dtype == jnp.float32
    err = jnp.abs(l32 - lbf)
    assert err.mean() < 0.02 * jnp.abs(l32).mean(), err.mean()
    assert err.max() > 1e-4 * jnp.abs(l32).max()
    if arch != "moe":  # (a router's top-k choice may flip: large, rare, expected)
        assert err.max() < 0.05 * jnp.abs(l32).max(), err.max()
    loss32 = llmjax.cross_entropy(l32[:, :-1], toks[:, 1:])
    lossbf = llmjax.cross_entropy(lbf[:, :-1], toks[:, 1:])
    assert abs(float(loss32 - lossbf)) < 1e-3 * float(loss32)


def _mixed_dots(jaxpr, out):
    """(operand shapes, name stack) of every dot_general with one float32 and one bfloat16 operand."""
    import jax.extend

    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and {str(v.aval.dtype) for v in eqn.invars} == {"float32", "bfloat16"}:
            out.append(([v.aval.shape for v in eqn.invars], str(eqn.source_info.name_stack)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _mixed_dots(sub, out)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_training_gradient_widens_no_product(arch):
    """The training loss's gradient of a bfloat16 model, traced as for a GPU: no product takes a
    float32 and a bfloat16 operand. That mix is what JAX's transpose of a bf16 x bf16 -> float32
    product gives (the float32 gradient times the bf16 operand, widened), and on a GPU it runs as a
    tf32 GEMM at half the bf16 rate: on an H200 the tied head's two backward products took 7.8 of
    vanilla's 39 ms step. (XLA's attention is left out: on a GPU attention runs in cuDNN.)"""
    from llmjax.loss import token_losses

    m = llmjax.build_model(config(arch, "small", dtype="bfloat16", attention_impl="xla"), seed=0)
    graphdef, state = nnx.split(m)
    toks = tokens(0, 2, 65)

    def loss(state):
        mm = nnx.merge(graphdef, state)
        x, _, _ = mm.features(toks[:, :-1])
        return token_losses(mm.embed, x, toks[:, 1:]).mean()

    with runtime.compiling_for("gpu"):  # (layers.dot32 widens on the CPU only)
        found = _mixed_dots(jax.make_jaxpr(jax.grad(loss))(state).jaxpr, [])
    assert not [f for f in found if "BNTS" not in f[1]], found  # (jax.nn's XLA attention: 'BTNH,BSNH->BNTS')


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_causality(case):
    """Changing any token after position t never changes the logits at positions <= t (and does
    change later ones, so the test can fail)."""
    arch, opts = case
    m = scale_params(llmjax.build_model(config(arch, **opts), seed=1), 10.0)
    fwd = nnx.jit(lambda m, t: m(t)[0])
    T = 20  # (test_cached_decoding_matches_full_forward's shape: one compile serves both)
    base = tokens(3, 2, T)
    ref = fwd(m, base)
    other = (base + 1 + tokens(10, 2, T) % 60) % 65  # (every token other than base's)
    ref = np.asarray(ref)
    for t in range(T - 1):  # (every cut, not four: a leak at one position, a Linformer block's edge say, is caught here too)
        out = np.asarray(fwd(m, base.at[:, t + 1 :].set(other[:, t + 1 :])))
        np.testing.assert_array_equal(out[:, : t + 1], ref[:, : t + 1], err_msg=f"t={t}")
        assert np.abs(out[:, t + 1 :] - ref[:, t + 1 :]).max() > 1e-4, f"later logits did not change (t={t})"


def assert_logits_close(got, want, *, narrow: bool, err_msg: str = ""):
    """Cached against full-forward logits: within 1e-4 in float32; with bfloat16 matmul operands
    within bfloat16's rounding, 2^-7 of the logit scale (see test_cached_decoding_matches_full_forward)."""
    if not narrow:
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=err_msg)
    else:
        # (the scale of the real vocabulary's logits: the padded columns' PADDED_LOGIT, -1e9, made any error pass)
        err, scale = float(jnp.abs(got - want).max()), float(jnp.abs(jnp.where(want == PADDED_LOGIT, 0.0, want)).max())
        assert err < 2.0**-7 * scale, f"{err_msg}: {err} >= 2^-7 * {scale}"


def assert_same_greedy_tokens(got, want, bound: float):
    """Each position's argmax agrees, or the two tokens are a near-tie in `want` (within `bound`):
    a rounding difference may flip such a choice, never a clear one."""
    a, b = np.asarray(got.argmax(-1)), np.asarray(want.argmax(-1))
    w = np.asarray(want)
    gap = np.take_along_axis(w, b[..., None], -1) - np.take_along_axis(w, a[..., None], -1)
    assert (gap[..., 0][a != b] <= bound).all(), (np.argwhere(a != b), gap[..., 0][a != b])
    assert (a == b).mean() > 0.95


@pytest.mark.parametrize("case", CACHE_CASES, ids=case_id)
def test_cached_decoding_matches_full_forward(case):
    """Prefill in chunks, then one token at a time: every step's logits equal the full forward's at
    that position (float32, 1e-4). Includes rows that sit at different positions in one batch.
    With bfloat16 matmul operands the two paths round at the same points but sum in float32 in a
    different order (a 1-token query against a 20-token one), and a last-bit difference can move an
    operand across a bfloat16 rounding boundary: there the bound is bfloat16's, 2^-7 of the logit
    scale (which of the two happens depends on the CPU: AMX and AVX-512 machines order the sums
    differently)."""
    arch, opts = case
    close = functools.partial(assert_logits_close, narrow="matmul_dtype" in opts)
    m = perturb_vectors(scale_params(llmjax.build_model(config(arch, **opts), seed=2), 5.0))
    B, T = 2, 20
    toks = tokens(4, B, T)
    full = nnx.jit(lambda m, t: m(t)[0])(m, toks)
    step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c)[:2])

    cache = m.init_cache(B, 32)
    start = 0
    # three step shapes (each compiles once): a 7-token prefill, 4-token chunks after it and
    # between single steps, single steps
    for size in (7, 4, 1, 1, 1, 1, 4, 1):
        pos = jnp.broadcast_to(jnp.arange(start, start + size), (B, size))
        logits, cache = step(m, toks[:, start : start + size], pos, cache)
        close(logits, full[:, start : start + size], err_msg=f"chunk at {start}")
        start += size
    assert start == T

    # Ragged batch: row 0 has a 4-token prompt, row 1 a 7-token one, right-padded to 7 with junk
    # tokens at position -1; each row then decodes from its own position and must match its own
    # full forward.
    lengths = jnp.array([4, 7])
    pad = jnp.arange(7) >= lengths[:, None]
    prompt = jnp.where(pad, 63, toks[:, :7])
    cache = m.init_cache(B, 32)
    logits, cache = step(m, prompt, jnp.where(pad, -1, jnp.arange(7)), cache)
    for b in range(B):
        close(logits[b, : lengths[b]], full[b, : lengths[b]])
    for i in range(6):
        pos = (lengths + i)[:, None]
        nxt = jnp.take_along_axis(toks, pos, axis=1)
        logits, cache = step(m, nxt, pos, cache)
        want = jnp.take_along_axis(full, pos[:, :, None], axis=1)
        close(logits, want, err_msg=f"ragged step {i}")


@pytest.mark.parametrize("arch", ["linformer", "mla", "ssm", "modern"])
def test_bfloat16_decode_states_stay_causal_and_track_the_full_forward(arch):
    """dtype='bfloat16' (what the default variants train in), for the architectures that decode
    through a state of their own (the Linformer's block and float32 running sums, MLA's latent and
    absorbed projections, the SSM's recurrence and convolution window), and modern through the fused
    attention kernel too (rotary positions, grouped heads: a GPU's path): causal bit for bit, and
    cached decoding through the fused norms (a GPU's path), chunked prefill and rows at different
    positions, within bfloat16's rounding of the full forward. The two round at different points
    (the Linformer's decode keeps its sums in float32 where the full forward rounds their mean; the
    kernel orders its softmax sums otherwise than XLA), so the bound is 2^-5 of the logit scale,
    about twice what these models need (modern 0.55 of it, the others 0.15-0.41; the attention
    architectures decode XLA's way bit for bit)."""
    test_causality((arch, {"dtype": "bfloat16"}))
    fused = {"decode_attention_impl": "pallas"} if llmjax.ARCHS[arch].config_class.fused_decode_attention else {}
    m = perturb_vectors(scale_params(llmjax.build_model(config(arch, dtype="bfloat16", decode_norm_impl="pallas", **fused), seed=2), 3.0))
    B, T = 2, 20
    toks = tokens(4, B, T)
    full = nnx.jit(lambda m, t: m(t)[0])(m, toks)
    bound = 2.0**-5 * float(jnp.abs(full[..., : m.cfg.vocab_size]).max())  # (not the padded columns' -1e9)
    step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c)[:2])
    cache = m.init_cache(B, 32)
    # row 1 first takes a 5-token prompt (row 0 padding), then both decode 5 positions apart
    pos = jnp.asarray([[-1] * 5, list(range(5))])
    logits, cache = step(m, jnp.where(pos >= 0, toks[:, :5], 63), pos, cache)
    assert float(jnp.abs(logits[1] - full[1, :5]).max()) < bound
    starts = np.array([0, 5])
    for size in (7, 4, 1, 1, 1):
        pos = jnp.asarray(starts[:, None] + np.arange(size))
        logits, cache = step(m, jnp.take_along_axis(toks, pos, 1), pos, cache)
        err = float(jnp.abs(logits - jnp.take_along_axis(full, pos[..., None], 1)).max())
        assert err < bound, f"chunk at {starts.tolist()}: {err} >= {bound}"
        starts += size


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_fills_the_cache_through_padding_and_pauses(arch):
    """The decode contract's edge shapes, each step against the full forward (float32, 1e-4):
    a cache of exactly context_len slots (48, init_cache's default) filled one token at a time to
    its last slot, which the attention architectures decode with decode_attention_impl='pallas'
    (there three of the kernel's 16-slot blocks); padding (position -1) inside a prefill chunk; a
    row that sits out the prefill, starts from a 1-token prompt, is fed -1 for three steps before
    position 16 (a linformer block boundary, the kernel's second block) while its batch-mate
    decodes on, then resumes; the batch-mate fed -1 from its last slot until the row catches up.
    A row fed only padding keeps its decode state bit for bit."""
    fused = {"decode_attention_impl": "pallas"} if llmjax.ARCHS[arch].config_class.fused_decode_attention else {}
    m = perturb_vectors(scale_params(llmjax.build_model(config(arch, context_len=48, **fused), seed=2), 5.0))
    B, S = 2, m.cfg.context_len
    toks = tokens(11, B, S)
    full = nnx.jit(lambda m, t: m(t)[0])(m, toks)
    step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c)[:2])
    close = functools.partial(assert_logits_close, narrow=False)
    row = lambda c, b: [np.asarray(a).take(b, int(m.cfg.scan_layers)) for a in jax.tree.leaves(c)]  # noqa: E731  (b's state)

    def run(pos, cache, paused):
        """One call (token 63 at padding): each live position's logits against the full forward's,
        and the `paused` rows' state as it was."""
        pos = np.asarray(pos, np.int32)
        before = {b: row(cache, b) for b in paused}
        logits, cache = step(m, jnp.asarray(np.where(pos >= 0, np.take_along_axis(np.asarray(toks), np.maximum(pos, 0), 1), 63)),
                             jnp.asarray(pos), cache)
        for b in range(B):
            live = pos[b] >= 0
            close(logits[b, live], full[b, pos[b, live]], err_msg=f"row {b} at {pos[b].tolist()}")
        for b in paused:
            for x, y in zip(before[b], row(cache, b)):
                np.testing.assert_array_equal(y, x, err_msg=f"paused row {b} (row {1 - b} at {pos[1 - b].tolist()})")
        return cache

    # prefill: row 0 padding only, row 1 a 4-token prompt with padding inside it
    cache = run([[-1] * 6, [0, 1, -1, 2, 3, -1]], m.init_cache(B), paused=[0])
    nxt, wait = [0, 4], 3  # row 0: a 1-token prompt at position 0; paused 3 steps before position 16
    while min(nxt) < S:
        hold = nxt[0] == 16 and wait > 0
        wait -= hold
        pause = [b for b in range(B) if nxt[b] == S or (b == 0 and hold)]
        cache = run([[-1 if b in pause else nxt[b]] for b in range(B)], cache, paused=pause)
        nxt = [n + (b not in pause) for b, n in enumerate(nxt)]


@pytest.mark.parametrize("variant", ["default", "modern"])
def test_cached_decoding_at_the_quickstart_shape(variant):
    """The quickstart's own shapes (context 64, head_dim 32, 4 layers): cached decoding equals the full
    forward within 1e-4 in float32. With bfloat16 matmul operands (as the quickstart trains) both
    paths round at the same points, but their float32 attention sums are ordered differently for a
    1-token query than for 64, and a last-bit difference can move a value across a bfloat16 rounding
    boundary: there the bound is bfloat16's (2^-7 of the logit scale), and every greedy token agrees
    but where the full forward's two candidates are within twice that bound of each other (on an AMX
    CPU one of 128 positions flipped so)."""
    from conftest import ROOT

    spec = f"{ROOT}/configs/shakespeare_char.py:{variant}"
    m32 = scale_params(llmjax.build_model(llmjax.load_config(spec, {"model.matmul_dtype": ""}), seed=0), 5.0)
    mbf = load_params(llmjax.build_model(llmjax.load_config(spec), seed=0), params(m32))
    assert mbf.cfg.narrow_matmuls == jnp.bfloat16 and m32.cfg.narrow_matmuls is None
    B, T, V = 2, 64, m32.cfg.vocab_size
    toks = tokens(1, B, T)
    fwd = nnx.jit(lambda m, t: m(t)[0][..., :V])
    step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c)[:2])
    for m, bound in ((m32, None), (mbf, 2.0**-7)):
        full = fwd(m, toks)
        cache = m.init_cache(B, T)
        logits, cache = step(m, toks[:, :8], jnp.broadcast_to(jnp.arange(8), (B, 8)), cache)
        outs = [logits[..., :V]]
        for t in range(8, T):
            logits, cache = step(m, toks[:, t : t + 1], jnp.full((B, 1), t), cache)
            outs.append(logits[..., :V])
        cached = jnp.concatenate(outs, axis=1)
        if bound is None:
            np.testing.assert_allclose(cached, full, atol=1e-4, rtol=1e-4)
            np.testing.assert_array_equal(cached.argmax(-1), full.argmax(-1))
        else:
            assert float(jnp.abs(cached - full).max()) < bound * float(jnp.abs(full).max())
            assert_same_greedy_tokens(cached, full, 2 * bound * float(jnp.abs(full).max()))


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_equals_argmax_of_full_forward(arch):
    m = scale_params(llmjax.build_model(config(arch), seed=5), 5.0)
    fwd = nnx.jit(lambda m, t: m(t)[0])
    step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c)[:2])
    seq = tokens(5, 1, 6)
    cache = m.init_cache(1, 32)
    logits, cache = step(m, seq, jnp.arange(6)[None], cache)
    cached_seq = seq
    for t in range(6, 16):
        nxt = jnp.argmax(logits[:, -1], axis=-1)[:, None]
        cached_seq = jnp.concatenate([cached_seq, nxt], axis=1)
        logits, cache = step(m, nxt, jnp.array([[t]]), cache)
    # the full forward over the sequence so far, right-padded to 16 tokens (one shape, one compile;
    # causality, tested above, makes the padding after the last token irrelevant)
    full_seq = seq
    for t in range(6, 16):
        padded = jnp.pad(full_seq, ((0, 0), (0, 16 - t)))
        nxt = jnp.argmax(fwd(m, padded)[:, t - 1], axis=-1)[:, None]
        full_seq = jnp.concatenate([full_seq, nxt], axis=1)
    np.testing.assert_array_equal(cached_seq, full_seq)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_sequence_longer_than_the_learned_positions_is_refused(arch):
    """`model(tokens)` with more tokens than model.context_len: the learned-position models
    (vanilla, gqa, moe, linformer) used to return NaN logits past the table (jnp.take's fill); now a
    one-line error. The others (rotary positions, none) run past it, finite, their first
    context_len positions' logits those of the first context_len tokens alone."""
    m = model(arch)
    C = m.cfg.context_len
    toks = tokens(0, 1, C + 8)
    if m.pos_embed is not None:
        with pytest.raises(ValueError, match=rf"^{C + 8} tokens per row, but this model's learned positions stop at "
                                             rf"model.context_len={C}: feed at most {C} tokens"):
            m(toks)
        assert np.isfinite(np.asarray(m(toks[:, :C])[0])).all()
    else:
        long = np.asarray(m(toks)[0])
        assert np.isfinite(long).all()
        np.testing.assert_allclose(long[:, :C], np.asarray(m(toks[:, :C])[0]), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_explicit_positions_past_the_table_or_the_cache_are_refused(arch):
    """Given `positions` at or past model.context_len, the learned-position models returned NaN
    logits for the whole row (jnp.take's fill, then through attention), and a cached call at or
    past the cache's max_len wrote nothing and attended to every slot (finite, wrong): an eager call
    is now a one-line ValueError naming the end. Rotary and recurrent models without a cache have
    no end: shifted positions give the logits of the default ones (rotary attention depends on
    differences only). Under jit nothing is checked (no device sync): NaN, as documented."""
    m = model(arch)
    C = m.cfg.context_len
    toks = tokens(1, 2, 4)
    late = jnp.broadcast_to(jnp.arange(C - 2, C + 2, dtype=jnp.int32), (2, 4))
    if m.pos_embed is not None:
        with pytest.raises(ValueError, match=rf"^positions reach {C + 1}, but this model's learned positions stop at model.context_len={C}: "
                                             rf"keep every position below {C}"):
            m(toks, positions=late)
    else:
        np.testing.assert_allclose(np.asarray(m(toks, positions=late)[0]), np.asarray(m(toks)[0]), atol=2e-5)
    cases = [m] + ([model(arch, scan_layers=False)] if arch == "modern" else [])  # (cache leaves stacked, and a tuple per layer)
    for mm in cases:
        cache = mm.init_cache(2, 8)
        pos = jnp.broadcast_to(jnp.arange(6, 10, dtype=jnp.int32), (2, 4))
        if arch in ("linformer", "ssm"):  # (bounded summaries, a recurrent state: no slots to run past)
            assert np.isfinite(np.asarray(mm(toks, positions=pos, cache=cache)[0])).all()
            continue
        with pytest.raises(ValueError, match=r"^positions reach 9, but the cache holds 8 positions \(init_cache\(batch_size, max_len=8\)\): "
                                             r"keep every position below 8, or make the cache with a larger max_len"):
            mm(toks, positions=pos, cache=cache)
        mm(toks, positions=pos - 2, cache=cache)  # (within it: no error)
    if arch == "vanilla":  # traced positions: unchecked, the row's logits NaN (which the sampler's non-finite check stops)
        graphdef, state = nnx.split(m)
        out = jax.jit(lambda st, t, p: nnx.merge(graphdef, st)(t, positions=p)[0])(state, toks, late)
        assert np.isnan(np.asarray(out)[..., : m.cfg.vocab_size]).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_a_position_exactly_at_the_end_is_refused(arch):
    """The boundary itself: a last position equal to model.context_len (learned positions) or to the
    cache's max_len is one past the end (test_explicit_positions_past_the_table_or_the_cache_are_refused
    goes two past it, which `>` in place of `>=` refuses too); one less is accepted."""
    m = model(arch)
    C = m.cfg.context_len
    toks = tokens(1, 1, 2)
    if m.pos_embed is not None:
        with pytest.raises(ValueError, match=rf"^positions reach {C}, "):
            m(toks, positions=jnp.array([[C - 1, C]], jnp.int32))
        m(toks, positions=jnp.array([[C - 2, C - 1]], jnp.int32))
    if m.blocks.cache_slots(m.init_cache(1, 8)) is not None:
        with pytest.raises(ValueError, match=r"^positions reach 8, but the cache holds 8 positions"):
            m(toks, positions=jnp.array([[7, 8]], jnp.int32), cache=m.init_cache(1, 8))
        m(toks, positions=jnp.array([[6, 7]], jnp.int32), cache=m.init_cache(1, 8))


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_vocab_rows_never_win(arch):
    m = scale_params(llmjax.build_model(config(arch), seed=6), 10.0)
    # Make the padded rows look attractive: a large embedding row would win without the mask.
    p = params(m)
    V = m.cfg.vocab_size
    p["embed"]["embedding"] = p["embed"]["embedding"].at[V:].set(100.0)
    load_params(m, p)
    logits = m(tokens(6, 2, 16))[0]
    assert (logits[..., V:] == PADDED_LOGIT).all()
    assert (jnp.argmax(logits, -1) < V).all()
    assert (jax.nn.softmax(logits, -1)[..., V:] == 0).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_at_init_is_log_vocab(arch):
    m = model(arch)
    toks = tokens(7, 8, 64)
    loss = llmjax.cross_entropy(m(toks)[0][:, :-1], toks[:, 1:])
    assert abs(float(loss) - math.log(m.cfg.vocab_size)) < 0.1


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_one_batch(arch):
    """A tiny model memorises one fixed batch of random tokens: cross-entropy from ~4.2 to below 0.2
    (auxiliary losses added with the config's weights)."""
    cfg = config(arch)
    weights = dict(cfg.train.aux_loss_weights)
    m = llmjax.build_model(cfg, seed=0)
    opt = nnx.Optimizer(m, optax.adam(3e-3), wrt=nnx.Param)
    toks = tokens(8, 4, 33)

    @nnx.jit
    def train_step(m, opt, toks):
        def loss_fn(m):
            logits, _, aux = m(toks[:, :-1])
            ce = llmjax.cross_entropy(logits, toks[:, 1:])
            return ce + sum(weights[k] * v for k, v in aux.items() if k != "stats"), ce

        (_, ce), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
        opt.update(m, grads)
        return ce

    losses = [float(train_step(m, opt, toks)) for _ in range(150)]
    assert losses[0] > 3.5 and losses[-1] < 0.2, (losses[0], losses[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_scanned_and_unrolled_layers_agree(arch):
    """Same weights in both LayerStack layouts (and with remat) give the same logits and gradients."""
    scanned = scale_params(llmjax.build_model(config(arch), seed=9), 5.0)
    unrolled = llmjax.build_model(config(arch, scan_layers=False, remat="full"), seed=0)
    load_params(unrolled, convert_layer_layout(params(scanned), scan_layers=False))
    toks = tokens(9, 2, 24)

    def loss(m):
        return llmjax.cross_entropy(m(toks[:, :-1])[0], toks[:, 1:])

    grad, fwd = nnx.jit(nnx.value_and_grad(loss)), nnx.jit(lambda m: m(toks)[::2])
    l1, g1 = grad(scanned)
    l2, g2 = grad(unrolled)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    g2 = convert_layer_layout(nnx.to_pure_dict(g2), scan_layers=True)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g1)), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(a).max() + 1e-7, rtol=1e-4)
    (logits1, aux1), (logits2, aux2) = fwd(scanned), fwd(unrolled)
    np.testing.assert_allclose(logits1, logits2, atol=1e-5)
    # the auxiliary losses (the MoE router's) and statistics: each layout's mean over the layers, which
    # the trainer weighs alike whichever layout trains (the loss above leaves them out)
    assert jax.tree.structure(aux1) == jax.tree.structure(aux2)
    for a, b in zip(jax.tree.leaves(aux1), jax.tree.leaves(aux2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_each_remat_policy_keeps_fewer_residuals_for_the_backward_pass(scan_layers):
    """model.remat changes no value (test_scanned_and_unrolled_layers_agree), so only what the backward
    pass keeps shows that it is applied at all: 'full' keeps the least (each block's input), 'dots' the
    products too, 'dots_no_batch' the parameter products only (not attention's batched ones), 'none'
    everything. (Measured, vanilla tiny at 2 x 16 tokens, in numbers kept: 132,961 < 165,729 < 173,921
    < 223,329 scanned.) A stack that dropped the jax.checkpoint, or mapped a name to another policy,
    trains the same numbers and runs out of memory at the size that needed the setting."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    toks = tokens(0, 2, 17)

    def kept(remat):
        m = llmjax.build_model(config("vanilla", remat=remat, scan_layers=scan_layers), seed=0)
        graphdef, state = nnx.split(m)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # (one line per residual: "f32[2,16,64] from ...")
            print_saved_residuals(lambda s: llmjax.cross_entropy(nnx.merge(graphdef, s)(toks[:, :-1])[0], toks[:, 1:]), state)
        shapes = re.findall(r"^\w+\[([\d,]*)\]", printed.getvalue(), re.M)
        return sum(math.prod(int(n) for n in shape.split(",") if n) for shape in shapes)

    sizes = {r: kept(r) for r in ("full", "dots_no_batch", "dots", "none")}
    assert sizes["full"] < sizes["dots_no_batch"] < sizes["dots"] < sizes["none"], sizes


# --- exact parameter counts of the default (GPT-2-small shape) variants, from their dimensions ---


def _vanilla(c, n_kv):
    D, L, hd, F, b = c.d_model, c.n_layer, c.head_dim, c.d_ff, int(c.bias)
    attn = D * c.n_head * hd + b * c.n_head * hd + 2 * (D * n_kv * hd + b * n_kv * hd) + c.n_head * hd * D + b * D
    mlp = D * F + b * F + F * D + b * D
    norms = (1 + b) * D
    return c.padded_vocab_size * D + c.context_len * D + L * (attn + mlp + 2 * norms) + norms


def _modern(c):
    D, hd = c.d_model, c.head_dim
    attn = D * c.n_head * hd + 2 * D * c.n_kv_head * hd + c.n_head * hd * D
    return c.padded_vocab_size * D + c.n_layer * (attn + 3 * D * c.d_ff + 2 * D) + D


def _mla(c):
    D, H = c.d_model, c.n_head
    qk = c.qk_nope_dim + c.qk_rope_dim
    q = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * qk if c.q_lora_rank else D * H * qk
    kv = D * (c.kv_lora_rank + c.qk_rope_dim) + c.kv_lora_rank + c.kv_lora_rank * H * (c.qk_nope_dim + c.v_head_dim)
    attn = q + kv + H * c.v_head_dim * D
    return c.padded_vocab_size * D + c.n_layer * (attn + 3 * D * c.d_ff + 2 * D) + D


def _ssm(c):
    D, E, N, R, F = c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_ff
    mixer = D * 2 * E + E * (R + 2 * N) + R * E + E + E * N + E + E * D + (c.d_conv * E + E if c.d_conv else 0)
    mlp = D * F + F + F * D + D
    return c.padded_vocab_size * D + c.n_layer * (mixer + mlp + 4 * D) + 2 * D


def _linformer(c):
    D, L, W, F = c.d_model, c.n_layer, c.n_head * c.head_dim, c.d_ff
    attn = D * 3 * W + 3 * W + W * D + D + 2 * c.rank * c.block_size
    mlp = D * F + F + F * D + D
    return c.padded_vocab_size * D + c.context_len * D + L * (attn + mlp + 4 * D) + 2 * D


def _moe(c):
    D, L, W, F, E = c.d_model, c.n_layer, c.n_head * c.head_dim, c.d_ff, c.n_experts
    attn = D * 3 * W + 3 * W + W * D + D
    experts = E * (D * F + F + F * D + D) + D * E  # experts and the router
    return c.padded_vocab_size * D + c.context_len * D + L * (attn + experts + 4 * D) + 2 * D


EXACT_PARAMS = {
    "moe": _moe,
    "ssm": _ssm,
    "linformer": _linformer,
    "vanilla": lambda c: _vanilla(c, c.n_head),
    "gqa": lambda c: _vanilla(c, c.n_kv_head),
    "modern": _modern,
    "mla": _mla,
}


COUNT_CASES = [(a, v, {}) for a in ARCHS for v in ("default", "tiny")] + [(a, "tiny", {"bias": False}) for a in ("vanilla", "gqa")]


@pytest.mark.parametrize("arch,variant,opts", COUNT_CASES, ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(x))
def test_parameter_count_is_exact(arch, variant, opts):
    cfg = llmjax.model_config(config(arch, variant, **opts))
    abstract = nnx.eval_shape(lambda: llmjax.build_model(cfg))
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert arch in EXACT_PARAMS, f"add {arch}'s parameter-count formula, f(ModelConfig) -> int, to EXACT_PARAMS in tests/test_models.py"
    assert count == EXACT_PARAMS[arch](cfg)


def test_gpt2_small_is_exactly_124_439_808_parameters():
    cfg = llmjax.model_config(config("vanilla", "default"))
    assert EXACT_PARAMS["vanilla"](cfg.replace(padded_vocab_size=50257)) == 124_439_808
    assert EXACT_PARAMS["vanilla"](cfg) == 124_475_904
    assert 123.5e6 < EXACT_PARAMS["modern"](llmjax.model_config(config("modern", "default"))) < 123.7e6


@pytest.mark.parametrize("arch", ARCHS)
def test_default_variants_are_gpt2_small_shaped(arch):
    """Each architecture's `default`: the shape every row of the results table shares."""
    c = llmjax.model_config(config(arch, "default"))
    assert (c.n_layer, c.d_model, c.context_len) == (12, 768, 1024), arch
    assert getattr(c, "n_head", 12) == 12, arch
    assert (c.vocab_size, c.padded_vocab_size, c.dtype) == (50257, 50304, "bfloat16"), arch
