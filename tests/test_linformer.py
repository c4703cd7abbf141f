"""The causal Linformer: exact attention inside a block, summaries of completed blocks only, and
cost that does not grow with the context."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

import llmjax
import llmjax.models  # noqa: F401
from helpers import config, load_params, params, scale_params, tokens
from llmjax.summary import summarize


def test_one_block_is_exactly_gpt2_attention():
    """With the whole sequence inside one block there are no summaries: the model computes GPT-2
    on the same weights."""
    vanilla = scale_params(llmjax.build_model(config("vanilla"), seed=1), 5.0)
    shared = params(vanilla)

    def with_gpt2_weights(block_size):
        lin = llmjax.build_model(config("linformer", block_size=block_size), seed=0)
        p = params(lin)
        for key in ("embed", "pos_embed", "norm_f"):
            p[key] = shared[key]
        for key in ("norm_1", "norm_2", "mlp"):
            p["blocks"]["layers"][key] = shared["blocks"]["layers"][key]
        for key in ("qkv_proj", "o_proj"):
            p["blocks"]["layers"]["attn"][key] = shared["blocks"]["layers"]["attn"][key]
        return load_params(lin, p)

    toks = tokens(1, 2, 40)  # (in one block of 48: a block of the whole context, 64, is refused: the test below)
    np.testing.assert_allclose(with_gpt2_weights(48)(toks)[0], vanilla(toks)[0], atol=2e-5, rtol=1e-5)
    # With smaller blocks the summaries take part and the output differs.
    assert jnp.abs(with_gpt2_weights(8)(toks)[0] - vanilla(toks)[0]).max() > 1e-3


def test_a_block_of_the_whole_context_is_refused_for_a_run():
    """model.block_size >= model.context_len makes the whole context one block: plain causal
    attention (the test above), trained and benchmarked as `linformer` with no word. Refused in one
    line by validate (train, compare, bench); a saved run's model is still read (sample, evaluate)."""
    import pytest

    from llmjax.config import ConfigError, model_config

    for block in (64, 100):
        with pytest.raises(ConfigError, match=rf"^model.block_size={block} is not below model.context_len=64: the whole context is one "
                                              r"block, .* plain causal attention; set model.block_size below 64 "):
            config("linformer", block_size=block)
    assert config("linformer", block_size=63).model.block_size == 63
    c = config("linformer").model.to_dict()
    assert model_config({**c, "block_size": 64}).block_size == 64  # (reading a saved run's model)


def test_cost_and_decode_state_do_not_grow_with_context():
    short = summarize(config("linformer", "default"))
    long = config("linformer", "default")
    long.model.context_len = 16384
    long = summarize(long)
    vanilla = summarize(config("vanilla", "default"))
    assert short["decode_state_bytes_per_token"] is None and long["decode_state_bytes"] == short["decode_state_bytes"]
    lin_mixer = llmjax.get_arch("linformer").mixer_flops_per_token
    mcfg = llmjax.model_config(config("linformer", "default"))
    assert lin_mixer(mcfg, 1024) == lin_mixer(mcfg, 16384)
    vanilla_mixer = llmjax.get_arch("vanilla").mixer_flops_per_token
    vcfg = llmjax.model_config(config("vanilla", "default"))
    assert vanilla_mixer(vcfg, 16384) == 16 * vanilla_mixer(vcfg, 1024)
    assert vanilla["decode_state_bytes_per_token"] > 0


def test_bfloat16_attention_gradients_are_within_its_rounding():
    """A block's masked attention (summaries and its own keys) in bfloat16: its gradients with respect
    to the queries, keys and values equal a float64 reference of the same rounded inputs within
    bfloat16's rounding, as `jax.nn.dot_product_attention`'s do (0.3% here). The probabilities'
    gradient was once a bf16 einsum's transpose, which XLA's CPU backend summed over the head width
    in bfloat16: 1% off in the queries' and keys' gradients at head width 64."""
    import jax

    from llmjax.models.linformer import _attend

    B, nb, b, r, H, hd = 2, 4, 32, 16, 2, 64
    keys = iter(jax.random.split(jax.random.key(0), 4))
    q, k, v, g = (jax.random.normal(next(keys), (B, nb, n, H, hd)).astype(jnp.bfloat16) for n in (b, r + b, r + b, b))
    causal = np.tril(np.ones((b, b), bool))
    mask = np.concatenate([np.broadcast_to((np.arange(nb) > 0)[:, None, None], (nb, b, r)), np.broadcast_to(causal, (nb, b, b))], -1)
    mask = mask[None, :, None]  # (1, nb, 1, b, r + b), as the model builds it
    scale = hd**-0.5
    grads = jax.grad(lambda q, k, v: jnp.sum(_attend(q, k, v, mask, scale, jnp.bfloat16).astype(jnp.float32) * g), argnums=(0, 1, 2))(q, k, v)

    # float64: scores s = q.k * scale, p = softmax(s), out = p v; dp = g v^T, ds = p (dp - sum p dp)
    q64, k64, v64, g64 = (np.asarray(a, np.float64) for a in (q, k, v, g))
    s = np.where(mask, np.einsum("abthd,abshd->abhts", q64, k64) * scale, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = np.einsum("abthd,abshd->abhts", g64, v64)
    ds = p * (dp - np.sum(p * dp, -1, keepdims=True)) * scale
    want = (np.einsum("abhts,abshd->abthd", ds, k64), np.einsum("abhts,abthd->abshd", ds, q64), np.einsum("abhts,abthd->abshd", p, g64))
    for name, got, ref in zip("qkv", grads, want):
        rel = np.abs(np.asarray(got, np.float64) - ref).mean() / np.abs(ref).mean()
        assert rel < 0.006, (name, rel)


def test_bfloat16_decoding_rounds_where_the_full_forward_does():
    """In bfloat16, a decode step rounds what the full forward rounds: the projections P_k, P_v to
    the compute dtype (the step's output depends on them only through that rounding) and the
    attention probabilities before the value product. The first block (exact causal attention, no
    summaries) then decodes as the full forward computes it: before the state held the completed
    blocks' key sums, it did so bit for bit, and the sums' version kept float32 probabilities and
    projections, 17% of the first block's outputs a bfloat16 rounding off (a model's logits up to
    0.19 of the 2^-5 bound in test_models' bfloat16 test, from 0)."""
    import jax
    from flax import nnx

    from llmjax.config import model_config
    from llmjax.models.linformer import CausalLinformerAttention

    cfg = model_config(config("linformer", dtype="bfloat16"))
    att = CausalLinformerAttention(cfg, rngs=nnx.Rngs(0))
    B, T, b = 2, 3 * cfg.block_size, cfg.block_size
    q, k, v = ((3 * jax.random.normal(key, (B, T, cfg.n_head, cfg.head_dim))).astype(jnp.bfloat16) for key in jax.random.split(jax.random.key(1), 3))
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    decode = lambda: np.asarray(att._decode(q, k, v, positions, att.init_cache(B, T, jnp.bfloat16))[0], np.float32)  # noqa: E731
    got, full = decode(), np.asarray(att._blocks(q, k, v), np.float32)
    differ = np.mean(got[:, :b] != full[:, :b])
    assert differ < 0.02, differ  # (0 here; a CPU that orders the 16-term score sums otherwise may flip a rounding)
    assert np.abs(got - full).max() > 0  # (the summaries' scores are not rounded as the full forward's are: not all equal)
    for name in ("proj_k", "proj_v"):
        p = getattr(att, name)
        assert not np.array_equal(np.asarray(p[...]), np.asarray(p[...].astype(jnp.bfloat16), np.float32))
        p[...] = p[...].astype(jnp.bfloat16).astype(jnp.float32)
    np.testing.assert_array_equal(decode(), got)
