"""Export (Hugging Face safetensors for vanilla/modern, llama.cpp GGUF for modern) and GPT-2 import:
round trips to the same tensors, the rotary permutation, the trainer starting from imported weights,
one-line errors; logit parity with transformers where it is installed (the GPU machine)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llmjax
from conftest import ROOT
from helpers import built_once, config, load_params, params, perturb_vectors, tokens
from llmjax import export as X
from llmjax.sample import SampleError

BPE = {"data.dataset": "tinyshakespeare", "model.vocab_size": 50257, "model.padded_vocab_size": 50304}


def test_gpt2_tensors_round_trip():
    cfg = config("vanilla")
    m = llmjax.build_model(cfg, seed=2)
    p = jax.tree.map(np.asarray, params(m))
    mcfg = m.cfg
    t = X.gpt2_tensors(p, mcfg)
    assert t["transformer.wte.weight"].shape == (65, 64) and t["transformer.h.1.attn.c_attn.weight"].shape == (64, 192)
    back = X.params_from_gpt2(t, mcfg)
    assert np.array_equal(back["embed"]["embedding"][:65], p["embed"]["embedding"][:65])
    assert not back["embed"]["embedding"][65:].any()  # padded rows start at zero
    for a, b in zip(jax.tree.leaves({**back, "embed": None}), jax.tree.leaves({**p, "embed": None})):
        assert np.array_equal(a, b)
    # OpenAI's own files have no `transformer.` prefix
    assert jax.tree.all(jax.tree.map(np.array_equal, X.params_from_gpt2({k.removeprefix("transformer."): v for k, v in t.items()}, mcfg), back))
    with pytest.raises(X.ExportError, match="has shape .* pick the matching config"):
        X.params_from_gpt2(t, llmjax.model_config(config("vanilla", d_ff=128)))


def test_gpt2_weights_of_fewer_layers_say_how_many():
    """GPT-2 weights of fewer layers than model.n_layer were "no tensor 'h.2.ln_1.weight'; is this a
    GPT-2 checkpoint?" (they are): the line gives both counts, as more layers did."""
    t = X.gpt2_tensors(jax.tree.map(np.asarray, params(llmjax.build_model(config("vanilla"), seed=0))), llmjax.model_config(config("vanilla")))
    with pytest.raises(X.ExportError, match=r"^the GPT-2 weights have 2 layers, fewer than model.n_layer=3; pick the matching config "
                                            r"\(configs/vanilla.py, :medium, :large, :xl\) or set --config.model.n_layer=2$"):
        X.params_from_gpt2(t, llmjax.model_config(config("vanilla", n_layer=3)), crop=True)
    with pytest.raises(X.ExportError, match=r"^the GPT-2 weights have more than model.n_layer=1 layers"):
        X.params_from_gpt2(t, llmjax.model_config(config("vanilla", n_layer=1)), crop=True)


def test_gpt2_weights_for_another_vocabulary_say_so():
    """GPT-2's 50257-token table into a character-level config (configs/vanilla.py:tiny) was told to
    "pick the matching config (configs/vanilla.py, :medium, ...)", which are the same shapes; the line
    names the vocabularies and the flags of GPT-2 BPE data. A table of another size is not GPT-2's."""
    bpe = llmjax.model_config(config("vanilla", vocab_size=50257, padded_vocab_size=50304))
    t = X.gpt2_tensors(jax.tree.map(np.asarray, params(llmjax.build_model(bpe, seed=0))), bpe)
    with pytest.raises(X.ExportError, match=r"^the GPT-2 weights' token table \(wte.weight\) holds GPT-2's 50257 BPE tokens, the config's "
                                            r"model.vocab_size=65: train on GPT-2 BPE tokens, e.g. --config.data.dataset=tinyshakespeare "):
        X.params_from_gpt2(t, llmjax.model_config(config("vanilla")), crop=True)
    padded = {**t, "transformer.wte.weight": np.zeros((50304, 64), np.float32)}  # (nanoGPT's padded table)
    with pytest.raises(X.ExportError, match=r"^the GPT-2 weights' token table \(wte.weight\) holds 50304 tokens; llmjax reads GPT-2 weights "
                                            r"with GPT-2's BPE vocabulary \(50257 tokens\)$"):
        X.params_from_gpt2(padded, bpe, crop=True)


def test_gpt2_import_crops_the_position_table_to_a_shorter_context():
    """train.init_from with a model.context_len below the weights' (GPT-2's 1024 into a 256 context;
    here 64 into 32) keeps the position table's first rows, as nanoGPT's `crop_block_size`: the
    cropped model's logits on a sequence shorter than its context are the full model's (it was
    refused: 'has shape (64, 64), the config wants (32, 64)'). A longer context is refused naming
    the weights' length; without crop (sample/evaluate of a GPT-2 folder) the shape must match."""
    full = perturb_vectors(llmjax.build_model(config("vanilla"), seed=3))
    t = X.gpt2_tensors(jax.tree.map(np.asarray, params(full)), full.cfg)
    short = llmjax.build_model(config("vanilla", context_len=32), seed=0)
    load_params(short, X.params_from_gpt2(t, short.cfg, crop=True))
    toks = tokens(1, 2, 20)
    np.testing.assert_allclose(np.asarray(short(toks)[0]), np.asarray(full(toks)[0]), rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(params(short)["pos_embed"]["embedding"]), t["transformer.wpe.weight"][:32])
    with pytest.raises(X.ExportError, match=r"^the GPT-2 weights hold 64 positions \(wpe.weight\), fewer than model.context_len=128; "
                                            r"set --config.model.context_len=64 or lower$"):
        X.params_from_gpt2(t, full.cfg.replace(context_len=128), crop=True)
    with pytest.raises(X.ExportError, match=r"'wpe.weight' has shape \(64, 64\), the config wants \(32, 64\)"):
        X.params_from_gpt2(t, short.cfg)


def rope_interleaved(x, positions, base):
    """Rotary embedding on adjacent pairs (2i, 2i+1): llama.cpp's layout."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d // 2) * 2 / d)
    ang = positions[:, None] * inv
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x1 * np.cos(ang) - x2 * np.sin(ang)
    out[..., 1::2] = x2 * np.cos(ang) + x1 * np.sin(ang)
    return out


@pytest.mark.parametrize("arch", ["vanilla", "modern"])
def test_an_option_the_layout_does_not_hold_is_refused(arch):
    """An option added to the architecture to try an idea (`qk_norm: bool = False`, as the README
    shows) and turned on: the exporters wrote the tensors they know and left the option out, a
    Hugging Face / GGUF model that computes without it, with no word. Turned off, or one of the
    layout's own keys, it exports."""
    import dataclasses

    from llmjax.config import model_config

    base = type(model_config(config(arch)))
    mine = dataclasses.make_dataclass("MineConfig", [("qk_norm", bool, dataclasses.field(default=False))], bases=(base,),
                                      frozen=True, kw_only=True)
    values = config(arch).model.to_dict()
    check = X.check_gpt2 if arch == "vanilla" else X.check_llama
    mk = lambda **o: mine(**{**values, **o})  # noqa: E731
    check(mk())
    check(mk(qk_norm=False, decode_norm_impl="xla", matmul_dtype="bfloat16"))
    layout = "Hugging Face GPT-2" if arch == "vanilla" else "Llama"
    with pytest.raises(X.ExportError, match=rf"^model\.qk_norm=True is an option the {layout} layout does not hold: .* teach "
                                            r"llmjax/export\.py the option first \(a model with model\.qk_norm=False exports\)$"):
        check(mk(qk_norm=True))
    p = params(llmjax.build_model(config(arch), seed=0))
    with pytest.raises(X.ExportError, match="qk_norm=True"):
        (X.gpt2_tensors if arch == "vanilla" else X.llama_tensors)(p, mk(qk_norm=True))


def test_rotary_permutation_is_llama_cpps():
    """Permuted q/k rows under interleaved RoPE give the same attention scores as the original rows
    under our rotate-half RoPE."""
    from llmjax.models.layers import apply_rope

    rng = np.random.default_rng(0)
    H, hd, D, T = 2, 8, 12, 5
    wq, wk = rng.normal(size=(H * hd, D)), rng.normal(size=(H * hd, D))
    x = rng.normal(size=(T, D))
    pos = np.arange(T, dtype=np.float64) * 3
    ours = [np.asarray(apply_rope(jnp.asarray((x @ w.T).reshape(1, T, H, hd), jnp.float32), jnp.asarray(pos[None], jnp.int32), 10000.0))[0]
            for w in (wq, wk)]
    theirs = [rope_interleaved((x @ X.rotate_half_to_interleaved(w, H).T).reshape(T, H, hd).transpose(1, 0, 2), pos, 10000.0)
              for w in (wq, wk)]
    scores_ours = np.einsum("thd,shd->hts", ours[0], ours[1])
    scores_theirs = np.einsum("htd,hsd->hts", theirs[0], theirs[1])
    np.testing.assert_allclose(scores_theirs, scores_ours, rtol=1e-4, atol=1e-4)
    assert np.array_equal(X.interleaved_to_rotate_half(X.rotate_half_to_interleaved(wq, H), H), wq)


def _ref_attention(q_THd, k_TKd, v_TKd):
    """Causal softmax attention in float64, key/value head h // (H/K) for query head h (HF's repeat_kv)."""
    T, H, d = q_THd.shape
    k, v = (np.repeat(a, H // a.shape[1], axis=1) for a in (k_TKd, v_TKd))
    s = np.einsum("thd,shd->hts", q_THd, k) / np.sqrt(d) + np.triu(np.full((T, T), -np.inf), 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), v).reshape(T, H * d)


def _ref_rope(x_THd, base, interleaved):
    """Rotary embedding in float64: pairs (i, i + d/2) (Hugging Face) or (2i, 2i + 1) (llama.cpp)."""
    d = x_THd.shape[-1]
    ang = np.arange(len(x_THd))[:, None, None] * base ** (-np.arange(d // 2) * 2 / d)
    a, b = (x_THd[..., 0::2], x_THd[..., 1::2]) if interleaved else (x_THd[..., : d // 2], x_THd[..., d // 2 :])
    ra, rb = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
    return np.stack([ra, rb], -1).reshape(x_THd.shape) if interleaved else np.concatenate([ra, rb], -1)


def _ref_llama(t, c, toks, gguf=False):
    """Logits of LlamaForCausalLM (or llama.cpp's `llama`, gguf=True) from its tensors and config, float64."""
    t = {k: np.asarray(v, np.float64) for k, v in t.items()}
    H, K, hd, eps, T = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"], len(toks)
    names = ({"in": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "post": "ffn_norm", "g": "ffn_gate",
              "u": "ffn_up", "d": "ffn_down"} if gguf else
             {"in": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "post": "post_attention_layernorm", "g": "mlp.gate_proj", "u": "mlp.up_proj", "d": "mlp.down_proj"})
    rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w  # noqa: E731
    E = t["token_embd.weight" if gguf else "model.embed_tokens.weight"]
    x = E[toks]
    for i in range(c["num_hidden_layers"]):
        W = lambda n: t[f"blk.{i}.{names[n]}.weight" if gguf else f"model.layers.{i}.{names[n]}.weight"]  # noqa: E731
        h = rms(x, W("in"))
        q, k = (_ref_rope((h @ W(n).T).reshape(T, -1, hd), c["rope_theta"], gguf) for n in ("q", "k"))
        x = x + _ref_attention(q, k, (h @ W("v").T).reshape(T, K, hd)) @ W("o").T
        h = rms(x, W("post"))
        g = h @ W("g").T
        x = x + (g / (1 + np.exp(-g)) * (h @ W("u").T)) @ W("d").T
    return rms(x, t["output_norm.weight" if gguf else "model.norm.weight"]) @ E.T


def _ref_gpt2(t, c, toks):
    """Logits of GPT2LMHeadModel from its tensors (Conv1D: (in, out)) and config, float64."""
    t = {k.removeprefix("transformer."): np.asarray(v, np.float64) for k, v in t.items()}
    H, eps, T = c["n_head"], c["layer_norm_epsilon"], len(toks)

    def ln(x, n):
        m = x.mean(-1, keepdims=True)
        return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * t[n + ".weight"] + t[n + ".bias"]

    lin = lambda x, n: x @ t[n + ".weight"] + t[n + ".bias"]  # noqa: E731
    x = t["wte.weight"][toks] + t["wpe.weight"][:T]
    for i in range(c["n_layer"]):
        q, k, v = np.split(lin(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn").reshape(T, 3 * H, -1), 3, axis=1)
        x = x + lin(_ref_attention(q, k, v), f"h.{i}.attn.c_proj")
        y = lin(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc")
        x = x + lin(0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3))), f"h.{i}.mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T


def test_exported_tensors_compute_the_model_in_a_float64_reference():
    """What a Hugging Face / llama.cpp reader computes from the exported tensors and config, written
    out in float64 from their definitions (GPT-2: Conv1D, tanh-GELU; Llama: (out, in) Linears,
    rotate-half RoPE, SwiGLU, repeat_kv; GGUF: interleaved RoPE), gives our logits. The read-back
    tests compare with the exporters' own tensors, and the transformers parity test needs torch:
    Llama's two norms swapped, or GGUF k rows permuted with n_head (not n_kv_head) under grouped
    keys, passed every other test on a machine without torch."""
    toks = np.random.default_rng(0).integers(0, 65, 24)
    for arch, overrides in (("vanilla", {}), ("modern", {"n_kv_head": 2, "rope_base": 500.0})):
        m = perturb_vectors(llmjax.build_model(config(arch, scan_layers=True, **overrides), seed=5))
        p, mcfg = jax.tree.map(np.asarray, params(m)), m.cfg
        ours = np.asarray(m(jnp.asarray(toks[None], jnp.int32))[0], np.float64)[0, :, :65]
        if arch == "vanilla":
            got = {"Hugging Face GPT-2": _ref_gpt2(X.gpt2_tensors(p, mcfg), X.gpt2_config(mcfg), toks)}
        else:
            c = X.llama_config(mcfg)
            got = {"Hugging Face Llama": _ref_llama(X.llama_tensors(p, mcfg), c, toks),
                   "GGUF": _ref_llama(X.gguf_tensors(p, mcfg), c, toks, gguf=True)}
        for layout, logits in got.items():
            np.testing.assert_allclose(logits, ours, rtol=0, atol=2e-5, err_msg=layout)
        assert np.abs(ours).max() > 0.1  # (logits that are not all near zero)


def test_configs_and_gguf_metadata_carry_the_models_own_hyperparameters(tmp_path):
    """A model whose norm epsilon, rope base and key/value heads are not the defaults: the Hugging
    Face configs and the GGUF metadata (llama.cpp builds its graph from these keys, not from the
    tensors) hold its own values, and the configs compute its logits in the float64 references (the
    tiny runs use the defaults: a constant written in their place passed every other test)."""
    gguf = pytest.importorskip("gguf")
    from llmjax.tokenizer import GPT2Tokenizer

    toks = np.random.default_rng(1).integers(0, 65, 16)
    m = perturb_vectors(llmjax.build_model(config("vanilla", scan_layers=True, norm_eps=0.3), seed=5))
    ours = np.asarray(m(jnp.asarray(toks[None], jnp.int32))[0], np.float64)[0, :, :65]
    c = X.gpt2_config(m.cfg)
    assert c["layer_norm_epsilon"] == 0.3
    np.testing.assert_allclose(_ref_gpt2(X.gpt2_tensors(jax.tree.map(np.asarray, params(m)), m.cfg), c, toks), ours, rtol=0, atol=2e-5)

    over = {"n_kv_head": 2, "rope_base": 500.0, "norm_eps": 0.3, "vocab_size": 50257, "padded_vocab_size": 50304}
    m = perturb_vectors(llmjax.build_model(config("modern", scan_layers=True, **over), seed=5))
    p, mcfg = jax.tree.map(np.asarray, params(m)), m.cfg
    c = X.llama_config(mcfg)
    assert (c["rms_norm_eps"], c["rope_theta"], c["num_key_value_heads"]) == (0.3, 500.0, 2)
    path = tmp_path / "model.gguf"
    X.write_gguf(p, mcfg, GPT2Tokenizer(), path)
    reader = gguf.GGUFReader(str(path))

    def field(name):
        f = reader.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    want = {"context_length": mcfg.context_len, "embedding_length": mcfg.d_model, "block_count": mcfg.n_layer,
            "feed_forward_length": mcfg.d_ff, "attention.head_count": mcfg.n_head, "attention.head_count_kv": 2,
            "attention.key_length": mcfg.head_dim, "attention.value_length": mcfg.head_dim, "rope.dimension_count": mcfg.head_dim,
            "vocab_size": 50257}
    assert {k: int(field(f"llama.{k}")) for k in want} == want
    assert float(field("llama.rope.freq_base")) == 500.0
    assert float(field("llama.attention.layer_norm_rms_epsilon")) == pytest.approx(0.3, rel=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-step GPT-2-BPE runs of vanilla and modern (tiny shapes)."""
    from llmjax.train import train

    def build(base):
        for arch in ("vanilla", "modern"):
            cfg = llmjax.load_config(f"{ROOT}/configs/{arch}.py:tiny", BPE | {"train.max_steps": 2, "train.batch_size": 8,
                                                                             "eval.num_batches": 1, "eval.sample_tokens": 0,
                                                                             "logging.progress_bar": False})
            train(cfg, base / arch, quiet=True)
        return {arch: str(base / arch) for arch in ("vanilla", "modern")}

    return {arch: Path(path) for arch, path in built_once(tmp_path_factory, "export-runs", build).items()}


def run_params(path):
    from llmjax.sample import load

    loaded = load(path, dtype="float32", scan_layers=True)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(loaded.model, nnx.Param))), loaded


def test_safetensors_exports_read_back(runs, tmp_path):
    from safetensors.numpy import load_file

    for arch in ("vanilla", "modern"):
        p, loaded = run_params(runs[arch])
        folder = X.export(runs[arch], "safetensors", tmp_path / arch)
        got = load_file(str(folder / "model.safetensors"))
        want = X.gpt2_tensors(p, loaded.model.cfg) if arch == "vanilla" else X.llama_tensors(p, loaded.model.cfg)
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["vocab_size"] == 50257 and cfg["tie_word_embeddings"] is True
        assert (folder / "vocab.json").stat().st_size > 1e6 and (folder / "merges.txt").is_file()
        # every file readable as any file the user writes (the umask's permissions), the weights too
        from llmjax.data import umask

        assert {(f.name, f.stat().st_mode & 0o777) for f in folder.iterdir()} == {(f.name, 0o666 & ~umask()) for f in folder.iterdir()}
    # Llama's Linear weights are the transposed kernels, split into q/k/v
    p, loaded = run_params(runs["modern"])
    got = load_file(str(tmp_path / "modern" / "model.safetensors"))
    H, hd = loaded.model.cfg.n_head, loaded.model.cfg.head_dim
    qkv = p["blocks"]["layers"]["attn"]["qkv_proj"]["kernel"][1]
    assert np.array_equal(got["model.layers.1.self_attn.k_proj.weight"], qkv[:, H * hd : 2 * H * hd].T)
    assert json.loads((tmp_path / "modern" / "config.json").read_text())["model_type"] == "llama"
    # float16
    half = load_file(str(X.export(runs["vanilla"], "safetensors", tmp_path / "half", dtype="float16") / "model.safetensors"))
    assert half["transformer.wte.weight"].dtype == np.float16


def test_gguf_export_reads_back(runs, tmp_path):
    gguf = pytest.importorskip("gguf")
    p, loaded = run_params(runs["modern"])
    path = X.export(runs["modern"], "gguf", tmp_path / "model.gguf")
    from llmjax.data import umask

    assert path.stat().st_mode & 0o777 == 0o666 & ~umask()
    reader = gguf.GGUFReader(str(path))
    want = X.gguf_tensors(p, loaded.model.cfg)
    got = {t.name: np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    assert "blk.1.attn_q.weight" in got and "token_embd.weight" in got and "output.weight" not in got  # tied head
    H, hd = loaded.model.cfg.n_head, loaded.model.cfg.head_dim
    q = p["blocks"]["layers"]["attn"]["qkv_proj"]["kernel"][0][:, : H * hd].T
    assert np.array_equal(X.interleaved_to_rotate_half(got["blk.0.attn_q.weight"], H), q)

    def field(name):
        f = reader.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert field("general.architecture") == "llama"
    assert int(field("llama.block_count")) == 2 and int(field("llama.attention.head_count")) == H
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == 50257
    assert int(field("tokenizer.ggml.eos_token_id")) == 50256
    # the metadata reader that tells an earlier export (check_export_gguf): gguf's values, read through
    # the arrays for a key not there, and a file cut short anywhere before a key is no GGUF
    strings = {k: str(field(k)) for k, f in reader.fields.items() if f.types == [gguf.GGUFValueType.STRING]}
    assert len(strings) >= 4 and X.gguf_strings(path, [*strings, "not.there"]) == strings
    assert X.gguf_strings(path, ["tokenizer.ggml.pre"]) == {"tokenizer.ggml.pre": "gpt-2"}
    data = path.read_bytes()
    for n in (0, 3, 20, 200, 2000, 400_000):
        (tmp_path / "cut.gguf").write_bytes(data[:n])
        with pytest.raises(ValueError):
            X.gguf_strings(tmp_path / "cut.gguf", [*strings, "not.there"])


def test_exports_never_overwrite_what_is_not_theirs(runs, tmp_path):
    """--out that is a training run (its config.json would be replaced), a folder of other files, or
    a file is refused and left as it was; an earlier export is replaced whole; a float16 GGUF keeps
    its norms exactly (float32, from the float32 weights); the .gguf name is appended, not swapped
    for another suffix, and an existing folder is refused."""
    run_cfg = (runs["vanilla"] / "config.json").read_text()
    with pytest.raises(X.ExportError, match="is a training run"):
        X.export(runs["vanilla"], "safetensors", runs["vanilla"])
    assert (runs["vanilla"] / "config.json").read_text() == run_cfg and not (runs["vanilla"] / "model.safetensors").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(X.ExportError, match=r"holds other files \(notes.txt\)"):
        X.export(runs["vanilla"], "safetensors", mine)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(X.ExportError, match="is a file"):
        X.export(runs["vanilla"], "safetensors", tmp_path / "afile")
    out = X.export(runs["vanilla"], "safetensors", tmp_path / "exp", dtype="float16")
    again = X.export(runs["vanilla"], "safetensors", tmp_path / "exp")  # an earlier export: replaced
    assert again == out and sorted(p.name for p in out.iterdir()) == sorted(X.EXPORT_FILES)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "exp", "mine"]  # no temporary folder left
    gguf = pytest.importorskip("gguf")
    path = X.export(runs["modern"], "gguf", tmp_path / "model.v1.5", dtype="float16")
    assert path == tmp_path / "model.v1.5.gguf"
    p, _ = run_params(runs["modern"])
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(path)).tensors}
    assert got["output_norm.weight"].dtype == np.float32 and np.array_equal(got["output_norm.weight"], p["norm_f"]["scale"])
    assert got["blk.0.attn_q.weight"].dtype == np.float16
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(X.ExportError, match="is a folder; give the .gguf file's name"):
        X.export(runs["modern"], "gguf", tmp_path / "d.gguf")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_trainer_starts_from_imported_gpt2_weights(runs, tmp_path):
    from llmjax.config import ConfigError
    from llmjax.train import train

    folder = X.export(runs["vanilla"], "safetensors", tmp_path / "hf")
    src, _ = run_params(runs["vanilla"])
    cfg = llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", BPE | {
        "train.max_steps": 1, "train.batch_size": 8, "train.lr": 0.0, "train.min_lr": 0.0, "eval.num_batches": 1,
        "eval.sample_tokens": 0, "logging.progress_bar": False, "train.init_from": str(folder)})
    train(cfg, tmp_path / "ft", quiet=True)
    got, _ = run_params(tmp_path / "ft")  # lr 0: the weights are the imported ones
    assert np.array_equal(got["embed"]["embedding"][:50257], src["embed"]["embedding"][:50257])
    assert not got["embed"]["embedding"][50257:].any()
    for a, b in zip(jax.tree.leaves({**got, "embed": None}), jax.tree.leaves({**src, "embed": None})):
        assert np.array_equal(a, b)
    bad = cfg.copy_and_resolve_references()
    with bad.unlocked():
        bad.model.d_ff = 128
    with pytest.raises(ConfigError, match="train.init_from: GPT-2 tensor .* has shape"):
        train(bad, tmp_path / "bad", quiet=True)
    with bad.unlocked():  # a longer context than the weights' (a shorter one keeps their first rows: the test above)
        bad.model.d_ff, bad.model.context_len = 256, 128
    with pytest.raises(ConfigError, match=r"^train.init_from: the GPT-2 weights hold 64 positions .* set --config.model.context_len=64 or lower$"):
        train(bad, tmp_path / "long", quiet=True)
    with bad.unlocked():
        bad.model.context_len = 64
    # the same shapes, another model: 2 heads of 32 (the folder's config.json: 4 of 16), another epsilon
    with bad.unlocked():
        bad.model.d_ff, bad.model.n_head, bad.model.head_dim, bad.model.norm_eps = 256, 2, 32, 1e-6
    with pytest.raises(ConfigError, match=r"^train.init_from: .*hf/config.json describes another model than the config \(n_head=4, the "
                                          r"config 2, head_dim=16, the config 32, norm_eps=1e-05, the config 1e-06\); set "
                                          r"--config.model.n_head=4 --config.model.head_dim=16 --config.model.norm_eps=1e-05 "):
        train(bad, tmp_path / "heads", quiet=True)
    assert not (tmp_path / "heads").exists()
    with bad.unlocked():
        bad.model.n_head, bad.model.head_dim, bad.model.norm_eps = 4, 16, 1e-5
        bad.model.d_ff, bad.train.init_from = 256, str(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="neither gpt2"):
        train(bad, tmp_path / "bad2", quiet=True)


def test_unsupported_exports_are_one_line_errors(runs, tmp_path):
    with pytest.raises(X.ExportError, match="hold `modern` models, not `vanilla`; supported"):
        X.export(runs["vanilla"], "gguf", tmp_path / "x.gguf")
    with pytest.raises(X.ExportError, match="unknown format 'onnx'"):
        X.export(runs["vanilla"], "onnx", tmp_path / "x")
    with pytest.raises(X.ExportError, match="hold `modern` models, not `ssm`"):
        X.check_llama(llmjax.model_config(config("ssm")))
    with pytest.raises(X.ExportError, match="holds `vanilla` models, not `modern`"):
        X.check_gpt2(llmjax.model_config(config("modern")))
    with pytest.raises(X.ExportError, match="bias=True"):
        X.check_gpt2(llmjax.model_config(config("vanilla", bias=False)))
    # a character-level run: the vocabulary is said first (the bias=True hint came first, and a run
    # retrained with it was refused for its vocabulary)
    char = tmp_path / "char"
    shutil.copytree(runs["vanilla"], char)
    chars = "".join(chr(i) for i in range(0x100, 0x100 + 50257))
    (char / "tokenizer.json").write_text(json.dumps({"kind": "char", "vocab_size": 50257, "chars": chars}))
    cfg = json.loads((char / "config.json").read_text())
    cfg["model"]["bias"] = False
    (char / "config.json").write_text(json.dumps(cfg))
    meta = char / "checkpoints" / "2" / "meta" / "metadata"  # (the model its checkpoint records, as a bias=False run's)
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "model": cfg["model"]}))
    with pytest.raises(X.ExportError, match="ships the GPT-2 BPE tokenizer; this model has another vocabulary .a character-level run cannot "
                                            "be exported: train a GPT-2 BPE one"):
        X.export(char, "safetensors", tmp_path / "c")
    # a character-level run of an architecture no layout holds: the architecture is said first (the
    # vocabulary's hint, "train a GPT-2 BPE one", led to a retrained run refused for its architecture);
    # gqa with n_kv_head == n_head holds vanilla's weights
    cfg["model"].update(arch="gqa", bias=True, n_kv_head=cfg["model"]["n_head"])
    (char / "config.json").write_text(json.dumps(cfg))
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "model": cfg["model"]}))
    with pytest.raises(X.ExportError, match=r"^no Hugging Face layout for `gqa`; supported"):
        X.export(char, "safetensors", tmp_path / "c")
    char_llama = tmp_path / "char_llama"  # (GGUF: refused before its folder is made)
    shutil.copytree(runs["modern"], char_llama)
    (char_llama / "tokenizer.json").write_text(json.dumps({"kind": "char", "vocab_size": 50257, "chars": chars}))
    with pytest.raises(X.ExportError, match="embeds the GPT-2 BPE tokenizer; this model has another vocabulary"):
        X.export(char_llama, "gguf", tmp_path / "new" / "m.gguf")
    assert not (tmp_path / "new").exists()
    r = subprocess.run([sys.executable, "-m", "llmjax.export", f"--checkpoint={runs['vanilla']}", "--format=gguf", f"--out={tmp_path / 'y'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "supported" in r.stderr and r.stderr.count("\n") == 1, r.stderr


# --- parity with transformers (where torch and transformers are installed: the GPU machine) ----------


def _hf_logits(folder, tokens):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("arch", ["vanilla", "modern"])
def test_logits_match_transformers(runs, tmp_path, arch):
    pytest.importorskip("transformers")
    folder = X.export(runs[arch], "safetensors", tmp_path / arch)
    _, loaded = run_params(runs[arch])
    tokens = np.random.default_rng(0).integers(0, 50257, (2, 20)).tolist()
    ours = np.asarray(loaded.model(jnp.asarray(tokens, jnp.int32))[0])[..., :50257]
    np.testing.assert_allclose(_hf_logits(folder, tokens), ours, rtol=1e-4, atol=2e-4)


def test_sample_and_evaluate_gpt2_weights_without_a_run(runs, tmp_path, monkeypatch):
    """`load` takes OpenAI GPT-2 directly: a hub name (mocked hub) or a Hugging Face GPT-2 folder."""
    from llmjax.evaluate import load_for_scoring
    from llmjax.sample import Sampling, load

    folder = X.export(runs["vanilla"], "safetensors", tmp_path / "hf")
    _, ref = run_params(runs["vanilla"])
    toks = jnp.asarray(np.random.default_rng(1).integers(0, 50257, (2, 16)), jnp.int32)
    want = np.asarray(ref.model(toks)[0])[..., :50257]
    got = load(folder, dtype="float32")
    assert got.step == 0 and got.tokenizer.eot_id == 50256 and got.model.cfg.context_len == 64
    np.testing.assert_allclose(np.asarray(got.model(toks)[0])[..., :50257], want, atol=1e-5)
    import huggingface_hub

    calls = []

    def fake_download(repo, filename, **kw):
        calls.append((repo, filename))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    hub = load_for_scoring("gpt2", dtype="float32")
    assert ("openai-community/gpt2", "model.safetensors") in calls
    np.testing.assert_allclose(np.asarray(hub.model(toks)[0])[..., :50257], want, atol=1e-5)
    assert load("gpt2", dtype="float32", quantize="int8").model.__class__.__name__ == "Int8LM"
    # a local run or folder called gpt2 is the user's, not the hub's (it went to the hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").symlink_to(runs["vanilla"])
    calls.clear()
    assert not X.is_gpt2_source("gpt2") and load("gpt2").step == 2 and not calls
    # a GPT-2 folder exported before is exported again (its layers came unrolled: a KeyError)
    again = X.export(folder, "safetensors", tmp_path / "again", dtype="float16")
    np.testing.assert_allclose(np.asarray(load(again, dtype="float32").model(toks)[0])[..., :50257], want, atol=0.05)
    with pytest.raises(SampleError, match="needs quantize='int8'"):  # (it was ignored)
        load(folder, quantize_embeddings=True)
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(SampleError, match=r"^'.*noweights' is neither gpt2, .* \(holding model.safetensors\)$"):
        load(tmp_path / "noweights")
    assert X.gpt2_model_config({"model_type": "gpt2"})["d_model"] == 768  # transformers' defaults for keys left out
    # the command line on that folder: `-m` ran sample.py as __main__, whose Sampling was not the one export's
    # load_gpt2 imported (a traceback: "sampling must be a Sampling ..., got Sampling(temperature=0.8, ...)")
    r = subprocess.run([sys.executable, "-m", "llmjax.sample", f"--checkpoint={folder}", "--prompt=Hi", "--max_new_tokens=4", "--greedy",
                        "--dtype=float32"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    greedy = load(folder, dtype="float32").generate_text(["Hi"], 4, sampling=Sampling(greedy=True))
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "Hi" + greedy[0] + "\n"), r.stderr


def test_hub_init_from_reads_cached_weights_without_their_config(runs, tmp_path, monkeypatch):
    """train.init_from=gpt2 with only the hub weights at hand (offline, cached by a version that did
    not fetch config.json): the heads and epsilon check that reads the hub's config.json is skipped,
    not the import refused; with the config at hand, one of other heads is refused."""
    import huggingface_hub

    from llmjax.sample import load

    folder = X.export(runs["vanilla"], "safetensors", tmp_path / "hf")
    mcfg = load(folder, dtype="float32").model.cfg

    def weights_only(repo, filename, **kw):
        if filename != "model.safetensors":
            raise OSError("offline, and not in the cache")
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", weights_only)
    assert any(k.endswith("wte.weight") for k in X.read_gpt2("gpt2", mcfg))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **kw: str(folder / filename))
    assert any(k.endswith("wte.weight") for k in X.read_gpt2("gpt2", mcfg))
    with pytest.raises(X.ExportError, match=r"config\.json describes another model than the config \(n_head="):
        X.read_gpt2("gpt2", mcfg.replace(n_head=mcfg.n_head * 2, head_dim=mcfg.head_dim // 2))


def test_export_write_failures_are_one_line(runs, tmp_path):
    """A place that cannot be written (a file in the way, a full disk) is an ExportError naming it,
    with nothing replaced (tracebacks before); an --out that is a link to an earlier export is
    replaced where it lies, the link kept (a traceback, and junk left)."""
    (tmp_path / "afile").write_text("x")
    with pytest.raises(X.ExportError, match=r"cannot write .*afile/exp: .*; nothing was replaced"):
        X.export(runs["vanilla"], "safetensors", tmp_path / "afile" / "exp")
    (tmp_path / "d.gguf").mkdir()
    with pytest.raises(X.ExportError, match="is a folder; give the .gguf file's name"):
        X.export(runs["modern"], "gguf", tmp_path / "d")  # (d.gguf, once the suffix is added)
    v1 = X.export(runs["vanilla"], "safetensors", tmp_path / "v1")
    (tmp_path / "latest").symlink_to(v1)
    assert X.export(runs["vanilla"], "safetensors", tmp_path / "latest", dtype="float16") == v1
    assert (tmp_path / "latest").is_symlink() and json.loads((v1 / "config.json").read_text())["torch_dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d.gguf", "latest", "v1"]
    # a full disk: the shell's file-size limit (EFBIG, as ENOSPC; it holds for root too)
    script = (f"from llmjax import export as X\ntry:\n    X.export({str(runs['vanilla'])!r}, 'safetensors', {str(tmp_path / 'big')!r})\n"
              "except X.ExportError as e:\n    print(e)")
    r = subprocess.run(["bash", "-c", f"ulimit -f 200; exec {sys.executable} -c \"$0\"", script], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.stdout.startswith(f"cannot write {tmp_path / 'big'}: ") and "nothing was replaced" in r.stdout, r.stdout + r.stderr[-2000:]
    assert not (tmp_path / "big").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_an_out_one_may_not_look_at_is_one_line(runs, tmp_path, monkeypatch):
    """An --out under a folder the user may not enter: its checks' stat of it raises EACCES (pathlib
    passes that on), which was a PermissionError's traceback. Root enters any folder, so the stat is
    made to answer as the kernel does for another user."""
    from helpers import deny_under

    locked = tmp_path / "locked"
    deny_under(monkeypatch, locked)
    for arch, fmt, out in (("vanilla", "safetensors", locked / "inner" / "exp"), ("modern", "gguf", locked / "inner" / "m.gguf")):
        with pytest.raises(X.ExportError, match=f"^cannot write {re.escape(str(out))}: Permission denied \\(.*\\); nothing was replaced$"):
            X.export(runs[arch], fmt, out)
    assert not locked.exists()


def test_gpt2_weights_one_may_not_look_at_are_one_line(tmp_path, monkeypatch):
    """train.init_from (and GPT-2 import) of a folder or file under a folder the user may not enter
    was a PermissionError's traceback (pathlib passes EACCES on); the stat answers as for another user."""
    from helpers import deny_under

    locked = tmp_path / "locked"
    deny_under(monkeypatch, locked)
    mcfg = llmjax.model_config(config("vanilla", vocab_size=50257, padded_vocab_size=50304))
    for source in (locked / "hf", locked / "model.safetensors"):
        with pytest.raises(X.ExportError, match=f"^cannot read {re.escape(str(source))}: Permission denied \\(.*\\)$"):
            X.read_gpt2(str(source), mcfg)


def test_a_weight_float16_cannot_hold_is_refused_not_written_as_inf(runs, tmp_path, monkeypatch):
    """--dtype float16 wrote a weight beyond float16's 65504 as inf without a word (a model whose
    every forward through that layer is NaN). Now one line naming the tensor and the magnitude, and
    nothing written: an earlier export untouched, no new folder, nothing left behind. 65519 (which
    float16 rounds to 65504, not to inf) is exported; float32 exports keep the weight exactly. A
    weight already NaN or inf (a run that diverged) is refused too, in float32 as well."""
    import llmjax.sample as S

    real_load = S.load

    def with_weight(value, layer="fc"):
        def load(*a, **kw):
            loaded = real_load(*a, **kw)
            kernel = getattr(loaded.model.blocks.layers.mlp, layer).kernel
            kernel[...] = kernel[...].at[1, 2, 3].set(value)
            return loaded
        monkeypatch.setattr(S, "load", load)

    from safetensors.numpy import load_file

    earlier = X.export(runs["vanilla"], "safetensors", tmp_path / "exp", dtype="float16")
    before = {f.name: f.read_bytes() for f in earlier.iterdir()}
    with_weight(-7e4)
    needle = (r"^transformer.h.1.mlp.c_fc.weight holds a weight of magnitude 70000, beyond float16's largest 65504 \(it would be "
              r"written as inf\); export with --dtype float32 \(bfloat16 holds it too: convert that export\)$")
    for out in (earlier, tmp_path / "new" / "exp"):
        with pytest.raises(X.ExportError, match=needle):
            X.export(runs["vanilla"], "safetensors", out, dtype="float16")
    assert {f.name: f.read_bytes() for f in earlier.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    got = load_file(str(X.export(runs["vanilla"], "safetensors", tmp_path / "f32") / "model.safetensors"))
    assert got["transformer.h.1.mlp.c_fc.weight"][2, 3] == -7e4 and np.isfinite(got["transformer.h.1.mlp.c_fc.weight"]).all()
    with_weight(65519.0)  # (rounds to float16's largest)
    got = load_file(str(X.export(runs["vanilla"], "safetensors", tmp_path / "edge", dtype="float16") / "model.safetensors"))
    assert got["transformer.h.1.mlp.c_fc.weight"][2, 3] == 65504 and np.isfinite(got["transformer.h.1.mlp.c_fc.weight"]).all()
    # modern: its Hugging Face tensors (transposed) and its GGUF
    with_weight(float(np.float32(1e5)), layer="up")
    with pytest.raises(X.ExportError, match=r"^model.layers.1.mlp.up_proj.weight holds a weight of magnitude 100000, beyond float16's"):
        X.export(runs["modern"], "safetensors", tmp_path / "llama", dtype="float16")
    pytest.importorskip("gguf")
    monkeypatch.setattr(S, "load", real_load)
    gguf_path = X.export(runs["modern"], "gguf", tmp_path / "m.gguf", dtype="float16")
    gguf_bytes = gguf_path.read_bytes()
    with_weight(1e5, layer="up")
    for out in (gguf_path, tmp_path / "newdir" / "m.gguf"):
        with pytest.raises(X.ExportError, match=r"^blk.1.ffn_up.weight holds a weight of magnitude 100000, beyond float16's largest 65504"):
            X.export(runs["modern"], "gguf", out, dtype="float16")
    assert gguf_path.read_bytes() == gguf_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge", "exp", "f32", "m.gguf"]
    # a weight that is NaN or inf already (a diverged run) is refused in every dtype and format (it was exported)
    diverged = r"holds 1 weight\(s\) that are NaN or inf \(the run diverged before this checkpoint\); export an earlier checkpoint"
    for value in (np.nan, -np.inf):
        with_weight(value)
        for dtype in ("float32", "float16"):
            with pytest.raises(X.ExportError, match=r"^transformer.h.1.mlp.c_fc.weight " + diverged):
                X.export(runs["vanilla"], "safetensors", earlier, dtype=dtype)
        with_weight(value, layer="up")
        with pytest.raises(X.ExportError, match=r"^model.layers.1.mlp.up_proj.weight " + diverged):
            X.export(runs["modern"], "safetensors", tmp_path / "llama", dtype="float32")
        with pytest.raises(X.ExportError, match=r"^model.layers.1.mlp.up_proj.weight " + diverged):  # (the GGUF's source tensor)
            X.export(runs["modern"], "gguf", gguf_path, dtype="float32")
    assert {f.name: f.read_bytes() for f in earlier.iterdir()} == before and gguf_path.read_bytes() == gguf_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge", "exp", "f32", "m.gguf"]


def test_exports_never_overwrite_files_or_folders_that_are_not_exports(runs, tmp_path):
    """A .gguf --out that is a user's file (not GGUF, or a GGUF that is not an llmjax export) and a
    folder holding a Hugging Face model that is not an llmjax export (only names an export also
    writes: config.json, model.safetensors) are refused and left as they were; a .gguf --out that is
    a link to an earlier export is replaced where it lies, the link kept."""
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    with pytest.raises(X.ExportError, match=r"notes.gguf is not an earlier llmjax export"):
        X.export(runs["modern"], "gguf", notes)
    assert notes.read_text() == "my notes"
    user = tmp_path / "user_hf"
    user.mkdir()
    (user / "config.json").write_text('{"model_type": "llama", "hidden_size": 4096}')
    (user / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(X.ExportError, match=r"user_hf holds a model that is not an earlier llmjax export"):
        X.export(runs["modern"], "safetensors", user)
    assert (user / "model.safetensors").read_bytes() == b"weights" and sorted(p.name for p in user.iterdir()) == ["config.json", "model.safetensors"]
    gguf = pytest.importorskip("gguf")
    # llama.cpp's own conversion of an exported model: architecture llama with the GPT-2 tokenizer,
    # as an export's, without llmjax's key (it was taken for an earlier export and written over)
    # and llama.cpp's quantize of an export, which copies every key, llmjax's too, and sets its file type (Q4_K_M)
    for name, mark in (("converted", None), ("quantized", gguf.LlamaFileType.MOSTLY_Q4_K_M)):
        converted = tmp_path / f"{name}.gguf"
        w = gguf.GGUFWriter(str(converted), arch="llama")
        w.add_name(f"llama.cpp's {name} export")
        if mark is not None:
            w.add_string(X.GGUF_MARK, "1")
            w.add_file_type(mark)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        data = converted.read_bytes()
        with pytest.raises(X.ExportError, match=rf"{name}.gguf is not an earlier llmjax export \(another file, a GGUF of another source "
                                                r"or file type, or an export from before 2026-12-07, which lacks the 'llmjax.export' key\); "
                                                r"give a new name \(or move that file aside\)$"):
            X.export(runs["modern"], "gguf", converted)
        assert converted.read_bytes() == data
    first = X.export(runs["modern"], "gguf", tmp_path / "v1.gguf")
    assert X.gguf_strings(first, [X.GGUF_MARK, "general.file_type"]) == {X.GGUF_MARK: "1", "general.file_type": 0}
    (tmp_path / "latest.gguf").symlink_to(first)
    assert X.export(runs["modern"], "gguf", tmp_path / "latest.gguf", dtype="float16") == first
    assert (tmp_path / "latest.gguf").is_symlink() and first.stat().st_size < 10_000_000
    again = X.export(runs["modern"], "gguf", first)  # an earlier export: replaced
    assert again == first and first.stat().st_size > 10_000_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_gpt2_folders_that_are_not_gpt2s_math_are_refused(tmp_path):
    """A Hugging Face GPT-2 folder with another vocabulary (nanoGPT's padded 50304: sampling then
    stopped with a KeyError from the tokenizer) or options that change GPT-2's computation is one
    line, not a silently different model."""
    from llmjax.sample import load
    from safetensors.numpy import save_file

    mcfg = llmjax.model_config(config("vanilla", vocab_size=50257, padded_vocab_size=50304))
    p = jax.tree.map(np.asarray, params(llmjax.build_model(mcfg, seed=0)))
    good = X.gpt2_config(mcfg)
    for name, change, needle in [("v50304", {"vocab_size": 50304}, "vocab_size=50304"),
                                 ("relu", {"activation_function": "relu"}, "activation_function='relu'"),
                                 ("unscaled", {"scale_attn_weights": False}, "scale_attn_weights=False"),
                                 ("bylayer", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
                                 # an output head of its own, which transformers reads and a tied head would ignore
                                 ("untied", {"tie_word_embeddings": False}, "tie_word_embeddings=False"),
                                 ("lm_head", {}, "output head (lm_head.weight) of their own")]:
        folder = tmp_path / name
        folder.mkdir()
        t = X.gpt2_tensors(p, mcfg)
        if "vocab_size" in change:
            t["transformer.wte.weight"] = np.concatenate([t["transformer.wte.weight"], np.ones((47, 64), np.float32)])
        if name in ("untied", "lm_head"):
            t["lm_head.weight"] = np.random.default_rng(0).standard_normal(t["transformer.wte.weight"].shape).astype(np.float32)
        save_file(t, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(SampleError, match=re.escape(needle)):
            load(folder)
    with pytest.raises(X.ExportError, match="output head .* of their own"):  # (train.init_from of the bare file)
        X.params_from_gpt2(X.read_gpt2(str(tmp_path / "lm_head" / "model.safetensors")), mcfg)
    folder = tmp_path / "ok"
    folder.mkdir()
    t = X.gpt2_tensors(p, mcfg)
    save_file({**t, "lm_head.weight": t["transformer.wte.weight"]}, str(folder / "model.safetensors"))  # (a tied head saved too)
    (folder / "config.json").write_text(json.dumps({**good, "activation_function": "gelu_pytorch_tanh"}))
    assert load(folder).model.cfg.vocab_size == 50257


def test_init_from_what_is_not_gpt2_weights_says_what_it_is(tmp_path):
    """train.init_from (read_gpt2 with the run's model) of a Hugging Face Llama folder (llmjax's own
    `modern` export) or of an llmjax training run read its config.json as GPT-2's with GPT-2 small's
    defaults: "describes another model than the config (n_head=12, ...); set --config.model.n_head=12
    --config.model.head_dim=64", advice that led to another refusal; and a `modern` config with real
    GPT-2 weights was told to set GPT-2's heads before it was told GPT-2 is a `vanilla` model."""
    vanilla = llmjax.model_config(config("vanilla", vocab_size=50257, padded_vocab_size=50304))
    modern = llmjax.model_config(config("modern", vocab_size=50257, padded_vocab_size=50304))
    weights = "GPT-2 weights are gpt2, gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder or a .safetensors file"
    llama, run, gpt2 = tmp_path / "llama", tmp_path / "run", tmp_path / "gpt2"
    for folder, cfg in ((llama, X.llama_config(modern)), (run, {"model": {"arch": "vanilla", "n_head": 4, "head_dim": 16}}),
                        (gpt2, X.gpt2_config(llmjax.model_config(config("vanilla", "default"))))):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
    (run / "checkpoints").mkdir()
    with pytest.raises(X.ExportError, match=f"^'{re.escape(str(llama))}' is a Hugging Face 'llama' model folder, not GPT-2; {weights}$"):
        X.read_gpt2(str(llama), vanilla)
    with pytest.raises(X.ExportError, match=f"^'{re.escape(str(run))}' is an llmjax training run, not GPT-2 weights; {weights} "):
        X.read_gpt2(str(run), vanilla)
    with pytest.raises(X.ExportError, match="^GPT-2 weights are a `vanilla` model, not `modern`: start from them with configs/vanilla.py"):
        X.read_gpt2(str(gpt2), modern)


def test_an_offline_hub_lookup_is_one_line(monkeypatch, capfd, caplog):
    """`--checkpoint=gpt2` offline with nothing cached: huggingface_hub logs a warning for each try of
    the download (six in about 23 s, each twice: its own handler's line and absl's), all before our
    one-line error. The lookup holds the hub's logger to errors, and leaves it as it was; the line says
    what happened in full (the hub's words were cut at 200 characters, mid-sentence)."""
    import logging

    import huggingface_hub
    import huggingface_hub.utils._http as hub_http  # (its import gives the hub's logger its level and stderr handler)
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level

    def offline(repo, filename, **kw):  # (as the hub does: its _http module's warning, then the error)
        hub_http.logger.warning(f"'[Errno -2] Name or service not known' thrown while requesting HEAD {repo}")
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we cannot find the requested files "
                                      "in the local cache. Please check your connection and try again or make sure your Internet connection is on.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with caplog.at_level(logging.WARNING), pytest.raises(X.ExportError, match=(
            r"^cannot download openai-community/gpt2: the Hugging Face hub cannot be reached \(offline\?\) and its cache holds no copy; "
            r"connect, or pass a local folder or \.safetensors file instead$")):
        X.read_gpt2("gpt2")
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")], caplog.text
    assert capfd.readouterr().err == "" and hub_log.level == level


def test_out_under_the_home_folder_is_written_there(runs, tmp_path, monkeypatch):
    """`--out=~/exported/NAME` (the shell leaves a `~` after `=` as it is): the export went to a
    folder literally named `~` under the working directory, while --checkpoint=~/... was expanded."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert X.export(runs["vanilla"], "safetensors", "~/exported/v") == tmp_path / "home" / "exported" / "v"
    assert (tmp_path / "home" / "exported" / "v" / "model.safetensors").is_file()
    pytest.importorskip("gguf")
    assert X.export(runs["modern"], "gguf", "~/exported/m") == tmp_path / "home" / "exported" / "m.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"] and (tmp_path / "home" / "exported" / "m.gguf").is_file()


def test_out_that_is_the_working_folder_is_refused(runs, tmp_path, monkeypatch):
    """`--out .` (an empty folder, or an earlier export, one is in) was "PosixPath('.') has an empty
    name"; by another name it was replaced whole, leaving the shell in a deleted folder. Both are
    one line saying where to run it from; from there it is written."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for out in (".", here):
        with pytest.raises(X.ExportError, match=r"^--out \S+ is the folder you are in, which an export replaces whole .*\(cd \.\. and --out here\)$"):
            X.export(runs["vanilla"], "safetensors", out)
    assert not any(here.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    monkeypatch.chdir(tmp_path)
    assert X.export(runs["vanilla"], "safetensors", "here") == Path("here") and sorted(p.name for p in here.iterdir()) == sorted(X.EXPORT_FILES)
