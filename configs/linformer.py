"""Causal Linformer (`linformer`) on the GPT-2 stack: exact attention inside the current block of
block_size tokens plus `rank` learned summaries of all completed blocks. Pick a variant as
configs/linformer.py:small."""

from llmjax.config import make_config

# fmt: off
MODELS = dict(
    default=dict(arch="linformer", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
                 n_layer=12, n_head=12, head_dim=64, d_model=768, d_ff=3072, block_size=128, rank=256,
                 dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
                 init_std=0.02, norm_eps=1e-5),
    small=dict(arch="linformer", vocab_size=65, padded_vocab_size=128, context_len=256,
               n_layer=6, n_head=6, head_dim=64, d_model=384, d_ff=1536, block_size=64, rank=64,
               dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
               init_std=0.02, norm_eps=1e-5),
    tiny=dict(arch="linformer", vocab_size=65, padded_vocab_size=128, context_len=64,
              n_layer=2, n_head=4, head_dim=16, d_model=64, d_ff=256, block_size=8, rank=6,
              dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
              init_std=0.02, norm_eps=1e-5),
)
# fmt: on


def get_config(variant: str = "default"):
    return make_config(variant, MODELS)
