"""`gqa`: the original playground's grouped-query model - GPT-2 (learned absolute positions,
LayerNorm, tanh-GELU MLP, biases) whose attention has `n_kv_head` key/value heads, each shared by
n_head / n_kv_head query heads (Ainslie et al., 2023). Its decode cache holds only those K heads.
With n_kv_head == n_head it computes exactly GPT-2's multi-head attention on the same weights.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from llmjax.models.attention import check_kv_heads
from llmjax.models.layers import DecoderLM
from llmjax.models.vanilla import VanillaConfig, block, final_norm
from llmjax.registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class GQAConfig(VanillaConfig):
    n_kv_head: int  # key/value heads; divides n_head

    def __post_init__(self):
        super().__post_init__()
        check_kv_heads(self)


@register("gqa")
class GQA(DecoderLM):
    config_class = GQAConfig

    def __init__(self, cfg: GQAConfig, *, rngs: nnx.Rngs):
        super().__init__(
            cfg, make_block=lambda r: block(cfg, cfg.n_kv_head, r), final_norm=final_norm, learned_positions=True, rngs=rngs
        )
