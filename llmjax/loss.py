"""The language-modelling loss, in float32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BTV, targets_BT, mask_BT=None):
    """Mean next-token cross-entropy (nats). `mask_BT` (0/1) selects the positions that count."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    if mask_BT is None:
        return losses.mean()
    mask_BT = mask_BT.astype(jnp.float32)
    return (losses * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)


def chunked_cross_entropy(head, x_BTD, targets_BT, chunk: int = 0):
    """`cross_entropy(head(x_BTD), targets_BT)` without ever holding the whole (B, T, V) logits: the
    positions go `chunk` at a time through `head` and the loss, and the backward pass recomputes each
    chunk's logits (jax.checkpoint) instead of keeping them. At GPT-2's vocabulary the float32 logits
    of a 16 x 1024 batch are 3.3 GB, and the plain path keeps several such buffers alive. Same value
    and gradients up to float32 summation order; the cost is one more head matmul in the backward.
    `chunk` 0 (or >= T) is the plain path. The batch axis is never split (it carries the sharding)."""
    B, T, D = x_BTD.shape
    if chunk <= 0 or chunk >= T:
        return cross_entropy(head(x_BTD), targets_BT)
    if T % chunk:
        raise ValueError(f"the loss chunk ({chunk} positions) must divide the sequence length {T}")
    n = T // chunk

    @jax.checkpoint
    def chunk_sum(x_BcD, t_Bc):
        return optax.softmax_cross_entropy_with_integer_labels(head(x_BcD).astype(jnp.float32), t_Bc).sum()

    def body(total, xt):
        return total + chunk_sum(*xt), None

    xs = x_BTD.reshape(B, n, chunk, D).swapaxes(0, 1)  # (n, B, chunk, D)
    ts = targets_BT.reshape(B, n, chunk).swapaxes(0, 1)
    total, _ = jax.lax.scan(body, jnp.float32(0), (xs, ts))
    return total / (B * T)
