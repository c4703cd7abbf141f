"""The language-modelling loss, in float32 whatever the compute dtype."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def cross_entropy(logits_BTV, targets_BT, mask_BT=None):
    """Mean next-token cross-entropy (nats). `mask_BT` (0/1) selects the positions that count."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    if mask_BT is None:
        return losses.mean()
    mask_BT = mask_BT.astype(jnp.float32)
    return (losses * mask_BT).sum() / jnp.maximum(mask_BT.sum(), 1.0)
