"""`python -m llmjax.evaluate --checkpoint runs/NAME --tasks hellaswag,arc_easy [--batch_size 8] [--limit N]`

Evaluate a training run's checkpoint on downstream tasks and print the aggregated results as JSON
(`--output_json FILE` also writes them):

- `--scorer=harness` (default): lm-evaluation-harness (the `eval` extra) with the `llmjax` model
  (llmjax.harness), any of its tasks. HellaSwag and ARC-Easy read the local task files of
  llmjax.downstream (downloaded once into the task directory, or already there), so they run
  offline; other tasks load their data as lm-eval does.
- `--scorer=fast`: llmjax's own HellaSwag / ARC-Easy scorer (llmjax.downstream), the one the
  trainer runs in the loop: the same requests, tokens and metrics as the harness, without it.

Both print lm-eval's result keys (`acc,none`, `acc_norm,none`, their `_stderr`), plus
`items_per_sec`. The flags are those of the original playground's `run_benchmarks.py`
(`scripts/run_benchmarks.py` is an alias; `--checkpoint_path` is a synonym of `--checkpoint`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
from absl import flags

from llmjax import cli, downstream
from llmjax.config import ConfigError
from llmjax.runtime import logger_level
from llmjax.sample import SampleError, load, resolve
from llmjax.scoring import Scorer, ScoreError


class EvalError(ValueError):
    """An evaluation problem a user can fix (one line)."""


def pick_device(spec: str | None):
    """The JAX device for a torch-style name: cuda, cuda:N, gpu:N, cpu (None: JAX's first)."""
    if spec is None or str(spec) == "":
        return jax.devices()[0]
    name, _, index = str(spec).lower().partition(":")
    platform = {"cuda": "gpu", "gpu": "gpu", "rocm": "gpu", "cpu": "cpu", "tpu": "tpu"}.get(name)
    if platform is None or not (index == "" or index.isdigit()):
        raise EvalError(f"--device={spec}: use cuda, cuda:N, gpu:N or cpu")
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise EvalError(
            f"--device={spec}: JAX has no {platform} backend here (it runs on {jax.default_backend()}); "
            "install a CUDA build (bash scripts/setup.sh cuda13) or pass --device=cpu"
        ) from None
    i = int(index or 0)
    if i >= len(devices):
        raise EvalError(f"--device={spec}: there are only {len(devices)} {platform} device(s)")
    return devices[i]


def load_for_scoring(path, which: str = "latest", *, dtype: str | None = None, device=None, quantize: str | None = None,
                     quantize_embeddings: bool = False):
    """`sample.load` with the model as scoring runs it (a capacity-mode MoE dropless; see
    llmjax.scoring.scoring_config)."""
    from llmjax.export import is_gpt2_source

    if is_gpt2_source(path):  # OpenAI GPT-2 (no experts)
        return load(path, which, dtype=dtype, device=device, quantize=quantize, quantize_embeddings=quantize_embeddings)
    run, _ = resolve(path, which)
    try:
        mode = json.loads((run / "config.json").read_text())["model"].get("moe_mode")
    except (OSError, ValueError, KeyError, AttributeError):
        mode = None  # load() reports an unreadable run
    overrides = {"moe_mode": "dropless"} if mode == "capacity" else None
    return load(path, which, dtype=dtype, device=device, model_overrides=overrides, quantize=quantize,
                quantize_embeddings=quantize_embeddings)


def _result_entry(task: str, m: dict) -> dict:
    return {
        "alias": task, "sample_len": m["n"],
        "acc,none": m["acc"], "acc_stderr,none": m["acc_stderr"],
        "acc_norm,none": m["acc_norm"], "acc_norm_stderr,none": m["acc_norm_stderr"],
    }


def run_fast(loaded, tasks: list[str], *, batch_size: int, limit: int | None, task_dir=None, progress: bool = True) -> dict:
    """The built-in scorer on `tasks` (hellaswag, arc_easy)."""
    tasks = downstream.check_names(tasks)
    downstream.check_tokenizer(loaded.tokenizer)
    scorer = Scorer.for_model(loaded.model, batch_size)
    results, samples, speed = {}, {}, {}
    for task in tasks:
        items = downstream.load_items(task, task_dir, limit=limit)
        start = time.perf_counter()
        requests = downstream.requests_for(items, loaded.tokenizer)
        downstream.check_fit(task, items, requests, loaded.model.cfg.context_len)  # (names the item that does not fit)
        m = downstream.score_task(scorer, loaded.tokenizer, items, progress=progress, requests=requests)
        elapsed = time.perf_counter() - start
        results[task] = _result_entry(task, m)
        samples[task] = len(items)
        speed[task] = len(items) / elapsed
    return {"results": results, "n-samples": samples, "items_per_sec": speed}


def _local_task_configs(tasks: list[str], task_dir, folder: Path) -> list[str]:
    """Write lm-eval task YAMLs into `folder` that point lm-eval's own hellaswag / arc_easy at the
    local files (the same task names, preprocessing and metrics; only the data source changes).
    Returns the tasks so redirected."""
    import lm_eval

    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    base = {"hellaswag": lm_tasks / "hellaswag" / "hellaswag.yaml", "arc_easy": lm_tasks / "arc" / "arc_easy.yaml"}
    done = []
    for task in tasks:
        if task not in downstream.TASKS or not base[task].is_file():
            continue
        spec = downstream.TASKS[task]
        path = downstream.find_file(task, task_dir)
        downstream.parse_file(path, spec)  # (a damaged file: the fast scorer's one line, not lm-eval's traceback)
        if task == "arc_easy":  # AI2's original rows, which lm-eval's template cannot read: a copy in the hub's layout
            path = downstream.write_hub_arc(path, folder / "ARC-Easy-test.jsonl")
        lines = [
            f"include: {json.dumps(str(base[task]))}",
            f"task: {task}",
            "dataset_path: json",
            "dataset_name: null",
            # cache_dir: a cache of `datasets`' own in `folder`, gone with it. In its shared cache a local file is
            # known by its path and mtime: a file replaced by another of the same mtime (cp -p, rsync -a, tar)
            # was scored as the old one (the fast scorer read the new), and every ARC copy in AI2's layout,
            # a new path each run, left another copy there
            f"dataset_kwargs: {{data_files: {{{spec.split}: {json.dumps(str(path.absolute()))}}}, "
            f"cache_dir: {json.dumps(str((folder / 'datasets').absolute()))}}}",
            "training_split: null",
        ]
        if spec.split == "test":
            lines.append("validation_split: null")
        (folder / f"{task}.yaml").write_text("\n".join(lines) + "\n")
        done.append(task)
    return done


def offline_flags() -> list[tuple[object, str]]:
    """The module-level offline switches of `datasets` and `huggingface_hub` that exist here."""
    import importlib

    out = []
    for module, names in (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")), ("huggingface_hub.constants", ("HF_HUB_OFFLINE",))):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        out += [(mod, n) for n in names if isinstance(getattr(mod, n, None), bool)]
    return out


def run_harness(
    loaded, tasks: list[str], *, batch_size: int, limit: int | None, task_dir=None, num_fewshot: int | None = None,
    device=None,
) -> dict:
    """lm-evaluation-harness on `tasks` with the llmjax model."""
    try:
        import lm_eval
        import lm_eval.evaluator
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError("--scorer=harness needs lm-evaluation-harness: bash scripts/setup.sh eval (or use --scorer=fast)") from None
    from llmjax.harness import LlmjaxLM

    downstream.check_tokenizer(loaded.tokenizer, tasks)
    lm = LlmjaxLM(model=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, device=device)
    with tempfile.TemporaryDirectory(prefix="llmjax-tasks-") as folder:
        local = _local_task_configs(tasks, task_dir, Path(folder))
        if num_fewshot and local:
            raise EvalError(f"--num_fewshot={num_fewshot} with {', '.join(local)}: lm-eval takes few-shot examples from a task's "
                            "training split, and the local files hold only the scored split (the examples would be other scored "
                            "items); use --num_fewshot=0")
        # every task local: lm-eval's own task folder is not indexed (10-15 s on a 2-core VM, its 14,683
        # tasks' YAMLs; the local YAMLs include lm-eval's hellaswag / arc_easy files by path)
        manager = TaskManager(include_path=folder if local else None, include_defaults=not set(tasks) <= set(local))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            import difflib

            near = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
            raise EvalError(f"unknown lm-eval task '{unknown[0]}'" + (f" (did you mean '{near[0]}'?)" if near else ""))
        offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"} if set(tasks) <= set(local) else {}  # nothing to fetch
        before = {k: os.environ.get(k) for k in offline}
        os.environ.update({k: v for k, v in offline.items() if before[k] is None})
        # (`datasets` and `huggingface_hub` read those at import, which lm_eval has done: their flags too)
        flags = [(mod, name, True) for mod, name in (offline_flags() if offline else [])]
        # lm-eval records `git describe` of the current folder, which is not llmjax's (its result is not
        # in ours): outside a git repository git printed 'fatal: not a git repository ...' on stderr
        flags.append((lm_eval.evaluator, "get_git_commit_hash", _no_git_hash))
        saved = [(mod, name, getattr(mod, name)) for mod, name, _ in flags]
        for mod, name, value in flags:
            setattr(mod, name, value)
        try:
            start = time.perf_counter()
            try:
                # huggingface_hub's logger held to errors: offline, each of its tries for a task's data
                # was a warning line on stderr, twice (its handler's and absl's), before our one line
                with logger_level("huggingface_hub", logging.ERROR):
                    out = lm_eval.simple_evaluate(
                        model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot, log_samples=False,
                    )
            except ConnectionError as e:  # (`datasets`: a task's data is on the hub, which cannot be reached)
                hub = [t for t in tasks if t not in local]
                whose = "that task's" if len(hub) == 1 else "those tasks'"
                raise EvalError(f"{', '.join(hub)}: {str(e).splitlines()[0]}; lm-eval loads {whose} "
                                f"data from the Hugging Face hub: run with network once (it is cached), or score "
                                f"{' and '.join(downstream.TASK_NAMES)} (local files)") from None
            elapsed = time.perf_counter() - start
        finally:  # (the caller's environment as it was)
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
            for mod, name, value in saved:
                setattr(mod, name, value)
    n = {k: v["effective"] if isinstance(v, dict) else v for k, v in out.get("n-samples", {}).items()}
    return {
        "results": out["results"], "n-samples": n, "n-shot": out.get("n-shot"), "versions": out.get("versions"),
        "lm_eval_version": getattr(lm_eval, "__version__", None), "items_per_sec": {"all": sum(n.values()) / elapsed},
    }


def _no_git_hash():
    """lm_eval.evaluator.get_git_commit_hash while llmjax runs the harness: none (see run_harness)."""
    return None


# ---------------------------------------------------------------------------------------------
# The command line


def define_flags():
    cli.define_checkpoint_flags()
    flags.adopt_module_key_flags(cli)  # (--help lists them with the tool's own flags)
    flags.DEFINE_string("tasks", "hellaswag", "comma-separated tasks (lm-eval names; --scorer=fast: hellaswag, arc_easy)")
    flags.DEFINE_integer("batch_size", 8, "sequences per forward pass")
    flags.DEFINE_string("device", None, "cuda, cuda:N, cpu (default: JAX's first device)")
    flags.DEFINE_integer("limit", None, "score only the first N items of each task")
    flags.DEFINE_string("output_json", None, "also write the results to this JSON file")
    flags.DEFINE_enum("scorer", "harness", ["harness", "fast"], "lm-evaluation-harness, or llmjax's built-in HellaSwag/ARC scorer")
    flags.DEFINE_string("task_dir", None, "where hellaswag/arc_easy files are found or downloaded (default: $LLMJAX_TASK_DIR or ~/.cache/llmjax/tasks)")
    flags.DEFINE_integer("num_fewshot", None, "harness: few-shot examples (default: each task's own)")
    from llmjax import sample
    from llmjax.sample import define_dtype_flag, define_quantize_flags

    define_dtype_flag()
    define_quantize_flags()
    flags.adopt_module_key_flags(sample)  # (--quantize in --help)


def check_output_path(path: Path) -> None:
    """Refuse, before any scoring, an --output_json that cannot be written (a folder; a parent that is
    a file; a folder without write permission)."""
    if path.is_dir():
        raise EvalError(f"--output_json {path} is a folder; give a file name, e.g. {path / 'metrics.json'}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise EvalError(f"--output_json {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise EvalError(f"--output_json {path}: {parent} is not writable")


def evaluate(FLAGS) -> dict:
    tasks = [t.strip() for t in FLAGS.tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--tasks is empty; e.g. --tasks=hellaswag,arc_easy")
    if FLAGS.batch_size < 1:
        raise EvalError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    if FLAGS.limit is not None and FLAGS.limit < 1:  # (eval.tasks_limit=0 is every item: here that is no --limit)
        raise EvalError(f"--limit must be >= 1, got {FLAGS.limit}; drop --limit to score every item")
    shots = getattr(FLAGS, "num_fewshot", None)
    if shots is not None and shots < 0:
        raise EvalError(f"--num_fewshot must be >= 0, got {shots}")
    if FLAGS.scorer == "fast":
        downstream.check_names(tasks)
        if shots:  # (the built-in scorer is 0-shot: a few-shot request would be answered 0-shot, unsaid)
            raise EvalError(f"--num_fewshot={shots}: the fast scorer scores 0-shot only; drop --num_fewshot or use --scorer=harness")
    if FLAGS.output_json:
        check_output_path(Path(FLAGS.output_json))
    device = pick_device(FLAGS.device)
    loaded = load_for_scoring(FLAGS.checkpoint_path, FLAGS.which, dtype=FLAGS.dtype, device=device,
                              quantize=getattr(FLAGS, "quantize", None), quantize_embeddings=getattr(FLAGS, "quantize_embeddings", False))
    downstream.check_tokenizer(loaded.tokenizer, tasks)
    kwargs = dict(batch_size=FLAGS.batch_size, limit=FLAGS.limit, task_dir=FLAGS.task_dir)
    with jax.default_device(device):
        if FLAGS.scorer == "fast":
            out = run_fast(loaded, tasks, **kwargs)
        else:
            out = run_harness(loaded, tasks, num_fewshot=FLAGS.num_fewshot, device=FLAGS.device, **kwargs)
    mcfg = loaded.model.cfg
    out["config"] = {
        "model": "llmjax", "checkpoint": str(loaded.path), "step": loaded.step, "arch": mcfg.arch, "dtype": mcfg.dtype,
        "scorer": FLAGS.scorer, "batch_size": FLAGS.batch_size, "limit": FLAGS.limit, "device": str(device),
        "quantize": getattr(FLAGS, "quantize", None) or "none",
        "quantize_embeddings": bool(getattr(FLAGS, "quantize_embeddings", False)),  # (an int8 token table scores otherwise)
    }
    out["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return out


def main(argv):
    FLAGS = flags.FLAGS
    cli.start_run_reader(argv, "runs/NAME")
    cli.refuse_empty(output_json="a file name (e.g. metrics.json)", task_dir="the folder of the task files")
    try:
        out = evaluate(FLAGS)
    except (EvalError, SampleError, ScoreError, downstream.TaskError, ConfigError) as e:
        cli.fail(str(e))
    except jax.errors.JaxRuntimeError as e:  # (XLA's traceback before)
        what = cli.out_of_memory(e)
        if what is None:
            raise
        cli.fail(f"out of device memory scoring batches of {FLAGS.batch_size} sequences ({what}); lower --batch_size")
    text = json.dumps(out, indent=2, default=str)
    print(text)  # (first: the results are not lost if the file cannot be written)
    sys.stdout.flush()
    if FLAGS.output_json:
        from llmjax.data import atomic_write_bytes

        try:
            atomic_write_bytes(Path(FLAGS.output_json), (text + "\n").encode())
        except OSError as e:
            cli.fail(f"cannot write --output_json {FLAGS.output_json}: {e.strerror or e} (the results are printed above)")


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    from absl import flags

    from llmjax import cli

    evaluate = cli.tool("llmjax.evaluate")
    evaluate.define_flags()
    flags.adopt_module_key_flags(evaluate)  # (--help lists the key flags of __main__, which defines none now)
    cli.run(evaluate.main)
