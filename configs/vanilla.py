"""GPT-2 (`vanilla`). default: GPT-2 small (124M); small: nanoGPT's shakespeare-char model (10.8M);
tiny: for tests. Pick a variant as configs/vanilla.py:small."""

from llmjax.config import make_config

# fmt: off
MODELS = dict(
    default=dict(arch="vanilla", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
                 n_layer=12, n_head=12, head_dim=64, d_model=768, d_ff=3072, bias=True,
                 dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
                 init_std=0.02, norm_eps=1e-5),
    small=dict(arch="vanilla", vocab_size=65, padded_vocab_size=128, context_len=256,
               n_layer=6, n_head=6, head_dim=64, d_model=384, d_ff=1536, bias=True,
               dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
               init_std=0.02, norm_eps=1e-5),
    tiny=dict(arch="vanilla", vocab_size=65, padded_vocab_size=128, context_len=64,
              n_layer=2, n_head=4, head_dim=16, d_model=64, d_ff=256, bias=True,
              dtype="float32", attention_impl="auto", scan_layers=True, remat="none",
              init_std=0.02, norm_eps=1e-5),
    # OpenAI GPT-2's larger shapes (for train.init_from=gpt2-medium / gpt2-large / gpt2-xl)
    medium=dict(arch="vanilla", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
                n_layer=24, n_head=16, head_dim=64, d_model=1024, d_ff=4096, bias=True,
                dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
                init_std=0.02, norm_eps=1e-5),
    large=dict(arch="vanilla", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
               n_layer=36, n_head=20, head_dim=64, d_model=1280, d_ff=5120, bias=True,
               dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
               init_std=0.02, norm_eps=1e-5),
    xl=dict(arch="vanilla", vocab_size=50257, padded_vocab_size=50304, context_len=1024,
            n_layer=48, n_head=25, head_dim=64, d_model=1600, d_ff=6400, bias=True,
            dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
            init_std=0.02, norm_eps=1e-5),
)
# fmt: on


def get_config(variant: str = "default"):
    return make_config(variant, MODELS)
