"""Mixture-of-Experts GPT (`moe`): GPT-2 with 8 GELU experts per layer and top-2 routing; each
expert's hidden width is half of GPT-2's MLP, so a token's active compute matches GPT-2 small.
`model.moe_mode` is dropless (every routed token computed; `model.moe_impl`: auto, blocked with
`model.moe_block_rows`-row blocks, dense, gather or ragged_dot) or capacity (fixed (expert, slot) buffers,
`model.capacity_factor`). Pick a variant as configs/moe.py:small."""

from llmjax.config import make_config

# fmt: off
MODELS = dict(
    default=dict(arch="moe", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
                 n_layer=12, n_head=12, head_dim=64, d_model=768, d_ff=1536,
                 n_experts=8, top_k=2, moe_mode="dropless", capacity_factor=1.25,
                 moe_impl="auto", moe_block_rows=1024,
                 dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
                 init_std=0.02, norm_eps=1e-5),
    small=dict(arch="moe", vocab_size=65, padded_vocab_size=128, context_len=256,
               n_layer=6, n_head=6, head_dim=64, d_model=384, d_ff=192,
               n_experts=8, top_k=2, moe_mode="dropless", capacity_factor=1.25,
               moe_impl="auto", moe_block_rows=1024,
               dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
               init_std=0.02, norm_eps=1e-5),
    tiny=dict(arch="moe", vocab_size=65, padded_vocab_size=128, context_len=64,
              n_layer=2, n_head=4, head_dim=16, d_model=64, d_ff=64,
              n_experts=4, top_k=2, moe_mode="dropless", capacity_factor=1.25,
              moe_impl="auto", moe_block_rows=1024,
              dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
              init_std=0.02, norm_eps=1e-5),
)
AUX = {"aux_loss_weights": {"load_balance": 0.01, "router_z": 0.001}}
TRAIN = {variant: AUX for variant in MODELS}
# fmt: on


def get_config(variant: str = "default"):
    return make_config(variant, MODELS, train=TRAIN)
