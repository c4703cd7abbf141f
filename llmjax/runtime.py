"""Process-level settings that make the CPU backend fast.

XLA's CPU compiler hands matrix multiplications to YNNPACK one dot at a time by default (jaxlib
0.11), and makes a transposed copy of an operand for each weight gradient. Letting YNNPACK take each
dot together with its neighbouring operations (the compile option `xla_cpu_experimental_ynn_fusion_type`
= dot, reduce) removes most of those copies: the CPU quickstart's training step goes from 25.5 to 18.5
ms (docs/benchmarks.md). That mode computes bfloat16 dots less accurately (a float32-accumulated dot of
bfloat16 inputs comes out rounded to about bfloat16 precision), so `cpu_compiler_options` gives it only
to float32 computations, per jitted function (not through XLA_FLAGS, which is global). XLA's default
mode, in turn, runs bfloat16 x bfloat16 -> float32 dots at about 1.7x the float32 rate on CPUs with
AVX-512 BF16 (while a dot with a bfloat16 result is several times slower than float32): a model with
`matmul_dtype='bfloat16'` (layers.narrow_matmul) compiles without the option, and its step is faster
still (the quickstart: ~20 ms -> ~13 ms per step).

XLA's CPU runtime allocates and frees tens of megabytes of temporaries on every step (a 48.5 MB
block on the CPU quickstart). glibc's malloc serves blocks that large with a fresh mmap and unmaps
them on free, and trims heap tops eagerly, so every step faults the same pages in again: on the CPU
quickstart (baby GPT, 2 cores) 6,000-13,000 page faults per step and about half the step time in
the kernel (measured with strace and getrusage). Serving every block from the heap and keeping
freed memory in the process removes that: 65 faults per step, about 20 ms/step instead of 26-37.
The cost is that the process's resident memory stays at its peak, which a training process reaches
anyway; the trainer applies it only when JAX runs on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

# measured with jaxlib 0.11; another version may not know the option (an error), so it gets none
CPU_FLOAT32_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
_TESTED_JAXLIB = ("0.11.",)

_target: list[str] = []  # compiling_for's stack
CACHE_MAX_BYTES = 16 << 30  # the compilation cache's size limit (enable_compilation_cache)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -2, -3, -4
_done = False


def turned_off(name: str) -> bool:
    """Whether the environment variable `name` (LLMJAX_NO_...) is set to a true value: 1, true, yes,
    on (any case); unset, empty, 0, false, no or off leave the tuning on (0 turned it off, as 1 did)."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def tune_host_allocator() -> bool:
    """Ask glibc malloc to keep freed memory (no-op elsewhere, or with LLMJAX_NO_MALLOC_TUNING=1).
    Returns whether the settings were applied."""
    global _done
    if _done:
        return True
    if sys.platform != "linux" or turned_off("LLMJAX_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(
            libc.mallopt(param, value)
            for param, value in (
                (_M_MMAP_MAX, 0),  # no block gets its own mmap: all come from the heap
                (_M_MMAP_THRESHOLD, 32 << 20),  # (and should mmap be re-enabled, blocks below 32 MiB still do)
                (_M_TRIM_THRESHOLD, 1 << 30),  # do not give the heap's top back to the kernel
                (_M_TOP_PAD, 64 << 20),  # grow heaps in large steps
            )
        )
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    _done = ok
    return ok


def cpu_compiler_options(compute_dtype, platform: str | None = None) -> dict[str, str] | None:
    """Compile options for a jitted step whose matrix multiplications take `compute_dtype` operands on
    `platform` (default: JAX's default backend): the YNNPACK fusion mode above for float32 on the
    CPU, else None (XLA's defaults). None as well with LLMJAX_NO_XLA_TUNING=1, or with a jaxlib it
    was not measured on (the option may not exist there)."""
    import jax
    import jax.numpy as jnp

    if turned_off("LLMJAX_NO_XLA_TUNING") or (platform or jax.default_backend()) != "cpu" or jnp.dtype(compute_dtype) != jnp.float32:
        return None
    if not jax.lib.__version__.startswith(_TESTED_JAXLIB):
        return None
    return dict(CPU_FLOAT32_OPTIONS)


def compilation_cache_settings(environ=os.environ) -> dict | None:
    """The folder and JAX settings of the command-line tools' compilation cache, from the
    environment (None: off). The folder is $LLMJAX_COMPILATION_CACHE (empty: off), else JAX's own
    $JAX_COMPILATION_CACHE_DIR where the user set one, else ~/.cache/llmjax/jax; a leading `~` is
    the home folder. A size limit ($JAX_COMPILATION_CACHE_MAX_SIZE) or minimum compile time
    ($JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) the user set is kept (JAX read it at import);
    otherwise at most 16 GiB, and every program is kept (loading beats compiling)."""
    path = environ.get("LLMJAX_COMPILATION_CACHE")
    if path is None:
        path = environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join("~", ".cache", "llmjax", "jax")
    if not path:
        return None
    path = path.removeprefix("file://")  # (a local folder as a URL: JAX's compiler took it for etils' path of a scheme it lacks,
    # KeyError 'file://' at the first compile; and file://~/x made a folder named '~')
    settings = {"jax_compilation_cache_dir": path if "://" in path else os.path.expanduser(path)}
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
        settings["jax_persistent_cache_min_compile_time_secs"] = 0
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in environ:
        settings["jax_compilation_cache_max_size"] = CACHE_MAX_BYTES
    return settings


def enable_compilation_cache() -> str | None:
    """JAX's persistent compilation cache for the command-line tools, so a second run skips most
    compiles, in the folder `compilation_cache_settings` names (returned; None: off). Kept by
    `llmjax.compile_cache.FolderCache` (atomic writes, no folder scan per write), not JAX's own
    LRUCache, whose per-write scan of the folder grows with every program kept (0.9 s per write at
    4,500 entries). A folder that cannot be made (a file in its place) is one warning line and no
    cache, not JAX's warning about reading an entry."""
    import jax

    from llmjax.compile_cache import install, one_line_warnings

    settings = compilation_cache_settings()
    if settings is None:
        return None
    path = settings["jax_compilation_cache_dir"]
    if "://" not in path or path.startswith("file://"):
        try:
            os.makedirs(path.removeprefix("file://"), exist_ok=True)
        except OSError as e:
            why = "a file is in its place" if isinstance(e, (FileExistsError, NotADirectoryError)) else (e.strerror or str(e))
            print(f"warning: the compilation cache folder {path} cannot be made ({why}), so compiled programs are not "
                  "cached: set LLMJAX_COMPILATION_CACHE to a folder that can be written, or to nothing to turn the cache off",
                  file=sys.stderr, flush=True)
            return None
    install()
    one_line_warnings()  # (a folder it cannot write: one line, not Python's two)
    for name, value in settings.items():
        jax.config.update(name, value)
    return path


def backend() -> str:
    """The platform the model's code is being traced for: JAX's default backend, or the one an
    enclosing `compiling_for` names (llmjax.aot compiles for a GPU in a process that has none).
    Layers that choose an implementation by platform (cuDNN attention, narrow dots) ask this."""
    if _target:
        return _target[-1]
    import jax

    return jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace the model as if `platform` ("gpu", "cpu") were JAX's default backend."""
    _target.append(platform)
    try:
        yield
    finally:
        _target.pop()


@contextlib.contextmanager
def logger_level(name: str, level: int):
    """The standard-library logger `name` held at `level` within the block, then as it was: for a
    library's own lines that our one-line message says better (Orbax's reads failing at asyncio's
    shutdown, huggingface_hub's retries offline)."""
    import logging

    log = logging.getLogger(name)
    before = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(before)


@contextlib.contextmanager
def exclusive_folder(path, busy):
    """An exclusive lock on the folder `path` (flock on the folder itself, so no file of its own)
    within the block, for a tool whose second copy at once in that folder would break the first's
    work (a preparation, a comparison, a training run): `busy()`, an exception, is raised at once
    where another process holds it. Where the file system has no such locks (some network ones)
    or the platform none (Windows), the block runs without."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy() from None
        except OSError:
            pass
        yield
    finally:
        os.close(fd)
