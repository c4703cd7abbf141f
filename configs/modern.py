"""Llama-style GPT (`modern`): RoPE, RMSNorm, SwiGLU, no biases. Pick a variant as
configs/modern.py:small."""

from llmjax.config import make_config

# fmt: off
MODELS = dict(
    default=dict(arch="modern", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
                 n_layer=12, n_head=12, n_kv_head=12, head_dim=64, d_model=768, d_ff=2048,
                 rope_base=10000.0,
                 dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
                 init_std=0.02, norm_eps=1e-5),
    small=dict(arch="modern", vocab_size=65, padded_vocab_size=128, context_len=256,
               n_layer=6, n_head=6, n_kv_head=6, head_dim=64, d_model=384, d_ff=1040,
               rope_base=10000.0,
               dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
               init_std=0.02, norm_eps=1e-5),
    tiny=dict(arch="modern", vocab_size=65, padded_vocab_size=128, context_len=64,
              n_layer=2, n_head=4, n_kv_head=4, head_dim=16, d_model=64, d_ff=160,
              rope_base=10000.0,
              dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
              init_std=0.02, norm_eps=1e-5),
)
# fmt: on


def get_config(variant: str = "default"):
    return make_config(variant, MODELS)
