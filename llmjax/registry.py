"""The architecture registry: `arch` name -> model class (and its config dataclass).

    @register("modern")
    class Modern(DecoderLM):
        config_class = ModernConfig
        ...

`build_model(cfg)` is how the trainer, sampler, evaluator and summary make a model; none of them
branches on the architecture.
"""

from __future__ import annotations

import os
from typing import Any

from flax import nnx

from llmjax.config import ConfigError, closest, model_config

ARCHS: dict[str, type[nnx.Module]] = {}
_SITES: dict[str, tuple[str, int]] = {}  # name -> (file, line) of the class statement that registered it


def register(name: str):
    """Class decorator adding a model class under `name`; the class must set `config_class`. The
    same class statement run again (a config file that defines its own architecture: the command
    line reads a config file two or three times) replaces it; another one under the name is refused."""
    import sys

    caller = sys._getframe(1)  # (the code the decorated class statement is in)
    # (its file as the file system has it: config_flags loads the file as typed, `./mine.py`, where load_config
    # compiled it as `mine.py`: two names of one statement)
    site = (os.path.realpath(caller.f_code.co_filename), caller.f_lineno)

    def wrap(cls):
        if name in ARCHS and _SITES.get(name) != site:
            raise ValueError(f"architecture '{name}' is registered twice")
        if not hasattr(cls, "config_class"):
            raise TypeError(f"{cls.__name__} must define config_class")
        cls.arch_name = name
        ARCHS[name] = cls
        _SITES[name] = site
        return cls

    return wrap


def get_arch(name: str) -> type[nnx.Module]:
    import llmjax.models  # noqa: F401  (registers every architecture)

    if name not in ARCHS:
        raise ConfigError(f"unknown arch '{name}'; registered: {', '.join(sorted(ARCHS))}{closest(name, ARCHS)}")
    return ARCHS[name]


def build_model(cfg: Any, *, rngs: nnx.Rngs | None = None, seed: int = 0) -> nnx.Module:
    """Build the model described by a run ConfigDict, its `model` group, or a ModelConfig."""
    mcfg = model_config(cfg)
    return get_arch(mcfg.arch)(mcfg, rngs=rngs if rngs is not None else nnx.Rngs(params=seed))
