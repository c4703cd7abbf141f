"""`python -m llmjax.export --checkpoint runs/NAME --format safetensors|gguf --out PATH`, and importing
OpenAI's GPT-2 weights.

Export (from a training run's checkpoint, float32 master weights, written as `--dtype`):
- `safetensors`: a Hugging Face model folder: `model.safetensors`, `config.json`, and the GPT-2 BPE
  tokenizer files (`vocab.json`, `merges.txt`). `vanilla` becomes `GPT2LMHeadModel` (Conv1D
  weights are (in, out), as our kernels), `modern` becomes `LlamaForCausalLM` (Linear weights are
  (out, in): transposed; RoPE is rotate-half in both, so q/k need no permutation). Vocabulary rows
  are cut to the tokenizer's 50257; the head is tied to the embedding.
- `gguf`: one llama.cpp file for `modern` (architecture `llama`): llama.cpp's tensor names and
  metadata, q/k rows permuted from rotate-half to llama.cpp's interleaved rotary layout (as its own
  HF converter does), the GPT-2 BPE tokenizer embedded (tokens, merges, end-of-text).
Any other architecture or format is a one-line error naming what is supported.

Import: `--config.train.init_from=gpt2` (or gpt2-medium / gpt2-large / gpt2-xl, with the matching
`configs/vanilla.py:<default|medium|large|xl>`; or a local HF GPT-2 folder or .safetensors file)
starts a fresh run from those weights: nanoGPT's `from_pretrained`, in JAX (a shorter
model.context_len keeps the position table's first rows: its `crop_block_size`). The hub files come
through huggingface_hub (its cache); needs the `hf` extra.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from absl import flags

from llmjax import cli
from llmjax.config import ConfigError, ModelConfig
from llmjax.tokenizer import ASSETS

HUB_MODELS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
SUPPORTED = "safetensors for vanilla (Hugging Face GPT-2) and modern (Hugging Face Llama); gguf for modern (llama.cpp)"


class ExportError(ValueError):
    """An export/import problem a user can fix (one line)."""


def _quiet_hub():
    """huggingface_hub's logger held to errors for one of our lookups: offline, each try of a download
    was a warning line on stderr (and again through absl's handler), before our one-line error."""
    from llmjax.runtime import logger_level

    return logger_level("huggingface_hub", logging.ERROR)


def _hub_file(source: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    with _quiet_hub():
        return Path(hf_hub_download(HUB_MODELS[source], filename))


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def _cast(name: str, x, dtype) -> np.ndarray:
    """Tensor `name` (float32 weights) as `dtype`; a weight that is NaN or inf (a run that diverged
    before this checkpoint), or finite but beyond what float16 can hold (it would be written as
    inf), is refused, naming the tensor."""
    x = np.asarray(x, dtype=np.float32)
    if not (finite := np.isfinite(x)).all():
        raise ExportError(f"{name} holds {int((~finite).sum())} weight(s) that are NaN or inf (the run diverged before this "
                          f"checkpoint); export an earlier checkpoint (--checkpoint_path=RUN/checkpoints/STEP, or --which=best)")
    with np.errstate(over="ignore"):  # (said below)
        y = x.astype(dtype)
    if dtype == np.float16 and (over := np.isinf(y)).any():
        raise ExportError(f"{name} holds a weight of magnitude {float(np.abs(x[over]).max()):.6g}, beyond float16's largest "
                          f"{FLOAT16_MAX:g} (it would be written as inf); export with --dtype float32 (bfloat16 holds it too: "
                          f"convert that export)")
    return y


def _layers(params: dict) -> list[dict]:
    """Per-layer pure dicts from the scanned layout (leading L axis)."""
    import jax

    layers = params["blocks"]["layers"]
    n = len(jax.tree.leaves(layers)[0])
    return [jax.tree.map(lambda a, i=i: np.asarray(a[i]), layers) for i in range(n)]


# --- GPT-2 (vanilla) <-> Hugging Face GPT2LMHeadModel ------------------------------------------------


# The model keys each layout was written for (besides ModelConfig's own: sizes, dtypes, execution).
LAYOUT_KEYS = {"vanilla": {"n_head", "head_dim", "d_ff", "bias"}, "modern": {"n_head", "head_dim", "n_kv_head", "d_ff", "rope_base"}}


def check_known_options(mcfg, layout: str) -> None:
    """Refuse a model key the layout was not written for, set to other than its default: an option
    added to the architecture since (to try an idea: `qk_norm=True`, another activation) would be
    exported as the model without it, which computes something else, with no word said."""
    known = {f.name for f in dataclasses.fields(ModelConfig)} | LAYOUT_KEYS[mcfg.arch]
    for f in dataclasses.fields(mcfg):
        value = getattr(mcfg, f.name)
        if f.name not in known and (f.default is dataclasses.MISSING or value != f.default):
            keep = "" if f.default is dataclasses.MISSING else f" (a model with model.{f.name}={f.default!r} exports)"
            raise ExportError(f"model.{f.name}={value!r} is an option the {layout} layout does not hold: its tensors there are a "
                              f"model without it, which computes something else; teach llmjax/export.py the option first{keep}")


def check_gpt2(mcfg) -> None:
    if mcfg.arch != "vanilla":
        raise ExportError(f"the Hugging Face GPT-2 layout holds `vanilla` models, not `{mcfg.arch}`; supported: {SUPPORTED}")
    check_known_options(mcfg, "Hugging Face GPT-2")
    if not mcfg.bias or mcfg.n_head * mcfg.head_dim != mcfg.d_model:
        raise ExportError("Hugging Face GPT-2 needs model.bias=True and n_head * head_dim == d_model")


def gpt2_config(mcfg) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": mcfg.vocab_size, "n_positions": mcfg.context_len,
        "n_ctx": mcfg.context_len, "n_embd": mcfg.d_model, "n_layer": mcfg.n_layer, "n_head": mcfg.n_head, "n_inner": mcfg.d_ff,
        "activation_function": "gelu_new", "layer_norm_epsilon": mcfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "initializer_range": mcfg.init_std, "bos_token_id": 50256, "eos_token_id": 50256,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def gpt2_tensors(params: dict, mcfg, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF GPT2LMHeadModel tensors (prefix `transformer.`) of a scanned-layout parameter tree."""
    check_gpt2(mcfg)
    t = {"transformer.wte.weight": params["embed"]["embedding"][: mcfg.vocab_size], "transformer.wpe.weight": params["pos_embed"]["embedding"],
         "transformer.ln_f.weight": params["norm_f"]["scale"], "transformer.ln_f.bias": params["norm_f"]["bias"]}
    for i, L in enumerate(_layers(params)):
        p = f"transformer.h.{i}."
        t.update({
            p + "ln_1.weight": L["norm_1"]["scale"], p + "ln_1.bias": L["norm_1"]["bias"],
            p + "attn.c_attn.weight": L["attn"]["qkv_proj"]["kernel"], p + "attn.c_attn.bias": L["attn"]["qkv_proj"]["bias"],
            p + "attn.c_proj.weight": L["attn"]["o_proj"]["kernel"], p + "attn.c_proj.bias": L["attn"]["o_proj"]["bias"],
            p + "ln_2.weight": L["norm_2"]["scale"], p + "ln_2.bias": L["norm_2"]["bias"],
            p + "mlp.c_fc.weight": L["mlp"]["fc"]["kernel"], p + "mlp.c_fc.bias": L["mlp"]["fc"]["bias"],
            p + "mlp.c_proj.weight": L["mlp"]["proj"]["kernel"], p + "mlp.c_proj.bias": L["mlp"]["proj"]["bias"],
        })
    return {k: _cast(k, v, dtype) for k, v in t.items()}


def params_from_gpt2(tensors: dict[str, np.ndarray], mcfg, *, crop: bool = False) -> dict:
    """A scanned-layout float32 parameter tree for `mcfg` (vanilla) from HF GPT-2 tensors (with or
    without the `transformer.` prefix; OpenAI's files have none). Padded vocabulary rows are zero.
    `crop` (train.init_from): a model.context_len below the weights' positions keeps the position
    table's first context_len rows (nanoGPT's `crop_block_size`); a longer one is refused."""
    check_gpt2(mcfg)
    t = {k.removeprefix("transformer."): np.asarray(v, np.float32) for k, v in tensors.items()}

    def get(name, shape):
        if name not in t:
            raise ExportError(f"the GPT-2 weights have no tensor '{name}'; is this a GPT-2 checkpoint?")
        if t[name].shape != shape:
            raise ExportError(f"GPT-2 tensor '{name}' has shape {t[name].shape}, the config wants {shape}; "
                              "pick the matching config (configs/vanilla.py, :medium, :large, :xl)")
        return t[name]

    D, F, V, L = mcfg.d_model, mcfg.d_ff, mcfg.vocab_size, mcfg.n_layer
    if "lm_head.weight" in t and "wte.weight" in t and not np.array_equal(t["lm_head.weight"], t["wte.weight"]):
        raise ExportError("the GPT-2 weights have an output head (lm_head.weight) of their own, not tied to the token table "
                          "(wte.weight); llmjax's `vanilla` ties them, as GPT-2 does, and would compute another model")
    if f"h.{L}.ln_1.weight" in t:
        raise ExportError(f"the GPT-2 weights have more than model.n_layer={L} layers; pick the matching config")
    # (fewer layers said "no tensor 'h.2.ln_1.weight'; is this a GPT-2 checkpoint?" of GPT-2 weights)
    if 0 < (n := next(i for i in range(L + 1) if f"h.{i}.ln_1.weight" not in t)) < L:
        raise ExportError(f"the GPT-2 weights have {n} layers, fewer than model.n_layer={L}; pick the matching config "
                          f"(configs/vanilla.py, :medium, :large, :xl) or set --config.model.n_layer={n}")
    # (a character-level config was told to "pick the matching config (configs/vanilla.py, ...)": its vocabulary is what differs)
    if (w := t.get("wte.weight")) is not None and w.ndim == 2 and w.shape[1] == D and w.shape[0] != V:
        if w.shape[0] != 50257:
            raise ExportError(f"the GPT-2 weights' token table (wte.weight) holds {w.shape[0]} tokens; llmjax reads GPT-2 weights with "
                              "GPT-2's BPE vocabulary (50257 tokens)")
        raise ExportError(f"the GPT-2 weights' token table (wte.weight) holds GPT-2's 50257 BPE tokens, the config's model.vocab_size={V}: "
                          "train on GPT-2 BPE tokens, e.g. --config.data.dataset=tinyshakespeare --config.model.vocab_size=50257 "
                          "--config.model.padded_vocab_size=50304")
    wte = np.zeros((mcfg.padded_vocab_size, D), np.float32)
    wte[:V] = get("wte.weight", (V, D))

    def layer(i):
        p = f"h.{i}."
        return {
            "norm_1": {"scale": get(p + "ln_1.weight", (D,)), "bias": get(p + "ln_1.bias", (D,))},
            "attn": {"qkv_proj": {"kernel": get(p + "attn.c_attn.weight", (D, 3 * D)), "bias": get(p + "attn.c_attn.bias", (3 * D,))},
                     "o_proj": {"kernel": get(p + "attn.c_proj.weight", (D, D)), "bias": get(p + "attn.c_proj.bias", (D,))}},
            "norm_2": {"scale": get(p + "ln_2.weight", (D,)), "bias": get(p + "ln_2.bias", (D,))},
            "mlp": {"fc": {"kernel": get(p + "mlp.c_fc.weight", (D, F)), "bias": get(p + "mlp.c_fc.bias", (F,))},
                    "proj": {"kernel": get(p + "mlp.c_proj.weight", (F, D)), "bias": get(p + "mlp.c_proj.bias", (D,))}},
        }

    def positions():  # train.init_from (crop): a shorter context keeps the first rows, as nanoGPT's crop_block_size
        T, w = mcfg.context_len, t.get("wpe.weight")
        if crop and w is not None and w.ndim == 2 and w.shape[0] < T:
            raise ExportError(f"the GPT-2 weights hold {w.shape[0]} positions (wpe.weight), fewer than model.context_len={T}; "
                              f"set --config.model.context_len={w.shape[0]} or lower")
        rows = w.shape[0] if crop and w is not None and w.ndim == 2 else T
        return get("wpe.weight", (rows, D))[:T]

    import jax

    layers = jax.tree.map(lambda *a: np.stack(a), *[layer(i) for i in range(L)])  # the scanned layout: a leading L axis
    return {
        "embed": {"embedding": wte},
        "pos_embed": {"embedding": positions()},
        "blocks": {"layers": layers},
        "norm_f": {"scale": get("ln_f.weight", (D,)), "bias": get("ln_f.bias", (D,))},
    }


def read_gpt2(source: str, mcfg=None) -> dict[str, np.ndarray]:
    """GPT-2 tensors from a hub name (gpt2, gpt2-medium, ...), a local HF folder or a .safetensors file;
    with `mcfg` (train.init_from's model), the source's config.json, where it has one, must describe
    the same heads and norm epsilon (`check_hf_matches`: the tensors' shapes do not show them)."""
    try:
        return _read_gpt2(source, mcfg)
    except OSError as e:  # (a source under a folder one may not enter: pathlib passes EACCES on, a PermissionError's traceback)
        raise ExportError(f"cannot read {source}: {e.strerror or e}{f' ({e.filename})' if getattr(e, 'filename', None) else ''}") from None


def _read_gpt2(source: str, mcfg) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ExportError("importing GPT-2 weights needs safetensors and huggingface_hub: bash scripts/setup.sh hf") from None
    if mcfg is not None:  # (the layout before the config.json's heads: a `modern` config was told to set GPT-2's heads first)
        if mcfg.arch != "vanilla":
            raise ExportError(f"GPT-2 weights are a `vanilla` model, not `{mcfg.arch}`: start from them with configs/vanilla.py "
                              "(:medium, :large, :xl for the larger GPT-2s)")
        check_gpt2(mcfg)
    path = Path(source).expanduser()
    if source in HUB_MODELS and not path.exists():  # (a local run or folder of that name is the user's)
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            raise ExportError("downloading GPT-2 weights needs huggingface_hub: bash scripts/setup.sh hf") from None
        try:
            path = _hub_file(source, "model.safetensors")
        except Exception as e:  # network and hub errors come in many types
            if type(e).__name__ == "LocalEntryNotFoundError":  # (offline, nothing cached: the hub's words were cut at 200 characters)
                raise ExportError(f"cannot download {HUB_MODELS[source]}: the Hugging Face hub cannot be reached (offline?) and its cache "
                                  "holds no copy; connect, or pass a local folder or .safetensors file instead") from None
            raise ExportError(f"cannot download {HUB_MODELS[source]} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                              "pass a local folder or .safetensors file instead") from None
        try:  # (its config.json, for the check below; the weights cached by an earlier version alone still read offline)
            hf = json.loads(_hub_file(source, "config.json").read_text()) if mcfg is not None else None
        except Exception:  # noqa: BLE001 (OpenAI's GPT-2 configs: 64-wide heads, epsilon 1e-5, as the vanilla configs)
            hf = None
        if isinstance(hf, dict):
            check_hf_matches(hf, mcfg, f"{HUB_MODELS[source]}'s config.json")
    elif path.is_dir():
        try:  # (a folder's config, where it has one: train.init_from reads only the tensors)
            hf = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            hf = None
        weights = f"GPT-2 weights are {', '.join(HUB_MODELS)}, a Hugging Face GPT-2 folder or a .safetensors file"
        if (path / "checkpoints").is_dir() or (isinstance(hf, dict) and isinstance(hf.get("model"), dict)):
            # (its config.json was read as GPT-2's with GPT-2 small's defaults: "set --config.model.n_head=12 ...")
            raise ExportError(f"'{source}' is an llmjax training run, not GPT-2 weights; {weights} (a `vanilla` run exported "
                              f"with `python -m llmjax.export --format safetensors` is one)")
        if isinstance(hf, dict) and hf.get("model_type", "gpt2") != "gpt2":
            raise ExportError(f"'{source}' is a Hugging Face '{hf['model_type']}' model folder, not GPT-2; {weights}")
        if isinstance(hf, dict):
            check_hf_gpt2(hf, f"{source}/config.json")
            if mcfg is not None:
                check_hf_matches(hf, mcfg, f"{source}/config.json")
        path = path / "model.safetensors"
    if not path.is_file():
        raise ExportError(f"'{source}' is neither {', '.join(HUB_MODELS)} nor a .safetensors file or a Hugging Face GPT-2 folder "
                          "(holding model.safetensors)")
    try:
        return load_file(str(path))
    except Exception as e:
        raise ExportError(f"cannot read {path} as safetensors ({type(e).__name__}: {e})") from None


def is_gpt2_source(path) -> bool:
    """A hub name (gpt2, gpt2-medium, ...) with no local path of that name, or a Hugging Face GPT-2
    folder (config.json model_type gpt2)."""
    if str(path) in HUB_MODELS and not Path(path).expanduser().exists():
        return True
    cfg = Path(path).expanduser() / "config.json"
    try:
        hf = json.loads(cfg.read_text()) if cfg.is_file() else None
    except (OSError, ValueError):
        return False
    return isinstance(hf, dict) and hf.get("model_type") == "gpt2" and not (Path(path) / "checkpoints").is_dir()


# transformers' GPT-2 options whose values other than GPT-2's change what the model computes (llmjax's
# `vanilla` is GPT-2's math only); the tanh-GELU has three names there
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def check_hf_gpt2(hf: dict, where) -> None:
    """Refuse (one line) a Hugging Face GPT-2 config that llmjax would read as another model: another
    vocabulary than GPT-2's BPE (its tokenizer is the one llmjax uses), another activation,
    attention scaled otherwise, or an output head not tied to the token table (transformers then
    reads `lm_head.weight`, which llmjax's tied head would ignore)."""
    V = hf.get("vocab_size", 50257)
    if V != 50257:
        raise ExportError(f"{where} has vocab_size={V}; llmjax reads Hugging Face GPT-2 models with GPT-2's BPE vocabulary (50257 tokens)")
    bad = [f"{k}={hf[k]!r}" for k, ok in (("activation_function", lambda v: v in GPT2_TANH_GELUS), ("scale_attn_weights", lambda v: v is True),
                                          ("scale_attn_by_inverse_layer_idx", lambda v: v is False),
                                          ("tie_word_embeddings", lambda v: v is True)) if k in hf and not ok(hf[k])]
    if bad:
        raise ExportError(f"{where} is a GPT-2 variant llmjax's `vanilla` does not compute ({', '.join(bad)}); it reads GPT-2's own "
                          f"(tanh-GELU {'/'.join(GPT2_TANH_GELUS)}, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, "
                          f"tie_word_embeddings=True)")


def check_hf_matches(hf: dict, mcfg, where) -> None:
    """Refuse (one line) a Hugging Face GPT-2 config whose heads or norm epsilon differ from `mcfg`'s
    (train.init_from's model): the tensors have the same shapes for 12 heads of 64 or 16 of 48, and
    another split, or epsilon, is another model."""
    theirs = gpt2_model_config(hf)
    bad = [(k, theirs[k], getattr(mcfg, k)) for k in ("n_head", "head_dim", "norm_eps") if theirs[k] != getattr(mcfg, k)]
    if bad:
        raise ExportError(f"{where} describes another model than the config ({', '.join(f'{k}={a!r}, the config {b!r}' for k, a, b in bad)}); "
                          f"set {' '.join(f'--config.model.{k}={a!r}' for k, a, _ in bad)} (or pick the matching config)")


def gpt2_model_config(hf: dict, dtype: str = "float32") -> dict:
    """The `vanilla` model keys of a Hugging Face GPT2Config (its defaults where a key is left out,
    as transformers reads it: GPT-2 small)."""
    D, H, V = hf.get("n_embd", 768), hf.get("n_head", 12), hf.get("vocab_size", 50257)
    return dict(arch="vanilla", vocab_size=V, padded_vocab_size=-(-V // 64) * 64,
                context_len=hf.get("n_positions", hf.get("n_ctx", 1024)), n_layer=hf.get("n_layer", 12), n_head=H, head_dim=D // H,
                d_model=D, d_ff=hf.get("n_inner") or 4 * D, bias=True, dtype=dtype, attention_impl="auto", scan_layers=True,
                remat="none", init_std=hf.get("initializer_range", 0.02), norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def load_gpt2(source, *, dtype: str | None = None, device=None, quantize: str | None = None, quantize_embeddings: bool = False,
              scan_layers: bool = False):
    """OpenAI GPT-2 (hub name or HF folder) as a `sample.Loaded`, for sampling and evaluation without
    a training run (and exporting again), with unrolled or scanned layers as `sample.load`."""
    import jax
    from flax import nnx

    from llmjax.config import model_config
    from llmjax.models.layers import convert_layer_layout
    from llmjax.registry import build_model
    from llmjax.sample import Loaded, inference_params
    from llmjax.tokenizer import GPT2Tokenizer

    tensors = read_gpt2(str(source))
    if str(source) in HUB_MODELS and not Path(source).expanduser().exists():
        hf = json.loads(_hub_file(str(source), "config.json").read_text())
    else:
        hf = json.loads((Path(source).expanduser() / "config.json").read_text())
    check_hf_gpt2(hf, f"{source}/config.json")
    mcfg = model_config(gpt2_model_config(hf, dtype or "float32"))
    params = convert_layer_layout(params_from_gpt2(tensors, mcfg), scan_layers)
    mcfg = mcfg.replace(scan_layers=scan_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(mcfg, seed=0)))
    params = jax.device_put(params, device or jax.devices()[0])
    if quantize not in (None, "", "none"):
        from llmjax import quant

        model = quant.apply(nnx.merge(graphdef, params), quantize, embeddings=quantize_embeddings)
    else:
        model = nnx.merge(graphdef, inference_params(params, mcfg.compute_dtype))
    config = {"model": gpt2_model_config(hf, mcfg.dtype), "source": str(source)}
    return Loaded(model=model, tokenizer=GPT2Tokenizer(), config=config, step=0, path=Path(str(source)))


# --- modern <-> Hugging Face Llama, and llama.cpp GGUF --------------------------------------------------


def check_llama(mcfg) -> None:
    if mcfg.arch != "modern":
        raise ExportError(f"the Llama layouts (Hugging Face, GGUF) hold `modern` models, not `{mcfg.arch}`; supported: {SUPPORTED}")
    check_known_options(mcfg, "Llama")


def llama_config(mcfg) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": mcfg.vocab_size, "hidden_size": mcfg.d_model,
        "intermediate_size": mcfg.d_ff, "num_hidden_layers": mcfg.n_layer, "num_attention_heads": mcfg.n_head,
        "num_key_value_heads": mcfg.n_kv_head, "head_dim": mcfg.head_dim, "max_position_embeddings": mcfg.context_len,
        "rms_norm_eps": mcfg.norm_eps, "rope_theta": mcfg.rope_base, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256,
        "initializer_range": mcfg.init_std, "torch_dtype": "float32",
    }


def _split_qkv(kernel, mcfg):
    H, K, hd = mcfg.n_head, mcfg.n_kv_head, mcfg.head_dim
    return kernel[:, : H * hd], kernel[:, H * hd : (H + K) * hd], kernel[:, (H + K) * hd :]


def llama_tensors(params: dict, mcfg, dtype=np.float32) -> dict[str, np.ndarray]:
    """HF LlamaForCausalLM tensors: torch Linear weights are (out, in), our kernels (in, out)."""
    check_llama(mcfg)
    t = {"model.embed_tokens.weight": params["embed"]["embedding"][: mcfg.vocab_size], "model.norm.weight": params["norm_f"]["scale"]}
    for i, L in enumerate(_layers(params)):
        p = f"model.layers.{i}."
        q, k, v = _split_qkv(L["attn"]["qkv_proj"]["kernel"], mcfg)
        t.update({
            p + "input_layernorm.weight": L["norm_1"]["scale"], p + "post_attention_layernorm.weight": L["norm_2"]["scale"],
            p + "self_attn.q_proj.weight": q.T, p + "self_attn.k_proj.weight": k.T, p + "self_attn.v_proj.weight": v.T,
            p + "self_attn.o_proj.weight": L["attn"]["o_proj"]["kernel"].T,
            p + "mlp.gate_proj.weight": L["mlp"]["gate"]["kernel"].T, p + "mlp.up_proj.weight": L["mlp"]["up"]["kernel"].T,
            p + "mlp.down_proj.weight": L["mlp"]["down"]["kernel"].T,
        })
    return {k: np.ascontiguousarray(_cast(k, v, dtype)) for k, v in t.items()}


def rotate_half_to_interleaved(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection (out, in) reordered from rotate-half pairs (i, i + d/2) to adjacent
    pairs (2i, 2i + 1), llama.cpp's rotary layout (the permutation of its HF converter)."""
    out, d_in = w_out_in.shape
    hd = out // n_heads
    return w_out_in.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def interleaved_to_rotate_half(w_out_in: np.ndarray, n_heads: int) -> np.ndarray:
    out, d_in = w_out_in.shape
    hd = out // n_heads
    return w_out_in.reshape(n_heads, hd // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


GGUF_NAMES = {  # HF Llama name (per layer) -> llama.cpp name
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensors(params: dict, mcfg, dtype=np.float32) -> dict[str, np.ndarray]:
    """llama.cpp tensor names and layouts (numpy shapes as torch's: (out, in)); matrices in `dtype`,
    1-D tensors (the norms) float32, as llama.cpp's converter keeps them (taken from the float32
    weights: not rounded to `dtype` on the way)."""
    hf = llama_tensors(params, mcfg, np.float32)
    out = {"token_embd.weight": hf.pop("model.embed_tokens.weight"), "output_norm.weight": hf.pop("model.norm.weight")}
    for name, w in hf.items():
        i, rest = name.removeprefix("model.layers.").split(".", 1)
        if rest == "self_attn.q_proj.weight":
            w = rotate_half_to_interleaved(w, mcfg.n_head)
        elif rest == "self_attn.k_proj.weight":
            w = rotate_half_to_interleaved(w, mcfg.n_kv_head)
        out[f"blk.{i}.{GGUF_NAMES[rest]}"] = np.ascontiguousarray(w)
    return {k: (v if v.ndim == 1 else _cast(k, v, dtype)) for k, v in out.items()}  # (llama_tensors checked them all)


def write_gguf(params: dict, mcfg, tokenizer, path: Path, dtype=np.float32, name: str = "llmjax-modern") -> None:
    try:
        import gguf
    except ImportError:
        raise ExportError("GGUF export needs the gguf package: bash scripts/setup.sh hf") from None
    if getattr(tokenizer, "eot_id", None) != 50256:
        raise ExportError("GGUF export embeds the GPT-2 BPE tokenizer; this model has another vocabulary"
                          " (a character-level run cannot be exported: train a GPT-2 BPE one, e.g. --config.data.dataset=tinyshakespeare --config.model.vocab_size=50257 --config.model.padded_vocab_size=50304)")
    check_llama(mcfg)
    tensors = gguf_tensors(params, mcfg, dtype)  # (a weight float16 cannot hold is refused here)
    path.parent.mkdir(parents=True, exist_ok=True)  # (after the checks: a refused export leaves no folder)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_gguf(gguf, tensors, mcfg, tokenizer, tmp, dtype, name)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # (a failed write leaves nothing behind)


def _write_gguf(gguf, tensors: dict, mcfg, tokenizer, tmp: Path, dtype, name: str) -> None:
    encoder = json.loads((ASSETS / "gpt2" / "encoder.json").read_text(encoding="utf-8"))
    tokens = [t for t, _ in sorted(encoder.items(), key=lambda kv: kv[1])]
    merges = [line for line in (ASSETS / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    w.add_name(name)
    w.add_string(GGUF_MARK, "1")  # (what check_export_gguf tells an earlier export by: before the vocabulary, read first)
    w.add_context_length(mcfg.context_len)
    w.add_embedding_length(mcfg.d_model)
    w.add_block_count(mcfg.n_layer)
    w.add_feed_forward_length(mcfg.d_ff)
    w.add_head_count(mcfg.n_head)
    w.add_head_count_kv(mcfg.n_kv_head)
    w.add_key_length(mcfg.head_dim)
    w.add_value_length(mcfg.head_dim)
    w.add_rope_dimension_count(mcfg.head_dim)
    w.add_rope_freq_base(float(mcfg.rope_base))
    w.add_layer_norm_rms_eps(float(mcfg.norm_eps))
    w.add_vocab_size(mcfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i == 50256 else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(50256)
    w.add_eos_token_id(50256)
    w.add_add_bos_token(False)
    for tname, arr in tensors.items():
        w.add_tensor(tname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- writing ----------------------------------------------------------------------------------------


DTYPES = {"float32": np.float32, "float16": np.float16}


def export(checkpoint, fmt: str, out, *, which: str = "latest", dtype: str = "float32") -> Path:
    """Write a run's checkpoint as `fmt` (safetensors | gguf) at `out`; returns the path written."""
    from llmjax.sample import load

    if fmt not in ("safetensors", "gguf"):
        raise ExportError(f"unknown format '{fmt}'; supported: {SUPPORTED}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be float32 or float16 (bfloat16 has no NumPy type; export float32 and convert), got {dtype}")
    out = os.path.expanduser(str(out))  # (`--out=~/x` reaches us unexpanded, as --checkpoint=~/... does, which load expands)
    gguf_path = Path(out) if str(out).endswith(".gguf") else Path(f"{out}.gguf")

    def cannot_write(e: OSError) -> ExportError:
        return ExportError(f"cannot write {gguf_path if fmt == 'gguf' else out}: {e.strerror or e}"
                           f"{f' ({e.filename})' if getattr(e, 'filename', None) else ''}; nothing was replaced")

    try:  # (a place that cannot even be looked at, under a folder one may not enter, was a PermissionError's traceback)
        if fmt == "gguf" and (str(out).endswith(os.sep) or Path(out).is_dir() or gguf_path.is_dir()):  # (said before loading)
            raise ExportError(f"--out {out} is a folder; give the .gguf file's name, e.g. {Path(out) / 'model.gguf'}")
        if fmt == "gguf":
            if gguf_path.is_symlink():  # (an earlier export reached by a link: replaced where it lies, the link kept)
                gguf_path = gguf_path.resolve()
            check_export_gguf(gguf_path)
        if fmt == "safetensors":
            if Path(out).is_symlink():  # (an earlier export reached by a link: replaced where it lies, the link kept)
                out = Path(out).resolve()
            check_export_folder(Path(out))
    except OSError as e:
        raise cannot_write(e) from None
    loaded = load(checkpoint, which, dtype="float32", scan_layers=True)
    try:
        return _write(loaded, fmt, Path(out), gguf_path, DTYPES[dtype], dtype)
    except OSError as e:  # (also safetensors' own error, below): a full disk, an unwritable place, a file in the way
        raise cannot_write(e) from None


def _write(loaded, fmt: str, out: Path, gguf_path: Path, np_dtype, dtype: str) -> Path:
    import jax
    from flax import nnx

    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param)))
    mcfg = loaded.model.cfg
    if fmt == "gguf":
        check_llama(mcfg)
        write_gguf(params, mcfg, loaded.tokenizer, gguf_path, np_dtype, name=loaded.path.name)
        return gguf_path
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ExportError("safetensors export needs the safetensors package: bash scripts/setup.sh hf") from None
    if mcfg.arch not in ("vanilla", "modern"):  # (first: no setting, the vocabulary's included, makes it exportable)
        raise ExportError(f"no Hugging Face layout for `{mcfg.arch}`; supported: {SUPPORTED}")
    if loaded.tokenizer.eot_id != 50256:  # (next: no other setting can make such a model exportable)
        raise ExportError("Hugging Face export ships the GPT-2 BPE tokenizer; this model has another vocabulary"
                          " (a character-level run cannot be exported: train a GPT-2 BPE one, e.g. --config.data.dataset=tinyshakespeare --config.model.vocab_size=50257 --config.model.padded_vocab_size=50304)")
    if mcfg.arch == "vanilla":
        tensors, config = gpt2_tensors(params, mcfg, np_dtype), gpt2_config(mcfg)
    else:
        tensors, config = llama_tensors(params, mcfg, np_dtype), llama_config(mcfg)
    config["torch_dtype"] = dtype
    from llmjax.data import umask

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        try:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        except Exception as e:  # safetensors' SafetensorError (a full disk: "File too large (os error 27)")
            if type(e).__name__ != "SafetensorError":
                raise
            raise OSError(str(e)) from None
        os.chmod(tmp / "model.safetensors", 0o666 & ~umask())  # (safetensors writes it 0600)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "vocab.json").write_bytes((ASSETS / "gpt2" / "encoder.json").read_bytes())
        (tmp / "merges.txt").write_bytes((ASSETS / "gpt2" / "vocab.bpe").read_bytes())
        (tmp / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": mcfg.context_len, "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}, indent=2))
        os.chmod(tmp, 0o777 & ~umask())  # (mkdtemp makes it 0700)
        if out.exists():  # an earlier export (check_export_folder): swapped for the new one
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.replace(old)
            try:
                tmp.replace(out)
            except OSError:
                old.replace(out)  # (the earlier export back in its place)
                raise
            shutil.rmtree(old)
        else:
            tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


EXPORT_FILES = {"model.safetensors", "config.json", "vocab.json", "merges.txt", "tokenizer_config.json"}


def gguf_strings(path: Path, keys) -> dict[str, str | int]:
    """The string (and uint32) values of `keys` in a (little-endian) GGUF file's metadata, read only as far as the
    last of them: gguf's GGUFReader parses every field and tensor first, 3 s for an export's
    50,257-token vocabulary and 50,000 merges (ours come after these keys). ValueError: not such a
    GGUF file, or cut short."""
    import struct

    from gguf import GGUF_MAGIC, GGUFValueType as T

    sizes = {T.UINT8: 1, T.INT8: 1, T.BOOL: 1, T.UINT16: 2, T.INT16: 2, T.UINT32: 4, T.INT32: 4, T.FLOAT32: 4, T.UINT64: 8,
             T.INT64: 8, T.FLOAT64: 8}
    want, found = set(keys), {}
    with open(path, "rb") as f:
        def read(fmt: str) -> tuple:
            data = f.read(struct.calcsize(fmt))
            if len(data) != struct.calcsize(fmt):
                raise ValueError(f"{path} is cut short")
            return struct.unpack(fmt, data)

        def string() -> bytes:
            (n,) = read("<Q")
            data = f.read(n)
            if len(data) != n:
                raise ValueError(f"{path} is cut short")
            return data

        def skip(kind: int) -> None:
            if kind == T.STRING:
                string()
            elif kind == T.ARRAY:
                item, count = read("<IQ")
                if item in sizes:
                    f.seek(sizes[item] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(item)
            elif kind in sizes:
                f.seek(sizes[kind], os.SEEK_CUR)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")

        magic, version = read("<II")
        if magic != GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"{path} is not a GGUF file (version 2 or 3, little-endian)")
        _, kv_count = read("<QQ")
        for _ in range(kv_count):
            key = string().decode("utf-8", "replace")
            (kind,) = read("<I")
            if key in want and kind in (T.STRING, T.UINT32):  # (a uint32: general.file_type)
                found[key] = string().decode("utf-8", "replace") if kind == T.STRING else read("<I")[0]
                if len(found) == len(want):
                    break
            else:
                skip(kind)
    return found


# A metadata key of llmjax's own in every GGUF it writes: architecture `llama` with the GPT-2 BPE
# tokenizer alone is also what llama.cpp's conversion of an exported model holds, which an export
# to its name wrote over.
GGUF_MARK = "llmjax.export"
EXPORT_FILE_TYPES = (0, 1)  # general.file_type of an export: gguf.LlamaFileType.ALL_F32, MOSTLY_F16


def check_export_gguf(path: Path) -> None:
    """Refuse a .gguf --out that exists and is not an earlier llmjax export (a GGUF of architecture
    `llama` with the GPT-2 BPE tokenizer embedded and GGUF_MARK, as `_write_gguf` writes): nothing
    else is overwritten."""
    if not path.exists():
        return
    keys = ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre", GGUF_MARK, "general.file_type")
    try:
        values = gguf_strings(path, keys)
        # (and a file type an export writes: llama.cpp's quantize copies every key, the mark too, and sets its own type)
        ours = tuple(values.get(k) for k in keys[:4]) == ("llama", "gpt2", "gpt-2", "1") and values.get(keys[4]) in EXPORT_FILE_TYPES
    except Exception:  # noqa: BLE001 (not GGUF, cut short, or no gguf package: not provably an export)
        ours = False
    if not ours:
        raise ExportError(f"--out {path} is not an earlier llmjax export (another file, a GGUF of another source or file type, "
                          f"or an export from before 2026-12-07, which lacks the '{GGUF_MARK}' key); give a new name (or move that "
                          "file aside)")


def _is_earlier_export(out: Path) -> bool:
    """A folder that `_write` wrote: every file of EXPORT_FILES, a config.json of a model class it
    writes and its own tokenizer_config.json (a Hugging Face model folder has other tokenizer settings)."""
    try:
        cfg = json.loads((out / "config.json").read_text())
        tok = json.loads((out / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return ({p.name for p in out.iterdir()} == EXPORT_FILES and isinstance(cfg, dict) and isinstance(tok, dict)
            and cfg.get("architectures") in (["GPT2LMHeadModel"], ["LlamaForCausalLM"])
            and {k: v for k, v in tok.items() if k != "model_max_length"} == {
                "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "add_prefix_space": False})


def check_export_folder(out: Path) -> None:
    """Refuse an --out that is a file, a training run, or a folder holding anything but an earlier
    export (which a new export replaces): nothing else is overwritten."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder (a new one, or an earlier export's)")
    if not out.is_dir():
        return
    if out.resolve() == Path.cwd().resolve():  # (`--out .` was "PosixPath('.') has an empty name")
        raise ExportError(f"--out {out} is the folder you are in, which an export replaces whole (you would be left in a deleted "
                          f"folder); run it from another one (cd .. and --out {Path.cwd().name})")
    if (out / "checkpoints").exists() or _is_llmjax_run(out / "config.json"):
        raise ExportError(f"--out {out} is a training run; give another folder (an export there would replace its config.json)")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
    if others:
        raise ExportError(f"--out {out} holds other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                          "give a new folder or an earlier export's")
    if any(out.iterdir()) and not _is_earlier_export(out):
        raise ExportError(f"--out {out} holds a model that is not an earlier llmjax export; give a new folder or an earlier export's")


def _is_llmjax_run(cfg: Path) -> bool:
    try:
        return isinstance(json.loads(cfg.read_text()).get("model"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def define_flags():
    cli.define_checkpoint_flags()
    flags.adopt_module_key_flags(cli)  # (--help lists them with the tool's own flags)
    flags.DEFINE_string("format", None, "safetensors (HF GPT-2 for vanilla, HF Llama for modern) or gguf (llama.cpp, modern)")
    flags.DEFINE_string("out", None, "output folder (safetensors) or .gguf file")
    flags.DEFINE_string("dtype", "float32", "float32 or float16")


def main(argv):
    F = flags.FLAGS
    cli.start_run_reader(argv, "runs/NAME")
    if not F.format or not F.out:
        cli.fail("--format (safetensors or gguf) and --out are required")
    try:
        path = export(F.checkpoint_path, F.format, F.out, which=F.which, dtype=F.dtype)
    except (ExportError, ConfigError, ValueError) as e:  # (ValueError: the sampler's one-line checkpoint errors)
        cli.fail(str(e))
    print(path)
    sys.stdout.flush()


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    from absl import flags

    from llmjax import cli

    export = cli.tool("llmjax.export")
    export.define_flags()
    flags.adopt_module_key_flags(export)  # (--help lists the key flags of __main__, which defines none now)
    cli.run(export.main)
