"""The fused decode kernels, attention step (llmjax/models/decode_attention.py) and norms
(llmjax/models/decode_norm.py), in Pallas' interpreter here,
against a float64 reference, what it writes and reads of the cache, and when the model uses it.
(The contract suite's cached-decoding cases and the sampler's greedy cases run every architecture
with the kernels, model.decode_*_impl='pallas'; tests/test_aot.py compiles them for a GPU.)"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from helpers import config, scale_params, tokens
from llmjax import runtime
from llmjax.config import ConfigError
from llmjax.models.decode_attention import decode_attention, latent_decode_attention, latent_unmet, supported


def reference(src, bias, k_cache, v_cache, pos, H, K):
    """float64: add the bias, write key and value at each row's position, attend over slots
    0..position (a padding row, position < 0: slot 0 only, nothing written)."""
    src = np.asarray(src, np.float64) + (0 if bias is None else np.asarray(bias, np.float64))
    kc, vc = np.array(k_cache, np.float64), np.array(v_cache, np.float64)
    B, _, d, S = kc.shape
    G = H // K
    out = np.zeros((B, K, G, d))
    for b in range(B):
        p = int(pos[b])
        if 0 <= p < S:  # (past the cache: nothing written, every slot seen, as XLA's path)
            kc[b, :, :, p], vc[b, :, :, p] = src[b, H : H + K], src[b, H + K :]
        n = min(p + 1, S) if p >= 0 else 1
        for h in range(K):
            for g in range(G):
                logits = src[b, h * G + g] @ kc[b, h, :, :n] / np.sqrt(d)
                w = np.exp(logits - logits.max())
                out[b, h, g] = (vc[b, h, :, :n] * (w / w.sum())).sum(axis=1)
    return out, kc, vc


def inputs(seed, B, H, K, d, S, dtype=jnp.float32, with_bias=True):
    ks = jax.random.split(jax.random.key(seed), 4)
    src = jax.random.normal(ks[0], (B, H + 2 * K, d), dtype)
    bias = jax.random.normal(ks[1], (H + 2 * K, d), jnp.float32) if with_bias else None
    return src, bias, jax.random.normal(ks[2], (B, K, d, S), dtype), jax.random.normal(ks[3], (B, K, d, S), dtype)


# positions: the first slot, block edges (16-slot blocks at S=48), the last slot, and a padding row
@pytest.mark.parametrize("H,K,S,with_bias", [(4, 4, 48, True), (6, 2, 48, False), (16, 1, 64, True), (3, 3, 32, True)])
def test_the_kernel_equals_a_float64_reference(H, K, S, with_bias):
    d = 16
    pos = np.array([0, 15, 16, 17, S - 1, -1, 31])
    src, bias, kc, vc = inputs(0, len(pos), H, K, d, S, with_bias=with_bias)
    out, k2, v2 = decode_attention(src, src, src, bias, kc, vc, jnp.asarray(pos), offsets=(0, H, H + K), n_head=H, interpret=True)
    want, kw, vw = reference(src, bias, kc, vc, pos, H, K)
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    # the caches: each row's slot at its position holds the new key / value, all else unchanged
    np.testing.assert_allclose(k2, kw, atol=1e-6)
    np.testing.assert_allclose(v2, vw, atol=1e-6)
    changed = np.asarray((k2 != kc).any(axis=(1, 2)))
    for b, p in enumerate(pos):
        assert set(np.flatnonzero(changed[b])) <= ({int(p)} if p >= 0 else set()), (b, p)


def test_separate_sources_and_offsets():
    """Queries, keys and values from three arrays at their own offsets (the rotary models' case)
    give the same as one fused array."""
    H, K, d, S = 4, 2, 32, 32
    pos = jnp.array([3, 20])
    src, bias, kc, vc = inputs(1, 2, H, K, d, S, with_bias=False)
    fused = decode_attention(src, src, src, None, kc, vc, pos, offsets=(0, H, H + K), n_head=H, interpret=True)
    apart = decode_attention(src[:, :H], src[:, H : H + K] * 1.0, src, None, kc, vc, pos, offsets=(0, 0, H + K), n_head=H,
                             interpret=True)
    for a, b in zip(fused, apart):
        np.testing.assert_array_equal(a, b)


def test_slots_after_the_position_are_never_used():
    """Garbage in the slots after each row's position changes no output bit (they are neither read
    into the softmax nor weighted)."""
    H, K, d, S = 4, 4, 16, 64
    pos = jnp.array([0, 5, 33, 62])
    src, bias, kc, vc = inputs(2, 4, H, K, d, S)
    later = jnp.arange(S)[None, None, None, :] > pos[:, None, None, None]
    junk = lambda c: jnp.where(later, 1e4, c)  # noqa: E731
    run = lambda kc, vc: decode_attention(src, src, src, bias, kc, vc, pos, offsets=(0, H, H + K), n_head=H, interpret=True)[0]  # noqa: E731
    np.testing.assert_array_equal(run(kc, vc), run(junk(kc), junk(vc)))


def test_bfloat16_within_its_rounding_of_float64():
    H, K, d, S = 8, 2, 64, 128
    pos = np.array([0, 70, 127])
    src, bias, kc, vc = inputs(3, 3, H, K, d, S, dtype=jnp.bfloat16)
    out, k2, _ = decode_attention(src, src, src, bias, kc, vc, jnp.asarray(pos), offsets=(0, H, H + K), n_head=H, interpret=True)
    assert out.dtype == jnp.bfloat16 and k2.dtype == jnp.bfloat16
    want, _, _ = reference(src, jnp.asarray(bias, jnp.bfloat16), kc, vc, pos, H, K)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2e-2, rtol=2e-2)


def test_unsupported_shapes():
    assert supported(64, 1, 320) and supported(16, 16, 16)
    assert not supported(48, 1, 64) and not supported(8, 1, 64) and not supported(64, 17, 64) and not supported(64, 1, 40)
    src, bias, kc, vc = inputs(0, 1, 2, 2, 16, 40)
    with pytest.raises(ValueError, match="not supported"):
        decode_attention(src, src, src, bias, kc, vc, jnp.array([1]), offsets=(0, 2, 4), n_head=2, interpret=True)


def _uses_kernel(m, T: int, S: int = 32, kernel: str = "decode_attention") -> bool:
    """Whether a decode step of T tokens per row traces the fused kernel (its jitted wrapper's name)."""
    cache = m.init_cache(2, S)
    step = lambda t, p, c: m(t, positions=p, cache=c)[0]  # noqa: E731
    text = str(jax.make_jaxpr(step)(tokens(0, 2, T), jnp.broadcast_to(jnp.arange(T), (2, T)), cache))
    return f"name={kernel}\n" in text and "pallas_call" in text


@pytest.mark.parametrize("arch", ["vanilla", "gqa", "modern", "moe"])
def test_the_model_decodes_with_the_kernel_on_a_gpu_only(arch):
    """'auto': the kernel for one token per row when tracing for a GPU, never for a prompt chunk,
    never on a CPU; 'xla': never; 'pallas': on a CPU too."""
    auto, xla = (llmjax.build_model(config(arch, decode_attention_impl=i), seed=0) for i in ("auto", "xla"))
    pallas = llmjax.build_model(config(arch, decode_attention_impl="pallas"), seed=0)
    assert not _uses_kernel(auto, 1) and not _uses_kernel(xla, 1) and _uses_kernel(pallas, 1)
    assert not _uses_kernel(pallas, 3)
    with runtime.compiling_for("gpu"):
        assert _uses_kernel(auto, 1) and not _uses_kernel(auto, 3) and not _uses_kernel(xla, 1)
        assert not _uses_kernel(auto, 1, S=40)  # a cache that is not a multiple of 16 slots: XLA's path


def test_a_config_that_declares_other_attention_keeps_its_decode_off_the_kernel():
    """An architecture of one's own whose attention is not the plain kind (ALiBi's bias in the scores,
    say) declares it with `fused_decode_attention = False` in its config class (README, Registering a
    new architecture). `Attention` ignored that on 'auto': traced for a GPU, a decoded token went
    through the fused kernel, which knows no bias, so a GPU decoded without the change while every
    CPU test passed. Here the plain GPT-2 model under such a config class: XLA's path on a GPU too."""
    import dataclasses

    from flax import nnx

    from llmjax.models.vanilla import GPT2, VanillaConfig

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class OtherScores(VanillaConfig):
        fused_decode_attention = False

    plain = llmjax.model_config(config("vanilla"))
    m = GPT2(OtherScores(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(plain)}), rngs=nnx.Rngs(0))
    with runtime.compiling_for("gpu"):
        assert _uses_kernel(llmjax.build_model(plain, seed=0), 1)  # (the same model under vanilla's own config: the kernel)
        assert not _uses_kernel(m, 1)


def test_the_kernel_decodes_a_model_as_xla_does():
    """A scaled-up random vanilla model, one token at a time: kernel and XLA path give the same
    logits and the same caches (float32)."""
    ms = {i: scale_params(llmjax.build_model(config("vanilla", decode_attention_impl=i, scan_layers=False), seed=4), 4.0)
          for i in ("xla", "pallas")}
    toks = tokens(5, 2, 12)
    caches = {i: m.init_cache(2, 32) for i, m in ms.items()}
    for t in range(12):
        pos = jnp.full((2, 1), t)
        outs = {i: m(toks[:, t : t + 1], positions=pos, cache=caches[i]) for i, m in ms.items()}
        caches = {i: o[1] for i, o in outs.items()}
        np.testing.assert_allclose(outs["pallas"][0], outs["xla"][0], atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(caches["pallas"]), jax.tree.leaves(caches["xla"])):
        np.testing.assert_allclose(a, b, atol=1e-6)


def saved_run_config(arch, kernels: dict, **shapes):
    """A run's config with decode kernel settings (`kernels`) that validate refuses for these shapes,
    as a saved run's config may hold them (set after validation)."""
    cfg = config(arch, **shapes)
    with cfg.unlocked():
        cfg.model.update(kernels)
    return cfg


def test_bad_decode_attention_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="is not one of auto, xla, pallas"):
        llmjax.model_config(config("vanilla", decode_attention_impl="triton"))
    own = sorted(a for a, cls in llmjax.ARCHS.items() if not cls.config_class.fused_decode_attention)
    assert {"linformer", "ssm"} <= set(own) and "mla" not in own
    for arch in own:
        with pytest.raises(ConfigError, match=rf"in a fused kernel \(gqa, mla, modern, moe, vanilla.*\); {arch} decodes its own way"):
            llmjax.model_config(config(arch, decode_attention_impl="pallas"))
    m = llmjax.build_model(config("vanilla", decode_attention_impl="pallas"), seed=0)
    # (only the needs not met: the line named every one, head_dim 16 and 2 heads per key/value head as if they were wrong too)
    with pytest.raises(ConfigError, match=r"^model\.decode_attention_impl='pallas' needs a cache a multiple of 16 slots \(got 40\); "
                                          r"use 'auto' or 'xla'") as err:
        _uses_kernel(m, 1, S=40)
    assert "\n" not in str(err.value)
    # (a saved run's config: validate refuses such shapes for a run to train, test below; a saved run's model is still built)
    narrow = llmjax.build_model(saved_run_config("vanilla", {"decode_attention_impl": "pallas"}, head_dim=8), seed=0)
    with pytest.raises(ConfigError, match=r"^model\.decode_attention_impl='pallas' needs head_dim a power of two >= 16 \(got 8\) and "
                                          r"a cache a multiple of 16 slots \(got 40\); use 'auto' or 'xla'"):
        _uses_kernel(narrow, 1, S=40)


# --- mla's latent kernel (decode_attention.latent_decode_attention) ---------------------------------


def latent_reference(q, qkr, c_new, c_cache, kr_cache, pos, scale):
    """float64: write each row's latent and rotary key at its position, then every head attends
    over slots 0..position with logits scale (q . c + qr . kr) and values the latents."""
    q, qkr = np.asarray(q, np.float64), np.asarray(qkr, np.float64)
    qr, kr_new = qkr[:, :-1], qkr[:, -1]
    cc, kc = np.array(c_cache, np.float64), np.array(kr_cache, np.float64)
    B, H, _ = q.shape
    out = np.zeros(q.shape)
    for b in range(B):
        p = int(pos[b])
        if 0 <= p < cc.shape[1]:  # (past the cache: nothing written, every slot seen, as XLA's path)
            cc[b, p], kc[b, p] = np.asarray(c_new[b], np.float64), kr_new[b]
        n = min(p + 1, cc.shape[1]) if p >= 0 else 1
        for h in range(H):
            logits = scale * (cc[b, :n] @ q[b, h] + kc[b, :n] @ qr[b, h])
            w = np.exp(logits - logits.max())
            out[b, h] = (w / w.sum()) @ cc[b, :n]
    return out, cc, kc


def latent_inputs(seed, B, H, r, p, S, dtype=jnp.float32):
    """(q_lat, rotary queries and key (B, H + 1, p), latent, latent cache, rotary key cache)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    shapes = [(B, H, r), (B, H + 1, p), (B, r), (B, S, r), (B, S, p)]
    return [jax.random.normal(k, shape, dtype) for k, shape in zip(ks, shapes)]


@pytest.mark.parametrize("H,r,p,S", [(4, 32, 8, 48), (12, 64, 32, 64), (1, 16, 2, 32)])
def test_the_latent_kernel_equals_a_float64_reference(H, r, p, S):
    pos = np.array([0, 15, 16, 17, S - 1, -1, 31])
    args = latent_inputs(0, len(pos), H, r, p, S)
    scale = 0.3
    out, c2, k2 = latent_decode_attention(*args, jnp.asarray(pos), scale=scale, interpret=True)
    want, cw, kw = latent_reference(*args, pos, scale)
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(c2, cw, atol=1e-6)
    np.testing.assert_allclose(k2, kw, atol=1e-6)
    changed = np.asarray((c2 != args[3]).any(axis=2) | (k2 != args[4]).any(axis=2))
    for b, q in enumerate(pos):
        assert set(np.flatnonzero(changed[b])) <= ({int(q)} if q >= 0 else set()), (b, q)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_latent_kernel_normalises_the_new_latent_read_where_it_lies(dtype):
    """With the norm's scale, the kernel takes kv_down's output (the latent before its RMSNorm, then
    the rotary key's r + p values) and normalises the latent as nnx.RMSNorm does (float64 here):
    the cache holds the normalised latent, and the heads attend to it."""
    from flax import nnx

    B, H, r, p, S = 5, 4, 32, 8, 48
    pos = np.array([0, 15, 16, 47, -1])
    q, qkr, _, cc, kc = latent_inputs(4, B, H, r, p, S, dtype=dtype)
    kv = 3.0 * jax.random.normal(jax.random.key(9), (B, r + p), dtype)  # (the rotary key's part is never read)
    norm = nnx.RMSNorm(r, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.scale[...] = jax.random.uniform(jax.random.key(1), (r,), jnp.float32, 0.5, 2.0)
    out, c2, k2 = latent_decode_attention(q, qkr, kv, cc, kc, jnp.asarray(pos), scale=0.3, norm_scale=norm.scale[...],
                                          norm_eps=1e-5, norm_dtype=dtype, norm_param_dtype=dtype, interpret=True)
    x = np.asarray(kv[:, :r], np.float64)
    normed = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * np.asarray(norm.scale[...].astype(dtype), np.float64)
    want, cw, kw = latent_reference(q, qkr, normed, cc, kc, pos, 0.3)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == jnp.float32 else dict(atol=3e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(c2, np.float64), cw, **tol)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, **tol)
    np.testing.assert_array_equal(k2, np.asarray(kw, k2.dtype))
    # the cached latent is flax's RMSNorm of it, within float32 rounding (bfloat16: within its own rounding)
    flax_c = norm(kv[:, None, :r])[:, 0]
    live = pos >= 0
    got = np.asarray(c2, np.float32)[np.flatnonzero(live), pos[live]]
    np.testing.assert_allclose(got, np.asarray(flax_c, np.float32)[live], **(dict(atol=1e-6, rtol=1e-6) if dtype == jnp.float32 else dict(atol=0, rtol=8e-3)))


def test_the_latent_kernel_never_uses_slots_after_the_position():
    pos = jnp.array([0, 5, 33, 62])
    q, qkr, c_new, cc, kc = latent_inputs(2, 4, 4, 32, 8, 64)
    later = jnp.arange(64)[None, :, None] > pos[:, None, None]
    junk = lambda c: jnp.where(later, 1e4, c)  # noqa: E731
    run = lambda cc, kc: latent_decode_attention(q, qkr, c_new, cc, kc, pos, scale=0.2, interpret=True)[0]  # noqa: E731
    np.testing.assert_array_equal(run(cc, kc), run(junk(cc), junk(kc)))


def test_the_latent_kernel_in_bfloat16_and_its_shapes():
    pos = np.array([0, 70, 127])
    args = latent_inputs(3, 3, 8, 64, 16, 128, dtype=jnp.bfloat16)
    out, c2, _ = latent_decode_attention(*args, jnp.asarray(pos), scale=0.125, interpret=True)
    assert out.dtype == jnp.bfloat16 and c2.dtype == jnp.bfloat16
    want, _, _ = latent_reference(*args, pos, 0.125)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2e-2, rtol=2e-2)
    assert latent_unmet(256, 32, 320) == [] and latent_unmet(32, 8, 64) == []
    assert len(latent_unmet(48, 32, 64)) == 1 and len(latent_unmet(256, 24, 64)) == 1 and len(latent_unmet(256, 32, 40)) == 1
    with pytest.raises(ValueError, match="not supported"):
        latent_decode_attention(*latent_inputs(0, 1, 2, 48, 8, 32), jnp.array([1]), scale=1.0, interpret=True)


@pytest.mark.parametrize("S", [32, 48])
def test_both_kernels_past_the_cache_write_nothing_and_see_every_slot(S):
    """A position at or past the cache's S slots (only an unchecked jitted call gives one:
    `DecoderLM.check_positions` refuses it eagerly) writes nothing and attends to all S slots, as
    XLA's path (`write_cache`, `visible_mask`). Past S, the kernels' loops ran a block beyond the
    cache: in the interpreter the last block again (slots counted twice), on a GPU whatever memory
    follows the cache."""
    pos = np.array([S, S + 3, S + 17, S + 40, 5])
    H, K, d = 4, 2, 16
    src, bias, kc, vc = inputs(1, len(pos), H, K, d, S)
    out, k2, v2 = decode_attention(src, src, src, bias, kc, vc, jnp.asarray(pos), offsets=(0, H, H + K), n_head=H, interpret=True)
    want, kw, vw = reference(src, bias, kc, vc, pos, H, K)
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(k2[:4], kc[:4])
    np.testing.assert_array_equal(v2[:4], vc[:4])
    args = latent_inputs(1, len(pos), 4, 32, 8, S)
    out, c2, r2 = latent_decode_attention(*args, jnp.asarray(pos), scale=0.3, interpret=True)
    want, cw, kw = latent_reference(*args, pos, 0.3)
    np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(c2[:4], args[3][:4])
    np.testing.assert_array_equal(r2[:4], args[4][:4])


def test_mla_decodes_with_the_latent_kernel_on_a_gpu_only_and_as_xla_does():
    """'auto': the latent kernel for one token per row when tracing for a GPU, never for a prompt
    chunk or on a CPU; 'pallas' on a CPU too. A scaled-up random mla model (queries compressed,
    matmul operands in bfloat16 or not), one token at a time: kernel and XLA path give the same
    logits and caches (float32)."""
    auto, xla = (llmjax.build_model(config("mla", decode_attention_impl=i), seed=0) for i in ("auto", "xla"))
    pallas = llmjax.build_model(config("mla", decode_attention_impl="pallas"), seed=0)
    uses = functools.partial(_uses_kernel, kernel="latent_decode_attention")
    assert not uses(auto, 1) and not uses(xla, 1) and uses(pallas, 1) and not uses(pallas, 3)
    with runtime.compiling_for("gpu"):
        assert uses(auto, 1) and not uses(auto, 3) and not uses(xla, 1) and not uses(auto, 1, S=40)
    with pytest.raises(ConfigError, match=r"^model\.decode_attention_impl='pallas' needs a cache a multiple of 16 slots \(got 40\); "):
        uses(pallas, 1, S=40)
    for opts in ({"q_lora_rank": 24}, {"matmul_dtype": "bfloat16"}):
        ms = {i: scale_params(llmjax.build_model(config("mla", decode_attention_impl=i, scan_layers=False, **opts), seed=4), 4.0)
              for i in ("xla", "pallas")}
        toks = tokens(5, 2, 12)
        caches = {i: m.init_cache(2, 32) for i, m in ms.items()}
        for t in range(12):
            pos = jnp.stack([jnp.full((1,), t), jnp.full((1,), t - 3)])  # (the second row starts later: padding first)
            outs = {i: m(toks[:, t : t + 1], positions=pos, cache=caches[i]) for i, m in ms.items()}
            caches = {i: o[1] for i, o in outs.items()}
            np.testing.assert_allclose(outs["pallas"][0], outs["xla"][0], atol=2e-5, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(caches["pallas"]), jax.tree.leaves(caches["xla"])):  # (the second layer's: from the first's outputs)
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# --- the fused norms (llmjax/models/decode_norm.py) ----------------------------------------------


def norm_reference(x, scale, bias, eps, rms):
    x = np.asarray(x, np.float64)
    mean = 0.0 if rms else x.mean(-1, keepdims=True)
    var = (x * x).mean(-1, keepdims=True) if rms else ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * np.asarray(scale, np.float64)
    return y + (0 if bias is None else np.asarray(bias, np.float64))


@pytest.mark.parametrize("D", [16, 48, 768, 2048])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_the_norm_kernels_equal_a_float64_reference(D, kind):
    """norm(x) and add_norm(x, h) against float64, for LayerNorm (with and without bias) and RMSNorm,
    rows of 1 to 2 chunks of up to 1024 values (768 = 3 x 256); the residual sum exactly x + h."""
    from flax import nnx

    from llmjax.models import decode_norm

    rngs = nnx.Rngs(0)
    layer = (nnx.LayerNorm(D, epsilon=1e-5, param_dtype=jnp.float32, use_bias=D != 48, rngs=rngs) if kind == "layer"
             else nnx.RMSNorm(D, epsilon=1e-6, param_dtype=jnp.float32, rngs=rngs))
    layer.scale[...] = jax.random.normal(jax.random.key(1), (D,))
    bias = None
    if kind == "layer" and layer.bias is not None:
        layer.bias[...] = bias = jax.random.normal(jax.random.key(2), (D,))
    x = jax.random.normal(jax.random.key(3), (4, 1, D)) * 3 + 2
    h = jax.random.normal(jax.random.key(4), (4, 1, D))
    eps = layer.epsilon
    np.testing.assert_allclose(decode_norm.norm(layer, x, interpret=True), norm_reference(x, layer.scale[...], bias, eps, kind == "rms"),
                               atol=2e-5, rtol=1e-5)
    s, y = decode_norm.add_norm(layer, x, h, interpret=True)
    np.testing.assert_array_equal(s, x + h)
    np.testing.assert_allclose(y, norm_reference(x + h, layer.scale[...], bias, eps, kind == "rms"), atol=2e-5, rtol=1e-5)
    # h's own layer's bias, added by the kernel: exactly x + (h + b)
    h_bias = jax.random.normal(jax.random.key(7), (D,))
    s, y = decode_norm.add_norm(layer, x, h, h_bias=h_bias, interpret=True)
    np.testing.assert_array_equal(s, x + (h + h_bias))
    np.testing.assert_allclose(y, norm_reference(x + (h + h_bias), layer.scale[...], bias, eps, kind == "rms"), atol=2e-5, rtol=1e-5)


def test_the_norm_kernels_keep_the_layers_dtypes():
    """bfloat16 rows and a bfloat16 layer: outputs in bfloat16, within its rounding of flax's own."""
    from flax import nnx

    from llmjax.models import decode_norm

    layer = nnx.LayerNorm(768, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 1, 768), jnp.bfloat16)
    h = jax.random.normal(jax.random.key(6), (2, 1, 768), jnp.bfloat16)
    s, y = decode_norm.add_norm(layer, x, h, interpret=True)
    assert s.dtype == y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(s, x + h)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(layer(x + h), np.float32), atol=2e-2, rtol=2e-2)
    # a float32 bias (as stored) is rounded to bfloat16 and added in bfloat16, as nnx.Linear adds it
    h_bias = jax.random.normal(jax.random.key(7), (768,)) * 1.001
    s, _ = decode_norm.add_norm(layer, x, h, h_bias=h_bias, interpret=True)
    assert s.dtype == jnp.bfloat16
    np.testing.assert_array_equal(s, x + (h + h_bias.astype(jnp.bfloat16)))
    assert not np.array_equal(np.asarray(s, np.float32), np.asarray((x + (h + h_bias)).astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_bfloat16_norm_kernels_equal_flaxs_layer_up_to_the_order_of_sums(kind):
    """A bfloat16 layer with a scale and bias that bfloat16 does not hold exactly (any trained one):
    the kernels give flax's own outputs, but for a last-bit difference in a few values (float32 sums
    ordered otherwise). flax rounds the scale and bias to the layer's dtype before using them; the
    kernels used them in float32, so a bf16 model's fused decode step (a GPU's default) normalised
    otherwise than its full forward: a quarter of the values 1 bfloat16 step off (RMSNorm), a third
    of LayerNorm's up to 436 steps (where the bias cancels the rest); cached decoding of a bf16 SSM
    drifted 8% of the logits' scale from its full forward, against 0 with the XLA norms."""
    from flax import nnx

    from llmjax.models import decode_norm

    D = 768
    rngs = nnx.Rngs(0)
    layer = (nnx.LayerNorm(D, epsilon=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=rngs) if kind == "layer"
             else nnx.RMSNorm(D, epsilon=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=rngs))
    layer.scale[...] = 1 + 0.5 * jax.random.normal(jax.random.key(1), (D,))
    if kind == "layer":
        layer.bias[...] = 0.5 * jax.random.normal(jax.random.key(2), (D,))
    x = jax.random.normal(jax.random.key(5), (8, 1, D), jnp.bfloat16)
    h = jax.random.normal(jax.random.key(6), (8, 1, D), jnp.bfloat16)
    h_bias = 0.5 * jax.random.normal(jax.random.key(7), (D,))

    def assert_flaxs(got, want, what):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        step = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(want), 2.0**-100))) - 7)  # bfloat16's spacing at each value
        assert (np.abs(got - want) <= step).all(), f"{what}: up to {(np.abs(got - want) / step).max()} bfloat16 steps off"
        assert (got != want).mean() < 0.01, f"{what}: {(got != want).mean():.1%} of the values differ"

    assert_flaxs(decode_norm.norm(layer, x, interpret=True), layer(x), "norm")
    s, y = decode_norm.add_norm(layer, x, h, interpret=True)
    assert_flaxs(y, layer(x + h), "add_norm")
    s, y = decode_norm.add_norm(layer, x, h, h_bias=h_bias, interpret=True)
    np.testing.assert_array_equal(s, x + (h + h_bias.astype(jnp.bfloat16)))
    assert_flaxs(y, layer(s), "add_norm with h's bias")


def test_a_bfloat16_model_decodes_through_the_norm_kernels_as_through_xlas_norms():
    """A whole bfloat16 model (vanilla: LayerNorm with bias, the output projection's bias in the
    residual kernel), 6 decode steps after a 5-token prompt: the norm kernels'
    logits are XLA's norms' bit for bit once XLA keeps no excess precision
    (--xla_allow_excess_precision=false, in a process of its own: backend flags are read at start).
    By default XLA computes some fused bfloat16 chains in float32, differently around a kernel
    than without one, and the two decodes differ in every value (over 15 steps: vanilla tiny up to
    0.6% of the logit scale, modern 1.5%, moe 0.4%; each the same bit for bit without excess
    precision): that difference is XLA's, not the kernels'."""
    import subprocess
    import sys

    from conftest import ROOT

    code = """
import jax.numpy as jnp, numpy as np
from flax import nnx
import llmjax
from helpers import config, perturb_vectors, scale_params, tokens
for arch in ("vanilla",):
    outs = []
    for norm in ("xla", "pallas"):
        m = perturb_vectors(scale_params(llmjax.build_model(config(arch, dtype="bfloat16", decode_norm_impl=norm,
                                                                   decode_attention_impl="pallas"), seed=2), 3.0))
        toks = tokens(4, 2, 11)
        step = nnx.jit(lambda m, t, p, c: m(t, positions=p, cache=c)[:2])
        _, cache = step(m, toks[:, :5], jnp.broadcast_to(jnp.arange(5), (2, 5)), m.init_cache(2, 32))
        logits = []
        for t in range(5, 11):
            out, cache = step(m, toks[:, t:t + 1], jnp.full((2, 1), t), cache)
            logits.append(np.asarray(out[:, 0, :65], np.float32))
        outs.append(np.stack(logits))
    assert np.isfinite(outs[0]).all() and np.abs(outs[0]).max() > 1
    d = np.abs(outs[0] - outs[1])
    assert not d.any(), f"{arch}: {np.mean(d > 0):.1%} of the logits differ, up to {d.max()}"
print("ok")
"""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_allow_excess_precision=false"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("arch", ["vanilla", "mla", "ssm"])
def test_the_model_decodes_with_the_norm_kernels_on_a_gpu_only(arch):
    """decode_norm_impl 'auto': two norm kernels per layer for one token per row when tracing for a
    GPU, none for a prompt chunk or on a CPU; 'xla' none; 'pallas' on a CPU too."""
    auto, xla, pallas = (llmjax.build_model(config(arch, decode_norm_impl=i, decode_attention_impl="xla"), seed=0)
                         for i in ("auto", "xla", "pallas"))
    uses = functools.partial(_uses_kernel, kernel="decode_norm_rows")
    assert not uses(auto, 1) and not uses(xla, 1) and uses(pallas, 1) and not uses(pallas, 3)
    with runtime.compiling_for("gpu"):
        assert uses(auto, 1) and not uses(auto, 3) and not uses(xla, 1)
        assert not _uses_kernel(auto, 1)  # (the attention step stays XLA's: decode_attention_impl='xla')


def test_bad_decode_norm_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="decode_norm_impl='fused' is not one of auto, xla, pallas"):
        llmjax.model_config(config("vanilla", decode_norm_impl="fused"))
    m = llmjax.build_model(saved_run_config("vanilla", {"decode_norm_impl": "pallas"}, d_model=40, head_dim=10), seed=0)
    with pytest.raises(ConfigError, match="d_model a multiple of 16") as err:
        _uses_kernel(m, 1, kernel="decode_norm_rows")
    assert "\n" not in str(err.value)


def test_a_second_decode_through_the_kernels_traces_nothing_again():
    """Pallas's fuser, imported lazily inside the first kernel run in interpret mode, registers a
    JAX setting that is part of every jit's trace context: every function traced before it missed
    its cache once (the sampler's second `generate` traced and compiled its prefill and decode loop
    again: `bench` timed that as decoding, 5 tok/s for 400). In a process of its own, as a user's:
    the suite's workers have imported the fuser long before."""
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import jax, numpy as np, llmjax\n"
            "from jax import monitoring\n"
            "from llmjax.config import model_config\n"
            "from llmjax.bench import inference_model\n"
            "from llmjax.sample import Sampling, generate\n"
            "cfg = llmjax.load_config('configs/vanilla.py:tiny', {'model.decode_attention_impl': 'pallas', 'model.decode_norm_impl': 'pallas'})\n"
            "model = inference_model(model_config(cfg).replace(scan_layers=False), None)\n"
            "traced = []\n"
            "monitoring.register_event_duration_secs_listener(lambda event, secs, **kw: traced.append(event) "
            "if event == '/jax/core/compile/jaxpr_trace_duration' else None)\n"
            "out = generate(model, [[1, 2, 3]], 4, sampling=Sampling(greedy=True))\n"
            "first = len(traced)\n"
            "again = generate(model, [[1, 2, 3]], 4, sampling=Sampling(greedy=True))\n"
            "print(first, len(traced) - first, out == again)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    first, again, same = r.stdout.split()
    assert int(first) > 0 and same == "True", r.stdout
    assert again == "0", f"the second generate traced {again} functions again"


@pytest.mark.parametrize("arch,overrides,need", [
    ("vanilla", {"decode_attention_impl": "pallas", "head_dim": 8}, r"decode_attention_impl='pallas' needs head_dim a power of two >= 16 \(got 8\)"),
    ("gqa", {"decode_attention_impl": "pallas", "n_head": 34, "n_kv_head": 2, "head_dim": 16},
     r"decode_attention_impl='pallas' needs at most 16 query heads per key/value head \(got 17\)"),
    ("mla", {"decode_attention_impl": "pallas", "kv_lora_rank": 24}, r"decode_attention_impl='pallas' needs kv_lora_rank a power of two >= 16 \(got 24\)"),
    ("modern", {"decode_attention_impl": "pallas", "context_len": 100},
     r"decode_attention_impl='pallas' needs model.context_len a multiple of 16, the longest decode cache \(got 100\)"),
    ("linformer", {"decode_norm_impl": "pallas", "d_model": 40}, r"decode_norm_impl='pallas' needs d_model a multiple of 16 \(at most 16 x 1024\), got 40"),
])
def test_a_run_asking_for_a_decode_kernel_its_shapes_do_not_fit_is_refused_before_it_trains(arch, overrides, need):
    """The models refuse such shapes at the first decoded token: a run trained every step, then its
    end-of-run sample said so. validate (train, compare, bench) refuses them first; a saved run's
    model is still built (sample and evaluate say it at the first decoded token)."""
    kernels = {k: v for k, v in overrides.items() if k.endswith("_impl")}
    with pytest.raises(ConfigError, match=rf"^model\.{need}; use 'auto' or 'xla'$"):
        config(arch, **overrides)
    cfg = saved_run_config(arch, kernels, **{k: v for k, v in overrides.items() if k not in kernels})  # (the shapes alone are fine)
    with pytest.raises(ConfigError, match=rf"^model\.{need}; use 'auto' or 'xla'$"):
        llmjax.config.validate(cfg)
    llmjax.build_model(cfg, seed=0)  # (read as a saved run's)


def test_the_trainer_refuses_a_decode_kernel_the_shapes_do_not_fit_before_its_first_step(tmp_path):
    """(In process: the command line says a ConfigError as its one line, tests/test_config.py.)"""
    from llmjax.train import train

    cfg = saved_run_config("vanilla", {"decode_attention_impl": "pallas"}, head_dim=8)
    with cfg.unlocked():
        cfg.train.max_steps = 2
    with pytest.raises(ConfigError, match=r"^model\.decode_attention_impl='pallas' needs head_dim a power of two >= 16 \(got 8\); "
                                          r"use 'auto' or 'xla'$"):
        train(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
