"""Selective state-space LM (`ssm`): Mamba's mixer (a width-4 causal convolution and SiLU, then the
S6 selective scan, gated) in pre-LayerNorm residual blocks with a GELU MLP; no attention. Its decode
state is d_inner x d_state (and the convolution's last 3 inputs) per layer whatever the length.
`--config.model.d_conv=0` gives the S6 layer alone.
Pick a variant as configs/ssm.py:small."""

from llmjax.config import make_config

# fmt: off
MODELS = dict(
    default=dict(arch="ssm", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
                 n_layer=12, d_model=768, d_inner=1536, d_state=16, dt_rank=48, d_conv=4, d_ff=2048,
                 scan_chunk=128, dt_min=0.001, dt_max=0.1,
                 dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
                 init_std=0.02, norm_eps=1e-5),
    small=dict(arch="ssm", vocab_size=65, padded_vocab_size=128, context_len=256,
               n_layer=6, d_model=384, d_inner=768, d_state=16, dt_rank=24, d_conv=4, d_ff=1080,
               scan_chunk=64, dt_min=0.001, dt_max=0.1,
               dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
               init_std=0.02, norm_eps=1e-5),
    tiny=dict(arch="ssm", vocab_size=65, padded_vocab_size=128, context_len=64,
              n_layer=2, d_model=64, d_inner=128, d_state=8, dt_rank=8, d_conv=4, d_ff=128,
              scan_chunk=16, dt_min=0.001, dt_max=0.1,
              dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
              init_std=0.02, norm_eps=1e-5),
)
# fmt: on


def get_config(variant: str = "default"):
    return make_config(variant, MODELS)
