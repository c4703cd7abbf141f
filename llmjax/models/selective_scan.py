"""The SSM's selective scan as a fused GPU kernel (Pallas, Triton backend), with its gradient.

    h_t = exp(delta_t A) * h_{t-1} + (delta_t u_t) B_t      (E, N) per row, t = 0..T-1
    y_t = sum_n h_t[:, n] C_t[n]                            (E,)

XLA's parallel form (`ssm.scan_chunked`: an associative scan inside chunks) writes the (B, T, E, N)
float32 states of every scan level to memory and reads them back: compiled for an H200 (llmjax.aot),
GPT-2-small-sized `ssm` moves 1,154 GB per training step at batch 16, a 240 ms memory roofline. This
kernel keeps each row's (E-block x N) state in registers and walks the T steps in order (Mamba's
approach): one program per (row, block of `BLOCK_E` channels), reading delta, u, B, C and writing y
once. The gradient runs it again keeping one state every CHUNK steps (no y), then a second kernel
walks backward in time a chunk at a time: it recomputes the chunk's states forward from the
checkpoint before it, in registers, and walks the adjoint g_t = dL/dh_t back through them,

    g_t = exp(delta_{t+1} A) * g_{t+1} + dy_t C_t      (g_{T-1} = dh_last + dy_{T-1} C_{T-1}),

writing each step's gradients (B's and C's as per-block partial sums). Keeping every state h_t
instead ((B, T, E, N) float32, written once and read once) moved 3.2 GB more per layer and step for
the default config at batch 16 x 1024, compiled for an H100: the step's bytes outside GEMMs were
112 GB, now 74 (docs/benchmarks.md, session 33).

On a CPU (tests, `model.scan_impl='pallas'`) the kernel runs in Pallas' interpreter: slow, for
checking only. The kernel's block shapes must be powers of two: T is padded to one with identity
steps (delta = 0, u = 0), and `supported` says whether E and N fit.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

BLOCK_E = 64  # channels per program (a power of two; N is the other state axis)
# Steps between the states the backward pass keeps (a power of two): it recomputes each chunk's states
# from the one before it in registers, unrolled, so the (B, T, E, N) states are never written whole.
# LLMJAX_SSM_BACKWARD_CHUNK overrides it (scripts/gpu_check.sh --sweep tries 4 and 16: how many
# states Triton keeps in registers before it spills only a GPU can say).
CHUNK = 8


def block_e(E: int) -> int | None:
    """The channel block for width E: the largest power of two <= BLOCK_E dividing E (None if < 8)."""
    b = BLOCK_E
    while b >= 8 and E % b:
        b //= 2
    return b if b >= 8 else None


def supported(E: int, N: int) -> bool:
    return block_e(E) is not None and N >= 1 and N & (N - 1) == 0


def _step(A, d, u, bm, h):
    """One step of the recurrence, h_t from h_{t-1} (x_t = delta_t u_t: the forward's and the
    backward's recomputation the same expression, so the same values)."""
    return jnp.exp(d[:, None] * A) * h + (d * u)[:, None] * bm[None, :]


def _kernel(delta_ref, u_ref, b_ref, c_ref, a_ref, h0_ref, *out_refs, chunk: int, keep_states: bool):
    """One row, one block of channels: h (BE, N) in registers through the T steps, writing y_t and
    the last state; or (`keep_states`, the backward's pass) no y but the last state and the state
    at the end of every `chunk` steps (the backward's checkpoints)."""
    A = a_ref[...]
    (hlast_ref, states_ref), y_ref = (out_refs, None) if keep_states else ((out_refs[1], None), out_refs[0])

    def step(t, h):
        h = _step(A, delta_ref[t, :], u_ref[t, :], b_ref[t, :], h)
        if y_ref is not None:
            y_ref[t, :] = jnp.sum(h * c_ref[t, :][None, :], axis=1)
        return h

    def chunk_steps(c, h):
        h = jax.lax.fori_loop(c * chunk, (c + 1) * chunk, step, h)
        if states_ref is not None:
            states_ref[c, :, :] = h
        return h

    hlast_ref[...] = jax.lax.fori_loop(0, delta_ref.shape[0] // chunk, chunk_steps, h0_ref[...])


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def backward_chunk() -> int:
    """Steps between the backward's kept states: LLMJAX_SSM_BACKWARD_CHUNK, else CHUNK."""
    env = os.environ.get("LLMJAX_SSM_BACKWARD_CHUNK", "").strip()
    if env and not (env.isdigit() and int(env) > 0 and int(env) & (int(env) - 1) == 0):
        from llmjax.config import ConfigError  # (a user's setting: one line)

        raise ConfigError(f"LLMJAX_SSM_BACKWARD_CHUNK must be a power of two (steps between the backward's kept states; "
                          f"default {CHUNK}), got {env!r}")
    return int(env) if env else CHUNK


def _chunk(Tp: int, every: int) -> int:
    """Steps between the backward's checkpoints for a (power-of-two) length Tp."""
    return min(every, Tp)


@functools.partial(jax.jit, static_argnames=("keep_states", "every", "interpret"))
def scan(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, *, keep_states: bool = False, every: int = CHUNK, interpret: bool = False):
    """(y (B, T, E), h_last (B, E, N)) of h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = h_t . C_t,
    float32; with `keep_states`, (h_last, checkpoints (B, Tp / chunk, E, N)) instead, the states after
    every `_chunk(Tp, every)` steps of the sequence padded to Tp, a power of two. (delta_t u_t is computed
    in the kernel: written out by XLA first, it cost a read of both and a write and read of the product.)
    `every` (the backward's `backward_chunk()`, read by its caller) is a static argument, not read here
    from the environment: jit's cache does not know the environment, and a second setting in one
    process would have reused the first's trace."""
    B, T, E = delta_BTE.shape
    N = A_EN.shape[1]
    BE = block_e(E)
    Tp = _next_pow2(T)
    if Tp != T:  # identity steps at the end: h_last unchanged, their y dropped
        pad = lambda a: jnp.pad(a, ((0, 0), (0, Tp - T), (0, 0)))  # noqa: E731
        delta_BTE, u_BTE, B_BTN, C_BTN = map(pad, (delta_BTE, u_BTE, B_BTN, C_BTN))
    rows_e = pl.BlockSpec((None, Tp, BE), lambda b, j: (b, 0, j))
    rows_n = pl.BlockSpec((None, Tp, N), lambda b, j: (b, 0, 0))
    state = pl.BlockSpec((None, BE, N), lambda b, j: (b, j, 0))
    K = _chunk(Tp, every)
    if keep_states:
        out_specs = [state, pl.BlockSpec((None, Tp // K, BE, N), lambda b, j: (b, 0, j, 0))]
        out_shape = [jax.ShapeDtypeStruct((B, E, N), jnp.float32), jax.ShapeDtypeStruct((B, Tp // K, E, N), jnp.float32)]
    else:
        out_specs = [rows_e, state]
        out_shape = [jax.ShapeDtypeStruct((B, Tp, E), jnp.float32), jax.ShapeDtypeStruct((B, E, N), jnp.float32)]
    out = pl.pallas_call(
        functools.partial(_kernel, chunk=K, keep_states=keep_states),
        grid=(B, E // BE),
        in_specs=[rows_e, rows_e, rows_n, rows_n, pl.BlockSpec((BE, N), lambda b, j: (j, 0)), state],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name="selective_scan",
    )(*(a.astype(jnp.float32) for a in (delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN)))
    return tuple(out) if keep_states else (out[0][:, :T], out[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def selective_scan(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, interpret: bool = False):
    """(y, h_last) of the S6 recurrence (the module docstring), differentiable in every input."""
    return scan(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, interpret=interpret)


def _fwd(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, interpret):
    out = scan(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, interpret=interpret)
    return out, (delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN)


def _bwd_kernel(delta_ref, u_ref, b_ref, c_ref, a_ref, h0_ref, hs_ref, dy_ref, dhlast_ref,
                d_delta_ref, d_u_ref, d_b_ref, d_c_ref, d_a_ref, d_h0_ref, *, chunk: int):
    """One row, one block of channels, backward in time, a chunk of steps at a time: the chunk's
    states recomputed forward from the checkpoint before it (in registers: `chunk` of them), then
    the adjoint g_t walked back through them in registers, each step's gradients written out (B and
    C's as this block's partial sums over its channels)."""
    A = a_ref[...]
    n_chunks = delta_ref.shape[0] // chunk

    def chunk_steps(i, carry):
        ag_next, dA = carry  # a_{t+1} g_{t+1}, sum of dL/dA so far
        c = n_chunks - 1 - i
        start = c * chunk
        h_start = jnp.where(c > 0, hs_ref[jnp.maximum(c - 1, 0), :, :], h0_ref[...])  # the state before the chunk
        ins = [(delta_ref[start + k, :], u_ref[start + k, :], b_ref[start + k, :]) for k in range(chunk)]
        hs = [h_start]
        for d, u, bm in ins:
            hs.append(_step(A, d, u, bm, hs[-1]))
        for k in reversed(range(chunk)):
            t = start + k
            (d, u, bm), cm, dy = ins[k], c_ref[t, :], dy_ref[t, :]
            h_prev, h_t = hs[k], hs[k + 1]
            g = ag_next + dy[:, None] * cm[None, :]  # g_t = dL/dh_t
            a = jnp.exp(d[:, None] * A)
            gah = g * a * h_prev  # dL/da_t * a_t
            gb = jnp.sum(g * bm[None, :], axis=1)
            d_delta_ref[t, :] = jnp.sum(gah * A, axis=1) + u * gb
            d_u_ref[t, :] = d * gb
            d_b_ref[t, :] = jnp.sum(g * (d * u)[:, None], axis=0)
            d_c_ref[t, :] = jnp.sum(h_t * dy[:, None], axis=0)
            ag_next, dA = a * g, dA + gah * d[:, None]
        return ag_next, dA

    ag0, dA = jax.lax.fori_loop(0, n_chunks, chunk_steps, (dhlast_ref[...], jnp.zeros_like(A)))
    d_a_ref[...] = dA
    d_h0_ref[...] = ag0  # a_0 g_0


def _bwd(interpret, residuals, cotangents):
    delta, u, Bm, Cm, A, h0 = residuals
    dy, dh_last = cotangents
    every = backward_chunk()  # (read once, here, for both kernels: static arguments of their jits)
    _, h = scan(delta, u, Bm, Cm, A, h0, keep_states=True, every=every, interpret=interpret)  # checkpoints (B, Tp / chunk, E, N)
    return _scan_bwd(delta, u, Bm, Cm, A, h0, h, dy, dh_last, every=every, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("every", "interpret"))
def _scan_bwd(delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, h_BCEN, dy_BTE, dhlast_BEN, *, every: int, interpret: bool):
    B, T, E = delta_BTE.shape
    N = A_EN.shape[1]
    BE = block_e(E)
    nb = E // BE
    Tp = _next_pow2(T)
    K = _chunk(Tp, every)
    if Tp != T:  # identity steps at the end (zero inputs, zero output gradient): no contribution
        pad = lambda a: jnp.pad(a, ((0, 0), (0, Tp - T)) + ((0, 0),) * (a.ndim - 2))  # noqa: E731
        delta_BTE, u_BTE, B_BTN, C_BTN, dy_BTE = map(pad, (delta_BTE, u_BTE, B_BTN, C_BTN, dy_BTE))
    rows_e = pl.BlockSpec((None, Tp, BE), lambda b, j: (b, 0, j))
    rows_n = pl.BlockSpec((None, Tp, N), lambda b, j: (b, 0, 0))
    part_n = pl.BlockSpec((None, Tp, None, N), lambda b, j: (b, 0, j, 0))
    state = pl.BlockSpec((None, BE, N), lambda b, j: (b, j, 0))
    d_delta, d_u, d_b, d_c, d_a, d_h0 = pl.pallas_call(
        functools.partial(_bwd_kernel, chunk=K),
        grid=(B, nb),
        in_specs=[rows_e, rows_e, rows_n, rows_n, pl.BlockSpec((BE, N), lambda b, j: (j, 0)), state,
                  pl.BlockSpec((None, Tp // K, BE, N), lambda b, j: (b, 0, j, 0)), rows_e, state],
        out_specs=[rows_e, rows_e, part_n, part_n, state, state],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, E), jnp.float32)] * 2 + [jax.ShapeDtypeStruct((B, Tp, nb, N), jnp.float32)] * 2
        + [jax.ShapeDtypeStruct((B, E, N), jnp.float32)] * 2,
        interpret=interpret,
        name="selective_scan_bwd",
    )(*(a.astype(jnp.float32) for a in (delta_BTE, u_BTE, B_BTN, C_BTN, A_EN, h0_BEN, h_BCEN, dy_BTE, dhlast_BEN)))
    return (d_delta[:, :T], d_u[:, :T], d_b[:, :T].sum(axis=2), d_c[:, :T].sum(axis=2), d_a.sum(axis=0), d_h0)


selective_scan.defvjp(_fwd, _bwd)
