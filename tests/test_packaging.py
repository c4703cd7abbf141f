"""The install: pinned versions, and no torch in the default dependency closure."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from conftest import ROOT
from helpers import cli_runs
from packaging.requirements import Requirement


def _closure(name: str, seen: set[str]) -> set[str]:
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return seen
    seen.add(key)
    try:
        reqs = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return seen
    for r in map(Requirement, reqs):
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            _closure(r.name, seen)
    return seen


def test_default_install_pulls_in_no_torch():
    deps = _closure("llmjax", set())
    assert "jax" in deps and "flax" in deps and "grain" in deps
    assert not {"torch", "tensorflow"} & deps


def test_constraints_pin_the_same_core_versions_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(d.split("==") for d in project["dependencies"] if "==" in d)
    constraints = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731
    constraints = {norm(k): v for k, v in constraints.items()}
    for name, version in pins.items():
        assert constraints[norm(name)] == version, name
    for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tiktoken"):
        assert norm(name) in constraints
    assert constraints["jax"] == "0.11.2" and constraints["flax"] == "0.12.10"


def test_installed_versions_match_the_pins():
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            if name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tiktoken", "grain", "ml_collections"):
                assert metadata.version(name) == version, name


def test_every_tools_help_lists_its_main_flags():
    """`--help` lists the flags a tool takes from llmjax.cli (--config, --checkpoint_path, --which) and
    llmjax.sample (--quantize) with its own: they were under --helpfull only. It exits 0 (absl's
    help exits 1, which a script's `tool --help && ...` read as a failure)."""
    tools = []
    for module, names in [("llmjax.train", ["--config", "--workdir"]), ("llmjax.sample", ["--checkpoint_path", "--which", "--prompt"]),
                          ("llmjax.evaluate", ["--checkpoint_path", "--which", "--quantize", "--tasks"]),
                          ("llmjax.export", ["--checkpoint_path", "--which"]), ("llmjax.summary", ["--config"]),
                          # (bench's --config and the evaluate alias's every flag were under --helpfull only)
                          ("llmjax.bench", ["--config", "--variant", "--set"]), ("llmjax.aot", ["--config", "--target"]),
                          ("llmjax.compare", ["--configs", "--set"]), ("llmjax.prepare", ["--source", "--out"]),
                          ("scripts/run_benchmarks.py", ["--checkpoint_path", "--which", "--quantize", "--tasks", "--scorer"])]:
        tools.append((module, names))
    # each tool forked from one process that imported them all (JAX's imports once, not per tool)
    for (module, names), r in zip(tools, cli_runs([(module, ["--help"]) for module, _ in tools])):
        listed = set(re.findall(r"^\s+(--\w+):", r.stdout + r.stderr, re.M))
        assert set(names) <= listed, (module, set(names) - listed)
        assert r.returncode == 0, (module, r.returncode, r.stderr[-1000:])


def test_the_packages_archs_lists_every_architecture_at_once():
    """`llmjax.ARCHS`, one of the package's names, was an empty dict in a fresh process until
    something built a model (the architectures register themselves when llmjax.models is imported)."""
    import subprocess
    import sys

    code = "import llmjax; first = sorted(llmjax.ARCHS); import llmjax.models; print(first == sorted(llmjax.ARCHS), *first)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    same, *names = r.stdout.split()
    assert same == "True" and {"vanilla", "modern", "moe"} <= set(names), r.stdout


def test_every_tool_runs_its_module_as_imported_not_a_main_copy():
    """`python -m llmjax.X` runs X's file as `__main__`, a second copy of its classes beside
    llmjax.X's: the sampler's Sampling made by the copy was refused by llmjax.sample's own check
    when export.load_gpt2 (which imports llmjax.sample) decoded a Hugging Face folder, a traceback
    (tests/test_export.py runs that command). Each tool's __main__ block runs the imported module's."""
    tools = sorted(p for p in (ROOT / "llmjax").glob("*.py") if 'if __name__ == "__main__":' in p.read_text())
    assert len(tools) >= 11
    for path in tools:
        block = path.read_text().split('if __name__ == "__main__":', 1)[1]
        assert f'("llmjax.{path.stem}")' in block and re.search(r"\.main\b", block.split(f'("llmjax.{path.stem}")', 1)[1]), path.name
