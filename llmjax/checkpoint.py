"""Checkpoints: an Orbax CheckpointManager holding the train state (parameters, optimizer state,
RNG), the grain iterator's state and a little JSON metadata, saved asynchronously. It keeps the
last `keep` checkpoints plus the one with the best validation loss.

Parameters are stored in the scanned (stacked) layer layout whatever `model.scan_layers` is (the
trainer converts inside the jitted step), so a checkpoint restores with layers scanned or unrolled;
restoring onto another mesh or device count reshards through the abstract target's shardings.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm


class CheckpointError(ValueError):
    """A checkpoint problem a user can fix (one line)."""


class Checkpointer:
    def __init__(self, directory: Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
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
            meta=ocp.args.JsonSave(meta),
        )
        metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restore the state onto `abstract_state`'s shardings (and the iterator in place)."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, FileNotFoundError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {self.directory}/{step} cannot be restored: {first}") from None
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
