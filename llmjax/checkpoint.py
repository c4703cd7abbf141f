"""Checkpoints: an Orbax CheckpointManager holding the train state (parameters, optimizer state,
RNG), the grain iterator's state and a little JSON metadata, saved asynchronously. It keeps the
last `keep` checkpoints plus the one with the best validation loss.

Parameters are stored in the scanned (stacked) layer layout whatever `model.scan_layers` is (the
trainer converts inside the jitted step), so a checkpoint restores with layers scanned or unrolled;
restoring onto another mesh or device count reshards through the abstract target's shardings.

Each checkpoint's metadata holds a fingerprint of every array it saved (`fingerprints`: two 32-bit
sums of the array's bits, one weighted by position), checked when it is restored: Orbax's data
files carry no checksum, so bytes damaged on disk would otherwise restore as silently wrong weights.
The trainer's metadata also records the model config that saved the checkpoint (`model`), checked
against the run's config.json where the caller passes it (`check_model`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from llmjax.runtime import logger_level


class CheckpointError(ValueError):
    """A checkpoint problem a user can fix (one line)."""


class _Quiet(logging.Filter):
    """Drops Orbax's warnings about what llmjax does on purpose: checkpoints saved without a
    validation loss (only evaluation steps have one) and managers opened read-only. A step's
    `_CHECKPOINT_METADATA` that Orbax cannot read (its record of the save: times, item names,
    which restoring does without) was an error line each time Orbax read it, holding the whole
    file: one warning line instead, once for each file."""

    damaged: set[str] = set()

    def filter(self, record):
        if record.msg in ("Failed to json parse Metadata file: %s, file content: %s, error: %s",
                          "Failed to read Metadata file: %s, error: %s") and "orbax" in record.pathname:
            path = str(record.args[0])
            if path not in self.damaged:
                self.damaged.add(path)
                print(f"warning: {path} is damaged: Orbax's record of the save (its times), which reading the checkpoint does without",
                      file=sys.stderr, flush=True)
            return False
        message = record.getMessage()
        if "orbax" in record.pathname and record.levelno >= logging.ERROR and (record.exc_info or "raised an exception" in message):
            return False  # (a background write that failed, with its traceback: Checkpointer says it in one line)
        return not message.startswith(("Requested `tracked_metric`; did not provide metrics", "Given directory is read only"))


logging.getLogger("absl").addFilter(_Quiet())


def _late_completion(kind, value, tb) -> bool:
    """Whether an exception is asyncio's "Event loop is closed" raised in call_soon_threadsafe as a
    TensorStore thread calls it (its traceback starts there, not in Python code that called it)."""
    return kind is RuntimeError and str(value) == "Event loop is closed" and tb is not None \
        and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"


def _late_completion_hook(previous):
    """sys.excepthook that leaves out TensorStore's report of a write completing after Orbax's event
    loop closed (after a failed save: "Event loop is closed", raised in asyncio's
    call_soon_threadsafe from a TensorStore thread, which prints it through sys.excepthook): the
    failed save is said in one line by Checkpointer. Everything else goes to `previous`."""

    def hook(kind, value, tb):
        if not _late_completion(kind, value, tb):
            previous(kind, value, tb)

    hook.llmjax = True
    return hook


def _late_completion_unraisable_hook(previous):
    """sys.unraisablehook that leaves out the same report when it comes as an "Exception ignored"
    (a TensorStore read or write completing from C after Orbax's event loop closed, after a failed
    restore: seen once in CI, its traceback printed after the one-line error). Everything else goes to
    `previous`."""

    def hook(unraisable):
        if not _late_completion(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback):
            previous(unraisable)

    hook.llmjax = True
    return hook


if not getattr(sys.excepthook, "llmjax", False):
    sys.excepthook = _late_completion_hook(sys.excepthook)
if not getattr(sys.unraisablehook, "llmjax", False):
    sys.unraisablehook = _late_completion_unraisable_hook(sys.unraisablehook)


def _single_replica_saves_on_cpu() -> None:
    """On a CPU, Orbax saves each replicated array (the parameters and optimizer state of a
    data-parallel run over several CPU devices) in one piece, not "replica-parallel" (each of the R
    replicas writing 1/R of it), which it does by default off GPUs (orbax-checkpoint 0.12.4 turns it off
    where JAX_PLATFORMS names a GPU). Each replica's part was an eager slice on its device, about 3 ms
    of dispatch apiece: a tiny model trained over 8 CPU devices spent 13.5 of a 22 s run slicing
    (4,623 slices over its saves). CPU devices share the host's memory, so the parts bought nothing.
    The files hold the same arrays either way (only their chunking differs), and any checkpoint reads
    with either. Replaces Orbax's handler for jax.Array once per process (same options otherwise)."""
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if type(handler) is not ocp.type_handlers.ArrayHandler or not getattr(handler, "_use_replica_parallel", False):
        return  # (already single-replica, or a handler someone else registered: left alone)
    store = getattr(handler, "_array_metadata_store", None)
    with logger_level("absl", logging.ERROR):  # (Orbax's warning line that a handler is replaced)
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=store), override=True)


class Checkpointer:
    def __init__(self, directory: Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        if jax.default_backend() == "cpu":
            _single_replica_saves_on_cpu()
        policy = cm.AnyPreservationPolicy(
            [
                cm.LatestN(n=keep),
                cm.BestN(get_metric_fn=lambda m: -m["val_loss"], n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            best_fn=lambda m: m["val_loss"],  # for best_step()
            best_mode="min",
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        check_metrics(self.directory)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iter, meta: dict, val_loss: float | None = None) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave({**meta, "fingerprints": fingerprints(state)}),
        )
        # (a NaN or inf loss is saved as no metric: Orbax would rank a NaN among the numbers, deleting the best step)
        metrics = {"val_loss": float(val_loss)} if val_loss is not None and math.isfinite(val_loss) else None
        self.wait()  # the previous save's background write (a full or read-only disk: one line)
        try:
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(unwritable(self.directory, step, e)) from None

    def check(self) -> None:
        """Raise (one line) if a save still writing in the background has failed (a full disk)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(unwritable(self.directory, None, e)) from None

    def restore(self, step: int, abstract_state, data_iter=None, model: dict | None = None):
        """Restore the state onto `abstract_state`'s shardings (and the iterator in place), checked
        against the fingerprints saved with it and, with `model` (the run's resolved model config),
        against the model that saved it."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        other_count = None  # the data iterator's state as saved by a run on another number of processes
        if data_iter is not None:
            data_dir = self.directory / str(step) / "data"
            if (data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json").is_file():
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            else:
                other_count = sorted(data_dir.glob("process_*-of-*.json"))
        try:
            with _quiet_asyncio():
                out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax and TensorStore raise many types for a damaged or foreign checkpoint
            raise CheckpointError(unreadable(self.directory, step, e, RESUME_HINT, abstract_state)) from None
        if other_count is not None:
            # llmjax's training iterator counts global batches, so its position is the same in every
            # process and for any process count (llmjax.data.train_batches): take any process's
            if not other_count:
                raise CheckpointError(f"checkpoint {self.directory}/{step} has no data iterator state; "
                                      f"{_hint(RESUME_HINT, self.directory, step)}")
            data_iter.set_state(json.loads(other_count[0].read_text()))
        meta = dict(out["meta"] or {})
        check_model(meta.get("model"), model, self.directory, step)
        verify(out["state"], meta.pop("fingerprints", None), self.directory, step, RESUME_HINT)
        return out["state"], meta

    def state_keys(self, step: int) -> set[str] | None:
        """The names of the train state's parts that checkpoint `step` holds ('params', 'opt', ...,
        'loss_scale' for a run with dynamic loss scaling), from its metadata; None where that cannot
        be read (restoring it then says what is wrong)."""
        try:
            saved = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / "state")
            return set(getattr(saved, "item_metadata", saved) or {})
        except Exception:  # noqa: BLE001
            return None

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(unwritable(self.directory, None, e)) from None

    def close(self) -> None:
        self.wait()
        try:
            self.manager.close()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(unwritable(self.directory, None, e)) from None


# What a user can do about a damaged checkpoint, by caller: (with another checkpoint, the latest
# earlier one or else the first later one; without one). (Resuming restores the latest: no later one.)
RESUME_HINT = ("move it aside (`mv {dir}/{step} {dir}/{step}.damaged`) to resume from step {other}",
               "move it aside to start afresh")
SAMPLE_HINT = ("pass another one, e.g. --checkpoint {dir}/{other}", "it is this run's only checkpoint")


def _hint(hint: tuple[str, str], directory: Path, step: int) -> str:
    others = sorted(int(c.name) for c in Path(directory).iterdir() if c.name.isdigit() and int(c.name) != step)
    earlier = [s for s in others if s < step]
    other = earlier[-1] if earlier else (others[0] if others else None)
    said = hint[0].format(dir=directory, step=step, other=other) if other is not None else hint[1]
    if hint is RESUME_HINT and jax.process_count() > 1:  # (every process reads the one shared folder)
        said += (f" (as process {jax.process_index()} of {jax.process_count()} reads it: if the other processes read it whole, the "
                 f"trouble is this host's view of the folder, its mount, not the checkpoint; check that before moving it)")
    return said


def unreadable(directory: Path, step: int, e: BaseException, hint: tuple[str, str], target=None) -> str:
    """One line for a checkpoint that Orbax could not read: the innermost error's first line (that
    is TensorStore's, which names the file and the problem, where Orbax wraps it). With `target`
    (the abstract tree restored), a checkpoint of another model says so instead (its arrays'
    shapes against the target's, from the checkpoint's metadata): an earlier step would not help."""
    if (memory := _device_memory(e)) is not None:  # (not damaged: moving it aside would lose a good checkpoint)
        return (f"checkpoint {directory}/{step} is not damaged, but restoring it ran out of device memory ({memory}); free the "
                f"device's memory (another process may hold it) or use one with more, or shard the state over more devices (train.mesh)")
    if target is not None and (other := _other_model(Path(directory) / str(step), target)):
        return (f"checkpoint {directory}/{step} holds another model than its run's config.json describes ({other}); "
                f"use it with the run folder it was trained in")
    return f"checkpoint {directory}/{step} cannot be restored ({_innermost(e)}); {_hint(hint, directory, step)}"


def _device_memory(e: BaseException | None) -> str | None:
    """XLA's words where `e` or an error it was raised from or during is a failed device allocation
    ('Out of memory while trying to allocate N bytes.', `cli.out_of_memory`), else None."""
    from llmjax.cli import out_of_memory  # (XLA's words, as every tool reads them)

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (found := out_of_memory(e)) is not None:
            return found
        e = e.__cause__ or e.__context__
    return None


def _other_model(step_dir: Path, target) -> str | None:
    """Where the parameters saved in `step_dir` differ in shape from `target["params"]` (a path
    missing from the checkpoint counts), or None: the same shapes, or metadata that cannot be read
    (a damaged checkpoint). Paths are compared as 'params/blocks/...' (Orbax's metadata has dicts
    where the optimizer state has named tuples)."""
    try:
        saved = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state")
        saved = (getattr(saved, "item_metadata", saved) or {})["params"]
    except Exception:  # noqa: BLE001 (damaged: said by the caller's own message)
        return None

    def key(path):
        return "params/" + jax.tree_util.keystr(path, simple=True, separator="/")

    shapes = {key(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(saved)[0] if hasattr(v, "shape")}
    for path, want in jax.tree_util.tree_flatten_with_path(target["params"])[0]:
        if key(path) not in shapes:
            return f"{key(path)} is not in the checkpoint"
        if shapes[key(path)] != tuple(want.shape):
            return f"{key(path)} has shape {shapes[key(path)]} there, {tuple(want.shape)} in the model"
    return None


def check_model(saved: dict | None, model: dict | None, directory: Path, step: int) -> None:
    """Raise CheckpointError where the model that saved checkpoint `step` (its metadata's `model`)
    differs from `model` (the run's config.json) in more than how it runs (config.EXECUTION_KEYS):
    parameters of the same shapes (n_head 4 x head_dim 16 or 2 x 32, another norm_eps, gqa with
    n_kv_head = n_head for vanilla) would otherwise restore into a model that computes something
    else. Checkpoints written before they recorded their model pass."""
    from llmjax.config import model_changes

    if not isinstance(saved, dict) or not isinstance(model, dict):
        return
    diffs = model_changes({"model": saved}, {"model": model})
    if diffs:
        raise CheckpointError(f"checkpoint {directory}/{step} holds another model than its run's config.json describes "
                              f"({', '.join(diffs[:3])}{', ...' if len(diffs) > 3 else ''}: the checkpoint's -> config.json's); "
                              f"use it with the run folder it was trained in")


def check_metrics(directory: Path) -> None:
    """Raise CheckpointError for a checkpoint whose metrics file is damaged or not llmjax's (a JSON
    object with a numeric `val_loss`). Orbax reads every step's metrics file when a manager opens
    the folder, and a bad one raised a traceback for every checkpoint of the run."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for step_dir in directory.iterdir():
        f = step_dir / "metrics" / "metrics"
        if not step_dir.name.isdigit() or not f.is_file():
            continue
        try:
            metrics = json.loads(f.read_text())
            problem = None if isinstance(metrics, dict) and type(metrics.get("val_loss")) in (int, float) else "no numeric val_loss"
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise CheckpointError(f"{f} is damaged or not llmjax's ({problem}); it records checkpoint {step_dir.name}'s validation "
                                  f"loss (for --which=best and for keeping the best checkpoint): {_metrics_fix(f, int(step_dir.name))}")


def _metrics_fix(f: Path, step: int) -> str:
    """What to do about a damaged metrics file: write it again from the run's metrics.jsonl where
    that has the step's figure (the checkpoint's metric: the periodic estimate, as saved); else
    moving it aside, with what that costs."""
    rows = _metrics_rows(f.parents[2].parent / "metrics.jsonl")
    row = next((r for r in reversed(rows) if r.get("step") == step), {})
    value = row.get("val_loss_estimate", row.get("val_loss"))
    if isinstance(value, (int, float)):
        return f"write it again with `echo '{{\"val_loss\": {value!r}}}' > {f}` (from metrics.jsonl), then run again"
    return (f"move it aside (`mv {f} {f}.damaged`) and run again: the checkpoint then has no validation loss, and training "
            f"deletes it once it is not among the last train.keep_checkpoints")


def _metrics_rows(path: Path) -> list[dict]:
    """The JSON rows of a metrics.jsonl that can be read (none where the file cannot)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _innermost(e: BaseException) -> str:
    """'Type: first line' of the innermost cause (TensorStore's, which names the file and the
    problem, where Orbax wraps it), a long one cut in the middle: its start says what, its end why."""
    while e.__cause__ is not None:
        e = e.__cause__
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    out = f"{type(e).__name__}: {first if len(first) <= 240 else first[:150] + ' ... ' + first[-90:]}"
    # (TensorStore gives the system's error as a number, os_error_code='27', and not always its words)
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code and os.strerror(int(code.group(1))) not in out:
        out += f" [{os.strerror(int(code.group(1)))}]"
    return out


def unwritable(directory: Path, step: int | None, e: BaseException) -> str:
    """One line for a checkpoint that could not be written (`step` None: one written in the
    background); the run can resume from the last checkpoint that was."""
    written = sorted(int(c.name) for c in Path(directory).iterdir() if c.name.isdigit()) if Path(directory).is_dir() else []
    what = f"checkpoint {directory}/{step}" if step is not None else f"a checkpoint in {directory}"
    then = f"run the same command to resume from step {written[-1]}" if written else "run the same command to start again"
    return f"{what} could not be written ({_innermost(e)}); make room or write access there, then {then}"


@jax.jit
def _fingerprint_arrays(leaves):
    """(n, 2) uint32: per array, the wrapping sums of its bits as uint32 words, plain and weighted by
    (2i + 1) for word i (odd weights: one changed word always changes the second sum)."""
    out = []
    for x in leaves:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        if x.dtype.itemsize == 8:
            words = jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
        else:
            words = jax.lax.bitcast_convert_type(x, {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize])
        words = words.astype(jnp.uint32).reshape(-1)
        weights = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1
        out.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def fingerprints(tree) -> dict[str, str]:
    """{path: 16 hex digits} for every array in `tree` (exact: independent of sharding and device count)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(tree)[0]) if jax.tree.leaves(tree) else ((), ())
    sums = np.asarray(_fingerprint_arrays(list(leaves)))
    return {jax.tree_util.keystr(p): f"{int(a):08x}{int(b):08x}" for p, (a, b) in zip(paths, sums)}


def verify(tree, saved: dict | None, directory: Path, step: int, hint: tuple[str, str]) -> None:
    """Raise CheckpointError if an array of `tree` differs from its fingerprint in `saved` (arrays
    without one, as in checkpoints written before fingerprints, pass)."""
    saved = saved or {}
    bad = [k for k, v in fingerprints(tree).items() if k in saved and saved[k] != v]
    if bad:
        raise CheckpointError(f"checkpoint {directory}/{step} is damaged: {len(bad)} array(s) differ from what was saved "
                              f"(first {bad[0]}); {_hint(hint, directory, step)}")


def _quiet_asyncio():
    """A failed restore leaves Orbax's other reads to fail at asyncio's shutdown, and asyncio logs each
    with its traceback: the error raised from the restore says it in one line."""
    return logger_level("asyncio", logging.CRITICAL)


@contextlib.contextmanager
def read_only_manager(directory: Path, **options):
    """An Orbax CheckpointManager that only reads `directory` (without Orbax's warnings about it)."""
    opts = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False, **options)
    check_metrics(directory)
    with ocp.CheckpointManager(Path(directory).absolute(), options=opts, item_names=("state", "data", "meta")) as mgr:
        yield mgr


def restore_params(directory: Path, step: int, target: dict, model: dict | None = None) -> dict:
    """Only the parameters of checkpoint `step` (Orbax partial restore, no optimizer state), placed
    as `target` ({'params': abstract arrays with shardings}) says, checked against their fingerprints
    and, with `model` (the run's config.json model), against the model that saved them."""
    directory = Path(directory).absolute()
    with read_only_manager(directory) as mgr:
        if step not in mgr.all_steps():
            raise CheckpointError(f"{directory} has no checkpoint {step} (it has {sorted(mgr.all_steps())})")
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
        try:
            with _quiet_asyncio():
                out = mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
                    meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax and TensorStore raise many types for a damaged or foreign checkpoint
            raise CheckpointError(unreadable(directory, step, e, SAMPLE_HINT, target)) from None
    params = {"params": out["state"]["params"]}
    check_model((out["meta"] or {}).get("model"), model, directory, step)
    verify(params, (out["meta"] or {}).get("fingerprints"), directory, step, SAMPLE_HINT)
    return params["params"]


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
