"""float16 training's loss scaling (train.loss_scale): gradients that float16 flushes to zero come
back within float32's rounding, an overflow skips its step, a run resumes bit for bit across a
skipped step, a run without scaling keeps its state as it was, and bad values are one line."""

from __future__ import annotations

import json
import math
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
import llmjax.train as T
from conftest import ROOT
from llmjax import data as data_lib
from llmjax.config import ConfigError
from llmjax.sharding import make_mesh
from llmjax.train import TrainingError, build_steps, train
from test_train import _env, _train_cmd, cfg, figures, losses, saved_state


def shakespeare_batch(c) -> np.ndarray:
    """One training batch of the shipped Shakespeare (1, B, T+1) for config `c`."""
    ds = data_lib.open_dataset("tinyshakespeare_char", str(ROOT / "data"))
    windows = data_lib.sample_windows(ds.split("train"), seq_len=c.model.context_len, batch=c.train.batch_size, num_batches=1, seed=0)
    return np.stack(list(windows))


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("arch,params", [
    ("ssm", ("dt_proj/kernel", "x_proj/kernel")),
    ("linformer", ("proj_k",)),
])
def test_scaled_float16_gradients_match_float32(arch, params):
    """At initialisation, on a Shakespeare batch (the tiny variant, 8 x 64 tokens): the gradients the
    optimizer gets in float16 with the loss scaled by 2**15 (train.loss_scale's dynamic start) are
    within 1% of float32's for the parameters whose gradients float16 loses without it (the SSM's
    dt_proj gets none at all, half its x_proj's entries flush to zero; Linformer's proj_k is 5% off),
    and every parameter's is within 1%."""
    one = jax.devices()[:1]
    c32, c16 = (llmjax.load_config(f"{ROOT}/configs/{arch}.py:tiny", {"model.dtype": d}) for d in ("float32", "float16"))
    s32, s16 = (build_steps(c, make_mesh(c.train.mesh, one)) for c in (c32, c16))
    assert "loss_scale" in s16.abstract_state and "loss_scale" not in s32.abstract_state  # (auto: dynamic in float16 only)
    tokens = shakespeare_batch(c32)
    p = s32.init_state()["params"]
    want = s32.gradients(p, tokens, None)[0]
    scaled = s16.gradients(p, tokens, jnp.float32(T.LOSS_SCALE_INIT))[0]
    unscaled = s16.gradients(p, tokens, None)[0]
    flat = {jax.tree_util.keystr(k, simple=True, separator="/"): v for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    got = dict(zip(flat, jax.tree.leaves(scaled)))
    lost = dict(zip(flat, jax.tree.leaves(unscaled)))
    for name in flat:
        assert rel_err(got[name], flat[name]) < 0.01, name
    for suffix in params:
        (name,) = [n for n in flat if n.endswith(suffix)]
        assert rel_err(got[name], flat[name]) < 0.005, name
        assert rel_err(lost[name], flat[name]) > 0.03, name  # (what scaling fixes)
    if arch == "ssm":
        dt = next(n for n in flat if n.endswith("dt_proj/kernel"))
        assert not np.any(np.asarray(lost[dt]))  # (all of it flushed to zero without scaling)


def test_dynamic_scale_rule_matches_a_plain_simulation(monkeypatch):
    """next_loss_scale against a plain-Python rule (PyTorch's GradScaler): halve (not below 1) and
    count a skip on an overflow, double after GROWTH_INTERVAL finite steps in a row."""
    monkeypatch.setattr(T, "LOSS_SCALE_GROWTH_INTERVAL", 3)
    rng = np.random.default_rng(0)
    pattern = list(rng.random(60) < 0.7) + [False] * 20  # (the tail drives the scale to the floor)
    ls, (scale, good, skipped) = T.initial_loss_scale(), (2.0**15, 0, 0)
    step = jax.jit(T.next_loss_scale)
    for finite in pattern:
        if finite:
            good += 1
            if good == 3:
                scale, good = scale * 2, 0
        else:
            scale, good, skipped = max(scale / 2, 1.0), 0, skipped + 1
        ls = step(ls, jnp.bool_(finite))
        assert (float(ls["scale"]), int(ls["good_steps"]), int(ls["skipped_steps"])) == (scale, good, skipped)
    assert scale == 1.0


def test_an_overflow_skips_its_step_and_the_scale_halves(monkeypatch):
    """A first scale of 2**22 overflows float16's backward: those steps change no parameter and no
    optimizer state (bit for bit), each halves the scale, and the first finite step gives the same
    state, bit for bit, as a run that started at the scale it reached (the skipped steps left no
    trace but the counters; the learning rate is the first step's). With gradient accumulation."""
    c = cfg("vanilla", model__dtype="float16", train__grad_accum_steps=2, train__batch_size=4)
    mesh = make_mesh(c.train.mesh, jax.devices()[:1])
    batch = shakespeare_batch(cfg("vanilla", train__batch_size=8)).reshape(2, 4, -1)
    monkeypatch.setattr(T, "LOSS_SCALE_INIT", 2.0**22)
    s = build_steps(c, mesh)
    state = s.init_state()
    start = jax.device_get(state)
    rows = []
    while True:
        before = jax.device_get(state)
        state, m = s.train_step(state, jax.device_put(batch, s.tok_shard))
        m = jax.device_get(m)
        rows.append(m)
        if not m["step_skipped"]:
            break
        after = jax.device_get(state)
        for part in ("params", "opt"):
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part])))
        assert float(after["loss_scale"]["scale"]) == float(before["loss_scale"]["scale"]) / 2
        assert int(after["step"]) == int(before["step"]) + 1  # (the batch is used up)
        assert np.isfinite(m["train_loss"]) and m["update_norm"] == 0
    k = len(rows) - 1
    assert 1 <= k <= 8 and [int(r["skipped_steps"]) for r in rows] == list(range(1, k + 1)) + [k]
    assert float(rows[-1]["loss_scale"]) == 2.0**22 / 2**k and np.isfinite(rows[-1]["grad_norm"])
    assert float(rows[-1]["lr"]) == float(rows[0]["lr"])
    got = jax.device_get(state)
    assert not np.array_equal(jax.tree.leaves(got["params"])[0], jax.tree.leaves(start["params"])[0])

    monkeypatch.setattr(T, "LOSS_SCALE_INIT", 2.0**22 / 2**k)
    s2 = build_steps(c, mesh)
    ref, m2 = s2.train_step(s2.init_state(), jax.device_put(batch, s2.tok_shard))
    ref = jax.device_get(ref)
    assert not m2["step_skipped"] and float(m2["train_loss"]) == float(rows[-1]["train_loss"])
    for part in ("params", "opt"):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ref[part]), jax.tree.leaves(got[part])))


def test_float16_dynamic_scaling_resumes_bit_identical_across_skipped_steps(tmp_path, monkeypatch):
    """A float16 run whose scale starts too high (2**21: steps 1-4 overflow and are skipped) and
    doubles every 3 finite steps: stopped at step 3, between skipped steps, and resumed, it gives the
    uninterrupted run's metrics (loss_scale and skipped_steps too) and final state, the scale's
    counters included, bit for bit. A float32 run's state is as it was before loss scaling existed."""
    monkeypatch.setattr(T, "LOSS_SCALE_INIT", 2.0**21)
    monkeypatch.setattr(T, "LOSS_SCALE_GROWTH_INTERVAL", 3)
    opts = dict(model__dtype="float16", train__grad_accum_steps=2)  # (on 8 devices: the overflow check is global)
    train(cfg("vanilla", **opts), tmp_path / "full", quiet=True)
    assert train(cfg("vanilla", train__stop_at_step=3, **opts), tmp_path / "split", quiet=True).step == 3
    assert train(cfg("vanilla", **opts), tmp_path / "split", quiet=True).step == 12
    full = figures(tmp_path / "full")
    assert full == figures(tmp_path / "split")  # bit-identical floats
    skipped = [m["skipped_steps"] for m in full]
    scales = [m["loss_scale"] for m in full]
    assert skipped[2] >= 3 and skipped[-1] > skipped[2] and len(set(scales)) >= 3  # (skipped, halved and doubled)
    assert all((m["grad_norm"] is None) == (m["skipped_steps"] > p) for m, p in zip(full, [0] + skipped))
    a, b = saved_state(tmp_path / "full", 12), saved_state(tmp_path / "split", 12)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    from llmjax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "full" / "checkpoints")
    assert ckpt.state_keys(12) == {"params", "opt", "rng", "step", "loss_scale"}
    ckpt.close()
    train(cfg("vanilla", train__max_steps=2), tmp_path / "f32", quiet=True)
    ckpt = Checkpointer(tmp_path / "f32" / "checkpoints")
    assert ckpt.state_keys(2) == {"params", "opt", "rng", "step"}
    ckpt.close()
    assert all("loss_scale" not in m and "skipped_steps" not in m for m in figures(tmp_path / "f32"))


def test_a_run_resumed_with_scaling_turned_on_or_off(tmp_path, capsys):
    """A float16 run from before train.loss_scale existed (no scaling; its config.json without the
    key) resumes with dynamic scaling starting at 2**15 (its checkpoint has no scale), and a float16
    run resumed in float32 (model.dtype may change) drops its scale; each says so in one line, and
    trains on. The key a run predates counts as what the run did (none)."""
    import json

    train(cfg("vanilla", model__dtype="float16", train__loss_scale="none", train__stop_at_step=3), tmp_path / "on", quiet=True)
    saved = tmp_path / "on" / "config.json"
    old = json.loads(saved.read_text())
    del old["train"]["loss_scale"]
    saved.write_text(json.dumps(old))
    assert train(cfg("vanilla", model__dtype="float16", train__stop_at_step=6), tmp_path / "on", quiet=False).step == 6
    out = capsys.readouterr().out
    assert "resuming with changed settings: train.loss_scale (none -> auto); train.stop_at_step (3 -> 6)" in out, out
    assert "dynamic loss scaling starts at step 4, at scale 32768: the run trained without it until then" in out
    rows = figures(tmp_path / "on")
    assert ["loss_scale" in m for m in rows] == [False] * 3 + [True] * 3 and rows[-1]["loss_scale"] == 32768.0

    train(cfg("vanilla", model__dtype="float16", train__stop_at_step=3), tmp_path / "off", quiet=True)
    assert train(cfg("vanilla", train__stop_at_step=6), tmp_path / "off", quiet=False).step == 6
    out = capsys.readouterr().out
    assert re.search(r"dynamic loss scaling is off from step 4 \(train.loss_scale=auto, model.dtype=float32\); "
                     r"the run had it, at scale 32768 after 0 skipped step\(s\)", out), out
    from llmjax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "off" / "checkpoints")
    assert ckpt.state_keys(6) == {"params", "opt", "rng", "step"}
    ckpt.close()
    assert np.isfinite(losses(tmp_path / "off")[6])


def test_a_static_scale_that_overflows_and_an_overflow_at_the_least_scale_stop_in_one_line(tmp_path, monkeypatch):
    """A static scale is used as it is: an overflow stops the run (the NaN guard) with what to do.
    Dynamic scaling that overflows at its least scale (1: no scaling) stops too, rather than skip
    every step."""
    with pytest.raises(TrainingError, match=r"^loss became non-finite at step 1 \(.*\) \(float16 gradients overflowed the static "
                                            r"train.loss_scale=1e\+30: a smaller one, or train.loss_scale=dynamic, keeps them finite\); "
                                            r"stopped. No checkpoint was written$"):
        train(cfg("vanilla", model__dtype="float16", train__loss_scale="1e30"), tmp_path / "static", quiet=True)
    monkeypatch.setattr(T, "LOSS_SCALE_INIT", 2.0**26)
    monkeypatch.setattr(T, "LOSS_SCALE_MIN", 2.0**25)  # (an overflow at the least scale, without a model that overflows at 1)
    with pytest.raises(TrainingError, match=r"^the gradients of step 2 overflowed float16 at loss scale 3.35544e\+07, dynamic "
                                            r"scaling's least .* Train it with model.dtype=bfloat16 or float32. No checkpoint"):
        train(cfg("vanilla", model__dtype="float16"), tmp_path / "least", quiet=True)


@pytest.mark.parametrize("value,message", [
    ("dynamc", r"train.loss_scale='dynamc' is not one of auto, dynamic, none or a positive number \(a static scale, e.g. 1024\) "
               r"\(did you mean 'dynamic'\?\)$"),
    ("0", r"train.loss_scale='0' is not one of auto, dynamic, none or a positive number"),
    ("-8", r"train.loss_scale='-8' is not one of"),
    ("inf", r"train.loss_scale='inf' is not one of"),
    ("nan", r"train.loss_scale='nan' is not one of"),
    (-2.0, r"train.loss_scale='-2.0' is not one of"),  # (a number, from Python)
    ("1e39", r"train.loss_scale='1e39' is outside what float32 holds"),  # (inf in the float32 step)
    ("1e-50", r"train.loss_scale='1e-50' is outside what float32 holds"),  # (0 there)
])
def test_bad_loss_scales_are_one_line(value, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"train.loss_scale": value})
    for good, want in (("auto", None), ("none", None), ("Dynamic", "dynamic"), ("1024", 1024.0), (" 65536.0 ", 65536.0), (512, 512.0)):
        c = llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"train.loss_scale": good})
        assert T.loss_scaling(llmjax.model_config(c), c.train) == want


def test_bad_loss_scale_on_the_command_line_is_one_line(tmp_path):
    r = subprocess.run(_train_cmd(tmp_path / "run", "--config.train.loss_scale=-1"), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: train.loss_scale='-1' is not one of auto, dynamic, none or a positive number (a static scale, e.g. 1024)"], r.stderr
    assert not (tmp_path / "run").exists()


def test_the_logged_learning_rate_is_the_optimizers_after_scaling_is_turned_off(tmp_path, monkeypatch):
    """A float16 run whose first steps overflow (2**21: steps 1-4 skipped, so its optimizer has taken
    2 steps by step 6), resumed in float32 (scaling off): each step's logged `lr` is the one the
    optimizer applies, schedule(updates applied before it), against that count read from the
    checkpoint and recomputed from the rows. It was schedule(step - 1) after the resume: 2.07e-3 at
    step 7 where the optimizer applied 3e-3."""
    from llmjax.checkpoint import Checkpointer

    monkeypatch.setattr(T, "LOSS_SCALE_INIT", 2.0**21)
    train(cfg("vanilla", model__dtype="float16", train__stop_at_step=6), tmp_path / "r", quiet=True)
    ckpt = Checkpointer(tmp_path / "r" / "checkpoints")
    opt = ckpt.restore(6, None)[0]["opt"]
    ckpt.close()
    counts = [int(np.asarray(x)) for x in jax.tree.leaves(opt) if np.ndim(x) == 0]  # (adam's and the schedule's counts)
    train(cfg("vanilla"), tmp_path / "r", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    skipped = rows[5]["skipped_steps"]
    assert skipped >= 1 and counts == [6 - skipped] * 2
    schedule = T.make_optimizer(cfg("vanilla").train)[1]
    applied = 0  # (updates before each step: a skipped step applies none)
    for m in rows:
        assert m["lr"] == pytest.approx(float(schedule(applied)), rel=1e-6), m["step"]
        applied += m["grad_norm"] is not None
    assert applied == 12 - skipped


def test_a_resume_whose_steps_were_skipped_says_the_jump_the_optimizer_takes(tmp_path, monkeypatch, capsys):
    """A float16 run whose first steps overflow (2**21: steps 1-4 skipped, so its optimizer has taken
    2 updates by step 6), resumed with a longer warm-up: the notice's rates are the schedules' at the
    updates applied, the old settings' and the one the optimizer applies at step 7 (its logged `lr`).
    They were read at step 6, as if no step had been skipped: 'jumps from 0.002067 to 0.003', a rise,
    where the optimizer went from 0.003 to 0.001286."""
    monkeypatch.setattr(T, "LOSS_SCALE_INIT", 2.0**21)
    train(cfg("vanilla", model__dtype="float16", train__stop_at_step=6), tmp_path / "r", quiet=True)
    capsys.readouterr()
    train(cfg("vanilla", model__dtype="float16", train__warmup_steps=6), tmp_path / "r", quiet=False)
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    applied = sum(m["grad_norm"] is not None for m in rows[:6])
    assert rows[5]["skipped_steps"] == 6 - applied >= 1
    old, new = (float(T.lr_schedule(cfg("vanilla", train__warmup_steps=w).train)(applied)) for w in (2, 6))
    assert rows[6]["lr"] == pytest.approx(new, rel=1e-6) and not math.isclose(old, new)
    assert f"the learning rate jumps from {old:.4g} to {new:.4g} at step 7\n" in out, out


def test_a_wsd_decay_moved_before_a_resume_with_skipped_steps_is_said_in_updates():
    """The wsd decay's first step is a position of the schedule, which counts the optimizer's
    updates: with steps skipped it is not the run's step. 'the wsd decay now began at step 5, before
    the resumed step 12' named run step 5 (skipped) for the 5th update, made at run step 12."""
    old = {**cfg("vanilla").train.to_dict(), "schedule": "wsd", "decay_fraction": 0.25, "warmup_steps": 2, "max_steps": 14}
    new = cfg("vanilla", train__schedule="wsd", train__decay_fraction=0.75, train__warmup_steps=2, train__max_steps=14).train
    begin = 14 - round(0.75 * 14) + 1  # 4
    rates = [float(T.lr_schedule(t)(5)) for t in (T.ml_collections.ConfigDict(old), new)]
    rate = f"the learning rate jumps from {rates[0]:.4g} to {rates[1]:.4g} at step 13"
    assert T.schedule_jump(old, new, 12, 5) == (f"the wsd decay now began at the optimizer's update {begin}, before the 5 it has made by "
                                                f"the resumed step 12 (7 skipped by loss scaling), so {rate}")
    rates = [float(T.lr_schedule(t)(12)) for t in (T.ml_collections.ConfigDict(old), new)]
    assert T.schedule_jump(old, new, 12, 12) == (f"the wsd decay now began at step {begin}, before the resumed step 12, so the learning rate "
                                                 f"jumps from {rates[0]:.4g} to {rates[1]:.4g} at step 13")


def test_the_loss_scale_constants_are_the_readmes():
    """README (train.loss_scale): the scale starts at 2**15, is halved not below 1, and 2000 finite
    steps in a row double it (the rule's test shortens the interval, so only this pins it)."""
    assert (T.LOSS_SCALE_INIT, T.LOSS_SCALE_MIN, T.LOSS_SCALE_GROWTH_INTERVAL) == (2.0**15, 1.0, 2000)


@pytest.mark.parametrize("where", ["middle", "last"])
def test_a_non_finite_gradient_in_any_parameter_skips_the_step(monkeypatch, where):
    """Dynamic scaling skips a step whose gradients hold an inf 'anywhere' (README): here one entry of
    one parameter's gradient (not the first parameter's) is made inf after the backward pass; the
    step is skipped, no parameter or optimizer state moves and the scale halves."""
    real = jax.value_and_grad

    def poisoned(f, **kw):
        g = real(f, **kw)

        def h(*args):
            out, grads = g(*args)
            leaves, tree = jax.tree.flatten(grads)
            k = len(leaves) // 2 if where == "middle" else len(leaves) - 1
            leaves[k] = leaves[k].at[(0,) * leaves[k].ndim].set(jnp.inf)
            return out, jax.tree.unflatten(tree, leaves)

        return h

    monkeypatch.setattr(jax, "value_and_grad", poisoned)
    c = cfg("vanilla", train__loss_scale="dynamic")  # (float32: the scale is exact, the inf is ours alone)
    s = build_steps(c, make_mesh(c.train.mesh, jax.devices()[:1]))
    state = s.init_state()
    before = jax.device_get(state)
    state, m = s.train_step(state, jax.device_put(shakespeare_batch(c), s.tok_shard))
    after, m = jax.device_get((state, m))
    assert bool(m["step_skipped"]) and int(m["skipped_steps"]) == 1 and float(m["update_norm"]) == 0
    for part in ("params", "opt"):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part]))), part
    assert float(after["loss_scale"]["scale"]) == T.LOSS_SCALE_INIT / 2
