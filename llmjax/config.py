"""Configs: the ConfigDict a run is described by, and the frozen dataclass a model is built from.

A config file in `configs/` holds values only: per variant, the model's every dimension, plus
whatever it changes of the shared `train`/`data`/`eval`/`logging` defaults below. It is picked as
`configs/modern.py:tiny` (no suffix means `default`), the ml_collections `config_flags` convention.

Model code never sees the ConfigDict: `model_config(cfg)` turns `cfg.model` into the frozen
dataclass registered for `cfg.model.arch`, and rejects unknown, missing or mistyped keys with one
line that names the closest valid key.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
import numbers
import traceback
from pathlib import Path
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp
import ml_collections

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
MATMUL_DTYPES = ("", "bfloat16")
ATTENTION_IMPLS = ("auto", "cudnn", "xla")
DECODE_KERNEL_IMPLS = ("auto", "xla", "pallas")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
VARIANTS = ("default", "small", "tiny")
INT_MAX = 2**31 - 1  # the largest model dimension, count or size a config may give


class ConfigError(ValueError):
    """A config problem a user can fix; its message is one line that says how."""


def closest(name: str, valid) -> str:
    """' (did you mean 'x'?)' for the nearest valid name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


# ---------------------------------------------------------------------------------------------
# The model dataclasses. Each architecture registers a subclass with its own fields.


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Fields every architecture has. All are required: config files write every dimension."""

    arch: str
    vocab_size: int  # tokenizer's vocabulary (50257 for GPT-2 BPE)
    padded_vocab_size: int  # rows allocated in the embedding (50304 = a multiple of 64)
    n_layer: int
    d_model: int
    context_len: int  # longest sequence the model is trained on / can decode to
    dtype: str  # compute dtype: float32 | bfloat16 | float16 (parameters are always float32)
    attention_impl: str  # auto | cudnn | xla (architectures with attention)
    scan_layers: bool  # True: one scanned layer (fast compile); False: unrolled Python loop
    remat: str  # none | full | dots | dots_no_batch (jax.checkpoint policies)
    init_std: float  # N(0, init_std) for weights; residual projections get init_std/sqrt(2*n_layer)
    norm_eps: float
    # Parameter matmuls' operand dtype when narrower than `dtype`: "" (the default) = `dtype`;
    # "bfloat16" with dtype float32 = bfloat16 operands, float32 accumulation and result, every
    # other operation in float32 (layers.narrow_matmul: ~1.7x the float32 dot rate on CPUs with AVX-512 BF16).
    matmul_dtype: str = ""
    # One decoded token's attention over the cache (models/decode_attention.py): auto = the fused
    # kernel on a GPU where the shapes fit, else xla (attention.cached_attention); pallas anywhere
    # (on a CPU in Pallas' interpreter: slow, for checking). Decoding only: training is unchanged.
    decode_attention_impl: str = "auto"
    # A decoded token's two norms per layer (the second with the residual add before it) as one
    # fused kernel each (models/decode_norm.py), every architecture: auto = on a GPU; xla; pallas.
    decode_norm_impl: str = "auto"
    # True where one decoded token's attention runs in a fused decode kernel (decode_attention_impl):
    # attention.Attention's plain softmax(q.k) v over a per-head key/value cache, or mla's latents;
    # False for a decode state of another kind (linformer, ssm) or attention with other scores (a
    # bias, a window): those refuse decode_attention_impl='pallas' rather than ignore it
    fused_decode_attention: ClassVar[bool] = True
    # the auxiliary losses the model returns (in `aux`, beside "stats"), which train.aux_loss_weights weighs
    aux_losses: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        for field in dataclasses.fields(self):  # (NaN passes every comparison below; NaN or inf logits, or a crash, follow)
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"model.{field.name} must be a finite number, got {value}")
            if isinstance(value, int) and not isinstance(value, bool) and value > INT_MAX:  # (beyond int64 it was a traceback)
                raise ConfigError(f"model.{field.name}={value} is too large: at most {INT_MAX} (2**31 - 1, as token ids and positions are int32)")
        if self.padded_vocab_size < self.vocab_size:
            raise ConfigError(
                f"model.padded_vocab_size={self.padded_vocab_size} is smaller than "
                f"model.vocab_size={self.vocab_size}; set it to vocab_size rounded up to a multiple of 64"
            )
        # (and the widths most architectures have: zero heads or a zero-width MLP would build a model
        # without them; a zero or negative rope_base or norm_eps gives NaN logits; init_std=0 gave all-zero
        # weights, whose gradients are zero too: a run that never trained, and a negative one is no N(0, std))
        for name in ("vocab_size", "n_layer", "d_model", "context_len", "norm_eps", "init_std", "n_head", "head_dim", "d_ff", "rope_base"):
            if getattr(self, name, 1) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype='{self.dtype}' is not one of {', '.join(DTYPES)}{closest(self.dtype, DTYPES)}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ConfigError(
                f"model.matmul_dtype='{self.matmul_dtype}' is not one of {', '.join(repr(d) for d in MATMUL_DTYPES)}"
                f"{closest(self.matmul_dtype, MATMUL_DTYPES)} ('' = model.dtype)"
            )
        if self.matmul_dtype and self.dtype not in ("float32", self.matmul_dtype):
            raise ConfigError(
                f"model.matmul_dtype='{self.matmul_dtype}' needs model.dtype='float32' (got '{self.dtype}'); "
                "with 16-bit compute the matmuls already run in model.dtype: leave matmul_dtype empty"
            )
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"model.attention_impl='{self.attention_impl}' is not one of {', '.join(ATTENTION_IMPLS)}"
                f"{closest(self.attention_impl, ATTENTION_IMPLS)}"
            )
        if self.decode_attention_impl not in DECODE_KERNEL_IMPLS:
            raise ConfigError(
                f"model.decode_attention_impl='{self.decode_attention_impl}' is not one of {', '.join(DECODE_KERNEL_IMPLS)}"
                f"{closest(self.decode_attention_impl, DECODE_KERNEL_IMPLS)}"
            )
        if self.decode_norm_impl not in DECODE_KERNEL_IMPLS:
            raise ConfigError(
                f"model.decode_norm_impl='{self.decode_norm_impl}' is not one of {', '.join(DECODE_KERNEL_IMPLS)}"
                f"{closest(self.decode_norm_impl, DECODE_KERNEL_IMPLS)}"
            )
        if self.decode_attention_impl == "pallas" and not self.fused_decode_attention:
            from llmjax.registry import ARCHS  # (registered by now: this config's class is)

            fused = ", ".join(sorted(a for a, cls in ARCHS.items() if cls.config_class.fused_decode_attention))
            raise ConfigError(
                f"model.decode_attention_impl='pallas' is for architectures whose decoded token attends over a cache in a fused "
                f"kernel ({fused}); {self.arch} decodes its own way: use 'auto' or 'xla'"
            )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(
                f"model.remat='{self.remat}' is not one of {', '.join(REMAT_POLICIES)}{closest(self.remat, REMAT_POLICIES)}"
            )

    def check_run(self) -> None:
        """Refusals for a config to train or measure (validate: train, compare, bench) that a saved
        run's model is still read with (sample, evaluate, export); architectures add theirs, after these.
        Here: the shapes the fused decode kernels need, where the config asks for them ('pallas').
        (The model refuses them at the first decoded token: a run trained every step before its
        end-of-run sample said so.)"""
        from llmjax.models import decode_attention, decode_norm  # (models import this module)

        if self.decode_norm_impl == "pallas" and decode_norm.unmet(self.d_model):
            raise ConfigError(f"model.decode_norm_impl='pallas' needs {' and '.join(decode_norm.unmet(self.d_model))}; use 'auto' or 'xla'")
        if self.decode_attention_impl == "pallas" and self.fused_decode_attention:
            unmet = self.decode_attention_unmet(decode_attention)
            if self.context_len % 16:  # (a decode cache holds a multiple of 64 slots, or the whole context)
                unmet.append(f"model.context_len a multiple of 16, the longest decode cache (got {self.context_len})")
            if unmet:
                raise ConfigError(f"model.decode_attention_impl='pallas' needs {' and '.join(unmet)}; use 'auto' or 'xla'")

    def decode_attention_unmet(self, decode_attention) -> list[str]:
        """What the fused decode attention kernel needs of this config that it lacks, the cache's
        length aside (an architecture with fused_decode_attention: per-head keys and values here)."""
        return decode_attention.unmet(self.head_dim, self.n_head // getattr(self, "n_kv_head", self.n_head), None)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def narrow_matmuls(self):
        """The dtype parameter matmuls round their operands to, when it differs from the compute
        dtype (matmul_dtype='bfloat16' with dtype='float32'); else None."""
        return DTYPES[self.matmul_dtype] if self.matmul_dtype and self.matmul_dtype != self.dtype else None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _check_type(cls_name: str, field: dataclasses.Field, value: Any) -> Any:
    want = field.type if isinstance(field.type, type) else {"int": int, "float": float, "bool": bool, "str": str}.get(
        str(field.type)
    )
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is not None and (not isinstance(value, want) or (want is int and isinstance(value, bool))):
        raise ConfigError(
            f"model.{field.name} for arch '{cls_name}' must be {want.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def model_config(cfg: ml_collections.ConfigDict | Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """The frozen dataclass for `cfg.model` (or a mapping of model keys), validated."""
    from llmjax.registry import get_arch  # the registry imports this module

    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(cfg, ml_collections.ConfigDict) and "model" in cfg:
        cfg = cfg.model
    values = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
    if "arch" not in values:
        raise ConfigError("model.arch is missing; set it to a registered architecture")
    cls = get_arch(values["arch"]).config_class
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            raise ConfigError(f"unknown key 'model.{key}' for arch '{values['arch']}'{closest(key, fields)}")
    missing = [k for k, f in fields.items() if k not in values and f.default is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config for arch '{values['arch']}' is missing model key(s): {', '.join(missing)}")
    return cls(**{k: _check_type(values["arch"], fields[k], v) for k, v in values.items()})


# ---------------------------------------------------------------------------------------------
# The run config: shared groups, filled per variant, then overridden by the arch's config file.


def recipe_of(variant: str) -> str:
    """The variant whose shared defaults `variant` gets: `small` and `tiny` (and a variant of one's
    own named after one of them, `small_qknorm` or `tiny-wide`: an idea tried on that shape trains
    on its recipe), else `default` (the GPU recipe; also vanilla's medium, large and xl)."""
    for base in ("small", "tiny"):
        if variant == base or (variant.startswith(base) and variant[len(base)] in "_-"):
            return base
    return "default"


def _shared_groups(variant: str) -> dict[str, dict[str, Any]]:
    """data/train/eval/logging defaults. `default` is the GPU (GPT-2-small scale) recipe; `small` and
    `tiny` train on CPU, on the character-level Shakespeare that ships with the repo (see recipe_of)."""
    variant = recipe_of(variant)
    gpu = variant not in ("small", "tiny")  # default and the larger shapes: the GPU recipe
    return dict(
        data=dict(
            dataset="fineweb_edu" if gpu else "tinyshakespeare_char",
            dir="data",  # LLMJAX_DATA_DIR overrides it
        ),
        train=dict(
            seed=0,
            batch_size=16 if gpu else (32 if variant == "small" else 8),
            grad_accum_steps=1,
            max_steps=5000 if gpu else (2000 if variant == "small" else 50),
            stop_at_step=0,  # 0: run to max_steps
            lr=6e-4 if gpu else 1e-3,
            min_lr=6e-5 if gpu else 1e-4,
            warmup_steps=700 if gpu else (100 if variant == "small" else 5),
            # the learning rate after warm-up: cosine (decay to min_lr at max_steps), wsd (warmup-stable-
            # decay: lr until the last decay_fraction of max_steps, then linear to min_lr) or constant (lr)
            schedule="cosine",
            decay_fraction=0.2,  # wsd: the share of max_steps its decay takes
            weight_decay=0.1,
            decay_params=",".join(DECAYED),  # the parameters (by name) AdamW's weight decay applies to
            beta1=0.9,
            beta2=0.95 if gpu else 0.99,
            grad_clip=1.0,
            deterministic=False,  # GPU: compile the steps with XLA's deterministic ops (no order-dependent atomic sums; slower)
            loss_chunks=0,  # the loss over this many slices of the vocabulary: the logits are never whole (less memory, one more head matmul); 0: off
            # the training loss's logits: auto = model.dtype (bf16 with bf16 compute, as PyTorch's autocast
            # gives nanoGPT: half the logits' memory and traffic), float32, or bfloat16; the loss itself is float32
            logits_dtype="auto",
            # float16 training's loss scaling: auto = dynamic with model.dtype=float16, else none; dynamic
            # (PyTorch's GradScaler: 2**15, halved on an overflow, whose update is skipped, doubled after
            # 2000 finite steps); none; or a positive number, a static scale (an overflow stops the run)
            loss_scale="auto",
            log_every_steps=10,
            checkpoint_every_steps=1000 if gpu else 250,
            keep_checkpoints=3,
            mesh=dict(data=-1, fsdp=1, expert=1),  # device mesh; one axis may be -1 (all remaining devices)
            peak_flops_per_device=0.0,  # for MFU; 0: look the device up (H100/H200 989e12, their PCIe/NVL forms 756e12/835e12, A100 312e12)
            aux_loss_weights={},  # weight of each auxiliary loss the model returns (MoE router, ...)
            init_from="",  # start a fresh run from OpenAI GPT-2 weights: gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a local HF folder or .safetensors (vanilla)
        ),
        eval=dict(
            every_steps=250,
            num_batches=20,  # batches of random windows per periodic estimate (the last step: see final_num_batches)
            # the last step's validation loss over the split's first N batches (0: the whole split; tiny: 20,
            # since its whole split, ~220 batches, took longer than its 50 training steps)
            final_num_batches=20 if variant == "tiny" else 0,
            sample_tokens=200,  # a sample printed at the end of training (0: none)
            tasks="",  # downstream tasks scored in the loop: comma-separated hellaswag, arc_easy ("": none)
            tasks_every_steps=0,  # score them every N steps (0: at the last step only)
            tasks_limit=0,  # the first N items of each task (0: all)
            tasks_batch_size=32,  # sequences per forward pass (global; divisible by the devices)
            tasks_dir="",  # where the task files are or are downloaded to ("": $LLMJAX_TASK_DIR or ~/.cache/llmjax/tasks)
        ),
        logging=dict(
            wandb=False,  # credentials from .env: WANDB_API_KEY, WANDB_PROJECT_NAME, WANDB_ENTITY
            wandb_project="llmjax",
            progress_bar=True,
        ),
    )


def make_config(variant: str, models: Mapping[str, Mapping[str, Any]], **group_overrides) -> ml_collections.ConfigDict:
    """The ConfigDict for one variant of an architecture's config file.

    `models` maps each variant name to its complete `model` group; `group_overrides` maps a group name
    (train, data, eval, logging) to {variant: {key: value}} changes of the shared defaults.
    """
    variant = variant or "default"  # (`configs/modern.py:`, an empty suffix: none means default)
    if variant not in models:
        raise ConfigError(f"unknown variant '{variant}'; choose one of {', '.join(models)}{closest(variant, models)}")
    groups = _shared_groups(variant)
    for group, per_variant in group_overrides.items():
        if group not in groups:
            raise ConfigError(f"unknown config group '{group}'{closest(group, groups)}")
        for name in per_variant:  # (a typo'd variant's changes were dropped: the run used the shared defaults, silently)
            if name not in models:
                raise ConfigError(f"make_config's {group} changes name variant '{name}', which is not in its models "
                                  f"({', '.join(models)}){closest(name, models)}")
        for key, value in per_variant.get(variant, {}).items():
            if key not in groups[group]:
                raise ConfigError(f"unknown key '{group}.{key}'{closest(key, groups[group])}")
            groups[group][key] = value
    cfg = ml_collections.ConfigDict({"model": {**model_defaults(models[variant].get("arch")), **models[variant]}, **groups})
    return cfg


def model_defaults(arch: str | None) -> dict[str, Any]:
    """The model keys that have a default (optional in config files; present in every ConfigDict,
    so `--config.model.KEY=...` can set them)."""
    from llmjax.registry import get_arch  # the registry imports this module

    try:
        cls = get_arch(arch).config_class
    except ConfigError:  # (an unknown arch is reported when the model is built)
        return {}
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


# Model keys that change how the computation runs, not what the parameters are: a run may resume
# with them changed (e.g. unrolled layers on a GPU after scanned ones on a CPU).
EXECUTION_KEYS = ("scan_layers", "remat", "attention_impl", "dtype", "matmul_dtype", "scan_impl", "scan_chunk", "moe_impl", "moe_block_rows",
                  "decode_attention_impl", "decode_norm_impl")


def model_changes(old: dict, new: dict) -> list[str]:
    """How two resolved configs' models differ ("model.KEY (old -> new)"), keys either side predates
    filled with their defaults (a run saved before a key existed, or a hand-built ConfigDict
    without an optional key) and the execution keys left out: what a resume must not change."""
    def filled(c: dict) -> dict:
        return {**model_defaults(c["model"].get("arch")), **c["model"]}

    return [d for d in config_diff(filled(old), filled(new), "model.") if d.split(" ")[0].removeprefix("model.") not in EXECUTION_KEYS]


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key} ({a} -> {b})")
    return diffs


def split_spec(spec: str) -> tuple[str, str]:
    """'configs/modern.py:tiny' -> ('configs/modern.py', 'tiny'); no suffix means 'default'."""
    path, _, variant = str(spec).partition(":")
    return path, variant or "default"


def _config_call(spec: str):
    """(get_config, the arguments to call it with, path, file) of a spec `path[:variant]`: a
    one-line ConfigError for a file that does not load or whose get_config cannot be called so."""
    path, variant = split_spec(spec)
    file = Path(path)
    if not file.is_file():
        whole = str(spec).rpartition(":")[0] if Path(str(spec).rpartition(":")[0]).is_file() else str(spec)
        if ":" in whole and Path(whole).is_file():  # (the path's own ':' taken for the variant's: "config file '/tmp/a' not found")
            raise ConfigError(f"config file '{whole}' has ':' in its path, which separates a config's variant (path:variant); "
                              "move or link it to a path without one")
        raise ConfigError(f"config file '{path}' not found; pass e.g. configs/modern.py or configs/modern.py:tiny")
    module_spec = importlib.util.spec_from_file_location(f"llmjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        # compiled from its source every time, no bytecode cache read or written: Python's cache holds
        # for a source of the same size and modification second, so a config rewritten within a
        # second at the same length (a script writing configs) was read as the one before
        exec(compile(file.read_bytes(), str(file), "exec", dont_inherit=True), module.__dict__)
    except ConfigError:
        raise
    except Exception as e:  # (a syntax error, a failed import: the user's file, so where in it and what)
        raise ConfigError(f"config file '{path}' does not load: {_where(e, file)}") from None
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"config file '{path}' has no get_config(variant) function")
    # config_flags calls get_config() without an argument when the spec has no ':variant' (and with
    # '' after a bare ':'); a file whose get_config takes none, nanodo's, works without a variant,
    # and one whose get_config(variant) needs one gets 'default' there, as the README's own form
    takes_none, takes_one = (_accepts(get_config, args) for args in ((), (variant,)))
    if not (takes_none or takes_one):
        raise ConfigError(f"config file '{path}': get_config must take at most one argument, the variant name")
    if ":" in str(spec) and not takes_one:
        raise ConfigError(f"config file '{path}': its get_config() takes no variant; drop ':{variant}' or give get_config a variant argument")
    args = () if ":" not in str(spec) and takes_none else (variant,)
    return get_config, args, path, file


def flags_spec(spec: str) -> str:
    """`spec` as config_flags (`--config`) must be given it to call get_config as load_config does:
    with ':default' added where the file's get_config(variant) has no default variant."""
    if ":" in str(spec):
        return str(spec)
    _, args, _, _ = _config_call(spec)
    return f"{spec}:{args[0]}" if args else str(spec)


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """Load `path[:variant]`, apply {'train.lr': 3e-4, ...} overrides, and validate every key."""
    get_config, args, path, file = _config_call(spec)
    try:
        cfg = get_config(*args)
    except ConfigError:
        raise
    except Exception as e:  # (the file's own code failed)
        raise ConfigError(f"config file '{path}': get_config({', '.join(map(repr, args))}) failed: {_where(e, file)}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"config file '{path}': get_config() returned {type(cfg).__name__}, not an ml_collections.ConfigDict; "
                          "build it with llmjax.config.make_config(variant, MODELS)")
    for key, value in (overrides or {}).items():
        set_key(cfg, key, value)
    validate(cfg)
    return cfg


def _accepts(fn, args: tuple) -> bool:
    """Whether fn can be called with these positional arguments (by its signature; True where it
    has none that inspect can read)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        sig.bind(*args)
    except TypeError:
        return False
    return True


def _where(error: BaseException, file: Path) -> str:
    """'SyntaxError: invalid syntax (line 3)': an exception raised by a config file's code, one line."""
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
    for frame in traceback.extract_tb(error.__traceback__):
        if Path(frame.filename).resolve() == file.resolve():
            line = frame.lineno
    text = (getattr(error, "msg", None) if isinstance(error, SyntaxError) else None) or str(error)
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text}" + (f" (line {line})" if line else "")


def _locate(cfg: ml_collections.ConfigDict, dotted: str):
    """(node, leaf) for 'a.b.leaf', or a one-line ConfigError naming the closest existing key."""
    *groups, leaf = dotted.split(".")
    node, seen = cfg, []
    for name in groups:
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            valid = node.keys() if isinstance(node, ml_collections.ConfigDict) else []
            raise ConfigError(f"unknown config key '{'.'.join(seen + [name])}'{closest(name, valid)}")
        node, seen = node[name], seen + [name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        valid = [".".join(seen + [k]) for k in node.keys()] if isinstance(node, ml_collections.ConfigDict) else []
        raise ConfigError(f"unknown config key '{dotted}'{closest(dotted, valid)}")
    return node, leaf


def check_key(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
    """cfg's value at 'group.key' (a ConfigDict for a group), or a one-line ConfigError when it is not in cfg."""
    node, leaf = _locate(cfg, dotted)
    return node[leaf]


def set_key(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """cfg['a.b'] = value, with a one-line error naming the closest key when 'a.b' does not exist."""
    node, leaf = _locate(cfg, dotted)
    if dotted == "train.loss_scale" and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # (a static scale given as a number: the key is a string, as the command line gives it)
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f"config key '{dotted}': {str(e).splitlines()[0]}") from None


def parse_value(cfg: ml_collections.ConfigDict, dotted: str, text: str) -> Any:
    """A `key=value` override's text (`--set` of llmjax.bench and llmjax.compare) as the key's value,
    parsed as `--config.key=value` parses it, by the type the key holds: a bool from true/false/1/0
    (any case), an int, a float, a string as written; anything else (a group, None) as a Python
    literal, as config_flags reads it (`{'data': 1, 'fsdp': 8}`), or JSON, else the text. A
    one-line ConfigError for text that is not of the key's type."""
    from absl import flags

    node, leaf = _locate(cfg, dotted)
    current = node[leaf]
    parser = {bool: flags.BooleanParser(), int: flags.IntegerParser(), float: flags.FloatParser()}.get(type(current))
    if isinstance(current, str):
        return text
    if parser is None:
        try:  # (config_flags' literal parse: true and false as Python's)
            return ast.literal_eval(text.capitalize() if text in ("true", "false") else text)
        except (SyntaxError, ValueError):
            pass
        try:  # (JSON's own forms too, {"wandb": true}: what --set read before)
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    try:
        return parser.parse(text)
    except ValueError:
        want = {bool: "true or false", int: "an integer", float: "a number"}[type(current)]
        raise ConfigError(f"{dotted}={text}: {dotted} takes {want}") from None


def _check_shared_type(key: str, default: Any, value: Any) -> None:
    """A train/data/eval/logging value of its default's type (an int where a float goes; a number for
    train.loss_scale, whose static scale the command line gives as text)."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) == isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
    elif isinstance(default, Mapping):
        ok = isinstance(value, (Mapping, ml_collections.ConfigDict))
    elif key == "train.loss_scale":
        ok = isinstance(value, (str, int, float))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
        raise ConfigError(f"config key '{key}' must be {type(default).__name__}, got {type(value).__name__} {shown!r}")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Check every group and key against the schema; raise ConfigError (one line) on the first problem."""
    schema = _shared_groups("default")
    expected = ["model", *schema]
    for group in cfg.keys():
        if group not in expected:
            raise ConfigError(f"unknown config group '{group}'{closest(group, expected)}")
    for group in expected:
        if group not in cfg:
            raise ConfigError(f"config has no '{group}' group")
    for group, keys in schema.items():
        for key in cfg[group].keys():
            if key not in keys:
                raise ConfigError(f"unknown config key '{group}.{key}'{closest(f'{group}.{key}', [f'{group}.{k}' for k in keys])}")
        # (a group given whole, --config.train={...} or a config file's own dict, replaces every key of it)
        whole = f"; a group given whole (--config.{group}={{...}}) replaces all its keys: set them one by one, --config.{group}.KEY=VALUE"
        for key, default in keys.items():
            if key not in cfg[group]:
                raise ConfigError(f"config key '{group}.{key}' is missing{whole}")
            _check_shared_type(f"{group}.{key}", default, cfg[group][key])
    mesh = cfg.train.mesh
    for axis in mesh.keys():
        if axis not in schema["train"]["mesh"]:
            raise ConfigError(f"unknown config key 'train.mesh.{axis}'{closest(axis, schema['train']['mesh'])} (the mesh's axes: "
                              f"{', '.join(schema['train']['mesh'])})")
        _check_shared_type(f"train.mesh.{axis}", 1, mesh[axis])
    for key, low, meaning in RANGES:
        group, name = key.split(".")
        value = cfg[group][name]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (math.isfinite(value) and value >= low):
            raise ConfigError(f"{key} must be a finite number of at least {low}{meaning}, got {value}")
    if not cfg.data.dataset.strip():  # (it was read as the data folder itself, with advice to prepare '' into it)
        raise ConfigError("data.dataset is empty; set --config.data.dataset to a dataset's name (tinyshakespeare_char, fineweb_edu, "
                          "or your own prepared with python -m llmjax.prepare)")
    t = cfg.train
    if not 0 <= t.seed < 2**32:
        raise ConfigError(f"train.seed must be in [0, 2**32), got {t.seed}")  # (grain's and JAX's seeds hold 32 bits)
    for key in ("beta1", "beta2"):
        if not 0 <= t[key] < 1:  # (math.isfinite not needed: NaN fails the comparison)
            raise ConfigError(f"train.{key} must be in [0, 1) (Adam's moment decay), got {t[key]}")
    unknown = [n for n in t.decay_params.split(",") if n.strip() and n.strip() not in DECAYED + NOT_DECAYED]
    if unknown:
        raise ConfigError(f"train.decay_params: unknown parameter name '{unknown[0]}'{closest(unknown[0], DECAYED + NOT_DECAYED)} "
                          f"(the names: {', '.join(DECAYED + NOT_DECAYED)})")
    loss_scale_setting(t.get("loss_scale", "auto"))  # (a run saved before the key: none there)
    schedule = t.get("schedule", "cosine")  # (a run saved before the key: cosine)
    if schedule not in SCHEDULES:
        raise ConfigError(f"train.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}{closest(str(schedule), SCHEDULES)}")
    fraction = t.get("decay_fraction", 0.2)
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ConfigError(f"train.decay_fraction must be in (0, 1] (the share of max_steps wsd's decay takes), got {fraction}")
    if schedule == "wsd" and t.max_steps - decay_steps(t) < t.warmup_steps:
        raise ConfigError(f"train.schedule=wsd: the decay ({decay_steps(t)} of {t.max_steps} steps, decay_fraction={fraction}) would "
                          f"start inside the {t.warmup_steps} warm-up steps; lower train.decay_fraction or train.warmup_steps")
    if schedule != "constant" and t.min_lr > t.lr:  # (constant reads no min_lr)
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}: the {schedule} schedule decays from lr to min_lr; "
                          f"lower min_lr")
    if t.get("logits_dtype", "auto") not in LOGITS_DTYPES:  # (a run saved before the key: none there)
        raise ConfigError(f"train.logits_dtype={t.logits_dtype!r} is not one of {', '.join(LOGITS_DTYPES)}"
                          f"{closest(str(t.logits_dtype), LOGITS_DTYPES)}")
    mcfg = model_config(cfg)
    mcfg.check_run()
    if t.loss_chunks > 1 and mcfg.padded_vocab_size % t.loss_chunks:  # (checked here, not when the step is built: a compare
        # sweep or a summary says so before anything trains)
        divisors = [str(d) for d in (2, 4, 8, 16, 32, 64) if mcfg.padded_vocab_size % d == 0]
        raise ConfigError(f"train.loss_chunks={t.loss_chunks} must be 0 (off) or divide model.padded_vocab_size={mcfg.padded_vocab_size}"
                          + (f" (e.g. {', '.join(divisors[-3:])})" if divisors else ""))
    weights = t.get("aux_loss_weights", {})
    if unknown := sorted(set(weights.keys()) - set(mcfg.aux_losses)):  # (they were ignored: a typo, or MoE weights on a dense model)
        returned = f"it returns {', '.join(mcfg.aux_losses)}" if mcfg.aux_losses else "it returns none"
        raise ConfigError(f"train.aux_loss_weights has {', '.join(repr(k) for k in unknown)}, which the {mcfg.arch} model does not return "
                          f"({returned}){closest(unknown[0], mcfg.aux_losses)}; remove it")
    if missing := sorted(set(mcfg.aux_losses) - set(weights.keys())):  # (it was refused when the first step traced the loss, after
        # a fresh run had written its workdir)
        raise ConfigError(f"train.aux_loss_weights has no weight for {', '.join(repr(k) for k in missing)}, which the {mcfg.arch} model "
                          f"returns; give {'it' if len(missing) == 1 else 'each'} one (0: logged, not trained)")
    for name, weight in weights.items():  # (NaN stopped the run at step 1 as a 'non-finite loss', a string in a traceback; a
        # negative weight trained the router away from what its loss asks, silently)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"train.aux_loss_weights.{name} must be a finite number of at least 0 (0: logged, not trained), got {weight!r}")


LOSS_SCALES = ("auto", "dynamic", "none")
LOGITS_DTYPES = ("auto", "float32", "bfloat16")
SCHEDULES = ("cosine", "wsd", "constant")


def decay_steps(tcfg) -> int:
    """The steps of a wsd schedule's decay: decay_fraction of max_steps, at least one."""
    return max(1, round(tcfg.get("decay_fraction", 0.2) * tcfg.max_steps))


def loss_scale_setting(value: Any) -> str | float:
    """train.loss_scale as 'auto', 'dynamic', 'none' or a static scale (a positive float, also
    written as a string: the command line gives '1024'); a one-line ConfigError for anything else."""
    if isinstance(value, str) and value.strip().lower() in LOSS_SCALES:
        return value.strip().lower()
    try:
        scale = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        hint = closest(value.strip().lower(), LOSS_SCALES) if isinstance(value, str) else ""
        raise ConfigError(f"train.loss_scale={value!r} is not one of {', '.join(LOSS_SCALES)} or a positive number "
                          f"(a static scale, e.g. 1024){hint}")
    tiny = float(jnp.finfo(jnp.float32).tiny)
    if not tiny <= scale <= float(jnp.finfo(jnp.float32).max) / 2:  # (the step multiplies in float32: inf or 0 there)
        raise ConfigError(f"train.loss_scale={value!r} is outside what float32 holds ({tiny:g} to {float(jnp.finfo(jnp.float32).max) / 2:g}); "
                          "a static scale is typically a power of two such as 1024, or use dynamic")
    return scale


# AdamW's weight decay (train.decay_params, by the parameter's name): by default the matrices of
# linear maps, the MoE's expert matrices, Linformer's sequence projections, the SSM's convolution
# and embeddings; not biases, norm scales, nor the SSM's A_log and D (Mamba's _no_weight_decay). A
# new architecture's parameter of another name fails tests/test_train.py's contract test until it
# is in one list. (Runs before 2026-12-06 decayed only kernel and embedding: their config.json has
# no decay_params, and a resume or llmjax.compare says so.)
DECAYED = ("kernel", "embedding", "w_in", "w_out", "proj_k", "proj_v", "conv_weight")
NOT_DECAYED = ("bias", "scale", "b_in", "b_out", "conv_bias", "A_log", "D")


# Lower bounds of the numeric train/eval keys (and what 0 means where 0 is allowed).
RANGES = [
    ("train.max_steps", 1, ""), ("train.batch_size", 1, ""), ("train.grad_accum_steps", 1, ""),
    ("train.stop_at_step", 0, " (0: run to max_steps)"), ("train.warmup_steps", 0, ""), ("train.lr", 0, ""),
    ("train.min_lr", 0, ""), ("train.grad_clip", 0, " (0: no clipping)"), ("train.weight_decay", 0, ""),
    ("train.log_every_steps", 1, ""), ("train.checkpoint_every_steps", 0, " (0: only at evaluations and at the end)"),
    ("train.keep_checkpoints", 1, ""), ("train.loss_chunks", 0, " (0: off)"), ("train.peak_flops_per_device", 0, ""),
    ("eval.every_steps", 0, " (0: at the last step only)"), ("eval.num_batches", 0, " (0: no estimates, only the last step's loss)"),
    ("eval.final_num_batches", 0, " (0: the whole split)"),
    ("eval.sample_tokens", 0, " (0: no sample)"), ("eval.tasks_every_steps", 0, " (0: at the last step only)"),
    ("eval.tasks_limit", 0, " (0: every item)"), ("eval.tasks_batch_size", 1, ""),
]
