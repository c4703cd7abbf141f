"""Naive float64 NumPy references for the attention family and the selective state-space mixer,
written from the papers' formulas (independently of llmjax's code) to check the models against."""

from __future__ import annotations

import numpy as np


def rope(x, positions, base):
    """Rotate-half RoPE: pair (i, i + d/2) rotated by position * base^(-2i/d). x: (T, H, d)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    out = np.empty_like(x)
    for t, p in enumerate(positions):
        for i in range(d // 2):
            theta = p * base ** (-2.0 * i / d)
            c, s = np.cos(theta), np.sin(theta)
            a, b = x[t, :, i], x[t, :, i + d // 2]
            out[t, :, i] = a * c - b * s
            out[t, :, i + d // 2] = b * c + a * s
    return out


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def causal_softmax_attention(q, k, v, scale):
    """q: (T, H, dq), k: (T, H, dq), v: (T, H, dv) -> (T, H, dv); position t sees s <= t."""
    T = q.shape[0]
    scores = np.einsum("thd,shd->hts", q, k) * scale
    scores = np.where(np.tril(np.ones((T, T), bool))[None], scores, -np.inf)
    return np.einsum("hts,shd->thd", softmax(scores), v)


def round_to(a, dtype):
    """`a` rounded to a narrower float dtype (bfloat16: round to nearest even), back in float64."""
    import jax.numpy as jnp

    return np.asarray(np.asarray(a, np.float32).astype(jnp.dtype(dtype)), np.float64)


def linear(x, p, narrow=None):
    """x @ kernel + bias; with `narrow` (model.matmul_dtype) both matmul operands are first rounded
    to it, the product and the bias add exact."""
    kernel = np.asarray(p["kernel"], np.float64)
    if narrow is not None:
        x, kernel = round_to(x, narrow), round_to(kernel, narrow)
    y = x @ kernel
    return y + np.asarray(p["bias"], np.float64) if "bias" in p else y


def rms_norm(x, p, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * np.asarray(p["scale"], np.float64)


def grouped_attention(x, p, *, n_head, n_kv_head, head_dim, rope_base=None, narrow=None):
    """One sequence (T, D) through GQA: query head h uses key/value head h // (n_head / n_kv_head)."""
    x = np.asarray(x, np.float64)
    T = x.shape[0]
    qkv = linear(x, p["qkv_proj"], narrow).reshape(T, n_head + 2 * n_kv_head, head_dim)
    q, k, v = qkv[:, :n_head], qkv[:, n_head : n_head + n_kv_head], qkv[:, n_head + n_kv_head :]
    if rope_base is not None:
        q, k = rope(q, range(T), rope_base), rope(k, range(T), rope_base)
    group = n_head // n_kv_head
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    out = causal_softmax_attention(q, k, v, 1 / np.sqrt(head_dim))
    return linear(out.reshape(T, n_head * head_dim), p["o_proj"], narrow)


def latent_attention(x, p, cfg):
    """One sequence (T, D) through DeepSeek-V2 MLA, keys and values expanded from the latent."""
    x = np.asarray(x, np.float64)
    T, H = x.shape[0], cfg.n_head
    nope, r_dim, vd, r = cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = linear(rms_norm(linear(x, p["q_down"]), p["q_norm"], cfg.norm_eps), p["q_up"])
    else:
        q = linear(x, p["q_proj"])
    q = q.reshape(T, H, nope + r_dim)
    q_nope, q_rope = q[..., :nope], rope(q[..., nope:], range(T), cfg.rope_base)
    ckv = linear(x, p["kv_down"])
    c = rms_norm(ckv[:, :r], p["kv_norm"], cfg.norm_eps)
    k_rope = rope(ckv[:, None, r:], range(T), cfg.rope_base)  # (T, 1, rope)
    kv = linear(c, p["kv_up"]).reshape(T, H, nope + vd)
    k = np.concatenate([kv[..., :nope], np.repeat(k_rope, H, axis=1)], axis=-1)
    qf = np.concatenate([q_nope, q_rope], axis=-1)
    out = causal_softmax_attention(qf, k, kv[..., nope:], 1 / np.sqrt(nope + r_dim))
    return linear(out.reshape(T, H * vd), p["o_proj"])


def silu(x):
    return x / (1.0 + np.exp(-x))


def selective_ssm(x, p, cfg):
    """One sequence (T, D) through Mamba's mixer (Gu & Dao 2023: Algorithm 2, the S6 scan, preceded
    with d_conv > 0 by the block's causal depthwise convolution and SiLU), one token at a time:

        u, z = split(x W_in);  u_t = silu(sum_k w[k] u_{t-K+1+k} + b)  (zeros before the start)
        delta = softplus(u W_x[:, :R] W_dt + b_dt);  B_t, C_t = u W_x[:, R:R+N], u W_x[:, R+N:]
        h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t,  A = -exp(A_log);  y_t = h_t C_t + D u_t
        out = (y * silu(z)) W_out
    """
    x = np.asarray(x, np.float64)
    T, E, N, R, K = x.shape[0], cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    xz = linear(x, p["in_proj"])
    u, z = xz[:, :E], xz[:, E:]
    if K:
        w, b = np.asarray(p["conv_weight"], np.float64), np.asarray(p["conv_bias"], np.float64)
        padded = np.concatenate([np.zeros((K - 1, E)), u])
        u = silu(np.stack([(w * padded[t : t + K]).sum(0) + b for t in range(T)]))
    dbc = linear(u, p["x_proj"])
    dt_in, Bm, Cm = dbc[:, :R], dbc[:, R : R + N], dbc[:, R + N :]
    delta = np.log1p(np.exp(linear(dt_in, p["dt_proj"])))
    A = -np.exp(np.asarray(p["A_log"], np.float64))
    D = np.asarray(p["D"], np.float64)
    h, ys = np.zeros((E, N)), []
    for t in range(T):
        h = np.exp(delta[t][:, None] * A) * h + (delta[t] * u[t])[:, None] * Bm[t][None, :]
        ys.append(h @ Cm[t] + D * u[t])
    return linear(np.stack(ys) * silu(z), p["out_proj"])
