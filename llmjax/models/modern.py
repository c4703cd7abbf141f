"""`modern`: a Llama-style GPT (Touvron et al., 2023) at GPT-2-small scale.

Rotary position embeddings (rotate-half, base 10000) instead of learned positions, RMSNorm instead of
LayerNorm, SwiGLU feed-forward (hidden 2048 at the default, so its three matrices hold about what
GPT-2's two 4x ones do), no biases, tied embedding. `n_kv_head` < `n_head` gives Llama-2/3-style
grouped-query attention; the default is plain multi-head (n_kv_head == n_head). On a GPU in bf16 the
attention runs as cuDNN flash attention (`attention_impl=auto`).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from llmjax.config import ConfigError, ModelConfig
from llmjax.models.attention import Attention, check_kv_heads
from llmjax.models.layers import DecoderLM, PreNormBlock, SwiGLU, rms_norm
from llmjax.registry import register


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModernConfig(ModelConfig):
    n_head: int
    head_dim: int
    n_kv_head: int
    d_ff: int  # SwiGLU hidden width
    rope_base: float

    def __post_init__(self):
        super().__post_init__()
        check_kv_heads(self)
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")


def block(cfg: ModernConfig, rngs: nnx.Rngs) -> PreNormBlock:
    return PreNormBlock(
        norm_1=rms_norm(cfg, cfg.d_model, rngs=rngs),
        attn=Attention(cfg, n_kv_head=cfg.n_kv_head, head_dim=cfg.head_dim, bias=False, rope_base=cfg.rope_base, rngs=rngs),
        norm_2=rms_norm(cfg, cfg.d_model, rngs=rngs),
        mlp=SwiGLU(cfg, cfg.d_ff, rngs=rngs),
        decode_norm_impl=cfg.decode_norm_impl,
    )


@register("modern")
class Modern(DecoderLM):
    config_class = ModernConfig

    def __init__(self, cfg: ModernConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, make_block=lambda r: block(cfg, r), final_norm=rms_norm, learned_positions=False, rngs=rngs)
