"""nanoGPT's "baby GPT" on character-level Shakespeare, the CPU quickstart:

    python -m llmjax.train --config configs/shakespeare_char.py

GPT-2 architecture (`vanilla`) with 4 layers, 4 heads, d_model 128, context 64, no biases (nanoGPT's
default), no dropout; float32 compute with bfloat16 matmul operands (`matmul_dtype`: the dense
layers' and the head's products at ~1.7x the float32 rate on CPUs with AVX-512 BF16; losses track
nanoGPT's float32 run within 2e-4 over its first 60 steps; `--config.model.matmul_dtype=` for
float32 throughout); batch 12,
2000 steps, AdamW lr 1e-3 (beta2 0.99, weight decay 0.1), 100 warm-up steps then cosine to 1e-4;
validation every 250 steps over 20 batches, and over the whole validation split at the last step.

Variant `modern` (configs/shakespeare_char.py:modern): the same recipe and budget with the Llama-style
block instead of GPT-2's (RoPE instead of learned positions, RMSNorm, SwiGLU with d_ff 344 so the
parameter count stays within 1% of the default's), for comparing architectures on the quickstart.
"""

from llmjax.config import make_config

# fmt: off
SHARED = dict(vocab_size=65, padded_vocab_size=128, context_len=64, n_layer=4, n_head=4, head_dim=32, d_model=128,
              dtype="float32", matmul_dtype="bfloat16", attention_impl="auto", scan_layers=False, remat="none",
              init_std=0.02, norm_eps=1e-5)
MODELS = dict(
    default=dict(arch="vanilla", d_ff=512, bias=False, **SHARED),
    modern=dict(arch="modern", n_kv_head=4, d_ff=344, rope_base=10000.0, **SHARED),
)
RECIPE = dict(
    train=dict(batch_size=12, max_steps=2000, lr=1e-3, min_lr=1e-4, warmup_steps=100,
               beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0,
               log_every_steps=100, checkpoint_every_steps=1000),
    data=dict(dataset="tinyshakespeare_char"),
    eval=dict(every_steps=250, num_batches=20, sample_tokens=500),
)
# fmt: on


def get_config(variant: str = "default"):
    return make_config(variant, MODELS, **{group: {v: keys for v in MODELS} for group, keys in RECIPE.items()})
