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

    toks = tokens(1, 2, 40)
    np.testing.assert_allclose(with_gpt2_weights(64)(toks)[0], vanilla(toks)[0], atol=2e-5, rtol=1e-5)
    # With smaller blocks the summaries take part and the output differs.
    assert jnp.abs(with_gpt2_weights(8)(toks)[0] - vanilla(toks)[0]).max() > 1e-3


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
