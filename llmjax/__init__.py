"""llmjax: train, sample, evaluate and compare nano-sized LLM architectures in JAX + Flax NNX.

    import llmjax
    cfg = llmjax.load_config("configs/modern.py:tiny", {"model.n_layer": 4})
    model = llmjax.build_model(cfg, seed=0)
    logits, cache, aux = model(tokens)          # the one calling convention (see DecoderLM)
"""

from llmjax.config import ConfigError, ModelConfig, load_config, model_config
from llmjax.loss import cross_entropy
from llmjax.registry import ARCHS, build_model, get_arch, register

__all__ = [
    "ARCHS",
    "ConfigError",
    "ModelConfig",
    "build_model",
    "cross_entropy",
    "get_arch",
    "load_config",
    "model_config",
    "register",
]
__version__ = "0.1.0"
