"""The language-modelling loss, in float32 whatever the compute dtype."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from llmjax.models.layers import mask_padded_vocab


def cross_entropy(logits_BTV, targets_BT, mask_BT=None):
    """Mean next-token cross-entropy (nats). `mask_BT` (0/1) selects the positions that count; a
    masked-out position's target may be anything (an ignore index such as -100, a padding id): its
    loss is left out, not multiplied by 0 (an id outside the vocabulary gives a NaN loss there, and
    NaN * 0 is NaN)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    if mask_BT is None:
        return losses.mean()
    mask_BT = mask_BT.astype(jnp.float32)
    return jnp.where(mask_BT > 0, losses * mask_BT, 0.0).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def token_losses(embed, x_BTD, targets_BT, chunks: int = 0, logits_dtype=jnp.float32):
    """Per-token cross-entropy (B, T), float32, of the tied head `embed.attend(x_BTD)` against
    `targets_BT`, without ever holding the whole (B, T, V) logits when `chunks` > 1: the head's table
    is cut into `chunks` slices of rows; each slice's logits give its log-sum-exp and the targets'
    logits that fall in it, under jax.checkpoint, so the backward pass recomputes one slice's logits
    at a time instead of keeping them all. At GPT-2's vocabulary the float32 logits of a 16 x 1024
    batch are 3.3 GB, and the plain path keeps several such buffers. Same values and gradients up to
    float32 summation order; the cost is one more head matmul in the backward. Slicing the
    vocabulary, not the positions, keeps the batch axis (the data sharding) whole in every slice, so
    each slice's table gradient is reduced across devices once, as in the plain path. `chunks` 0 or 1
    is the plain path; it must divide the table's rows. `logits_dtype`: the plain path's logits as
    the head writes them (bfloat16: half the memory and traffic of float32, as nanoGPT's autocast
    has them; the loss is computed in float32 from them either way); the sliced path's stay float32."""
    table_VD = embed.embedding[...]
    V, D = table_VD.shape
    if chunks <= 1:
        return masked_cross_entropy(embed.raw_logits(x_BTD).astype(logits_dtype), targets_BT, embed.vocab_size)
    if V % chunks:
        raise ValueError(f"the loss chunks ({chunks}) must divide the {V} rows of the token table")
    R = V // chunks

    @jax.checkpoint
    def one_slice(rows_RD, first):
        logits_BTR = embed.attend_rows(x_BTD, rows_RD, first)
        local = targets_BT - first
        hit = (local >= 0) & (local < R)
        target_logit = jnp.take_along_axis(logits_BTR, jnp.clip(local, 0, R - 1)[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits_BTR, axis=-1), jnp.where(hit, target_logit, 0.0)

    lse_CBT, target_CBT = jax.lax.map(lambda a: one_slice(*a), (table_VD.reshape(chunks, R, D), jnp.arange(chunks) * R))
    return jax.nn.logsumexp(lse_CBT, axis=0) - target_CBT.sum(axis=0)


# ---------------------------------------------------------------------------------------------
# The plain path's loss: one pass over the logits each way


def masked_cross_entropy(logits_BTV, targets_BT, vocab_size: int):
    """Per-token cross-entropy (B, T), float32, of logits (float32 or 16-bit: they are widened as
    they are read, never copied wider; their gradient comes back in their dtype) whose columns >= `vocab_size` (the table's
    padding rows) are masked out, as `Embedding.attend` masks them. The same values as optax's
    `softmax_cross_entropy_with_integer_labels` of the masked logits; the difference is what the
    backward pass keeps: the raw logits (the head's output, in memory anyway) and the log-sum-exp,
    so the gradient (softmax - one-hot) comes out of one fused pass over them. Differentiating the
    masked logits instead makes XLA write them out as a separate (B, T, V) buffer for the backward
    pass: at GPT-2's vocabulary and a 16 x 1024 batch a 3.3 GB float32 write and two reads more per
    step (an H200 trace: 1.5 ms of a 39 ms `vanilla` step, and that much more peak memory)."""
    return _xent(logits_BTV, targets_BT, vocab_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _xent(logits_BTV, targets_BT, vocab_size):
    return _xent_fwd(logits_BTV, targets_BT, vocab_size)[0]


def _xent_fwd(logits_BTV, targets_BT, vocab_size):
    f32 = logits_BTV.astype(jnp.float32)
    lse_BT = jax.nn.logsumexp(mask_padded_vocab(f32, vocab_size), axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return lse_BT - target_BT, (logits_BTV, targets_BT, lse_BT)


def _xent_bwd(vocab_size, residuals, g_BT):
    logits_BTV, targets_BT, lse_BT = residuals
    probs_BTV = jnp.exp(mask_padded_vocab(logits_BTV.astype(jnp.float32), vocab_size) - lse_BT[..., None])
    onehot_BTV = jnp.arange(logits_BTV.shape[-1]) == targets_BT[..., None]
    return (g_BT[..., None] * (probs_BTV - onehot_BTV)).astype(logits_BTV.dtype), None


_xent.defvjp(_xent_fwd, _xent_bwd)
