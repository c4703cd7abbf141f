"""The Mixture-of-Experts layer against a per-token reference, its capacity mode, and its
auxiliary losses and statistics in the trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmjax
import llmjax.models  # noqa: F401
from conftest import ROOT
from helpers import config
from llmjax.models.moe import MoEFeedForward


def _layer(**opts):
    return MoEFeedForward(llmjax.model_config(config("moe", **opts)), rngs=nnx.Rngs(3))


def _reference(layer, x):
    """Each token through its top-k experts one by one, float64."""
    _, _, gates, experts = layer.route(x)
    w_in, b_in = np.asarray(layer.w_in[...], np.float64), np.asarray(layer.b_in[...], np.float64)
    w_out, b_out = np.asarray(layer.w_out[...], np.float64), np.asarray(layer.b_out[...], np.float64)
    xs, g, e = np.asarray(x, np.float64), np.asarray(gates, np.float64), np.asarray(experts)
    out = np.zeros_like(xs)
    for b in range(xs.shape[0]):
        for t in range(xs.shape[1]):
            for j in range(e.shape[2]):
                k = e[b, t, j]
                h = xs[b, t] @ w_in[k] + b_in[k]
                h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
                out[b, t] += g[b, t, j] * (h @ w_out[k] + b_out[k])
    return out


def test_dropless_matches_a_per_token_reference():
    layer = _layer()
    x = jax.random.normal(jax.random.key(0), (2, 9, 64))
    y, aux = layer(x)
    np.testing.assert_allclose(y, _reference(layer, x), atol=1e-5, rtol=1e-4)
    assert float(aux["stats"]["dropped"]) == 0.0
    np.testing.assert_allclose(float(aux["stats"]["expert_load"].sum()), 1.0, rtol=1e-6)


def test_capacity_mode_without_drops_equals_dropless_and_drops_latest_first():
    x = jax.random.normal(jax.random.key(1), (2, 16, 64))
    dropless, _ = _layer()(x)
    roomy, aux = _layer(moe_mode="capacity", capacity_factor=8.0)(x)
    np.testing.assert_allclose(roomy, dropless, atol=1e-5, rtol=1e-5)
    assert float(aux["stats"]["dropped"]) == 0.0
    tight = _layer(moe_mode="capacity", capacity_factor=0.5)
    y, aux = tight(x)
    assert 0.0 < float(aux["stats"]["dropped"]) < 1.0
    # Slots go by position: an expert's kept assignments are its earliest ones in each row.
    _, _, gates, experts = tight.route(x)
    _, kept = tight._capacity(x, gates, experts)
    C = int(np.ceil(0.5 * 16 * 2 / 4))
    for b in range(2):
        for e in range(4):
            hits = [bool(k) for t in range(16) for j in range(2) if int(experts[b, t, j]) == e for k in [kept[b, t, j]]]
            assert hits == [True] * min(C, len(hits)) + [False] * max(0, len(hits) - C)


def test_balanced_router_gives_load_balance_one():
    layer = _layer()
    layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])  # uniform probabilities
    x = jax.random.normal(jax.random.key(2), (4, 32, 64))
    _, aux = layer(x)
    # P_e = 1/E for every e, so E * sum f_e P_e = sum f_e = 1 whatever the (tie-broken) choices
    np.testing.assert_allclose(float(aux["load_balance"]), 1.0, rtol=1e-5)


def test_trainer_logs_router_losses_and_expert_load(tmp_path):
    from llmjax.train import train

    over = {"train.max_steps": 4, "train.batch_size": 4, "eval.sample_tokens": 0, "eval.num_batches": 1,
            "logging.progress_bar": False, "model.context_len": 32, "model.moe_mode": "capacity", "model.capacity_factor": 1.0}
    run = train(llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", over), tmp_path / "run", devices=jax.devices()[:1], quiet=True)
    last = run.metrics[-1]
    assert {"aux_load_balance", "aux_router_z", "stat_dropped", "stat_expert_load"} <= set(last)
    assert len(last["stat_expert_load"]) == 4 and abs(sum(last["stat_expert_load"]) - 1) < 1e-5
    assert 0.0 <= last["stat_dropped"] < 1.0


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
def test_expert_parallel_training_matches_one_device(mode, tmp_path):
    """Experts sharded over an `expert` mesh axis of 4 fake CPU devices give the losses of one device."""
    from llmjax.sharding import make_mesh, param_shardings
    from llmjax.train import train

    over = {"train.max_steps": 6, "train.batch_size": 8, "eval.sample_tokens": 0, "eval.num_batches": 1,
            "eval.every_steps": 0, "logging.progress_bar": False, "model.context_len": 32,
            "model.moe_mode": mode, "model.capacity_factor": 1.0}
    one = train(llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", over), tmp_path / "one", devices=jax.devices()[:1], quiet=True)
    ep = {**over, "train.mesh.data": 1, "train.mesh.expert": 4}
    cfg = llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", ep)
    four = train(cfg, tmp_path / "four", devices=jax.devices()[:4], quiet=True)
    a = [m["train_loss"] for m in one.metrics]
    b = [m["train_loss"] for m in four.metrics]
    np.testing.assert_allclose(b, a, rtol=2e-5)
    assert [m["stat_dropped"] for m in four.metrics] == pytest.approx([m["stat_dropped"] for m in one.metrics], abs=1e-6)
    # and the experts really are split: each device holds one of the 4 experts
    shardings = param_shardings(nnx.to_pure_dict(nnx.state(llmjax.build_model(cfg), nnx.Param)), make_mesh(cfg.train.mesh, jax.devices()[:4]))
    assert shardings["blocks"]["layers"]["mlp"]["w_in"].spec[1] == "expert"


def test_capacity_mode_exchanges_tokens_with_all_to_all():
    """Under a mesh with an expert axis the capacity-mode layer sends buffers to the experts' devices
    (two all-to-alls), and computes what one device computes."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llmjax.sharding import make_mesh, param_shardings

    layer = _layer(moe_mode="capacity", capacity_factor=1.0)
    graphdef, state = nnx.split(layer)
    pure = nnx.to_pure_dict(state)
    x = jax.random.normal(jax.random.key(4), (8, 16, 64))
    want = layer(x)[0]
    mesh = make_mesh({"data": 1, "fsdp": 1, "expert": 4}, jax.devices()[:4])
    shardings = param_shardings({"blocks": {"layers": {0: {"mlp": pure}}}}, mesh)["blocks"]["layers"][0]["mlp"]
    with jax.set_mesh(mesh):
        f = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0], in_shardings=(shardings, NamedSharding(mesh, P(("data", "fsdp", "expert")))))
        hlo = f.lower(pure, x).compile().as_text()
        got = f(pure, x)
    assert hlo.count("all-to-all") >= 2
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
