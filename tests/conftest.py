"""Test setup shared by the whole suite (CPU).

- 8 fake CPU devices, set once here before JAX is imported; tests that need a mesh take a sub-mesh.
- JAX's persistent compilation cache, so a second run of the suite skips most compiles.
- Compiled models are shared through session fixtures.
"""

import gc
import os
import warnings
from pathlib import Path

# XLA's CPU backend with LLVM at optimisation level 1 (TEST_XLA_FLAGS, also given to the tests'
# subprocesses): the suite's programs are tiny, so compiling them is much of its time. Measured on
# 2 cores (2026-12-05): the whole suite with an empty compilation cache 22m10s -> 18m55s, warm 9m20s
# -> 8m41s. Level 0 compiles faster still (17m25s) but runs some programs several times slower (the
# tiny SSM's forward 3.2 -> 17.8 ms; level 1: 4.2). Users' runs keep XLA's default, and so does a
# machine with an NVIDIA GPU (the flag would reach the GPU compiler too, and tests/gpu times kernels).
TEST_XLA_FLAGS = "" if Path("/dev/nvidiactl").exists() else "--xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from llmjax.runtime import enable_compilation_cache  # noqa: E402

# No malloc tuning in the test processes (llmjax/runtime.py keeps every freed block in the heap):
# a long-lived xdist worker's heap would grow to several GB; the tests' CLI subprocesses inherit this.
os.environ["LLMJAX_NO_MALLOC_TUNING"] = "1"

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CACHE_DIR = Path(os.environ.get("LLMJAX_TEST_JAX_CACHE", Path.home() / ".cache" / "llmjax" / "jax-test-cache"))
# the command-line tools the tests start compile into the same folder (not the user's cache)
os.environ["LLMJAX_COMPILATION_CACHE"] = str(CACHE_DIR)

# The command-line tools' cache settings (llmjax/runtime.py): llmjax's FolderCache (atomic writes,
# the folder listed once per few hundred writes, not on every write as JAX 0.11.2's own cache does:
# 0.9 s per write at 4,531 entries on the 2-core VM), every program kept (loading beats compiling).
enable_compilation_cache()


def _mapped_regions() -> int:
    """How many memory mappings this process holds (0 where /proc is not there)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


try:
    MAX_MAPPED_REGIONS = int(Path("/proc/sys/vm/max_map_count").read_text())
except (OSError, ValueError):
    MAX_MAPPED_REGIONS = 65530  # Linux's default


@pytest.fixture(autouse=True)
def _release_executables():
    """Drop JAX's compiled executables once this worker holds a quarter of the kernel's limit on
    memory mappings (vm.max_map_count, 65,530 by default). Every XLA:CPU executable maps about six
    regions of JIT-ed code and data, and the jit caches keep them alive: a worker that runs ~300
    tests reached that limit, and the next mmap inside XLA (compiling, or loading an executable from
    the persistent cache) crashed the worker with a segfault. Dropped executables come back from
    the persistent compilation cache when a later test needs them."""
    yield
    if _mapped_regions() > MAX_MAPPED_REGIONS // 4:
        jax.clear_caches()
        gc.collect()
        if (n := _mapped_regions()) > MAX_MAPPED_REGIONS // 2:
            warnings.warn(f"this test process still holds {n} memory mappings after jax.clear_caches() (limit {MAX_MAPPED_REGIONS})")

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
