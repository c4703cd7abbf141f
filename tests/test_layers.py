"""Building blocks against naive float64 references (tests/reference.py)."""

from __future__ import annotations

import contextlib
import io

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

import llmjax
import reference
from helpers import config, load_params, params, perturb_vectors, scale_params, tokens
from llmjax.config import ConfigError
from llmjax.models.attention import causal_attention, resolve_impl, write_cache
from llmjax.models.layers import Embedding, apply_rope, convert_layer_layout, narrow_matmul


def test_rope_matches_pairwise_rotation_reference():
    x = jax.random.normal(jax.random.key(0), (1, 6, 3, 8))
    pos = jnp.array([[0, 1, 2, 7, 100, 1023]])
    got = apply_rope(x, pos, 10000.0)
    want = reference.rope(np.asarray(x[0]), [0, 1, 2, 7, 100, 1023], 10000.0)
    np.testing.assert_allclose(got[0], want, atol=2e-5)
    np.testing.assert_allclose(jnp.linalg.norm(got, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(1), (1, 1, 2, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 2, 16))

    def score(pq, pk):
        rq = apply_rope(q, jnp.array([[pq]]), 10000.0)
        rk = apply_rope(k, jnp.array([[pk]]), 10000.0)
        return jnp.sum(rq * rk, axis=-1)

    for shift in (1, 5, 300):
        np.testing.assert_allclose(score(10 + shift, 3 + shift), score(10, 3), atol=1e-4)
        np.testing.assert_allclose(score(3 + shift, 10 + shift), score(3, 10), atol=1e-4)
    assert jnp.abs(score(10, 3) - score(10, 4)).max() > 1e-3  # and it does depend on the offset


@pytest.mark.parametrize(
    "arch,opts",
    [("vanilla", {}), ("gqa", {"n_kv_head": 1}), ("gqa", {"n_kv_head": 2}), ("modern", {}), ("modern", {"n_kv_head": 2}),
     ("vanilla", {"matmul_dtype": "bfloat16"}), ("modern", {"n_kv_head": 2, "matmul_dtype": "bfloat16"}),
     # (a rotary base other than the tiny variant's: the contract suite's rope_base case compares the model with
     # itself, so a base the attention ignored would pass there)
     ("modern", {"n_kv_head": 2, "rope_base": 500.0})],
)
def test_attention_matches_float64_reference(arch, opts):
    """Query head h uses key/value head h // (n_head / n_kv_head); RoPE where the arch has it. With
    matmul_dtype the projections' operands are rounded to bfloat16 (the reference rounds them too)."""
    m = scale_params(llmjax.build_model(config(arch, **opts), seed=4), 5.0)
    cfg = m.cfg
    block = m.blocks.layers  # scanned: parameters with a leading layer axis
    attn = params(m)["blocks"]["layers"]["attn"]
    layer0 = jax.tree.map(lambda a: np.asarray(a[0]), attn)
    x = jax.random.normal(jax.random.key(5), (1, 12, cfg.d_model))
    got = nnx.jit(lambda blk, x: nnx.vmap(lambda b: b.attn(x, jnp.arange(12)[None], None)[0])(blk))(block, x)[0]
    want = reference.grouped_attention(
        x[0],
        layer0,
        n_head=cfg.n_head,
        n_kv_head=getattr(cfg, "n_kv_head", cfg.n_head),
        head_dim=cfg.head_dim,
        rope_base=getattr(cfg, "rope_base", None),
        narrow=cfg.matmul_dtype or None,
    )
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-4)
    if cfg.matmul_dtype:  # the rounding is real: the unrounded reference is further away than 1e-4
        plain = reference.grouped_attention(
            x[0], layer0, n_head=cfg.n_head, n_kv_head=getattr(cfg, "n_kv_head", cfg.n_head), head_dim=cfg.head_dim,
            rope_base=getattr(cfg, "rope_base", None),
        )
        assert np.abs(np.asarray(got[0]) - plain).max() > 1e-3


@pytest.mark.parametrize("opts", [{}, {"q_lora_rank": 24}, {"v_head_dim": 32}, {"rope_base": 500.0}])
def test_latent_attention_matches_float64_reference(opts):
    m = scale_params(llmjax.build_model(config("mla", **opts), seed=4), 5.0)
    cfg = m.cfg
    layer0 = jax.tree.map(lambda a: np.asarray(a[0]), params(m)["blocks"]["layers"]["attn"])
    x = jax.random.normal(jax.random.key(6), (1, 12, cfg.d_model))
    pos = jnp.arange(12)[None]
    got = nnx.jit(lambda blk, x: nnx.vmap(lambda b: b.attn(x, pos, None)[0])(blk))(m.blocks.layers, x)[0]
    want = reference.latent_attention(x[0], layer0, cfg)
    np.testing.assert_allclose(got[0], want, atol=1e-4, rtol=1e-4)
    # The absorbed decode path (against the cached latent) computes the same thing.
    cached = nnx.jit(
        lambda blk, x: nnx.vmap(lambda b: b.attn(x, pos, b.attn.init_cache(1, 16, jnp.float32))[0])(blk)
    )(m.blocks.layers, x)[0]
    np.testing.assert_allclose(cached[0], want, atol=1e-4, rtol=1e-4)


def test_latent_attention_absorbed_decode_in_bfloat16_is_within_its_rounding():
    """bfloat16 MLA over 256 cached positions: the absorbed decode path is as close to the float64
    reference as the expanded (training) path, within bfloat16's rounding (2^-7 of the output scale)
    at every position. Its weighted sum of latents once accumulated in bfloat16 on the CPU (batch > 1):
    3.5% of the scale by the last positions, growing with their number. The inputs share a component,
    as a trained model's do, so that the latents' channels do not average out."""
    T = 256
    m32 = scale_params(llmjax.build_model(config("mla", context_len=T), seed=4), 5.0)
    m = load_params(llmjax.build_model(config("mla", context_len=T, dtype="bfloat16"), seed=0), params(m32))
    layer0 = jax.tree.map(lambda a: np.asarray(a[0]), params(m32)["blocks"]["layers"]["attn"])
    k1, k2 = jax.random.split(jax.random.key(6))
    x = (jax.random.normal(k1, (2, 1, m.cfg.d_model)) + 0.5 * jax.random.normal(k2, (2, T, m.cfg.d_model))).astype(jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))

    def run(cached):
        def one(b):
            return b.attn(x, pos, b.attn.init_cache(2, T, jnp.bfloat16) if cached else None)[0]

        return np.asarray(nnx.jit(lambda blk: nnx.vmap(one)(blk))(m.blocks.layers)[0], np.float64)

    for row in range(2):
        want = reference.latent_attention(np.asarray(x[row], np.float64), layer0, m32.cfg)
        for path, got in (("expanded", run(False)[row]), ("absorbed", run(True)[row])):
            err = np.abs(got - want).max()
            assert err < 2**-7 * np.abs(want).max(), (path, row, err / np.abs(want).max())


def test_gqa_with_all_heads_is_multi_head_attention():
    """gqa with n_kv_head == n_head computes exactly vanilla's multi-head attention on the same weights."""
    vanilla = scale_params(llmjax.build_model(config("vanilla"), seed=7), 5.0)
    gqa = llmjax.build_model(config("gqa", n_kv_head=4), seed=0)
    load_params(gqa, params(vanilla))
    toks = tokens(11, 2, 30)
    np.testing.assert_array_equal(gqa(toks)[0], vanilla(toks)[0])
    narrow = scale_params(llmjax.build_model(config("gqa", n_kv_head=2), seed=7), 5.0)
    assert jnp.abs(narrow(toks)[0] - vanilla(toks)[0]).max() > 1e-3


def test_write_cache_writes_each_row_at_its_own_position():
    buf = jnp.zeros((2, 8, 1))
    new = jnp.ones((2, 3, 1)) * jnp.array([1.0, 2.0])[:, None, None]
    out = write_cache(buf, new, jnp.array([[0, 1, 2], [4, 5, 6]]))
    np.testing.assert_array_equal(out[0, :, 0], [1, 1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[1, :, 0], [0, 0, 0, 0, 2, 2, 2, 0])
    # padding (-1) and positions past the buffer write nothing; nothing else moves
    out = write_cache(out, new * 5, jnp.array([[3, -1, -1], [7, 8, -1]]))
    np.testing.assert_array_equal(out[0, :, 0], [1, 1, 1, 5, 0, 0, 0, 0])
    np.testing.assert_array_equal(out[1, :, 0], [0, 0, 0, 0, 2, 2, 2, 10])


def test_write_cache_heads_first_slots_last():
    """The keys and values are stored (B, K, hd, S); new entries come as (B, T, K, hd)."""
    B, K, d, S = 2, 3, 4, 8
    new = jnp.arange(B * 2 * K * d, dtype=jnp.float32).reshape(B, 2, K, d) + 1
    out = write_cache(jnp.zeros((B, K, d, S)), new, jnp.array([[2, 3], [-1, 7]]), slot_axis=3)
    ref = np.zeros((B, K, d, S), np.float32)
    ref[0, :, :, 2], ref[0, :, :, 3], ref[1, :, :, 7] = new[0, 0], new[0, 1], new[1, 1]  # row 1's -1 writes nothing
    np.testing.assert_array_equal(out, ref)


def test_attention_kernel_switch():
    assert resolve_impl("xla", jnp.bfloat16) == "xla"
    assert resolve_impl("auto", jnp.float32) == "xla"
    if jax.default_backend() != "gpu":
        assert resolve_impl("auto", jnp.bfloat16) == "xla"
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            resolve_impl("cudnn", jnp.bfloat16)


def test_layer_layout_round_trip():
    m = llmjax.build_model(config("modern"), seed=0)
    scanned = params(m)
    unrolled = convert_layer_layout(scanned, scan_layers=False)
    assert sorted(unrolled["blocks"]["layers"]) == [0, 1]
    assert convert_layer_layout(unrolled, scan_layers=False) is unrolled
    back = convert_layer_layout(unrolled, scan_layers=True)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), back, scanned))


@pytest.mark.parametrize(
    "spec,x_shape,w_shape",
    [("ni,io->no", (24, 48), (48, 16)), ("btd,vd->btv", (2, 5, 32), (40, 32)), ("becd,edf->becf", (2, 3, 4, 16), (3, 16, 8))],
    ids=["linear", "tied-head", "experts"],
)
def test_narrow_matmul_matches_float64_reference(spec, x_shape, w_shape):
    """model.matmul_dtype's product: bfloat16-rounded operands, float32 result; its backward pass
    rounds the incoming gradient too and returns float32 gradients (float64 einsums of the rounded
    values are the reference)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    y, vjp = jax.vjp(lambda x, w: narrow_matmul(spec, x, w, jnp.bfloat16), x, w)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx, dw = vjp(g)
    (a, b), out = spec.split("->")[0].split(","), spec.split("->")[1]
    r = lambda t: reference.round_to(t, jnp.bfloat16)  # noqa: E731
    want = {"y": np.einsum(spec, r(x), r(w)), "dx": np.einsum(f"{out},{b}->{a}", r(g), r(w)), "dw": np.einsum(f"{a},{out}->{b}", r(x), r(g))}
    exact = {"y": np.einsum(spec, x, w), "dx": np.einsum(f"{out},{b}->{a}", g, w), "dw": np.einsum(f"{a},{out}->{b}", x, g)}
    for name, got in (("y", y), ("dx", dx), ("dw", dw)):
        assert got.dtype == jnp.float32
        scale = np.abs(want[name]).max()
        assert np.abs(np.asarray(got, np.float64) - want[name]).max() < 1e-6 * scale, name
        assert np.abs(exact[name] - want[name]).max() > 1e-4 * scale, name  # the rounding is visible


def _dot_operand_dtypes(jaxpr):
    """The operand dtypes of every dot_general in a jaxpr, nested jaxprs (custom_vjp, pjit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _dot_operand_dtypes(sub)
    return found


def test_tied_head_backward_runs_16bit_products():
    """The tied head of a bfloat16 model (float32 logits for the loss) must not widen its weight to
    float32 for the backward products: every product of the loss's gradient takes bfloat16 operands
    (a widened product runs as a tf32 GEMM on a GPU, half the bf16 rate); the values are
    `narrow_matmul`'s, tested against float64 above."""
    emb = Embedding(llmjax.model_config(config("vanilla", "small", dtype="bfloat16").model), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, emb.embedding.shape[1]), jnp.bfloat16)
    targets = jax.random.randint(jax.random.key(2), (2, 6), 0, emb.vocab_size)

    graphdef, state = nnx.split(emb)

    def loss(state, x):
        return llmjax.cross_entropy(nnx.merge(graphdef, state).attend(x), targets)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(state, x).jaxpr
    dtypes = _dot_operand_dtypes(jaxpr)
    assert len(dtypes) >= 3 and all(d == ("bfloat16", "bfloat16") for d in dtypes), dtypes


@pytest.mark.parametrize("spec", ["ii,ij->j", "ij,jk->i", "...i,io->...o", "ni,io->n"])
def test_narrow_matmul_takes_plain_and_batched_products_only(spec):
    with pytest.raises(ValueError, match="two or three operands"):
        narrow_matmul(spec, jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.bfloat16)


@pytest.mark.parametrize("vocab_size", [70, 96])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_masked_cross_entropy_matches_float64_reference(vocab_size, dtype):
    """The plain path's loss (`loss.masked_cross_entropy`): per-token values and the logits' gradient
    against float64 (padding columns 70..95 masked out, or none to mask), for random incoming
    per-token gradients; padding columns get exactly zero gradient. bfloat16 logits (the training
    loss's with bf16 compute, `train.logits_dtype`): the loss in float32 is the float64 loss of those
    logits, and their gradient comes back in bfloat16, rounded from the float64 one."""
    from llmjax.loss import masked_cross_entropy

    rng = np.random.default_rng(vocab_size)
    logits = jnp.asarray(rng.standard_normal((3, 5, 96)) * 4, dtype)
    targets = jnp.asarray(rng.integers(0, vocab_size, (3, 5)), jnp.int32)
    g = rng.standard_normal((3, 5))
    got, vjp = jax.vjp(lambda z: masked_cross_entropy(z, targets, vocab_size), logits)
    (dz,) = vjp(jnp.asarray(g, jnp.float32))
    z = np.asarray(logits.astype(jnp.float32), np.float64)[..., :vocab_size]
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    onehot = np.arange(vocab_size) == np.asarray(targets)[..., None]
    want = lse - (z * onehot).sum(-1)
    want_dz = g[..., None] * (np.exp(z - lse[..., None]) - onehot)
    assert got.dtype == jnp.float32 and dz.dtype == dtype
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == jnp.float32 else 2**-8 * np.abs(want_dz).max()  # (bf16: one rounding)
    np.testing.assert_allclose(np.asarray(dz[..., :vocab_size], np.float64), want_dz, atol=tol)
    assert not np.asarray(dz[..., vocab_size:]).any()


@pytest.mark.parametrize("ignored", [-100, -1, 96, 50_000])
def test_cross_entropy_leaves_masked_positions_out_whatever_their_target(ignored):
    """`llmjax.cross_entropy(logits, targets, mask)`: the mean over the positions the mask keeps, as
    float64 computes it, whatever a masked-out position's target holds (PyTorch's ignore index -100,
    an id past the vocabulary): such a target used to make the whole loss NaN (its own loss NaN,
    times 0). The gradient is finite, zero at the masked-out positions."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 6, 96)) * 3, jnp.float32)
    targets = rng.integers(0, 96, (2, 6))
    mask = rng.random((2, 6)) < 0.6
    mask[0, 0] = True
    targets[~mask] = ignored
    targets = jnp.asarray(targets, jnp.int32)
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    kept = np.take_along_axis(z, np.where(mask, np.asarray(targets), 0)[..., None], -1)[..., 0]
    want = (lse - kept)[mask].mean()
    loss, dz = jax.value_and_grad(lambda l: llmjax.cross_entropy(l, targets, jnp.asarray(mask, jnp.float32)))(logits)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    assert np.isfinite(np.asarray(dz)).all() and not np.asarray(dz)[~mask].any()


def test_plain_loss_reads_the_logits_fewer_times():
    """The head + loss gradient over a padded vocabulary moves about a third fewer bytes (XLA's
    count) through `loss.token_losses` than through optax's loss of the masked logits, which
    keeps the masked logits as a separate buffer for its backward pass; same value and gradients."""
    import optax

    from llmjax.loss import token_losses

    emb = Embedding(llmjax.model_config(config("vanilla", "small", dtype="bfloat16", vocab_size=4000, padded_vocab_size=4096).model), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(emb)
    x = jax.random.normal(jax.random.key(1), (2, 128, emb.embedding.shape[1]), jnp.bfloat16)
    t = jax.random.randint(jax.random.key(2), (2, 128), 0, emb.vocab_size)

    def ours(state, x):
        return token_losses(nnx.merge(graphdef, state), x, t).mean()

    def masked_then_optax(state, x):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(graphdef, state).attend(x), t).mean()

    runs = {}
    for f in (ours, masked_then_optax):
        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        runs[f.__name__] = step(state, x), step.lower(state, x).compile().cost_analysis()["bytes accessed"]
    (v0, g0), b0 = runs["masked_then_optax"]
    (v1, g1), b1 = runs["ours"]
    assert emb.embedding.shape[0] > emb.vocab_size and b1 < 0.8 * b0, (b1, b0)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2 * float(np.abs(b).max()))  # (x: bfloat16, a rounding apart)


@pytest.mark.parametrize("arch", ["vanilla", "modern"])
def test_feed_forward_keeps_only_its_products_for_the_backward_pass(arch):
    """GPT-2's MLP and Llama's SwiGLU compute exactly the plain formula, forward and backward, and
    their backward pass keeps only the up-projections' products and the activation's output (the
    down-projection's input): no inner value of tanh-GELU or SiLU (layers.biased_gelu, layers.swiglu)."""
    from llmjax.models.layers import MLP, SwiGLU

    def plain(m, x):  # the textbook formula through the same nnx.Linear layers
        if isinstance(m, MLP):
            return m.proj(jax.nn.gelu(m.fc(x), approximate=True))
        return m.down(jax.nn.silu(m.gate(x)) * m.up(x))

    for dtype in ("float32", "bfloat16"):
        cfg = llmjax.model_config(config(arch, dtype=dtype).model)
        F = 4 * cfg.d_model
        m = (MLP if arch == "vanilla" else SwiGLU)(cfg, F, rngs=nnx.Rngs(0))
        perturb_vectors(m, seed=1)
        graphdef, state = nnx.split(m)
        x = jax.random.normal(jax.random.key(2), (2, 5, cfg.d_model), jnp.float32).astype(cfg.compute_dtype)

        def loss(state, x, f):
            y = f(nnx.merge(graphdef, state), x).astype(jnp.float32)
            return jnp.sum(y * jnp.cos(y))

        got = jax.value_and_grad(loss, argnums=(0, 1))(state, x, lambda m, x: m(x))
        want = jax.value_and_grad(loss, argnums=(0, 1))(state, x, plain)
        np.testing.assert_array_equal(got[0], want[0])
        tol = 1e-6 if dtype == "float32" else 1e-2
        for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)
        if dtype == "bfloat16":
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                print_saved_residuals(lambda state, x: loss(state, x, lambda m, x: m(x)), state, x)
            kept = [line for line in printed.getvalue().splitlines() if line.startswith(f"bf16[2,5,{F}]")]
            assert len(kept) == (2 if arch == "vanilla" else 3), kept


@pytest.mark.parametrize("dv", [8, 12, 20])
def test_causal_attention_takes_values_of_another_width(dv):
    """Values narrower or wider than queries and keys (`mla`; padded where the kernel wants one
    width): equal to a float64 causal softmax(q k^T * scale) v, with the given scale and the default."""
    kq, kk, kv = jax.random.split(jax.random.key(4), 3)
    q, k = jax.random.normal(kq, (2, 7, 4, 12)), jax.random.normal(kk, (2, 7, 2, 12))
    v = jax.random.normal(kv, (2, 7, 2, dv))
    for scale in (0.3, None):
        got = causal_attention(q, k, v, impl="xla", scale=scale)
        assert got.shape == (2, 7, 4, dv)
        qq, kk64, vv = (np.asarray(a, np.float64) for a in (q, k, v))
        kk64, vv = np.repeat(kk64, 2, axis=2), np.repeat(vv, 2, axis=2)  # (grouped: query head h reads key head h // 2)
        s = np.einsum("bthd,bshd->bhts", qq, kk64) * (1 / np.sqrt(12) if scale is None else scale)
        s = np.where(np.tril(np.ones((7, 7), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("bhts,bshe->bthe", p / p.sum(-1, keepdims=True), vv)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
