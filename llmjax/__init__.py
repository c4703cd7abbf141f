"""llmjax: train, sample, evaluate and compare nano-sized LLM architectures in JAX + Flax NNX.

    import llmjax
    cfg = llmjax.load_config("configs/modern.py:tiny", {"model.n_layer": 4})
    model = llmjax.build_model(cfg, seed=0)
    logits, cache, aux = model(tokens)          # the one calling convention (see DecoderLM)

The names below are imported on first use, so a light submodule (the tokenizer, which the
dataset-preparation workers import) does not pull in JAX.
"""

import importlib
import sys


def _interrupted_while_starting(signum, frame):
    import contextlib
    import os

    with contextlib.suppress(Exception):  # (what a tool without cli.run, llmjax.tracing, printed into a file or pipe)
        sys.stdout.flush()
    sys.stderr.write("error: interrupted\n")
    os._exit(130)


def _starting_a_tool() -> bool:
    """Whether Python is finding the module of `python -m llmjax.<tool>`: not a library import, nor
    `python -m` of a user's package that imports llmjax (whose Ctrl-C would end it at once, its own
    handlers and finally blocks unrun, a training run's first-Ctrl-C-saves too)."""
    if sys.argv[:1] != ["-m"]:  # (runpy sets sys.argv[0] to the module's file once it has found it)
        return False
    name = sys.orig_argv[-len(sys.argv)]  # (the module's name: `-m NAME`, or `-mNAME` and `-BmNAME` in one word)
    return (name.split("m", 1)[1] if name.startswith("-") else name).startswith("llmjax.")


def _set_start_up_handler():
    """A Ctrl-C while the tool imports JAX (seconds) was a KeyboardInterrupt traceback from deep in an
    import; it ends the tool in the one line that cli.run gives it later, which sets Python's own back.
    Only in place of Python's own: an ignored SIGINT (a job started in the background, `nohup`) stays
    ignored."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def _import_jax_or_say_its_setting():
    """Import JAX, for a tool: an environment variable of JAX's with a value it cannot read
    (JAX_COMPILATION_CACHE_MAX_SIZE=abc, which the README names; JAX_ENABLE_X64=maybe) was a
    ValueError's traceback from JAX's import, in every tool; one line that names it instead."""
    import re

    try:
        import jax  # noqa: F401
    except ValueError as e:
        m = re.match(r'Invalid value "(.*)" for JAX flag (\w+)|invalid truth value (.*) for environment \'(\w+)\'', str(e))
        if m is None:
            raise
        value, name = (m.group(1), m.group(2).upper()) if m.group(2) else (m.group(3).strip("'"), m.group(4))
        sys.stderr.write(f"error: the environment variable {name}={value!r} is not a value JAX reads ({e}); set it to one, or unset it\n")
        sys.exit(2)


if _starting_a_tool():
    _set_start_up_handler()
    _import_jax_or_say_its_setting()

_EXPORTS = {
    "ConfigError": "llmjax.config",
    "ModelConfig": "llmjax.config",
    "load_config": "llmjax.config",
    "model_config": "llmjax.config",
    "cross_entropy": "llmjax.loss",
    "ARCHS": "llmjax.registry",
    "build_model": "llmjax.registry",
    "get_arch": "llmjax.registry",
    "register": "llmjax.registry",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name == "ARCHS":  # (the architectures register themselves on import: else an empty dict)
        importlib.import_module("llmjax.models")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmjax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
