"""`vanilla`: GPT-2 (Radford et al., 2019), as in nanoGPT.

Learned absolute positions, pre-LayerNorm blocks, tanh-GELU MLP (4x), biases everywhere, multi-head
attention, token embedding tied to the output head. The default config is GPT-2 small: 12 layers,
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
    head_dim: int  # n_head * head_dim is the attention width (d_model for GPT-2)
    d_ff: int  # MLP hidden width (4 * d_model for GPT-2)


def block(cfg: VanillaConfig, n_kv_head: int, rngs: nnx.Rngs) -> PreNormBlock:
    return PreNormBlock(
        norm_1=layer_norm(cfg, cfg.d_model, rngs=rngs),
        attn=Attention(cfg, n_kv_head=n_kv_head, head_dim=cfg.head_dim, bias=True, rope_base=None, rngs=rngs),
        norm_2=layer_norm(cfg, cfg.d_model, rngs=rngs),
        mlp=MLP(cfg, cfg.d_ff, rngs=rngs),
    )


@register("vanilla")
class GPT2(DecoderLM):
    config_class = VanillaConfig

    def __init__(self, cfg: VanillaConfig, *, rngs: nnx.Rngs):
        super().__init__(
            cfg, make_block=lambda r: block(cfg, cfg.n_head, r), final_norm=layer_norm, learned_positions=True, rngs=rngs
        )
