"""`python -m llmjax.summary --config configs/<arch>.py[:variant] [--json]`: parameter counts, FLOPs
per token and decode-state size of a config, from `jax.eval_shape` (nothing is allocated, so it is
instant at any size). Without --config it summarises every config in `configs/` (one variant).

Accounting (also in the README):
- params_total: every allocated parameter; the tied embedding counted once, padded rows included.
- params_non_embedding: params_total minus the token and the learned position tables.
- params_active: parameters one token uses (params_total for dense models; MoE overrides).
- flops_per_token (training, forward + backward) = 6 * (params_active - position table)
  + 3 * mixer FLOPs, where the mixer term for attention is 2 * T * n_head * (d_qk + d_v) per layer,
  over the full context T (nanoGPT's / PaLM's convention; 12*L*H*hd*T for standard attention).
- decode_state_bytes: the decode cache of one sequence at full context, in bf16.
  decode_state_bytes_per_token: its growth per token; null where the state does not grow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from llmjax import cli
from llmjax.config import ConfigError, load_config, model_config
from llmjax.registry import get_arch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ARCH_ORDER = ("vanilla", "modern", "gqa", "mla", "linformer", "ssm", "moe")


def _size(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def summarize(cfg) -> dict:
    """The summary of a run ConfigDict, its model group, or a ModelConfig."""
    mcfg = model_config(cfg)
    cls = get_arch(mcfg.arch)
    model = nnx.eval_shape(lambda: cls(mcfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    total = _size(params)
    token_table = _size(params["embed"])
    position_table = _size(params.get("pos_embed", {}))
    active = cls.params_active(mcfg, params) if hasattr(cls, "params_active") else total
    T = mcfg.context_len
    flops = 6 * (active - position_table - cls.mixer_params(mcfg, params)) + 3 * cls.mixer_flops_per_token(mcfg, T)
    full = _nbytes(jax.eval_shape(lambda: model.init_cache(1, T, jnp.bfloat16)))
    half = _nbytes(jax.eval_shape(lambda: model.init_cache(1, T // 2, jnp.bfloat16)))
    grows = full != half
    return dict(
        arch=mcfg.arch,
        n_layer=mcfg.n_layer,
        d_model=mcfg.d_model,
        context_len=T,
        vocab_size=mcfg.vocab_size,
        padded_vocab_size=mcfg.padded_vocab_size,
        params_total=total,
        params_non_embedding=total - token_table - position_table,
        params_active=active,
        flops_per_token=flops,
        decode_state_bytes_per_token=(full - half) // (T - T // 2) if grows else None,
        decode_state_bytes=full,
    )


def config_files() -> list[Path]:
    """The architecture configs in configs/ (configs/<arch>.py for each registered arch): ARCH_ORDER's
    first, then any other registered architecture's (a new one), by name."""
    from llmjax.registry import ARCHS, get_arch

    get_arch("vanilla")  # imports llmjax.models, registering every architecture
    files = {p.stem: p for p in CONFIG_DIR.glob("*.py") if p.stem in ARCHS}
    ordered = [files.pop(a) for a in ARCH_ORDER if a in files]
    return ordered + sorted(files.values())


def format_table(rows: list[dict]) -> str:
    def millions(n):
        return f"{n / 1e6:,.2f}M"

    header = ("config", "arch", "params", "non-embedding", "active", "GFLOPs/token", "decode B/token", "decode state")
    lines = [header]
    for r in rows:
        per_tok = "-" if r["decode_state_bytes_per_token"] is None else f"{r['decode_state_bytes_per_token']:,}"
        lines.append(
            (
                r["config"],
                r["arch"],
                f"{r['params_total']:,}",
                millions(r["params_non_embedding"]),
                millions(r["params_active"]),
                f"{r['flops_per_token'] / 1e9:.3f}",
                per_tok,
                f"{r['decode_state_bytes'] / 2**20:,.2f} MiB",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines)


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        cli.fail(f"unexpected argument '{argv[1]}'; flags are --config, --json, --variant")
    if FLAGS.config is not None and FLAGS["variant"].present:  # (it was ignored: the spec's variant was summarised)
        path, _ = cli.split_spec(FLAGS["config"].config_filename)
        cli.fail(f"--variant is for every config, without --config; with --config put the variant in it: --config {path}:{FLAGS.variant}")
    if FLAGS.config is not None:
        rows = [dict(config=FLAGS["config"].config_filename, **summarize(FLAGS.config))]
    else:
        rows = []
        for path in config_files():
            spec = f"configs/{path.name}:{FLAGS.variant}"
            try:
                cfg = load_config(f"{path}:{FLAGS.variant}")
            except ConfigError as e:  # (a variant another config has: name the config that lacks it, as bench --all does)
                cli.fail(f"{spec}: {e}")
            rows.append(dict(config=spec, **summarize(cfg)))
    if FLAGS.json:
        print(json.dumps(rows[0] if FLAGS.config is not None else rows, indent=2))
    else:
        print(format_table(rows))


def define_flags():
    cli.define_config_flag()
    flags.adopt_module_key_flags(cli)  # (--help lists them with the tool's own flags)
    flags.DEFINE_bool("json", False, "print JSON (an object for --config, a list otherwise)")
    flags.DEFINE_string("variant", "default", "variant of every config, when --config is not given")


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    from absl import flags

    from llmjax import cli

    summary = cli.tool("llmjax.summary")
    summary.define_flags()
    flags.adopt_module_key_flags(summary)  # (--help lists the key flags of __main__, which defines none now)
    cli.run(summary.main)
