"""`vanilla`: GPT-2 (Radford et al., 2019), as in nanoGPT.

Learned absolute positions, pre-LayerNorm blocks, tanh-GELU MLP (4x), biases everywhere (`bias`;
nanoGPT's baby-GPT recipe turns them off), multi-head attention, token embedding tied to the output
head. The default config is GPT-2 small: 12 layers,
12 heads, d_model 768, context 1024 - 124,439,808 parameters at vocabulary 50257 (124,475,904 with
the embedding padded to 50304 rows).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from llmjax.config import ModelConfig
from llmjax.models.attention import Attention
from llmjax.models.layers import MLP, DecoderLM, PreNormBlock, layer_norm
from llmjax.registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class VanillaConfig(ModelConfig):
    n_head: int
    head_dim: int  # n_head * head_dim is the attention width (d_model for GPT-2)
    d_ff: int  # MLP hidden width (4 * d_model for GPT-2)
    bias: bool  # biases in linear layers and LayerNorms (GPT-2: True; nanoGPT's default: False)


def block(cfg: VanillaConfig, n_kv_head: int, rngs: nnx.Rngs) -> PreNormBlock:
    return PreNormBlock(
        norm_1=layer_norm(cfg, cfg.d_model, bias=cfg.bias, rngs=rngs),
        attn=Attention(cfg, n_kv_head=n_kv_head, head_dim=cfg.head_dim, bias=cfg.bias, rope_base=None, rngs=rngs),
        norm_2=layer_norm(cfg, cfg.d_model, bias=cfg.bias, rngs=rngs),
        mlp=MLP(cfg, cfg.d_ff, bias=cfg.bias, rngs=rngs),
        decode_norm_impl=cfg.decode_norm_impl,
    )


def final_norm(cfg: VanillaConfig, d: int, *, rngs: nnx.Rngs):
    return layer_norm(cfg, d, bias=cfg.bias, rngs=rngs)


@register("vanilla")
class GPT2(DecoderLM):
    config_class = VanillaConfig

    def __init__(self, cfg: VanillaConfig, *, rngs: nnx.Rngs):
        super().__init__(
            cfg, make_block=lambda r: block(cfg, cfg.n_head, r), final_norm=final_norm, learned_positions=True, rngs=rngs
        )
