"""`ssm`: a selective state-space language model (the S6 layer of Mamba, Gu & Dao 2023) in pre-norm
residual blocks with LayerNorm and a GELU MLP. No attention and no positional embedding.

The mixer, per channel e of the d_inner-wide stream u and per state dimension n:

    u, z       = split(x W_in)                            (B, T, E) each
    u          = silu(causal_conv(u))                      (only with d_conv > 0; see below)
    delta      = softplus(u W_x[:, :R] W_dt + b_dt)        (B, T, E)   input-dependent step size
    B_t, C_t   = u W_x[:, R:R+N], u W_x[:, R+N:]           (B, T, N)   input-dependent in/out maps
    A          = -exp(A_log)                               (E, N)      diagonal, stable
    h_t        = exp(delta_t A) * h_{t-1} + delta_t B_t u_t   (E, N)   zero-order hold on A
    y_t        = C_t . h_t + D * u_t
    out        = (y * silu(z)) W_out

On a GPU the recurrence runs as a fused kernel (llmjax/models/selective_scan.py: each row's state
in registers, one pass over the tokens; `model.scan_impl`). Elsewhere (and with scan_impl='xla')
it runs as a parallel scan (`jax.lax.associative_scan` over the pairs
(a_t, b_t) with (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)) inside chunks of `scan_chunk` tokens,
carrying h from chunk to chunk with `lax.scan` and rematerialising each chunk in the backward
pass, so memory stays O(B * chunk * E * N) at any context. Decoding runs the same recurrence one
token at a time: the decode state is h, (B, E, N) per layer, kept in float32, whatever the length.
A padding token (position < 0) is the identity step (a = 1, b = 0), so it leaves h unchanged.

With `d_conv = K > 0` (configs/ssm.py: 4, Mamba's mixer) u first goes through a causal depthwise
convolution of width K and a SiLU, so that delta, B_t and C_t see the last K tokens rather than the
current one only:

    u_t        = silu(sum_k w[k] * u_{t-K+1+k} + b)        per channel; w[K-1] weighs the current token

(PyTorch's Conv1d(E, E, K, groups=E, padding=K-1) truncated to T, as Mamba computes it). The decode
state then also holds each row's last K-1 inputs (B, K-1, E) per layer. A padding token is skipped
by the convolution as by the scan: each token's window is the last K tokens of its own row that are
not padding (with a cache, in any order; without one, padding must come before or after a row's
tokens, as every caller puts it). `d_conv = 0` is the S6 layer alone, as the architecture's issue
asked ("a diagonal state-space layer with input-dependent discretisation"): runs saved before the
option existed load as such.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from llmjax import runtime
from llmjax.config import ConfigError, ModelConfig
from llmjax.models import selective_scan
from llmjax.models.layers import MLP, DecoderLM, PreNormBlock, count_params, dense, layer_norm, linear_without_bias, residual_std
from llmjax.registry import register


SCAN_IMPLS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SSMConfig(ModelConfig):
    fused_decode_attention = False  # its own decode state: decode_attention_impl='pallas' refused (config.ModelConfig)
    d_inner: int  # E: width of the state-space stream (2 * d_model in Mamba)
    d_state: int  # N: state size per channel
    dt_rank: int  # R: rank of the step-size projection
    d_ff: int  # GELU MLP hidden width
    scan_chunk: int  # tokens per associative-scan chunk (bounds training memory)
    # width of the causal depthwise convolution (and SiLU) before the scan, Mamba's d_conv (4); 0:
    # none, the S6 layer alone (the default here, so that runs saved before the option load as they were)
    d_conv: int = 0
    dt_min: float  # initial step sizes are log-uniform in [dt_min, dt_max]
    dt_max: float
    # auto: the fused kernel (llmjax/models/selective_scan.py) on a GPU where the widths fit, else
    # xla (the chunked associative scan); pallas anywhere (on a CPU in Pallas' interpreter: slow)
    scan_impl: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        for name in ("d_inner", "d_state", "dt_rank", "scan_chunk"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_conv < 0 or self.d_conv == 1:
            raise ConfigError(f"model.d_conv must be 0 (no convolution) or a width of at least 2 (Mamba: 4), got {self.d_conv}")
        if not 0 < self.dt_min < self.dt_max:
            raise ConfigError(f"need 0 < model.dt_min < model.dt_max, got {self.dt_min}, {self.dt_max}")
        if self.scan_impl not in SCAN_IMPLS:
            raise ConfigError(f"model.scan_impl='{self.scan_impl}' is not one of {', '.join(SCAN_IMPLS)}")
        if self.scan_impl == "pallas" and not selective_scan.supported(self.d_inner, self.d_state):
            raise ConfigError(
                f"model.scan_impl='pallas' needs model.d_state a power of two and model.d_inner a multiple of 8 "
                f"(got {self.d_state}, {self.d_inner}); use 'auto' or 'xla'"
            )


def combine(left, right):
    """Compose two affine steps h -> a h + b (left first)."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def scan_chunked(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, valid_BT, chunk: int):
    """y (B, T, E) and the final state of h_t = exp(delta A) h_{t-1} + delta B u, y_t = C . h_t,
    as associative scans over chunks of `chunk` tokens (at most T: one decoded token is one step,
    not a chunk of padding). float32 throughout."""
    B, T, E = u_BTE.shape
    chunk = min(chunk, T)
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T

    def prep(x, fill=0.0):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return x.reshape(B, n_chunks, chunk, *x.shape[2:]).swapaxes(0, 1)  # (n_chunks, B, chunk, ...)

    xs = (prep(delta_BTE), prep(u_BTE), prep(B_BTN), prep(C_BTN), prep(valid_BT, False))

    @jax.checkpoint  # keep only the carried state per chunk for the backward pass
    def body(h_BEN, inputs):
        delta, u, Bm, Cm, valid = inputs
        a = jnp.exp(delta[..., None] * A_EN)  # (B, C, E, N)
        b = (delta * u)[..., None] * Bm[:, :, None, :]
        a = jnp.where(valid[..., None, None], a, 1.0)  # padding: the identity step
        b = jnp.where(valid[..., None, None], b, 0.0)
        a_cum, b_cum = jax.lax.associative_scan(combine, (a, b), axis=1)
        h_all = a_cum * h_BEN[:, None] + b_cum  # state after each token of the chunk
        y = jnp.einsum("bcen,bcn->bce", h_all, Cm)
        return h_all[:, -1], y

    h_last, ys = jax.lax.scan(body, h0_BEN, xs)
    return ys.swapaxes(0, 1).reshape(B, n_chunks * chunk, E)[:, :T], h_last


def causal_conv(u_BTE, valid_BT, w_KE, b_E, state_BSE=None):
    """(y (B, T, E), new state (B, K-1, E)) of the causal depthwise convolution
    y_t = sum_k w[k] * u_{t-K+1+k} + b over each row's tokens that are not padding (`valid_BT`),
    `state` holding the K-1 inputs before the first (zeros: the start of a sequence). float32.

    With a state (decoding), each row's padding tokens are moved before its state (a stable sort of
    the row by validity, the identity where nothing is padding), so that every token's window is
    its own row's previous K-1 tokens whichever order the padding sits in (a ragged prefill pads
    on the right); the new state is then the row's last K-1 tokens. Without a state padding is a
    zero input: the same where it comes before or after a row's tokens. Outputs at padding
    positions are meaningless (the scan skips them)."""
    B, T, E = u_BTE.shape
    K = w_KE.shape[0]
    u_BTE = jnp.where(valid_BT[..., None], u_BTE.astype(jnp.float32), 0.0)
    held = jnp.zeros((B, K - 1, E), jnp.float32) if state_BSE is None else state_BSE.astype(jnp.float32)
    ext = jnp.concatenate([held, u_BTE], axis=1)  # (B, K-1+T, E)
    w = w_KE.astype(jnp.float32)
    if state_BSE is not None and T == 1:  # one decoded token: a padding row keeps its state (no sort)
        y = jnp.sum(ext * w, axis=1, keepdims=True) + b_E.astype(jnp.float32)
        return y, jnp.where(valid_BT[..., None], ext[:, 1:], held)
    if state_BSE is not None:
        order = jnp.argsort(jnp.concatenate([jnp.ones((B, K - 1), bool), valid_BT], axis=1), axis=1, stable=True)
        ext = jnp.take_along_axis(ext, order[..., None], axis=1)
    y = sum(w[k] * ext[:, k : k + T] for k in range(K)) + b_E.astype(jnp.float32)
    if state_BSE is not None:  # back to each token's own place: token i sits at slot inv[K-1+i] - (K-1)
        inv = jnp.argsort(order, axis=1)[:, K - 1 :] - (K - 1)
        y = jnp.take_along_axis(y, jnp.clip(inv, 0, T - 1)[..., None], axis=1)
    return y, ext[:, T:]


def scan_reference(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN):
    """The same recurrence one step at a time (lax.scan): the reference the tests compare against."""

    def step(h, inputs):
        delta, u, Bm, Cm = inputs
        h = jnp.exp(delta[..., None] * A_EN) * h + (delta * u)[..., None] * Bm[:, None, :]
        return h, jnp.einsum("ben,bn->be", h, Cm)

    h_last, ys = jax.lax.scan(step, h0_BEN, tuple(x.swapaxes(0, 1) for x in (delta_BTE, u_BTE, B_BTN, C_BTN)))
    return ys.swapaxes(0, 1), h_last


class SelectiveSSM(nnx.Module):
    """The S6 mixer (with d_conv > 0, Mamba's: convolution and SiLU first). Decode cache per layer:
    {'h': (B, E, N) float32} and with d_conv = K > 0 {'conv': (B, K-1, E)}, the last K-1 inputs."""

    def __init__(self, cfg: SSMConfig, *, rngs: nnx.Rngs):
        E, N, R = cfg.d_inner, cfg.d_state, cfg.dt_rank
        self.E, self.N, self.R, self.chunk, self.dtype = E, N, R, cfg.scan_chunk, cfg.compute_dtype
        self.scan_impl, self.K = cfg.scan_impl, cfg.d_conv
        self.in_proj = dense(cfg, cfg.d_model, 2 * E, rngs=rngs)
        if self.K:  # PyTorch's Conv1d initialisation (Mamba keeps it): uniform within 1/sqrt(fan_in = K)
            bound = self.K**-0.5
            self.conv_weight = nnx.Param(jax.random.uniform(rngs.params(), (self.K, E), jnp.float32, -bound, bound))
            self.conv_bias = nnx.Param(jax.random.uniform(rngs.params(), (E,), jnp.float32, -bound, bound))
        self.x_proj = dense(cfg, E, R + 2 * N, rngs=rngs)
        self.dt_proj = nnx.Linear(
            R,
            E,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            kernel_init=nnx.initializers.uniform(2 * R**-0.5),  # shifted to +-R^-0.5 below
            rngs=rngs,
        )
        self.dt_proj.kernel[...] = self.dt_proj.kernel[...] - R**-0.5
        # Bias: softplus^-1 of log-uniform step sizes in [dt_min, dt_max] (Mamba's init).
        u = jax.random.uniform(rngs.params(), (E,))
        dt = jnp.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        self.dt_proj.bias[...] = dt + jnp.log(-jnp.expm1(-dt))
        self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(jnp.arange(1, N + 1, dtype=jnp.float32), (E, N))))  # S4D-real
        self.D = nnx.Param(jnp.ones((E,), jnp.float32))
        self.out_proj = dense(cfg, E, cfg.d_model, std=residual_std(cfg), rngs=rngs)

    def _inputs(self, x_BTD, valid_BT=None, conv_state=None):
        """(delta, u, B, C, z, the convolution's new state or None) of a call's input."""
        u, z = jnp.split(self.in_proj(x_BTD), 2, axis=-1)  # (B, T, E) each
        if self.K:
            valid_BT = jnp.ones(u.shape[:2], bool) if valid_BT is None else valid_BT
            u, conv_state = causal_conv(u, valid_BT, self.conv_weight[...], self.conv_bias[...], conv_state)
            u = jax.nn.silu(u).astype(self.dtype)
        dt_in, B_BTN, C_BTN = jnp.split(self.x_proj(u), [self.R, self.R + self.N], axis=-1)
        # the step-size bias (about -4.6 to -6.9) added in float32, as Mamba adds its delta_bias: in
        # bf16 the sum was off by 0.7% (median) of delta
        dt, dt_bias = linear_without_bias(self.dt_proj, dt_in)
        delta = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        return delta, f32(u), f32(B_BTN), f32(C_BTN), z, conv_state

    def __call__(self, x_BTD, positions_BT, cache):
        B = x_BTD.shape[0]
        conv_state = None if cache is None or not self.K else cache["conv"]
        delta, u, B_BTN, C_BTN, z, conv_state = self._inputs(x_BTD, positions_BT >= 0, conv_state)
        A = -jnp.exp(self.A_log[...])
        h0 = jnp.zeros((B, self.E, self.N), jnp.float32) if cache is None else cache["h"]
        if self._fused(x_BTD.shape[1]):  # padding (position < 0): delta = 0, the identity step
            valid = (positions_BT >= 0)[..., None]
            y, h = selective_scan.selective_scan(jnp.where(valid, delta, 0.0), jnp.where(valid, u, 0.0), B_BTN, C_BTN, A, h0,
                                                 runtime.backend() != "gpu")
        else:
            y, h = scan_chunked(delta, u, B_BTN, C_BTN, A, h0, positions_BT >= 0, self.chunk)
        y = y + u * self.D[...]
        out = self.out_proj((y * jax.nn.silu(z.astype(jnp.float32))).astype(self.dtype))
        if cache is None:
            return out, None
        return out, {"h": h, **({"conv": conv_state.astype(cache["conv"].dtype)} if self.K else {})}

    def _fused(self, T: int) -> bool:
        """Whether this call runs the fused kernel: 'pallas', or 'auto' on a GPU for more than one
        token (one decoded token is a few elementwise operations either way)."""
        if self.scan_impl == "pallas":
            return True
        return self.scan_impl == "auto" and T > 1 and runtime.backend() == "gpu" and selective_scan.supported(self.E, self.N)

    def init_cache(self, batch_size: int, max_len: int, dtype):
        del max_len  # the state does not grow; h stays float32 for accuracy, the inputs are `dtype`
        h = {"h": jnp.zeros((batch_size, self.E, self.N), jnp.float32)}
        return {**h, "conv": jnp.zeros((batch_size, self.K - 1, self.E), dtype)} if self.K else h


def block(cfg: SSMConfig, rngs: nnx.Rngs) -> PreNormBlock:
    return PreNormBlock(
        norm_1=layer_norm(cfg, cfg.d_model, rngs=rngs),
        attn=SelectiveSSM(cfg, rngs=rngs),
        norm_2=layer_norm(cfg, cfg.d_model, rngs=rngs),
        mlp=MLP(cfg, cfg.d_ff, rngs=rngs),
        decode_norm_impl=cfg.decode_norm_impl,
    )


@register("ssm")
class SSM(DecoderLM):
    config_class = SSMConfig

    def __init__(self, cfg: SSMConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, make_block=lambda r: block(cfg, r), final_norm=layer_norm, learned_positions=False, rngs=rngs)

    @classmethod
    def mixer_params(cls, cfg, params):
        return count_params(params, "A_log")  # (its products, delta * A, are the mixer's below)

    @classmethod
    def mixer_flops_per_token(cls, cfg, seq_len):
        # Per token, channel and state: delta*A, exp, (delta*u)*B, a*h + b (2), C*h summed (2).
        del seq_len  # linear in length: no term grows with the context
        return cfg.n_layer * 7 * cfg.d_inner * cfg.d_state
