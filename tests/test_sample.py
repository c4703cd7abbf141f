"""The sampler: its decode loop against full recomputation for every architecture and option,
batching and bucketing that change nothing, sliding past the context, top-k / top-p exactness,
per-row random streams, end-of-text, checkpoint loading and the command line."""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
import llmjax.models  # noqa: F401
from flax import nnx
from conftest import ROOT
from helpers import (built_once, capped_python, cli_cases, cli_runs, config, load_params, params, perturb_vectors, readme_py_block,
                     scale_params)
from llmjax import sample as S
from llmjax.models.layers import convert_layer_layout
from llmjax.sample import Sampling, filter_logits, generate
from test_models import CACHE_CASES, case_id

GREEDY = Sampling(greedy=True)
ARCHS = sorted(llmjax.ARCHS)


def decoder(arch, scan_layers=False, seed=1, **opts):
    """A random model with decisive logits (weights scaled up) and random biases and norm scales,
    as the sampler builds it."""
    m = llmjax.build_model(config(arch, scan_layers=scan_layers, **opts), seed=seed)
    return perturb_vectors(scale_params(m, 6.0), seed)


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, tokens):
    """The model's full forward (one jitted function for every call: each row's reference reuses
    the program its batch-mates traced)."""
    return nnx.merge(graphdef, state)(tokens)[0]


def reference_greedy(m, prompt, n, context=None):
    """Greedy continuation by full recomputation: each token is the argmax of a fresh forward over
    the row's window (right-padded to the context, so one shape; causality makes padding harmless).
    The window slides as the sampler's does: past the context it keeps the last context - context//2."""
    context = context or m.cfg.context_len
    graphdef, state = nnx.split(m)
    full = functools.partial(_full_logits, graphdef)
    seq, start = list(prompt), max(0, len(prompt) - context)
    out = []
    for _ in range(n):
        if len(seq) - start > context:
            start = len(seq) - (context - context // 2)
        window = seq[start:]
        padded = np.zeros((1, context), np.int32)
        padded[0, : len(window)] = window
        logits = full(state, jnp.asarray(padded))[0, len(window) - 1, : m.cfg.vocab_size]
        seq.append(int(jnp.argmax(logits)))
        out.append(seq[-1])
    return out


# --- the decode loop against full recomputation -------------------------------------------------

PROMPTS = [[5, 1, 4], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2], [7]]


@pytest.mark.parametrize("case", CACHE_CASES, ids=case_id)
def test_greedy_batch_equals_full_recomputation(case):
    """Prompts of different lengths decoded as one batch: each row equals the argmax of a full
    forward recomputation at every step, and (each architecture's plain model, and the fused
    decode kernels, which take the batch's rows in blocks) a row alone gives the same text. The
    other options decode alone through the same code as in a batch; a batch of one is another
    compile of the sampler's two programs, the larger part of this test's time with an empty
    compilation cache."""
    arch, opts = case
    alone = not opts or any(k.startswith("decode_") for k in opts)
    opts = {"scan_layers": False, **opts}
    m = decoder(arch, **opts)
    n = 12
    batch = generate(m, PROMPTS, n, sampling=GREEDY)
    for prompt, row in zip(PROMPTS, batch):
        assert row == reference_greedy(m, prompt, n)
    if alone:  # (the shortest prompt: alone, it is prefilled in a shorter bucket)
        assert generate(m, [PROMPTS[0]], n, sampling=GREEDY)[0] == batch[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_sliding_past_the_context_equals_recomputation(arch):
    """Generation longer than the context slides each row's window; rows reach the end of the
    context at different steps and are re-prefilled together."""
    m = decoder(arch)
    C = m.cfg.context_len
    prompts = [[3] * (C - 5), [1, 2]]
    n = C + 10
    out = generate(m, prompts, n, sampling=GREEDY)
    for prompt, row in zip(prompts, out):
        assert row == reference_greedy(m, prompt, n)


@pytest.mark.parametrize("context", [1, 3])
def test_sliding_in_the_shortest_contexts(context):
    """A context of one token slides after every token (keeping that token: never an empty window),
    one of three keeps two; both equal recomputation."""
    m = decoder("vanilla", context_len=context, seed=3)  # (a seed whose rows do not all sit at one token)
    prompts = [[1, 2], [3], [7]]
    out = generate(m, prompts, 7, sampling=GREEDY)
    assert out == [reference_greedy(m, p, 7) for p in prompts]


@pytest.mark.parametrize("arch", ARCHS)  # (one test per architecture: `-k NAME` selects a new one's)
def test_decode_loop_logits_equal_full_forward_at_every_step(arch):
    """The jitted loop's greedy tokens (float32) are the full forward's argmax at every step, for
    rows of different lengths, each by a margin above 1e-4 (no tie decided by rounding). The logits
    themselves are compared, within 1e-4, through the sampler's own prefill and decode steps (the
    next test) and the contract suite: argmax agreement alone does not bound them."""
    m = decoder(arch, seed=2)
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    n = 6
    out = generate(m, prompts, n, sampling=GREEDY)
    graphdef, state = nnx.split(m)
    full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    for r, (prompt, row) in enumerate(zip(prompts, out)):
        seq = prompt + row
        ref = full(state, jnp.asarray([seq]))[0]
        # each step's token is the argmax of these logits, ahead of the runner-up by more than 1e-4
        for t in range(len(prompt) - 1, len(seq) - 1):
            top2 = jnp.sort(ref[t, : m.cfg.vocab_size])[-2:]
            assert int(jnp.argmax(ref[t])) == seq[t + 1], (arch, r, t)
            assert float(top2[1] - top2[0]) > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_vs_full_logits_through_the_sampler_prefill_and_decode(arch):
    """The sampler's own prefill and decode steps, driven one step at a time, give logits equal to
    the full forward within 1e-4 (float32) at every step, every architecture."""
    m = decoder(arch, seed=3)
    graphdef, state = nnx.split(m)
    toks = [4, 8, 15, 16, 23, 42 % 65, 7, 1, 9, 30]
    full = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, jnp.asarray([toks]))[0]
    # prefill the first 4 left-padded to a bucket, then feed one token at a time
    T = S.bucket(4, m.cfg.context_len)
    padded = jnp.asarray([[0] * (T - 4) + toks[:4]])
    pos = jnp.arange(T)[None] - (T - 4)
    cache = m.init_cache(1, 32)
    logits, cache, _ = m(padded, positions=pos, cache=cache)
    np.testing.assert_allclose(logits[0, -1], full[3], atol=1e-4, rtol=1e-4)
    step = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, positions=p, cache=c)[:2])
    for i in range(4, len(toks)):
        logits, cache = step(state, jnp.asarray([[toks[i]]]), jnp.asarray([[i]]), cache)
        np.testing.assert_allclose(logits[0, -1], full[i], atol=1e-4, rtol=1e-4, err_msg=f"{arch} step {i}")


def test_scanned_and_unrolled_layers_decode_the_same():
    m = decoder("modern", scan_layers=True)
    u = load_params(llmjax.build_model(config("modern", scan_layers=False), seed=0), convert_layer_layout(params(m), False))
    assert generate(m, PROMPTS, 8, sampling=GREEDY) == generate(u, PROMPTS, 8, sampling=GREEDY)


@pytest.mark.parametrize("arch", ARCHS)
def test_testing_the_stop_condition_every_k_steps_changes_no_token(arch):
    """The decode loop tests whether to stop every `unroll` steps; the steps a chunk runs after a
    row ends, after the step budget, or when a row reaches the end of the context must change
    nothing. Sampled rows of different lengths, one stopping at end-of-text, generation past the
    context (sliding) and streaming every 5 steps: the same tokens for unroll 1, 3 and 16."""
    m = decoder(arch, seed=8)
    C = m.cfg.context_len
    sp = Sampling(temperature=1.0, top_k=None)
    prompts = [[3] * (C - 5), [1, 2], [7, 8, 9, 10, 11]]
    n = C + 12
    ref = generate(m, prompts, n, sampling=sp, seed=4, unroll=1)
    # row 1 ends at its 7th token or earlier, inside a chunk (a token row 0 does not emit before
    # it passes the context, so that row 0 still slides)
    eot = next(t for t in reversed(ref[1][:7]) if t not in ref[0][:6])
    ref_eot = generate(m, prompts, n, sampling=sp, seed=4, eot_id=eot, unroll=1)
    assert len(ref_eot[1]) <= 6 and any(len(p) + len(o) > C for p, o in zip(prompts, ref_eot))  # stops a row, slides
    for k in (3, 16):
        assert generate(m, prompts, n, sampling=sp, seed=4, unroll=k) == ref, k
        assert generate(m, prompts, n, sampling=sp, seed=4, eot_id=eot, unroll=k) == ref_eot, k
    got = {r: [] for r in range(3)}
    streamed = generate(m, prompts, n, sampling=sp, seed=4, eot_id=eot, unroll=3, stream_every=5,
                        on_tokens=lambda r, t: got[r].extend(t))
    assert streamed == ref_eot and [got[r] for r in range(3)] == ref_eot


def prefilled(m, B: int, cache_len: int = 64):
    """A decode state as `generate` makes it: B rows (prompt lengths 3, 16, 9, ...) prefilled into
    a cache of `cache_len` slots, ready for `S._decode`."""
    lengths = jnp.asarray([(3, 16, 9)[r % 3] for r in range(B)])
    return S._prefill(m, S.start_state(B, 40, 0), jnp.ones((B, 16), jnp.int32), lengths, cache_len=cache_len, sampling=GREEDY,
                      eot=-1)


def decode_hlo(m, state, unroll: int) -> str:
    """The compiled decode loop's HLO text (40 steps, greedy)."""
    return S._jitted()[1].lower(*nnx.split(m), state, jnp.int32(40), sampling=GREEDY, eot=-1, unroll=unroll).compile().as_text()


def test_the_decode_loop_tests_its_stop_condition_once_per_chunk():
    """The compiled decode loop is an outer while loop around an inner loop whose trip count XLA
    knows (`known_trip_count` = unroll): XLA's GPU runtime runs such a loop without a device-to-host
    copy and wait per step; the outer loop's data-dependent test runs once per chunk."""
    m = decoder("vanilla", seed=9)
    state = prefilled(m, 2)
    for k in (1, 16):
        hlo = decode_hlo(m, state, k)
        loops = [line for line in hlo.splitlines() if " while(" in line]
        trips = [int(t) for t in re.findall(r'"known_trip_count":\{"n":"(\d+)"\}', "\n".join(loops))]
        if k == 1:
            assert len(loops) == 1 and trips == [], loops  # one data-dependent loop, tested every step
        else:
            assert len(loops) == 2 and trips == [k], loops


def _loop_body_buffers(hlo: str, min_bytes: int) -> list[tuple[str, str]]:
    """(instruction, shape) of every buffer of at least `min_bytes` that the compiled decode loop's
    inner body (the loop with a known trip count) computes at its top level."""
    comps, name = {}, None
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            comps[name] = []
        elif name is not None and line.startswith("  "):
            comps[name].append(line)
    body = re.search(r"while\(.*body=%([\w.\-]+).*known_trip_count", hlo).group(1)
    size = {"f32": 4, "bf16": 2, "s32": 4, "pred": 1}
    out = []
    for line in comps[body]:
        m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\S+?)\(", line)
        if m and m.group(4) not in ("get-tuple-element", "parameter", "bitcast", "constant", "tuple"):
            n = size.get(m.group(2), 4) * int(np.prod([int(x) for x in m.group(3).split(",") if x]))
            if n >= min_bytes:
                out.append((m.group(1), f"{m.group(2)}[{m.group(3)}]"))
    return out


@pytest.mark.parametrize("arch", ["vanilla", "gqa", "moe"])
def test_the_decode_loop_writes_the_cache_in_place_and_copies_none_of_it(arch):
    """Every decoded token writes one slot of each layer's keys and values in place; nothing else in
    the loop body is as large as one layer's key cache (stored (B, S, K, hd), the cache was copied
    into a heads-first layout for the attention products, every layer, key and value, every token;
    the MoE's `ragged_dot` copied each layer's expert weights, larger still, transposed)."""
    m = decoder(arch, seed=10)
    state = prefilled(m, 3)
    k_bytes = max(x.nbytes for x in jax.tree.leaves(state["cache"]))  # one layer's keys (or values)
    hlo = decode_hlo(m, state, 16)
    big = _loop_body_buffers(hlo, k_bytes)
    assert len(big) == 2 * m.cfg.n_layer and all("scatter" in name for name, _ in big), big


def test_the_linformer_updates_its_state_in_place():
    """Each decoded token writes its key and value into the block and adds the ones it overwrites
    into the sums, in place (2 scatters per layer, keys and values together); nothing copies,
    selects over or concatenates anything as large as a block of keys (the first version rewrote
    the whole state several times per token: zeroing, `where` over every leaf, keys concatenated
    for attention)."""
    m = decoder("linformer", seed=12)
    state = prefilled(m, 3)
    hlo = decode_hlo(m, state, 16)
    big = _loop_body_buffers(hlo, min(x.nbytes for x in jax.tree.leaves(state["cache"]) if x.ndim == 5))
    assert sum("scatter" in name for name, _ in big) == 2 * m.cfg.n_layer, big
    assert not [(n, sh) for n, sh in big if any(w in n for w in ("copy", "select", "concatenate"))], big


def _slot_values_larger_than(jaxpr, slots: int, size: int) -> list[tuple[str, tuple]]:
    """(primitive, shape) of every value in `jaxpr` (and the jaxprs inside it) that has an axis of
    `slots` and more than `size` elements."""
    out = []
    for e in jaxpr.eqns:
        out += [(e.primitive.name, v.aval.shape) for v in e.outvars
                if slots in getattr(v.aval, "shape", ()) and np.prod(v.aval.shape) > size]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        out += _slot_values_larger_than(sub, slots, size)
    return out


def test_the_linformer_decodes_without_projecting_keys_onto_its_summaries():
    """A decode step of the Linformer projects onto the `rank` summaries only its scores and
    attention weights, (B, H, rank), never the keys or values (B, H, head_dim, rank): the summaries
    are linear in the keys, so the state sums the completed blocks' keys and values and the
    projection applies to q . sum K and to the weights (the first version projected the whole block
    every token and added it into summary sums: 7.3 GB per step for the default config at batch 64,
    compiled for an H100)."""
    m = decoder("linformer", seed=12)
    B, cfg = 3, m.cfg
    assert cfg.rank not in (B, cfg.n_head, cfg.head_dim, cfg.block_size)  # (the rank axis is told apart by its size)
    graphdef, state = nnx.split(m)
    cache = m.init_cache(B, cfg.context_len)
    step = jax.make_jaxpr(lambda st, c: nnx.merge(graphdef, st)(jnp.ones((B, 1), jnp.int32), positions=jnp.full((B, 1), 13), cache=c)[:2])
    assert _slot_values_larger_than(step(state, cache).jaxpr, cfg.rank, B * cfg.n_head * cfg.rank) == []


def test_mla_decodes_against_the_latent_and_never_expands_keys_or_values():
    """A decode step of MLA computes nothing over the cached positions larger than the cached latent
    itself: W_uk is absorbed into the query and W_uv applied after the weighted sum, so no (B, S, H,
    qk_nope_dim) keys or (B, S, H, v_head_dim) values are rebuilt from the latent (a decode path that
    expanded them, as training does, gives the same logits and tokens)."""
    m = decoder("mla", seed=10)
    B, S = 3, 40  # (40 slots: no other axis of the tiny model has that size)
    graphdef, state = nnx.split(m)
    cache = m.init_cache(B, S)
    step = jax.make_jaxpr(lambda st, c: nnx.merge(graphdef, st)(jnp.ones((B, 1), jnp.int32), positions=jnp.full((B, 1), 5), cache=c)[:2])
    latent = max(x.size for x in jax.tree.leaves(cache))  # (B, S, kv_lora_rank)
    assert m.cfg.n_head * min(m.cfg.qk_nope_dim, m.cfg.v_head_dim) > m.cfg.kv_lora_rank  # (expanded keys would be larger)
    assert _slot_values_larger_than(step(state, cache).jaxpr, S, latent) == []


def test_the_ssm_decodes_one_step_per_token_not_a_chunk():
    """A decoded token is one step of the recurrence: the decode loop builds nothing of the size of
    a `scan_chunk`-token chunk of states (the training scan's unit; padding one token to a chunk of
    128 made the 124M-class model do 128 steps' work per token)."""
    m = decoder("ssm", seed=11)
    state = prefilled(m, 3)
    h_bytes = max(x.nbytes for x in jax.tree.leaves(state["cache"]))  # one layer's state (B, E, N)
    hlo = decode_hlo(m, state, 16)
    assert m.cfg.scan_chunk >= 8 and not _loop_body_buffers(hlo, 4 * h_bytes), _loop_body_buffers(hlo, 4 * h_bytes)


# --- buckets, seeds, rows, end-of-text ------------------------------------------------------------


def test_bucket_sizes():
    assert [S.bucket(n, 1024) for n in (1, 15, 16, 17, 100, 1000, 1024, 5000)] == [16, 16, 16, 32, 128, 1024, 1024, 1024]
    assert S.bucket(40, 32) == 32


def compiles_during(fn) -> list[str]:
    """Names of the functions JAX compiles while fn() runs (from jax.log_compiles)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            fn()
    finally:
        logger.removeHandler(handler)
    return [r.getMessage() for r in records if "Compiling" in r.getMessage()]


def test_a_new_prompt_length_in_the_same_bucket_or_end_of_text_id_compiles_nothing():
    m = decoder("vanilla", seed=4)
    generate(m, [[1] * 5], 4, sampling=GREEDY)
    for n in (9, 16, 3):
        names = compiles_during(lambda: generate(m, [[2] * n], 4, sampling=GREEDY))
        assert not [x for x in names if "_prefill" in x or "_decode" in x], (n, names)
    for eot in (7, 11):  # nor does an end-of-text id (an argument of the same programs)
        names = compiles_during(lambda: generate(m, [[2] * 9], 4, sampling=GREEDY, eot_id=eot))
        assert not [x for x in names if "_prefill" in x or "_decode" in x], (eot, names)
    # a length in another bucket does compile (the check can fail)
    assert any("_prefill" in x for x in compiles_during(lambda: generate(m, [[2] * 20], 4, sampling=GREEDY)))


def test_seeds_and_per_row_streams():
    m = decoder("gqa", seed=5)
    sp = Sampling(temperature=1.0, top_k=None)
    p0, p1, p2 = [1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20], [30]
    a = generate(m, [p0, p1], 20, sampling=sp, seed=7)
    assert generate(m, [p0, p1], 20, sampling=sp, seed=7) == a  # same seed, same text
    assert generate(m, [p0, p1], 20, sampling=sp, seed=8) != a  # another seed, another text
    assert generate(m, [p0], 20, sampling=sp, seed=7)[0] == a[0]  # batched == unbatched
    assert generate(m, [p2, p1], 20, sampling=sp, seed=7)[1] == a[1]  # row 1 ignores its batch-mate
    assert a[0] != generate(m, [p0, p0], 20, sampling=sp, seed=7)[1]  # row index matters
    assert len(set(map(tuple, generate(m, [p0] * 4, 20, sampling=sp, seed=7)))) == 4


def test_rows_stop_at_end_of_text():
    m = decoder("vanilla", seed=6)
    prompts = [[1, 2, 3], [40, 41]]
    free = generate(m, prompts, 15, sampling=Sampling(temperature=1.0, top_k=None), seed=3)
    eot = free[0][4]
    stopped = generate(m, prompts, 15, sampling=Sampling(temperature=1.0, top_k=None), seed=3, eot_id=eot)
    for f, s in zip(free, stopped):
        assert s == (f[: f.index(eot)] if eot in f else f)
    assert len(stopped[0]) == free[0].index(eot) <= 4


def test_a_row_stops_at_end_of_text_whatever_follows_it():
    """A row's output is its free draw cut before the first end-of-text, for several end-of-text ids,
    including ones that the free draw follows with another token (test_rows_stop_at_end_of_text's id
    is followed by itself: a row that drew one more token after end-of-text passed it)."""
    m = decoder("vanilla", seed=6)
    prompts = [[1, 2, 3], [40, 41]]
    sp = Sampling(temperature=1.0, top_k=None)
    free = generate(m, prompts, 15, sampling=sp, seed=3)
    ks = [k for k in range(1, 12) if free[0][k] not in free[0][:k] and free[0][k + 1] != free[0][k]][:3]
    assert ks
    for k in ks:
        eot = free[0][k]
        stopped = generate(m, prompts, 15, sampling=sp, seed=3, eot_id=eot)
        assert stopped == [f[: f.index(eot)] if eot in f else f for f in free], (k, eot)


def test_streaming_delivers_every_token_in_order():
    m = decoder("ssm", seed=7)
    got = {0: [], 1: []}
    out = generate(m, [[1, 2], [3]], 30, sampling=Sampling(temperature=1.0), seed=2, on_tokens=lambda r, t: got[r].extend(t), stream_every=4)
    assert got[0] == out[0] and got[1] == out[1]
    assert out == generate(m, [[1, 2], [3]], 30, sampling=Sampling(temperature=1.0), seed=2)


def test_bad_generate_input():
    m = decoder("vanilla")
    with pytest.raises(S.SampleError, match="at least one token"):
        generate(m, [[1], []], 3)
    with pytest.raises(S.SampleError, match="token ids"):
        generate(m, [[1, 999]], 3)
    with pytest.raises(S.SampleError, match="top_p"):
        Sampling(top_p=0)
    for top_k in (2.5, 64.0, True):  # (a float was JAX's "Shapes must be 1D sequences of concrete values" when decoding)
        with pytest.raises(S.SampleError, match="top_k must be a whole number"):
            Sampling(top_k=top_k)
    assert Sampling(top_k=np.int64(5)).top_k == 5 and Sampling(top_k=0).top_k is None
    # greedy="no" was greedy (truthy), temperature="1" Python's TypeError from a comparison
    for kw, said in [({"greedy": "no"}, "greedy must be True or False, got 'no'"), ({"temperature": "1"}, "temperature must be a number"),
                     ({"top_p": "0.9"}, "top_p must be a number"), ({"temperature": True}, "temperature must be a number")]:
        with pytest.raises(S.SampleError, match=re.escape(said)):
            Sampling(**kw)
    assert Sampling(greedy=np.bool_(True), temperature=np.float32(0.5), top_p=1).greedy
    for eot in (-1, m.cfg.vocab_size, 3.0, True):  # (one outside the vocabulary never ended a row, silently)
        with pytest.raises(S.SampleError, match=re.escape(f"eot_id must be a token id in [0, {m.cfg.vocab_size}) or None")):
            generate(m, [[1]], 2, eot_id=eot)
    assert generate(m, [[1]], 0) == [[]]
    with pytest.raises(S.SampleError, match=r"max_new_tokens must be in \[0, 2\*\*31\)"):
        generate(m, [[1]], -1)  # (it gave no tokens, as 0)
    for n in (5.0, True):  # (5.0 was JAX's "Shapes must be 1D sequences of concrete values"; True one token)
        with pytest.raises(S.SampleError, match=r"max_new_tokens must be in \[0, 2\*\*31\), a whole number"):
            generate(m, [[1]], n)
    # (JAX's keys hold 32 bits: 2**32 drew seed 0's tokens, -1 seed 2**32 - 1's; 1.5 was JAX's "PRNG key seed must be an integer")
    for seed in (2**32, -1, 1.5):
        with pytest.raises(S.SampleError, match=r"seed must be in \[0, 2\*\*32\)"):
            generate(m, [[1]], 3, seed=seed)
    # a flat list of ids (its rows were ints), float ids (cut to integers: [[1.5, 2]] decoded [[1, 2]]), a string
    for prompts in ([1, 2, 3], [[1.5, 2]], "abc", [[1, [2, 3]]]):
        with pytest.raises(S.SampleError, match="prompt 1 is not a sequence of token ids"):
            generate(m, prompts, 3)
    assert generate(m, [np.array([1, 2]), (3,)], 2, sampling=GREEDY) == generate(m, [[1, 2], [3]], 2, sampling=GREEDY)
    # an iterator of prompts is taken as its list (len()'s TypeError); a number is refused
    assert generate(m, iter([[1, 2], [3]]), 2, sampling=GREEDY) == generate(m, [[1, 2], [3]], 2, sampling=GREEDY)
    with pytest.raises(S.SampleError, match=r"prompts must be a list of token-id lists, e.g. \[\[1, 2, 3\], \[4\]\], got int"):
        generate(m, 7, 3)
    # unroll and stream_every: 2.5 and True were JAX's fori_loop TypeError, "4" Python's; a float stream_every was cut silently
    for kw in ({"unroll": 2.5}, {"unroll": True}, {"unroll": "4"}, {"unroll": 0}, {"stream_every": 2.5}, {"stream_every": -1}):
        with pytest.raises(S.SampleError, match="unroll and stream_every must be whole numbers >= 1"):
            generate(m, [[1, 2]], 5, sampling=GREEDY, on_tokens=lambda row, ids: None, **kw)
    with pytest.raises(S.SampleError, match="on_tokens must be a function"):
        generate(m, [[1, 2]], 5, on_tokens=[])
    # with no new tokens asked for, bad input is still refused (it gave [[]])
    for prompts, kw, said in [([[]], {}, "at least one token"), ([[999]], {}, "token ids must be in"), ([[1]], {"eot_id": -5}, "eot_id must be"),
                              ([[1]], {"unroll": 0}, "unroll and stream_every")]:
        with pytest.raises(S.SampleError, match=said):
            generate(m, prompts, 0, sampling=GREEDY, **kw)
    assert generate(m, [], 0) == generate(m, [], 5) == []
    loaded = S.Loaded(model=m, tokenizer=None, config={}, step=0, path=None)
    with pytest.raises(S.SampleError, match=r"got one string: pass \['ROMEO:'\]"):
        loaded.generate_text("ROMEO:", 3)  # (each character was a prompt: six continuations)
    with pytest.raises(S.SampleError, match="num_samples must be >= 1"):
        loaded.generate_text(["ROMEO:"], 3, num_samples=0)  # (no text, silently)


def test_bad_generate_text_input_is_a_sample_error():
    """generate_text given token ids, bytes or None as prompts, a num_samples that is no whole number,
    or generate a sampling that is no Sampling: each was Python's TypeError or AttributeError from
    deep inside ("'int' object is not iterable", "'str' object has no attribute 'greedy'")."""
    from llmjax.tokenizer import CharTokenizer

    model = types.SimpleNamespace(cfg=types.SimpleNamespace(context_len=8, vocab_size=3))
    loaded = S.Loaded(model=model, tokenizer=CharTokenizer("\nAB"), config={}, step=0, path=None)
    for prompts, said in [([1, 2], "prompt 1 is not a string (got int 1)"), (["A", b"AB"], "prompt 2 is not a string (got bytes"),
                          (["A", None], "prompt 2 is not a string (got NoneType None)")]:
        with pytest.raises(S.SampleError, match=re.escape(said) + r".*; the prompts are a list of strings \(token ids go to generate\)$"):
            loaded.generate_text(prompts, 3)
    for n in (1.5, "2", True):
        with pytest.raises(S.SampleError, match=re.escape(f"num_samples must be >= 1, a whole number, got {n!r}")):
            loaded.generate_text(["A"], 3, num_samples=n)
    with pytest.raises(S.SampleError, match=r"^sampling must be a Sampling, e\.g\. Sampling\(greedy=True\) \(None: the defaults\), "
                                            r"got 'greedy'$"):
        generate(model, [[1]], 3, sampling="greedy")


# --- top-k, top-p, padded vocabulary ---------------------------------------------------------------


def np_filter(logits, vocab, temperature, top_k, top_p):
    """float64 reference: which tokens may be drawn, and their probabilities."""
    x = np.asarray(logits, np.float64)[:vocab] / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), bool)
    keep[order[: top_k or vocab]] = True
    if top_p < 1:
        kept = order[: top_k or vocab]
        p = np.exp(x[kept] - x[kept].max())
        p /= p.sum()
        before = np.cumsum(p) - p
        keep[:] = False
        keep[kept[before < top_p]] = True
    probs = np.where(keep, np.exp(x - x.max()), 0)
    return keep, probs / probs.sum()


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    x = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3, 0.0 + 1e-9, 9.0]]))  # last column: padded vocab
    V = 5
    kept = lambda s: np.flatnonzero(np.isfinite(np.asarray(filter_logits(x, V, s)[0]))).tolist()  # noqa: E731
    assert kept(Sampling(temperature=1.0, top_k=2)) == [1, 3]
    assert kept(Sampling(temperature=1.0, top_k=None, top_p=0.75)) == [1, 3]  # 0.5 + 0.3 reaches 0.75
    assert kept(Sampling(temperature=1.0, top_k=None, top_p=0.85)) == [1, 2, 3]
    assert kept(Sampling(temperature=1.0, top_k=None, top_p=0.4)) == [1]
    assert kept(Sampling(temperature=1.0, top_k=2, top_p=0.9)) == [1, 3]
    assert kept(Sampling(temperature=1.0, top_k=None)) == [0, 1, 2, 3, 4]  # never the padded row

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 100)) * 3
    for s in [Sampling(1.0, 7, 1.0), Sampling(0.7, None, 0.9), Sampling(1.3, 20, 0.6), Sampling(1.0, None, 1.0)]:
        got = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), 90, s))
        for row in range(64):
            keep, probs = np_filter(logits[row], 90, s.temperature, s.top_k, s.top_p)
            np.testing.assert_array_equal(np.isfinite(got[row, :90]), keep)
            assert not np.isfinite(got[row, 90:]).any()
            p = np.exp(got[row, :90] - got[row, :90].max())
            np.testing.assert_allclose(p / p.sum(), probs, atol=1e-6)


def test_top_k_and_top_p_at_exact_ties_and_boundaries():
    """Equal logits give exactly representable probabilities (1/4 each): top-p keeps the smallest set
    whose mass reaches p, so a token whose more likely tokens already hold exactly p is dropped (a
    `<=` on the mass before it kept one more); top-k keeps exactly k of tied tokens (a threshold at the
    k-th value kept every tie)."""
    x = jnp.zeros((1, 5)).at[0, 4].set(9.0)  # four real tokens, tied; last column: padded vocab
    n_kept = lambda s: int(np.isfinite(np.asarray(filter_logits(x, 4, s))[0]).sum())  # noqa: E731
    for p, want in ((0.25, 1), (0.5, 2), (0.75, 3), (0.5001, 3), (1.0, 4)):
        assert n_kept(Sampling(temperature=1.0, top_k=None, top_p=p)) == want, p
    for k, nucleus in ((1, 1), (2, 1), (3, 2)):  # (then the nucleus of the k kept, renormalised: 1/k each)
        assert n_kept(Sampling(temperature=1.0, top_k=k)) == k, k
        assert n_kept(Sampling(temperature=1.0, top_k=k, top_p=0.5)) == nucleus, k


def test_extreme_temperatures_draw_only_real_tokens():
    """A tiny temperature keeps the largest logits at 0 (exact ties still tied) and sends the rest
    towards -inf, with no NaN; a huge finite one flattens the real vocabulary but never reaches the
    padded rows; infinity is refused."""
    x = jnp.asarray([[1.0, 3.0, 3.0, -2.0, 50.0]])  # last column: padded vocabulary
    for t in (1e-30, 1e-6):
        got = np.asarray(filter_logits(x, 4, Sampling(temperature=t, top_k=None)))[0]
        assert not np.isnan(got).any() and got[1] == got[2] == 0 and (got[[0, 3]] < -1e5).all() and np.isneginf(got[4]), (t, got)
    got = np.asarray(filter_logits(x, 4, Sampling(temperature=1e30, top_k=None)))[0]
    assert np.isfinite(got[:4]).all() and np.isneginf(got[4])
    keys = jax.random.split(jax.random.key(0), 400)
    draws = np.asarray(jax.vmap(lambda k: S.choose(x, k[None], 4, Sampling(temperature=1e-30, top_k=None))[0])(keys))
    assert set(draws.tolist()) == {1, 2} and 150 < (draws == 1).sum() < 250  # the tie split evenly
    draws = np.asarray(jax.vmap(lambda k: S.choose(x, k[None], 4, Sampling(temperature=1e30, top_k=None))[0])(keys))
    assert set(draws.tolist()) == {0, 1, 2, 3}
    # at float32's edges: the largest finite temperature still never draws a padded row (the mask
    # holds after the division); one that float32 makes infinite is refused; one too small to
    # divide by in float32 (0 or subnormal, flushed to zero on some devices) is greedy
    for top_k in (None, 2):
        draws = np.asarray(jax.vmap(lambda k: S.choose(x, k[None], 4, Sampling(temperature=3e38, top_k=top_k))[0])(keys))
        assert set(draws.tolist()) <= {0, 1, 2, 3} and len(set(draws.tolist())) > 1
        for t in (1e-40, 1e-45):
            tiny = Sampling(temperature=t, top_k=top_k)
            assert tiny.greedy and np.asarray(S.choose(x, keys[:1], 4, tiny)).tolist() == [1]
    for t in (float("inf"), float("nan"), -1.0, 1e39):
        with pytest.raises(S.SampleError, match="temperature must be a finite number >= 0"):
            Sampling(temperature=t)


def test_draws_follow_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.25, 0.05, 0.5]]))
    s = Sampling(temperature=1.0, top_k=3)
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    draws = np.asarray(jax.vmap(lambda k: S.choose(logits, k[None], 5, s)[0])(keys))
    freq = np.bincount(draws, minlength=6) / n
    expect = np.array([0, 0.4, 0.2, 0.25, 0, 0]) / 0.85
    np.testing.assert_allclose(freq, expect, atol=0.015)
    assert S.choose(logits, keys[:1], 5, GREEDY)[0] == 1  # greedy: argmax of the real vocabulary


# --- loading runs, the command line -----------------------------------------------------------------


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    from llmjax.train import train

    cfg = llmjax.load_config(
        f"{ROOT}/configs/vanilla.py:tiny",
        {"train.max_steps": 8, "train.batch_size": 8, "eval.every_steps": 4, "eval.num_batches": 2, "eval.sample_tokens": 0,
         "train.checkpoint_every_steps": 2, "train.keep_checkpoints": 1, "logging.progress_bar": False, "model.context_len": 32},
    )

    def build(folder):
        train(cfg, folder / "run", quiet=True)
        return str(folder / "run")

    return Path(built_once(tmp_path_factory, "sample-run", build))


def test_the_readmes_sampling_example_runs(run_dir):
    """README's sampling example (a ```py block: it needs a trained run) runs as written, on a run."""
    code = readme_py_block("from llmjax.sample import")
    assert '"runs/shakespeare_char"' in code
    scope = {}
    exec(compile(code.replace('"runs/shakespeare_char"', repr(str(run_dir))), "README.md", "exec"), scope)
    assert len(scope["texts"]) == 4 and all(isinstance(t, str) and t for t in scope["texts"]), scope["texts"]
    assert len(scope["ids"]) == 2 and all(0 < len(row) <= 50 for row in scope["ids"]), scope["ids"]


def test_load_restores_the_trained_weights(run_dir):
    """The loaded model's loss on the validation split (the tiny recipe's final evaluation: its first
    eval.final_num_batches batches) equals the trainer's last val_loss."""
    import itertools

    from llmjax import data as data_lib

    loaded = S.load(run_dir)
    assert loaded.step == 8 and loaded.model.cfg.scan_layers is False
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [m["val_loss"] for m in metrics if m["step"] == 8][0]
    ds = data_lib.open_dataset("tinyshakespeare_char", None)
    n = json.loads((run_dir / "config.json").read_text())["eval"]["final_num_batches"]
    assert n > 0

    @jax.jit
    def token_losses(toks):
        logits = loaded.model(toks[:, :-1])[0]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), toks[:, 1:, None], -1)[..., 0]

    total = count = 0.0
    for toks, mask in itertools.islice(data_lib.sequential_windows(ds.split("val"), seq_len=32, batch=8), n):
        ce = token_losses(jnp.asarray(toks))
        total += float((ce * mask).sum())
        count += float(mask.sum())
    assert abs(total / count - want) < 1e-5, (total / count, want)
    # best (by val loss) and one checkpoint step directory
    best = S.load(run_dir, "best")
    assert best.step in (4, 8)
    assert S.load(run_dir / "checkpoints" / "8").step == 8
    # on the device asked for (another than the first): every parameter restored there
    on = S.load(run_dir, device=jax.devices()[3])
    assert {d for a in jax.tree.leaves(nnx.state(on.model, nnx.Param)) for d in a.devices()} == {jax.devices()[3]}


@pytest.mark.parametrize("arch", ARCHS)
def test_inference_params_leave_bf16_logits_unchanged(arch):
    m = llmjax.build_model(config(arch, dtype="bfloat16"), seed=0)
    toks = jax.random.randint(jax.random.key(0), (2, 20), 0, 65)
    cast = load_params(llmjax.build_model(config(arch, dtype="bfloat16"), seed=0), S.inference_params(params(m), jnp.bfloat16))
    assert any(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(params(cast)))
    experts = [a for p, a in jax.tree_util.tree_leaves_with_path(params(cast)) if str(p[-1].key) in ("w_in", "w_out")]
    assert all(a.dtype == jnp.bfloat16 for a in experts) and (arch != "moe" or experts)  # (not converted per token)
    projections = [a for p, a in jax.tree_util.tree_leaves_with_path(params(cast)) if str(p[-1].key) in ("proj_k", "proj_v")]
    assert all(a.dtype == jnp.bfloat16 for a in projections) and (arch != "linformer" or projections)  # (the Linformer's: likewise)
    np.testing.assert_array_equal(np.asarray(cast(toks)[0]), np.asarray(m(toks)[0]), err_msg=arch)


def test_bad_checkpoints_are_one_line_errors(run_dir, tmp_path):
    with pytest.raises(S.SampleError, match="no such run"):
        S.load(tmp_path / "nope")
    for path in (None, 3, ""):  # (None and 3 were pathlib's TypeError from deep inside)
        with pytest.raises(S.SampleError, match=rf"^path must be a training run's folder, .* got {re.escape(repr(path))}$"):
            S.load(path)
    (tmp_path / "foreign").mkdir()
    with pytest.raises(S.SampleError, match=r"not an llmjax training run \(it has no config.json and checkpoints/\)"):
        S.load(tmp_path / "foreign")
    (tmp_path / "foreign" / "config.json").write_text('{"model_type": "llama"}')  # (an exported `modern`, say)
    with pytest.raises(S.SampleError, match=r"is a Hugging Face 'llama' model folder; llmjax reads its own training runs and Hugging Face GPT-2 folders only"):
        S.load(tmp_path / "foreign")
    (tmp_path / "foreign" / "config.json").write_text('{"model": {}}')  # (a run's, without checkpoints)
    with pytest.raises(S.SampleError, match=r"not an llmjax training run \(it has no checkpoints/\)"):
        S.load(tmp_path / "foreign")
    with pytest.raises(S.SampleError, match="no checkpoint 99"):
        S.load(run_dir / "checkpoints" / "99")
    empty = tmp_path / "empty"  # a run with no checkpoint yet: --which=best said to pass --which=latest, which finds none either
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.json", empty)
    for which in ("latest", "best"):
        with pytest.raises(S.SampleError, match=r"empty/checkpoints holds no checkpoint; train it first$"):
            S.resolve(empty, which)
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    for f in (broken / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:  # truncate the array data and its metadata
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(S.SampleError) as e:
        S.load(broken)
    assert "\n" not in str(e.value) and ("pass another one, e.g. --checkpoint" in str(e.value) or "only checkpoint" in str(e.value))
    (broken / "config.json").write_text("{not json")
    with pytest.raises(S.SampleError, match="not a readable llmjax run"):
        S.load(broken)
    for text in ("[]", "null"):  # JSON, but not a run's
        (broken / "config.json").write_text(text)
        with pytest.raises(S.SampleError, match="not a readable llmjax run"):
            S.load(broken)
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    (other / "tokenizer.json").write_text("[]")
    with pytest.raises(S.SampleError, match="other: not a tokenizer description"):
        S.load(other)
    desc = json.loads((run_dir / "tokenizer.json").read_text())
    desc["chars"] = desc["chars"][:10]
    (other / "tokenizer.json").write_text(json.dumps(desc))
    with pytest.raises(S.SampleError, match="character tokenizer: vocab_size 65 but 10 characters"):
        S.load(other)
    (other / "tokenizer.json").write_text(json.dumps({**desc, "vocab_size": 10}))
    with pytest.raises(S.SampleError, match="its tokenizer.json has 10 tokens, its model 65"):
        S.load(other)


def test_which_best_with_one_checkpoint_or_gpt2_weights_is_refused(run_dir, tmp_path):
    """--which=best with a path naming one checkpoint (RUN/checkpoints/<step>), or GPT-2 weights, was
    ignored: that step (those weights) read, whatever the run's best. Refused in one line saying what
    to pass; the run with best, and the step with latest, read as before."""
    other = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert S.resolve(run_dir, "best") == (run_dir, other)
    assert S.resolve(run_dir / "checkpoints" / str(other), "latest") == (run_dir, other)
    with pytest.raises(S.SampleError, match=rf"^--which=best picks among a run's checkpoints, and .*/checkpoints/{other} names one \(step "
                                            rf"{other}\); pass the run directory {run_dir} with --which=best, or drop --which to read step {other}$"):
        S.load(run_dir / "checkpoints" / str(other), "best")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(S.SampleError, match=r"^--which=best picks among a training run's checkpoints; .*hf is GPT-2 weights \(one set\): drop --which$"):
        S.load(tmp_path / "hf", "best")


def test_which_best_reads_the_lowest_validation_loss(tmp_path):
    """--which=best is the checkpoint of the lowest validation loss (not the highest, not the latest,
    and whatever the steps' order); --which=latest the highest step. Checkpoints of a tiny state under
    a folder laid out as a run's (resolve reads no model)."""
    import grain

    from llmjax.checkpoint import Checkpointer

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt = Checkpointer(run / "checkpoints", keep=5)
    state = {"params": {"w": np.ones((2, 3), np.float32)}}
    for step, loss in ((1, 3.0), (2, 1.5), (3, 4.0), (4, None), (5, 2.0)):
        ckpt.save(step, state, it, {"step": step}, val_loss=loss)
    ckpt.close()
    assert S.resolve(run, "best") == (run, 2)
    assert S.resolve(run, "latest") == (run, 5) == S.resolve(run / "checkpoints", "latest")
    assert S.resolve(run / "checkpoints" / "3", "latest") == (run, 3)


def test_a_damaged_or_foreign_metrics_file_is_one_line(run_dir, tmp_path):
    """Orbax reads every checkpoint's metrics file (its validation loss) when it opens the folder:
    a damaged one was a JSON traceback for every checkpoint of the run, a foreign one (no val_loss)
    a KeyError with --which=best."""
    for text, which in (('{"val_lo', "latest"), ('{"loss": 2.5}', "best"), ('{"val_loss": "low"}', "best")):
        run = tmp_path / f"run{len(text)}"
        shutil.copytree(run_dir, run)
        metrics = sorted((run / "checkpoints").glob("*/metrics/metrics"))
        assert metrics  # (the evaluation steps' checkpoints have one)
        metrics[0].write_text(text)
        # the run, and one checkpoint given by its step (read whatever --which: a step's path takes only latest, the default)
        for path, how in ((run, which), (run / "checkpoints" / "8", "latest")):
            with pytest.raises(S.SampleError, match=f"{metrics[0]} is damaged or not llmjax's .*: (write it again with|move it aside)") as e:
                S.load(path, how)
            assert "\n" not in str(e.value)
    r = _cli(f"--checkpoint_path={run}", "--prompt=ROMEO:", "--max_new_tokens=3")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and r.stdout == "", r.stderr


def test_a_checkpoint_a_running_trainer_replaces_while_it_is_read(run_dir, tmp_path, monkeypatch):
    """A trainer still running in the run saves a newer checkpoint and deletes the one being read
    (train.keep_checkpoints): sampling a run during training failed every time with keep 1 ('RUN/checkpoints
    has no checkpoint 40 (it has [41])'). A run folder reads the step that replaced it, the same
    parameters bit for bit; a step named by its path says it was deleted meanwhile."""
    import llmjax.checkpoint as C

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    latest = max(int(c.name) for c in (run / "checkpoints").iterdir() if c.name.isdigit())
    want = S.load(run)
    restore, saves = C.restore_params, [1]

    def replaced_meanwhile(directory, step, *args, **kwargs):  # the trainer's next save, then its deletion of `step`
        if saves:
            saves.pop()
            (directory / str(step)).rename(directory / str(step + 1))
        return restore(directory, step, *args, **kwargs)

    monkeypatch.setattr(C, "restore_params", replaced_meanwhile)
    got = S.load(run)
    assert got.step == latest + 1
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
               for a, b in zip(jax.tree.leaves(nnx.state(want.model)), jax.tree.leaves(nnx.state(got.model))))
    saves.append(1)
    with pytest.raises(S.SampleError, match=rf"^checkpoint {run}/checkpoints/{latest + 1} was deleted while it was read \(a training run "
                                            rf"still running there .*\); pass the run folder {run}, which reads its latest checkpoint, or a later step$"):
        S.load(run / "checkpoints" / str(latest + 1))


def test_a_checkpoint_of_another_model_says_so(run_dir, tmp_path):
    """Checkpoints under another run's config.json: not 'damaged, pass an earlier one' (which fails
    alike) but which array differs."""
    mixed = tmp_path / "mixed"
    shutil.copytree(run_dir, mixed)
    cfg = json.loads((mixed / "config.json").read_text())
    cfg["model"]["d_model"] *= 2
    (mixed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(S.SampleError, match=r"holds another model than its run's config.json describes \(params/.* has shape "
                                            r".* there, .* in the model\); use it with the run folder it was trained in"):
        S.load(mixed)


def test_the_hint_for_a_damaged_checkpoint_names_another_that_exists(tmp_path):
    from llmjax.checkpoint import RESUME_HINT, SAMPLE_HINT, _hint

    for step in (100, 200, 300):
        (tmp_path / str(step)).mkdir()
    assert _hint(SAMPLE_HINT, tmp_path, 200).endswith(f"{tmp_path}/100")  # the latest earlier one
    assert _hint(SAMPLE_HINT, tmp_path, 100).endswith(f"{tmp_path}/200")  # else the first later one (was: "only checkpoint")
    assert _hint(RESUME_HINT, tmp_path, 300).endswith("to resume from step 200")
    for step in (200, 300):
        (tmp_path / str(step)).rmdir()
    assert _hint(SAMPLE_HINT, tmp_path, 100) == "it is this run's only checkpoint"


def test_a_dtype_given_computes_the_matmuls_too(run_dir, tmp_path):
    """--dtype float16 on a run with matmul_dtype='bfloat16' was refused with advice the sampler has no
    flag for; --dtype float32 kept bfloat16 matmuls."""
    narrow = tmp_path / "narrow"
    shutil.copytree(run_dir, narrow)
    cfg = json.loads((narrow / "config.json").read_text())
    cfg["model"]["matmul_dtype"] = "bfloat16"
    (narrow / "config.json").write_text(json.dumps(cfg))
    toks = jnp.asarray([[5, 9, 13, 20, 1]])
    assert S.load(narrow).model.cfg.matmul_dtype == "bfloat16"
    half = S.load(narrow, dtype="float16").model
    assert (half.cfg.dtype, half.cfg.matmul_dtype) == ("float16", "")
    full = S.load(narrow, dtype="float32").model
    assert full.cfg.matmul_dtype == ""
    np.testing.assert_array_equal(np.asarray(full(toks)[0]), np.asarray(S.load(run_dir).model(toks)[0]))
    np.testing.assert_allclose(np.asarray(half(toks)[0], np.float32), np.asarray(full(toks)[0]), atol=0.05)


def test_prompts_empty_and_too_long(run_dir):
    loaded = S.load(run_dir)
    C = loaded.model.cfg.context_len
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ids = loaded.encode_prompts(["", "ab" * C])
    assert ids[0] == loaded.tokenizer.encode("\n")  # char vocabulary: no end-of-text, a newline
    assert ids[1] == loaded.tokenizer.encode(("ab" * C)[-C:])
    assert len(w) == 1 and "keeping its last" in str(w[0].message)
    with pytest.raises(S.SampleError, match="prompt 1"):
        loaded.encode_prompts(["ĳ"])


def test_streamed_text_equals_the_returned_text_when_a_row_ends_inside_a_character(monkeypatch):
    """A row that stops at max_new_tokens inside a UTF-8 character: its streamed pieces end with the
    same U+FFFD the returned text ends with."""
    from llmjax.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    ids = tok.encode(" naïve 東京")
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    new = ids[:cut]

    def fake_generate(model, prompts, max_new, *, on_tokens=None, **kw):  # the decode loop's stream, in two blocks
        if on_tokens is not None:
            on_tokens(0, new[:1])
            on_tokens(0, new[1:])
        return [new]

    monkeypatch.setattr(S, "generate", fake_generate)
    loaded = S.Loaded(model=types.SimpleNamespace(cfg=types.SimpleNamespace(context_len=64)), tokenizer=tok, config={}, step=0, path=None)
    pieces = []
    got = loaded.generate_text(["x"], cut, on_text=lambda row, text: pieces.append(text))
    assert got == [tok.decode(new)] and got[0].endswith("\ufffd")
    assert "".join(pieces) == got[0]


def test_prompt_file_lines_are_split_at_newlines_only(tmp_path):
    """str.splitlines would also split at form feeds, \\x1c-\\x1e, \\x85, \\u2028: a prompt is a line."""
    f = tmp_path / "p.txt"
    f.write_text("one\fline\n\ntwo\u2028still two\r\nthree\n")
    flags_ = types.SimpleNamespace(prompt="zero", prompt_file=str(f))
    assert S._prompts(flags_) == ["zero", "one\fline", "two\u2028still two", "three"]
    f.write_bytes(b"\xef\xbb\xbfROMEO:\nJULIET:\n")  # a byte-order mark (Windows editors) is not part of prompt 1
    assert S._prompts(types.SimpleNamespace(prompt=None, prompt_file=str(f))) == ["ROMEO:", "JULIET:"]
    f.write_text("\r\nROMEO:\r\n\r\nJULIET:")  # (CRLF: lines as an editor numbers them)
    assert S._named_prompts(types.SimpleNamespace(prompt="", prompt_file=str(f))) == [
        ("", "--prompt"), ("ROMEO:", f"--prompt_file {f} line 2"), ("JULIET:", f"--prompt_file {f} line 4")]
    # --prompt_file=- reads standard input, as Unix tools do (it was a file named '-': "cannot read")
    with open(f, "rb") as stdin, pytest.MonkeyPatch.context() as mp:
        mp.setattr(S.sys, "stdin", types.SimpleNamespace(buffer=stdin))
        assert S._named_prompts(types.SimpleNamespace(prompt=None, prompt_file="-")) == [
            ("ROMEO:", "--prompt_file - line 2"), ("JULIET:", "--prompt_file - line 4")]


def test_a_prompt_file_with_no_prompt_is_refused_with_or_without_prompt(tmp_path):
    """A --prompt_file of blank lines is an error also beside --prompt (its prompts were silently
    none), and so is an empty --prompt_file= (it was ignored)."""
    f = tmp_path / "blank.txt"
    f.write_text("\n  \r\n\t\n")
    for prompt in (None, "ROMEO:", ""):
        with pytest.raises(S.SampleError, match="holds no prompt"):
            S._prompts(types.SimpleNamespace(prompt=prompt, prompt_file=str(f)))
        with pytest.raises(S.SampleError, match="--prompt_file is empty"):
            S._prompts(types.SimpleNamespace(prompt=prompt, prompt_file=""))
    assert S._prompts(types.SimpleNamespace(prompt="", prompt_file=None)) == [""]  # (an empty --prompt alone: end-of-text)


def test_prompt_file_dash_with_standard_input_closed_is_one_line(monkeypatch):
    """`--prompt_file=- <&-`: Python's sys.stdin is None, which was AttributeError's traceback."""
    monkeypatch.setattr(S.sys, "stdin", None)
    with pytest.raises(S.SampleError, match=r"^--prompt_file - reads standard input, which is closed; pipe the prompts in"):
        S._prompts(types.SimpleNamespace(prompt="ROMEO:", prompt_file="-"))


def test_a_prompt_file_not_in_utf8_names_its_line_and_the_conversion(tmp_path):
    """A --prompt_file in Latin-1 or UTF-16 was Python's words ("cannot read --prompt_file F: 'utf-8'
    codec can't decode byte 0xe9 in position 8: ..."): the error names the byte, its line and the
    iconv command that converts the file (from standard input: the line and the byte)."""
    f = tmp_path / "p.txt"
    f.write_bytes("ROMEO:\nCaf\u00e9\n".encode("latin-1"))
    with pytest.raises(S.SampleError, match=rf"^--prompt_file {re.escape(str(f))} is not UTF-8 text \(0xe9, invalid continuation byte, "
                                            rf"at byte 10 \(line 2\)\); convert it, e.g. with iconv -f latin1 -t utf-8 {re.escape(str(f))} > "):
        S._prompts(types.SimpleNamespace(prompt=None, prompt_file=str(f)))
    with open(f, "rb") as stdin, pytest.MonkeyPatch.context() as mp:
        mp.setattr(S.sys, "stdin", types.SimpleNamespace(buffer=stdin))
        with pytest.raises(S.SampleError, match=r"^--prompt_file - \(standard input\) line 2 holds the byte 0xe9, which is not UTF-8; "
                                                r"convert the text, e.g. with iconv -f latin1 -t utf-8$"):
            S._prompts(types.SimpleNamespace(prompt=None, prompt_file="-"))
    f.write_bytes("ROMEO:\n".encode("utf-16"))
    with pytest.raises(S.SampleError, match=rf"^--prompt_file {re.escape(str(f))} is UTF-16 text .* iconv -f utf-16 -t utf-8 "):
        S._prompts(types.SimpleNamespace(prompt=None, prompt_file=str(f)))


def test_stream_decoder_handles_characters_split_across_tokens():
    from llmjax.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    text = "naïve 🙂 façade — 東京"
    ids = tok.encode(text)
    d = S.StreamDecoder(tok)
    pieces = [d.add([i]) for i in ids]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmjax.sample", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300)


def test_cli_single_sample_streams_plain_text(run_dir):
    loaded = S.load(run_dir)
    want = loaded.generate_text(["ROMEO:"], 20, sampling=GREEDY)[0]
    r = _cli(f"--checkpoint_path={run_dir}", "--prompt=ROMEO:", "--max_new_tokens=20", "--greedy")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ROMEO:" + want + "\n"


@pytest.mark.parametrize("tool", ["sample", "train"])
def test_cli_with_standard_output_closed_is_one_line(run_dir, tmp_path, tool):
    """`python -m llmjax.sample ... >&-`: Python's sys.stdout is None, which was AttributeError's
    traceback at the first text, once the model had loaded; for the trainer, once the run had ended
    (its closing sample). One line before anything loads or trains, for every tool (cli.run)."""
    closed = "import os, sys; os.close(1); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    args = ([f"--checkpoint_path={run_dir}", "--prompt=ROMEO:", "--max_new_tokens=5"] if tool == "sample" else
            ["--config=configs/vanilla.py:tiny", f"--workdir={tmp_path / 'run'}", "--config.train.max_steps=2"])
    r = subprocess.run([sys.executable, "-c", closed, "-m", f"llmjax.{tool}", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert (r.returncode, r.stderr) == (2, "error: standard output is closed, and this tool writes its results there; redirect it "
                                           "to a file (or /dev/null) instead\n"), r.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_cli_ctrl_c_while_streaming_ends_the_text_line_first(run_dir):
    """Ctrl-C during a streamed sample: the text's line is ended, so that the one-line error starts
    a line of its own (it followed the text on the same line)."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "llmjax.sample", f"--checkpoint_path={run_dir}", "--prompt=ROMEO:",
                             "--max_new_tokens=1000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        head = proc.stdout.read(len("ROMEO:") + 8)  # (the prompt, then streamed text: decoding is under way)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert head.startswith(b"ROMEO:") and proc.returncode == 130, err
    assert (head + out).endswith(b"\n") and err.decode() == "error: interrupted\n"


def _ctrl_c_while_jax_imports(args: list[str], before: list[str] = ()):
    """Start `python [before] -X importtime ARGS`, send it SIGINT once llmjax's package is imported and
    JAX's import is under way (-X importtime writes a line as each import ends; a sleep, on a loaded
    machine, could come before the first or, on a fast one, once the tool had reached cli.run, whose
    own Ctrl-C line a test would then see); (the process, its stderr)."""
    import signal

    proc = subprocess.Popen([sys.executable, *before, "-X", "importtime", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    names = []
    for line in proc.stderr:
        names.append(line.rsplit("|", 1)[-1].strip())
        if names[-1].startswith("jax.") and "llmjax" in names:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert names[-1].startswith("jax."), names[-20:]
    return proc, err


@pytest.mark.parametrize("tool", ["sample", "train", "scripts/run_benchmarks.py"])
def test_a_ctrl_c_while_a_tool_imports_is_one_line(tool, tmp_path):
    """Ctrl-C in a tool's first seconds, while it imports JAX and before cli.run: it was a
    KeyboardInterrupt traceback from deep in an import (llmjax's package sets a handler under
    `python -m`, and the evaluate alias script at its top, which cli.run replaces with Python's
    own: the test above covers the Ctrl-C after)."""
    args = {"train": ["--config=configs/vanilla.py:tiny", f"--workdir={tmp_path / 'run'}"], "sample": [f"--checkpoint_path={tmp_path}"],
            "scripts/run_benchmarks.py": [f"--checkpoint_path={tmp_path}"]}
    command = [tool] if tool.endswith(".py") else ["-m", f"llmjax.{tool}"]
    proc, err = _ctrl_c_while_jax_imports([*command, *args[tool]])
    assert (proc.returncode, [x for x in err.splitlines() if not x.startswith("import time:")]) == (130, ["error: interrupted"]), err[-2000:]
    assert not (tmp_path / "run").exists()


def test_an_ignored_ctrl_c_stays_ignored_while_a_tool_imports(tmp_path):
    """A tool started with SIGINT ignored (a background job of a script, `nohup`) ignores it also while
    it imports: the start-up handler took its place, so a Ctrl-C meant for the foreground ended it."""
    ignored = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    proc, err = _ctrl_c_while_jax_imports(["-m", "llmjax.sample", f"--checkpoint_path={tmp_path / 'none'}"], before=["-c", ignored])
    assert proc.returncode == 2 and "error: no such run or checkpoint" in err and "interrupted" not in err, err[-2000:]


def test_the_start_up_ctrl_c_keeps_what_the_tool_printed():
    """The start-up handler ends the process at once (os._exit): what a tool that does not reach
    cli.run (llmjax.tracing) had printed into a file or pipe was lost with stdout's buffer."""
    code = "import llmjax; print('a summary'); llmjax._interrupted_while_starting(2, None)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (a pipe's stdout buffered, as by default)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (130, "a summary\n", "error: interrupted\n")


def test_python_m_of_a_users_package_that_imports_llmjax_keeps_pythons_ctrl_c(tmp_path):
    """The handler of the test above is a tool's alone: `python -m mypkg.run`, whose package imports
    llmjax, had it for good (llmjax was imported while Python found mypkg.run): a Ctrl-C ended the
    program at once, its own `except KeyboardInterrupt` and finally blocks unrun."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("import llmjax\n")
    (tmp_path / "mypkg" / "run.py").write_text(
        "import signal\ntry:\n    signal.raise_signal(signal.SIGINT)\nexcept KeyboardInterrupt:\n    print('saved')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    for m in (["-m", "mypkg.run"], ["-Bmmypkg.run"]):
        r = subprocess.run([sys.executable, *m], capture_output=True, text=True, env=env, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (0, "saved\n", ""), (m, r.stderr)


def test_cli_several_samples_and_prompt_file(run_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("First\n\nSecond line\n")
    r = _cli(f"--checkpoint={run_dir}", "--prompt=Zero", f"--prompt_file={tmp_path / 'prompts.txt'}", "--num_samples=2",
             "--max_new_tokens=10", "--seed=3", "--top_k=5", "--top_p=0.9")
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("--- sample ")[1:]
    assert [b.split(" ---\n")[0] for b in blocks] == ["1", "2", "3", "4", "5", "6"]
    texts = [b.split(" ---\n", 1)[1].rstrip("\n") for b in blocks]
    assert [t[:4] for t in texts] == ["Zero", "Zero", "Firs", "Firs", "Seco", "Seco"]
    loaded = S.load(run_dir)
    want = loaded.generate_text(["Zero", "Zero", "First", "First", "Second line", "Second line"], 10, sampling=Sampling(0.8, 5, 0.9), seed=3)
    assert texts == [p + w for p, w in zip(["Zero", "Zero", "First", "First", "Second line", "Second line"], want)]


def test_cli_errors_are_one_line(run_dir, tmp_path):
    (tmp_path / "p.txt").write_text("JULIET:\n\n  \nFRIAR\u20ac\n")
    cases = []
    for args, needle in [
        ([f"--checkpoint_path={tmp_path / 'missing'}"], "no such run"),
        ([], "--checkpoint_path is required"),
        ([f"--checkpoint_path={run_dir}", "--top_p=1.5"], "top_p"),
        ([f"--checkpoint_path={run_dir}", "--which=worst"], "which"),
        ([f"--checkpoint_path={run_dir}", "--temperature=inf"], "temperature must be a finite number"),
        ([f"--checkpoint_path={run_dir}", "--seed=4294967296"], "--seed must be in [0, 2**32)"),
        # (each flag named with the value given: it was '--num_samples must be >= 1 and --max_new_tokens in [0, 2**31)')
        ([f"--checkpoint_path={run_dir}", "--max_new_tokens=2147483648"],
         "error: --max_new_tokens must be in [0, 2**31) (the decode loop counts in int32), got 2147483648\n"),  # (int32 counters)
        ([f"--checkpoint_path={run_dir}", "--max_new_tokens=-1"],
         "error: --max_new_tokens must be in [0, 2**31) (the decode loop counts in int32), got -1\n"),
        ([f"--checkpoint_path={run_dir}", "--num_samples=-3", "--max_new_tokens=-1"], "error: --num_samples must be >= 1, got -3\n"),
        ([f"--checkpoint_path={run_dir}", "--prompt=ROMEO\u20ac"], "--prompt: character '\u20ac'"),  # refused before the prompt is printed
        # a --prompt_file's prompt is named by its line (it was 'prompt 3': its place after --prompt, blank lines skipped)
        ([f"--checkpoint_path={run_dir}", "--prompt=ROMEO:", f"--prompt_file={tmp_path / 'p.txt'}", "--num_samples=2"],
         f"--prompt_file {tmp_path / 'p.txt'} line 4: character '\u20ac'"),
        # (absl keeps the last of a flag given twice: the other prompts were dropped, silently)
        ([f"--checkpoint_path={run_dir}", "--prompt=ROMEO:", "--prompt", "JULIET:"],
         "--prompt is given 2 times ('ROMEO:', 'JULIET:') and only the last would be read; give one (more prompts go in a --prompt_file"),
        ([f"--checkpoint_path={run_dir}", f"--prompt_file={tmp_path / 'a'}", "--prompt=x", f"--prompt_file={tmp_path / 'b'}"],
         "--prompt_file is given 2 times ("),
    ]:
        cases.append((args, needle))
    for (args, needle), r in zip(cases, cli_cases("llmjax.sample", [args for args, _ in cases])):
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and needle in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
        assert r.stdout == "", (args, r.stdout)


def test_cli_run_readers_take_one_run_and_name_a_bad_dtype(run_dir, tmp_path):
    """`--checkpoint A --checkpoint_path B` (an alias and its flag, or one flag twice, a --flagfile's
    among them) read B, silently (absl keeps the last value): refused in one line by every tool that
    reads a run, before anything loads; the same run written twice is one run, and a flag's value
    that looks like a flag (`--prompt --checkpoint=x`) is a value. A --dtype that is no dtype was
    refused as `RUN: model.dtype='foo'`, as if the run's config held it: it names --dtype and its
    choices (and, from Python, `dtype`)."""
    nowhere = str(tmp_path / "nowhere")
    (tmp_path / "flags").write_text(f"--checkpoint_path={nowhere}\n")
    two = f"--checkpoint_path={nowhere} and --checkpoint={run_dir} name two runs; give one"
    enum = "value should be one of <float32|bfloat16|float16>"
    cases = [
        ("llmjax.sample", ["--checkpoint", nowhere, f"--checkpoint_path={run_dir}"],
         f"--checkpoint={nowhere} and --checkpoint_path={run_dir} name two runs; give one"),
        ("llmjax.evaluate", [f"--checkpoint_path={nowhere}", f"--checkpoint={run_dir}", "--scorer=fast"], two),
        ("llmjax.export", [f"--checkpoint_path={run_dir}", f"--checkpoint_path={nowhere}", "--format=safetensors", f"--out={tmp_path / 'x'}"],
         f"--checkpoint_path={run_dir} and --checkpoint_path={nowhere} name two runs; give one"),
        ("scripts/run_benchmarks.py", [f"--flagfile={tmp_path / 'flags'}", f"-checkpoint={run_dir}"], two),
        ("llmjax.export", ["--checkpoint", f"{run_dir}/", f"--checkpoint_path={run_dir}"], "--format (safetensors or gguf) and --out are required"),
        ("llmjax.sample", ["--prompt", f"--checkpoint={nowhere}", f"--checkpoint_path={run_dir}", "--num_samples=0"],
         "--num_samples must be >= 1, got 0"),
        ("llmjax.sample", [f"--checkpoint_path={run_dir}", "--dtype=bf16"], f"--dtype=bf16: {enum}"),
        ("llmjax.evaluate", [f"--checkpoint_path={run_dir}", "--dtype=foo"], f"--dtype=foo: {enum}"),
        ("scripts/run_benchmarks.py", [f"--checkpoint_path={run_dir}", "--dtype="], f"--dtype=: {enum}"),
    ]
    sampler = [c for c in cases if c[0] == "llmjax.sample"]  # (a process that imported llmjax.evaluate has llmjax.sample)
    others = [c for c in cases if c[0] != "llmjax.sample"]
    runs = cli_cases("llmjax.sample", [args for _, args, _ in sampler]) + cli_runs([(module, args) for module, args, _ in others])
    for (module, args, line), r in zip(sampler + others, runs):
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: {line}\n"), (module, args, r.stderr[-2000:])
    with pytest.raises(S.SampleError, match=r"^dtype \(--dtype\) must be one of float32, bfloat16, float16, got 'bfloat61' "
                                            r"\(did you mean 'bfloat16'\?\)$"):
        S.load(run_dir, dtype="bfloat61")


def test_text_stdout_cannot_encode_is_escaped_not_a_traceback(run_dir, tmp_path):
    """stdout in an encoding that lacks some of the text's characters (a latin-1 or cp1252 terminal
    or pipe; a GPT-2 BPE model may write any character): those characters are written as \\uXXXX
    escapes, as Python writes stderr, with one warning line (it was UnicodeEncodeError's traceback,
    the sample cut where it stood), streamed or not. A copy of the run whose 64 characters other
    than the newline are CJK, so that every character it writes is one latin-1 lacks."""
    import os

    run = tmp_path / "cjk"
    shutil.copytree(run_dir, run)
    desc = json.loads((run / "tokenizer.json").read_text())
    prompt = "".join(chr(0x4E00 + desc["chars"].index(c)) for c in "ROMEO:")  # (the same ids as ROMEO:)
    desc["chars"] = "".join(c if c == "\n" else chr(0x4E00 + i) for i, c in enumerate(desc["chars"]))
    (run / "tokenizer.json").write_text(json.dumps(desc))
    loaded = S.load(run)
    want = loaded.generate_text([prompt], 12, sampling=GREEDY)[0]
    assert want.strip("\n")  # (characters latin-1 lacks)
    base = [f"--checkpoint_path={run}", f"--prompt={prompt}", "--max_new_tokens=12", "--greedy"]
    single, two = cli_cases("llmjax.sample", [base, base + ["--num_samples=2"]], env={**os.environ, "PYTHONIOENCODING": "latin-1"})
    escaped = lambda text: text.encode("latin-1", "backslashreplace").decode("latin-1")  # noqa: E731
    assert (single.returncode, single.stdout) == (0, escaped(prompt + want) + "\n"), single.stderr[-2000:]
    assert (two.returncode, two.stdout) == (0, "".join(f"--- sample {k} ---\n{escaped(prompt + want)}\n" for k in (1, 2))), two.stderr[-2000:]
    n = sum(c != "\n" for c in prompt + want)
    for r, count in ((single, n), (two, 2 * n)):
        assert r.stderr == (f"warning: {count} character(s) of the text are not in the output's encoding (iso8859-1) and were written as "
                            "\\uXXXX escapes; for the characters themselves set PYTHONIOENCODING=utf-8 (or a UTF-8 locale)\n"), r.stderr[-2000:]


def test_text_out_escapes_only_what_the_stream_cannot_hold(capsys):
    """cli.TextOut (the sampler's and the trainer's text): only the characters the stream's encoding
    lacks become escapes, counted once in the warning; a stream told to replace replaces."""
    import io

    from llmjax import cli

    raw = io.BytesIO()
    out = cli.TextOut(io.TextIOWrapper(raw, encoding="cp1252", write_through=True))
    out.write("café € 東京🙂\n", flush=True)
    assert raw.getvalue() == "café € \\u6771\\u4eac\\U0001f642\n".encode("cp1252")
    out.warn()
    out.warn()  # (said once)
    assert capsys.readouterr().err.startswith("warning: 3 character(s) of the text are not in the output's encoding (cp1252)")
    raw = io.BytesIO()
    out = cli.TextOut(io.TextIOWrapper(raw, encoding="latin-1", errors="replace", write_through=True))
    out.write("é東")
    out.warn()
    assert raw.getvalue() == "é?".encode("latin-1") and capsys.readouterr().err == ""


def test_a_prompt_with_bytes_that_are_not_utf8_is_refused():
    """A byte of --prompt that is not UTF-8 (a terminal in latin-1: é is 0xE9; Python keeps it in
    sys.argv as the lone surrogate U+DCE9) was silently replaced by GPT-2's BPE with U+FFFD (the
    model saw 'caf\ufffd'). Its raw byte would not be what the user typed either (é is 0xC3 0xA9 in
    the UTF-8 text GPT-2 learnt), so it is refused, in one line that says where and what to do."""
    from llmjax.tokenizer import GPT2Tokenizer

    tok = GPT2Tokenizer()
    loaded = S.Loaded(model=types.SimpleNamespace(cfg=types.SimpleNamespace(context_len=64)), tokenizer=tok, config={}, step=0, path=Path("."))
    assert loaded.encode_prompts(["café"]) == [tok.encode("café")] and tok.decode(tok.encode("café")) == "café"
    with pytest.raises(S.SampleError, match=r"^prompt 2 holds the byte 0xe9, which is not UTF-8, at character 4: is the terminal's "
                                            r"encoding UTF-8\? give the prompt as UTF-8 text \(e\.g\. in a UTF-8 --prompt_file\)$"):
        loaded.encode_prompts(["café", b"caf\xe9".decode("utf-8", "surrogateescape")])
    with pytest.raises(S.SampleError, match=r"^prompt 1 holds a lone surrogate U\+D800 at character 2, which is no character; remove it$"):
        loaded.encode_prompts(["a\ud800"])


def test_cli_out_of_device_memory_is_one_line(run_dir):
    """More samples than the device holds (200,000 rows' caches and tokens under an 8 GiB address
    space, where 50,000 fail and 30,000 fit; a million took 18 s, most of it Python's per-row
    work): one line saying what to lower, exit status 2, not XLA's traceback."""
    r = subprocess.run(capped_python(8, "-m", "llmjax.sample", f"--checkpoint_path={run_dir}", "--prompt=ROMEO:", "--max_new_tokens=20",
                                     "--num_samples=200000"), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr[-2000:]
    assert r.stderr == ("error: out of device memory decoding 20 new tokens for 200000 sample(s) per prompt (the new tokens are kept "
                        "on the device); lower --max_new_tokens or --num_samples\n"), r.stderr[-2000:]


def test_quantized_load_and_cli(run_dir):
    """--quantize int8: the int8 model (llmjax.quant) from the checkpoint's float32 weights."""
    from llmjax.quant import Int8LM, weight_bytes

    q = S.load(run_dir, quantize="int8")
    assert isinstance(q.model, Int8LM) and weight_bytes(q.model) < weight_bytes(S.load(run_dir).model)
    want = q.generate_text(["ROMEO:"], 12, sampling=GREEDY)[0]
    r = _cli(f"--checkpoint_path={run_dir}", "--prompt=ROMEO:", "--max_new_tokens=12", "--greedy", "--quantize=int8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ROMEO:" + want + "\n"
    with pytest.raises(S.SampleError, match="--quantize must be"):
        S.load(run_dir, quantize="int4")


def test_decode_min_rows(monkeypatch):
    """On a GPU the sampler decodes at least two rows (a vector x matrix product would be split by
    XLA's dot strength reduction; llmjax/sample.py), elsewhere one; LLMJAX_DECODE_MIN_ROWS overrides."""
    monkeypatch.delenv("LLMJAX_DECODE_MIN_ROWS", raising=False)
    assert (S.decode_min_rows("gpu"), S.decode_min_rows("cpu")) == (2, 1)
    monkeypatch.setenv("LLMJAX_DECODE_MIN_ROWS", "1")
    assert S.decode_min_rows("gpu") == 1
    monkeypatch.setenv("LLMJAX_DECODE_MIN_ROWS", "abc")
    with pytest.raises(S.SampleError, match="LLMJAX_DECODE_MIN_ROWS must be a whole number of rows"):
        S.decode_min_rows("gpu")


def test_decode_grow_switch(monkeypatch):
    """The cache grows on a GPU, not on the CPU; LLMJAX_DECODE_GROW=1/0 (or true/false) overrides,
    and anything else is an error, not 'on'."""
    monkeypatch.delenv("LLMJAX_DECODE_GROW", raising=False)
    assert (S.decode_grows("gpu"), S.decode_grows("cpu")) == (True, False)
    for value, want in (("1", True), ("true", True), ("0", False), ("false", False), ("Off", False)):
        monkeypatch.setenv("LLMJAX_DECODE_GROW", value)
        assert S.decode_grows("cpu") is want and S.decode_grows("gpu") is want
    monkeypatch.setenv("LLMJAX_DECODE_GROW", "maybe")
    with pytest.raises(S.SampleError, match="LLMJAX_DECODE_GROW must be 1 or 0"):
        S.decode_grows("gpu")


@pytest.mark.parametrize("sampling,eot", [(GREEDY, None), (S.Sampling(temperature=1.0, top_k=20), 7)], ids=["greedy", "top_k_eot"])
def test_padding_rows_change_nothing(monkeypatch, sampling, eot):
    """A batch padded to more rows (as on a GPU: LLMJAX_DECODE_MIN_ROWS) gives each real row the same
    tokens, streamed the same, as without padding, including across a slide past the context, and
    returns only the real rows; the padding rows draw nothing (done from the start), so the loop
    stops when the real rows do."""
    m = decoder("vanilla", seed=5)
    prompts = [[1, 2, 3]]

    def run(rows):
        monkeypatch.setenv("LLMJAX_DECODE_MIN_ROWS", str(rows))
        streamed = []
        out = S.generate(m, prompts, 70, sampling=sampling, seed=3, eot_id=eot, on_tokens=lambda r, ids: streamed.append((r, ids)))
        return out, streamed

    one, streamed_one = run(1)
    for rows in (2, 4):
        out, streamed = run(rows)
        assert out == one and streamed == streamed_one, rows
    assert len(one) == 1 and 0 < len(one[0]) <= 70 and (eot is not None or len(one[0]) == 70 > m.cfg.context_len)
    prefill, decode = S._jitted()
    calls = {}

    def counting(*args, **kw):
        calls[rows] = calls.get(rows, 0) + 1
        return decode(*args, **kw)

    monkeypatch.setattr(S, "_jitted", lambda: (prefill, counting))
    for rows in (1, 3):
        run(rows)
    assert calls[1] == calls[3], calls  # (no extra decode calls for rows that never run)


def test_a_model_with_host_parameters_decodes_alike():
    """A model merged from host (NumPy) parameters, as the trainer's end-of-run sample makes it,
    decodes the same tokens as the same model on the device."""
    m = decoder("vanilla", seed=6)
    graphdef, state = nnx.split(m)
    host = nnx.merge(graphdef, jax.device_get(state))
    assert any(isinstance(x, np.ndarray) for x in jax.tree.leaves(nnx.state(host)))
    assert generate(host, [[1, 2, 3]], 8, sampling=GREEDY) == generate(m, [[1, 2, 3]], 8, sampling=GREEDY)


@pytest.mark.parametrize("arch", ["vanilla", "mla", "linformer", "ssm"])
def test_a_growing_cache_changes_no_token(monkeypatch, arch):
    """With the decode cache grown as the rows advance (the GPU default, LLMJAX_DECODE_GROW), rows of
    different prompt lengths give the same greedy and sampled tokens, streamed the same, as with the
    whole cache from the start, through a slide past the context too; the cache really grew (and a
    bounded or recurrent state has nothing to grow)."""
    m = decoder(arch, seed=2, context_len=256)
    prompts = [[1, 2, 3], list(range(5, 25)), [7]]
    grown, slots = [], []
    real_grow = S.grow_cache

    def spy(model, state, new_len):
        out = real_grow(model, state, new_len)
        grown.append(new_len)
        slots.append(any(new_len in a.shape for a in jax.tree.leaves(out["cache"])))
        return out

    monkeypatch.setattr(S, "grow_cache", spy)

    def run(flag, n, sampling):
        monkeypatch.setenv("LLMJAX_DECODE_GROW", flag)
        streamed = [[] for _ in prompts]  # (each row's stream as a whole: growing may end a chunk early)
        out = S.generate(m, prompts, n, sampling=sampling, seed=1, on_tokens=lambda r, ids: streamed[r].extend(ids))
        return out, streamed

    for n, sampling in ((150, GREEDY), (300, S.Sampling(temperature=1.0, top_k=10))):
        whole = run("0", n, sampling)
        grown.clear()
        slots.clear()
        assert run("1", n, sampling) == whole, (n, sampling)
        # a 32-token bucket: first 128 slots (32 + 64, rounded to 64), then what the run needs (192 for
        # 150 tokens; for 300, the context, 256, and a slide past it)
        assert grown == ([192] if n == 150 else [256]), grown
        assert slots == [arch in ("vanilla", "mla")]  # (the Linformer's and the SSM's states are bounded)


@pytest.mark.parametrize("arch", ["vanilla", "gqa"])
def test_a_bfloat16_model_decodes_a_batch_on_the_cpu(arch):
    """A bf16 model (a run trained in bf16, sampled on a CPU) decodes a batch of prompts: the cached
    attention's bf16 x bf16 -> float32 product has batch axes, which XLA's CPU runtime has no kernel
    for (it failed with 'Unsupported element type for DotThunk'); each row gives the tokens it gives
    alone."""
    m = decoder(arch, seed=4, dtype="bfloat16")
    prompts = [[1, 2, 3], [5], list(range(8, 20))]
    both = generate(m, prompts, 10, sampling=GREEDY)
    assert both == [generate(m, [p], 10, sampling=GREEDY)[0] for p in prompts]


# --- logits that are not finite ------------------------------------------------------------------


def test_logits_that_are_not_finite_are_an_error_not_tokens():
    """A float16 forward that overflows gives NaN logits, and the sampler drew from them: argmax
    takes the first NaN, token 0 (greedy gave [0, 38, 0, 0, ...]), a random draw any token: text
    with nothing to show that it is wrong. Now one line. This SSM's float32 logits stay below 4,
    but its residual stream reaches 1e6 (a float16 overflow); the float32 model samples."""
    m32 = scale_params(perturb_vectors(llmjax.build_model(config("ssm"), seed=0)), 5.0)
    m16 = load_params(llmjax.build_model(config("ssm", dtype="float16"), seed=0), params(m32))
    toks = jnp.asarray([[1, 2, 3], [3, 2, 1]])
    assert np.abs(np.asarray(m32(toks)[0][..., :65])).max() < 4 and not np.isfinite(np.asarray(m16(toks)[0][:, -1, :65])).any()
    assert len(generate(m32, [[1, 2, 3]], 5, sampling=GREEDY)[0]) == 5
    needle = (r"^the model's logits were not finite \(NaN or inf\) for 2 of 2 rows \(the first: row 1, at its new token 1\); its "
              r"forward overflowed \(float16 holds at most 65504: sample with --dtype bfloat16 or float32\)")
    for sampling in (GREEDY, Sampling(temperature=1.0)):
        streamed = []
        with pytest.raises(S.SampleError, match=needle):
            generate(m16, [[1, 2, 3], [3, 2, 1]], 5, sampling=sampling, on_tokens=lambda r, t: streamed.append(t))
        assert streamed == []


MODES = [GREEDY, Sampling(temperature=1.0, top_k=None), Sampling(temperature=0.8, top_k=3), Sampling(temperature=1.0, top_k=None, top_p=0.5),
         Sampling(temperature=0.7, top_k=4, top_p=0.3)]


@pytest.mark.parametrize("sampling", MODES, ids=["greedy", "sample", "top_k", "top_p", "top_k_p"])
def test_every_sampling_mode_notes_any_non_finite_logit_of_a_row(sampling):
    """Whether each row's real logits are all finite, against numpy's isfinite, in every mode: a NaN,
    +inf or -inf anywhere in the real vocabulary, including where top-k or the nucleus drops it
    (only the drawn token's logit was read: a draw with top-k, top-p, or from a row holding one NaN
    among finite logits, sampled on without a word), and none in the padded vocabulary counted."""
    rng = np.random.default_rng(0)
    V, vocab = 40, 37
    x = (rng.normal(size=(24, V)) * 3).astype(np.float32)
    for row, bad in zip(range(18), [np.nan, np.inf, -np.inf] * 6):
        x[row, rng.integers(vocab, size=1 + row % 3)] = bad  # (1-3 of them, anywhere, most below the top-k)
    x[18, 37:] = np.nan  # padded vocabulary only: fine
    x[19, [2, 38]] = [np.nan, np.inf]
    keys = jax.random.split(jax.random.key(1), 24)
    nxt, finite = jax.jit(S._choose, static_argnums=(2, 3))(jnp.asarray(x), keys, vocab, sampling)
    np.testing.assert_array_equal(np.asarray(finite), np.isfinite(x[:, :vocab]).all(axis=1))
    nxt = np.asarray(nxt)
    good = np.isfinite(x[:, :vocab]).all(axis=1)
    assert (nxt[good] < vocab).all() and (not sampling.greedy or (nxt[good] == x[good, :vocab].argmax(axis=1)).all())
    # the same tokens as choose (its filter unchanged for rows without a non-finite logit)
    np.testing.assert_array_equal(np.asarray(S.choose(jnp.asarray(x[good]), keys[good], vocab, sampling)), nxt[good])


@pytest.mark.parametrize("sampling", MODES[1:], ids=["sample", "top_k", "top_p", "top_k_p"])
def test_a_nan_logit_that_the_filter_drops_is_an_error(sampling):
    """One NaN logit (a NaN row of the tied embedding: token 60's logit, no prompt feeds it) among
    finite ones: each draw is an error at the row's first new token, not a sample."""
    m = decoder("vanilla")
    m.embed.embedding[...] = m.embed.embedding[...].at[60].set(jnp.nan)
    last = np.asarray(m(jnp.asarray([[1, 2, 3]]))[0][0, -1, :65])
    assert np.isnan(last[60]) and np.isfinite(np.delete(last, 60)).all()
    with pytest.raises(S.SampleError, match=r"^the model's logits were not finite \(NaN or inf\) for 2 of 2 rows \(the first: row 1, "
                                            r"at its new token 1\)"):
        generate(m, [[1, 2, 3], [4, 5]], 4, sampling=sampling)


def test_logits_that_turn_non_finite_while_decoding_stop_the_sample_there():
    """One row's logits become NaN at position 8 (its learned position embedding from there on):
    the error names that row and its new token; the tokens streamed before are those of the
    model without NaN, and none drawn from NaN logits is streamed."""
    good = decoder("vanilla")
    bad = decoder("vanilla")
    bad.pos_embed.embedding[...] = bad.pos_embed.embedding[...].at[8:].set(jnp.nan)
    prompts = [[1], [1, 2, 3, 4, 5, 6]]  # row 1 reaches position 5, row 2 position 10: its new token 8 - 6 + 2 = 4
    want = generate(good, prompts, 5, sampling=GREEDY)
    got = {0: [], 1: []}
    with pytest.raises(S.SampleError, match=r"^the model's logits were not finite \(NaN or inf\) for 1 of 2 rows \(the first: row 2, "
                                            r"at its new token 4\)"):
        generate(bad, prompts, 5, sampling=GREEDY, on_tokens=lambda r, t: got[r].extend(t), stream_every=2, unroll=1)
    assert got[1] == want[1][: len(got[1])] and len(got[1]) < 4 and got[0] == want[0][: len(got[0])]


def test_the_validation_estimate_is_the_mean_over_eval_num_batches(run_dir):
    """The last step's val_loss_estimate (the checkpoints' metric for --which=best) is the mean token
    loss of the final parameters over eval.num_batches (2) random validation batches of
    train.batch_size windows, drawn with seed train.seed + 1: by hand from the loaded model."""
    from llmjax import data as data_lib

    loaded = S.load(run_dir)
    c = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [m["val_loss_estimate"] for m in rows if m["step"] == 8][0]
    ds = data_lib.open_dataset("tinyshakespeare_char", None)
    windows = list(data_lib.sample_windows(ds.split("val"), seq_len=32, batch=c["train"]["batch_size"],
                                           num_batches=c["eval"]["num_batches"], seed=c["train"]["seed"] + 1))
    assert len(windows) == 2

    @jax.jit
    def token_losses(toks):
        logits = loaded.model(toks[:, :-1])[0]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), toks[:, 1:, None], -1)[..., 0]

    got = float(np.mean([np.asarray(token_losses(jnp.asarray(w))) for w in windows]))
    assert abs(got - want) < 1e-5, (got, want)
