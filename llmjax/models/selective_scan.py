"""The SSM's selective scan as a fused GPU kernel (Pallas, Triton backend), with its gradient.

    h_t = exp(delta_t A) * h_{t-1} + (delta_t u_t) B_t      (E, N) per row, t = 0..T-1
    y_t = sum_n h_t[:, n] C_t[n]                            (E,)

XLA's parallel form (`ssm.scan_chunked`: an associative scan inside chunks) writes the (B, T, E, N)
float32 states of every scan level to memory and reads them back: compiled for an H200 (llmjax.aot),
GPT-2-small-sized `ssm` moves 1,154 GB per training step at batch 16, a 240 ms memory roofline. This
kernel keeps each row's (E-block x N) state in registers and walks the T steps in order (Mamba's
approach): one program per (row, block of `BLOCK_E` channels), reading delta, u, B, C and writing y
once. The gradient runs it again keeping its states h_t (written once, (B, T, E, N)), then a second
kernel walks backward in time with the adjoint g_t = dL/dh_t in registers,

    g_t = exp(delta_{t+1} A) * g_{t+1} + dy_t C_t      (g_{T-1} = dh_last + dy_{T-1} C_{T-1}),

reading h_t once and writing each step's gradients (B's and C's as per-block partial sums): about
3.5 GB per layer at that size.

On a CPU (tests, `model.scan_impl='pallas'`) the kernel runs in Pallas' interpreter: slow, for
checking only. The kernel's block shapes must be powers of two: T is padded to one with identity
steps (delta = 0, u = 0), and `supported` says whether E and N fit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK_E = 64  # channels per program (a power of two; N is the other state axis)


def block_e(E: int) -> int | None:
    """The channel block for width E: the largest power of two <= BLOCK_E dividing E (None if < 8)."""
    b = BLOCK_E
    while b >= 8 and E % b:
        b //= 2
    return b if b >= 8 else None


def supported(E: int, N: int) -> bool:
    return block_e(E) is not None and N >= 1 and N & (N - 1) == 0


def _kernel(delta_ref, x_ref, b_ref, c_ref, a_ref, h0_ref, y_ref, hlast_ref, *states_ref):
    """One row, one block of channels: h (BE, N) in registers through the T steps."""
    A = a_ref[...]

    def step(t, h):
        d = delta_ref[t, :]
        h = jnp.exp(d[:, None] * A) * h + x_ref[t, :][:, None] * b_ref[t, :][None, :]
        y_ref[t, :] = jnp.sum(h * c_ref[t, :][None, :], axis=1)
        if states_ref:
            states_ref[0][t, :, :] = h
        return h

    hlast_ref[...] = jax.lax.fori_loop(0, delta_ref.shape[0], step, h0_ref[...])


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=("keep_states", "interpret"))
def scan(delta_BTE, x_BTE, B_BTN, C_BTN, A_EN, h0_BEN, *, keep_states: bool = False, interpret: bool = False):
    """(y (B, T, E), h_last (B, E, N)[, h (B, T, E, N)]) of h_t = exp(delta_t A) h_{t-1} + x_t B_t,
    y_t = h_t . C_t. float32."""
    B, T, E = delta_BTE.shape
    N = A_EN.shape[1]
    BE = block_e(E)
    Tp = _next_pow2(T)
    if Tp != T:  # identity steps at the end: h_last unchanged, their y dropped
        pad = lambda a: jnp.pad(a, ((0, 0), (0, Tp - T), (0, 0)))  # noqa: E731
        delta_BTE, x_BTE, B_BTN, C_BTN = map(pad, (delta_BTE, x_BTE, B_BTN, C_BTN))
    rows_e = pl.BlockSpec((None, Tp, BE), lambda b, j: (b, 0, j))
    rows_n = pl.BlockSpec((None, Tp, N), lambda b, j: (b, 0, 0))
    state = pl.BlockSpec((None, BE, N), lambda b, j: (b, j, 0))
    out_specs = [rows_e, state]
    out_shape = [jax.ShapeDtypeStruct((B, Tp, E), jnp.float32), jax.ShapeDtypeStruct((B, E, N), jnp.float32)]
    if keep_states:
        out_specs.append(pl.BlockSpec((None, Tp, BE, N), lambda b, j: (b, 0, j, 0)))
        out_shape.append(jax.ShapeDtypeStruct((B, Tp, E, N), jnp.float32))
    out = pl.pallas_call(
        _kernel,
        grid=(B, E // BE),
        in_specs=[rows_e, rows_e, rows_n, rows_n, pl.BlockSpec((BE, N), lambda b, j: (j, 0)), state],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name="selective_scan",
    )(*(a.astype(jnp.float32) for a in (delta_BTE, x_BTE, B_BTN, C_BTN, A_EN, h0_BEN)))
    y, h_last = out[0][:, :T], out[1]
    return (y, h_last, out[2][:, :T]) if keep_states else (y, h_last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def selective_scan(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, interpret: bool = False):
    """(y, h_last) of the S6 recurrence (the module docstring), differentiable in every input."""
    return scan(delta_BTE, delta_BTE * u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, interpret=interpret)


def _fwd(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, interpret):
    out = scan(delta_BTE, delta_BTE * u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, interpret=interpret)
    return out, (delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN)


def _bwd_kernel(delta_ref, u_ref, b_ref, c_ref, a_ref, h0_ref, hs_ref, dy_ref, dhlast_ref,
                d_delta_ref, d_u_ref, d_b_ref, d_c_ref, d_a_ref, d_h0_ref):
    """One row, one block of channels, backward in time: the adjoint g_t in registers, each step's
    gradients written out (B and C's as this block's partial sums over its channels)."""
    A = a_ref[...]
    T = delta_ref.shape[0]

    def step(i, carry):
        ag_next, h_t, dA = carry  # a_{t+1} g_{t+1}, h_t, sum of dL/dA so far
        t = T - 1 - i
        d, u, bm, cm, dy = delta_ref[t, :], u_ref[t, :], b_ref[t, :], c_ref[t, :], dy_ref[t, :]
        h_prev = jnp.where(t > 0, hs_ref[jnp.maximum(t - 1, 0), :, :], h0_ref[...])
        g = ag_next + dy[:, None] * cm[None, :]  # g_t = dL/dh_t
        a = jnp.exp(d[:, None] * A)
        gah = g * a * h_prev  # dL/da_t * a_t
        gb = jnp.sum(g * bm[None, :], axis=1)
        d_delta_ref[t, :] = jnp.sum(gah * A, axis=1) + u * gb
        d_u_ref[t, :] = d * gb
        d_b_ref[t, :] = jnp.sum(g * (d * u)[:, None], axis=0)
        d_c_ref[t, :] = jnp.sum(h_t * dy[:, None], axis=0)
        return a * g, h_prev, dA + gah * d[:, None]

    T_last = hs_ref[T - 1, :, :]
    ag0, _, dA = jax.lax.fori_loop(0, T, step, (dhlast_ref[...], T_last, jnp.zeros_like(A)))
    d_a_ref[...] = dA
    d_h0_ref[...] = ag0  # a_0 g_0


def _bwd(interpret, residuals, cotangents):
    delta, u, Bm, Cm, A, h0 = residuals
    dy, dh_last = cotangents
    _, _, h = scan(delta, delta * u, Bm, Cm, A, h0, keep_states=True, interpret=interpret)  # h_t, (B, T, E, N)
    return _scan_bwd(delta, u, Bm, Cm, A, h0, h, dy, dh_last, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _scan_bwd(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, h_BTEN, dy_BTE, dhlast_BEN, *, interpret: bool):
    B, T, E = delta_BTE.shape
    N = A_EN.shape[1]
    BE = block_e(E)
    nb = E // BE
    Tp = _next_pow2(T)
    if Tp != T:  # identity steps at the end (zero inputs, zero output gradient): no contribution
        pad = lambda a: jnp.pad(a, ((0, 0), (0, Tp - T)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
        delta_BTE, u_BTE, B_BTN, C_BTN, dy_BTE = map(pad, (delta_BTE, u_BTE, B_BTN, C_BTN, dy_BTE))
        h_BTEN = jnp.concatenate([h_BTEN, jnp.broadcast_to(h_BTEN[:, -1:], (B, Tp - T, E, N))], axis=1)
    rows_e = pl.BlockSpec((None, Tp, BE), lambda b, j: (b, 0, j))
    rows_n = pl.BlockSpec((None, Tp, N), lambda b, j: (b, 0, 0))
    part_n = pl.BlockSpec((None, Tp, None, N), lambda b, j: (b, 0, j, 0))
    state = pl.BlockSpec((None, BE, N), lambda b, j: (b, j, 0))
    d_delta, d_u, d_b, d_c, d_a, d_h0 = pl.pallas_call(
        _bwd_kernel,
        grid=(B, nb),
        in_specs=[rows_e, rows_e, rows_n, rows_n, pl.BlockSpec((BE, N), lambda b, j: (j, 0)), state,
                  pl.BlockSpec((None, Tp, BE, N), lambda b, j: (b, 0, j, 0)), rows_e, state],
        out_specs=[rows_e, rows_e, part_n, part_n, state, state],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, E), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((B, Tp, nb, N), jnp.float32)] * 2
        + [jax.ShapeDtypeStruct((B, E, N), jnp.float32)] * 2,
        interpret=interpret,
        name="selective_scan_bwd",
    )(*(a.astype(jnp.float32) for a in (delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, h_BTEN, dy_BTE, dhlast_BEN)))
    return (d_delta[:, :T], d_u[:, :T], d_b[:, :T].sum(axis=2), d_c[:, :T].sum(axis=2), d_a.sum(axis=0), d_h0)


selective_scan.defvjp(_fwd, _bwd)
