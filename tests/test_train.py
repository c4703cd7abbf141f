"""The trainer: loss falls for every architecture, exact resume, sharding, processes, signals and the
one-line errors for bad input."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest

import llmjax
import llmjax.models  # noqa: F401
from conftest import ROOT, TEST_XLA_FLAGS
from jax.sharding import PartitionSpec as P
from llmjax.config import ConfigError
from llmjax.train import TrainingError, train

TINY = {
    "train.max_steps": 12,
    "train.batch_size": 8,
    "train.lr": 3e-3,
    "train.min_lr": 3e-4,
    "train.warmup_steps": 2,
    "train.checkpoint_every_steps": 5,
    "eval.every_steps": 4,
    "eval.num_batches": 2,
    "eval.sample_tokens": 0,
    "logging.progress_bar": False,
    "model.context_len": 32,
}


def cfg(arch="vanilla", **overrides):
    over = dict(TINY)
    over.update({k.replace("__", "."): v for k, v in overrides.items()})
    return llmjax.load_config(f"{ROOT}/configs/{arch}.py:tiny", over)


def losses(run_or_dir, key="train_loss"):
    if hasattr(run_or_dir, "metrics"):
        rows = run_or_dir.metrics
    else:
        rows = [json.loads(line) for line in (run_or_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m[key] for m in rows if key in m}


@pytest.mark.parametrize("arch", sorted(llmjax.ARCHS))
def test_loss_falls_for_every_architecture(arch, tmp_path):
    run = train(cfg(arch, train__max_steps=40, eval__every_steps=0), tmp_path / "run", quiet=True)
    tl = losses(run)
    assert sorted(tl) == list(range(1, 41))
    first, last = np.mean([tl[s] for s in (1, 2, 3)]), np.mean([tl[s] for s in (38, 39, 40)])
    assert first > 3.9 and last < first - 0.8, (first, last)
    assert run.final and run.last_val_loss is not None and run.last_val_loss < first - 0.6
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "checkpoints"} <= files
    assert json.loads((tmp_path / "run" / "tokenizer.json").read_text())["kind"] == "char"


@pytest.mark.parametrize("arch", sorted(llmjax.ARCHS))
def test_weight_decay_reaches_every_matrix(arch):
    """AdamW's decay, by the parameter's name: every parameter's name is in config.DECAYED (the
    default train.decay_params) or config.NOT_DECAYED (a new name fails here until decided), the only matrices left undecayed are
    biases and the SSM's A_log, and one update with zero gradients moves exactly the decayed ones.
    (The MoE's expert matrices and Linformer's projections went undecayed: only `kernel` and
    `embedding` were.)"""
    from flax import nnx

    from llmjax.config import DECAYED, NOT_DECAYED
    from llmjax.train import make_optimizer

    c = cfg(arch, model__scan_layers=False, train__weight_decay=0.5, train__lr=0.1, train__warmup_steps=0, train__grad_clip=0.0)
    if arch == "ssm":
        c.model.d_conv = 4
    params = nnx.to_pure_dict(nnx.state(llmjax.build_model(llmjax.model_config(c), seed=0), nnx.Param))
    leaves = [(jax.tree_util.keystr(p), p[-1].key, a) for p, a in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert {name for _, name, _ in leaves} <= set(DECAYED) | set(NOT_DECAYED), {name for _, name, _ in leaves} - set(DECAYED) - set(NOT_DECAYED)
    assert {name for _, name, a in leaves if a.ndim >= 2 and name not in DECAYED} <= {"b_in", "b_out", "A_log"}
    tx, _ = make_optimizer(c.train)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for (path, name, a), u in zip(leaves, jax.tree.leaves(updates)):
        moved = bool(jnp.any(u != 0)) if jnp.any(a != 0) else name in DECAYED  # (a zero array stays zero)
        assert moved == (name in DECAYED), (path, name)
    assert arch != "moe" or any(name == "w_in" for _, name, _ in leaves)
    # train.decay_params chooses (the rule before 2026-12-06: kernel and embedding only)
    c.train.decay_params = "kernel,embedding"
    tx, _ = make_optimizer(c.train)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for (path, name, a), u in zip(leaves, jax.tree.leaves(updates)):
        assert bool(jnp.any(u != 0)) == (name in ("kernel", "embedding")), (path, name)
    with pytest.raises(ConfigError, match=r"^train.decay_params: unknown parameter name 'kernal' \(did you mean 'kernel'\?\)"):
        llmjax.load_config(f"{ROOT}/configs/{arch}.py:tiny", {"train.decay_params": "kernal,embedding"})


def test_the_end_of_run_sample(tmp_path):
    """A finished run samples `eval.sample_tokens` tokens from its final parameters (fetched to the
    host, as the trainer has them) and returns the text."""
    run = train(cfg("vanilla", train__max_steps=4, eval__every_steps=0, eval__sample_tokens=12), tmp_path / "run", quiet=True)
    assert run.final and isinstance(run.sample, str) and 0 < len(run.sample) <= 12
    # the first step's metrics are read alone (its time holds the compilation); the next steps'
    # as one block (one time per step: the block's average)
    times = [m["step_time"] for m in run.metrics]
    assert len(times) == 4 and times[0] != times[1] and times[1] == times[2] == times[3]


def test_an_end_of_run_sample_from_non_finite_logits_is_a_warning_not_text(tmp_path, monkeypatch, capsys):
    """A finished run whose model gives non-finite logits (a float16 forward that overflowed; here
    NaN position embeddings from position 2 on, put in by the sampler's caller) printed text drawn
    from NaN logits; the sampler's one-line error would now end a run whose work is saved: a
    warning, and no sample."""
    from llmjax import train as T

    def nan_positions(model, *args, **kw):
        model.pos_embed.embedding.set_value(jnp.asarray(model.pos_embed.embedding[...]).at[2:].set(jnp.nan))
        return generate(model, *args, **kw)

    generate = T.generate
    monkeypatch.setattr(T, "generate", nan_positions)
    run = train(cfg("vanilla", train__max_steps=2, eval__every_steps=0, eval__sample_tokens=12), tmp_path / "run", quiet=False)
    assert run.final and run.sample is None and (tmp_path / "run" / "checkpoints" / "2").is_dir()
    out, err = capsys.readouterr()
    # (its 2 steps are its 2 warm-up steps: said, test_a_run_that_is_all_warm_up_says_so)
    assert "note: train.warmup_steps=2 is not below train.max_steps=2: the whole run is warm-up, its last step at learning rate 0.002, " in out
    assert "warning: no end-of-run sample: the model's logits were not finite (NaN or inf) for 1 of 1 rows" in err, err


TIMING = ("step_time", "tokens_per_sec", "mfu", "peak_memory_bytes")


def figures(path) -> list[dict]:
    """Every metrics line of a run but its timing."""
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING} for m in rows]


def saved_state(path, step):
    """The whole training state of checkpoint `step` (parameters, optimizer moments, step, key)."""
    from llmjax.checkpoint import Checkpointer

    ckpt = Checkpointer(path / "checkpoints")
    state = ckpt.restore(step, None)[0]
    ckpt.close()
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x) for x in jax.tree.leaves(state)]


@pytest.mark.parametrize(
    "arch,opts",
    # (on the 8 fake devices; wsd's decay starts at step 7, the first resumed step)
    [("vanilla", {"train__grad_accum_steps": 2, "train.mesh.fsdp": 2, "train__schedule": "wsd", "train__decay_fraction": 0.5}),
     ("mla", {"model__scan_layers": False, "model__matmul_dtype": "bfloat16", "train__schedule": "constant"}),
     ("moe", {"model__moe_mode": "capacity", "model__capacity_factor": 0.5, "train__loss_chunks": 2}),
     ("ssm", {"train__grad_accum_steps": 2, "model__scan_layers": False, "train__logits_dtype": "bfloat16"}),
     ("linformer", {}),
     # (each of the 8 devices sorts its 32 rows into blocks of 8; Switch's gate; router losses per micro-batch)
     ("moe", {"model__moe_impl": "blocked", "model__top_k": 1, "train__grad_accum_steps": 2})],
    ids=["vanilla-accum2-fsdp2-wsd", "mla-unrolled-bf16_matmuls-constant", "moe-capacity-loss_chunks", "ssm-accum2-unrolled-bf16_logits",
         "linformer", "moe-blocked-top1-accum2"],
)
def test_exact_resume_is_bit_identical(arch, opts, tmp_path):
    """A 12-step run, and the same command stopped at step 6 then run again on the same workdir,
    give bit-identical metrics for every step (losses, validation losses, gradient norms, learning
    rates, a MoE's router losses and statistics: everything but timing) and a bit-identical final
    state (parameters, optimizer moments). With the train options that change the step or the
    schedule (data x FSDP mesh, wsd and constant schedules, bfloat16 matmul operands and logits), and
    the MoE's two modes (capacity; dropless in sorted blocks, top-1 with router losses per micro-batch)."""
    full = train(cfg(arch, **opts), tmp_path / "full", quiet=True)
    first = train(cfg(arch, train__stop_at_step=6, **opts), tmp_path / "split", quiet=True)
    assert first.step == 6 and not first.final
    second = train(cfg(arch, **opts), tmp_path / "split", quiet=True)
    assert second.final and second.step == 12
    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(b) == list(range(1, 13))
    assert a == b  # bit-identical floats
    assert losses(tmp_path / "full", "val_loss") == losses(tmp_path / "split", "val_loss")
    assert figures(tmp_path / "full") == figures(tmp_path / "split")
    if arch == "moe":
        capacity = opts.get("model__moe_mode") == "capacity"
        assert all("aux_load_balance" in m and (m["stat_dropped"] > 0) == capacity for m in figures(tmp_path / "full"))
    full_state, split_state = saved_state(tmp_path / "full", 12), saved_state(tmp_path / "split", 12)
    assert len(full_state) == len(split_state) and all(np.array_equal(x, y) for x, y in zip(full_state, split_state))
    # the checkpoints' metric for `--which=best` is the periodic estimate at every step, the last
    # too (not the whole split's loss there, which no earlier checkpoint has)
    from llmjax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path / "full" / "checkpoints")
    est = {**losses(tmp_path / "full", "val_loss"), **losses(tmp_path / "full", "val_loss_estimate")}
    assert {s: ckpt.manager.metrics(s)["val_loss"] for s in (8, 12)} == {8: est[8], 12: est[12]}
    assert ckpt.restore(12, None)[1]["val_loss"] == losses(tmp_path / "full", "val_loss")[12]  # (the whole split's)
    ckpt.close()
    assert full.metrics[-1]["lr"] == second.metrics[-1]["lr"]


def tiny_sharded_dataset(data_dir, name="tiny_shards"):
    """A character dataset of three training shards holding 10, 12 and 10 windows of TINY's context
    (32 windows: an epoch is 4 steps of 8, and 2.67 steps of 12) and one validation shard."""
    from llmjax import data as D

    chars = D.open_dataset("tinyshakespeare_char", "unused")
    text = np.asarray(chars.split("train")[0][:1000])
    out = data_dir / name
    out.mkdir(parents=True)
    train_shards = [D.write_shard(out / f"train_{i:04d}.bin", text[a:b]) for i, (a, b) in enumerate([(0, 42), (42, 86), (86, 128)])]
    D.write_manifest(out, name, chars.manifest["tokenizer"], {"train": train_shards, "val": [D.write_shard(out / "val_0000.bin", text[600:1000])]})


@pytest.mark.parametrize("arch,crash_after,opts", [
    ("modern", 4, {"model__dtype": "bfloat16", "model__remat": "full", "model__scan_layers": False}),
    ("moe", 5, {"model__moe_mode": "dropless", "train__batch_size": 6, "train__grad_accum_steps": 2, "train.mesh.expert": 2}),
], ids=["modern-bf16-remat-unrolled-at-epoch-end", "moe-dropless-accum2-expert2-mid-epoch"])
def test_a_crash_resumes_bit_identical_from_an_earlier_checkpoint(arch, crash_after, opts, tmp_path, monkeypatch):
    """A run that died after step 12 with only its checkpoints up to `crash_after` on disk (the later
    ones' writes lost, metrics.jsonl holding rows past it): run again, it restores a mid-run
    checkpoint (saved asynchronously while later steps ran and read the data) and gives the same
    metrics rows, once each, the same final state and the same checkpoints kept as the run that never
    stopped. On a dataset of several shards whose epochs end every few steps: at a checkpoint, or
    inside a batch."""
    import shutil

    data = tmp_path / "data"
    tiny_sharded_dataset(data)
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(data))
    c = cfg(arch, data__dataset="tiny_shards", train__keep_checkpoints=10, **opts)
    two = jax.devices()[:2]
    full = train(c, tmp_path / "full", devices=two, quiet=True)
    shutil.copytree(tmp_path / "full", tmp_path / "crashed", ignore=shutil.ignore_patterns(*(str(s) for s in range(crash_after + 1, 13))))
    ckpts = [sorted(int(p.name) for p in (tmp_path / d / "checkpoints").iterdir() if p.name.isdigit()) for d in ("full", "crashed")]
    assert ckpts == [[4, 5, 8, 10, 12], [s for s in (4, 5) if s <= crash_after]]
    resumed = train(c, tmp_path / "crashed", devices=two, quiet=True)
    assert resumed.step == 12
    assert [m["step"] for m in figures(tmp_path / "crashed")] == list(range(1, 13))
    assert figures(tmp_path / "full") == figures(tmp_path / "crashed")  # bit-identical floats
    assert resumed.last_val_loss == full.last_val_loss
    full_state, resumed_state = saved_state(tmp_path / "full", 12), saved_state(tmp_path / "crashed", 12)
    assert len(full_state) == len(resumed_state) and all(np.array_equal(x, y) for x, y in zip(full_state, resumed_state))
    assert sorted(int(p.name) for p in (tmp_path / "crashed" / "checkpoints").iterdir() if p.name.isdigit()) == ckpts[0]


def test_resume_onto_another_device_count_and_layout(tmp_path):
    """Stop on one device; resume on 8 fake devices with FSDP and the other layer layout."""
    full = losses(train(cfg("modern"), tmp_path / "full", devices=jax.devices()[:1], quiet=True))
    train(cfg("modern", train__stop_at_step=6), tmp_path / "split", devices=jax.devices()[:1], quiet=True)
    resumed = train(
        cfg("modern", model__scan_layers=False, **{"train.mesh.data": 2, "train.mesh.fsdp": 4}),
        tmp_path / "split",
        devices=jax.devices()[:8],
        quiet=True,
    )
    assert resumed.step == 12
    got = losses(tmp_path / "split")
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [full[s] for s in range(1, 13)], rtol=2e-5)


def split_run_without_key(tmp_path, arch: str, key: str, before, after) -> tuple[dict, dict]:
    """(losses of an uninterrupted 12-step run with model.`key`=before, losses of one stopped at step
    6 with it, its config.json then written as before `key` existed, resumed with `key`=after). On one device."""
    one = jax.devices()[:1]
    full = losses(train(cfg(arch, **{f"model__{key}": before}), tmp_path / "full", devices=one, quiet=True))
    train(cfg(arch, **{f"model__{key}": before}, train__stop_at_step=6), tmp_path / "split", devices=one, quiet=True)
    saved = tmp_path / "split" / "config.json"
    old = json.loads(saved.read_text())
    del old["model"][key]
    saved.write_text(json.dumps(old))
    assert train(cfg(arch, **{f"model__{key}": after}), tmp_path / "split", devices=one, quiet=True).step == 12
    return full, losses(tmp_path / "split")


@pytest.mark.parametrize("key", ["decode_attention_impl", "decode_norm_impl"])
def test_a_run_from_before_a_decode_kernel_key_resumes(tmp_path, key):
    """model.decode_attention_impl and decode_norm_impl change decoding only: a run whose config.json
    predates the key resumes with it set, bit for bit as the uninterrupted run."""
    full, got = split_run_without_key(tmp_path, "vanilla", key, "auto", "xla")
    assert [got[s] for s in range(1, 13)] == [full[s] for s in range(1, 13)]


def test_an_ssm_run_resumes_with_the_other_scan(tmp_path):
    """model.scan_impl changes how the SSM runs, not its parameters: a run stopped with XLA's scan
    (its config.json written before the key existed) resumes with the fused kernel, within float32
    rounding of the uninterrupted run."""
    full, got = split_run_without_key(tmp_path, "ssm", "scan_impl", "xla", "pallas")
    np.testing.assert_allclose([got[s] for s in range(1, 13)], [full[s] for s in range(1, 13)], rtol=1e-4)


def test_an_ssm_run_from_before_the_convolution_resumes_and_samples_as_it_was(tmp_path):
    """A run saved before model.d_conv existed (its config.json without the key) is the S6 layer
    alone: it resumes bit for bit with d_conv=0 and samples, and the new default (Mamba's width 4, a
    different model) is refused in one line that names the key."""
    full, got = split_run_without_key(tmp_path, "ssm", "d_conv", 0, 0)
    assert [got[s] for s in range(1, 13)] == [full[s] for s in range(1, 13)]
    saved = tmp_path / "split" / "config.json"
    old = json.loads(saved.read_text())
    del old["model"]["d_conv"]
    saved.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"a different model config: model\.d_conv \(0 -> 4\); use another --workdir"):
        train(cfg("ssm", train__max_steps=14), tmp_path / "split", devices=jax.devices()[:1], quiet=True)
    from llmjax import sample

    loaded = sample.load(tmp_path / "split")
    assert loaded.model.cfg.d_conv == 0 and loaded.step == 12
    assert len(loaded.generate_text(["ab"], 4, sampling=sample.Sampling(greedy=True))[0]) == 4
    # a config without the optional key (a hand-built ConfigDict) is the same model: it resumes, and
    # the config.json it writes (without the key) resumes with it again
    handmade = cfg("ssm", train__max_steps=14)
    with handmade.unlocked():
        del handmade.model["d_conv"]
    assert train(handmade, tmp_path / "split", devices=jax.devices()[:1], quiet=True).step == 14
    assert "d_conv" not in json.loads(saved.read_text())["model"]
    handmade.train.max_steps = 15
    assert train(handmade, tmp_path / "split", devices=jax.devices()[:1], quiet=True).step == 15


@pytest.mark.parametrize("matmul_dtype", ["", "bfloat16"])
def test_eight_fsdp_devices_match_one(tmp_path, matmul_dtype):
    """Same losses on 8 devices (data 2 x FSDP 4) as on one: within float32 rounding, or within
    bfloat16 rounding with bfloat16 matmul operands (a sum split across devices may round an operand
    the other way)."""
    c = dict(model__matmul_dtype=matmul_dtype)
    one = losses(train(cfg("gqa", **c), tmp_path / "one", devices=jax.devices()[:1], quiet=True))
    eight = losses(
        train(cfg("gqa", **c, **{"train.mesh.data": 2, "train.mesh.fsdp": 4}), tmp_path / "eight", devices=jax.devices()[:8], quiet=True)
    )
    np.testing.assert_allclose([eight[s] for s in range(1, 13)], [one[s] for s in range(1, 13)], rtol=5e-4 if matmul_dtype else 2e-5)


def test_fsdp_shards_parameters_along_embed():
    from llmjax.sharding import make_mesh, param_shardings

    mesh = make_mesh({"data": 2, "fsdp": 4}, jax.devices()[:8])
    m = llmjax.build_model(cfg("vanilla"))
    from flax import nnx

    sh = param_shardings(nnx.to_pure_dict(nnx.state(m, nnx.Param)), mesh)
    assert sh["embed"]["embedding"].spec == P(None, "fsdp")
    assert sh["blocks"]["layers"]["attn"]["qkv_proj"]["kernel"].spec == P(None, "fsdp", None)
    assert sh["blocks"]["layers"]["mlp"]["proj"]["kernel"].spec == P(None, None, "fsdp")
    assert sh["blocks"]["layers"]["attn"]["qkv_proj"]["bias"].spec == P(None, None)
    with pytest.raises(ConfigError, match="needs 6 devices, there are 8"):
        make_mesh({"data": 3, "fsdp": 2}, jax.devices()[:8])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _train_cmd(workdir, *extra, config="configs/vanilla.py:tiny"):
    args = [sys.executable, "-m", "llmjax.train", "--config", config, "--workdir", str(workdir)]
    args += [f"--config.{k}={v}" for k, v in TINY.items()]
    return args + list(extra)


def _two_processes(workdir, extra=lambda i: [], env=lambda i: {}, timeout=300, config=lambda i: "configs/vanilla.py:tiny",
                   python=lambda i: ["-m", "llmjax.train"]):
    """Start the tiny run as processes 0 and 1 of a jax.distributed run on localhost (`workdir`,
    `extra` flags, `env` variables, `config` and `python`'s arguments before the flags per process)
    and wait: their exit codes and stderr lines (Gloo's own lines left out)."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, *python(i), *_train_cmd(workdir(i), f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                                     f"--process_id={i}", *extra(i), config=config(i))[3:]],
            cwd=ROOT, env=_env(**env(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], [[line for line in e.splitlines() if "Gloo" not in line] for e in errs]


def test_two_processes_train_together(tmp_path):
    """jax.distributed on localhost: 2 processes x 2 CPU devices match one process on 4 devices."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            _train_cmd(tmp_path / "multi", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    single = losses(train(cfg("vanilla"), tmp_path / "single", devices=jax.devices()[:4], quiet=True))
    multi = losses(tmp_path / "multi")
    np.testing.assert_allclose([multi[s] for s in range(1, 13)], [single[s] for s in range(1, 13)], rtol=2e-5)


def test_processes_given_different_configs_are_refused_in_one_line(tmp_path):
    """Processes given different configs (a flag missing from one host's command) are refused in
    one line in each: both trained to the end, each with its own train.lr, on replicas XLA takes to
    be equal (the replicas drifted apart, silently, and the checkpoint mixed them)."""
    codes, lines = _two_processes(lambda i: tmp_path / "multi", extra=lambda i: ["--config.train.lr=0.03"] if i else [])
    assert codes == [2, 2], lines
    assert lines[0] == ["error: the processes were given different configs: process(es) 1 differ from process 0; give every process "
                        "the same --config and --config.* flags"], lines[0]
    assert len(lines[1]) == 1 and "(train.lr (0.003 -> 0.03): process 0's -> this process's)" in lines[1][0], lines[1]
    assert not (tmp_path / "multi").exists()


def test_processes_reading_different_prepared_data_are_refused_in_one_line(tmp_path):
    """Processes whose data.dir (each host's own) holds the dataset prepared from other text are
    refused in one line in each: both trained to the end, each process's rows of a global batch
    taken from its own windows (the batch mixed two datasets, silently)."""
    import llmjax.data as D

    for k in range(2):  # the same dataset in each process's data.dir; the second's training text another
        ds = D.prepare_builtin("tinyshakespeare_char", tmp_path / f"data{k}" / "tinyshakespeare_char")
        if k:
            train = np.asarray(ds.split("train")[0])
            splits = dict(ds.manifest["splits"], train=[D.write_shard(ds.path / "train_0000.bin", train[::-1].copy())])
            D.write_manifest(ds.path, ds.name, ds.manifest["tokenizer"], splits)
    codes, errs = _two_processes(lambda i: tmp_path / "multi", env=lambda i: {"LLMJAX_DATA_DIR": str(tmp_path / f"data{i}")})
    assert codes == [2, 2], errs
    for i, lines in enumerate(errs):
        assert lines == [f"error: the processes read different prepared data as dataset 'tinyshakespeare_char': process(es) 1 differ "
                         f"from process 0 in its training shards (this process's: {tmp_path / f'data{i}' / 'tinyshakespeare_char'}); give "
                         f"every process the same prepared dataset (process 0's data.dir, shared or copied)"], lines
    assert not (tmp_path / "multi").exists()


def test_a_workdir_the_processes_do_not_share_is_refused_in_one_line(tmp_path):
    """Processes given different workdirs (each host's own local folder) are refused in one line in
    each, with nothing left there: process 1's first checkpoint failed ('make room or write access
    there') and process 0 waited in that save, forever."""
    codes, errs = _two_processes(lambda i: tmp_path / f"run{i}", timeout=120)
    assert codes == [2, 2], errs
    for i, lines in enumerate(errs):
        assert lines == [f"error: --workdir {tmp_path / f'run{i}'} is not one folder that every process shares: process(es) 1 do not see "
                         f"the file process 0 wrote there; give every process the same folder, on a file system every host mounts (the "
                         f"checkpoints are written by every process into one folder)"], lines
    assert not (tmp_path / "run0").exists() and not (tmp_path / "run1").exists()


def test_processes_that_see_different_numbers_of_devices_are_refused_in_one_line(tmp_path):
    """Process 0 with 2 devices, process 1 with 3 (another CUDA_VISIBLE_DEVICES on one host): every
    collective split its rows by the device count, a "cannot reshape array of size 5 into shape
    (2,2)" traceback in each. Refused from the device list every process holds, nothing left behind."""
    flags3 = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=3"
    codes, errs = _two_processes(lambda i: tmp_path / "run", env=lambda i: {"XLA_FLAGS": flags3} if i else {}, timeout=120)
    assert codes == [2, 2], errs
    want = ("error: the processes see different numbers of devices (process 0: 2, process 1: 3); give every process as many "
            "(CUDA_VISIBLE_DEVICES on GPUs, XLA_FLAGS' --xla_force_host_platform_device_count on CPUs)")
    assert errs == [[want], [want]], errs
    assert not (tmp_path / "run").exists()


def test_a_second_copy_of_a_running_process_is_refused_before_it_joins(tmp_path):
    """Process 1's command run again on its host while the run trains: jax.distributed took it for
    process 1 restarted and aborted every process of the run (C++ stacks), and the copy waited 5
    minutes to say that not every process joined. The running process's claim (held here, as
    train.claim_process_id holds it) refuses the copy at once, before it looks for the coordinator."""
    import tempfile
    from pathlib import Path

    from llmjax.runtime import exclusive_folder

    port = _free_port()
    claim = Path(tempfile.gettempdir()) / f"llmjax-processes-{os.getuid()}" / f"127.0.0.1_{port}-1"
    claim.mkdir(parents=True, exist_ok=True)
    cmd = _train_cmd(tmp_path / "run", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1")
    with exclusive_folder(claim, lambda: AssertionError("held")):
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, f"error: process 1 of the run at --coordinator_address=127.0.0.1:{port} is running on this host "
                                           "already; a second one would end that run (jax.distributed aborts every process of it): stop "
                                           "that one first, or give this one its own --process_id\n"), r.stderr
    assert not (tmp_path / "run").exists()


def test_a_process_started_in_a_slurm_allocation_without_srun_is_told_to_use_it(tmp_path):
    """SLURM_NTASKS is set in an allocation's shell and batch script, where python runs without srun:
    JAX finds no step to take the processes from, and the line said to give --coordinator_address."""
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
    r = subprocess.run(_train_cmd(tmp_path / "run"), cwd=ROOT, env={**env, "SLURM_NTASKS": "2"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: jax.distributed could not start under SLURM (") and r.stderr.count("\n") == 1, r.stderr
    assert "; SLURM_NTASKS=2 here: start every process with srun (one task per process), or unset SLURM_NTASKS to train in this one process; " \
        "or give --coordinator_address" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_a_workdir_another_run_trains_in_stops_every_process(tmp_path):
    """Process 0 finds the workdir's lock held (another run training there): every process stops in
    one line, not process 0 alone (process 1 waited in the next collective)."""
    from llmjax.runtime import exclusive_folder

    workdir = tmp_path / "multi"
    workdir.mkdir()
    with exclusive_folder(workdir, lambda: AssertionError("held")):
        codes, errs = _two_processes(lambda i: workdir, timeout=120)
    assert codes == [2, 2], errs
    assert all(len(lines) == 1 and lines[0].startswith(f"error: another training process is running in {workdir} now") for lines in errs), errs
    assert not any(workdir.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_leaves_a_checkpoint_to_resume_from(tmp_path, sig):
    """SIGTERM (a preemption) or a first Ctrl-C (SIGINT: was a KeyboardInterrupt traceback, and an
    Orbax clean-up cut short) finishes the step, saves it and exits: at once, not at the next
    evaluation or checkpoint step (here there is none: a preemption's grace period would run out)."""
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        _train_cmd(workdir, "--config.train.max_steps=100000", "--config.train.checkpoint_every_steps=100000", "--config.eval.every_steps=0"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(sig)
    try:
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    said = "SIGTERM" if sig == signal.SIGTERM else "Ctrl-C"
    assert f"stopped by {said} after step" in out and "Traceback" not in out, out
    assert ("Ctrl-C: stopping after the step queued now (the progress bar can be some steps behind it), with a checkpoint (press it again to stop at once)" in out) == (sig == signal.SIGINT)
    stopped = max(losses(workdir))
    assert (workdir / "checkpoints" / str(stopped)).is_dir()
    run = train(cfg("vanilla", train__max_steps=100000, train__stop_at_step=stopped + 3), workdir, quiet=True)
    assert run.step == stopped + 3 and sorted(losses(workdir)) == list(range(1, stopped + 4))


def _two_long_runs(workdir, stderr):
    """Processes 0 and 1 of an endless tiny run in `workdir` (stdout piped, stderr as given), once
    they have trained a few steps (3 rows of metrics)."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            _train_cmd(workdir, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                       "--config.train.max_steps=100000", "--config.train.checkpoint_every_steps=100000", "--config.eval.every_steps=0",
                       "--config.train.log_every_steps=5"),
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        for i in range(2)
    ]
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    return procs


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
    """Several processes stop together: a SIGTERM to one process (as a preemption that reaches the
    hosts at different times) is agreed at the next metrics block, and both save that step and exit
    (each alone would leave the other waiting in a collective, and neither would save)."""
    workdir = tmp_path / "multi"
    procs = _two_long_runs(workdir, stderr=subprocess.STDOUT)
    procs[1].send_signal(signal.SIGTERM)  # (the lead, process 0, is the one that says it)
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    stopped = max(losses(workdir))
    assert f"stopped by SIGTERM after step {stopped}; checkpoint saved" in outs[0] and stopped % 5 == 0, outs[0]
    assert sorted(int(c.name) for c in (workdir / "checkpoints").iterdir() if c.name.isdigit()) == [stopped]


@pytest.mark.parametrize("failing, what", [(1, "data"), (0, "config")])
def test_a_process_that_fails_alone_stops_every_process_at_once_in_one_line(tmp_path, failing, what):
    """An error in one process only (its data.dir holds the dataset unfinished; its --config file
    is missing on its host, refused before jax.distributed starts) ends every process at once, in
    one line each: the failing one's own, the other's naming it. The other waited in its next
    collective (or in jax.distributed's start) and the failing one in jax.distributed's shutdown
    barrier, both for 5 minutes, and then they ended in C++ aborts with their stacks."""
    from llmjax.prepare import STATE

    (tmp_path / "data1" / "tinyshakespeare_char").mkdir(parents=True)
    (tmp_path / "data1" / "tinyshakespeare_char" / STATE).write_text("{}")
    env = (lambda i: {"LLMJAX_DATA_DIR": str(tmp_path / "data1")} if i == failing and what == "data" else {})
    config = (lambda i: str(tmp_path / "nowhere.py:tiny") if i == failing and what == "config" else "configs/vanilla.py:tiny")
    started = time.monotonic()
    codes, errs = _two_processes(lambda i: tmp_path / "multi", env=env, config=config, timeout=90)
    assert codes == [2, 2] and time.monotonic() - started < 60, errs
    said = errs[failing][0].removeprefix("error: ")
    expected = (f"dataset 'tinyshakespeare_char' in {tmp_path / 'data1' / 'tinyshakespeare_char'} is unfinished" if what == "data"
                else f"config file '{tmp_path / 'nowhere.py'}' not found")
    assert len(errs[failing]) == 1 and said.startswith(expected), errs[failing]
    other = 1 - failing
    assert errs[other] == [f"error: process {failing} stopped, so this process stopped too (process {failing}: {said})"], errs[other]
    assert not (tmp_path / "multi").exists()


def test_a_second_ctrl_c_to_one_of_two_processes_stops_both_at_once(tmp_path):
    """A second Ctrl-C to one process ends it at once and the other with it, in one line each
    (the other waited in its next step's collective for 5 minutes, then ended in a C++ abort)."""
    procs = _two_long_runs(tmp_path / "multi", stderr=subprocess.PIPE)
    try:
        procs[1].send_signal(signal.SIGINT)
        time.sleep(0.3)
        procs[1].send_signal(signal.SIGINT)
        errs = [[line for line in p.communicate(timeout=60)[1].splitlines() if "Gloo" not in line] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [130, 130], errs
    said = "interrupted; no checkpoint was written: the same command starts the run afresh"
    assert errs[1][-1] == f"error: {said}" and not [line for line in errs[1] if "Traceback" in line], errs[1]
    assert errs[0] == [f"error: process 1 stopped, so this process stopped too (process 1: {said})"], errs[0]


@pytest.mark.parametrize("where", ["a collective", "a checkpoint's save"])
def test_a_process_killed_outright_is_one_line_in_the_others(tmp_path, where):
    """A process killed without a word (SIGKILL, the kernel's out-of-memory killer, a host lost)
    stopped the others in Gloo's error (as here, raised in a run of two processes when process 1 was
    killed): a traceback, or, in a checkpoint's save, 'make room or write access there', which is not
    what went wrong. Now one line that says a process went away. (One process of jax.distributed:
    where Gloo does not raise, a collective waits for jax.distributed's heartbeat timeout.)"""
    gloo = ("UNKNOWN: Gloo AllGather failed: [external/xla++third_party_ext+gloo/gloo/transport/tcp/pair.cc:538] Read error "
            "[127.0.0.1]:33667: Connection reset by peer")
    (tmp_path / "run" / "checkpoints" / "5").mkdir(parents=True)
    raised = (f"jax.errors.JaxRuntimeError({gloo!r})" if where == "a collective" else
              f"T.TrainingError('checkpoint /x/10 could not be written (JaxRuntimeError: ' + {gloo!r} + '); make room or write access there')")
    code = ("import sys, jax\n"
            "from llmjax import cli, train as T\n"
            "def gone(cfg, workdir, **kw):\n"
            f"    raise {raised}\n"
            "T.train = gone\n"
            f"sys.argv = ['train', '--config', 'configs/vanilla.py:tiny', '--workdir', {str(tmp_path / 'run')!r}, "
            f"'--coordinator_address=127.0.0.1:{_free_port()}', '--num_processes=1', '--process_id=0']\n"
            "T.define_flags()\n"
            "cli.run(T.main)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == ("error: another process of the run ended without a word (Gloo AllGather failed: Read error "
                                              "[127.0.0.1]:33667: Connection reset by peer): killed (out of host memory?) or its host lost; "
                                              f"a run resumes from its last checkpoint, step 5 in {tmp_path / 'run' / 'checkpoints'}\n"), r.stderr[-3000:]


def test_process_0s_output_cut_short_by_its_reader_stops_the_run_quietly_there(tmp_path):
    """Process 0's standard output read by `| head -1`, gone before the line it says as it trains
    (all steps warmup): quiet there (exit 141), as in one process, and the other says why it
    stopped; not a BrokenPipeError's traceback."""
    gone = ("import os, runpy; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "
            "runpy.run_module('llmjax.train', run_name='__main__', alter_sys=True)")
    codes, lines = _two_processes(lambda i: tmp_path / "multi", extra=lambda i: ["--config.train.max_steps=1"],
                                  python=lambda i: ["-c", gone] if i == 0 else ["-m", "llmjax.train"])
    assert codes == [141, 141] and lines == [[], ["error: process 0 stopped, so this process stopped too (process 0: the reader of "
                                                  "its standard output went away (a pipe closed))"]], (codes, lines)
    assert not (tmp_path / "multi").exists()


def test_a_process_killed_outright_in_a_checkpoints_save_stops_the_other_soon_in_one_line(tmp_path):
    """A process killed outright mid-training (here process 1, by SIGKILL as it reaches its first
    checkpoint's barrier: Orbax's, in jax.distributed's key-value store, where nothing fails) left
    the other waiting there (its next step's Gloo error ended the run, whose last save then waited)
    for jax.distributed's heartbeat timeout, 100 s, then a C++ abort. Now it stops within seconds,
    in one line that names the process gone, exit status 1."""
    killed = tmp_path / "killed_at"
    dies = ("import os, pathlib, runpy, signal, sys, time\n"
            "from orbax.checkpoint._src.multihost import multihost\n"
            "client = multihost.get_jax_distributed_client\n"
            "class Dies:\n"
            "    def __getattr__(self, name):\n"
            "        return getattr(client(), name)\n"
            "    def wait_at_barrier(self, key, *args, **kwargs):\n"
            "        if key.startswith('_async_write_complete'):\n"
            f"            pathlib.Path({str(killed)!r}).write_text(str(time.time()))\n"
            "            os.kill(os.getpid(), signal.SIGKILL)\n"
            "        return client().wait_at_barrier(key, *args, **kwargs)\n"
            "multihost.get_jax_distributed_client = Dies\n"
            "sys.argv[0] = 'llmjax.train'\n"
            "runpy.run_module('llmjax.train', run_name='__main__', alter_sys=True)\n")
    codes, errs = _two_processes(lambda i: tmp_path / "multi", python=lambda i: ["-c", dies] if i else ["-m", "llmjax.train"],
                                 timeout=150)
    took = time.time() - float(killed.read_text())  # (process 0's end, give or take: process 1 had gone before)
    assert codes == [1, -signal.SIGKILL] and errs[1] == [], (codes, errs)
    assert errs[0] == ["error: process 1 of the run ended without a word (nothing from it for 10 s): killed (out of host memory?) "
                       "or its host lost; no checkpoint was written"], errs[0]
    assert took < 20, took
    assert not [c for c in (tmp_path / "multi" / "checkpoints").iterdir() if c.name.isdigit()]  # (the save cut short: Orbax's temporary folder)


@pytest.mark.parametrize("distributed", [False, True], ids=["one-process", "jax.distributed"])
def test_a_sigterm_before_the_loop_is_one_line(tmp_path, distributed):
    """A SIGTERM while the run starts (restoring a checkpoint, compiling: here inside `train`, before
    its loop's own handler) ended the process at once with status -15 and not a word. Now it stops
    as a Ctrl-C there does, in one line naming the checkpoint a run resumes from, with status 143.
    (With jax.distributed, its preemption service's handler took the signal: a log line, and the
    run went on to its end.)"""
    (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
    flags = [f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=1", "--process_id=0"] if distributed else []
    code = ("import os, signal, sys, time\n"
            "from llmjax import cli, train as T\n"
            "def starting(cfg, workdir, **kw):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(60)\n"
            "T.train = starting\n"
            f"sys.argv = ['train', '--config', 'configs/vanilla.py:tiny', '--workdir', {str(tmp_path / 'run')!r}, *{flags!r}]\n"
            "T.define_flags()\n"
            "cli.run(T.main)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 143 and r.stderr == (f"error: interrupted by SIGTERM; the same command resumes from the last checkpoint "
                                                f"written, step 4 in {tmp_path / 'run' / 'checkpoints'}\n"), (r.returncode, r.stderr[-2000:])


def test_a_second_ctrl_c_stops_at_once_and_an_ignored_one_stays_ignored(tmp_path, monkeypatch, capsys):
    """The second Ctrl-C exits the process itself, in one line (a KeyboardInterrupt raised in JAX's
    callbacks was swallowed, with a traceback, and the run went on); a SIGINT the process ignores (a
    shell script's background job) does not stop the run."""
    from llmjax import train as T

    class Exited(Exception):
        pass

    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(T.os, "_exit", fake_exit)
    with T._Stop(tmp_path / "checkpoints") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "Ctrl-C"
        with pytest.raises(Exited, match="130"):
            stop._handle(signal.SIGINT, None)
    assert capsys.readouterr().err.splitlines()[-1] == "error: interrupted; no checkpoint was written: the same command starts the run afresh"
    for step in (3, 7):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1").mkdir()  # (a save cut short: not a checkpoint)
    assert T.interrupted(tmp_path / "checkpoints").endswith(f"resumes from the last checkpoint written, step 7 in {tmp_path / 'checkpoints'}")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with T._Stop(tmp_path / "checkpoints") as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested is None
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def _whole_split_loss(workdir, step, batches=None):
    """The loss of checkpoint `step` of a tinyshakespeare_char run on the whole validation split (or
    its first `batches` batches of 8), recomputed from the loaded model (context 32, as TINY)."""
    from llmjax import data as data_lib, sample

    model = sample.load(workdir / "checkpoints" / str(step)).model
    total = count = 0.0
    windows = data_lib.sequential_windows(data_lib.open_dataset("tinyshakespeare_char", None).split("val"), seq_len=32, batch=8)

    @jax.jit  # (the model's parameters as constants: 435 batches eagerly took ~10 s)
    def token_losses(toks):
        logits = model(toks[:, :-1])[0]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), toks[:, 1:, None], -1)[..., 0]

    for toks, mask in itertools.islice(windows, batches):
        ce = token_losses(jnp.asarray(toks))
        total, count = total + float((ce * mask).sum()), count + float(mask.sum())
    return total / count


@pytest.mark.parametrize("every,final_batches", [(3, 0), (0, 0), (3, 5)])
def test_finishing_a_stopped_run_at_its_checkpoint_reports_the_whole_split(tmp_path, every, final_batches):
    """A run stopped at step 6 of 20, then run with max_steps=6: nothing to run, and the final
    val_loss is the whole validation split's (it was step 6's periodic estimate, or None: a
    traceback in the CLI), or its first eval.final_num_batches batches'. Run once more, the
    checkpoint's saved loss is reported; run with another eval.final_num_batches, measured again."""
    workdir = tmp_path / "run"
    over = dict(eval__every_steps=every, eval__final_num_batches=final_batches)
    train(cfg("vanilla", train__max_steps=20, train__stop_at_step=6, **over), workdir, quiet=True)
    run = train(cfg("vanilla", train__max_steps=6, **over), workdir, quiet=True)
    assert run.final and run.step == 6
    assert run.last_val_loss == pytest.approx(_whole_split_loss(workdir, 6, final_batches or None), abs=1e-5)
    if every:
        estimate = [v for step, v in losses(workdir, "val_loss").items() if step == 6]
        assert estimate and abs(estimate[0] - run.last_val_loss) > 1e-4  # (the estimate it reported before)
    done = train(cfg("vanilla", train__max_steps=8, **over), workdir, quiet=True)  # a run that ends as it should
    assert losses(workdir, "val_loss")[8] == done.last_val_loss
    again = train(cfg("vanilla", train__max_steps=8, **over), workdir, quiet=True)
    assert again.final and again.last_val_loss == done.last_val_loss  # (from the checkpoint's meta, not measured again)
    if final_batches:
        other = train(cfg("vanilla", train__max_steps=8, eval__every_steps=every, eval__final_num_batches=2), workdir, quiet=True)
        assert other.last_val_loss == pytest.approx(_whole_split_loss(workdir, 8, 2), abs=1e-5) != done.last_val_loss


def test_a_run_refuses_a_dataset_prepared_again_with_another_tokenizer(tmp_path):
    """The dataset was prepared again with another vocabulary since the run began: resumed, it trained
    on and overwrote tokenizer.json, and the checkpoints decoded as garbage."""
    workdir = tmp_path / "run"
    train(cfg("vanilla", train__stop_at_step=3), workdir, quiet=True)
    desc = json.loads((workdir / "tokenizer.json").read_text())
    other = {**desc, "chars": desc["chars"][::-1]}  # (as a dataset prepared again from other text would have it)
    (workdir / "tokenizer.json").write_text(json.dumps(other))
    with pytest.raises(ConfigError, match=r"holds a run whose tokenizer \(char, 65 tokens: its tokenizer.json\) is not the one dataset "
                                          r"'tinyshakespeare_char' is now prepared with \(char, 65 tokens, the same size with other tokens\): the dataset was "
                                          r"prepared again since, or the run's tokenizer.json was changed; prepare it as before to resume "
                                          r"\(or put back that file\), or use another --workdir$"):
        train(cfg("vanilla"), workdir, quiet=True)
    assert json.loads((workdir / "tokenizer.json").read_text()) == other  # (nothing overwritten)


def test_a_run_refuses_a_dataset_prepared_again_from_other_text(tmp_path, monkeypatch):
    """Same name, same tokenizer, other tokens (prepared again from other sources or with another
    --shard_tokens): the saved data position would index another order of other windows. It resumed
    silently; it is refused in one line, and the same text prepared again (the same shards) resumes."""
    from llmjax import data as D

    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path / "data"))
    workdir = tmp_path / "run"
    train(cfg("vanilla", train__stop_at_step=2), workdir, quiet=True)
    ds = D.open_dataset("tinyshakespeare_char", "unused")
    manifest = dict(ds.manifest)
    good = (ds.path / "train_0000.bin").read_bytes()
    tokens = np.asarray(ds.split("train")[0])
    manifest["splits"] = {**manifest["splits"], "train": [D.write_shard(ds.path / "train_0000.bin", tokens[: len(tokens) // 2])]}
    D.write_manifest(ds.path, manifest["dataset"], manifest["tokenizer"], manifest["splits"])
    with pytest.raises(ConfigError, match=r"holds a run trained on dataset 'tinyshakespeare_char' as it was prepared then, .*prepared again"):
        train(cfg("vanilla", train__stop_at_step=3), workdir, quiet=True)
    (ds.path / "train_0000.bin").write_bytes(good)
    D.write_manifest(ds.path, ds.manifest["dataset"], ds.manifest["tokenizer"], ds.manifest["splits"])
    assert train(cfg("vanilla", train__stop_at_step=3), workdir, quiet=True).step == 3


def test_a_dataset_whose_tokenizer_cannot_be_built_and_an_unwritable_data_dir_are_one_line(tmp_path, monkeypatch):
    from llmjax import data as data_lib

    monkeypatch.delenv("LLMJAX_DATA_DIR", raising=False)  # (data.dir as configured)
    data_lib.open_dataset("tinyshakespeare_char", str(tmp_path / "data"))
    manifest = tmp_path / "data" / "tinyshakespeare_char" / data_lib.MANIFEST
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "tokenizer": {"kind": "sentencepiece"}}))
    with pytest.raises(ConfigError, match=r"^dataset 'tinyshakespeare_char' in .*: unknown tokenizer kind 'sentencepiece' .*prepare it again"):
        train(cfg("vanilla", data__dir=str(tmp_path / "data")), tmp_path / "run", quiet=True)
    # a data.dir that cannot be written: its own line (it blamed the workdir and spoke of resuming)
    with pytest.raises(ConfigError, match=r"^cannot prepare dataset 'tinyshakespeare_char' in /proc/llmjax-none/tinyshakespeare_char "
                                          r"\(.*\); set --config.data.dir to a folder you can write$"):
        train(cfg("vanilla", data__dir="/proc/llmjax-none"), tmp_path / "run", quiet=True)
    # a batch the mesh refuses leaves no workdir behind
    with pytest.raises(ConfigError, match=r"^train.batch_size=8 must be divisible by the 3 devices of the mesh: set "
                                          r"--config.train.batch_size=6 or 9 \(a multiple of 3\)$"):
        train(cfg("vanilla"), tmp_path / "run", devices=jax.devices()[:3], quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_step_larger_than_the_hosts_memory_is_refused_before_any_work(tmp_path):
    """train.batch_size=10**9 (or such a grad_accum_steps) gathered windows for many minutes, its memory
    growing without end and deaf to SIGTERM: one line, and no workdir, before the model is built."""
    from llmjax.train import check_host_batch, host_memory

    memory = host_memory()
    assert memory and memory > 2**30
    with pytest.raises(ConfigError, match=r"^one step's tokens, train.batch_size=1000000000 x train.grad_accum_steps=1 windows of "
                                          r"model.context_len\+1=33 int32 tokens, need 132 GB on this host, more than its .* GB of memory; "
                                          r"lower train.batch_size or train.grad_accum_steps$"):
        train(cfg("vanilla", train__batch_size=10**9), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    c = cfg("vanilla", train__batch_size=8, train__grad_accum_steps=4)  # 8 x 4 x (32 + 1) x 4 = 4,224 bytes: the boundary, exactly
    check_host_batch(c.train, llmjax.model_config(c), memory=4224)
    with pytest.raises(ConfigError, match=r"need 4.22e-06 GB on this host, more than its 4.22e-06 GB"):
        check_host_batch(c.train, llmjax.model_config(c), memory=4223)


def test_an_aux_loss_without_a_weight_is_refused_before_the_workdir(tmp_path):
    """A loss the model returns with no weight in train.aux_loss_weights (the MoE's group given whole,
    `{'load_balance': 0.01}`) was refused only when the first step traced the loss, after the run
    had written config.json, tokenizer.json and an empty metrics.jsonl: a fresh run refused left its
    workdir behind."""
    with pytest.raises(ConfigError, match=r"^train.aux_loss_weights has no weight for 'router_z', which the moe model returns; "
                                          r"give it one \(0: logged, not trained\)$"):
        train(cfg("moe", train__aux_loss_weights={"load_balance": 0.01}), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_an_aux_loss_its_config_does_not_declare_says_to_declare_it(tmp_path, monkeypatch):
    """A model that returns an auxiliary loss its config class does not list in `aux_losses` (a new
    architecture's, the guide followed) was told to give it a weight in train.aux_loss_weights, which
    the config check then refused as a loss 'the model does not return': advice that went round in a
    circle. It names the class variable to set."""
    from llmjax.models.moe import MoEConfig

    monkeypatch.setattr(MoEConfig, "aux_losses", ("load_balance",))  # (router_z left out of the declaration)
    with pytest.raises(ConfigError, match=r"^the moe model returns auxiliary loss\(es\) router_z, which its config class "
                                          r"\(MoEConfig\) does not list in aux_losses: add them there \(llmjax/models/\), then give "
                                          r"each a weight in train\.aux_loss_weights(?:\n|$)"):  # (then JAX's note)
        train(cfg("moe", train__aux_loss_weights={"load_balance": 0.01}), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_a_fresh_run_refused_when_its_step_is_traced_leaves_nothing_behind(tmp_path):
    """attention_impl='cudnn' on a CPU is refused when the step is traced, after the run wrote
    config.json, tokenizer.json and an empty metrics.jsonl: they were left behind (the README says a
    fresh run refused leaves no workdir). Now they are taken back; in a folder the user made, what
    was there stays."""
    bad = cfg("vanilla", model__attention_impl="cudnn", model__dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"^model\.attention_impl='cudnn' needs a CUDA GPU"):
        train(bad, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train(bad, mine, quiet=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_resume_refused_when_its_step_is_traced_changes_none_of_the_runs_files(tmp_path):
    """A resume refused when its step is traced (attention_impl='cudnn' on a CPU) had rewritten the
    run's config.json with settings that never trained (the next resume's notes were of those: "the
    learning rate jumps" from a rate no step used) and cut metrics.jsonl to the restored step; a run
    with no checkpoint (diverged at its first steps, or stopped before its first save) lost every
    metrics line. Now the files are put back as they were."""
    finished = tmp_path / "finished"
    train(cfg("vanilla", train__max_steps=6, train__checkpoint_every_steps=3), finished, quiet=True)
    unsaved = tmp_path / "unsaved"  # (metrics logged, no checkpoint: as a run stopped before its first save)
    train(cfg("vanilla", train__max_steps=4, train__checkpoint_every_steps=0), unsaved, quiet=True)
    import shutil

    shutil.rmtree(unsaved / "checkpoints" / "4")
    (finished / "metrics.jsonl").write_text((finished / "metrics.jsonl").read_text() + '{"step": 7, "train_loss": 1.0}\n')
    for run in (finished, unsaved):
        before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
        assert before["metrics.jsonl"]
        with pytest.raises(ConfigError, match=r"^model\.attention_impl='cudnn' needs a CUDA GPU"):
            train(cfg("vanilla", train__max_steps=8, train__lr=5e-4, model__attention_impl="cudnn", model__dtype="bfloat16"), run, quiet=True)
        assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before, run.name


@pytest.mark.parametrize("ended_by", ["a second Ctrl-C", "another process's failure"])
def test_a_fresh_run_ended_at_once_while_its_step_compiles_leaves_nothing_behind(tmp_path, monkeypatch, ended_by):
    """A process ended at once with os._exit while its fresh run's first step compiled (a second
    Ctrl-C; process 0 of a multi-process run when another process stopped, by a SIGTERM say) left
    config.json, tokenizer.json and an empty metrics.jsonl behind: the take-back ran only for an error."""
    import dataclasses

    from llmjax import train as T

    class Ended(Exception):
        pass

    left = []

    def fake_exit(code):  # (what the workdir holds as the process ends)
        left.append(sorted(p.name for p in (tmp_path / "run").rglob("*")) if (tmp_path / "run").exists() else None)
        raise Ended(code)

    class OtherFailed:  # (jax.distributed's key-value store, where process 1 stopped)
        def key_value_try_get(self, key):
            if key != T.FAILED_KEY:
                raise KeyError(key)
            return "1\n143\ninterrupted by SIGTERM; no checkpoint was written: the same command starts the run afresh"

        def key_value_set(self, key, value):
            pass

    together = T.StopTogether()
    together.client = OtherFailed()
    build = T.build_steps

    def ending_steps(cfg, mesh):
        def step(state, tokens):  # (as it compiles: the signals arrive, or the watcher thread reads the store)
            if ended_by == "a second Ctrl-C":
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)
            else:
                together._stop_if_another_failed()
            raise AssertionError("not ended")

        return dataclasses.replace(build(cfg, mesh), train_step=step)

    monkeypatch.setattr(T.os, "_exit", fake_exit)
    monkeypatch.setattr(T, "build_steps", ending_steps)
    with pytest.raises(Ended):
        train(cfg("vanilla"), tmp_path / "run", devices=jax.devices()[:1], quiet=True)
    assert left == [None]


def test_a_process_judged_gone_where_the_checkpoints_cannot_be_listed_still_ends_this_one(monkeypatch):
    """The watcher that finds another process gone ends this one in one line where its checkpoints'
    folder cannot be listed (on the lost host's file system, say): the OSError killed the watcher
    thread holding StopTogether's lock, and the main thread, ending on its collective's error, waited
    for that lock forever."""
    import errno

    from llmjax import train as T

    class Store:  # (jax.distributed's key-value store: nothing from the other processes)
        def key_value_dir_get(self, key):
            return []

    def unreadable(checkpoints):
        raise OSError(errno.EIO, "Input/output error", str(checkpoints))

    ended = []
    together = T.StopTogether(T.Path("/nfs/run/checkpoints"))
    together.client, together.lost = Store(), {1}
    monkeypatch.setattr(T, "_saved_steps", unreadable)
    monkeypatch.setattr(together, "stop_all", lambda line, code: ended.append((line, code)))
    together._stop_if_another_is_gone()
    assert ended == [("process 1 of the run ended without a word (nothing from it for 10 s): killed (out of host memory?) or its "
                      "host lost; its checkpoints could not be listed (Input/output error: /nfs/run/checkpoints)", 1)], ended
    assert together._claim(wait=False)  # (held by this thread, the one ending the process)


def test_a_second_training_process_in_the_same_workdir_is_refused(tmp_path):
    """The same command started again while the first still trains (in another terminal, say) is one
    line, and nothing of the first's is touched: both trained in one folder, each saving its own
    checkpoints and metrics over the other's. Nothing is removed either where the folder is new (the
    first made it), while a fresh run refused for another reason removes what it made."""
    from llmjax.runtime import exclusive_folder

    workdir = tmp_path / "run"
    train(cfg("vanilla", train__max_steps=2), workdir, devices=jax.devices()[:1], quiet=True)
    before = {f: f.read_bytes() for f in workdir.rglob("*") if f.is_file()}
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for folder in (workdir, fresh):
        with exclusive_folder(folder, lambda: AssertionError("held")):  # (as a run training there holds it)
            with pytest.raises(ConfigError, match=rf"^another training process is running in {re.escape(str(folder))} now \(the same "
                                                  rf"command in another terminal\?\); wait for it to end \(then the same command resumes "
                                                  rf"its run\), or use another --workdir$"):
                train(cfg("vanilla", train__max_steps=4), folder, devices=jax.devices()[:1], quiet=True)
    assert {f: f.read_bytes() for f in workdir.rglob("*") if f.is_file()} == before
    assert fresh.is_dir() and not any(fresh.iterdir())


def test_a_run_that_ended_in_the_workdir_before_this_one_held_it_is_seen(tmp_path, monkeypatch):
    """The same workdir twice at once, the other run (of another model) ending before this one took
    the workdir's lock: this one had read the workdir before the lock (nothing there) and restored
    the other's checkpoint as its own run's, refused with the wrong line (the checkpoint 'holds another
    model than its run's config.json'; another dataset or train settings went unchecked). Read under
    the lock: the line for a workdir holding another model's run, and nothing of it is changed."""
    import shutil

    from llmjax import train as T

    other = tmp_path / "other"
    train(cfg("vanilla", model__n_layer=1, train__max_steps=2), other, devices=jax.devices()[:1], quiet=True)
    theirs = {f.relative_to(other): f.read_bytes() for f in other.rglob("*") if f.is_file()}
    lock = T.exclusive_folder

    def after_the_other_run(path, busy):  # (it trained in `path` and ended just before this run's lock)
        shutil.copytree(other, path, dirs_exist_ok=True)
        return lock(path, busy)

    monkeypatch.setattr(T, "exclusive_folder", after_the_other_run)
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(workdir))} holds a run with a different model config: .*n_layer.*; use "
                                          rf"another --workdir or the same config$"):
        train(cfg("vanilla", train__max_steps=4), workdir, devices=jax.devices()[:1], quiet=True)
    assert {f.relative_to(workdir): f.read_bytes() for f in workdir.rglob("*") if f.is_file()} == theirs


def test_a_fresh_run_refused_takes_its_files_back_before_it_lets_go_of_the_workdir(tmp_path, monkeypatch):
    """A fresh run refused after it wrote its files (attention_impl='cudnn' on a CPU, as its step is
    traced) let go of the workdir's lock, then took its files back: the same command started again
    at that moment, holding the workdir once it was free, lost the config.json, tokenizer.json and
    metrics.jsonl it had written there. Now the take-back is done before the lock is let go."""
    import contextlib as cl

    from llmjax import train as T

    workdir = tmp_path / "run"
    second = {"config.json": json.dumps({"model": {"arch": "vanilla"}, "train": {}}), "tokenizer.json": "{}", "metrics.jsonl": ""}
    lock = T.exclusive_folder
    with contextlib.ExitStack() as held:
        @cl.contextmanager
        def then_the_second_run(path, busy):  # (it takes the workdir as soon as it is free, and writes its files)
            try:
                with lock(path, busy):
                    yield
            finally:
                path.mkdir(exist_ok=True)  # (as a run does before it takes the lock)
                held.enter_context(lock(path, lambda: AssertionError("held")))
                for name, text in second.items():
                    (path / name).write_text(text)

        monkeypatch.setattr(T, "exclusive_folder", then_the_second_run)
        with pytest.raises(ConfigError, match=r"^model\.attention_impl='cudnn' needs a CUDA GPU"):
            train(cfg("vanilla", model__attention_impl="cudnn", model__dtype="bfloat16"), workdir, quiet=True)
        assert {f.name: f.read_text() for f in workdir.iterdir()} == second


def test_a_run_stopped_as_it_starts_takes_back_nothing_of_another_run_that_started_meanwhile(tmp_path, monkeypatch):
    """The same command twice in a new workdir, the second stopped (a Ctrl-C) before it reached the
    workdir's lock, once the first had written its config.json, tokenizer.json and empty metrics.jsonl
    and was compiling its first step: the second took those files back as its own fresh run's
    (missing when it started), and the first trained on without them."""
    from llmjax import train as T
    from llmjax.runtime import exclusive_folder

    workdir = tmp_path / "run"
    first = {"config.json": json.dumps({"model": {"arch": "vanilla"}, "train": {}}), "tokenizer.json": "{}", "metrics.jsonl": ""}
    with contextlib.ExitStack() as held:
        def first_run_started_meanwhile(c):  # (the second's start: the first made the folder, holds it and wrote its files)
            workdir.mkdir()
            held.enter_context(exclusive_folder(workdir, lambda: AssertionError("held")))
            for name, text in first.items():
                (workdir / name).write_text(text)
            raise KeyboardInterrupt

        monkeypatch.setattr(T, "validate", first_run_started_meanwhile)
        with pytest.raises(KeyboardInterrupt):
            train(cfg("vanilla"), workdir, quiet=True)
    assert {f.name: f.read_text() for f in workdir.iterdir()} == first


def test_what_an_empty_prompt_starts_from():
    """The end-of-run sample with a character vocabulary without a newline crashed a finished run."""
    from llmjax.sample import start_ids
    from llmjax.tokenizer import CharTokenizer, GPT2Tokenizer

    assert start_ids(GPT2Tokenizer()) == [50256]
    assert start_ids(CharTokenizer("\n ab")) == [0] and start_ids(CharTokenizer("ab\n")) == [2]
    assert start_ids(CharTokenizer("abc")) == [0]


def test_a_sigterm_while_scoring_tasks_saves_the_step(tmp_path, monkeypatch):
    """A SIGTERM that arrives during a step's in-loop scoring (a step that is no checkpoint step)
    still saves that step before the run stops."""
    from llmjax import downstream

    scored = downstream.score_task

    def scored_then_terminated(*a, **k):
        out = scored(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(downstream, "score_task", scored_then_terminated)
    c = cfg("vanilla", data__dataset="tinyshakespeare", model__vocab_size=50257, model__padded_vocab_size=50304, train__max_steps=6,
            eval__every_steps=0, train__checkpoint_every_steps=0, eval__tasks="hellaswag", eval__tasks_every_steps=2,
            eval__tasks_limit=4, eval__tasks_batch_size=8, eval__tasks_dir=str(ROOT / "tests" / "fixtures"))
    run = train(c, tmp_path / "run", quiet=True)
    assert run.step == 2 and not run.final
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_a_resume_with_another_global_batch_continues_with_the_next_windows(tmp_path):
    """The data position is counted in windows: resumed with another batch size, a run takes the
    windows an uninterrupted run would have taken next (bit for bit the same batches); a position
    that is no whole number of the new batches, or another seed, is refused in one line."""
    from llmjax import data as D
    from llmjax.train import resume_data_position

    shards = [np.arange(5000, dtype=np.uint16)]

    def batches(b):
        return D.train_batches(shards, seq_len=8, global_batch=b, seed=0, threads=0)

    ref = batches(8)
    whole = np.concatenate([next(ref) for _ in range(6)])  # 48 windows in the order of seed 0
    it8 = batches(8)
    for _ in range(3):
        next(it8)
    meta = {"data_global_batch": 8, "data_seed": 0}
    it4 = batches(4)
    it4.set_state(it8.get_state())  # (what the checkpoint restores)
    resume_data_position(it4, meta, None, 4, 0, tmp_path, lambda *a: None)
    np.testing.assert_array_equal(np.concatenate([next(it4) for _ in range(4)]), whole[24:40])
    it12 = batches(12)
    it12.set_state(it8.get_state())
    resume_data_position(it12, meta, None, 12, 0, tmp_path, lambda *a: None)
    np.testing.assert_array_equal(next(it12), whole[24:36])
    it16 = batches(16)
    it16.set_state(it8.get_state())
    with pytest.raises(ConfigError, match=r"has used 24 training windows \(batches of 8\): not a whole number of batches of 16 .*"
                                          r"that divides 24 \(the nearest: 8, 12, 24\), or use another --workdir$"):
        resume_data_position(it16, meta, None, 16, 0, tmp_path, lambda *a: None)
    # on a mesh of 8 or 16 devices (train.batch_size, so the global batch, a multiple of them): what those divide too
    with pytest.raises(ConfigError, match=r"divides 24 and that the 8 devices of the mesh divide \(the nearest: 8, 24\), or use"):
        resume_data_position(it16, meta, None, 16, 0, tmp_path, lambda *a: None, devices=8)
    with pytest.raises(ConfigError, match=r"; no global batch that the 16 devices of the mesh divide divides 24: resume on a number of "
                                          r"devices that divides 8, as the run's did, or use another --workdir$"):
        resume_data_position(it16, meta, None, 16, 0, tmp_path, lambda *a: None, devices=16)
    with pytest.raises(ConfigError, match=r"trained with train.seed=0, .*resume with --config.train.seed=0 .*another --workdir$"):
        resume_data_position(batches(8), meta, None, 8, 1, tmp_path, lambda *a: None)
    # an older checkpoint (no such meta keys): the run's config.json says
    it4 = batches(4)
    it4.set_state(it8.get_state())
    resume_data_position(it4, {}, {"train": {"batch_size": 4, "grad_accum_steps": 2, "seed": 0}}, 4, 0, tmp_path, lambda *a: None)
    np.testing.assert_array_equal(next(it4), whole[24:28])
    # through the trainer: stopped at step 3 with batches of 8, resumed with 4 (and refused with 16)
    train(cfg("vanilla", train__stop_at_step=3), tmp_path / "run", devices=jax.devices()[:1], quiet=True)
    with pytest.raises(ConfigError, match="not a whole number of batches of 16"):
        train(cfg("vanilla", train__batch_size=16), tmp_path / "run", devices=jax.devices()[:1], quiet=True)
    assert train(cfg("vanilla", train__batch_size=4, train__stop_at_step=5), tmp_path / "run", devices=jax.devices()[:1], quiet=True).step == 5
    # every row counts the training tokens seen so far (3 steps of 8 windows, then of 4; 32 targets a
    # window), and llmjax.plot draws step 4's estimate there: it took step x the new batch's tokens (512)
    from llmjax.plot import read_run

    assert losses(tmp_path / "run", "tokens") == {1: 256, 2: 512, 3: 768, 4: 896, 5: 1024}
    assert read_run(tmp_path / "run")["tokens"].tolist() == [896.0]


@pytest.mark.parametrize("limit,what", [(200_000, "checkpoint"), (1024, "config")])
def test_a_disk_that_takes_no_more_stops_the_run_in_one_line(tmp_path, limit, what):
    """A checkpoint whose background write fails (here: files over 200 kB cannot be written), or a
    run file that cannot be written, stops the run with one line saying so (Orbax's tracebacks
    from its writer threads left out), and nothing half-written is taken for a checkpoint."""
    import shlex

    from llmjax import data as D

    D.open_dataset("tinyshakespeare_char", "unused")  # (prepared here, without the limit)
    workdir = tmp_path / "run"
    # bash's ulimit -f (1024-byte blocks) holds for root too, unlike a read-only folder; SIGXFSZ
    # ignored, so that a write over it fails with EFBIG as on a full disk
    limited = f"trap '' XFSZ; ulimit -f {limit // 1024 or 1}; exec {shlex.join(_train_cmd(workdir))}"
    r = subprocess.run(["bash", "-c", limited], cwd=ROOT, env=_env(LLMJAX_COMPILATION_CACHE=""), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    if what == "checkpoint":
        assert re.match(rf"error: a checkpoint in {re.escape(str(workdir))}/checkpoints could not be written \(.*File too large.*\); "
                        r"make room or write access there, then run the same command to start again$", r.stderr.strip()), r.stderr
        assert not [c for c in (workdir / "checkpoints").iterdir() if c.name.isdigit()]
    else:
        assert re.match(r"error: File too large \(.*config\.json.*\); stopped\. Make room or write access in .*, then run the same command to resume "
                        r"from its last checkpoint$", r.stderr.strip()), r.stderr
    assert train(cfg("vanilla", train__stop_at_step=5), workdir, quiet=True).step == 5  # (room again)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e10: step 1 (at lr / 6, warm-up) stays finite and leaves parameters that make step 2 NaN
    bad = cfg("vanilla", train__lr=1e10, train__warmup_steps=5, train__checkpoint_every_steps=1, eval__every_steps=0)
    with pytest.raises(TrainingError, match=r"non-finite at step 2 .*The last good checkpoint is step 1 in "):
        train(bad, tmp_path / "run", quiet=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_a_checkpoints_folder_another_process_takes_back_as_it_is_read_has_no_steps(tmp_path, monkeypatch):
    """Processes of one run stopped together before a checkpoint (a non-finite loss at step 2): one
    took back the empty checkpoints/ it made while another listed it, which then ended in a
    FileNotFoundError traceback with exit status 1 (the others: 3)."""
    import pathlib

    from llmjax import train as T

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    listing = pathlib.Path.iterdir

    def taken_back_first(self):  # (the other process's rmdir, after this one saw the folder)
        if self == folder:
            folder.rmdir()
        return listing(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", taken_back_first)
    assert T.interrupted(folder, "SIGTERM") == "interrupted by SIGTERM; no checkpoint was written: the same command starts the run afresh"


def test_a_non_finite_loss_keeps_the_rows_of_the_steps_before_it(tmp_path):
    """The finite steps read in one block with the non-finite one (up to 50, train.log_every_steps)
    were never written to metrics.jsonl: the rows that show the run diverging were lost."""
    # lr 3e3 in a long warm-up: finite for some steps, then NaN, inside the first 50-step block
    bad = cfg("vanilla", train__lr=3e3, train__warmup_steps=1000, train__max_steps=100, train__log_every_steps=50,
              train__checkpoint_every_steps=0, eval__every_steps=0)
    # (on one device: on 8 CPU devices, 100 steps queued stalled XLA's all-reduce rendezvous on a loaded machine, an abort)
    with pytest.raises(TrainingError, match=r"non-finite at step \d+ ") as err:
        train(bad, tmp_path / "run", devices=jax.devices()[:1], quiet=True)
    assert err.value.step > 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(1, err.value.step)) and all(math.isfinite(m["train_loss"]) for m in rows)


def test_out_of_device_memory_is_one_line_saying_what_to_lower(tmp_path):
    """A batch or context too large for the device stops the run with one line that says what to
    lower (before: XLA's RESOURCE_EXHAUSTED traceback from the step's first result). Here a context
    of 100,000 tokens, whose attention scores alone are terabytes, on the CPU."""
    big = cfg("vanilla", model__context_len=100_000, eval__final_num_batches=1)
    with pytest.raises(TrainingError) as err:
        train(big, tmp_path / "run", quiet=True)
    message = str(err.value)
    assert "\n" not in message
    assert re.fullmatch(r"out of device memory \(Out of memory allocating \d+ bytes\.\); lower train\.batch_size \(raise "
                        r"train\.grad_accum_steps to keep the global batch\), or set model\.remat=full or train\.loss_chunks=8, "
                        r"or a shorter model\.context_len; no checkpoint was written", message), message


def test_out_of_device_memory_while_scoring_tasks_names_their_batch_size(tmp_path):
    """Out of device memory in the in-loop task scoring says to lower eval.tasks_batch_size, the
    scorer's batch: the training step's line said to lower train.batch_size, which the scoring does
    not use (here 4,000,000 sequences a batch, terabytes of logits, with train.batch_size 8)."""
    c = cfg("vanilla", data__dataset="tinyshakespeare", model__vocab_size=50257, model__padded_vocab_size=50304, train__max_steps=1,
            eval__every_steps=0, train__checkpoint_every_steps=0, eval__tasks="hellaswag", eval__tasks_limit=1,
            eval__tasks_batch_size=4_000_000, eval__tasks_dir=str(ROOT / "tests" / "fixtures"), eval__sample_tokens=0)
    with pytest.raises(TrainingError) as err:
        train(c, tmp_path / "run", quiet=True)
    assert re.fullmatch(r"out of device memory scoring eval\.tasks \(Out of memory allocating \d+ bytes\.\); lower "
                        r"eval\.tasks_batch_size \(4000000 sequences a batch\); no checkpoint was written", str(err.value)), str(err.value)


def test_resuming_with_a_different_model_is_refused(tmp_path):
    train(cfg("vanilla", train__stop_at_step=2), tmp_path / "run", quiet=True)
    with pytest.raises(ConfigError, match=r"different model config: model.d_ff \(256 -> 128\); model.n_layer \(2 -> 3\)"):
        train(cfg("vanilla", model__n_layer=3, model__d_ff=128), tmp_path / "run", quiet=True)
    # how it computes may change (matmul_dtype, like dtype and remat); and a run written before
    # matmul_dtype existed (no such key in its config.json) resumes
    saved = tmp_path / "run" / "config.json"
    old = json.loads(saved.read_text())
    del old["model"]["matmul_dtype"]
    saved.write_text(json.dumps(old))
    run = train(cfg("vanilla", train__stop_at_step=3, model__matmul_dtype="bfloat16"), tmp_path / "run", quiet=True)
    assert run.step == 3 and json.loads(saved.read_text())["model"]["matmul_dtype"] == "bfloat16"
    # a run on another dataset (its data position and tokenizer are that dataset's) is refused
    old = json.loads(saved.read_text())
    old["data"]["dataset"] = "my_corpus"
    saved.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"trained on dataset 'my_corpus' .*resume with --config.data.dataset=my_corpus or use another --workdir$"):
        train(cfg("vanilla", train__stop_at_step=4), tmp_path / "run", quiet=True)
    # checkpoints whose config.json is gone: their model is unknown, so nothing is resumed or overwritten
    for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
        (tmp_path / "run" / name).unlink()
    with pytest.raises(ConfigError, match=r"holds checkpoints \(of a model its config.json would name\) but no llmjax config.json"):
        train(cfg("vanilla", train__stop_at_step=4), tmp_path / "run", quiet=True)


def test_a_damaged_latest_checkpoint_is_one_line_and_the_earlier_one_resumes(tmp_path):
    """A run whose latest checkpoint has a truncated data file: resuming stops with one line that
    names it and how to resume from the one before; the failed attempt changes nothing in the
    workdir (config.json keeps the run's settings); with the damaged one moved aside as the line
    says, the run resumes from the earlier checkpoint and ends with every step logged once."""
    run_dir = tmp_path / "run"
    train(cfg("vanilla", train__stop_at_step=10), run_dir, quiet=True)  # checkpoints 4, 5, 8 (evaluations, every 5) and 10
    ckpts = run_dir / "checkpoints"
    biggest = max((f for f in (ckpts / "10" / "state").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])
    saved = (run_dir / "config.json").read_text()
    with pytest.raises(ConfigError) as e:
        train(cfg("vanilla", model__remat="full"), run_dir, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and f"checkpoint {ckpts}/10 cannot be restored" in msg, msg
    assert f"move it aside (`mv {ckpts}/10 {ckpts}/10.damaged`) to resume from step 8" in msg, msg
    assert (run_dir / "config.json").read_text() == saved
    (ckpts / "10").rename(ckpts / "10.damaged")
    run = train(cfg("vanilla"), run_dir, quiet=True)
    assert run.step == 12 and run.final
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_a_workdir_that_is_not_a_run_is_left_alone(tmp_path):
    """Nothing a user keeps in a folder is overwritten: a workdir holding a config.json that is not an
    llmjax run's (a Hugging Face model folder), or other files a run writes, is refused in one line
    and left as it was; a path that is a file is refused too."""
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match="is a file"):
        train(cfg("vanilla"), tmp_path / "file", quiet=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    (hf / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ConfigError, match="holds a config.json that is not an llmjax run's"):
        train(cfg("vanilla"), hf, quiet=True)
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "tokenizer.json"]
    assert (hf / "config.json").read_text() == '{"model_type": "gpt2"}'
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("my numbers\n")
    with pytest.raises(ConfigError, match="holds metrics.jsonl but no llmjax config.json"):
        train(cfg("vanilla"), other, quiet=True)
    assert sorted(p.name for p in other.iterdir()) == ["metrics.jsonl"]
    # a workdir under a file was mkdir's "Not a directory" said as a full disk is ("... then run the same command to resume")
    with pytest.raises(ConfigError, match=rf"^--workdir {re.escape(str(tmp_path))}/file/sub: {re.escape(str(tmp_path))}/file is a file, not a folder"):
        train(cfg("vanilla"), tmp_path / "file" / "sub", quiet=True)
    # one inside a run's checkpoints was taken: its files went into the run's checkpoint folders, deleted with them
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"arch": "vanilla"}, "train": {}}))
    for inside in (run / "checkpoints", run / "checkpoints" / "4", run / "checkpoints" / "new" / "sub"):
        with pytest.raises(ConfigError, match=rf"^--workdir {re.escape(str(inside))} is inside the checkpoints of the run in "
                                              rf"{re.escape(str(run))} \(whose saves are kept and deleted there\); use a --workdir outside it$"):
            train(cfg("vanilla"), inside, quiet=True)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == ["checkpoints", "checkpoints/4", "config.json"]


@pytest.mark.parametrize("key,value", [
    ("train.log_every_steps", 0), ("train.warmup_steps", -1), ("train.keep_checkpoints", 0), ("train.stop_at_step", -1),
    ("train.checkpoint_every_steps", -5), ("eval.num_batches", -1), ("eval.every_steps", -1), ("train.max_steps", 0),
    ("eval.final_num_batches", -1),
])
def test_out_of_range_settings_are_one_line_errors(key, value):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be a finite number of at least -?\d.*, got {value}$"):
        llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {key: value})


@pytest.mark.parametrize("overrides,message", [
    ({"train.seed": -1}, r"train.seed must be in \[0, 2\*\*32\), got -1"),  # (was grain's traceback, after the workdir was made)
    ({"train.seed": 2**32}, r"train.seed must be in \[0, 2\*\*32\), got 4294967296"),
    ({"train.beta1": 1.0}, r"train.beta1 must be in \[0, 1\) \(Adam's moment decay\), got 1.0"),  # (was "loss became non-finite")
    ({"train.beta2": 1.5}, r"train.beta2 must be in \[0, 1\)"),  # (trained without complaint)
    ({"train.beta1": -0.5}, r"train.beta1 must be in \[0, 1\)"),
    ({"train.min_lr": 0.5, "train.lr": 1e-3}, r"train.min_lr=0.5 is above train.lr=0.001: .* lower min_lr"),  # (the decay raised the lr)
    ({"train.lr": float("nan")}, r"train.lr must be a finite number of at least 0, got nan"),
    ({"train.weight_decay": float("inf")}, r"train.weight_decay must be a finite number of at least 0, got inf"),
])
def test_optimizer_settings_out_of_range_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", overrides)


def test_a_resume_that_changes_the_validation_estimate_says_so(tmp_path, capsys):
    """The best checkpoint (kept; --which=best) is picked by comparing the periodic validation
    estimates of every checkpoint, before a resume and after it: a resume with another
    eval.num_batches (or train.batch_size, which the windows are drawn in) estimated over other
    windows from then on, and said nothing (eval.num_batches is not a train setting)."""
    run_dir = tmp_path / "run"
    short = {"train__max_steps": 3, "eval__every_steps": 1, "eval__num_batches": 1, "train__checkpoint_every_steps": 0}
    train(cfg("vanilla", train__stop_at_step=2, **short), run_dir, quiet=True)
    capsys.readouterr()
    train(cfg("vanilla", **{**short, "eval__num_batches": 2}), run_dir, quiet=False)
    out = capsys.readouterr().out
    assert ("resuming with changed settings: train.stop_at_step (2 -> 0); eval.num_batches (1 -> 2); the validation estimates from "
            "step 3 on are over other windows than the earlier checkpoints', with which keeping the best checkpoint and --which=best "
            "compare them\n") in out, out


def test_zero_settings_resume_notices_and_a_cut_metrics_line(tmp_path, capsys):
    """`train.checkpoint_every_steps=0`: checkpoints only at evaluations and at the end;
    `eval.num_batches=0`: no estimates, only the whole-split loss at the last step. A metrics line
    cut short (a crash mid-write) does not stop the resume; the resume says which settings changed
    and that the schedule follows them; a run past the new max_steps is refused."""
    run_dir = tmp_path / "run"
    zero = {"train__checkpoint_every_steps": 0, "eval__num_batches": 0, "train__max_steps": 6, "eval__every_steps": 2}
    first = train(cfg("vanilla", train__stop_at_step=3, **zero), run_dir, quiet=True)
    assert first.step == 3 and not first.final
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3"]
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "train_lo')
    capsys.readouterr()
    run = train(cfg("vanilla", **{**zero, "train__lr": 1e-3}), run_dir, quiet=False)
    out = capsys.readouterr().out
    rates = [_reference_lr("cosine", 4, lr=lr, min_lr=3e-4, warmup=2, max_steps=6) for lr in (3e-3, 1e-3)]
    assert ("resuming with changed settings: train.lr (0.003 -> 0.001); train.stop_at_step (3 -> 0); the learning-rate schedule follows "
            f"the new values from step 4: the learning rate jumps from {rates[0]:.4g} to {rates[1]:.4g} at step 4") in out, out
    assert run.step == 6 and run.final
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == list(range(1, 7))
    assert [m["step"] for m in rows if "val_loss" in m] == [6] and "val_loss_estimate" not in rows[-1]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["3", "6"]
    with pytest.raises(ConfigError, match=r"holds a run at step 6, past train.max_steps=4; set --config.train.max_steps=6 or more"):
        train(cfg("vanilla", **{**zero, "train__max_steps": 4}), run_dir, quiet=True)


def test_bad_meshes_are_one_line_errors():
    """Mesh sizes are -1 or at least 1 and multiply to the device count; a MoE's expert axis divides
    its experts (otherwise capacity mode failed inside shard_map, and dropless silently kept every
    expert on every device)."""
    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps

    eight = jax.devices()[:8]
    for mesh, needle in [({"data": -1, "fsdp": 0}, "fsdp=0; each axis is -1"), ({"data": -2, "fsdp": -4}, "data=-2, fsdp=-4"),
                         ({"data": -1, "fsdp": -1}, "at most one axis may be -1"), ({"data": 3}, "needs 3 devices, there are 8; the mesh takes every device: make one "
                                                                                        "axis -1 (the rest of them), e.g. --config.train.mesh.data=-1"),
                         ({"data": -1, "fsdp": 3}, "does not divide 8 devices: the axes given (fsdp=3) hold 3 devices apiece; give "
                                                   "them sizes whose product divides 8")]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            make_mesh(mesh, eight)
    for mode in ("capacity", "dropless"):
        moe = cfg("moe", model__moe_mode=mode, **{"train.mesh.data": 1, "train.mesh.expert": 8})
        with pytest.raises(ConfigError, match=r"train.mesh.expert=8 must divide model.n_experts=4"):
            build_steps(moe, make_mesh(moe.train.mesh, eight))


def test_two_axes_of_minus_one_name_both_and_the_fix():
    """`--config.train.mesh.fsdp=-1` alone meets the default data=-1: the line names both axes, the
    default and the flag that fixes it (it said only "at most one axis may be -1")."""
    from llmjax.sharding import make_mesh

    with pytest.raises(ConfigError) as e:
        make_mesh({"data": -1, "fsdp": -1, "expert": 1}, jax.devices()[:8])
    assert str(e.value) == ("train.mesh: data=-1, fsdp=-1: at most one axis may be -1 (the rest of the devices) and data is -1 by "
                            "default; give the other a size, e.g. --config.train.mesh.data=1")
    with pytest.raises(ConfigError, match=r"fsdp=-1, expert=-1: .*; give the other a size, e.g. --config.train.mesh.fsdp=1$"):
        make_mesh({"data": 2, "fsdp": -1, "expert": -1}, jax.devices()[:8])
    assert make_mesh({"data": 1, "fsdp": -1}, jax.devices()[:8]).shape["fsdp"] == 8


def test_parameters_a_mesh_axis_does_not_divide_are_named_once_and_train_alike(tmp_path, capsys):
    """d_model=60 on fsdp=8: the parameters split along the model dimension cannot be split there.
    fsdp moves to another dimension it divides (the MLP kernels' hidden 256, the embeddings' rows);
    those with none (the attention kernels, 60 x 180 and 60 x 60) are replicated (as much memory
    per device as one device) and the run says so in one line at the start, naming the largest;
    the losses are one device's. A mesh that divides every parameter says nothing."""
    from flax import nnx

    from llmjax.sharding import make_mesh, param_shardings

    small = dict(model__d_model=60, model__head_dim=15, train__max_steps=4, eval__every_steps=0)
    one = losses(train(cfg("vanilla", **small), tmp_path / "one", devices=jax.devices()[:1], quiet=True))
    capsys.readouterr()
    eight = losses(train(cfg("vanilla", **small, **{"train.mesh.data": 1, "train.mesh.fsdp": 8}), tmp_path / "eight",
                         devices=jax.devices()[:8]))
    np.testing.assert_allclose([eight[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=2e-5)
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train.mesh")]
    assert said == ["train.mesh: 28.4% of the parameters (2 array(s)) are replicated, not split, over a mesh axis that does not divide "
                    "their dimension: blocks/layers/attn/qkv_proj/kernel (2, 60, 180) (fsdp=8 does not divide 60 or a dimension it may move to); "
                    "blocks/layers/attn/o_proj/kernel (2, 60, 60) (fsdp=8 does not divide 60 or a dimension it may move to)"], said
    c = cfg("vanilla", **small)
    specs = jax.tree.map(lambda s: tuple(s.spec), param_shardings(nnx.to_pure_dict(nnx.state(
        nnx.eval_shape(lambda: llmjax.build_model(c)), nnx.Param)), make_mesh({"data": 1, "fsdp": 8}, jax.devices()[:8])))
    assert specs["blocks"]["layers"]["mlp"]["fc"]["kernel"] == (None, None, "fsdp")  # (layers, embed 60, hidden 256)
    assert specs["blocks"]["layers"]["mlp"]["proj"]["kernel"] == (None, "fsdp", None)
    assert specs["embed"]["embedding"] == ("fsdp", None) and specs["pos_embed"]["embedding"] == ("fsdp", None)  # (128 and 32 rows)
    assert specs["blocks"]["layers"]["attn"]["qkv_proj"]["kernel"] == (None, None, None)  # (2 layers: a scanned stack is never split)
    train(cfg("vanilla", train__max_steps=1, eval__every_steps=0, **{"train.mesh.data": 1, "train.mesh.fsdp": 8}), tmp_path / "fits",
          devices=jax.devices()[:8])
    assert "train.mesh" not in capsys.readouterr().out


def test_a_mesh_axis_never_moves_onto_an_output_sliced_per_head(capfd):
    """MLA slices each query head into its nope and rope parts (and kv_down's output into the latent
    and the key's rope part): with d_model=60 on fsdp=8, fsdp moved onto q_proj's and kv_down's
    output split those slices across devices, and XLA gathered the attention's activations whole on
    every device to cut them ("Involuntary full rematerialization", 15 all-to-alls and 20
    collective-permutes in the step; 2.5x its time on CPU). Those two stay whole and are named; the
    MLP kernels and the embedding still move, never onto a dimension of heads or latents
    (llmjax.sharding.FALLBACK_AXES; compiled here, not loaded from the persistent cache, which would
    skip the partitioner)."""
    from flax import nnx

    from llmjax.sharding import make_mesh, param_shardings
    from llmjax.train import build_steps

    c = cfg("mla", model__d_model=60, model__d_ff=168, model__kv_lora_rank=36, model__qk_rope_dim=4, model__v_head_dim=15,
            **{"train.mesh.data": 1, "train.mesh.fsdp": 8})
    mesh = make_mesh(c.train.mesh, jax.devices()[:8])
    specs = jax.tree.map(lambda s: tuple(s.spec), param_shardings(nnx.to_pure_dict(nnx.state(
        nnx.eval_shape(lambda: llmjax.build_model(c)), nnx.Param)), mesh))
    attn, mlp = specs["blocks"]["layers"]["attn"], specs["blocks"]["layers"]["mlp"]
    assert attn["q_proj"]["kernel"] == attn["kv_down"]["kernel"] == (None, None, None)  # (60 x 80, 60 x 40)
    assert mlp["gate"]["kernel"] == (None, None, "fsdp") and specs["embed"]["embedding"] == ("fsdp", None)
    steps = build_steps(c, mesh)
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        capfd.readouterr()
        with jax.set_mesh(mesh):
            toks = jax.ShapeDtypeStruct((1, c.train.batch_size, c.model.context_len + 1), jnp.int32, sharding=steps.tok_shard)
            steps.train_step.lower(jax.eval_shape(steps.init_state), toks).compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    err = capfd.readouterr().err
    assert "Involuntary full rematerialization" not in err, err[-2000:]


def test_vocab_mismatch_and_missing_dataset_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="set --config.model.vocab_size=65$"):
        train(cfg("vanilla", model__vocab_size=60), tmp_path / "a", quiet=True)
    # a character config on GPT-2 BPE data: both sizes in the one line (the table too small for 50257)
    with pytest.raises(ConfigError, match="set --config.model.vocab_size=50257 --config.model.padded_vocab_size=50304$"):
        train(cfg("vanilla", data__dataset="tinyshakespeare"), tmp_path / "a", quiet=True)
    with pytest.raises(ConfigError, match="python -m llmjax.prepare fineweb_edu"):
        train(cfg("vanilla", data__dataset="fineweb_edu"), tmp_path / "b", quiet=True)
    with pytest.raises(ConfigError, match=r"unknown dataset 'tinyshakespeare_chr' \(did you mean 'tinyshakespeare_char'\?\).*"
                                          r"llmjax.prepare knows tinyshakespeare, .*--source FILE$"):
        train(cfg("vanilla", data__dataset="tinyshakespeare_chr"), tmp_path / "c", quiet=True)


def test_a_shard_changed_since_it_was_prepared_stops_the_run_before_anything_is_saved(tmp_path, monkeypatch):
    """One flipped bit in a prepared shard (same size, so the header check passes): the sha256
    check, run while the first step compiles, stops the run after that step in one line, with no
    checkpoint written; the intact dataset trains."""
    from llmjax import data as D

    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path / "data"))
    ds = D.open_dataset("tinyshakespeare_char", "unused")
    shard = ds.path / ds.manifest["splits"]["train"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 1
    shard.write_bytes(bytes(raw))
    c = cfg("vanilla", train__max_steps=3)
    with pytest.raises(ConfigError, match=r"^dataset 'tinyshakespeare_char' in .*tinyshakespeare_char: train_0000\.bin changed since it "
                                          r"was prepared \(its sha256 differs from the manifest's\); delete that folder and prepare it again\. "
                                          r"Stopped at step 1, nothing saved$"):
        train(c, tmp_path / "run", devices=jax.devices()[:1], quiet=True)
    assert not [p for p in (tmp_path / "run" / "checkpoints").glob("*") if p.name.isdigit()]
    raw[len(raw) // 2] ^= 1
    shard.write_bytes(bytes(raw))
    assert train(c, tmp_path / "run", devices=jax.devices()[:1], quiet=True).step == 3


def test_cli_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        _train_cmd(tmp_path / "run", "--config.data.dataset=tinystories"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset 'tinystories' is not prepared"), proc.stderr
    assert "python -m llmjax.prepare tinystories" in lines[0]


def test_a_train_split_smaller_than_one_batch_is_refused_in_one_line(tmp_path, monkeypatch):
    """A train split with fewer windows than one batch's rows (39 tokens: 7 windows of TINY's 33 for
    a batch of 8) is refused before the run, in one line that gives the sizes and what to change; it
    trained, grain's repeat filling each batch with the same windows again (65 tokens at
    context 64: 8 copies of one window). At 8 windows it trains, on a validation split of one
    window (its estimates draw windows with replacement, its whole-split loss pads)."""
    from llmjax import data as D

    ds = D.open_dataset("tinyshakespeare_char", "unused")
    chars, tokenizer = np.asarray(ds.split("train")[0][:1000]), ds.manifest["tokenizer"]
    for name, n in (("small", 39), ("enough", 40)):
        out = tmp_path / "data" / name
        D.write_manifest(out, name, tokenizer, {"train": [D.write_shard(out / "train_0000.bin", chars[:n])],
                                                "val": [D.write_shard(out / "val_0000.bin", chars[500:533])]})
    proc = subprocess.run(_train_cmd(tmp_path / "run", "--config.data.dataset=small"), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=_env(LLMJAX_DATA_DIR=str(tmp_path / "data")))
    assert proc.returncode == 2 and proc.stderr == (
        "error: dataset 'small': the train split is too small for one batch: 39 tokens hold 7 windows of 33 tokens "
        "(model.context_len + 1), and one batch needs 8 different windows (train.batch_size x train.grad_accum_steps), 40 tokens "
        "or more; lower train.batch_size or model.context_len, or prepare the dataset from more text\n"), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path / "data"))
    run = train(cfg(data__dataset="enough", train__max_steps=2, eval__every_steps=1), tmp_path / "run", quiet=True)
    assert run.step == 2 and np.isfinite(run.last_val_loss)


def test_cli_says_what_the_final_val_loss_covers(tmp_path):
    """The CLI's last line said '(whole validation split)' of a loss over the split's first
    eval.final_num_batches batches (the tiny recipe's 20: 4.1003 against the whole split's 4.0988),
    and 'first N batches' of a split with fewer than N (the whole split, as 0 gives)."""
    from llmjax.train import final_loss_covers

    workdir = tmp_path / "run"
    assert [final_loss_covers(cfg("vanilla", **{"eval.final_num_batches": n}), 4) for n in (0, 3, 4)] == [
        "the whole validation split", "the validation split's first 3 batches", "the whole validation split"]
    from helpers import cli_cases

    said = ((3, "the validation split's first 3 batches"), (10**6, "the whole validation split"))  # (then a finished run again)
    procs = cli_cases("llmjax.train", [_train_cmd(workdir, "--config.train.max_steps=2", f"--config.eval.final_num_batches={n}")[3:]
                                       for n, _ in said], env=_env(), timeout=300)  # (one after the other)
    for (n, words), proc in zip(said, procs):
        assert proc.returncode == 0, proc.stderr[-3000:]
        done = [re.fullmatch(rf"done: 2 steps, final val_loss (\S+) \({words}\); run in {re.escape(str(workdir))}", line)
                for line in proc.stdout.splitlines() if line.startswith("done: ")]
        assert len(done) == 1 and done[0], proc.stdout[-2000:]
        assert float(done[0][1]) == pytest.approx(_whole_split_loss(workdir, 2, n if n < 10**6 else None), abs=1e-4)


def test_the_done_line_is_the_commands_last_after_the_sample(tmp_path):
    """`done: ...` is the command's last line (the README's word): it came before the end-of-run
    sample (eval.sample_tokens, 200 by default), so the summary was lost above the sample's text."""
    proc = subprocess.run(_train_cmd(tmp_path / "run", "--config.train.max_steps=2", "--config.eval.sample_tokens=8"), cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.rstrip("\n").splitlines()
    assert lines[-1].startswith("done: 2 steps, final val_loss ") and "--- sample ---" in lines[:-1], proc.stdout[-2000:]


def test_bad_multi_process_flags_are_one_line(tmp_path):
    """jax.distributed's flags that cannot start a run: one line, no traceback (a ValueError or an
    IndexError from jax.distributed's address parsing, with its traceback, before)."""
    from helpers import cli_cases

    cases = [(["--num_processes=2", "--process_id=0"], "--coordinator_address"),
             (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"], "--process_id=2"),
             (["--coordinator_address=localhost", "--num_processes=1", "--process_id=0"], "--coordinator_address=localhost must be host:port"),
             (["--process_id=1"], "--coordinator_address=HOST:PORT")]  # (was ignored: a whole run in one process, in the shared workdir)
    got = cli_cases("llmjax.train", [_train_cmd(tmp_path / f"run{k}", *flags)[3:] for k, (flags, _) in enumerate(cases)], env=_env(), timeout=120)
    for k, ((flags, needle), proc) in enumerate(zip(cases, got)):
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (flags, proc.stderr[-3000:])
        assert not (tmp_path / f"run{k}").exists()


def test_a_zero_or_negative_process_count_or_an_empty_coordinator_is_one_line(tmp_path):
    """--num_processes=0 or --coordinator_address= alone (falsy values) were ignored: the run
    trained as one process alone, in what is meant to be a shared workdir; --num_processes=-2 said
    '--process_id=0 must be in 0..-3'."""
    from helpers import cli_cases

    got = cli_cases("llmjax.train", [_train_cmd(tmp_path / f"run{k}", *flags)[3:] for k, flags in enumerate([
        ["--num_processes=0"],
        ["--coordinator_address="],
        ["--coordinator_address=127.0.0.1:1", "--num_processes=-2", "--process_id=0"],
    ])], env=_env(), timeout=120)
    needles = ["--num_processes=0 must be at least 1", "--coordinator_address= must be host:port", "--num_processes=-2 must be at least 1"]
    for k, (r, needle) in enumerate(zip(got, needles)):
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (k, r.stderr[-3000:])
        assert not (tmp_path / f"run{k}").exists()


def test_a_coordinator_jax_distributed_cannot_reach_is_one_line(tmp_path):
    """A --coordinator_address that jax.distributed cannot start with is one line, at once: it ended
    the process with a C++ abort and its stack after 5 minutes (a host that does not resolve; no
    coordinator listening, to the other processes), or with gRPC's log line above ours (process 0's
    port held by another program), or trained alone (a port out of range, in a one-process run)."""
    from helpers import cli_cases
    from llmjax.train import coordinator_problem

    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        got = cli_cases("llmjax.train", [_train_cmd(tmp_path / f"run{k}", *flags)[3:] for k, flags in enumerate([
            [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=1", "--process_id=0"],
            ["--coordinator_address=nosuchhost.invalid:1234", "--num_processes=2", "--process_id=1"],
            ["--coordinator_address=127.0.0.1:99999", "--num_processes=1", "--process_id=0"],
        ])], env=_env(), timeout=120)
        needles = [f"process 0 cannot listen on port {port} (Address already in use", "host 'nosuchhost.invalid' cannot be resolved",
                   "port 99999 is not a TCP port (1..65535)"]
        for k, (r, needle) in enumerate(zip(got, needles)):
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
            assert lines[0].startswith("error: --coordinator_address=") and needle in lines[0], lines[0]
            assert not (tmp_path / f"run{k}").exists()
        # the other processes wait for process 0's coordinator to listen (for as long as jax.distributed would), then say so
        assert coordinator_problem(f"127.0.0.1:{port}", 1, wait_s=0.5) is None
    t = time.monotonic()
    said = coordinator_problem(f"127.0.0.1:{port}", 1, wait_s=0.5)
    assert said.startswith(f"no coordinator listens at --coordinator_address=127.0.0.1:{port} after 0.5 s"), said
    assert time.monotonic() - t < 5
    assert coordinator_problem(f"[::1]:{port}", 0) is None  # (the port free again; an IPv6 address in brackets)


def test_a_process_that_never_joins_is_one_line_in_the_others(tmp_path):
    """Process 0 of two started alone (process 1's command never run) waits for it as long as
    jax.distributed would, then says so in one line, exit status 2: jax.distributed ended it with a
    C++ abort and its stack, 5 minutes on (here the wait is cut to 3 s)."""
    port = _free_port()
    code = ("import sys\n"
            "from llmjax import cli, train as T\n"
            "T.COORDINATOR_WAIT_S = 3\n"
            f"sys.argv = ['train', '--config', 'configs/vanilla.py:tiny', '--workdir', {str(tmp_path / 'run')!r}, "
            f"'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--process_id=0']\n"
            "T.define_flags()\n"
            "cli.run(T.main)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == (f"error: not every process joined the run at --coordinator_address=127.0.0.1:{port} within "
                                              f"3 s; start every one (--process_id=0..1) with the same --coordinator_address and "
                                              f"--num_processes\n"), (r.returncode, r.stderr[-2000:])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
def test_a_signal_while_waiting_for_the_other_processes_is_one_line(tmp_path, signum):
    """A Ctrl-C or SIGTERM to process 0 while it waits for the others to join said its line, then
    Python's exit shut down jax.distributed's service half-started in its thread: some 17 lines of
    its logs ('Barrier failed because service is shutting down', 'Stopping coordination service as
    cluster registration failed ...'), seconds later."""
    code = ("import os, signal, sys, threading, jax\n"
            "from llmjax import cli, train as T\n"
            "initialize = jax.distributed.initialize\n"
            "def waiting(**kw):  # (its service listening, process 1 not there)\n"
            f"    threading.Timer(2, os.kill, (os.getpid(), {int(signum)})).start()\n"
            "    initialize(**kw)\n"
            "jax.distributed.initialize = waiting\n"
            f"sys.argv = ['train', '--config', 'configs/vanilla.py:tiny', '--workdir', {str(tmp_path / 'run')!r}, "
            f"'--coordinator_address=127.0.0.1:{_free_port()}', '--num_processes=2', '--process_id=0']\n"
            "T.define_flags()\n"
            "cli.run(T.main)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    said = ("error: interrupted\n", 130) if signum == signal.SIGINT else ("error: interrupted by SIGTERM\n", 143)
    assert (r.stderr, r.returncode) == said, (r.returncode, r.stderr[-2000:])
    assert not (tmp_path / "run").exists()


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    run = train(cfg("vanilla", logging__wandb=True, train__max_steps=4), tmp_path / "run", quiet=True)
    assert run.final
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert offline, list((tmp_path / "run").rglob("*"))[:20]


def test_wandb_that_cannot_start_is_one_line_and_leaves_no_workdir(tmp_path, monkeypatch):
    """logging.wandb=True without an API key (not offline) was wandb's UsageError traceback, after the
    run's config.json, tokenizer.json, metrics.jsonl and wandb_id.txt were written."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # (an offline run earlier in this process left W&B's settings offline)
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_CONFIG_DIR", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # (no ~/.netrc, no wandb settings)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # (no .env)
    with pytest.raises(ConfigError, match=r"^logging\.wandb=True: Weights & Biases could not start \(UsageError: No API key configured\..*\); "
                                          r"put WANDB_API_KEY in a \.env file .*WANDB_MODE=offline"):
        train(cfg("vanilla", logging__wandb=True, train__max_steps=2), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    wandb.teardown()  # (nor this test's settings for a later one)


def test_a_wandb_variable_wandb_refuses_is_one_line_and_leaves_no_workdir(tmp_path, monkeypatch):
    """A WANDB_* variable whose value W&B's settings refuse (WANDB_MODE=offlin) was pydantic's
    ValidationError traceback ("1 validation error for Settings")."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "offlin")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^logging\.wandb=True: Weights & Biases could not start: WANDB_MODE='offlin': Input should be "
                                          r"'online', 'offline', .*; correct or unset it \(in the environment or the \.env file .*\)$"):
        train(cfg("vanilla", logging__wandb=True, train__max_steps=2), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    wandb.teardown()


def test_a_wandb_project_name_wandb_refuses_says_which_setting_to_change(tmp_path, monkeypatch):
    """A project name W&B refuses (a '/' in it) said to put WANDB_API_KEY in .env or set
    WANDB_MODE=offline, which it was already; it names the setting that gave the name."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^logging\.wandb=True: Weights & Biases could not start \(UsageError: Invalid project name "
                                          r"'my/proj': .*\); set --config\.logging\.wandb_project to another name$"):
        train(cfg("vanilla", logging__wandb=True, logging__wandb_project="my/proj", train__max_steps=2), tmp_path / "run", quiet=True)
    monkeypatch.setenv("WANDB_PROJECT_NAME", "a:b")  # (it overrides the config's)
    with pytest.raises(ConfigError, match=r"\(UsageError: Invalid project name 'a:b': .*\); set WANDB_PROJECT_NAME \(in the environment "
                                          r"or the \.env file in the folder you run from\) to another name$"):
        train(cfg("vanilla", logging__wandb=True, train__max_steps=2), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    wandb.teardown()


def test_a_fresh_run_refused_after_its_workdir_was_made_leaves_no_folder(tmp_path, monkeypatch):
    """Refusals found after the workdir was made left it behind: an empty checkpoints/ folder
    (train.init_from weights that cannot be read), or config.json, tokenizer.json and an empty
    metrics.jsonl (logging.wandb=True without the extra). A folder that was there is kept, with
    nothing the run made in it (an empty checkpoints/ was left)."""
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ConfigError, match=r"^train\.init_from: '.*missing\.safetensors' is neither"):
        train(cfg("vanilla", train__init_from=str(missing)), tmp_path / "runs" / "a", quiet=True)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"^train\.init_from: "):
        train(cfg("vanilla", train__init_from=str(missing)), tmp_path / "mine", quiet=True)
    # kept with what was in it, and nothing the run made (an empty checkpoints/ was left)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "mine" / "checkpoints").mkdir()  # a checkpoints/ folder that was there (empty) is the user's: kept
    with pytest.raises(ConfigError, match=r"^train\.init_from: "):
        train(cfg("vanilla", train__init_from=str(missing)), tmp_path / "mine", quiet=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["checkpoints", "notes.txt"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # (the extra not installed: `import wandb` raises ImportError)
    with pytest.raises(ConfigError, match=r"^logging\.wandb=True needs the wandb extra: bash scripts/setup\.sh wandb$"):
        train(cfg("vanilla", logging__wandb=True), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_wandb_rows_are_committed_at_once(tmp_path, monkeypatch):
    """Every row is committed as it is logged: W&B holds a row logged with a step until the next
    step's, so a crash (a kill, out of memory) lost the last row before it for good, often an
    evaluation row (the resumed run logs from the checkpoint on)."""
    import llmjax.train as T

    calls, finished = [], []

    class FakeRun:
        def log(self, row, **kw):
            calls.append(kw)

        def finish(self, exit_code=None):
            finished.append(exit_code)

    monkeypatch.setattr(T, "_wandb_init", lambda cfg, workdir: FakeRun())
    train(cfg("vanilla", logging__wandb=True, train__max_steps=4, train__log_every_steps=1), tmp_path / "run", quiet=True)
    assert [c["step"] for c in calls] == [1, 2, 3, 4] and all(c.get("commit") is True for c in calls)
    # a run stopped by an error is failed in W&B (it was finished, as one that ran to its end)
    assert finished == [0]
    with pytest.raises(TrainingError, match=r"non-finite at step 2 "):
        train(cfg("vanilla", logging__wandb=True, train__lr=1e10, train__warmup_steps=5, train__checkpoint_every_steps=1, eval__every_steps=0),
              tmp_path / "bad", quiet=True)  # (test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint's run)
    assert finished == [0, 1]


def test_checkpoints_keep_the_last_k_plus_the_best(tmp_path):
    import grain

    from llmjax.checkpoint import Checkpointer

    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    state = {"w": np.zeros(3, np.float32)}
    for step, val in zip(range(1, 7), [3.0, 1.0, None, 4.0, None, 5.0]):
        state = {"w": np.full(3, step, np.float32)}
        ckpt.save(step, state, it, {"step": step}, val_loss=val)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]  # the best (val 1.0) and the last two
    assert ckpt.best_step() == 2
    restored, meta = ckpt.restore(2, {"w": jax.ShapeDtypeStruct((3,), np.float32)})
    np.testing.assert_array_equal(restored["w"], np.full(3, 2, np.float32))
    assert meta == {"step": 2}
    ckpt.close()


def test_cpu_compile_options_are_for_float32_only(monkeypatch):
    """The YNNPACK fusion mode (llmjax/runtime.py) goes to float32 steps on the CPU only: it computes
    bfloat16 dots less accurately, and other backends do not have it."""
    from llmjax.runtime import CPU_FLOAT32_OPTIONS, cpu_compiler_options

    assert cpu_compiler_options("float32", "cpu") == CPU_FLOAT32_OPTIONS
    assert cpu_compiler_options("bfloat16", "cpu") is None
    assert cpu_compiler_options("float32", "gpu") is None
    monkeypatch.setenv("LLMJAX_NO_XLA_TUNING", "1")
    assert cpu_compiler_options("float32", "cpu") is None


def test_deterministic_option_reaches_gpu_steps_only():
    """train.deterministic compiles the GPU steps with XLA's deterministic ops (tests/gpu checks that
    two runs then agree bit for bit); the CPU, deterministic anyway, keeps its own options; an older
    run's config without the key means off."""
    from llmjax.runtime import CPU_FLOAT32_OPTIONS
    from llmjax.train import DETERMINISTIC_GPU_OPTIONS, step_compiler_options

    cfg = llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"train.deterministic": True})
    mcfg = llmjax.model_config(cfg.model)
    assert step_compiler_options(mcfg, cfg.train, "gpu") == DETERMINISTIC_GPU_OPTIONS
    assert step_compiler_options(mcfg, cfg.train, "cpu") == CPU_FLOAT32_OPTIONS
    off = llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny")
    assert off.train.deterministic is False and step_compiler_options(mcfg, off.train, "gpu") is None
    old = off.train.to_dict()
    del old["deterministic"]
    assert step_compiler_options(mcfg, ml_collections.ConfigDict(old), "gpu") is None


@pytest.mark.parametrize("arch", sorted(llmjax.ARCHS))
def test_tuned_cpu_step_matches_xla_defaults(arch, monkeypatch):
    """Three float32 training steps compiled with the CPU compile options agree with the same steps
    compiled with XLA's defaults (the options change which kernels run, not the arithmetic)."""
    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps

    c = cfg(arch, model__dtype="float32")
    mesh = make_mesh(c.train.mesh, jax.devices()[:1])
    batches = np.random.default_rng(0).integers(0, 65, (3, 1, 8, 33)).astype(np.int32)

    def run():
        steps = build_steps(c, mesh)
        with jax.set_mesh(mesh):
            state, out = steps.init_state(), []
            hlo = steps.train_step.lower(state, jax.device_put(batches[0], steps.tok_shard)).compile().as_text()
            for b in batches:
                state, m = steps.train_step(state, jax.device_put(b, steps.tok_shard))
                out.append(float(m["train_loss"]))
        return out, jax.device_get(state["params"]), hlo

    tuned = run()
    monkeypatch.setenv("LLMJAX_NO_XLA_TUNING", "1")
    plain = run()
    assert tuned[2] != plain[2]  # the options reached the compiler
    np.testing.assert_allclose(tuned[0], plain[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(tuned[1]), jax.tree.leaves(plain[1])):
        # Adam divides by sqrt(v): a parameter whose gradient is at rounding level (an MoE router's
        # entries start at ~1e-6) moves by a few 1e-6 either way; 1e-5 is 1% of the step's lr
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def replay_nanogpt_parity(overrides: dict):
    """The quickstart recipe's 60 training steps from nanoGPT's initial weights on nanoGPT's batches
    (scripts/nanogpt_parity.py): (llmjax's per-step metrics, nanoGPT's)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import nanogpt_parity as ref

    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps, make_optimizer

    fixture = json.loads(ref.FIXTURE.read_text())
    c = llmjax.load_config(f"{ROOT}/configs/shakespeare_char.py", overrides)
    assert fixture["recipe"] == ref.RECIPE
    r = ref.RECIPE
    assert (c.model.n_layer, c.model.n_head, c.model.d_model, c.model.d_ff, c.model.context_len, c.model.bias) == (
        r["n_layer"], r["n_head"], r["n_embd"], 4 * r["n_embd"], r["block_size"], False)
    assert (c.train.batch_size, c.train.lr, c.train.min_lr, c.train.warmup_steps, c.train.max_steps, c.train.weight_decay,
            c.train.beta1, c.train.beta2, c.train.grad_clip) == (
        r["batch_size"], r["learning_rate"], r["min_lr"], r["warmup_iters"], r["lr_decay_iters"], r["weight_decay"],
        r["beta1"], r["beta2"], r["grad_clip"])
    mesh = make_mesh(c.train.mesh, jax.devices()[:1])
    steps = build_steps(c, mesh)
    tx, _ = make_optimizer(c.train)
    with jax.set_mesh(mesh):
        params = jax.device_put(ref.to_llmjax(ref.init_weights(), c.model.padded_vocab_size), steps.state_shard["params"])
        state = steps.init_state()
        state = {**state, "params": params, "opt": jax.device_put(tx.init(params), steps.state_shard["opt"])}
        got = []
        for b in ref.batches():
            state, m = steps.train_step(state, jax.device_put(b[None], steps.tok_shard))
            got.append(jax.device_get(m))
    want = fixture["steps"]
    assert len(got) == len(want) == ref.STEPS
    return got, want


def test_narrow_matmul_steps_compile_with_xla_defaults(monkeypatch):
    """A model with matmul_dtype='bfloat16' gets no YNNPACK fusion option (that mode rounds a bfloat16
    dot's float32 result to bfloat16 precision and runs it slower): its compiled step is the same
    with and without LLMJAX_NO_XLA_TUNING."""
    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps

    c = cfg("vanilla", model__dtype="float32", model__matmul_dtype="bfloat16")
    mesh = make_mesh(c.train.mesh, jax.devices()[:1])
    batch = np.zeros((1, 8, 33), np.int32)

    def hlo():
        steps = build_steps(c, mesh)
        with jax.set_mesh(mesh):
            text = steps.train_step.lower(steps.init_state(), jax.device_put(batch, steps.tok_shard)).compile().as_text()
        # the program without its debug info (the source-file / stack-frame tables and each
        # instruction's metadata, which depend on what was traced before)
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(("%", "ENTRY")))
        return re.sub(r", metadata=\{[^}]*\}", "", "\n".join(lines[:1] + lines[start:]))

    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # (an executable loaded from the cache prints differently)
    try:
        texts = []
        for plain in (False, True):
            if plain:
                monkeypatch.setenv("LLMJAX_NO_XLA_TUNING", "1")
            texts.append(hlo())
        assert "bf16" in texts[0] and texts[0] == texts[1]
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def test_train_step_matches_nanogpt():
    """The CPU quickstart's recipe (configs/shakespeare_char.py) in float32 replayed step for step
    against PyTorch nanoGPT (float32 on the CPU): same initial weights, same batches; nanoGPT's loss,
    gradient norm and learning rate at each of 60 steps are in tests/fixtures/nanogpt_parity.json
    (scripts/nanogpt_parity.py wrote it). The model, AdamW with its decay mask, clipping, the warm-up
    and the cosine schedule all take part."""
    got, want = replay_nanogpt_parity({"model.matmul_dtype": ""})
    np.testing.assert_allclose([float(m["lr"]) for m in got], [w["lr"] for w in want], rtol=1e-5)  # float32 vs Python floats
    np.testing.assert_allclose([float(m["train_loss"]) for m in got], [w["loss"] for w in want], rtol=0, atol=5e-5)
    np.testing.assert_allclose([float(m["grad_norm"]) for m in got], [w["grad_norm"] for w in want], rtol=1e-3)


def test_quickstart_with_bfloat16_matmuls_tracks_nanogpt():
    """The recipe as shipped (bfloat16 matmul operands, float32 everything else) follows nanoGPT's
    float32 trajectory within bfloat16 rounding over the same 60 steps."""
    assert llmjax.load_config(f"{ROOT}/configs/shakespeare_char.py").model.matmul_dtype == "bfloat16"
    got, want = replay_nanogpt_parity({})
    # measured: loss within 2.0e-4, gradient norm within 0.18% (float32: 5e-5 and 0.1%)
    np.testing.assert_allclose([float(m["train_loss"]) for m in got], [w["loss"] for w in want], rtol=0, atol=1e-3)
    np.testing.assert_allclose([float(m["grad_norm"]) for m in got], [w["grad_norm"] for w in want], rtol=1e-2)


@pytest.mark.parametrize("arch", sorted(llmjax.ARCHS))
def test_chunked_loss_has_the_plain_loss_value_and_gradients(arch):
    """`train.loss_chunks`: the loss over slices of the vocabulary (each slice's logits recomputed in
    the backward pass) equals the plain loss over the whole logits, value and gradients, in float32,
    with targets in every slice and padded rows in the last; the model's call is its head over its
    features."""
    from flax import nnx

    from helpers import tokens
    from llmjax.loss import cross_entropy, token_losses

    m = llmjax.build_model(cfg(arch, model__dtype="float32").model, seed=0)
    assert m.cfg.padded_vocab_size == 128 and m.cfg.vocab_size == 65
    graphdef, state = nnx.split(m)
    toks = tokens(1, 2, 33)

    def loss(state, chunks):
        model = nnx.merge(graphdef, state)
        x, _, aux = model.features(toks[:, :-1])
        return token_losses(model.embed, x, toks[:, 1:], chunks).mean()

    plain_logits = m(toks[:, :-1])[0]
    np.testing.assert_array_equal(plain_logits, m.head(m.features(toks[:, :-1])[0]))
    v0, g0 = jax.value_and_grad(loss)(state, 0)
    np.testing.assert_allclose(v0, cross_entropy(plain_logits, toks[:, 1:]), rtol=1e-6)
    for chunks in (2, 4, 8):  # slices of 64, 32, 16 rows: with 4 and 8, some hold only padded rows
        v, g = jax.value_and_grad(loss)(state, chunks)
        np.testing.assert_allclose(v, v0, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(b).max()) + 1e-9)
    with pytest.raises(ValueError, match="must divide"):
        loss(state, 3)


BIG_VOCAB = {"model__vocab_size": 50257, "model__padded_vocab_size": 50304}


def two_steps_and_eval(config):
    """(per step (train loss, grad norm), then the eval step's (loss sum, token count) over a batch
    with 5 masked positions per row; the compiled step's temporaries) of two steps at GPT-2's vocabulary."""
    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps

    batches = np.random.default_rng(0).integers(0, 50257, (2, 1, 8, 33)).astype(np.int32)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    steps = build_steps(config, mesh)
    with jax.set_mesh(mesh):
        state, out = steps.init_state(), []
        compiled = steps.train_step.lower(state, jax.device_put(batches[0], steps.tok_shard)).compile()
        for b in batches:
            state, m = compiled(state, jax.device_put(b, steps.tok_shard))
            out.append((float(m["train_loss"]), float(m["grad_norm"])))
        mask = np.ones((8, 32), np.float32)
        mask[:, :5] = 0
        total, count = steps.eval_step(state["params"], jax.device_put(batches[0, 0], steps.eval_shard),
                                       jax.device_put(mask, steps.eval_shard))
        out.append((float(total), float(count)))  # the validation loss's sums go through the same path
    return out, compiled.memory_analysis().temp_size_in_bytes


def test_loss_chunks_train_alike_and_hold_less_memory():
    """Two float32 training steps and an evaluation with train.loss_chunks=8 match the plain ones; at GPT-2's
    vocabulary the compiled step's temporaries shrink by more than the float32 logits; a count that
    does not divide the table is a one-line config error."""
    def run(chunks):
        return two_steps_and_eval(cfg("vanilla", train__loss_chunks=chunks, model__dtype="float32", **BIG_VOCAB))

    # (parameters are not compared entry by entry: Adam's first steps move an entry whose gradient
    # is at rounding level by up to lr either way; the previous test compares the gradients)
    plain, chunked = run(0), run(8)
    np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-5)
    logits_bytes = 8 * 32 * 50304 * 4
    assert chunked[1] < plain[1] - logits_bytes, (chunked[1], plain[1])
    # (a count that does not divide the padded vocabulary is refused by the config check, before anything is built)
    with pytest.raises(ConfigError, match=r"^train\.loss_chunks=12 must be 0 \(off\) or divide model\.padded_vocab_size=128 \(e\.g\. 16, 32, 64\)$"):
        llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"train.loss_chunks": 12})


def test_bf16_logits_train_like_float32_logits_and_hold_less_memory():
    """train.logits_dtype: auto is the compute dtype (float32 for a float32 model); a bf16 model's
    two steps and evaluation with bf16 logits stay within bf16 rounding of float32 logits; the
    compiled step's temporaries shrink by more than a quarter of the float32 logits at GPT-2's
    vocabulary; an unknown dtype is a one-line config error."""
    from llmjax.train import loss_logits_dtype

    assert loss_logits_dtype(llmjax.model_config(cfg()), cfg().train) == jnp.float32
    bf16 = cfg(model__dtype="bfloat16")
    assert loss_logits_dtype(llmjax.model_config(bf16), bf16.train) == jnp.bfloat16

    def run(dtype):
        return two_steps_and_eval(cfg("vanilla", train__logits_dtype=dtype, model__dtype="bfloat16", **BIG_VOCAB))

    wide, narrow = run("float32"), run("auto")
    np.testing.assert_allclose(narrow[0], wide[0], rtol=2**-8)
    assert narrow[0] != wide[0]  # (the option is in effect)
    # (XLA's CPU compile saves 3/4 of the bf16 logits' size here; compiled for an H200, vanilla at
    # batch 16 saves twice their size, 3.2 GB: llmjax.aot, docs/benchmarks.md)
    assert narrow[1] < wide[1] - 8 * 32 * 50304 * 2 // 2, (narrow[1], wide[1])
    with pytest.raises(ConfigError, match=r"^train\.logits_dtype='float16' is not one of auto, float32, bfloat16 \(did you mean 'bfloat16'\?\)$"):
        llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"train.logits_dtype": "float16"})


def _reference_lr(schedule: str, step: int, *, lr, min_lr, warmup, max_steps, fraction=0.2) -> float:
    """The learning rate step `step` (from 1) runs at, in plain Python: nanoGPT's warm-up (lr * s /
    (W + 1)), then cosine from lr to min_lr over steps W+1 .. max_steps+1 (nanoGPT's get_lr(s - 1)),
    wsd (lr, then the last round(fraction * max_steps) steps linear to min_lr at max_steps + 1) or lr."""
    c = step - 1  # (the updates applied before it)
    if c < warmup:
        return lr / (warmup + 1) + (lr - lr / (warmup + 1)) * c / warmup
    if schedule == "cosine":
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (c - warmup) / (max_steps - warmup)))
    if schedule == "constant":
        return lr
    start = max_steps - max(1, round(fraction * max_steps))
    return lr if c < start else lr + (min_lr - lr) * (c - start) / (max_steps - start)


@pytest.mark.parametrize("schedule,fraction", [("cosine", 0.2), ("wsd", 0.2), ("wsd", 0.5), ("wsd", 1.0), ("constant", 0.2)])
def test_learning_rate_schedules_match_a_plain_reference(schedule, fraction):
    from llmjax.train import lr_schedule

    for warmup, max_steps in ((5, 50), (0, 20), (3, 7)):
        if schedule == "wsd" and max_steps - max(1, round(fraction * max_steps)) < warmup:
            continue  # (refused: test_bad_schedules_are_one_line_errors)
        t = cfg(train__schedule=schedule, train__decay_fraction=fraction, train__lr=1e-3, train__min_lr=1e-4,
                train__warmup_steps=warmup, train__max_steps=max_steps).train
        f = lr_schedule(t)
        got = [float(f(s - 1)) for s in range(1, max_steps + 1)]
        want = [_reference_lr(schedule, s, lr=1e-3, min_lr=1e-4, warmup=warmup, max_steps=max_steps, fraction=fraction)
                for s in range(1, max_steps + 1)]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{schedule} W={warmup} steps={max_steps}")
        if schedule == "wsd":  # the decay's first step runs at lr, its last one step above min_lr (as cosine's)
            start = max_steps - max(1, round(fraction * max_steps))
            assert got[start] == pytest.approx(1e-3) and got[-1] > 1e-4 and (start == 0 or got[start - 1] == pytest.approx(1e-3) or start <= warmup)


def test_a_run_that_is_all_warm_up_says_so():
    """cosine (or constant) with train.warmup_steps >= train.max_steps never leaves its warm-up: its
    last step runs below train.lr (the plain reference), and the trainer says so in one line, naming
    the rate reached and what to lower (it was silent). One warm-up step fewer reaches lr: no line."""
    from llmjax.train import all_warmup

    for schedule in ("cosine", "constant"):
        for warmup, max_steps in ((5, 2), (4, 4), (9, 1)):
            t = cfg(train__schedule=schedule, train__lr=1e-3, train__min_lr=1e-4, train__warmup_steps=warmup, train__max_steps=max_steps).train
            last = _reference_lr(schedule, max_steps, lr=1e-3, min_lr=1e-4, warmup=warmup, max_steps=max_steps)
            assert last < 1e-3 and all_warmup(t) == (
                f"note: train.warmup_steps={warmup} is not below train.max_steps={max_steps}: the whole run is warm-up, its last step at "
                f"learning rate {last:.3g}, never train.lr=0.001; set --config.train.warmup_steps below {max_steps} to reach it")
        t = cfg(train__schedule=schedule, train__lr=1e-3, train__min_lr=1e-4, train__warmup_steps=3, train__max_steps=4).train
        assert all_warmup(t) is None and _reference_lr(schedule, 4, lr=1e-3, min_lr=1e-4, warmup=3, max_steps=4) == pytest.approx(1e-3)
    assert all_warmup(cfg(train__schedule="wsd", train__warmup_steps=2, train__max_steps=12).train) is None


def test_a_wsd_run_logs_its_schedule_and_resumes_into_another(tmp_path, capsys):
    """train.schedule=wsd trains with it (the logged lr is its value, stable then decaying); a run
    stopped in its stable phase and resumed as cosine says so and follows cosine from there."""
    run = train(cfg(train__schedule="wsd", train__decay_fraction=0.25, train__max_steps=12), tmp_path / "wsd", quiet=True)
    want = [_reference_lr("wsd", s, lr=3e-3, min_lr=3e-4, warmup=2, max_steps=12, fraction=0.25) for s in range(1, 13)]
    np.testing.assert_allclose(list(losses(run, "lr").values()), want, rtol=1e-6)
    assert [round(x, 9) for x in want[2:10]] == [3e-3] * 8 and want[11] < want[10] < want[9]  # (the decay: steps 10-12)
    train(cfg(train__schedule="wsd", train__stop_at_step=5), tmp_path / "split", quiet=True)
    capsys.readouterr()
    resumed = train(cfg(train__schedule="cosine"), tmp_path / "split", quiet=False)
    assert "train.schedule (wsd -> cosine)" in capsys.readouterr().out
    lrs = losses(resumed, "lr")
    np.testing.assert_allclose([lrs[s] for s in range(6, 13)],
                               [_reference_lr("cosine", s, lr=3e-3, min_lr=3e-4, warmup=2, max_steps=12) for s in range(6, 13)], rtol=1e-6)


def test_a_resume_that_moves_the_wsd_decay_before_it_says_how_the_rate_jumps(tmp_path, capsys):
    """A wsd run resumed with settings whose decay began before the resumed step drops the rate at
    once: the notice says where the decay now begins and the rate the old settings gave the next step
    and the one it gets (the generic changed-settings notice before); the schedule is unchanged (the
    logged rates are the new settings' reference). A decay that now lies ahead again says how the
    rate jumps back up."""
    ref = functools.partial(_reference_lr, lr=3e-3, min_lr=3e-4, warmup=2)
    train(cfg(train__schedule="wsd", train__decay_fraction=0.25, train__stop_at_step=6), tmp_path / "frac", quiet=True)
    capsys.readouterr()
    run = train(cfg(train__schedule="wsd", train__decay_fraction=0.75), tmp_path / "frac", quiet=False)  # decay: steps 4-12
    new = ref("wsd", 7, max_steps=12, fraction=0.75)
    assert ref("wsd", 7, max_steps=12, fraction=0.25) == 3e-3 and new == pytest.approx(2.1e-3)
    assert ("resuming with changed settings: train.decay_fraction (0.25 -> 0.75); train.stop_at_step (6 -> 0); the wsd decay now began "
            "at step 4, before the resumed step 6, so the learning rate jumps from 0.003 to 0.0021 at step 7\n") in capsys.readouterr().out
    lrs = losses(run, "lr")
    np.testing.assert_allclose([lrs[s] for s in range(7, 13)], [ref("wsd", s, max_steps=12, fraction=0.75) for s in range(7, 13)], rtol=1e-6)
    # a constant run extended as wsd to 16 steps, half of them decay: steps 9-16, begun before step 10
    train(cfg(train__schedule="constant", train__stop_at_step=10), tmp_path / "const", quiet=True)
    capsys.readouterr()
    train(cfg(train__schedule="wsd", train__decay_fraction=0.5, train__max_steps=16, train__stop_at_step=11), tmp_path / "const", quiet=False)
    assert (f"resuming with changed settings: train.decay_fraction (0.2 -> 0.5); train.max_steps (12 -> 16); train.schedule (constant -> "
            f"wsd); train.stop_at_step (10 -> 11); the wsd decay now began at step 9, before the resumed step 10, so the learning rate jumps "
            f"from 0.003 to {ref('wsd', 11, max_steps=16, fraction=0.5):.4g} at step 11\n") in capsys.readouterr().out
    # the decay still ahead (steps 15-16 of 16): the generic notice
    train(cfg(train__schedule="wsd", train__decay_fraction=0.125, train__max_steps=16), tmp_path / "const", quiet=False)
    out = capsys.readouterr().out
    # (it jumps back up: the old settings' decay had begun at step 9)
    jump = f"from {ref('wsd', 12, max_steps=16, fraction=0.5):.4g} to 0.003 at step 12"
    assert f"the learning-rate schedule follows the new values from step 12: the learning rate jumps {jump}" in out, out
    assert "decay now began" not in out


@pytest.mark.parametrize("overrides,message", [
    ({"train.schedule": "linear"}, r"train.schedule='linear' is not one of cosine, wsd, constant"),
    ({"train.schedule": "wds"}, r"is not one of cosine, wsd, constant \(did you mean 'wsd'\?\)"),
    ({"train.decay_fraction": 0}, r"train.decay_fraction must be in \(0, 1\]"),
    ({"train.decay_fraction": 1.5}, r"train.decay_fraction must be in \(0, 1\]"),
    ({"train.schedule": "wsd", "train.decay_fraction": 0.95, "train.warmup_steps": 5, "train.max_steps": 50},
     r"train.schedule=wsd: the decay \(48 of 50 steps, decay_fraction=0.95\) would start inside the 5 warm-up steps"),
])
def test_bad_schedules_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", overrides)


def test_min_lr_above_lr_is_refused_only_by_the_schedules_that_decay_to_it(tmp_path):
    """cosine and wsd decay from lr to min_lr, so a min_lr above lr is refused; constant reads no
    min_lr, so it is accepted (it was refused too) and the run trains at lr after its warm-up."""
    for schedule in ("cosine", "wsd"):
        with pytest.raises(ConfigError, match=rf"^train.min_lr=0.01 is above train.lr=0.003: the {schedule} schedule decays from lr "
                                              r"to min_lr; lower min_lr$"):
            cfg(train__schedule=schedule, train__min_lr=1e-2)
    run = train(cfg(train__schedule="constant", train__min_lr=1e-2, train__max_steps=4, eval__every_steps=0), tmp_path / "run", quiet=True)
    want = [_reference_lr("constant", s, lr=3e-3, min_lr=1e-2, warmup=2, max_steps=4) for s in range(1, 5)]
    assert want == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3])
    np.testing.assert_allclose(list(losses(run, "lr").values()), want, rtol=1e-6)


def test_the_progress_bar_shows_each_steps_own_figures(tmp_path, monkeypatch):
    """Every time the bar is drawn at step N, the loss, learning rate and validation loss beside it
    are those of the last logged step up to N (step N's where N is logged); they were set after the
    count moved, so the bar showed step N with step N - 1's figures (an evaluation's val only at the
    next step, a metrics block later)."""
    import io

    from tqdm import tqdm

    import llmjax.train as T

    out = io.StringIO()
    monkeypatch.setattr(T, "_progress", lambda start, total, enabled: tqdm(total=total, initial=start, unit="step", file=out,
                                                                            mininterval=0, miniters=1, ncols=300))
    run = train(cfg("vanilla", train__max_steps=8, train__log_every_steps=2, eval__every_steps=3), tmp_path / "run", quiet=True)
    rows = {m["step"]: m for m in run.metrics}
    drawn = [(int(m[1]), dict(kv.split("=", 1) for kv in m[2].split(", ")))
             for m in re.finditer(r"(\d+)/8 \[[^,\]]*<[^,\]]*, [^,\]]*, ([^\]]*)\]", out.getvalue().replace("\r", "\n"))]
    assert {n for n, _ in drawn} >= {2, 3, 4, 6, 8}, out.getvalue()  # (step 2 was drawn before its figures)
    for n, post in drawn:
        shown = max(s for s in rows if s <= n and (s % 2 == 0 or "val_loss" in rows[s]))
        assert post["loss"] == f"{rows[shown]['train_loss']:.4f}" and post["lr"] == f"{rows[shown]['lr']:.2e}", (n, post, shown)
        if "val_loss" in rows[shown]:
            assert post["val"] == f"{rows[shown]['val_loss']:.4f}", (n, post)


def test_the_progress_bar_is_plain_lines_where_stderr_is_not_a_terminal(tmp_path, capsys):
    """Where stderr is a file (`... 2> log`, a SLURM job's output), tqdm's frames, each ending in a
    carriage return, made one line of them all; each logged step is a line of its own there."""
    run = train(cfg("vanilla", train__max_steps=6, train__log_every_steps=2, eval__every_steps=3, logging__progress_bar=True),
                tmp_path / "run", quiet=False)
    err = capsys.readouterr().err  # (captured: not a terminal)
    assert "\r" not in err, err
    rows = {m["step"]: m for m in run.metrics}
    drawn = [re.fullmatch(r"step (\d+)/6: (.*)", line) for line in err.splitlines() if line.startswith("step ")]
    assert [int(m[1]) for m in drawn] == [2, 3, 4, 6], err
    for m in drawn:
        post, row = dict(kv.split("=", 1) for kv in m[2].split(", ")), rows[int(m[1])]
        assert post["loss"] == f"{row['train_loss']:.4f}" and post["lr"] == f"{row['lr']:.2e}", (m[0], row)
        assert post.get("val") == (f"{row['val_loss']:.4f}" if "val_loss" in row else None), (m[0], row)


def test_a_run_stopped_at_stop_at_step_says_where_it_stands(tmp_path, capsys):
    """A run that ends at train.stop_at_step before max_steps said nothing (no `done:` line, no
    stop line: a silent exit), nor did the same command run again (nothing to run); each now says
    the step, the setting and how to go on."""
    workdir = tmp_path / "run"
    assert train(cfg("vanilla", train__stop_at_step=3, train__max_steps=6), workdir, quiet=False).step == 3
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == (f"stopped after step 3; checkpoint saved (train.stop_at_step=3 of train.max_steps=6) in {workdir}; to go on, "
                       "run the same command with a later --config.train.stop_at_step, or 0 to run to train.max_steps"), out
    assert train(cfg("vanilla", train__stop_at_step=3, train__max_steps=6), workdir, quiet=False).step == 3
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("nothing to run: the run is at step 3 (train.stop_at_step=3 of train.max_steps=6)"), out
    run = train(cfg("vanilla", train__max_steps=6), workdir, quiet=False)
    assert run.final and "stop_at_step" not in capsys.readouterr().out.split("resumed from")[-1]


def test_a_rerun_with_nothing_to_run_keeps_the_runs_config_and_starts_no_wandb_run(tmp_path, monkeypatch, capsys):
    """A finished run (or one at its stop_at_step) run again with other settings trains nothing; it
    rewrote config.json with them (a record of settings no step trained with: the next resume's
    learning-rate jump was then said from the wrong rate, and llmjax.compare or plot read them as the
    run's), said they applied from the next step (another batch size: the data position's line), and
    resumed the W&B run with them."""
    import llmjax.train as T

    started = []
    monkeypatch.setattr(T, "_wandb_init", lambda cfg, workdir: started.append(workdir))
    workdir = tmp_path / "run"
    train(cfg("vanilla", train__max_steps=6, train__stop_at_step=3), workdir, quiet=True)
    before = {n: (workdir / n).read_bytes() for n in ("config.json", "metrics.jsonl")}
    for over in (dict(train__max_steps=6, train__stop_at_step=3, train__lr=0.5), dict(train__max_steps=3, train__beta2=0.9),
                 dict(train__max_steps=3, train__batch_size=24)):
        run = train(cfg("vanilla", logging__wandb=True, **over), workdir, quiet=False)
        assert run.step == 3 and not started
        assert {n: (workdir / n).read_bytes() for n in before} == before
        out = capsys.readouterr().out  # (nor what another batch does to the data position: no step follows)
        assert "resuming with changed settings" not in out and "the data position" not in out, out
    # resumed for real: the jump is from the rate the schedule it trained with (max_steps 6) gives
    train(cfg("vanilla", train__max_steps=7, train__stop_at_step=4), workdir, quiet=False)
    out = capsys.readouterr().out
    old = float(T.lr_schedule(cfg("vanilla", train__max_steps=6).train)(3))
    assert "train.max_steps (6 -> 7); train.stop_at_step (3 -> 4);" in out and f"jumps from {old:.4g} to" in out, out


def test_gradient_accumulation_is_the_mean_over_every_micro_batch():
    """train.grad_accum_steps=2 of 4 windows gives the step of one batch of the same 8 windows: the
    loss and the gradients the optimizer gets are the mean over both micro-batches (not their sum,
    not the first alone), within float32 summation order. (Exact resume compares a run with itself:
    it passed with either.)"""
    from llmjax import data as D
    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps

    ds = D.open_dataset("tinyshakespeare_char", "unused")
    windows = next(D.sample_windows(ds.split("train"), seq_len=32, batch=8, num_batches=1, seed=0))
    out = []
    for accum in (1, 2):
        c = cfg("vanilla", train__batch_size=8 // accum, train__grad_accum_steps=accum)
        mesh = make_mesh(c.train.mesh, jax.devices()[:1])
        steps = build_steps(c, mesh)
        with jax.set_mesh(mesh):
            params = steps.init_state()["params"]
            grads, ce, _, _ = steps.gradients(params, windows.reshape(accum, 8 // accum, 33), None)
        out.append((jax.device_get(grads), float(ce)))
    (g1, ce1), (g2, ce2) = out
    assert ce2 == pytest.approx(ce1, rel=1e-6)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-9)


def test_tokens_seen_count_every_micro_batch_across_a_resume(tmp_path):
    """Each row's `tokens` is the training tokens seen so far: train.batch_size x grad_accum_steps
    windows of context_len targets a step, before and after a resume (which counts them from the
    restored data position)."""
    c = dict(train__batch_size=4, train__grad_accum_steps=2, train__max_steps=3, eval__every_steps=0)
    one = jax.devices()[:1]
    assert train(cfg("vanilla", train__stop_at_step=2, **c), tmp_path / "run", devices=one, quiet=True).step == 2
    assert train(cfg("vanilla", **c), tmp_path / "run", devices=one, quiet=True).final
    assert losses(tmp_path / "run", "tokens") == {1: 256, 2: 512, 3: 768}  # (8 windows of 32 targets a step)


def test_fsdp_shards_the_optimizer_state_and_the_batch_as_well():
    """Under FSDP, Adam's moments are split as their parameters are (else every device held them
    whole: twice the parameters' memory, unsplit) and the batch is split over every device of the
    mesh, the fsdp axis too (else each fsdp group computed the same rows again). The values are the
    same either way: only the shardings show it."""
    import optax

    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps

    c = cfg("vanilla", **{"train.mesh.data": 2, "train.mesh.fsdp": 4})
    mesh = make_mesh(c.train.mesh, jax.devices()[:8])
    steps = build_steps(c, mesh)
    params = steps.state_shard["params"]
    assert params["embed"]["embedding"].spec == P(None, "fsdp")
    (adam,) = [s for s in jax.tree.leaves(steps.state_shard["opt"], is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]
    specs = functools.partial(jax.tree.map, lambda s: s.spec)
    assert specs(adam.mu) == specs(params) and specs(adam.nu) == specs(params)
    batch = jax.device_put(np.zeros((1, 8, 33), np.int32), steps.tok_shard)
    assert {shard.data.shape for shard in batch.addressable_shards} == {(1, 1, 33)}


def test_a_masked_cross_entropy_is_the_mean_over_the_positions_it_keeps():
    """llmjax.cross_entropy with a mask: the mean of the kept positions' losses (a masked-out
    position's target may be an ignore index), not of every position."""
    from llmjax.loss import cross_entropy

    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
    targets = rng.integers(0, 7, (2, 5))
    mask = np.ones((2, 5), np.float32)
    mask[0, 3:] = mask[1, 0] = 0
    targets[0, 4] = -100
    per_token = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), np.maximum(targets, 0)[..., None], -1)[..., 0]
    assert float(cross_entropy(logits, jnp.asarray(targets), jnp.asarray(mask))) == pytest.approx(per_token[mask > 0].mean(), rel=1e-6)


def test_a_resume_that_cannot_rewrite_metrics_jsonl_leaves_it_whole(tmp_path):
    """A resume rewrites metrics.jsonl to the rows its checkpoint covers; on a disk that takes no more
    (here: files over a few kB cannot be written, the run's 30 rows are more) it stops in one line,
    and the file is as it was, not cut short at what fitted (rows the user had are never lost)."""
    import shlex

    workdir = tmp_path / "run"
    over = {"train.max_steps": 40, "eval.every_steps": 0}
    train(cfg("vanilla", train__stop_at_step=30, **{k.replace(".", "__"): v for k, v in over.items()}), workdir,
          devices=jax.devices()[:2], quiet=True)
    before = (workdir / "metrics.jsonl").read_bytes()
    largest = max((workdir / n).stat().st_size for n in ("config.json", "tokenizer.json"))
    limit = largest // 1024 + 2  # (kB: room for the run's other files, not for its metrics)
    assert len(before) > (limit + 1) * 1024, (len(before), limit)
    cmd = _train_cmd(workdir, *(f"--config.{k}={v}" for k, v in over.items()))
    limited = f"trap '' XFSZ; ulimit -f {limit}; exec {shlex.join(cmd)}"
    r = subprocess.run(["bash", "-c", limited], cwd=ROOT, env=_env(LLMJAX_COMPILATION_CACHE=""), capture_output=True, text=True, timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and re.match(r"error: File too large \(.*metrics\.jsonl\); stopped\. ", last), r.stderr[-3000:]
    assert (workdir / "metrics.jsonl").read_bytes() == before
    assert train(cfg("vanilla", train__stop_at_step=31, **{k.replace(".", "__"): v for k, v in over.items()}), workdir,
                 devices=jax.devices()[:2], quiet=True).step == 31  # (room again)
    assert [m["step"] for m in figures(workdir)] == list(range(1, 32))


def test_the_data_fingerprint_tells_other_text_of_the_same_size_apart(tmp_path):
    """The data position a checkpoint saves indexes the training shards it was taken on: shards
    prepared again from other text of the same size (same names and token counts, other sha256) get
    another fingerprint (a resume is refused), the same text prepared again the same one."""
    from llmjax import data as D
    from llmjax.train import data_fingerprint

    def prepared(name, tokens):
        out = tmp_path / name
        shard = D.write_shard(out / "train_0000.bin", tokens)
        D.write_manifest(out, "mine", {"kind": "char", "chars": "ab"}, {"train": [shard], "val": [shard]})
        return D.TokenDataset.open(out)

    tokens = np.arange(100, dtype=np.uint16) % 2
    first, again, other = prepared("a", tokens), prepared("b", tokens.copy()), prepared("c", tokens[::-1].copy())
    assert data_fingerprint(first) == data_fingerprint(again) != data_fingerprint(other)


def test_nearby_seeds_share_no_epoch_and_a_run_begun_in_the_earlier_order_resumes_in_it(tmp_path, monkeypatch):
    """grain reshuffles epoch e with its shuffle seed + e: seeded with train.seed itself (data order 1),
    seed 1's first epoch was seed 0's second (compare --seeds ran one order one epoch apart); in data
    order 2 no epoch of seed 1 is one of seed 0's. A run whose checkpoints predate order 2 (no
    data_order in their metadata) resumes in order 1, bit for bit as an uninterrupted run in it, and
    its later checkpoints name that order."""
    from llmjax import checkpoint as C
    from llmjax import data as D

    shards = [np.arange(200, dtype=np.uint16)]  # 192 windows of 9 tokens: an epoch is 24 batches of 8

    def epochs(seed, order):
        it = D.train_batches(shards, seq_len=8, global_batch=8, seed=seed, threads=0, order=order)
        windows = np.concatenate([next(it) for _ in range(48)])
        return windows[:192], windows[192:]

    assert np.array_equal(epochs(0, 1)[1], epochs(1, 1)[0])  # (order 1's flaw)
    seed0, seed1 = epochs(0, 2), epochs(1, 2)
    assert not any(np.array_equal(a, b) for a in seed0 for b in seed1)

    one = jax.devices()[:1]
    save = C.Checkpointer.save
    with monkeypatch.context() as before:  # the trainer before data order 2
        before.setattr(D, "DATA_ORDER", 1)
        before.setattr(C.Checkpointer, "save", lambda self, step, state, it, meta, **kw: save(
            self, step, state, it, {k: v for k, v in meta.items() if k != "data_order"}, **kw))
        full = losses(train(cfg("vanilla"), tmp_path / "full", devices=one, quiet=True))
        train(cfg("vanilla", train__stop_at_step=6), tmp_path / "split", devices=one, quiet=True)
    assert train(cfg("vanilla"), tmp_path / "split", devices=one, quiet=True).step == 12
    assert losses(tmp_path / "split") == full  # bit-identical floats: the same windows after the resume
    ckpt = C.Checkpointer(tmp_path / "split" / "checkpoints")
    assert ckpt.restore(12, None)[1]["data_order"] == 1
    ckpt.close()
    assert losses(train(cfg("vanilla"), tmp_path / "new", devices=one, quiet=True))[12] != full[12]  # (order 2: other windows)


def test_the_logged_gradient_and_update_norms_are_the_steps_own():
    """metrics.jsonl's grad_norm is the global norm of the step's gradients before clipping, and
    update_norm the global norm of what the optimizer added to the parameters (clipped, Adam's,
    decayed, times the learning rate): both by hand from one step of build_steps."""
    from llmjax import data as D
    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps

    def norm(tree):
        return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in jax.tree.leaves(tree))))

    c = cfg("vanilla", train__grad_clip=0.5, train__warmup_steps=0, train__weight_decay=0.1)
    s = build_steps(c, make_mesh(c.train.mesh, jax.devices()[:1]))
    state = s.init_state()
    ds = D.open_dataset("tinyshakespeare_char", "unused")
    windows = next(D.sample_windows(ds.split("train"), seq_len=c.model.context_len, batch=c.train.batch_size, num_batches=1, seed=0))
    tokens = jax.device_put(windows[None], s.tok_shard)
    before = jax.device_get(state["params"])
    grads = jax.device_get(s.gradients(state["params"], tokens, None)[0])
    state, m = s.train_step(state, tokens)
    after, m = jax.device_get((state["params"], m))
    assert float(m["grad_norm"]) == pytest.approx(norm(grads), rel=1e-5) and float(m["grad_norm"]) > 0.5  # (clipped: above the clip)
    assert float(m["update_norm"]) == pytest.approx(norm(jax.tree.map(np.subtract, after, before)), rel=1e-3)
