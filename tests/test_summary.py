"""`llmjax.summary`: parameter, FLOP and decode-state accounting."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import config
from llmjax.summary import config_files, format_table, summarize

DEFAULTS = {
    # arch: (params_total, decode-state bf16 bytes per token at the default shape)
    "vanilla": (124_475_904, 12 * 2 * 12 * 64 * 2),  # k and v, every head
    "modern": (123_587_328, 12 * 2 * 12 * 64 * 2),
    "gqa": (115_026_432, 12 * 2 * 4 * 64 * 2),  # only the 4 shared kv heads
    "mla": (120_346_368, 12 * (256 + 32) * 2),  # only the latent and the rope key
}


@pytest.mark.parametrize("arch", sorted(DEFAULTS))
def test_default_summaries(arch):
    s = summarize(config(arch, "default"))
    total, per_token = DEFAULTS[arch]
    assert s["params_total"] == total
    assert s["params_active"] == total
    assert s["decode_state_bytes_per_token"] == per_token
    assert s["decode_state_bytes"] == per_token * 1024
    position_table = 1024 * 768 if arch in ("vanilla", "gqa") else 0
    assert s["params_non_embedding"] == total - 50304 * 768 - position_table


def test_flops_per_token_formula():
    s = summarize(config("vanilla", "default"))
    N = 124_475_904 - 1024 * 768  # the position table is a lookup, not a matmul
    L, H, hd, T = 12, 12, 64, 1024
    assert s["flops_per_token"] == 6 * N + 12 * L * H * hd * T  # nanoGPT's estimate_mfu
    m = summarize(config("mla", "default"))
    assert m["flops_per_token"] == 6 * 120_346_368 + 6 * L * T * H * (64 + 32 + 64)
    # parameters whose products the mixer's count already holds are not counted 6 times per token
    # as well: Linformer's projections onto the summaries, the SSM's A (they were: +0.58%, +0.24%)
    lin = config("linformer", "default").model
    s = summarize(lin)
    proj = lin.n_layer * 2 * lin.rank * lin.block_size
    width = lin.n_head * lin.head_dim
    assert s["flops_per_token"] == 6 * (s["params_active"] - lin.context_len * lin.d_model - proj) + 3 * lin.n_layer * (
        4 * (lin.block_size + lin.rank) * width + 4 * lin.rank * width)
    ssm = config("ssm", "default").model
    s = summarize(ssm)
    assert s["flops_per_token"] == 6 * (s["params_active"] - ssm.n_layer * ssm.d_inner * ssm.d_state) + 3 * 7 * ssm.n_layer * ssm.d_inner * ssm.d_state


def test_summary_allocates_nothing_at_any_size():
    big = config("modern", "default")
    big.model.n_layer, big.model.d_model, big.model.n_head = 96, 12288, 96
    big.model.head_dim, big.model.n_kv_head, big.model.d_ff = 128, 96, 49152
    s = summarize(big)  # about 175B parameters: only possible through eval_shape
    assert s["params_total"] > 1.7e11


def test_table_lists_every_config():
    rows = [dict(config=p.name, **summarize(config(p.stem, "tiny"))) for p in config_files()]
    text = format_table(rows)
    for arch in ("vanilla", "modern", "gqa", "mla"):
        assert arch in text
    assert [p.stem for p in config_files()][:4] == ["vanilla", "modern", "gqa", "mla"]


def test_table_columns_hold_their_own_figures():
    """Each column of the printed table holds its own figure (a made-up row whose figures all differ:
    a column that printed another's, the total under non-embedding say, passed the test above)."""
    row = dict(config="c.py", arch="moe", params_total=300_000_000, params_non_embedding=250_000_000, params_active=120_000_000,
               flops_per_token=7.5e8, decode_state_bytes_per_token=36_864, decode_state_bytes=3 * 2**20)
    constant = {**row, "config": "d.py", "decode_state_bytes_per_token": None}
    _, grows, fixed = format_table([row, constant]).splitlines()
    assert grows.split() == ["c.py", "moe", "300,000,000", "250.00M", "120.00M", "0.750", "36,864", "3.00", "MiB"]
    assert fixed.split()[6] == "-"


def test_cli_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llmjax.summary", "--config", "configs/gqa.py", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("arch", "params_total", "params_non_embedding", "params_active", "flops_per_token",
                "decode_state_bytes_per_token", "decode_state_bytes"):
        assert key in data
    assert data["arch"] == "gqa" and data["params_total"] == DEFAULTS["gqa"][0]


def test_variant_with_a_config_is_refused_not_ignored():
    """`--config configs/vanilla.py:tiny --variant=small` summarised tiny, ignoring --variant (it picks
    every config's variant when --config is not given); bench's --variant (for --all) likewise."""
    from helpers import cli_cases

    r, lacking = cli_cases("llmjax.summary", [["--config", "configs/vanilla.py:tiny", "--variant=small"], ["--variant", "nope"]])
    assert (r.returncode, r.stderr, r.stdout) == (2, "error: --variant is for every config, without --config; with --config put the "
                                                     "variant in it: --config configs/vanilla.py:small\n", ""), r.stderr
    # a variant a config lacks names that config, as bench --all's error does (`--variant medium`, which only vanilla has, said
    # "unknown variant 'medium'; choose one of default, small, tiny", no config named, after summarising vanilla's medium)
    assert (lacking.returncode, lacking.stderr, lacking.stdout) == (
        2, "error: configs/vanilla.py:nope: unknown variant 'nope'; choose one of default, small, tiny, medium, large, xl\n", ""), lacking.stderr
    # (-config, absl's one-dash form, too: the advice lost the path, '--config :tiny')
    for r in cli_cases("llmjax.bench", [[form, "configs/vanilla.py", "--variant", "tiny", "--suite=memory", "--steps=0"]
                                        for form in ("--config", "-config")]):
        assert (r.returncode, r.stderr, r.stdout) == (2, "error: --variant is for --all; with --config put the variant in it: "
                                                         "--config configs/vanilla.py:tiny\n", ""), r.stderr


def test_the_readmes_architecture_table_is_summarys():
    """Every row of README.md's architecture table (one per registered architecture's `default`
    config, not only the four DEFAULTS pins) says what `summarize` computes: total and non-embedding
    parameters, training GFLOPs per token (active ones for the MoE) and the decode state (per token,
    or constant). (The list was the seven names written out: a new architecture's row, which the
    README's guide asks for, failed here however right its figures were.)"""
    import re

    import llmjax
    import llmjax.models  # noqa: F401  (registers every architecture)

    section = (ROOT / "README.md").read_text().split("\n## Architectures\n", 1)[1].split("\n## ", 1)[0]
    rows = {m.group(1): [c.strip() for c in m.group(0).strip("|").split("|")]
            for m in re.finditer(r"^\| `(\w+)` \|.*\|$", section, re.MULTILINE)}
    missing, extra = sorted(set(llmjax.ARCHS) - set(rows)), sorted(set(rows) - set(llmjax.ARCHS))
    assert not missing, f"add {missing[0]}'s row to README.md's architecture table (python -m llmjax.summary prints its figures)"
    assert not extra, f"README.md's architecture table has a row for {extra[0]}, which is not a registered architecture"
    for arch, cells in rows.items():
        s = summarize(config(arch, "default"))
        assert cells[1] == f"`configs/{arch}.py`"
        assert cells[3] == f"{s['params_total']:,}", arch
        assert cells[4] == f"{s['params_non_embedding'] / 1e6:.2f}M", arch
        flops = f"{s['flops_per_token'] / 1e9:.3f}"
        assert cells[5] == (f"{flops} (active)" if s["params_active"] != s["params_total"] else flops), arch
        per_token = s["decode_state_bytes_per_token"]
        state = f"{per_token:,} B" if per_token else f"constant: {s['decode_state_bytes'] / 2**20:.2f} MiB"
        assert cells[6].split(" (")[0] == state, arch
        if s["params_active"] != s["params_total"]:
            assert f"{s['params_active'] / 1e6:.2f}M active per token" in cells[2], arch
