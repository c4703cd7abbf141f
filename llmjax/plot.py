"""`python -m llmjax.plot RUN_DIR... -o plot.png`: validation loss against tokens seen and against
training wall-clock time, one line per argument.

An argument is a training run directory (its `metrics.jsonl`) or a folder of runs (e.g. one
architecture's seeds under `python -m llmjax.compare`'s output): a folder's runs are drawn as their
mean, with a band from the lowest to the highest. Points are the periodic validation estimates
(`val_loss`, and `val_loss_estimate` at the last step, so every point is the same kind of
estimate); tokens = the training tokens seen (metrics.jsonl's `tokens`; in rows written before it,
step x tokens per step from the run's config.json); time = the sum of the
training steps' wall time (evaluation and checkpointing excluded; the first steps include
compilation).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import flags

from llmjax import cli
from llmjax.data import umask


class PlotError(ValueError):
    """A plotting problem a user can fix (one line)."""


def read_run(path: Path) -> dict:
    """A run's validation curve: {'tokens', 'seconds', 'val_loss'} (arrays), its label and config."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
        rows = [line for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
        lines = [json.loads(line) for line in rows[:-1]]
        try:
            lines += [json.loads(line) for line in rows[-1:]]
        except ValueError:  # a last line cut short (a run a full disk or a crash stopped, or one being written now): left out,
            pass  # as the trainer leaves it out when it resumes (and redoes that step)
    except (OSError, ValueError) as e:
        raise PlotError(f"{path} is not a readable training run ({type(e).__name__}: {e}); pass run directories") from None
    t = config["train"]
    tokens_per_step = t["batch_size"] * t["grad_accum_steps"] * config["model"]["context_len"]
    tokens, seconds, losses, elapsed = [], [], [], 0.0
    for m in lines:
        elapsed += m.get("step_time") or 0.0
        loss = m.get("val_loss_estimate", m.get("val_loss"))
        if loss is not None:
            # (the row's own count: a run resumed with another batch; rows written before it: step x tokens per step)
            tokens.append(m.get("tokens", m["step"] * tokens_per_step))
            seconds.append(elapsed)
            losses.append(loss)
    if not tokens:
        raise PlotError(f"{path} has no validation loss yet (eval.every_steps)")
    label = f"{config['model']['arch']}"
    return {"tokens": np.asarray(tokens, float), "seconds": np.asarray(seconds), "val_loss": np.asarray(losses),
            "label": label, "config": config, "path": path}


# training settings that change no run's curve, or only as its seed does, besides llmjax.compare's
# RUN_CONTROL (the seed, when it stops, logs and saves): how its steps are split over devices and computed
NOT_RECIPE = {"mesh", "deterministic", "loss_chunks"}


def _recipe(config: dict) -> dict:
    """A run's data and training settings that shape its curve (RUN_CONTROL's and NOT_RECIPE's aside), flat:
    seeds of one recipe share them all; runs of an lr sweep do not."""
    from llmjax.compare import RUN_CONTROL
    from llmjax.train import train_settings

    ignored = NOT_RECIPE | {k.removeprefix("train.") for k in RUN_CONTROL if k.startswith("train.")}
    out = {"data.dataset": config.get("data", {}).get("dataset")}
    out.update({f"train.{k}": v for k, v in train_settings(config).items() if k not in ignored})
    return out


def find_runs(path: Path) -> list[Path]:
    """`path` itself when it is a run, else the runs directly below it."""
    path = Path(path)
    if (path / "metrics.jsonl").is_file():
        return [path]
    if not path.exists():
        raise PlotError(f"{path} does not exist; pass run directories, or folders of runs")
    runs = sorted(p for p in path.iterdir() if (p / "metrics.jsonl").is_file()) if path.is_dir() else []
    if not runs:
        # (compare's --out, one folder of runs per config: "no metrics.jsonl" said nothing of what to pass)
        folders = sorted(d for d in path.iterdir() if d.is_dir() and any((r / "metrics.jsonl").is_file() for r in d.iterdir()
                                                                            if r.is_dir())) if path.is_dir() else []
        if folders:
            raise PlotError(f"{path} holds folders of runs, not runs; pass each folder, one line apiece: python -m llmjax.plot "
                            + " ".join(map(str, folders)) + " -o plot.png")
        raise PlotError(f"{path} is neither a training run nor a folder of runs (no metrics.jsonl)")
    return runs


def curves(paths, labels=None) -> list[dict]:
    """One curve per element of `paths`: a run, a folder of runs, or a list of run folders; several
    runs give their mean (and min/max) at the evaluation steps they all have."""
    out = []
    for i, p in enumerate(paths):
        runs = [read_run(r) for r in ([Path(x) for x in p] if isinstance(p, (list, tuple)) else find_runs(Path(p)))]
        from llmjax.train import EXECUTION_KEYS  # (how a model is run, not which: a seed rerun with remat or XLA's decode is that model)

        shared_keys = set.intersection(*(set(r["config"]["model"]) for r in runs)) - set(EXECUTION_KEYS)  # (keys a run predates aside)
        models = {json.dumps({k: r["config"]["model"][k] for k in shared_keys}, sort_keys=True) for r in runs}
        if len(models) > 1:  # (averaged into one line named after the first run's architecture, before)
            archs = sorted({r["config"]["model"].get("arch", "?") for r in runs})
            raise PlotError(f"the runs of {p} are of {len(models)} different models ({', '.join(archs)}); a folder's runs are drawn "
                            "as one line, their mean: pass each run, or a folder of one model's runs (its seeds)")
        recipes = [_recipe(r["config"]) for r in runs]
        differ = [k for k in sorted(set.intersection(*(set(x) for x in recipes)))  # (keys a run predates aside)
                  if len({json.dumps(x[k], sort_keys=True) for x in recipes}) > 1]
        if differ:  # (a folder of an lr sweep was drawn as one line, the mean of its learning rates)
            k = differ[0]
            values = ", ".join(f"{x[k]} ({r['path'].name})" for x, r in zip(recipes, runs))
            raise PlotError(f"the runs of {p} were trained with different settings ({k}: {values}"
                            + (f"; and {len(differ) - 1} more" if len(differ) > 1 else "") + "); a folder's runs are drawn as one "
                            "line, their mean: pass each run, or a folder of one recipe's runs (its seeds)")
        shared = sorted(set.intersection(*(set(r["tokens"].tolist()) for r in runs)))
        if not shared:
            raise PlotError(f"the runs of {p} share no evaluation step")
        at = [np.searchsorted(r["tokens"], shared) for r in runs]  # (tokens ascend: steps do)
        losses = np.stack([r["val_loss"][j] for r, j in zip(runs, at)])
        out.append({
            "label": labels[i] if labels else runs[0]["label"],
            "tokens": np.asarray(shared, float),
            "seconds": np.mean([r["seconds"][j] for r, j in zip(runs, at)], axis=0),
            "mean": losses.mean(0), "low": losses.min(0), "high": losses.max(0), "n_runs": len(runs),
        })
    if not labels and len({c["label"] for c in out}) < len(out):  # two lines of one architecture: every line by its folder
        for c, p in zip(out, paths):
            c["label"] = Path(p[0]).parent.name if isinstance(p, (list, tuple)) else Path(p).name
        if len({c["label"] for c in out}) < len(out):  # two folders of one name (runs/a/seed0, runs/b/seed0): the paths given
            for c, p in zip(out, paths):
                c["label"] = str(Path(p[0]).parent if isinstance(p, (list, tuple)) else Path(p))
    return out


def draw(curve_list: list[dict], out: str | Path, title: str = "") -> Path:
    """Two panels, validation loss against tokens and against wall-clock time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for c in curve_list:
        for ax, x in zip(axes, (c["tokens"], c["seconds"])):
            (line,) = ax.plot(x, c["mean"], marker="o", markersize=3, label=c["label"] + (f" ({c['n_runs']} seeds)" if c["n_runs"] > 1 else ""))
            if c["n_runs"] > 1:
                ax.fill_between(x, c["low"], c["high"], color=line.get_color(), alpha=0.15, linewidth=0)
    axes[0].set_xlabel("tokens seen")
    axes[1].set_xlabel("training wall-clock time (s)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    if curve_list:  # (none: compare's figure where every run diverged at its first step; a legend of nothing was a warning)
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    out = Path(out)
    if out.is_dir() or str(out).endswith(os.sep):
        raise PlotError(f"{out} is a folder; give the image's file name, e.g. {out / 'plot.png'}")
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in fig.canvas.get_supported_filetypes():
        raise PlotError(f"{out}: give a file name ending in an image type matplotlib writes "
                        f"({', '.join('.' + t for t in ('png', 'pdf', 'svg', 'jpg'))}, ...)")
    blocking = next((d for d in out.parents if d.exists() and not d.is_dir()), None)
    if blocking is not None:
        raise PlotError(f"cannot write {out}: {blocking} is a file, not a folder; give an image name in a folder")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=120, format=fmt)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, out)  # (a reader never sees half an image)
    except OSError as e:  # (a folder that cannot be made or written, a file where a folder should be, a full disk: was a traceback)
        raise PlotError(f"cannot write {out} ({e.strerror or e}); give an image name in a folder you can write") from None
    finally:
        plt.close(fig)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return out


def define_flags():
    flags.DEFINE_string("o", "plot.png", "output image: a name matplotlib writes (.png, .svg, .pdf, ...)")
    flags.DEFINE_alias("out", "o")
    flags.DEFINE_string("title", "", "figure title")


def main(argv):
    paths = argv[1:]
    if not paths:
        cli.fail("give one or more run directories: python -m llmjax.plot runs/a runs/b -o plot.png")
    try:
        path = draw(curves([Path(p) for p in paths]), flags.FLAGS.o, flags.FLAGS.title)
    except PlotError as e:
        cli.fail(str(e))
    print(path)
    sys.stdout.flush()


if __name__ == "__main__":
    define_flags()
    cli.run(main)
