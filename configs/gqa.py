"""Grouped-query attention on GPT-2 (`gqa`): n_kv_head key/value heads shared by the query heads.
Pick a variant as configs/gqa.py:small."""

from llmjax.config import make_config

# fmt: off
MODELS = dict(
    default=dict(arch="gqa", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
                 n_layer=12, n_head=12, n_kv_head=4, head_dim=64, d_model=768, d_ff=3072, bias=True,
                 dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
                 init_std=0.02, norm_eps=1e-5),
    small=dict(arch="gqa", vocab_size=65, padded_vocab_size=128, context_len=256,
               n_layer=6, n_head=6, n_kv_head=2, head_dim=64, d_model=384, d_ff=1776, bias=True,
               dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
               init_std=0.02, norm_eps=1e-5),
    tiny=dict(arch="gqa", vocab_size=65, padded_vocab_size=128, context_len=64,
              n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=64, d_ff=256, bias=True,
              dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
              init_std=0.02, norm_eps=1e-5),
)
# fmt: on


def get_config(variant: str = "default"):
    return make_config(variant, MODELS)
