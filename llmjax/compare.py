"""`python -m llmjax.compare --configs configs/vanilla.py:small,configs/modern.py:small --max_steps 500 --seeds 3`

Train several architectures on the same data, token budget and seeds, then write one results table
(Markdown and JSON) and the loss-curve figure:

- every (config, seed) is one ordinary training run (`python -m llmjax.train` in a subprocess, so
  each has its own process: clean timings, its own peak memory) in `--out/<arch>_<variant>/seed<S>`;
  a finished run is reused, so an interrupted comparison continues where it stopped (one of a
  config edited since, or trained by other llmjax code, refused); a run that diverges (the trainer's
  exit status cli.NON_FINITE_EXIT) is recorded as such and the others go on;
- the configs must share the dataset, context length and vocabulary; `--max_steps` and
  `--batch_size` apply to all, so every run sees the same number of tokens, in the same order for
  the same seed (the data order depends on the seed only);
- the table (rows by validation loss, lowest first; results.json keeps the order of --configs): parameters (total and active), FLOPs per token, final validation loss over the whole
  split (or its first eval.final_num_batches batches; mean +- sample std over seeds; none where a seed
  diverged: the cell names it), training tokens/s (the median step of each run, the steps
  that compiled left out, averaged over seeds), peak memory (device peak on a GPU; the training process's peak resident memory on a CPU),
  training wall time, and, for GPT-2 BPE models, HellaSwag acc_norm from the in-loop scorer;
- `val_loss.png`: validation loss against tokens and against training wall-clock time, one line per
  architecture (mean over seeds, band from the lowest to the highest), drawn by llmjax.plot.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from absl import flags

from llmjax import cli
from llmjax.config import ConfigError, load_config, model_config, model_defaults, parse_value, set_key, split_spec, validate
from llmjax.data import atomic_write_bytes, atomic_write_json, metrics_rows
from llmjax.runtime import exclusive_folder
from llmjax.summary import summarize


class CompareError(ValueError):
    """A comparison problem a user can fix (one line)."""


def run_name(spec: str) -> str:
    path, variant = split_spec(spec)
    return Path(path).stem + ("" if variant == "default" else f"_{variant}")


# the settings compare derives from its flags
OWN_FLAGS = {"train.max_steps": "--max_steps", "train.batch_size": "--batch_size", "eval.every_steps": "--eval_every",
             "eval.num_batches": "--eval_batches", "eval.tasks": "--tasks", "eval.tasks_limit": "--tasks_limit"}


def plan(specs: list[str], *, max_steps: int, batch_size: int | None, eval_every: int | None, eval_batches: int | None,
         tasks: str, tasks_limit: int, overrides: dict) -> list[dict]:
    """The override set of every config, after checking that they compare fairly."""
    if len(set(specs)) != len(specs):
        raise CompareError("a config is listed twice in --configs")
    if "train.seed" in overrides:
        raise CompareError("--set train.seed would give every run the same seed; --seeds N runs seeds 0..N-1")
    for key, flag in OWN_FLAGS.items():  # (compare sets these itself: a --set of one was overwritten, or half applied)
        if key in overrides:
            raise CompareError(f"--set {key} is compare's own setting; use {flag}")
    if batch_size is not None and batch_size < 1:
        raise CompareError(f"--batch_size must be at least 1, got {batch_size}")
    out = []
    for spec in specs:
        try:
            cfg = load_config(spec)
        except ConfigError as e:
            raise CompareError(f"{spec}: {e}") from None
        try:  # (a --set value as its text: parsed by the key's type, as --config.KEY=VALUE is)
            given = {k: parse_value(cfg, k, v) if isinstance(v, str) else v for k, v in overrides.items()}
        except ConfigError as e:
            raise CompareError(f"{spec}: --set {e}") from None
        # compare's run defaults (no sample; one checkpoint, at the end) yield to a --set of them (it was overwritten, unsaid)
        o = {"train.max_steps": max_steps, "eval.sample_tokens": 0, "train.checkpoint_every_steps": max_steps,
             "train.keep_checkpoints": 1, **given}
        if batch_size:
            o["train.batch_size"] = batch_size
        # (0 given is 0, the config key's meaning: at the last step only / no estimates; not the default)
        o["eval.every_steps"] = eval_every if eval_every is not None else max(1, max_steps // 10)
        if eval_batches is not None:
            o["eval.num_batches"] = eval_batches
        try:
            with cfg.unlocked():
                for k, v in o.items():
                    set_key(cfg, k, v)
                bpe = model_config(cfg).vocab_size == 50257
                if bpe and tasks:  # HellaSwag from the in-loop scorer (text: GPT-2 BPE models only)
                    o.update({"eval.tasks": tasks, "eval.tasks_limit": tasks_limit})
                    set_key(cfg, "eval.tasks", tasks)
                    set_key(cfg, "eval.tasks_limit", tasks_limit)
            validate(cfg)  # (with compare's settings: a wsd decay that --max_steps puts inside a config's warm-up, say)
            mcfg = model_config(cfg)
        except ConfigError as e:
            raise CompareError(f"{spec}: {e}") from None
        t = cfg.train
        out.append({"spec": spec, "name": run_name(spec), "overrides": o, "cfg": cfg, "mcfg": mcfg,
                    "tokens_per_step": t.batch_size * t.grad_accum_steps * mcfg.context_len, "bpe": bpe})
    first = out[0]
    f_train = first["cfg"].train
    for p in out[1:]:
        t = p["cfg"].train
        # what makes them share it: the setting that differs, given once for every run
        per_step = (f"--batch_size {f_train.batch_size} sets every run's batch" if t.batch_size != f_train.batch_size else
                    f"--set train.grad_accum_steps={f_train.grad_accum_steps} sets every run's" if t.grad_accum_steps != f_train.grad_accum_steps
                    else "")
        for what, a, b, hint in (
            ("data.dataset", first["cfg"].data.dataset, p["cfg"].data.dataset, f"--set data.dataset={first['cfg'].data.dataset} sets every run's"),
            ("model.context_len", first["mcfg"].context_len, p["mcfg"].context_len, f"--set model.context_len={first['mcfg'].context_len} sets every run's"),
            ("model.vocab_size", first["mcfg"].vocab_size, p["mcfg"].vocab_size, "their tokenizers differ: compare configs of one dataset's tokens"),
            ("tokens per step (train.batch_size x grad_accum_steps x context)", first["tokens_per_step"], p["tokens_per_step"], per_step),
        ):
            if a != b:
                raise CompareError(f"{p['spec']} differs from {first['spec']} in {what} ({b} vs {a}); compare configs that share it"
                                   + (f" ({hint})" if hint else ""))
    if len({p["name"] for p in out}) != len(out):
        raise CompareError("two configs have the same file name and variant; their runs would share a folder")
    return out


def config_changes(saved: Path | dict, cfg) -> list[str]:
    """How a run's config.json (or the config a diverged run's record holds) differs from `cfg` (the
    config with this comparison's overrides) in its model, data, training and evaluation settings,
    RUN_CONTROL's aside: a config file edited since the run, or other comparison flags (keys the run
    predates count as their defaults)."""
    from llmjax.train import config_diff, train_settings

    old = saved if isinstance(saved, dict) else json.loads(saved.read_text())
    new = json.loads(cfg.to_json())
    diffs = []
    for group in ("model", "data", "train", "eval"):
        a, b = old.get(group, {}), new.get(group, {})
        if group == "train":  # (train.loss_scale and train.schedule, which a run may predate)
            a = train_settings(old)
        if group == "eval":  # (a run from before eval.final_num_batches evaluated the whole split)
            a = {"final_num_batches": 0, **a}
        if group == "model":
            a, b = ({**model_defaults(c.get("arch")), **c} for c in (a, b))
        diffs += [d for d in config_diff(a, b, f"{group}.") if d.split(" ", 1)[0] not in RUN_CONTROL]
    return diffs


# settings that change no figure of a run (and the seed, which names its folder)
RUN_CONTROL = {"train.seed", "train.stop_at_step", "train.log_every_steps", "train.checkpoint_every_steps", "train.keep_checkpoints",
               "train.peak_flops_per_device", "eval.sample_tokens", "eval.tasks_batch_size", "eval.tasks_dir"}


def differing_settings(plans: list[dict]) -> list[str]:
    """The data, training and evaluation settings (RUN_CONTROL's aside) that are not the same for
    every config: "train.beta2: 0.99 (`configs/a.py`), 0.95 (`configs/a.py:b`)". A comparison of
    two optimizer settings is one of these by design; any other is a difference in recipe that the
    table's losses carry along with the models'."""
    def flat(d: dict, prefix: str) -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    settings = [{k: v for g in ("data", "train", "eval") for k, v in flat(p["cfg"][g].to_dict(), f"{g}.").items()
                 if k not in RUN_CONTROL} for p in plans]
    keys = sorted(set().union(*settings))

    def differs(k):  # (the weight of an auxiliary loss only the MoE has is no difference where absent)
        held = [s for s in settings if k in s] if k.startswith("train.aux_loss_weights.") else settings
        return len({json.dumps(s.get(k), sort_keys=True) for s in held}) > 1

    return [f"{k}: " + ", ".join(f"{s.get(k, '<absent>')} (`{p['spec']}`)" for p, s in zip(plans, settings))
            for k in keys if differs(k)]


# llmjax's modules the trainer never runs (an edit of one changes no run's figures): the tools
# beside it, and lm-eval's model with the standalone evaluator (the trainer scores with
# llmjax.downstream); tests/test_compare.py checks that the trainer imports none of them
NOT_TRAINING = {"compare.py", "plot.py", "bench.py", "aot.py", "tracing.py", "evaluate.py", "harness.py"}


def _trains(rel: str) -> bool:
    """Whether the file at `rel` (a path in the package) is a module the trainer may run."""
    path = Path(rel)
    return all(part.isidentifier() for part in (*path.parent.parts, path.stem)) and rel not in NOT_TRAINING


def code_fingerprint(root: Path | None = None) -> dict[str, str]:
    """A hash of every llmjax source file the trainer may run, by its path in the package: what
    makes a run's figures besides its config (a model file edited to try an idea, or to fix it,
    changes them). Modules only: a file Python would not import as one (an editor's lock or backup,
    `.#modern.py`, `modern copy.py`, a notebook's `.ipynb_checkpoints/`) runs in no training."""
    root = Path(__file__).parent if root is None else root
    files = [f for f in sorted(root.rglob("*.py")) if _trains(str(f.relative_to(root)))]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in files}


def code_changes(folder: Path) -> str:
    """'' when the run in `folder` was trained by the llmjax code running now (or by a compare from
    before runs recorded their code: unknown), else the changed files, for a one-line refusal."""
    try:
        old = json.loads((folder / "compare_code.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(old, dict):
        return ""
    new = code_fingerprint()
    # (a file the trainer does not run is no change: one a run of earlier code recorded, too)
    changed = [f"llmjax/{f}" for f in sorted(set(old) | set(new)) if _trains(f) and old.get(f) != new.get(f)]
    return ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")


def _reusable(p: dict, seed: int, folder: Path) -> dict | None:
    """The stats of the finished run of this config and seed in `folder`, else None."""
    stats_file = folder / "compare_run.json"
    if stats_file.is_file():
        try:  # (an empty or cut record was JSONDecodeError's traceback, [] AttributeError's)
            stats = json.loads(stats_file.read_text())
            why = "" if isinstance(stats, dict) else f"a JSON {type(stats).__name__}, not an object"
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or (e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__)
        if why:
            raise CompareError(f"{stats_file} is damaged ({why}): it records the run in {folder}; delete that folder to train the run again")
        if stats.get("seed") == seed and stats.get("returncode") == 0 and _finished(folder, p["cfg"].train.max_steps):
            return stats
        # (diverged: run again, it would diverge again, from its last good checkpoint; one that diverged
        # at its first step has no config.json, the trainer took it back: its record holds the config)
        if (stats.get("seed") == seed and stats.get("returncode") == cli.NON_FINITE_EXIT and "non_finite_at_step" in stats
                and ((folder / "config.json").is_file() or isinstance(stats.get("config"), dict))):
            return stats
    return None


def _resumed_step(folder: Path) -> int:
    """The latest checkpoint of an interrupted run in `folder` (0: none)."""
    return max((int(d.name) for d in (folder / "checkpoints").glob("*") if d.name.isdigit()), default=0)


RESUMES = "compare_resumes.json"  # the steps the run in a folder was resumed from, so far


def _resumes(folder: Path) -> list[int]:
    try:
        steps = json.loads((folder / RESUMES).read_text())
    except (OSError, ValueError):
        return []
    return [s for s in steps if isinstance(s, int)] if isinstance(steps, list) else []


def refusal(p: dict, seed: int, folder: Path) -> str | None:
    """Why the run in `folder` can be neither reused nor resumed for this config and code (one line),
    or None. compare checks every folder before it trains anything."""
    if (stats := _reusable(p, seed, folder)) is not None:
        done = "diverged" if stats.get("returncode") == cli.NON_FINITE_EXIT else "finished"
        # (finished and of this config, whatever the flags that change no figure: a rerun with another
        # --task_dir or --set train.log_every_steps, or --batch_size given as the configs' own, started
        # the trainer again on the finished run, which overwrote its wall time and peak memory with
        # those of a process that trained nothing and marked it as resumed at its last step)
        saved = folder / "config.json"
        changes = config_changes(saved if saved.is_file() else stats["config"], p["cfg"])
        if changes:
            return (f"{folder} holds a {done} run of another config ({'; '.join(changes)}): its figures are not this config's; "
                    "delete that folder or use another --out")
        changed = code_changes(folder)
        if changed:
            return (f"{folder} holds a {done} run trained by other llmjax code ({changed} changed since): its figures are not "
                    "this code's; delete that folder or use another --out")
        try:  # (its table row reads every line: a damaged one, said now, not after the other runs have trained)
            _metrics_lines(folder)
        except CompareError as e:
            return str(e)
        return None
    if (folder / "config.json").is_file():  # an earlier run there: resumed only if it is this config's
        changes = config_changes(folder / "config.json", p["cfg"])
        if changes:
            return (f"{folder} holds a run of another config ({'; '.join(changes)}): resuming it would splice the two; "
                    "delete that folder or use another --out")
    # (one stopped before its first checkpoint, a crash in a model file being tried, say, starts
    # again from step 0 and keeps nothing of its first try: the code that crashed, fixed since, is no other run's)
    changed = code_changes(folder) if _resumed_step(folder) else ""
    if changed:
        return (f"{folder} holds a run trained by other llmjax code ({changed} changed since): resuming it would splice the two; "
                "delete that folder or use another --out")
    return None


def train_once(p: dict, seed: int, folder: Path, quiet: bool) -> dict:
    """One training run in its own process (reused when already finished). Returns its stats.
    The folder passed `refusal` (compare checks every folder before the first run)."""
    stats = _reusable(p, seed, folder)
    if stats is not None:
        return stats
    folder.mkdir(parents=True, exist_ok=True)
    # an interrupted run resumes from its latest checkpoint: this process then times only the rest
    resumed = _resumed_step(folder)
    if resumed and _finished(folder, p["cfg"].train.max_steps):
        # finished, but the compare that ran it stopped before recording it (Ctrl-C during the last
        # step's evaluation or scoring, which the trainer completes and saves): a trainer started now
        # trains nothing, and its wall time and peak memory would stand for the run's. Unknown instead.
        stats = {"seed": seed, "overrides": p["overrides"], "returncode": 0, "wall_seconds": None, "max_rss_bytes": None,
                 "resumed_from_step": resumed, "resumed_from_steps": _resumes(folder), "unrecorded": True}
        atomic_write_json(folder / "compare_run.json", stats)
        return stats
    if not resumed:  # the code that trains the run, checked when it is reused or resumed
        atomic_write_json(folder / "compare_code.json", code_fingerprint())
    # every step it resumed from, this one's too (the first step after each compiled: left out of its
    # tokens/s); a restart from step 0 forgets the earlier ones
    resumes = sorted({s for s in _resumes(folder) if s < resumed} | {resumed}) if resumed else []
    atomic_write_json(folder / RESUMES, resumes)
    path, variant = split_spec(p["spec"])
    suffix = f":{variant}" if ":" in p["spec"] else ""  # (none: get_config() as config_flags calls it, a no-argument one too)
    cmd = [sys.executable, "-m", "llmjax.train", f"--config={Path(path).absolute()}{suffix}", f"--workdir={folder}",
           f"--config.train.seed={seed}", "--config.logging.progress_bar=False"]
    cmd += [f"--config.{k}={v}" for k, v in p["overrides"].items()]
    if not quiet:
        print(f"compare: training {p['name']} seed {seed} -> {folder}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(folder / "train.log", "a" if resumed else "w") as log:  # (a resumed run's log goes on after its first part's)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # Ctrl-C or SIGTERM here: the trainer saves a checkpoint and stops too (it outlived us)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode == cli.NON_FINITE_EXIT:  # (diverged: the row says so, and the other runs go on)
        line = next((x for x in reversed((folder / "train.log").read_text().splitlines()) if x.startswith("error: ")), "")
        at = re.search(r" (?:at|of) step (\d+)", line)
        stats = {"seed": seed, "overrides": p["overrides"], "returncode": proc.returncode, "wall_seconds": wall,
                 "max_rss_bytes": usage.ru_maxrss * 1024, "resumed_from_step": resumed, "resumed_from_steps": resumes,
                 "non_finite_at_step": int(at.group(1)) if at else None, "error": line.removeprefix("error: ")}
        if not (folder / "config.json").is_file():  # (diverged at its first step: the trainer took its files back)
            stats["config"] = json.loads(p["cfg"].to_json())  # (what a rerun's config is checked against)
        atomic_write_json(folder / "compare_run.json", stats)
        if not quiet:
            print(f"compare: {p['name']} seed {seed} diverged: {stats['error'][:300]}; the comparison goes on (its row says so)",
                  file=sys.stderr, flush=True)
        return stats
    if proc.returncode != 0:
        tail = (folder / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise CompareError(f"training {p['name']} seed {seed} failed (exit {proc.returncode}): {tail[0][:300]}; see {folder / 'train.log'}")
    max_steps = p["cfg"].train.max_steps
    if not _finished(folder, max_steps):  # (exit 0 short of the end: the table said "did not finish; delete it and run again")
        at = _resumed_step(folder)
        why = (f"at its --set train.stop_at_step={p['cfg'].train.stop_at_step}: run the command without that --set, or with a later step, "
               "to go on from its checkpoint" if p["cfg"].train.stop_at_step else
               "(a SIGTERM sent to the trainer alone, say); its checkpoint is kept: the same command resumes it")
        raise CompareError(f"training {p['name']} seed {seed} stopped at step {at} of {max_steps} {why}; see {folder / 'train.log'}")
    stats = {"seed": seed, "overrides": p["overrides"], "returncode": 0, "wall_seconds": wall,
             "max_rss_bytes": usage.ru_maxrss * 1024, "resumed_from_step": resumed, "resumed_from_steps": resumes}  # (Linux reports KiB)
    atomic_write_json(folder / "compare_run.json", stats)
    return stats


def _has_val_loss(folder: Path) -> bool:
    """Whether the run in `folder` logged a validation loss (one that diverged may have none)."""
    try:
        return any("val_loss" in x or "val_loss_estimate" in x for x in (folder / "metrics.jsonl").read_text().splitlines())
    except OSError:
        return False


def _finished(folder: Path, max_steps: int) -> bool:
    """Whether the run in `folder` reached `max_steps` with its final validation loss."""
    try:
        last = json.loads((folder / "metrics.jsonl").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return False
    return isinstance(last, dict) and last.get("step") == max_steps and "val_loss" in last


def _metrics_lines(folder: Path) -> list[dict]:
    """The run's metrics.jsonl rows ([]: none), or a CompareError naming a damaged line (it was
    JSONDecodeError's traceback: the run counts as finished by its last line alone)."""
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        return []
    try:
        return metrics_rows(metrics)
    except ValueError as e:
        raise CompareError(f"{e}; mend or delete that line, or delete {folder} to train the run again") from None


def summarize_runs(p: dict, runs: list[tuple[Path, dict]]) -> dict:
    """One table row from a config's runs."""
    per_seed, rates, peaks, hs, walls, device = [], [], [], [], [], "cpu"
    diverged = {}  # seed: the step whose loss, gradients or update became non-finite (None: unknown)
    for folder, stats in runs:
        lines = _metrics_lines(folder)
        if stats.get("returncode") == cli.NON_FINITE_EXIT:  # (its steps before that count; it has no final loss)
            diverged[stats["seed"]] = stats.get("non_finite_at_step")
            per_seed.append(None)
        elif not lines or lines[-1]["step"] != p["overrides"]["train.max_steps"] or "val_loss" not in lines[-1]:
            raise CompareError(f"{folder} did not finish; delete it and run again")
        else:
            last = lines[-1]
            per_seed.append(last["val_loss"])
            if "hellaswag_acc_norm" in last:
                hs.append(last["hellaswag_acc_norm"])
            walls.append(stats["wall_seconds"])  # (a diverged run's is shorter: left out)
        # the median step, leaving out the steps that compiled: the first, and the first after each
        # resume (a run from before the list of them: its last resume's)
        resumes = set(stats.get("resumed_from_steps", [stats.get("resumed_from_step", 0)]))
        first = {0} | {i for i, m in enumerate(lines) if m["step"] - 1 in resumes}
        timed = [m["tokens_per_sec"] for i, m in enumerate(lines) if i not in first]
        rates.append(statistics.median(timed) if timed else None)  # (None: every step compiled, --max_steps 1 say)
        gpu_peak = max((m["peak_memory_bytes"] for m in lines if m.get("peak_memory_bytes")), default=None)
        peaks.append((gpu_peak, stats["max_rss_bytes"]))
        device = "gpu" if gpu_peak is not None else device
    peaks = [gpu if device == "gpu" else rss for gpu, rss in peaks]  # (a run that diverged before it logged a step has no device peak)
    # (None: a run that finished before its compare recorded these; the others' figures, or unknown)
    walls, peaks, rates, finals = ([x for x in xs if x is not None] for xs in (walls, peaks, rates, per_seed))
    s = summarize(p["mcfg"])
    return {
        "arch": p["mcfg"].arch, "config": p["spec"], "seeds": len(runs),
        "params_total": s["params_total"], "params_active": s["params_active"], "flops_per_token": s["flops_per_token"],
        "tokens": p["overrides"]["train.max_steps"] * p["tokens_per_step"],
        # (a config with a diverged seed has no mean: the seeds that survived alone would flatter it)
        "val_loss_mean": None if diverged else statistics.fmean(finals),
        "val_loss_std": statistics.stdev(finals) if len(finals) > 1 and not diverged else None,  # (no spread from one seed)
        "val_loss_per_seed": per_seed,
        "diverged": diverged,
        "train_tokens_per_sec": statistics.fmean(rates) if rates else None,
        "peak_memory_bytes": max(peaks, default=None), "peak_memory_kind": "device peak" if device == "gpu" else "process peak RSS",
        "wall_seconds_mean": statistics.fmean(walls) if walls else None,
        "hellaswag_acc_norm": statistics.fmean(hs) if hs else None,
        "resumed": {stats["seed"]: stats["resumed_from_step"] for _, stats in runs
                    if stats.get("resumed_from_step") and not stats.get("unrecorded")},
        "unrecorded": [stats["seed"] for _, stats in runs if stats.get("unrecorded")],
    }


def _final_eval(batches: list[int]) -> str:
    """What the final validation loss covers (eval.final_num_batches of the runs)."""
    if batches == [0]:
        return "the whole validation split"
    if len(batches) == 1:
        return f"the validation split's first {batches[0]} batches"
    return "the validation split as each config's eval.final_num_batches sets (below)"


def _diverged_cell(r: dict) -> str:
    """The val loss cell of a config with a diverged seed: which, and the others' losses."""
    seeds = sorted(r["diverged"])
    kept = [f"{x:.4f}" for x in r["val_loss_per_seed"] if x is not None]
    return (f"diverged ({'seed' if len(seeds) == 1 else 'seeds'} {', '.join(map(str, seeds))}" +
            (f"; the others {', '.join(kept)}" if kept else "") + ")")


def markdown(rows: list[dict], command: str, meta: dict) -> str:
    totals = [r["params_total"] for r in rows]
    spread = max(totals) / min(totals) - 1
    head = ["arch", "config", "params (total / active)", "GFLOPs/token", f"val loss (mean ± std, {rows[0]['seeds']} seeds)" if rows[0]["seeds"] > 1 else "val loss (1 seed)",
            "tokens/s", f"peak memory ({rows[0]['peak_memory_kind']})", "train wall (s)"]
    hs = any(r["hellaswag_acc_norm"] is not None for r in rows)
    if hs:
        head.append("HellaSwag acc_norm")
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | " + " | ".join(["---:"] * (len(head) - 2)) + " |"]
    for r in sorted(rows, key=lambda r: (r["val_loss_mean"] is None, r["val_loss_mean"] or 0.0)):  # (diverged configs last)
        active = f"{r['params_total'] / 1e6:.2f}M" + (f" / {r['params_active'] / 1e6:.2f}M" if r["params_active"] != r["params_total"] else "")
        cells = [f"`{r['arch']}`", f"`{r['config']}`", active, f"{r['flops_per_token'] / 1e9:.3f}",
                 f"{r['val_loss_mean']:.4f}" + (f" ± {r['val_loss_std']:.4f}" if r["val_loss_std"] is not None else "")
                 if r["val_loss_mean"] is not None else _diverged_cell(r),
                 "-" if r["train_tokens_per_sec"] is None else f"{r['train_tokens_per_sec']:,.0f}",
                 "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.2f} GiB",
                 "-" if r["wall_seconds_mean"] is None else f"{r['wall_seconds_mean']:.0f}"]
        if hs:
            cells.append("-" if r["hellaswag_acc_norm"] is None else f"{r['hellaswag_acc_norm']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Same data ({meta['dataset']}), {rows[0]['tokens']:,} training tokens per run, context {meta['context_len']}, "
            f"seeds {meta['seeds']}; total parameters within {spread:.1%} of each other. Validation loss over "
            f"{_final_eval(meta.get('final_eval_batches', [0]))} at the end. {meta['device']}, {meta['date']}. Command: `{command}`")
    if meta.get("differing_settings"):  # (the configs' own recipes: the comparison is of these too, not of the models alone)
        lines.append("\nSettings that differ between the configs (besides the model): " + "; ".join(meta["differing_settings"]) + ".")
    if any(r.get("diverged") for r in rows):
        lines.append("\nDiverged (the loss, gradients or update became inf or NaN; the trainer stopped and kept its last good checkpoint; "
                     "a config with a diverged seed has no mean loss, and its train wall is the other seeds'): "
                     + ", ".join(f"`{r['arch']}` seed {seed}" + (f" at step {step}" if step is not None else "")
                                 for r in rows for seed, step in sorted(r["diverged"].items()))
                     + ". Each run's train.log has the trainer's line.")
    resumed = [f"`{r['arch']}` seed {seed} from step {step}" for r in rows for seed, step in sorted(r["resumed"].items())]
    if resumed:  # (the losses, tokens/s and a device's peak are the whole run's, read from its metrics)
        part = "train wall is" if rows[0]["peak_memory_kind"] == "device peak" else "train wall and peak memory are"
        lines.append(f"\nResumed after an interruption, so their {part} the resumed part's only: " + ", ".join(resumed) + ".")
    unrecorded = [f"`{r['arch']}` seed {seed}" for r in rows for seed in r.get("unrecorded", [])]
    if unrecorded:  # (finished while its compare was being stopped: nothing left to time)
        what = "train wall was" if rows[0]["peak_memory_kind"] == "device peak" else "train wall and peak memory were"
        lines.append(f"\nFinished in a comparison stopped before it recorded them, so their {what} not measured (left out of "
                     "the means): " + ", ".join(unrecorded) + ".")
    return note + "\n\n" + "\n".join(lines) + "\n"


RESULT_FILES = ("results.json", "results.md", "val_loss.png")  # what compare writes in --out itself


def _compares_results(out: Path) -> bool:
    """Whether `out`'s results.json is one a compare wrote (its rows, meta and command)."""
    try:
        saved = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"rows", "meta", "command"} <= set(saved)


def check_out(out: Path) -> None:
    """--out is a folder (or none yet) whose results files, if any, an earlier compare wrote: compare
    replaces them, and a user's own results.md there (notes in a folder given as --out) was
    overwritten, unsaid. One line otherwise, before any run."""
    blocking = next((d for d in (out, *out.parents) if d.exists() and not d.is_dir()), None)
    if blocking is not None:
        raise CompareError(f"--out {out}: {blocking} is a file, not a folder; give --out a folder (compare writes one folder per config "
                           "and its results there)")
    theirs = [n for n in RESULT_FILES if (out / n).exists()]
    if theirs and not _compares_results(out):
        raise CompareError(f"--out {out} holds {', '.join(theirs)} that no compare wrote (compare writes its results there and would "
                           "replace them); move them or give another --out")


def _only_compare(out: Path):
    """An exclusive lock on the folder `out` while a comparison checks and trains its runs
    (`runtime.exclusive_folder`): the same command started again while the first still ran (in
    another terminal, say) started a second trainer in the run folder the first was training,
    resumed from its latest checkpoint, and its table called that run resumed after an
    interruption, with the second process's wall time."""
    return exclusive_folder(out, lambda: CompareError(
        f"another compare is running in {out} now; wait for it to end (its finished runs are then reused), or use another --out"))


def compare(specs, *, out: Path, seeds: int, max_steps: int, batch_size=None, eval_every=None, eval_batches=None, tasks="hellaswag",
            tasks_limit=0, overrides=None, command="", quiet=False) -> dict:
    if seeds < 1 or max_steps < 1:
        raise CompareError("--seeds and --max_steps must be >= 1")
    plans = plan(specs, max_steps=max_steps, batch_size=batch_size, eval_every=eval_every, eval_batches=eval_batches, tasks=tasks,
                 tasks_limit=tasks_limit, overrides=overrides or {})
    scored = [p for p in plans if p["cfg"].eval.tasks]
    if scored:  # the task files now, not after the runs before the first that scores them
        from llmjax import downstream

        try:
            for name in downstream.check_names(scored[0]["cfg"].eval.tasks.split(",")):
                downstream.find_file(name, scored[0]["cfg"].eval.tasks_dir or None)
        except downstream.TaskError as e:
            raise CompareError(f"--tasks: {e} (--task_dir DIR: where the task files are; --tasks '': score none)") from None
    out = Path(out)
    check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(f"--out {out}: cannot make it ({e.strerror or e}); give an --out where folders can be made") from None
    with _only_compare(out):  # (from here, the runs in `out` are this comparison's to train)
        refused = [why for p in plans for seed in range(seeds) if (why := refusal(p, seed, out / p["name"] / f"seed{seed}"))]
        if refused:  # (every folder checked before any training: a refusal after hours of the other runs, one at a time, before)
            more = f" (and {len(refused) - 1} more folder{'s' if len(refused) > 2 else ''} like it: " + ", ".join(
                w.split(" holds ")[0] for w in refused[1:]) + ")" if len(refused) > 1 else ""
            raise CompareError(refused[0] + more)
        for folder in (out / p["name"] / f"seed{seed}" for p in plans for seed in range(seeds)):
            try:  # (here, not at that run's turn: after hours of the runs before it)
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CompareError(f"--out {out}: cannot make {folder} ({e.strerror or e}); give an --out where folders can be made") from None
        rows = []
        for p in plans:
            runs = []
            for seed in range(seeds):
                folder = out / p["name"] / f"seed{seed}"
                runs.append((folder, train_once(p, seed, folder, quiet)))
            rows.append(summarize_runs(p, runs))
        import jax

        d = jax.devices()[0]
        meta = {"dataset": plans[0]["cfg"].data.dataset, "context_len": plans[0]["mcfg"].context_len, "seeds": ", ".join(map(str, range(seeds))),
                "device": d.device_kind if d.platform == "gpu" else f"CPU ({os.cpu_count()} cores)",
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "differing_settings": differing_settings(plans),
                "final_eval_batches": sorted({int(p["cfg"].eval.final_num_batches) for p in plans})}
        text = markdown(rows, command, meta)
        # (results.json first: it marks the folder's results as compare's, see check_out)
        atomic_write_json(out / "results.json", {"rows": rows, "meta": meta, "command": command})
        atomic_write_bytes(out / "results.md", text.encode())
        from llmjax.plot import PlotError, curves, draw

        # (exactly this comparison's runs: other seed folders under --out are older runs'; of a config
        # with a diverged seed, the seeds that finished, or where none did, the diverged ones' curves
        # up to their last estimate: a diverged seed's shorter curve cut every seed's line at its end)
        lines = []
        for p, r in zip(plans, rows):
            finished = [out / p["name"] / f"seed{seed}" for seed in range(seeds) if seed not in r["diverged"]]
            lines += [finished] if finished else [[folder] for seed in range(seeds)
                                                  if _has_val_loss(folder := out / p["name"] / f"seed{seed}")]
        try:
            draw(curves(lines), out / "val_loss.png", title=f"{meta['dataset']}, {rows[0]['tokens']:,} tokens, {seeds} seed(s)")
        except PlotError as e:  # (a full disk after the results were written: the table is kept and shown, not a traceback)
            return {"rows": rows, "markdown": text, "figure": None, "figure_error": str(e)}
        return {"rows": rows, "markdown": text, "figure": out / "val_loss.png"}


def define_flags():
    flags.DEFINE_list("configs", None, "comma-separated config specs, e.g. configs/vanilla.py:small,configs/modern.py:small")
    flags.DEFINE_integer("max_steps", 500, "training steps of every run")
    flags.DEFINE_integer("seeds", 3, "runs per config (seeds 0..N-1)")
    flags.DEFINE_integer("batch_size", None, "every run's batch size (default: the configs', which must agree)")
    flags.DEFINE_integer("eval_every", None, "validation estimate every N steps (default: max_steps // 10)")
    flags.DEFINE_integer("eval_batches", None, "batches per validation estimate (default: the configs')")
    flags.DEFINE_string("tasks", "hellaswag", "in-loop tasks for GPT-2 BPE models ('' for none)")
    flags.DEFINE_integer("tasks_limit", 0, "items per task (0: all)")
    flags.DEFINE_string("task_dir", None, "where the task files are or are downloaded to (default: $LLMJAX_TASK_DIR or ~/.cache/llmjax/tasks)")
    flags.DEFINE_multi_string("set", [], "config overrides for every run, key=value (e.g. --set train.lr=1e-3)")
    flags.DEFINE_string("out", "runs/compare", "output folder: one folder per config, results.md/.json, val_loss.png")


def main(argv):
    F = flags.FLAGS
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    # (an empty --out wrote the runs and results into the folder compare was run from)
    cli.refuse_empty(out="the output folder (e.g. runs/compare)", task_dir="the folder of the task files")
    specs = [s for s in F.configs or [] if s]  # (a trailing or doubled comma: no config, not a file named '')
    if not specs:
        cli.fail("--configs is required, e.g. --configs configs/vanilla.py:small,configs/modern.py:small")
    overrides = {}
    for item in F.set:
        if "=" not in item:
            cli.fail(f"--set takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = v  # (parsed by each config: by the key's type, as --config.KEY=VALUE is)
    if F.task_dir:
        overrides["eval.tasks_dir"] = F.task_dir
    command = "python -m llmjax.compare " + " ".join(sys.argv[1:])

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # (as Ctrl-C: the running trainer is stopped and saves, see train_once)
    try:
        result = compare(specs, out=Path(F.out), seeds=F.seeds, max_steps=F.max_steps, batch_size=F.batch_size,
                         eval_every=F.eval_every, eval_batches=F.eval_batches, tasks=F.tasks, tasks_limit=F.tasks_limit,
                         overrides=overrides, command=command)
    except CompareError as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        cli.fail(f"interrupted; finished runs and the interrupted run's checkpoint are kept in {F.out}: the same command resumes",
                 code=130)
    print(result["markdown"])
    if result["figure"] is None:
        cli.fail(f"the figure was not drawn: {result['figure_error']}; the table above is in {Path(F.out) / 'results.md'} and "
                 f"results.json", code=1)
    print(f"figure: {result['figure']}")


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    from absl import flags

    from llmjax import cli

    compare = cli.tool("llmjax.compare")
    compare.define_flags()
    flags.adopt_module_key_flags(compare)  # (--help lists the key flags of __main__, which defines none now)
    cli.run(compare.main)
