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

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
from absl import flags

from llmjax import cli
from llmjax.data import atomic_write_bytes, metrics_rows


class PlotError(ValueError):
    """A plotting problem a user can fix (one line)."""


def read_run(path: Path) -> dict:
    """A run's validation curve: {'tokens', 'seconds', 'val_loss'} (arrays), its label and config."""
    path = Path(path)
    try:
        config_text = (path / "config.json").read_text()
        lines = metrics_rows(path / "metrics.jsonl", cut_last=True, check=_plottable)  # (a last line cut short: left out, as the trainer does)
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{path} is not a readable training run ({type(e).__name__}: {e}); pass run directories") from None
    except ValueError as e:  # (a row of null or a list was an AttributeError, one without its step a KeyError: one line, as compare's)
        raise PlotError(f"{e}; mend or delete that line") from None
    try:  # (a config.json of no run's shape was a KeyError or TypeError, valid JSON or not)
        config = json.loads(config_text)
        if not (isinstance(config, dict) and isinstance(config.get("model"), dict) and isinstance(config.get("train"), dict)
                and isinstance(config["model"].get("arch"), str)):
            raise ValueError("no model and train settings")
    except ValueError as e:
        why = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise PlotError(f"{path / 'config.json'} is damaged ({why}); it is the run's config as the trainer wrote it") from None
    tokens, seconds, losses, elapsed = [], [], [], 0.0
    for m in lines:
        elapsed += m.get("step_time") if _number(m.get("step_time")) else 0.0
        loss = m.get("val_loss_estimate", m.get("val_loss"))
        if loss is not None:
            # (the row's own count: a run resumed with another batch; rows written before it: step x tokens per step)
            tokens.append(m["tokens"] if "tokens" in m else m["step"] * _tokens_per_step(path, config))
            seconds.append(elapsed)
            losses.append(loss)
    if not tokens:
        raise PlotError(f"{path} has no validation loss yet (eval.every_steps)")
    label = f"{config['model']['arch']}"
    return {"tokens": np.asarray(tokens, float), "seconds": np.asarray(seconds), "val_loss": np.asarray(losses, float),
            "label": label, "config": config, "path": path}


def _plottable(m: dict) -> str:
    """What is wrong with a metrics row for a curve ("": nothing): its loss and tokens must be numbers."""
    loss = m.get("val_loss_estimate", m.get("val_loss"))
    return "" if (loss is None or _number(loss)) and _number(m.get("tokens", 0)) else "its val_loss or tokens is not a number"


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _tokens_per_step(path: Path, config: dict) -> int:
    """Training tokens per step from a run's config (for metrics rows written before their `tokens`)."""
    t, m = config["train"], config["model"]
    try:
        n = t["batch_size"] * t["grad_accum_steps"] * m["context_len"]
        if not isinstance(n, int):
            raise TypeError(type(n).__name__)
    except (KeyError, TypeError) as e:
        raise PlotError(f"{path / 'config.json'} is damaged (its batch_size, grad_accum_steps or context_len: {e}); "
                        "it is the run's config as the trainer wrote it") from None
    return n


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

    out = Path(out)
    if out.is_symlink():  # (a link to an earlier figure: rewritten where it lies, the link kept, as bench --doc's)
        out = out.resolve()
    fmt = out.suffix.lower().lstrip(".")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    handles, labels = [], []
    for c in curve_list:
        for ax, x in zip(axes, (c["tokens"], c["seconds"])):
            (line,) = ax.plot(x, c["mean"], marker="o", markersize=3)
            if c["n_runs"] > 1:  # (PostScript has no transparency: the band's colour there is the mix it would show over white)
                rgb = np.asarray(matplotlib.colors.to_rgb(line.get_color()))
                band = dict(color=0.15 * rgb + 0.85, zorder=line.get_zorder() - 0.5) if fmt in ("ps", "eps") else \
                    dict(color=line.get_color(), alpha=0.15)
                ax.fill_between(x, c["low"], c["high"], linewidth=0, **band)
        handles.append(line)
        labels.append(c["label"] + (f" ({c['n_runs']} seeds)" if c["n_runs"] > 1 else ""))
    axes[0].set_xlabel("tokens seen")
    axes[1].set_xlabel("training wall-clock time (s)")
    for ax in axes:
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(color="0.9")  # (matplotlib's grey at alpha 0.3 over white; opaque: PostScript has no transparency)
    if curve_list:  # (none: compare's figure where every run diverged at its first step; a legend of nothing was a warning)
        # (labels given, not taken from the lines: matplotlib leaves out a line whose label starts with "_", a run folder
        # "_base"; and no label or title is read as mathtext: "$" in a folder's name was a ParseSyntaxException's traceback)
        for text in axes[0].legend(handles, labels, fontsize=8, framealpha=1.0 if fmt in ("ps", "eps") else None).get_texts():
            text.set_parse_math(False)
    if title:
        fig.suptitle(title, parse_math=False)
    if out.is_dir() or str(out).endswith(os.sep):
        raise PlotError(f"{out} is a folder; give the image's file name, e.g. {out / 'plot.png'}")
    if fmt not in fig.canvas.get_supported_filetypes() or fmt == "pgf":  # (pgf needs a LaTeX installation: a RuntimeError)
        raise PlotError(f"{out}: give a file name ending in an image type matplotlib writes "
                        f"({', '.join('.' + t for t in ('png', 'pdf', 'svg', 'jpg'))}, ...)")
    blocking = next((d for d in out.parents if d.exists() and not d.is_dir()), None)
    if blocking is not None:
        raise PlotError(f"cannot write {out}: {blocking} is a file, not a folder; give an image name in a folder")
    image = io.BytesIO()
    try:
        fig.savefig(image, dpi=120, format=fmt)
    finally:
        plt.close(fig)
    try:
        atomic_write_bytes(out, image.getbuffer())  # (a reader never sees half an image; an earlier one keeps its permissions)
    except OSError as e:  # (a folder that cannot be made or written, a file where a folder should be, a full disk: was a traceback)
        raise PlotError(f"cannot write {out} ({e.strerror or e}); give an image name in a folder you can write") from None
    return out


def define_flags():
    flags.DEFINE_string("o", "plot.png", "output image: a name matplotlib writes (.png, .svg, .pdf, ...)")
    flags.DEFINE_alias("out", "o")
    flags.DEFINE_string("title", "", "figure title")


def main(argv):
    paths = argv[1:]
    if flags.FLAGS.o == "":  # (-o= or --out "$DIR" unset: it was ". is a folder", as the other tools' empty flags are said)
        cli.fail("-o is empty (a shell variable that was not set?); give the image's file name (e.g. plot.png), or drop -o")
    if not paths:
        cli.fail("give one or more run directories: python -m llmjax.plot runs/a runs/b -o plot.png")
    try:
        path = draw(curves([Path(p) for p in paths]), flags.FLAGS.o, flags.FLAGS.title)
    except PlotError as e:
        cli.fail(str(e))
    print(path)
    sys.stdout.flush()


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    from absl import flags

    from llmjax import cli

    plot = cli.tool("llmjax.plot")
    plot.define_flags()
    flags.adopt_module_key_flags(plot)  # (--help lists the key flags of __main__, which defines none now)
    cli.run(plot.main)
