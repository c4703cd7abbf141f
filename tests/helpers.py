"""Small helpers the test modules share."""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache

import jax
import jax.numpy as jnp
from flax import nnx

import llmjax
from conftest import ROOT


def config(arch: str, variant: str = "tiny", **overrides):
    """The run config of configs/<arch>.py:<variant>, with {'model.key': value} style overrides
    given as model_key=value keyword arguments."""
    return llmjax.load_config(f"{ROOT}/configs/{arch}.py:{variant}", {f"model.{k}": v for k, v in overrides.items()})


@lru_cache(maxsize=None)
def _model(arch: str, seed: int, frozen: tuple):
    return llmjax.build_model(config(arch, **dict(frozen)), seed=seed)


def users_config(path, body: str):
    """Write a user's config file at `path` that starts from vanilla's `MODELS` (as `v.MODELS`),
    its own lines (`body`: MODELS and get_config) after; returns the path."""
    path.write_text(
        "from llmjax.config import make_config\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('v', '{ROOT}/configs/vanilla.py')\n"
        "v = importlib.util.module_from_spec(spec); spec.loader.exec_module(v)\n" + body
    )
    return path


def model(arch: str, seed: int = 0, **overrides):
    """A shared (cached) model instance; treat it as read-only."""
    return _model(arch, seed, tuple(sorted(overrides.items())))


def params(m) -> dict:
    return nnx.to_pure_dict(nnx.state(m, nnx.Param))


# the parameters that start at zero or one: biases (the MoE experts' are b_in and b_out) and norm scales
NEUTRAL_AT_INIT = ("bias", "scale", "b_in", "b_out")


def perturb_vectors(m, seed: int = 0, std: float = 0.5):
    """Add N(0, std) noise to every bias and norm scale (per layer where layers are stacked): they
    start at zero and one, and a path that dropped or doubled a bias would still agree with another."""
    keys = iter(jax.random.split(jax.random.key(seed), 10_000))

    def noisy(path, a):
        name = str(getattr(path[-1], "key", ""))
        return a + std * jax.random.normal(next(keys), a.shape, a.dtype) if name in NEUTRAL_AT_INIT else a

    return load_params(m, jax.tree_util.tree_map_with_path(noisy, params(m)))


def load_params(m, pure: dict):
    """Copy a pure-dict parameter tree into model m (layouts must match)."""
    state = nnx.state(m, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(m, state)
    return m


def scale_params(m, factor: float):
    """Multiply every weight matrix (ndim >= 2) by factor: random models at init_std 0.02 are too
    close to uniform for some properties to be visible."""
    p = jax.tree.map(lambda a: a * factor if a.ndim >= 2 else a, params(m))
    return load_params(m, p)


def tokens(key: int, batch: int, length: int, vocab: int = 65):
    return jax.random.randint(jax.random.key(key), (batch, length), 0, vocab, dtype=jnp.int32)


def built_once(tmp_path_factory, name: str, build):
    """`build(folder)` -> a JSON-able result, run once per test run for whichever xdist worker asks
    first; the other worker waits for it (a file lock) and gets the same result. For module or
    session fixtures that take many seconds (a training run, a GPU compile) and are only read: with
    `-n 2` each worker would otherwise build its own. `folder` is shared by the run's workers."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # (xdist: .../pytest-N/popen-gwK)
    folder, done = root / f"built-once-{name}", root / f"built-once-{name}.json"
    with FileLock(str(root / f"built-once-{name}.lock")):
        if not done.is_file():
            folder.mkdir(exist_ok=True)
            tmp = done.with_suffix(".tmp")
            tmp.write_text(json.dumps(build(folder)))
            tmp.replace(done)
    return json.loads(done.read_text())


_FORKED_CLI = r"""
import importlib, json, os, runpy, sys, tempfile, traceback
runs = json.loads(sys.argv[1])  # [[module or script.py, args], ...]
for module in dict.fromkeys(m for m, _ in runs):
    if module.endswith(".py"):  # a script: what it imports, llmjax's tools, imported once
        importlib.import_module("llmjax.cli")
    else:
        importlib.import_module(module)  # (its imports, JAX's among them, once for every case)
        del sys.modules[module]  # (each case runs it as __main__, as `python -m` does, not the copy imported here)
out = []
for module, args in runs:
    with tempfile.TemporaryFile() as o, tempfile.TemporaryFile() as e:
        pid = os.fork()
        if pid == 0:  # the case: `python -m module *args`, in a process of its own
            os.dup2(o.fileno(), 1)
            os.dup2(e.fileno(), 2)
            sys.argv = [module, *args]
            try:
                if module.endswith(".py"):
                    runpy.run_path(module, run_name="__main__")
                else:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else (print(stop.code, file=sys.stderr) or 1))
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        status = os.waitpid(pid, 0)[1]
        o.seek(0)
        e.seek(0)
        out.append({"args": args, "returncode": os.waitstatus_to_exitcode(status), "stdout": o.read().decode(), "stderr": e.read().decode()})
print(json.dumps(out))
"""


def cli_cases(module: str, cases: list[list[str]], env: dict | None = None, timeout: int = 600) -> list:
    """`python -m module *args` for each args in `cases`, as subprocess.run(..., capture_output=True,
    text=True) gives them (returncode, stdout, stderr), each run in a process forked from one that
    imported `module` once: its imports (JAX's, ~2 s of CPU) once, not per case. The forking process
    starts no JAX backend, so each case starts its own as a process of its own would. For
    command-line checks of many arguments (bad input refused in one line); a test about processes,
    signals or the interpreter's exit runs its own subprocess."""
    return cli_runs([(module, args) for args in cases], env, timeout)


def cli_runs(runs: list[tuple[str, list[str]]], env: dict | None = None, timeout: int = 600) -> list:
    """cli_cases for several tools: `python -m module *args` (or `python script.py *args`, a module
    named by its path ending in .py) for each (module, args) in `runs`, each forked from one process
    that imported every module once."""
    import subprocess
    import sys
    import types

    r = subprocess.run([sys.executable, "-c", _FORKED_CLI, json.dumps(runs)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return [types.SimpleNamespace(**c) for c in json.loads(r.stdout.strip().splitlines()[-1])]


def capped_python(gib: int, *args: str) -> list[str]:
    """The command `python ARGS` under an address-space cap of `gib` GiB, set by a small launcher
    that then execs Python (subprocess's preexec_fn would run Python in a fork of this multithreaded
    JAX process, between fork and exec: a deadlock risk, and a RuntimeWarning)."""
    code = ("import os, resource, sys; n = int(sys.argv[1]) * 2**30; resource.setrlimit(resource.RLIMIT_AS, (n, n)); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
    return [sys.executable, "-c", code, str(gib), *args]


def readme_py_block(opening: str) -> str:
    """The README's ```py block (an example that needs a trained run, so test_readme does not run it)
    whose first line starts with `opening`."""
    import re

    blocks = [b for b in re.findall(r"```py\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if b.startswith(opening)]
    assert len(blocks) == 1, f"README has {len(blocks)} ```py blocks opening with {opening!r}"
    return blocks[0]


def deny_under(monkeypatch, folder) -> None:
    """Make every path under `folder` answer stat() with EACCES, as the kernel answers a user who may
    not enter it (these tests run as root, which enters any folder)."""
    import errno
    import os
    from pathlib import Path

    stat = Path.stat

    def denied(self, *a, **k):
        if str(self).startswith(f"{folder}{os.sep}"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", denied)
