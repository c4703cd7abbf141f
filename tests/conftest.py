"""Test setup shared by the whole suite (CPU).

- 8 fake CPU devices, set once here before JAX is imported; tests that need a mesh take a sub-mesh.
- JAX's persistent compilation cache, so a second run of the suite skips most compiles.
- Compiled models are shared through session fixtures.
"""

import os
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# No malloc tuning in the test processes (llmjax/runtime.py keeps every freed block in the heap and
# serves none by mmap): long-lived xdist workers, hundreds of tests each, were lost late in the suite
# to crashes inside XLA (compile and executable deserialisation) in three of 2026-11-28's CI runs,
# never in a short run; the product's own processes (the CLI subprocesses) keep it unless this
# variable is set, which the tests' subprocesses inherit too.
os.environ["LLMJAX_NO_MALLOC_TUNING"] = "1"

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
# One folder per xdist worker, so a worker only loads executables a worker of its name wrote: with
# one shared folder (jax-test-cache), two of 2026-11-28's CI runs lost a worker to a segfault in
# XLA's deserialisation of a cached executable (compilation_cache.get_executable_and_time; the cause
# was not found: not a half-written entry, which the lock below rules out, and not reproduced alone).
CACHE_DIR = Path(os.environ.get("LLMJAX_TEST_JAX_CACHE", Path.home() / ".cache" / "llmjax" / "jax-test-cache-2")) / os.environ.get(
    "PYTEST_XDIST_WORKER", "main"
)

jax.config.update("jax_compilation_cache_dir", str(CACHE_DIR))
# A size limit turns on JAX's file lock around cache reads and writes (without it a process could
# read an entry another is still writing).
jax.config.update("jax_compilation_cache_max_size", 16 << 30)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs it there)")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
    """Every test prepares datasets under one temporary data directory (LLMJAX_DATA_DIR)."""
    path = tmp_path_factory.mktemp("data")
    os.environ["LLMJAX_DATA_DIR"] = str(path)
    return path
