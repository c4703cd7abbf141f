"""DeepSeek-V2 multi-head latent attention on the modern stack (`mla`). The decode cache holds only
the kv_lora_rank latent and the qk_rope_dim rotary key per token. Pick a variant as configs/mla.py:small."""

from llmjax.config import make_config

# fmt: off
MODELS = dict(
    default=dict(arch="mla", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
                 n_layer=12, n_head=12, d_model=768, d_ff=2048, rope_base=10000.0,
                 kv_lora_rank=256, q_lora_rank=0, qk_nope_dim=64, qk_rope_dim=32, v_head_dim=64,
                 dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
                 init_std=0.02, norm_eps=1e-5),
    small=dict(arch="mla", vocab_size=65, padded_vocab_size=128, context_len=256,
               n_layer=6, n_head=6, d_model=384, d_ff=1096, rope_base=10000.0,
               kv_lora_rank=128, q_lora_rank=0, qk_nope_dim=64, qk_rope_dim=32, v_head_dim=64,
               dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
               init_std=0.02, norm_eps=1e-5),
    tiny=dict(arch="mla", vocab_size=65, padded_vocab_size=128, context_len=64,
              n_layer=2, n_head=4, d_model=64, d_ff=160, rope_base=10000.0,
              kv_lora_rank=32, q_lora_rank=0, qk_nope_dim=16, qk_rope_dim=8, v_head_dim=16,
              dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
              init_std=0.02, norm_eps=1e-5),
)
# fmt: on


def get_config(variant: str = "default"):
    return make_config(variant, MODELS)
