"""`python -m llmjax.train --config configs/<arch>.py[:variant] [--config.key=value ...] [--workdir runs/NAME]`

One trainer for every architecture, on one CPU, one GPU, many GPUs or many hosts:

- data: grain batches of random windows (llmjax.data), each process reading its rows of the
  global batch; the global batch is sharded over the mesh's (data, expert, fsdp) axes;
- model: float32 master parameters (in the scanned layer layout; converted inside the step when
  `model.scan_layers` is False), compute in `model.dtype`, sharded by logical-axis rules
  (llmjax.sharding);
- optimizer: AdamW (weight decay on the parameters `train.decay_params` names: matrices,
  embeddings, experts, Linformer's projections, the SSM's convolution), linear warm-up then
  `train.schedule` (cosine, wsd or constant), global-norm clipping, gradient accumulation over `train.grad_accum_steps` micro-batches,
  auxiliary losses added with `train.aux_loss_weights`;
- the step is jitted with explicit in/out shardings and donated buffers; metrics are read one
  step late so dispatch stays ahead of the device;
- Orbax checkpoints (llmjax.checkpoint) with exact resume, SIGTERM handling and a NaN guard;
- metrics.jsonl, a progress bar, and Weights & Biases when `logging.wandb=True`.

The workdir holds config.json, tokenizer.json, metrics.jsonl and checkpoints/: everything the
sampler and evaluator need.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import cli, data as data_lib, downstream, tokenizer as tok_lib
from llmjax.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings
from llmjax.config import (EXECUTION_KEYS, ConfigError, config_diff, decay_steps, loss_scale_setting, model_changes,  # noqa: F401
                           model_config, model_defaults, validate)
from llmjax.loss import token_losses
from llmjax.models.layers import convert_layer_layout
from llmjax.registry import build_model
from llmjax.runtime import cpu_compiler_options, enable_compilation_cache, exclusive_folder, tune_host_allocator
from llmjax.sample import SampleError, generate, start_ids
from llmjax.scoring import Scorer, ScoreError, model_scores, scoring_config
from llmjax.sharding import batch_sharding, make_mesh, param_shardings, replicated_by_size, state_shardings
from llmjax.summary import summarize

# Dense bf16 datasheet peaks (FLOP/s) used for MFU; `train.peak_flops_per_device` overrides. Looked
# up by the first key the device's kind contains, so each card's lower-clocked PCIe and NVL
# forms come before its SXM one ("NVIDIA H100 PCIe" is 756 TFLOP/s, not the SXM card's 989).
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H200": 989e12, "H100": 989e12, "A100": 312e12}


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (one line)."""


class NonFinite(TrainingError):
    """The run's loss, gradients or update became inf or NaN at `step` (it diverged; its last good
    checkpoint is kept). The trainer's exit status is then cli.NON_FINITE_EXIT."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step



def peak_flops(device, override: float) -> float | None:
    if override:
        return override
    if device.platform != "gpu":
        return None
    kind = device.device_kind
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def lr_schedule(tcfg) -> optax.Schedule:
    """train.schedule as an optax schedule of the updates applied so far (step s runs at its value
    for s - 1). nanoGPT's warm-up: step s (from 1) of the first `warmup_steps` runs at
    lr * s / (warmup_steps + 1), so no step is wasted at lr 0; then cosine decay to `min_lr` at
    `max_steps`, or (wsd) `lr` until the last `decay_steps` steps and a linear decay to `min_lr` at
    `max_steps`, or (constant) `lr`."""
    W, lr = tcfg.warmup_steps, tcfg.lr
    kind = tcfg.get("schedule", "cosine")
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=lr / (W + 1), peak_value=lr, warmup_steps=W,
                                                  decay_steps=max(tcfg.max_steps, W + 1), end_value=tcfg.min_lr)
    warmup = optax.linear_schedule(lr / (W + 1), lr, W)
    if kind == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(lr)], [W])
    start = tcfg.max_steps - decay_steps(tcfg)  # (>= W: llmjax.config.validate)
    return optax.join_schedules([warmup, optax.constant_schedule(lr), optax.linear_schedule(lr, tcfg.min_lr, tcfg.max_steps - start)],
                                [W, start])


def all_warmup(tcfg) -> str | None:
    """A line saying the run never leaves its warm-up (cosine or constant with warmup_steps >=
    max_steps: its last step runs below train.lr), or None. Said, not refused: 1- to 20-step smoke
    runs of a config with the default warm-up are common; wsd's analogue is refused (validate)."""
    W, M = tcfg.warmup_steps, tcfg.max_steps
    if tcfg.get("schedule", "cosine") == "wsd" or W < M:
        return None
    return (f"note: train.warmup_steps={W} is not below train.max_steps={M}: the whole run is warm-up, its last step at learning "
            f"rate {float(lr_schedule(tcfg)(M - 1)):.3g}, never train.lr={tcfg.lr:g}; set --config.train.warmup_steps below {M} to reach it")


def make_optimizer(tcfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(tcfg)

    decayed = {n.strip() for n in tcfg.decay_params.split(",") if n.strip()}

    def decay_mask(params):  # (train.decay_params: llmjax.config.DECAYED by default)
        return jax.tree_util.tree_map_with_path(lambda p, _: getattr(p[-1], "key", None) in decayed, params)

    tx = optax.chain(
        optax.clip_by_global_norm(tcfg.grad_clip) if tcfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=tcfg.beta1, b2=tcfg.beta2, weight_decay=tcfg.weight_decay, mask=decay_mask),
    )
    return tx, schedule


def schedule_count(opt_state):
    """The step count the optimizer's learning-rate schedule reads next (optax's
    ScaleByScheduleState): the updates applied so far, which is not the run's step where dynamic
    loss scaling skipped steps, in this run or in the part of it that had scaling."""
    (count,) = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
                if isinstance(s, optax.ScaleByScheduleState)]
    return count


# Train keys the learning-rate schedule is made of (a resumed run follows their new values).
SCHEDULE_KEYS = ("train.lr", "train.min_lr", "train.warmup_steps", "train.max_steps", "train.schedule", "train.decay_fraction")


def schedule_jump(old_train: dict, tcfg, step: int, count: int) -> str | None:
    """For a run resumed after `step` with changed schedule settings: what that does to the
    learning rate of step + 1, the old settings' and the new (the schedules read at `count`, the
    updates the optimizer has applied: `step` unless dynamic loss scaling skipped steps), or None
    where the rate is the old one. Where a wsd decay now begins at or before the schedule's
    position (a changed max_steps, decay_fraction or schedule), it says so."""
    old, new = (float(lr_schedule(t)(count)) for t in (ml_collections.ConfigDict(old_train), tcfg))
    if math.isclose(old, new, rel_tol=1e-6):
        return None
    rate = f"the learning rate jumps from {old:.4g} to {new:.4g} at step {step + 1}"
    begin = tcfg.max_steps - decay_steps(tcfg) + 1  # a wsd decay's first step (it runs at lr)
    if tcfg.get("schedule", "cosine") == "wsd" and begin <= count:
        if count == step:
            return f"the wsd decay now began at step {begin}, before the resumed step {step}, so {rate}"
        # (the schedule counts updates: "began at step 5" named a run step that loss scaling skipped, the 5th update's being 12)
        return (f"the wsd decay now began at the optimizer's update {begin}, before the {count} it has made by the resumed step "
                f"{step} ({step - count} skipped by loss scaling), so {rate}")
    return f"the learning-rate schedule follows the new values from step {step + 1}: {rate}"

# What a training run writes in its workdir (besides checkpoints/ and the wandb/ folder).
RUN_FILES = ("config.json", "tokenizer.json", "metrics.jsonl")


def check_workdir(workdir: Path) -> dict | None:
    """The config a workdir's earlier run saved (None for a new or empty workdir). Refuses a folder
    holding files a training run writes that are not an llmjax run's (a Hugging Face model folder has
    a config.json and a tokenizer.json): nothing there is overwritten. Read under the workdir's lock:
    read before it, a run that trained there and ended meanwhile went unseen."""
    cfg_path = workdir / "config.json"
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if isinstance(old, dict) and isinstance(old.get("model"), dict) and "arch" in old["model"] and isinstance(old.get("train"), dict):
            return old
        raise ConfigError(f"{workdir} holds a config.json that is not an llmjax run's; use another --workdir (nothing was changed)")
    theirs = [name for name in RUN_FILES[1:] if (workdir / name).exists()]
    if (workdir / "checkpoints").is_dir() and any(c.name.isdigit() for c in (workdir / "checkpoints").iterdir()):
        theirs.append("checkpoints (of a model its config.json would name)")
    if theirs:
        raise ConfigError(f"{workdir} holds {', '.join(theirs)} but no llmjax config.json; use another --workdir (nothing was changed)")
    return None


def refuse_workdir_place(workdir: Path) -> None:
    """Refuse a --workdir under a file (mkdir's "Not a directory", said as a full disk is, with a
    resume that cannot be) or inside a run's checkpoints/ (accepted: the run wrote its files into the
    other run's checkpoint folders, which that run's rotation deleted with them)."""
    for parent in Path(workdir).absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--workdir {workdir}: {parent} is a file, not a folder; pass a folder (a new one, or an earlier run's)")
            break
    for parent in [Path(workdir).absolute(), *Path(workdir).absolute().parents]:
        if parent.name != "checkpoints" or not (parent.parent / "config.json").is_file():
            continue
        try:
            run = check_workdir(parent.parent)
        except ConfigError:  # (not an llmjax run's)
            run = None
        if run is not None:
            raise ConfigError(f"--workdir {workdir} is inside the checkpoints of the run in {parent.parent} (whose saves are kept and "
                              f"deleted there); use a --workdir outside it")


def train_settings(c: dict) -> dict:
    """A resolved config's train group, with the keys the run predates as what the run did:
    train.loss_scale none (no scaling) in float16, else auto (none too); train.schedule cosine
    (with decay_fraction's default, which cosine does not read)."""
    t = dict(c.get("train", {}))
    t.setdefault("loss_scale", "none" if c.get("model", {}).get("dtype") == "float16" else "auto")
    t.setdefault("schedule", "cosine")
    t.setdefault("decay_fraction", 0.2)
    return t


class EveryProcess(ConfigError):
    """A refusal that every process makes at the same point, from what a collective told them all
    (check_same_config, check_same_data, check_shared_workdir, check_shards, the workdir's lock): each says its own
    line and ends as one process does (StopTogether leaves it alone)."""


class WorkdirBusy(EveryProcess):
    """Another training process holds the workdir (its lock: `runtime.exclusive_folder`; process
    0's, which every process hears of)."""


@dataclasses.dataclass
class Run:
    """What `train()` returns: where the run ended and its last figures."""

    workdir: Path
    step: int
    final: bool  # reached max_steps
    last_val_loss: float | None
    metrics: list[dict]
    sample: str | None
    val_batches: int | None = None  # the whole validation split's batches (of the run's micro batch)


class _Stop:
    """SIGTERM (preemption) or a first Ctrl-C (SIGINT) sets a flag; the loop checkpoints and exits
    after the step. A second Ctrl-C stops the process at once, in one line (the checkpoints written
    are complete: Orbax writes each in a temporary folder, renamed when done). A SIGINT that the
    process ignores (a background job of a shell script) stays ignored."""

    def __init__(self, checkpoints: Path):
        self.requested = None  # the name of the signal that asked to stop
        self.previous = {}
        self.checkpoints = checkpoints

    def __enter__(self):
        if threading_main():
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.requested == "Ctrl-C":
            # (not KeyboardInterrupt: raised in whatever Python code runs, JAX's callbacks swallow it)
            print(f"error: {interrupted(self.checkpoints)}", file=sys.stderr, flush=True)
            take_back_at_once()
            if _TOGETHER is not None:  # (the other processes would wait for this one in their next collective)
                _TOGETHER.stop_all(interrupted(self.checkpoints), 130)
            os._exit(130)
        self.requested = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if signum == signal.SIGINT:
            print("Ctrl-C: stopping after the step queued now (the progress bar can be some steps behind it), with a checkpoint "
                  "(press it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# What asked a run to stop, by rank: processes agree on the highest any of them got.
STOP_SIGNALS = (None, "SIGTERM", "Ctrl-C")


def _saved_steps(checkpoints: Path) -> list[int]:
    try:  # (not there, or gone as it is read: another process of the run took back the empty folder it made)
        return sorted(int(c.name) for c in checkpoints.iterdir() if c.name.isdigit())
    except (FileNotFoundError, NotADirectoryError):
        return []


def interrupted(checkpoints: Path, by: str = "") -> str:
    """The line for a run interrupted at once (`by` a signal's name, where not Ctrl-C): where it resumes from."""
    steps = _saved_steps(checkpoints)
    what = f"interrupted by {by}" if by else "interrupted"
    if not steps:
        return f"{what}; no checkpoint was written: the same command starts the run afresh"
    return f"{what}; the same command resumes from the last checkpoint written, step {steps[-1]} in {checkpoints}"


def resume_point(checkpoints: Path) -> str:
    """Where a run stopped by an error goes on from: its last checkpoint, or none was written."""
    steps = _saved_steps(checkpoints)
    return f"a run resumes from its last checkpoint, step {steps[-1]} in {checkpoints}" if steps else "no checkpoint was written"


def in_thread(fn) -> concurrent.futures.Future:
    """fn() in a daemon thread (a process that stops early does not wait for it)."""
    import threading

    future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001  (re-raised by result())
            future.set_exception(e)

    threading.Thread(target=run, name="llmjax-" + fn.__name__, daemon=True).start()
    return future


def most_of_all_processes(n: int) -> int:
    """The largest of every process's `n` (a collective: every process must call it at the same
    point); `n` itself with one process."""
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(n))))


def check_same_config(resolved: dict) -> None:
    """Refuse, in one line in every process, a run whose processes were given different configs (a
    flag missing from one host's command): each trained with its own, silently (another train.lr in
    one process: replicas that XLA takes to be equal drift apart, and the checkpoint mixes them), or
    waited in a collective whose shapes differ. A collective: every process calls it at the same point."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    # (first, from the device list every process holds, no collective: with unequal counts the allgather below,
    # as every collective, split its rows by them: "cannot reshape array of size 5 into shape (2,2)", a traceback in each)
    counts = collections.Counter(d.process_index for d in jax.devices())
    if len(set(counts.values())) > 1:
        raise EveryProcess("the processes see different numbers of devices (" + ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
                           + "); give every process as many (CUDA_VISIBLE_DEVICES on GPUs, XLA_FLAGS' "
                           "--xla_force_host_platform_device_count on CPUs)")
    blob = json.dumps(resolved, sort_keys=True).encode()
    digests = np.asarray(multihost_utils.process_allgather(np.frombuffer(hashlib.sha256(blob).digest(), np.uint8)))
    others = [p for p in range(len(digests)) if (digests[p] != digests[0]).any()]
    if not others:
        return
    n = int(multihost_utils.broadcast_one_to_all(np.int32(len(blob))))  # process 0's config, for the keys that differ
    lead = bytes(np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(blob[:n].ljust(n, b" "), np.uint8))))
    diffs = config_diff(json.loads(lead), resolved) if jax.process_index() in others else []
    raise EveryProcess(f"the processes were given different configs: process(es) {', '.join(map(str, others))} differ from process 0"
                       + (f" ({'; '.join(diffs[:3])}{'; ...' if len(diffs) > 3 else ''}: process 0's -> this process's)" if diffs else "")
                       + "; give every process the same --config and --config.* flags")


def check_same_data(dataset) -> None:
    """Refuse, in one line in every process, a run whose processes read different prepared data
    under the dataset's name (each host's own data.dir, prepared from other text or with other
    shards): each process indexed its own windows, silently, so that a global batch mixed two
    datasets' rows and the checkpoint's data position fit neither. A collective, as check_same_config."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    parts = {"training shards": dataset.manifest["splits"].get("train"), "validation shards": dataset.manifest["splits"].get("val"),
             "tokenizer": dataset.manifest.get("tokenizer")}
    digest = np.concatenate([np.frombuffer(hashlib.sha256(json.dumps(v, sort_keys=True).encode()).digest(), np.uint8)
                             for v in parts.values()])
    digests = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), len(parts), 32)
    differ = (digests != digests[0]).any(axis=2)  # (processes, parts)
    if differ.any():
        others = [p for p in range(len(differ)) if differ[p].any()]
        what = [k for k, d in zip(parts, differ.any(axis=0)) if d]
        raise EveryProcess(f"the processes read different prepared data as dataset '{dataset.name}': process(es) "
                           f"{', '.join(map(str, others))} differ from process 0 in its {', '.join(what)} (this process's: "
                           f"{dataset.path}); give every process the same prepared dataset (process 0's data.dir, shared or copied)")


SHARED_WAIT_S = 5  # how long a process looks for process 0's marker file (a network file system's caches)


def check_shared_workdir(workdir: Path) -> None:
    """Refuse, in one line in every process, a workdir that is not one folder shared by every
    process (each host's own local folder, or different paths): process 0 writes a marker file
    there, and every process must see it. Else process 1's first checkpoint failed on a folder
    that its own process had made ('make room or write access there') while process 0 waited in
    the save, forever. A collective, as check_same_config; the marker is removed."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    token = uuid.uuid4().bytes
    marker = workdir / f".llmjax-shared-{token.hex()}"
    if jax.process_index() == 0:
        marker.write_bytes(b"")
    try:  # (process 0 wrote it before the broadcast, which the others wait for)
        token = bytes(np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(token, np.uint8))))
        marker = workdir / f".llmjax-shared-{token.hex()}"
        deadline = time.monotonic() + SHARED_WAIT_S
        while not (seen := marker.is_file()) and time.monotonic() < deadline:
            time.sleep(0.5)
        seen_by = np.asarray(multihost_utils.process_allgather(np.int32(seen)))
    finally:
        if jax.process_index() == 0:
            marker.unlink(missing_ok=True)
    if not seen_by.all():
        blind = [str(p) for p in range(len(seen_by)) if not seen_by[p]]
        raise EveryProcess(f"--workdir {workdir} is not one folder that every process shares: process(es) {', '.join(blind)} do not "
                           f"see the file process 0 wrote there; give every process the same folder, on a file system every host "
                           f"mounts (the checkpoints are written by every process into one folder)")


def check_shards(dataset, damaged: concurrent.futures.Future, step: int) -> None:
    """Stop every process, in one line, where any process found a damaged shard (`damaged`: the
    future of `dataset.damaged_shards()`; a check that failed counts as a damaged shard, and every
    process still reaches the collective below)."""
    try:
        bad = damaged.result()
    except Exception as e:  # noqa: BLE001  (one process alone leaving would hang the others)
        bad = [f"(the check failed: {type(e).__name__}: {e})"]
    if most_of_all_processes(len(bad)):  # (one process alone stopping would leave the others in a collective)
        what = "; ".join(bad) if bad else "another process found a damaged shard in its copy"
        raise EveryProcess(f"dataset '{dataset.name}' in {dataset.path}: {what}; "
                           f"delete that folder and prepare it again. Stopped at step {step}, nothing saved")


def data_fingerprint(dataset) -> str:
    """What a data position indexes: the training split's shards (names, token counts, sha256).
    The same text prepared again gives the same; other text, or other shard sizes, another."""
    shards = [[s["file"], s["tokens"], s.get("sha256")] for s in dataset.manifest["splits"].get("train", [])]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


def resume_data_position(train_it, meta: dict, old_cfg: dict | None, global_batch: int, seed: int, workdir: Path, say,
                         dataset=None, devices: int = 1) -> None:
    """The restored training iterator's position (counted in global batches of the run that saved
    it) in this run's global batches: the same windows come next whatever the batch. A checkpoint
    older than the meta keys takes them from the run's config.json. A position that is no whole
    number of new batches, or another seed (another order of the windows), is refused in one line:
    the run would repeat and skip windows."""
    if dataset is not None and meta.get("data_train") not in (None, data_fingerprint(dataset)):
        raise ConfigError(f"{workdir} holds a run trained on dataset '{dataset.name}' as it was prepared then, and {dataset.path} "
                          f"was prepared again since from other text or with other shards (its training shards differ): the "
                          f"run's data position would index other windows; prepare it as before to resume, or use another --workdir")
    saved = (old_cfg or {}).get("train", {})
    old_batch = meta.get("data_global_batch") or saved.get("batch_size", 0) * saved.get("grad_accum_steps", 1) or global_batch
    old_seed = meta.get("data_seed", saved.get("seed", seed))
    if old_seed != seed:
        raise ConfigError(f"{workdir} holds a run trained with train.seed={old_seed}, whose windows come in that seed's order; "
                          f"resume with --config.train.seed={old_seed} (a new seed would repeat and skip windows) or use another --workdir")
    if old_batch == global_batch:
        return
    position = dict(train_it.get_state())
    used = position["next_index"] * old_batch  # windows consumed
    if used % global_batch:
        # (train.batch_size is a multiple of the mesh's devices, so the global batch is too)
        fits = sorted((g for d in range(1, math.isqrt(used) + 1) if used % d == 0 for g in {d, used // d} if g % devices == 0),
                      key=lambda g: (abs(g - global_batch), g))[:3]
        mesh = f" and that the {devices} devices of the mesh divide" if devices > 1 else ""
        todo = (f"resume with a global batch that divides {used}{mesh} (the nearest: {', '.join(map(str, sorted(fits)))})" if fits else
                f"no global batch that the {devices} devices of the mesh divide divides {used}: resume on a number of devices that "
                f"divides {old_batch}, as the run's did")
        raise ConfigError(f"{workdir} holds a run that has used {used} training windows (batches of {old_batch}): not a whole number of "
                          f"batches of {global_batch} (train.batch_size x grad_accum_steps); {todo}, or use another --workdir")
    train_it.set_state({**position, "next_index": used // global_batch})
    say(f"the data position: {used} windows used, batch {old_batch} -> {global_batch}; the next windows are the same")


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclasses.dataclass
class Steps:
    """The jitted pieces of training for one config on one mesh (the trainer's and the benchmark's)."""

    graphdef: object  # the model's nnx graph (in the config's layer layout)
    abstract_state: dict  # {'params', 'opt', 'rng', 'step'} shapes
    state_shard: dict  # and their shardings
    init_state: object  # () -> a fresh state, sharded
    train_step: object  # (state, tokens (accum, batch, T+1)) -> (state, metrics); donates the state
    eval_step: object  # (params, tokens (batch, T+1), mask (batch, T)) -> (loss sum, token count)
    tok_shard: NamedSharding
    eval_shard: NamedSharding
    score_step: object  # (params, tokens (batch, T), starts (batch,), targets, mask (batch, K)) -> (log-likelihood, greedy) per row (llmjax.scoring.model_scores)
    gradients: object  # (params, tokens (accum, batch, T+1), loss scale or None) -> (the optimizer's float32 gradients, loss, aux, stats)


# train.deterministic on a GPU: XLA's deterministic mode (scatter-adds such as the embedding table's
# gradient by a sort instead of atomics, deterministic library algorithms), so that a run repeats,
# and a resumed run continues, bit for bit.
DETERMINISTIC_GPU_OPTIONS = {"xla_gpu_deterministic_ops": True}


def step_compiler_options(mcfg, tcfg, platform: str) -> dict | None:
    """XLA compile options for the jitted steps: the CPU's float32 tuning (llmjax/runtime.py) and,
    with train.deterministic on a GPU, XLA's deterministic ops."""
    options = cpu_compiler_options(mcfg.matmul_dtype or mcfg.dtype, platform)
    if tcfg.get("deterministic", False) and platform == "gpu":
        options = {**(options or {}), **DETERMINISTIC_GPU_OPTIONS}
    return options


def loss_logits_dtype(mcfg, tcfg):
    """The dtype of the training and eval loss's logits (train.logits_dtype, checked by config.validate;
    auto: model.dtype)."""
    name = tcfg.get("logits_dtype", "auto")
    return mcfg.compute_dtype if name == "auto" else jnp.dtype(name)


# Dynamic loss scaling (train.loss_scale; PyTorch's torch.amp.GradScaler, jmp.DynamicLossScale): the
# loss is multiplied by the scale before the backward pass, so that float16's small gradients do not
# flush to zero, and the float32 gradients divided by it before clipping and weight decay. A step
# whose gradients hold an inf or NaN (the scaled backward overflowed float16) changes no parameter
# and no optimizer state (its batch is used up) and halves the scale; GROWTH_INTERVAL finite steps
# in a row double it.
LOSS_SCALE_INIT = 2.0**15
LOSS_SCALE_MIN = 1.0
LOSS_SCALE_GROWTH_INTERVAL = 2000


def loss_scaling(mcfg, tcfg) -> str | float | None:
    """How a run scales its loss: 'dynamic', a static scale (float) or None (train.loss_scale; auto:
    dynamic with float16 compute). A run saved before the key existed had none."""
    setting = loss_scale_setting(tcfg.get("loss_scale", "auto"))
    if setting == "auto":
        return "dynamic" if mcfg.dtype == "float16" else None
    return None if setting == "none" else setting


def initial_loss_scale() -> dict:
    """The dynamic loss scale's state at a run's start (part of the train state, checkpointed)."""
    return {"scale": jnp.float32(LOSS_SCALE_INIT), "good_steps": jnp.int32(0), "skipped_steps": jnp.int32(0)}


def next_loss_scale(ls: dict, finite) -> dict:
    """The dynamic loss scale after a step whose gradients were all finite (`finite`) or not."""
    grow = finite & (ls["good_steps"] + 1 >= LOSS_SCALE_GROWTH_INTERVAL)
    scale = jnp.where(finite, jnp.where(grow, ls["scale"] * 2, ls["scale"]), jnp.maximum(ls["scale"] / 2, LOSS_SCALE_MIN))
    return {"scale": scale, "good_steps": jnp.where(finite & ~grow, ls["good_steps"] + 1, 0),
            "skipped_steps": ls["skipped_steps"] + jnp.where(finite, 0, 1)}


def build_steps(cfg, mesh) -> Steps:
    """Model, optimizer, shardings and the jitted train and eval steps for `cfg` on `mesh`."""
    mcfg, tcfg = model_config(cfg), cfg.train
    if tcfg.batch_size % mesh.devices.size:
        n, b = mesh.devices.size, tcfg.batch_size
        near = " or ".join(str(m) for m in sorted({max(b // n, 1) * n, (b // n + 1) * n}))
        raise ConfigError(f"train.batch_size={b} must be divisible by the {n} devices of the mesh: set "
                          f"--config.train.batch_size={near} (a multiple of {n})")
    n_experts, expert_axis = getattr(mcfg, "n_experts", None), mesh.shape.get("expert", 1)
    if n_experts and expert_axis > 1 and n_experts % expert_axis:
        raise ConfigError(f"train.mesh.expert={expert_axis} must divide model.n_experts={n_experts} (each device holds whole experts)")
    logits_dtype = loss_logits_dtype(mcfg, tcfg)
    canonical = mcfg.replace(scan_layers=True)  # storage layout of parameters (and checkpoints)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(mcfg, seed=0)))

    def init_params():
        return nnx.to_pure_dict(nnx.state(build_model(canonical, seed=tcfg.seed), nnx.Param))

    abstract_params = jax.eval_shape(init_params)
    p_shard = param_shardings(abstract_params, mesh)
    tx, schedule = make_optimizer(tcfg)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    state_shard = {"params": p_shard, "opt": state_shardings(abstract_opt, p_shard, mesh), "rng": replicated, "step": replicated}
    abstract_state = {
        "params": abstract_params,
        "opt": abstract_opt,
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),  # for stochastic layers; none of the current ones is
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    scaling = loss_scaling(mcfg, tcfg)
    if scaling == "dynamic":  # (only then: the state of a run without it is as it was, its checkpoints too)
        abstract_state["loss_scale"] = jax.eval_shape(initial_loss_scale)
        state_shard["loss_scale"] = jax.tree.map(lambda _: replicated, abstract_state["loss_scale"])

    weights = dict(tcfg.aux_loss_weights)
    accum = tcfg.grad_accum_steps
    tok_shard = NamedSharding(mesh, P(None, *batch_sharding(mesh).spec))  # (accum, B, T+1)

    def loss_fn(params, tokens_BT1):
        model = nnx.merge(graphdef, convert_layer_layout(params, mcfg.scan_layers))
        x, _, aux = model.features(tokens_BT1[:, :-1])
        ce = token_losses(model.embed, x, tokens_BT1[:, 1:], tcfg.loss_chunks, logits_dtype).mean()
        aux = dict(aux)
        stats = aux.pop("stats", {})  # logged, not optimised
        # (config.validate asks a weight for each loss the config class declares: one it does not, a new
        # architecture's, would be refused there as a loss the model does not return, whatever weight it got)
        missing = sorted(set(aux) - set(weights))
        if missing:
            raise ConfigError(f"the {mcfg.arch} model returns auxiliary loss(es) {', '.join(missing)}, which its config class "
                              f"({type(mcfg).__name__}) does not list in aux_losses: add them there (llmjax/models/), then give "
                              f"each a weight in train.aux_loss_weights")
        total = ce + sum((weights[k] * v for k, v in aux.items()), jnp.float32(0))
        return total, (ce, aux, stats)

    def scaled_loss_fn(params, tokens_BT1, scale):  # (the aux values unscaled)
        total, aux = loss_fn(params, tokens_BT1)
        return total * scale, aux

    plain_grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    scaled_grad_fn = jax.value_and_grad(scaled_loss_fn, has_aux=True)

    def gradients(params, tokens, scale):
        """(float32 gradients, mean loss, aux losses, stats) over the micro-batches `tokens` (accum,
        B, T+1); with a loss `scale` (None: none), each micro-batch's loss is scaled and the
        gradients' sum unscaled once."""
        def grad_fn(params, tokens_BT1):
            return plain_grad_fn(params, tokens_BT1) if scale is None else scaled_grad_fn(params, tokens_BT1, scale)

        if accum == 1:
            (_, (ce, aux, stats)), grads = grad_fn(params, tokens[0])
        else:  # accumulate over micro-batches
            aux_shape = jax.eval_shape(lambda: loss_fn(params, tokens[0])[1][1:])
            zeros = (jax.tree.map(jnp.zeros_like, params), jnp.float32(0), *jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape))

            def micro_step(acc, tokens_BT1):
                (_, (ce, aux, stats)), grads = grad_fn(params, tokens_BT1)
                return jax.tree.map(jnp.add, acc, (grads, ce, aux, stats)), None

            (grads, ce, aux, stats), _ = jax.lax.scan(micro_step, zeros, tokens)
            grads, ce, aux, stats = jax.tree.map(lambda x: x / accum, (grads, ce, aux, stats))
        if scale is not None:  # unscaled (float32) before clipping and weight decay
            grads = jax.tree.map(lambda g: g / scale, grads)
        return grads, ce, aux, stats

    def train_step(state, tokens):
        params = state["params"]
        ls = state.get("loss_scale")  # dynamic scaling's state
        scale = ls["scale"] if ls is not None else (jnp.float32(scaling) if scaling is not None else None)
        grads, ce, aux, stats = gradients(params, tokens, scale)
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "train_loss": ce,
            "grad_norm": optax.tree.norm(grads),
            "update_norm": optax.tree.norm(updates),
            "lr": schedule(schedule_count(state["opt"])),  # (the step's own: skipped steps, if any, left the count behind)
            **{f"aux_{k}": v for k, v in aux.items()},
            **{f"stat_{k}": v for k, v in stats.items()},
        }
        new_state = {"params": new_params, "opt": opt, "rng": state["rng"], "step": state["step"] + 1}
        if scale is not None:
            metrics["loss_scale"] = scale
        if ls is not None:
            # an overflow (any device's: under jit the reduction over the sharded gradients is global)
            # skips the update: parameters and optimizer state (its step count, which the learning
            # rate follows, included) stay as they were
            finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
            new_state["params"], new_state["opt"] = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old), (new_params, opt), (params, state["opt"]))
            new_state["loss_scale"] = next_loss_scale(ls, finite)
            metrics.update(update_norm=jnp.where(finite, metrics["update_norm"], 0.0), step_skipped=~finite,
                           skipped_steps=new_state["loss_scale"]["skipped_steps"])
        return new_state, metrics

    options = step_compiler_options(mcfg, tcfg, mesh.devices.flat[0].platform)
    step_fn = jax.jit(
        train_step, in_shardings=(state_shard, tok_shard), out_shardings=(state_shard, replicated), donate_argnums=0,
        compiler_options=options,
    )

    eval_shard = batch_sharding(mesh)
    # the validation loss and task scores run the model as sampling and evaluation do: a capacity-mode
    # MoE dropless (llmjax.scoring.scoring_config), so that the loss is the sampled model's and no
    # token's loss depends on its batch-mates or the padding
    score_graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(scoring_config(mcfg), seed=0)))

    def eval_step(params, tokens_BT1, mask_BT):
        model = nnx.merge(score_graphdef, convert_layer_layout(params, mcfg.scan_layers))
        x = model.features(tokens_BT1[:, :-1])[0]
        per_tok = token_losses(model.embed, x, tokens_BT1[:, 1:], tcfg.loss_chunks, logits_dtype)
        return jnp.sum(per_tok * mask_BT), jnp.sum(mask_BT)

    eval_fn = jax.jit(
        eval_step, in_shardings=(p_shard, eval_shard, eval_shard), out_shardings=(replicated, replicated), compiler_options=options
    )

    def score_step(params, tokens_BT, starts_B, targets_BK, mask_BK):
        model = nnx.merge(score_graphdef, convert_layer_layout(params, mcfg.scan_layers))
        return model_scores(model, tokens_BT, starts_B, targets_BK, mask_BK)

    score_fn = jax.jit(
        score_step, in_shardings=(p_shard, eval_shard, eval_shard, eval_shard, eval_shard), out_shardings=(replicated, replicated),
        compiler_options=options,
    )

    def init():
        params = init_params()
        rng = jax.random.key_data(jax.random.key(tcfg.seed))
        state = {"params": params, "opt": tx.init(params), "rng": rng, "step": jnp.int32(0)}
        return {**state, "loss_scale": initial_loss_scale()} if scaling == "dynamic" else state

    return Steps(
        graphdef=graphdef, abstract_state=abstract_state, state_shard=state_shard,
        init_state=jax.jit(init, out_shardings=state_shard), train_step=step_fn, eval_step=eval_fn,
        tok_shard=tok_shard, eval_shard=eval_shard, score_step=score_fn,
        gradients=jax.jit(gradients, in_shardings=(p_shard, tok_shard, replicated), compiler_options=options),
    )


def train(cfg, workdir: str | os.PathLike, *, devices=None, quiet: bool = False) -> Run:
    """Train (or resume) the run described by `cfg` in `workdir`. `devices` defaults to all. A
    checkpoint or file that cannot be written (a full or read-only disk) stops it with a
    TrainingError of one line. A fresh run refused or stopped before it logged or saved a step leaves
    nothing behind (in a workdir that was there, only what was there before)."""
    made, wd = data_lib.missing_folders(workdir), Path(workdir).absolute()  # (the workdir first)
    # (its checkpoints/, where this call makes it: in a workdir the user made beforehand too)
    made_ckpt = [] if (wd / "checkpoints").exists() else [wd / "checkpoints"]
    # (a fresh run's files, named by _train once it holds the workdir's lock: never another run's, one
    # started meanwhile that wrote them while this one had not reached the lock)
    fresh_files: list[Path] = []
    # (a resume's run files as they were, and the step it resumed from: put back where it stops before
    # it logs or saves a step, a refusal when the step is traced, say: its config.json said settings that
    # never trained, the next resume's notes were of those, and a run with no checkpoint lost its metrics)
    earlier: dict = {}

    def logged_or_saved(start: int, logged_bytes: int | None) -> bool:
        """Whether this process saved a step past `start`, or logged one: metrics.jsonl longer than the
        `logged_bytes` it was rewritten to as the run started (None: not yet rewritten)."""
        if any(s > start for s in _saved_steps(wd / "checkpoints")):
            return True
        try:
            return logged_bytes is not None and (wd / "metrics.jsonl").stat().st_size > logged_bytes
        except FileNotFoundError:
            return False

    def take_back():
        # (refused after the workdir was made: a missing extra, a validation split too short, init_from
        # weights that cannot be read) the folders this call made, where still empty; rmdir removes nothing else.
        # A fresh run stopped before its first step was logged or saved (a refusal when the step is traced, such
        # as attention_impl='cudnn' on a CPU; a signal while compiling) takes back the run's files it wrote too.
        if fresh_files and not _saved_steps(wd / "checkpoints"):  # (none: not a fresh run's, or a --workdir that is a file)
            try:
                logged = (wd / "metrics.jsonl").stat().st_size > 0
            except FileNotFoundError:
                logged = False
            if not logged:
                for f in fresh_files:
                    f.unlink(missing_ok=True)
        if earlier and not logged_or_saved(earlier["start"], earlier.get("logged_bytes")):
            for f, data in earlier["files"].items():
                if data is None:
                    f.unlink(missing_ok=True)
                else:
                    data_lib.atomic_write_bytes(f, data)
        data_lib.remove_empty([*made_ckpt, *made])

    global _TAKE_BACK
    _TAKE_BACK = take_back
    try:
        # (the workdir's lock, _train's to take: released as this returns, after any take-back, which
        # released first would remove the files of a run that took the lock meanwhile)
        with contextlib.ExitStack() as hold:
            try:
                return _train(cfg, workdir, devices=devices, quiet=quiet, hold=hold, fresh_files=fresh_files, earlier=earlier)
            except WorkdirBusy:
                raise  # (the folders are the other run's: nothing is removed)
            except BaseException:
                take_back()
                raise
    except CheckpointError as e:
        raise TrainingError(f"{e}") from None
    except OSError as e:
        if getattr(e, "on_stdout", False):  # (the tool's own output, not the workdir: `> /dev/full`, a full disk under `> log`)
            if isinstance(e, BrokenPipeError):  # (its reader went away, `| head -1`: cli.run ends quietly, as other tools
                raise  # do, not 'error: standard output: Broken pipe')
            raise TrainingError(f"{cli.file_system_error(e) or f'standard output: {e.strerror or e}'}; "
                                f"{resume_point(wd / 'checkpoints')}") from None
        where = f" ({e.filename})" if e.filename else ""
        raise TrainingError(f"{e.strerror or e}{where}; stopped. Make room or write access in {wd}, "
                            f"then run the same command to resume from its last checkpoint") from None
    except jax.errors.JaxRuntimeError as e:  # (a batch or context too large for the device: one line, not XLA's traceback)
        what = cli.out_of_memory(e)
        if what is None:
            raise
        raise TrainingError(f"out of device memory ({what}); lower train.batch_size (raise train.grad_accum_steps to keep the "
                            f"global batch), or set model.remat=full or train.loss_chunks=8, or a shorter model.context_len; "
                            f"{resume_point(wd / 'checkpoints')}") from None
    finally:
        _TAKE_BACK = None


# While `train` runs: what it takes back where it stops early (above), for a process that ends at
# once with os._exit (a second Ctrl-C; another process of the run that failed, StopTogether)
_TAKE_BACK = None


def take_back_at_once() -> None:
    """`train`'s take-back before an os._exit, which skips it (a fresh run's files were left behind)."""
    if _TAKE_BACK is not None:
        with contextlib.suppress(Exception):
            _TAKE_BACK()


def host_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_host_batch(tcfg, mcfg, memory: int | None = None) -> None:
    """Refuse a step whose tokens alone (int32, gathered on the host by each process before they go to
    the devices) exceed the host's memory: batch_size=10**9 ground for many minutes gathering windows,
    growing without end and deaf to SIGTERM, where it could never fit."""
    memory = host_memory() if memory is None else memory
    need = tcfg.batch_size * tcfg.grad_accum_steps * (mcfg.context_len + 1) * 4 // jax.process_count()
    if memory and need > memory:
        raise ConfigError(f"one step's tokens, train.batch_size={tcfg.batch_size} x train.grad_accum_steps={tcfg.grad_accum_steps} "
                          f"windows of model.context_len+1={mcfg.context_len + 1} int32 tokens, need {need / 1e9:.3g} GB on this host, "
                          f"more than its {memory / 1e9:.3g} GB of memory; lower train.batch_size or train.grad_accum_steps")


def _train(cfg, workdir, *, hold: contextlib.ExitStack, fresh_files: list[Path], earlier: dict, devices=None,
           quiet: bool = False) -> Run:
    if jax.default_backend() == "cpu":
        tune_host_allocator()
    if jax.process_count() > 1:  # (before anything that one process alone may refuse)
        check_same_config(json.loads(cfg.to_json()))
    validate(cfg)
    mcfg = model_config(cfg)
    tcfg, ecfg = cfg.train, cfg.eval
    workdir = Path(workdir).absolute()
    lead = jax.process_index() == 0
    if cfg.logging.wandb and lead:
        _wandb_modules()  # (a missing extra: said now, before the run's files are written)
    say = (lambda *a: None) if quiet or not lead else (lambda *a: print(*a, flush=True))

    # --- data ---------------------------------------------------------------------------
    try:
        dataset = data_lib.open_dataset(cfg.data.dataset, cfg.data.dir)
    except data_lib.DataError as e:
        raise ConfigError(str(e)) from None
    check_same_data(dataset)
    # every shard against its sha256, in a thread while the model is built and the first step
    # compiles; its answer is awaited after that step, before anything is saved
    damaged = in_thread(dataset.damaged_shards)
    try:
        tokenizer = dataset.tokenizer()
    except tok_lib.InstallError as e:  # (the package's own files: preparing the dataset again does not mend them)
        raise ConfigError(str(e)) from None
    except tok_lib.TokenizerError as e:
        raise ConfigError(f"dataset '{dataset.name}' in {dataset.path}: {e}; prepare it again with llmjax.prepare") from None
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={mcfg.vocab_size} does not match dataset '{dataset.name}' ({tokenizer.vocab_size} tokens); "
            f"set --config.model.vocab_size={tokenizer.vocab_size}"
            + (f" --config.model.padded_vocab_size={-(-tokenizer.vocab_size // 64) * 64}" if tokenizer.vocab_size > mcfg.padded_vocab_size else "")
        )

    # --- downstream tasks scored in the loop (loaded now: a download problem stops nothing later) ---
    task_names = [t.strip() for t in ecfg.tasks.split(",") if t.strip()]
    task_items, task_requests = {}, {}
    if task_names:
        try:
            downstream.check_names(task_names)
            downstream.check_tokenizer(tokenizer)
            task_items = {t: downstream.load_items(t, ecfg.tasks_dir or None, limit=ecfg.tasks_limit or None) for t in task_names}
            # tokenised once (not at every scoring), and every choice checked against the context now, not at the first scoring
            task_requests = {t: downstream.requests_for(items, tokenizer) for t, items in task_items.items()}
            for t, items in task_items.items():
                downstream.check_fit(t, items, task_requests[t], mcfg.context_len)
        except downstream.TaskError as e:
            raise ConfigError(f"eval.tasks: {e}") from None

    # --- mesh, model, optimizer (before the workdir: a mesh or batch refused leaves no folder) ---
    check_host_batch(tcfg, mcfg)
    mesh = make_mesh(tcfg.mesh, devices)
    n_dev = mesh.devices.size
    if task_items and (ecfg.tasks_batch_size <= 0 or ecfg.tasks_batch_size % n_dev):
        raise ConfigError(f"eval.tasks_batch_size={ecfg.tasks_batch_size} must be a positive multiple of the {n_dev} devices of the mesh")
    steps = build_steps(cfg, mesh)
    graphdef, state_shard, abstract_state = steps.graphdef, steps.state_shard, steps.abstract_state
    if (warmup_only := all_warmup(tcfg)) is not None:
        say(warmup_only)
    if (replicated := replicated_by_size(abstract_state["params"], mesh)) is not None:
        say(replicated)  # (silent, a mesh that splits no parameter would use as much memory per device as one device)
    step_fn, eval_fn, eval_shard, tok_shard = steps.train_step, steps.eval_step, steps.eval_shard, steps.tok_shard
    scaling = loss_scaling(mcfg, tcfg)
    accum, micro, T = tcfg.grad_accum_steps, tcfg.batch_size, mcfg.context_len

    # --- workdir: config.json (a resumed run must have the same model) ----------------------
    resolved = json.loads(cfg.to_json())
    saved_cfg = workdir / "config.json"
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file; pass a folder (a new one, or an earlier run's)")
    refuse_workdir_place(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    busy = WorkdirBusy(f"another training process is running in {workdir} now (the same command in another terminal?); wait for "
                       f"it to end (then the same command resumes its run), or use another --workdir")
    try:
        if lead:  # (process 0's: the others share its folder)
            hold.enter_context(exclusive_folder(workdir, lambda: busy))
        refused = False
    except WorkdirBusy:
        refused = True
    if most_of_all_processes(int(refused)):  # (every process stops, not process 0 alone)
        raise busy
    old_cfg = check_workdir(workdir)
    if lead and not saved_cfg.exists():  # (a fresh run: its files, written below, are `train`'s to take back where it stops early)
        fresh_files.extend(workdir / f for f in RUN_FILES)
    check_shared_workdir(workdir)
    ckpt = Checkpointer(workdir / "checkpoints", keep=tcfg.keep_checkpoints)
    start = ckpt.latest_step() or 0
    changed: list[str] = []  # (the train settings a resume changes)
    estimate_note = ""
    if start > tcfg.max_steps:
        raise ConfigError(f"{workdir} holds a run at step {start}, past train.max_steps={tcfg.max_steps}; "
                          f"set --config.train.max_steps={start} or more to continue it, or use another --workdir")
    end = max(start, tcfg.max_steps if not tcfg.stop_at_step else min(tcfg.stop_at_step, tcfg.max_steps))
    # nothing to run (a finished run again, or one at its stop_at_step): its config.json keeps the
    # settings its steps trained with, and no W&B run is resumed with settings that trained nothing
    idle = start == end
    if start and old_cfg is not None:
        old_data = old_cfg.get("data", {}).get("dataset")
        if old_data is not None and old_data != resolved["data"]["dataset"]:
            raise ConfigError(f"{workdir} holds a run trained on dataset '{old_data}' (its data position and tokenizer are that "
                              f"dataset's); resume with --config.data.dataset={old_data} or use another --workdir")
        try:
            old_tok = json.loads((workdir / "tokenizer.json").read_text())
        except (OSError, ValueError):
            old_tok = None  # (missing or cut short: written again below)
        if old_tok is not None and old_tok != tokenizer.description():
            def said(d):
                return f"{d.get('kind')}, {d.get('vocab_size')} tokens" if isinstance(d, dict) else "not a tokenizer"
            same = said(old_tok) == said(tokenizer.description())  # (it read "(char, 65 tokens) is not ... (char, 65 tokens)")
            raise ConfigError(f"{workdir} holds a run whose tokenizer ({said(old_tok)}: its tokenizer.json) is not the one dataset "
                              f"'{dataset.name}' is now prepared with ({said(tokenizer.description())}"
                              f"{', the same size with other tokens' if same else ''}): the dataset was prepared again since, or the "
                              f"run's tokenizer.json was changed; prepare it as before to resume (or put back that file), or use another --workdir")
        diffs = model_changes(old_cfg, resolved)
        if diffs:
            raise ConfigError(
                f"{workdir} holds a run with a different model config: {'; '.join(diffs)}; use another --workdir or the same config"
            )
        changed = config_diff(train_settings(old_cfg), resolved["train"], "train.")  # (said once restored: `resuming`)
        # the validation estimate's windows (eval.num_batches batches of train.batch_size, drawn by train.seed): the best
        # checkpoint is kept, and --which=best picks, by comparing estimates from before the resume with those after it
        old_estimate = (old_cfg.get("eval", {}).get("num_batches"), train_settings(old_cfg).get("batch_size"), train_settings(old_cfg).get("seed"))
        if old_estimate[0] is not None and old_estimate[0] != ecfg.num_batches:
            changed.append(f"eval.num_batches ({old_estimate[0]} -> {ecfg.num_batches})")
        if old_estimate[0] and old_estimate != (ecfg.num_batches, tcfg.batch_size, tcfg.seed):
            estimate_note = (f"; the validation estimates from step {start + 1} on are over other windows than the earlier "
                             f"checkpoints', with which keeping the best checkpoint and --which=best compare them")

    def resuming(count: int) -> None:
        """Say which settings the resume changed and, where they move the learning rate of step
        start + 1, from what to what: the schedules read at `count`, the updates the restored
        optimizer has applied (fewer than `start` where dynamic loss scaling skipped steps)."""
        if not changed or idle:  # (nothing follows them: no step runs)
            return
        if jump := schedule_jump(train_settings(old_cfg), tcfg, start, count):
            say(f"resuming with changed settings: {'; '.join(changed)}; {jump}{estimate_note}")
        else:
            say(f"resuming with changed settings: {'; '.join(changed)} (the learning-rate schedule follows the new values from step {start + 1})"
                f"{estimate_note}" if any(d.split(" ")[0] in SCHEDULE_KEYS for d in changed)
                else f"resuming with changed settings: {'; '.join(changed)}{estimate_note}")

    # --- data iterators ---------------------------------------------------------------------
    pi, pc = jax.process_index(), jax.process_count()

    def train_batches(order: int = data_lib.DATA_ORDER):
        return data_lib.train_batches(dataset.split("train"), seq_len=T, global_batch=micro * accum, seed=tcfg.seed,
                                      process_index=pi, process_count=pc, order=order)

    data_order = data_lib.DATA_ORDER  # (a resumed run's: its checkpoint's, below)
    try:
        train_it = train_batches()
        val_shards = dataset.split("val")
        data_lib.WindowSource(val_shards, T + 1, "val")  # (a split too short for one window: said now, not at the first evaluation)
    except data_lib.DataError as e:
        raise ConfigError(f"dataset '{dataset.name}': {e}") from None

    def to_global(local: np.ndarray, sharding, global_shape):
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    def local_rows(batch: np.ndarray) -> np.ndarray:  # this process's rows of a global batch
        n = batch.shape[0] // pc
        return batch[pi * n : (pi + 1) * n]

    def evaluate(params, whole_split: bool) -> float:
        if whole_split:  # (or its first eval.final_num_batches batches)
            batches = data_lib.sequential_windows(val_shards, seq_len=T, batch=micro)
            if ecfg.final_num_batches > 0:
                batches = itertools.islice(batches, ecfg.final_num_batches)
        else:
            windows = data_lib.sample_windows(val_shards, seq_len=T, batch=micro, num_batches=ecfg.num_batches, seed=tcfg.seed + 1)
            batches = ((w, np.ones((micro, T), np.float32)) for w in windows)
        total, count = 0.0, 0.0
        for toks, mask in batches:
            s, c = eval_fn(
                params,
                to_global(local_rows(toks), eval_shard, toks.shape),
                to_global(local_rows(mask), eval_shard, mask.shape),
            )
            total, count = total + float(s), count + float(c)
        return total / max(count, 1.0)

    def score_tasks(params) -> dict:
        """acc and acc_norm of every in-loop task (llmjax.downstream), as metrics."""
        def batch_fn(*arrays):  # (tokens, starts, targets, mask: llmjax.scoring.Scorer)
            return steps.score_step(params, *(to_global(local_rows(a), eval_shard, a.shape) for a in arrays))

        scorer = Scorer(batch_fn, context_len=T, batch_size=ecfg.tasks_batch_size)
        out = {}
        for name, items in task_items.items():
            try:
                m = downstream.score_task(scorer, tokenizer, items, requests=task_requests[name])
            except jax.errors.JaxRuntimeError as e:  # (the scorer's batch, not the training step's: train()'s line named train.batch_size)
                if (what := cli.out_of_memory(e)) is None:
                    raise
                raise TrainingError(f"out of device memory scoring eval.tasks ({what}); lower eval.tasks_batch_size "
                                    f"({ecfg.tasks_batch_size} sequences a batch); {resume_point(workdir / 'checkpoints')}") from None
            except ScoreError:  # non-finite log-likelihoods: not a number, as the validation loss then (no made-up accuracy)
                m = {"acc": float("nan"), "acc_norm": float("nan")}
            out[f"{name}_acc"], out[f"{name}_acc_norm"] = m["acc"], m["acc_norm"]
        return out

    # --- initialise or restore -------------------------------------------------------------------
    target = abstract_with_shardings(abstract_state, state_shard)
    meta = {}
    if start:
        # a run that had dynamic loss scaling and now has none, or the reverse (model.dtype or
        # train.loss_scale changed): its checkpoint's state restored as it is, the scale dropped or started
        saved_scale = ckpt.state_keys(start)
        saved_scale = "loss_scale" in saved_scale if saved_scale is not None else "loss_scale" in target
        target = {k: v for k, v in target.items() if k != "loss_scale"}
        if saved_scale:
            abstract_scale = jax.eval_shape(initial_loss_scale)
            target["loss_scale"] = abstract_with_shardings(abstract_scale, jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_scale))
        try:
            with jax.set_mesh(mesh):
                state, meta = ckpt.restore(start, target, train_it, model=resolved["model"])
        except CheckpointError as e:
            raise ConfigError(str(e)) from None
        if old_cfg is not None:
            resuming(int(jax.device_get(schedule_count(state["opt"]))))
        # (what changes from the next step on: not said where no step follows)
        tell = (lambda *a, **k: None) if idle else say
        if saved_scale and "loss_scale" not in abstract_state:
            ls = jax.device_get(state.pop("loss_scale"))
            tell(f"dynamic loss scaling is off from step {start + 1} (train.loss_scale={tcfg.get('loss_scale', 'auto')}, "
                f"model.dtype={mcfg.dtype}); the run had it, at scale {float(ls['scale']):g} after {int(ls['skipped_steps'])} skipped step(s)")
        elif not saved_scale and "loss_scale" in abstract_state:
            state["loss_scale"] = jax.device_put(initial_loss_scale(), state_shard["loss_scale"])
            tell(f"dynamic loss scaling starts at step {start + 1}, at scale {LOSS_SCALE_INIT:g}: the run trained without it until then")
        data_order = meta.get("data_order", 1)  # (a checkpoint before data order 2 names none)
        if data_order != data_lib.DATA_ORDER:  # the run goes on in the order it began in: the restored position indexes it
            position, train_it = train_it.get_state(), train_batches(data_order)
            train_it.set_state(position)
        resume_data_position(train_it, meta, old_cfg, micro * accum, tcfg.seed, workdir, tell, dataset, devices=mesh.devices.size)
        say(f"resumed from {workdir / 'checkpoints'} at step {start}")
    else:
        if tcfg.init_from:  # pretrained weights (read first: weights refused compile nothing), model.context_len rows of their positions
            from llmjax.export import ExportError, params_from_gpt2, read_gpt2

            try:
                pretrained = params_from_gpt2(read_gpt2(tcfg.init_from, mcfg), mcfg, crop=True)
            except ExportError as e:
                raise ConfigError(f"train.init_from: {e}") from None
        with jax.set_mesh(mesh):
            state = steps.init_state()
        if tcfg.init_from:  # (the optimizer's moments start at zero either way)
            state["params"] = jax.device_put(pretrained, state_shard["params"])
            say(f"initialised from {tcfg.init_from}")

    # the training tokens seen before this process's first step: the data position (in global
    # batches of this run's size, llmjax.data.train_batches) in windows, each T targets; right across
    # a resume with another train.batch_size or grad_accum_steps, where step x tokens per step is not
    tokens_before = int(dict(train_it.get_state())["next_index"]) * micro * accum * T

    # (before the run's files: W&B that cannot start, no API key say, is refused with nothing written)
    wandb_run = _wandb_init(cfg, workdir) if (cfg.logging.wandb and lead and not idle) else None
    metrics_path = workdir / "metrics.jsonl"
    history = []
    if lead:
        if saved_cfg.is_file():  # (a resume, or a run with no checkpoint started again: `train` puts these back where it stops early)
            earlier.update(start=start, files={f: (f.read_bytes() if f.is_file() else None) for f in (workdir / n for n in RUN_FILES)})
        if not (idle and saved_cfg.is_file()):
            data_lib.atomic_write_json(saved_cfg, resolved)
        data_lib.atomic_write_json(workdir / "tokenizer.json", tokenizer.description())
        if metrics_path.is_file():  # keep what the restored checkpoint covers; later steps are redone
            for line in metrics_path.read_text().splitlines():
                try:
                    m = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash or a full disk: its step is redone
                    continue
                if isinstance(m, dict) and m.get("step", start + 1) <= start:
                    history.append(m)
        kept = "".join(json.dumps(m) + "\n" for m in history).encode()
        data_lib.atomic_write_bytes(metrics_path, kept)
        if earlier:
            earlier["logged_bytes"] = len(kept)

    # --- loop --------------------------------------------------------------------------------------
    summary = summarize(mcfg)
    peak = peak_flops(mesh.devices.flat[0], tcfg.peak_flops_per_device)
    tokens_per_step = micro * accum * T
    bar = _progress(start, tcfg.max_steps, enabled=cfg.logging.progress_bar and lead and not quiet)
    metrics_file = open(metrics_path, "a") if lead else None
    last_good = start
    last_val = None
    last_time = time.perf_counter()
    metrics_block = max(1, min(tcfg.log_every_steps, 50))
    multi = jax.process_count() > 1

    def fetch(block: list[tuple[int, dict]]) -> list[dict]:
        """Host copies of some steps' metrics (one transfer; blocks until they are done), their
        average wall time per step, and the NaN guard."""
        nonlocal last_time
        hosts = jax.device_get([m for _, m in block])
        ckpt.check()  # (a save writing in the background that failed: now, not at the next save)
        now = time.perf_counter()
        dt, last_time = (now - last_time) / len(block), now
        lines = []
        for (step, _), host in zip(block, hosts):
            host = {k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()) for k, v in host.items()}
            # (a step that dynamic loss scaling skipped has non-finite gradients, and no update)
            skipped = bool(host.get("step_skipped", False))
            last = (f"The last good checkpoint is step {last_good} in {workdir / 'checkpoints'}" if last_good
                    else "No checkpoint was written")
            if not math.isfinite(host["train_loss"]) or not (skipped or all(math.isfinite(host[k]) for k in ("grad_norm", "update_norm"))):
                hint = (f" (float16 gradients overflowed the static train.loss_scale={scaling:g}: a smaller one, or "
                        f"train.loss_scale=dynamic, keeps them finite)" if isinstance(scaling, float) and math.isfinite(host["train_loss"]) else "")
                stop = NonFinite(
                    f"loss became non-finite at step {step} (train_loss={host['train_loss']}, grad_norm={host['grad_norm']}, "
                    f"update_norm={host['update_norm']}){hint}; stopped. " + last, step
                )
            elif skipped and host["loss_scale"] <= LOSS_SCALE_MIN:  # (halving it no further, every step would be skipped)
                stop = NonFinite(
                    f"the gradients of step {step} overflowed float16 at loss scale {host['loss_scale']:g}, dynamic scaling's "
                    f"least (no scaling at all): the model's float16 backward pass overflows; stopped. Train it with "
                    f"model.dtype=bfloat16 or float32. " + last
                    if mcfg.dtype == "float16" else
                    f"the gradients of step {step} were non-finite at loss scale {host['loss_scale']:g}, dynamic scaling's least "
                    f"(no scaling at all), with model.dtype={mcfg.dtype}: not an overflow of float16 that scaling could avoid, the "
                    f"gradients themselves are inf or NaN (a lower train.lr, or train.loss_scale=none to stop at the first one); "
                    f"stopped. " + last, step
                )
            else:
                stop = None
            if stop is not None:
                for good in lines:  # (the block's steps before it, the run's way there: their rows were lost with the block)
                    emit(good)
                raise stop
            line = {"step": step, "tokens": tokens_before + (step - start) * tokens_per_step, "train_loss": host["train_loss"],
                    "lr": host["lr"], "grad_norm": None if skipped else host["grad_norm"], "tokens_per_sec": tokens_per_step / dt, "step_time": dt,
                    "mfu": summary["flops_per_token"] * tokens_per_step / dt / (peak * n_dev) if peak else None}
            if "loss_scale" in host:
                line["loss_scale"] = host["loss_scale"]
            if "skipped_steps" in host:
                line["skipped_steps"] = int(host["skipped_steps"])
            line.update({k: v for k, v in host.items() if k.startswith(("aux_", "stat_"))})
            lines.append(line)
        return lines

    def emit(line: dict, val_loss: float | None = None) -> None:
        step = line["step"]
        if val_loss is not None:
            line["val_loss"] = val_loss
        history.append(line)
        if metrics_file:
            metrics_file.write(json.dumps(line) + "\n")
            metrics_file.flush()
        scored = any(f"{name}_acc" in line for name in task_items)
        if bar is not None:  # (the figures set before the count moves: drawn with it, the step's own)
            if step % tcfg.log_every_steps == 0 or val_loss is not None or scored:
                post = {"loss": f"{line['train_loss']:.4f}", "lr": f"{line['lr']:.2e}", "tok/s": f"{line['tokens_per_sec']:,.0f}",
                        "ms": f"{line['step_time'] * 1e3:.1f}"}
                if line["mfu"] is not None:
                    post["mfu"] = f"{line['mfu']:.1%}"
                if "loss_scale" in line:
                    post["scale"] = f"{line['loss_scale']:g}"
                if "skipped_steps" in line:
                    post["skipped"] = str(int(line["skipped_steps"]))
                if val_loss is not None:
                    post["val"] = f"{val_loss:.4f}"
                for name in task_items:
                    if f"{name}_acc_norm" in line:
                        post[name[:4]] = f"{line[f'{name}_acc_norm']:.3f}"
                bar.set_postfix(post, refresh=False)
            bar.update(1)
        if wandb_run is not None and (step % tcfg.log_every_steps == 0 or val_loss is not None or scored):
            # (commit: W&B holds a row logged with a step until the next one; a crash then lost it for good,
            # since the resumed run logs from the checkpoint on, often that checkpoint's evaluation row)
            wandb_run.log({k: v for k, v in line.items() if v is not None and k != "step" and not isinstance(v, list)}, step=step,
                          commit=True)

    pending: list[tuple[int, dict]] = []  # dispatched steps whose metrics are not read yet
    by_signal = False  # (stopped early by SIGTERM or Ctrl-C, said when it happens)
    try:
        with _Stop(workdir / "checkpoints") as stop, jax.set_mesh(mesh):  # the mesh in context: MoE's expert parallelism uses it
            for step in range(start + 1, end + 1):
                local = next(train_it).reshape(accum, micro // pc, T + 1)
                batch = to_global(local, tok_shard, (accum, micro, T + 1))
                state, m = step_fn(state, batch)
                if damaged is not None:
                    check_shards(dataset, damaged, step)
                    damaged = None
                is_last = step == tcfg.max_steps
                do_eval = is_last or (ecfg.every_steps > 0 and ecfg.num_batches > 0 and step % ecfg.every_steps == 0)
                do_ckpt = do_eval or step == end or (tcfg.checkpoint_every_steps > 0 and step % tcfg.checkpoint_every_steps == 0)
                do_tasks = bool(task_items) and (is_last or (ecfg.tasks_every_steps > 0 and step % ecfg.tasks_every_steps == 0))
                # SIGTERM: this process's flag; with several, any process's, agreed at the same steps
                # in every process (each metrics block's end and each evaluation, checkpoint or
                # scoring step), so that all save that step and stop together (a process stopping
                # alone would leave the others waiting in the next step's collectives)
                if multi:  # (the highest of every process's STOP_SIGNALS)
                    agree = do_eval or do_ckpt or do_tasks or step % metrics_block == 0
                    signalled = STOP_SIGNALS[most_of_all_processes(STOP_SIGNALS.index(stop.requested))] if agree else None
                else:
                    signalled = stop.requested
                stopping = signalled is not None
                do_ckpt = do_ckpt or stopping
                if step == start + 1 and not (do_eval or do_ckpt or do_tasks):
                    # the first step alone: its line carries the compilation, the lines after it none
                    emit(fetch([(step, m)])[0])
                    continue
                if not (do_eval or do_ckpt or do_tasks):
                    # Read metrics in blocks, a block behind: the host never waits for the step it
                    # just dispatched, and syncs once per block rather than once per step.
                    pending.append((step, m))
                    if len(pending) >= 2 * metrics_block:
                        for line in fetch(pending[:metrics_block]):
                            emit(line)
                        del pending[:metrics_block]
                    continue
                lines = fetch(pending + [(step, m)])
                pending = []
                for line in lines[:-1]:
                    emit(line)
                val = evaluate(state["params"], whole_split=is_last) if do_eval else None
                if is_last and ecfg.num_batches > 0:  # also the periodic estimate, comparable with earlier steps
                    lines[-1]["val_loss_estimate"] = evaluate(state["params"], whole_split=False)
                if do_tasks:
                    lines[-1].update(score_tasks(state["params"]))
                peak_mem = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
                if peak_mem is not None:  # (the CPU reports none)
                    lines[-1]["peak_memory_bytes"] = int(peak_mem)
                emit(lines[-1], val)
                if val is not None:
                    last_val = val
                if not multi and stop.requested is not None:  # (also a SIGTERM during this step's evaluation or scoring)
                    stopping = do_ckpt = True
                    signalled = stop.requested
                if do_ckpt:
                    # the checkpoint's metric for `best`: the periodic estimate at the last step too
                    # (comparable with the earlier checkpoints'; the whole split's loss is in its meta)
                    best_metric = lines[-1].get("val_loss_estimate", val)
                    ckpt.save(step, state, train_it, {"step": step, "model": resolved["model"],
                                                      "val_loss": val, "val_whole_split": bool(is_last and val is not None),
                                                      "val_final_batches": ecfg.final_num_batches,
                                                      "data_global_batch": micro * accum, "data_seed": tcfg.seed, "data_order": data_order,
                                                      "data_train": data_fingerprint(dataset)},
                              val_loss=best_metric)
                    last_good = step
                last_time = time.perf_counter()  # evaluation and checkpointing are not step time
                if stopping and step < end:
                    say(f"stopped by {signalled} after step {step}; checkpoint saved. Run the same command to resume.")
                    end = step
                    by_signal = True
                    break
            if pending:
                for line in fetch(pending):
                    emit(line)
            ckpt.wait()  # the last save's background write, with SIGTERM still caught (not killing the process mid-write)
    finally:
        try:
            ckpt.close()
        finally:
            if metrics_file:
                metrics_file.close()
            if bar is not None:
                bar.close()
            if wandb_run is not None:
                # a run stopped by an error (a non-finite loss, a checkpoint that could not be written) is
                # failed in W&B, not finished (exit code 0 as a run that ran to its end); a signal's stop is 0
                wandb_run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)

    final = end == tcfg.max_steps
    if not final and not by_signal:  # train.stop_at_step: where the run stands and how it goes on (else a silent exit)
        said = (f"nothing to run: the run is at step {end}" if start == end else f"stopped after step {end}; checkpoint saved")
        say(f"{said} (train.stop_at_step={tcfg.stop_at_step} of train.max_steps={tcfg.max_steps}) in {workdir}; to go on, run "
            f"the same command with a later --config.train.stop_at_step, or 0 to run to train.max_steps")
    if final and start == end:  # nothing to run: a finished run again, or one stopped early finished by a lower max_steps
        # the whole validation split's loss: saved with the checkpoint when it was a run's last step
        # (else its val_loss is the periodic estimate, or none): else measured now
        if meta.get("val_whole_split") and meta.get("val_final_batches", 0) == ecfg.final_num_batches:
            last_val = meta.get("val_loss")
        else:
            with jax.set_mesh(mesh):
                last_val = evaluate(state["params"], whole_split=True)
    elif last_val is None:
        last_val = next((m["val_loss"] for m in reversed(history) if "val_loss" in m), None)
    sample = None
    if final and ecfg.sample_tokens > 0 and jax.process_count() == 1:
        model = nnx.merge(graphdef, convert_layer_layout(jax.device_get(state["params"]), mcfg.scan_layers))
        try:
            sample = tokenizer.decode(generate(model, [start_ids(tokenizer)], ecfg.sample_tokens, seed=tcfg.seed, eot_id=tokenizer.eot_id)[0])
        except SampleError as e:  # (non-finite logits: a float16 forward that overflowed; the run itself is saved)
            print(f"warning: no end-of-run sample: {e}", file=sys.stderr, flush=True)
    return Run(workdir=workdir, step=end, final=final, last_val_loss=last_val, metrics=history, sample=sample,
               val_batches=data_lib.sequential_batch_count(val_shards, seq_len=T, batch=micro))


def _progress(start, total, enabled):
    if not enabled:
        return None
    if not sys.stderr.isatty():  # (a log file: tqdm's frames, each ending in a carriage return, were one line of them all)
        return _ProgressLines(start, total)
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)


class _ProgressLines:
    """The progress bar where stderr is not a terminal: a line for each step whose figures were set."""

    def __init__(self, start, total):
        self.n, self.total, self.post = start, total, None

    def set_postfix(self, post, refresh=False):
        self.post = post

    def update(self, n=1):
        self.n += n
        if self.post is not None:
            print(f"step {self.n}/{self.total}: " + ", ".join(f"{k}={v}" for k, v in self.post.items()), file=sys.stderr, flush=True)
            self.post = None

    def close(self):
        pass


def _wandb_modules():
    """wandb and python-dotenv's load_dotenv (the `wandb` extra), or a one-line ConfigError."""
    try:
        import wandb
        from dotenv import load_dotenv
    except ImportError:
        raise ConfigError("logging.wandb=True needs the wandb extra: bash scripts/setup.sh wandb") from None
    return wandb, load_dotenv


def _wandb_init(cfg, workdir: Path):
    wandb, load_dotenv = _wandb_modules()
    from pydantic import ValidationError  # (W&B's settings are pydantic's)

    load_dotenv(Path.cwd() / ".env")
    id_file = workdir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    project = os.environ.get("WANDB_PROJECT_NAME") or cfg.logging.wandb_project
    try:  # (W&B's own check of the name: its refusal said to set an API key or WANDB_MODE=offline)
        wandb.Settings(project=project)
    except wandb.errors.UsageError as e:
        where = ("WANDB_PROJECT_NAME (in the environment or the .env file in the folder you run from)" if os.environ.get("WANDB_PROJECT_NAME")
                 else "--config.logging.wandb_project")
        raise ConfigError(f"logging.wandb=True: Weights & Biases could not start ({type(e).__name__}: {str(e).strip()[:300]}); "
                          f"set {where} to another name") from None
    try:
        run = wandb.init(
            project=project,
            entity=os.environ.get("WANDB_ENTITY") or None,
            name=workdir.name,
            id=run_id,
            resume="allow",
            dir=str(workdir),
            config=json.loads(cfg.to_json()),
        )
    except wandb.errors.Error as e:  # (no API key, a refused one, W&B unreachable: its traceback, and the run's files left behind)
        said = (str(e).strip().splitlines() or [""])[0][:300]
        raise ConfigError(f"logging.wandb=True: Weights & Biases could not start ({type(e).__name__}: {said}); put WANDB_API_KEY in a "
                          f".env file in the folder you run from (or run `wandb login`), or set WANDB_MODE=offline to log without "
                          f"an account, or drop logging.wandb") from None
    except ValidationError as e:  # (a WANDB_* variable W&B's settings refuse, WANDB_MODE=offlin: pydantic's traceback)
        err = e.errors()[0]
        value = err.get("input")
        names = [k for k, v in sorted(os.environ.items()) if k.startswith("WANDB_") and v == str(value)]  # (its variable)
        what = f"{names[0]}={value!r}" if names else f"its setting {'.'.join(map(str, err.get('loc', ())))}={value!r}"
        raise ConfigError(f"logging.wandb=True: Weights & Biases could not start: {what}: {err.get('msg')}; correct or unset it "
                          f"(in the environment or the .env file in the folder you run from)") from None
    id_file.write_text(run_id)  # (once started: the next run continues this W&B run)
    return run


# --- command line ------------------------------------------------------------------------------

def define_flags():
    cli.define_config_flag()
    flags.adopt_module_key_flags(cli)  # (--help lists them with the tool's own flags)
    flags.DEFINE_string("workdir", None, "run directory (default: runs/<config name>[_<variant>])")
    flags.DEFINE_string("coordinator_address", None, "multi-process: host:port of process 0 (else auto-detected, e.g. SLURM)")
    flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-process: this process's index")


def default_workdir(spec: str) -> str:
    path, variant = cli.split_spec(spec)
    return str(Path("runs") / (Path(path).stem + ("" if variant == "default" else f"_{variant}")))


COORDINATOR_WAIT_S = 300  # how long a process waits for the coordinator to listen (jax.distributed's own initialization_timeout)


def coordinator_problem(address: str, process_id: int | None, wait_s: float = COORDINATOR_WAIT_S) -> str | None:
    """What stops jax.distributed from starting with `--coordinator_address=address` in process
    `process_id` (None: not known yet, as under SLURM), in one line; None where nothing does.
    jax.distributed itself ends the process with a C++ abort and its stack (or a segfault) on each
    of these, several minutes later for the first and the last: a host name that does not resolve, a
    port out of range, process 0's port held by another program, and (for the other processes) no
    coordinator listening at the address within `wait_s` seconds (processes may start at different
    times: each waits for process 0's coordinator as long as jax.distributed would)."""
    host, port = address.rsplit(":", 1)
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # ([::1]:1234)
    if not 1 <= int(port) <= 65535:
        return f"--coordinator_address={address}: port {int(port)} is not a TCP port (1..65535)"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        return (f"--coordinator_address={address}: host '{host}' cannot be resolved ({getattr(e, 'strerror', None) or e}); "
                f"give process 0's host name or IP address")
    if process_id == 0 and not os.environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        # the coordinator listens on every address at that port ([::]:port, jax.distributed's default)
        try:
            dual = socket.has_dualstack_ipv6()
            with socket.create_server(("", int(port)), family=socket.AF_INET6 if dual else socket.AF_INET, dualstack_ipv6=dual):
                pass
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else e
            return (f"--coordinator_address={address}: process 0 cannot listen on port {port} ({why}: another program, or an "
                    f"earlier run, holds it); give every process another port")
    elif process_id is not None:
        deadline = time.monotonic() + wait_s
        while True:
            for family, kind, proto, _, sockaddr in infos:
                try:
                    with socket.socket(family, kind, proto) as s:
                        s.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
                        s.connect(sockaddr)
                    return None
                except OSError:
                    continue
            if time.monotonic() >= deadline:
                return (f"no coordinator listens at --coordinator_address={address} after {wait_s:g} s; start process 0 "
                        f"(--process_id=0) on that host with the same --coordinator_address, or give its address")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return None


_DISTRIBUTED_TRIED = False  # (init_distributed was reached: its own refusals say what to fix)


def init_distributed():
    """jax.distributed for multi-process runs: explicit flags, or what a cluster (SLURM, ...) sets."""
    global _DISTRIBUTED_TRIED
    _DISTRIBUTED_TRIED = True
    FLAGS = flags.FLAGS
    hint = "give --coordinator_address=HOST:PORT (process 0's), --num_processes=N and --process_id=0..N-1 to every process"
    address, n, i = FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    # (its preemption service's own SIGTERM handler replaced the trainer's until the loop: a SIGTERM
    # while the run restored or compiled was noted in a log line and the run went on to its end)
    jax.config.update("jax_enable_preemption_service", False)
    if (address, n, i) != (None, None, None):  # (any one, also 0 or empty: a multi-process run meant, not one process alone)
        if address is not None and not re.fullmatch(r".+:\d+", address):  # (jax.distributed: an IndexError traceback)
            cli.fail(f"--coordinator_address={address} must be host:port (process 0's), e.g. 10.0.0.1:12345")
        if n is not None and n < 1:
            cli.fail(f"--num_processes={n} must be at least 1 (the number of processes, one per host)")
        if n is not None and i is not None and not 0 <= i < n:
            cli.fail(f"--process_id={i} must be in 0..{n - 1} (--num_processes={n})")
        claim_process_id(address, i)  # (first: a second process 1 waited for no coordinator as the first did)
        if address and (problem := coordinator_problem(address, i)) is not None:  # (jax.distributed: a C++ abort, minutes later)
            cli.fail(problem)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU-only runs; GPUs use NCCL
        try:
            start_distributed(f"at --coordinator_address={address}", coordinator_address=address, num_processes=n, process_id=i)
        except (ValueError, RuntimeError) as e:  # (jax's own checks, a coordinator that cannot be reached)
            cli.fail(f"jax.distributed could not start ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}); {hint}")
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        try:
            start_distributed("under SLURM")
        except (ValueError, RuntimeError) as e:  # (python run in an allocation's shell or batch script, not by srun: SLURM_NTASKS
            # is set there, and JAX finds no step to take the processes from; giving a coordinator was the wrong advice)
            cli.fail(f"jax.distributed could not start under SLURM ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}); "
                     f"SLURM_NTASKS={os.environ['SLURM_NTASKS']} here: start every process with srun (one task per process), or unset "
                     f"SLURM_NTASKS to train in this one process; or {hint}")


_PROCESS_CLAIM = contextlib.ExitStack()  # (this process's claim_process_id lock, held until it exits)


def claim_process_id(address: str | None, i: int | None) -> None:
    """Refuse a second process `i` of the run at `address` on this host (process 1's command run again
    in another terminal): jax.distributed took it for process i restarted and aborted every process of
    the running run within seconds, C++ stacks, while the second waited 5 minutes to say that not
    every process joined. (Process 0's second copy finds the coordinator's port taken.) An flock on a
    folder of the temporary directory, held until this process ends; where none can be made or
    locked, no check."""
    if not address or i is None:
        return
    import tempfile

    # (a folder of this user's: in one every user could write, another's lock on the name refused this user's run)
    folder = Path(tempfile.gettempdir()) / f"llmjax-processes-{os.getuid()}" / f"{re.sub(r'[^A-Za-z0-9.-]', '_', address)}-{i}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _PROCESS_CLAIM.enter_context(exclusive_folder(folder, lambda: ConfigError(
            f"process {i} of the run at --coordinator_address={address} is running on this host already; a second one would end "
            f"that run (jax.distributed aborts every process of it): stop that one first, or give this one its own --process_id")))
    except OSError:
        return
    except ConfigError as e:
        cli.fail(str(e))


def start_distributed(where: str, **kwargs) -> None:
    """jax.distributed.initialize(**kwargs), waiting COORDINATOR_WAIT_S for every process to join; past
    that, one line and exit status 2. jax.distributed itself, where a process never started (its
    command not run on one host, a wrong --num_processes), ended every other process 5 minutes on in
    a C++ abort with its stack."""
    def join():
        jax.distributed.initialize(**kwargs, initialization_timeout=COORDINATOR_WAIT_S + 60)

    try:
        in_thread(join).result(timeout=COORDINATOR_WAIT_S)
    except concurrent.futures.TimeoutError:
        n = kwargs.get("num_processes")
        print(f"error: not every process joined the run {where} within {COORDINATOR_WAIT_S:g} s; start every one"
              f"{f' (--process_id=0..{n - 1})' if n else ''} with the same --coordinator_address and --num_processes", file=sys.stderr, flush=True)
        os._exit(2)  # (not jax.distributed's shutdown: its start is still waiting, in its thread)
    except KeyboardInterrupt as e:  # (a Ctrl-C or SIGTERM meanwhile: Python's exit shut the half-started service down, in many log lines)
        line, code = ("interrupted by SIGTERM", 143) if isinstance(e, cli.Terminated) else ("interrupted", 130)
        print(f"error: {line}", file=sys.stderr, flush=True)
        os._exit(code)


_TOGETHER = None  # the StopTogether of this process's multi-process run, while it trains
FAILED_KEY = "llmjax/train/failed"  # (jax.distributed's key-value store: "process\ncode\nline" of the first process that failed)
WATCH_S = 0.5  # how often each process looks for another's failure
ACK_WAIT_S = 10.0  # how long a failed process 0 (the coordinator's host) waits for the others to read its failure
ALIVE_KEY = "llmjax/train/alive/"  # (the key-value store: each process's watcher's round count, "done" once the process ended well)
LOST_S = 10.0  # a process whose round count has stood still this long is gone (killed outright, its host lost)


class StopTogether:
    """With several processes, one process's error ends every process at once, each in one line:
    the failing one says what (its own error line), the others that process N stopped and why. Else
    the others waited in their next collective (a check at the start, a training step) and the
    failed process in jax.distributed's shutdown barrier, both for 5 minutes, then all ended in C++
    aborts with their stacks. The failing process puts its line in jax.distributed's key-value
    store; a thread in every process looks for it every WATCH_S seconds and ends its process with
    os._exit (where the process may be blocked in a collective that no Python code can leave).
    Every process that fails ends with os._exit too (jax.distributed's shutdown barrier would wait
    for the processes that have gone); process 0, which hosts the store, first waits for the
    others to have read it (at most ACK_WAIT_S seconds). A no-op in a single process.

    A process killed outright (SIGKILL, the out-of-memory killer, its host lost) puts no line
    there: where the others' collective did not fail at once (Gloo's pairs not yet connected, an
    Orbax barrier of a checkpoint's save), they waited for jax.distributed's heartbeat timeout,
    100 s, then ended in C++ aborts. So each watcher also counts its rounds in the store, and one
    whose count stands still for LOST_S seconds is gone: the process that sees it says so in one
    line and stops the others as a failed process does. (jax.distributed's own liveness cannot
    say it: a lost heartbeat ends every process in a C++ abort, a lower heartbeat timeout only
    sooner; jax_enable_recoverability, which keeps them alive, lets process 0 end before the others
    at a run's end, and the others then abort.) A process 0 killed outright takes the store with
    it: jax.distributed then ends the others at once, in its C++ abort."""

    def __init__(self, checkpoints: Path | None = None):
        import threading

        try:  # (JAX's own handle on the key-value store: private, so a JAX without it leaves this a no-op)
            from jax._src import distributed

            self.client = distributed.global_state.client  # (None in one process; not jax.process_count(): no backend started here)
        except (ImportError, AttributeError):
            self.client = None
        self.checkpoints = checkpoints  # (where a run stopped by a lost process resumes from)
        self.done = None
        self.ending = threading.RLock()  # (held by the thread that ends the process: its line alone, not one per thread)
        self.lost: set[int] = set()  # processes gone: their round count stood still for LOST_S seconds
        self.moved: dict[int, tuple] = {}  # process -> (its round count, when this watcher saw it move)
        self.looked = None  # when this watcher last read the counts

    def __enter__(self):
        global _TOGETHER
        if self.client is not None:
            import threading

            self.done = threading.Event()
            self.thread = threading.Thread(target=self._watch, name="llmjax-stop-together", daemon=True)
            self.thread.start()
            _TOGETHER = self
        return self

    def _watch(self):
        rounds = 0
        while not self.done.wait(WATCH_S):
            self._stop_if_another_failed()
            rounds += 1
            with contextlib.suppress(Exception):
                self.client.key_value_set(f"{ALIVE_KEY}{jax.process_index()}", str(rounds), allow_overwrite=True)
            self._stop_if_another_is_gone()

    def _claim(self, wait: bool = True) -> bool:
        """Make this thread the one that ends the process. Where another thread is ending it: wait
        for its os._exit (`wait`), or False."""
        if self.ending.acquire(blocking=False):
            return True
        while wait:
            time.sleep(60)
        return False

    def _stop_if_another_is_gone(self):
        """Where another process's round count stood still for LOST_S seconds: say so and end this
        process as a failed one does, the others with it (else return)."""
        try:
            counts = dict(self.client.key_value_dir_get(ALIVE_KEY))
        except Exception:  # noqa: BLE001  (the store did not answer: judged at the next round)
            return
        now = time.monotonic()
        held_up = self.looked is None or now - self.looked > 4 * WATCH_S  # (this thread itself did not run: no judge of the others)
        self.looked = now
        for p in range(jax.process_count()):
            count = counts.get(f"{ALIVE_KEY}{p}")
            if p == jax.process_index() or count == "done":
                continue
            if held_up or p not in self.moved or self.moved[p][0] != count:
                self.moved[p] = (count, now)
            elif now - self.moved[p][1] >= LOST_S:
                self.lost.add(p)
        if not self.lost:
            return
        try:  # (before the claim: raised after it, this thread died holding `ending`, and the main thread waited for it forever)
            where = resume_point(self.checkpoints) if self.checkpoints else "no checkpoint was written"
        except OSError as e:  # (the checkpoints' folder unreadable: on the lost host's file system, say)
            where = f"its checkpoints could not be listed ({e.strerror or e}: {self.checkpoints})"
        if not self._claim(wait=False):
            return
        line = (f"process {min(self.lost)} of the run ended without a word (nothing from it for {LOST_S:g} s): killed (out of host "
                f"memory?) or its host lost; {where}")
        print(f"error: {line}", file=sys.stderr, flush=True)
        take_back_at_once()
        self.stop_all(line, 1)

    def _stop_if_another_failed(self):
        """Where another process failed: say so and end this one (else return)."""
        me = jax.process_index()
        try:
            who, code, line = self.client.key_value_try_get(FAILED_KEY).split("\n", 2)
        except Exception:  # noqa: BLE001  (not there: no process failed)
            return
        if int(who) == me:
            return
        self._claim()
        print(f"error: process {who} stopped, so this process stopped too (process {who}: {line})", file=sys.stderr, flush=True)
        take_back_at_once()
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{FAILED_KEY}/read/{me}", "1")
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(int(code))

    def stop_all(self, line: str, code: int):
        """Tell the other processes that this one stopped with `line` (said already), and end it."""
        self._claim()
        me = jax.process_index()
        try:
            self.client.key_value_set(FAILED_KEY, f"{me}\n{code}\n{line}")
            first = True
        except Exception:  # noqa: BLE001  (another process failed first: its line ends the others)
            first = False
            with contextlib.suppress(Exception):  # (read, as the watcher would say: a failed process 0 need not wait for this one)
                self.client.key_value_set(f"{FAILED_KEY}/read/{me}", "1")
        if me == 0 and first:  # (the store lives in this process: the others read it before it goes)
            deadline = time.monotonic() + ACK_WAIT_S
            for p in range(1, jax.process_count()):
                while time.monotonic() < deadline and p not in self.lost:  # (one gone reads nothing)
                    try:
                        self.client.key_value_try_get(f"{FAILED_KEY}/read/{p}")
                        break
                    except Exception:  # noqa: BLE001
                        time.sleep(0.1)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)

    def __exit__(self, kind, e, tb):
        global _TOGETHER
        if self.client is None:
            return False
        if e is None or (isinstance(e, SystemExit) and e.code in (0, None)) or isinstance(e, EveryProcess):
            self.done.set()
            self.thread.join()
            with contextlib.suppress(Exception):  # (ended well: its count stands still from now on, and is no loss)
                self.client.key_value_set(f"{ALIVE_KEY}{jax.process_index()}", "done", allow_overwrite=True)
            _TOGETHER = None
            return False
        if not isinstance(e, (SystemExit, KeyboardInterrupt)):  # (cli.fail's line: _main asked before it)
            # (an error that another process's end caused here: Gloo's 'Connection closed by peer' in a
            # collective; that process put its line in the store before it ended)
            self._stop_if_another_failed()
        self._claim()  # (its line alone: not after its watcher's, where that thread is ending the process)
        if isinstance(e, SystemExit):  # (cli.fail: its line said)
            line, code = cli.last_error or "stopped", e.code if isinstance(e.code, int) else 1
        elif isinstance(e, ConfigError):
            line, code = str(e), 2
        elif isinstance(e, KeyboardInterrupt):
            line, code = "interrupted", 130
        elif type(e).__name__ == "JaxRuntimeError" and (said := cli.exhausted(e)) is not None:
            line, code = said, 1
        elif isinstance(e, BrokenPipeError) and getattr(e, "on_stdout", False):  # (`| head -1`: quiet here, as in one process)
            line, code = "the reader of its standard output went away (a pipe closed)", 141
        else:  # (a bug: its traceback, as in one process)
            import traceback

            traceback.print_exception(e)
            line, code = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}", 1
        if not isinstance(e, SystemExit) and code != 141:
            print(f"error: {line}", file=sys.stderr, flush=True)
        self.stop_all(line, code)


AT_START_WAIT_S = 30  # how long a process refused before jax.distributed started waits for the others, to tell them


def stop_others_at_the_start(argv: list[str], code: int) -> None:
    """A process refused before jax.distributed started (its --config file missing on its host, a
    flag it alone was given wrong): where its --coordinator_address, --num_processes and
    --process_id are whole, it joins the run only to tell the others its line (StopTogether),
    and ends. Else the others waited for it in jax.distributed's start for 5 minutes, and process
    0 then ended in a C++ abort with its stack. Returns where it cannot join."""
    given = {name: cli.given(argv, (name,)) for name in ("coordinator_address", "num_processes", "process_id")}
    if not all(given.values()):
        return
    address, n, i = given["coordinator_address"][-1][1], given["num_processes"][-1][1], given["process_id"][-1][1]
    if not (re.fullmatch(r".+:\d+", address) and n.isdigit() and i.isdigit() and 0 <= int(i) < int(n) and int(n) > 1):
        return
    deadline = time.monotonic() + AT_START_WAIT_S
    try:
        if coordinator_problem(address, int(i), wait_s=AT_START_WAIT_S) is not None:
            return
    except Exception:  # noqa: BLE001  (its own line is said; the others' start says theirs)
        return

    def join():  # (in a thread: jax.distributed ends the process in a C++ abort where the others never come)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=address, num_processes=int(n), process_id=int(i),
                                   initialization_timeout=AT_START_WAIT_S + 60)

    try:
        in_thread(join).result(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:  # noqa: BLE001  (not joined in time, or refused: end without jax.distributed's shutdown barrier)
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)
    StopTogether().stop_all(cli.last_error or "stopped", code)


def peer_lost(error: BaseException) -> str | None:
    """Gloo's words where a collective's peer went away (a process killed by SIGKILL or the kernel's
    out-of-memory killer, a host lost: no line of its own in the store); None for other errors."""
    found = re.search(r"Gloo \w+ failed: .*?(?:closed|reset) by peer", str(error))
    return None if found is None else re.sub(r"\[external/[^\]]*\] ", "", found.group(0))[:300]


def final_loss_covers(cfg, val_batches: int | None = None) -> str:
    """What a finished run's final val_loss covers: eval.final_num_batches (0, or at least the
    split's `val_batches`: the whole split)."""
    n = cfg.eval.get("final_num_batches", 0)
    return f"the validation split's first {n} batches" if n and (val_batches is None or n < val_batches) else "the whole validation split"


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected argument '{argv[1]}'; see --help")
    FLAGS = flags.FLAGS
    if FLAGS.config is None:
        cli.fail("--config is required, e.g. --config configs/shakespeare_char.py")
    cli.refuse_empty(workdir="the run's folder (e.g. runs/NAME)")  # (it trained in the default runs/<config> instead)
    workdirs = [w for _, w in cli.given(cli.command_line(), ("workdir",))]  # (absl keeps the last: --workdir A --workdir B trained in B)
    if others := [w for w in workdirs[1:] if Path(w) != Path(workdirs[0])]:
        cli.fail(f"--workdir {workdirs[0]} and --workdir {others[0]} name two runs' folders; give one")
    if threading_main():  # (a SIGTERM before or after the loop: one line, as a Ctrl-C there)
        signal.signal(signal.SIGTERM, cli.terminate)
    init_distributed()
    workdir = FLAGS.workdir or default_workdir(FLAGS["config"].config_filename)
    with StopTogether(Path(workdir).absolute() / "checkpoints"):  # (several processes: one's error ends them all, at once)
        _main(FLAGS, workdir)


def _main(FLAGS, workdir: str):
    enable_compilation_cache()
    try:
        run = train(FLAGS.config, workdir)
    except (TrainingError, jax.errors.JaxRuntimeError) as e:
        if _TOGETHER is not None:  # (a collective that failed as another process ended: 'checkpoint ... could not be written (Gloo ...)')
            _TOGETHER._stop_if_another_failed()
            if (gone := peer_lost(e)) is not None:  # (it said nothing: 'make room or write access', or a traceback, here)
                _TOGETHER._claim()  # (not its watcher's line too, where it found the process gone meanwhile)
                cli.fail(f"another process of the run ended without a word ({gone}): killed (out of host memory?) or its host lost; "
                         f"{resume_point(Path(workdir).absolute() / 'checkpoints')}", code=1)
        if not isinstance(e, TrainingError):
            raise
        cli.fail(str(e), code=cli.NON_FINITE_EXIT if isinstance(e, NonFinite) else 1)
    except KeyboardInterrupt as e:  # (before the loop, or after it)
        by_sigterm = isinstance(e, cli.Terminated)
        cli.fail(interrupted(Path(workdir).absolute() / "checkpoints", "SIGTERM" if by_sigterm else ""), code=143 if by_sigterm else 130)
    if jax.process_index() == 0:
        if run.sample:
            out = cli.TextOut()  # (a character stdout's encoding lacks: an escape and a warning, not a traceback)
            out.write(f"--- sample ---\n{run.sample}\n")
            out.warn()
        if run.final:  # (the last line, after the sample: the run's summary)
            print(f"done: {run.step} steps, final val_loss {run.last_val_loss:.4f} ({final_loss_covers(FLAGS.config, run.val_batches)}); run in {run.workdir}")


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    train_module = cli.tool("llmjax.train")
    train_module.define_flags()
    flags.adopt_module_key_flags(train_module)  # (--help lists the key flags of __main__, which defines none now)
    try:
        cli.run(train_module.main)
    except SystemExit as e:  # (refused before jax.distributed started: the other processes wait for this one there)
        if e.code not in (0, None) and not train_module._DISTRIBUTED_TRIED:
            train_module.stop_others_at_the_start(sys.argv, e.code if isinstance(e.code, int) else 1)
        raise
