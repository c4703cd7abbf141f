"""llmjax.aot: compiling for a GPU without one, and reading what XLA made.

The HLO reader is checked against a hand-written module (exact counts, bytes, FLOPs); the real GPU
compile (JAX's CUDA plugin in ./.aot, which `scripts/test.sh` installs) runs in a subprocess, since
the plugin must be found before JAX starts its backends, and is checked against the model's own
arithmetic: the GEMM FLOPs of a bf16 training step, the bytes of its arguments, no float32 GEMM
outside XLA's attention, and the sampler's padding row at batch 1 keeping its products GEMMs."""

import ast
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from helpers import built_once
from llmjax import aot
from llmjax.config import load_config, model_config
from llmjax.registry import build_model
from llmjax.train import make_optimizer

from conftest import ROOT

HLO = """HloModule m, entry_computation_layout={()->f32[8,16]{1,0}}

%fused_dot (param_0: bf16[8,32], param_1: bf16[32,16]) -> f32[8,16] {
  %param_0 = bf16[8,32]{1,0} parameter(0)
  %param_1 = bf16[32,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/head/dot_general"}
}

%fused_gather (param_0.1: f32[1000,16], param_1.1: s32[8,1]) -> f32[8,16] {
  %param_0.1 = f32[1000,16]{1,0} parameter(0)
  %bitcast.9 = f32[1000,1,16]{2,1,0} bitcast(%param_0.1)
  %param_1.1 = s32[8,1]{1,0} parameter(1)
  ROOT %gather.1 = f32[8,16]{1,0} gather(%bitcast.9, %param_1.1), offset_dims={1}, collapsed_slice_dims={0,1}, start_index_map={0}, index_vector_dim=1, slice_sizes={1,1,16}
}

%fused_dus (param_0.2: f32[1000,16], param_1.2: f32[8,16], param_2.2: s32[]) -> f32[1000,16] {
  %param_0.2 = f32[1000,16]{1,0} parameter(0)
  %param_1.2 = f32[8,16]{1,0} parameter(1)
  %param_2.2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dus.1 = f32[1000,16]{1,0} dynamic-update-slice(%param_0.2, %param_1.2, %param_2.2, %zero)
}

%fused_add (param_0.3: f32[8,16], param_1.3: f32[8,16]) -> f32[8,16] {
  %param_0.3 = f32[8,16]{1,0} parameter(0)
  %param_1.3 = f32[8,16]{1,0} parameter(1)
  ROOT %add.1 = f32[8,16]{1,0} add(%param_0.3, %param_1.3)
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %add_fusion = f32[8,16]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %add_fusion)
}

%cond (p.1: (s32[], f32[8,16])) -> pred[] {
  %p.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %lim = s32[] constant(5)
  ROOT %lt_fusion = pred[] compare(%i.1, %lim), direction=LT
}

ENTRY %main (a: bf16[8,32], b: bf16[32,16], table: f32[1000,16], idx: s32[8,1], pos: s32[]) -> f32[8,16] {
  %a = bf16[8,32]{1,0} parameter(0)
  %b = bf16[32,16]{1,0} parameter(1)
  %table = f32[1000,16]{1,0} parameter(2)
  %idx = s32[8,1]{1,0} parameter(3)
  %pos = s32[] parameter(4)
  %gemm_fusion = f32[8,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot
  %gather_fusion = f32[8,16]{1,0} fusion(%table, %idx), kind=kLoop, calls=%fused_gather
  %dus_fusion = f32[1000,16]{1,0} fusion(%table, %gather_fusion, %pos), kind=kLoop, calls=%fused_dus
  %attn = (bf16[8,16]{1,0}, u8[0]{0}) custom-call(%a), custom_call_target="__cudnn$fmhaSoftmax"
  %zero.1 = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%zero.1, %gemm_fusion)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_the_hlo_reader_counts_launches_bytes_and_flops():
    ks = {k.name: k for k in aot.kernels(HLO)}
    assert set(ks) == {"gemm_fusion", "gather_fusion", "dus_fusion", "attn", "add_fusion"}
    g = ks["gemm_fusion"]
    assert (g.kind, g.count, g.flops, g.types, g.op) == ("gemm", 1, 2 * 8 * 16 * 32, ["bf16xbf16->f32"], "jit(f)/head/dot_general")
    assert g.bytes == 8 * 32 * 2 + 32 * 16 * 2 + 8 * 16 * 4
    # a gather reads its slices (through a bitcast), not the table; an in-place update writes its update
    assert ks["gather_fusion"].bytes == 8 * 16 * 4 + 8 * 4 + 8 * 16 * 4
    assert ks["dus_fusion"].bytes == 8 * 16 * 4 + 4 + 8 * 16 * 4
    assert ks["attn"].kind == "attention"
    # body x trip count, and no condition: with a known trip count XLA's WhileThunk runs only the body
    assert ks["add_fusion"].count == 5
    unknown = {k.name: k.count for k in aot.kernels(HLO.replace(', backend_config={"known_trip_count":{"n":"5"}}', ""))}
    assert (unknown["add_fusion"], unknown["lt_fusion"]) == (1, 2)  # (an unknown count: once, the condition once more)
    s = aot.summarize_kernels(list(ks.values()), "h100")
    assert s["kernels"] == 1 + 1 + 1 + 1 + 5 and s["gemm_kernels"] == 1 and s["attention_kernels"] == 1
    assert s["gemm_flops_by_type"] == {"bf16xbf16->f32": 2 * 8 * 16 * 32} and s["wide_gemm_types"] == []
    h100 = aot.TARGETS["h100"]
    other = ks["gather_fusion"].bytes + ks["dus_fusion"].bytes + 5 * ks["add_fusion"].bytes
    assert s["other_bytes"] == other
    assert s["roofline_ms"] == pytest.approx(1e3 * (max(g.flops / h100["peak_bf16"], g.bytes / h100["bandwidth"]) + other / h100["bandwidth"]))


SLICE_HLO = """
HloModule m

%fused_slice (p0: bf16[64,16]) -> f32[8,16] {
  %p0 = bf16[64,16]{1,0} parameter(0)
  %c = f32[64,16]{1,0} convert(%p0)
  ROOT %s = f32[8,16]{1,0} slice(%c), slice={[0:8], [0:16]}
}

ENTRY %main (x: bf16[64,16]) -> f32[8,16] {
  %x = bf16[64,16]{1,0} parameter(0)
  ROOT %f = f32[8,16]{1,0} fusion(%x), kind=kLoop, calls=%fused_slice
}
"""


def test_a_fused_slice_reads_its_part_in_the_operands_type():
    """A fusion that slices an operand reads the slice alone (a kernel computes each output element
    from its own input element), in the operand's type where XLA converts before slicing (counted
    whole, the Linformer's keys and values stored together were read twice per decode step)."""
    (k,) = aot.kernels(SLICE_HLO)
    assert k.bytes == 8 * 16 * 2 + 8 * 16 * 4


ASYNC_HLO = """
HloModule m

%fused_mul (p0: f32[64,64]) -> f32[64,64] {
  %p0 = f32[64,64]{1,0} parameter(0)
  ROOT %m = f32[64,64]{1,0} multiply(%p0, %p0)
}

%fused_dus_conv (q0: bf16[4096,256], q1: f32[1,256], q2: s32[]) -> f32[4096,256] {
  %q0 = bf16[4096,256]{1,0} parameter(0)
  %q1 = f32[1,256]{1,0} parameter(1)
  %q2 = s32[] parameter(2)
  %c = f32[4096,256]{1,0} convert(%q0)
  %z = s32[] constant(0)
  ROOT %d = f32[4096,256]{1,0} dynamic-update-slice(%c, %q1, %q2, %z)
}

ENTRY %main (x: f32[64,64], a: bf16[4,32,64], b: bf16[4,64,16], e: f8e4m3fnuz[1024], h: bf16[4096,256], u: f32[1,256], i: s32[]) -> f32[64,64] {
  %x = f32[64,64]{1,0} parameter(0)
  %a = bf16[4,32,64]{2,1,0} parameter(1)
  %b = bf16[4,64,16]{2,1,0} parameter(2)
  %e = f8e4m3fnuz[1024]{0} parameter(3)
  %h = bf16[4096,256]{1,0} parameter(4)
  %u = f32[1,256]{1,0} parameter(5)
  %i = s32[] parameter(6)
  %fs = ((f32[64,64]{1,0}), f32[64,64]{1,0}, u32[]) fusion-start(%x), kind=kLoop, calls=%fused_mul
  %fd = f32[64,64]{1,0} fusion-done(%fs)
  %g = (bf16[4,32,16]{2,1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["2"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":["0"],"rhs_batch_dimensions":["0"]}}}
  %cv = f32[1024]{0} convert(%e)
  %dc = f32[4096,256]{1,0} fusion(%h, %u, %i), kind=kLoop, calls=%fused_dus_conv
  ROOT %r = f32[64,64]{1,0} copy(%fd)
}
"""


def test_async_fusions_library_workspaces_and_converted_updates():
    """An async fusion (fusion-start / -done) is read as a fusion (its operand and output, not its
    result tuple); a cuBLAS call's scratch workspace is not data; an update "in place" of a converted
    copy writes the whole result; every float8 type has its size."""
    ks = {k.name: k for k in aot.kernels(ASYNC_HLO)}
    assert set(ks) == {"fs", "g", "cv", "dc", "r"}
    assert ks["fs"].bytes == 2 * 64 * 64 * 4
    g = ks["g"]
    assert g.kind == "gemm" and g.flops == 2 * 4 * 32 * 16 * 64 and g.bytes == (4 * 32 * 64 + 4 * 64 * 16 + 4 * 32 * 16) * 2
    assert ks["cv"].bytes == 1024 * 4 + 1024
    assert ks["dc"].bytes == 4096 * 256 * 2 + 256 * 4 + 4 + 4096 * 256 * 4


PRECISION_HLO = """
HloModule m

%fused_dot.d (a: f32[64,256], b: f32[256,128]) -> f32[64,128] {
  %a = f32[64,256]{1,0} parameter(0)
  %b = f32[256,128]{1,0} parameter(1)
  ROOT %d = f32[64,128]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_dot.h (a.1: f32[64,256], b.1: f32[256,128]) -> f32[64,128] {
  %a.1 = f32[64,256]{1,0} parameter(0)
  %b.1 = f32[256,128]{1,0} parameter(1)
  ROOT %d.1 = f32[64,128]{1,0} dot(%a.1, %b.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, operand_precision={highest,highest}
}

ENTRY %main (x: f32[64,256], w: f32[256,128]) -> f32[64,128] {
  %x = f32[64,256]{1,0} parameter(0)
  %w = f32[256,128]{1,0} parameter(1)
  %tf32 = f32[64,128]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot.d
  %full = f32[64,128]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot.h
  %lib = (f32[64,128]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"precision_config":{"operand_precision":["HIGHEST","HIGHEST"],"algorithm":"ALG_UNSET"}}}
  ROOT %r = f32[64,128]{1,0} add(%tf32, %full)
}
"""


def test_float32_gemms_at_highest_precision_are_rated_at_the_cuda_cores_rate():
    """A float32 GEMM at the default precision runs as tf32 on a GPU's tensor cores; one asked for
    at Precision.HIGHEST (in a fusion's dot, or a cuBLAS call's backend config) runs on the CUDA
    cores, 7x slower on an H100: the roofline rates each at its own peak (it rated both at tf32's)."""
    ks = {k.name: k for k in aot.kernels(PRECISION_HLO)}
    assert ks["tf32"].types == ["f32xf32->f32"]
    assert ks["full"].types == ks["lib"].types == ["f32xf32->f32 (highest)"]
    t = aot.TARGETS["h100"]
    assert aot.gemm_rate(ks["tf32"], t) == t["peak_tf32"]
    assert aot.gemm_rate(ks["full"], t) == aot.gemm_rate(ks["lib"], t) == t["peak_fp32"] < t["peak_tf32"] / 7
    flops = 2 * 64 * 128 * 256
    s = aot.summarize_kernels([ks["tf32"], ks["full"]], "h100")
    assert s["gemm_flops_by_type"] == {"f32xf32->f32": flops, "f32xf32->f32 (highest)": flops}
    assert s["roofline_gemm_ms"] == pytest.approx(1e3 * sum(max(flops / r, ks["tf32"].bytes / t["bandwidth"]) for r in (t["peak_tf32"], t["peak_fp32"])))


MIXED_PRECISION_HLO = """
HloModule m

%fused_dot.dh (a: f32[64,256], b: f32[256,128]) -> f32[64,128] {
  %a = f32[64,256]{1,0} parameter(0)
  %b = f32[256,128]{1,0} parameter(1)
  ROOT %d = f32[64,128]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, operand_precision={default,highest}, metadata={op_name="jit(f)/dot_general"}
}

%fused_dot.alg (a.1: f32[64,256], b.1: f32[256,128]) -> f32[64,128] {
  %a.1 = f32[64,256]{1,0} parameter(0)
  %b.1 = f32[256,128]{1,0} parameter(1)
  ROOT %d.1 = f32[64,128]{1,0} dot(%a.1, %b.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, algorithm=dot_f32_f32_f32, metadata={op_name="jit(f)/dot_general"}
}

%fused_dot.tf (a.2: f32[64,256], b.2: f32[256,128]) -> f32[64,128] {
  %a.2 = f32[64,256]{1,0} parameter(0)
  %b.2 = f32[256,128]{1,0} parameter(1)
  ROOT %d.2 = f32[64,128]{1,0} dot(%a.2, %b.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}, algorithm=dot_tf32_tf32_f32, metadata={op_name="jit(f)/dot_general"}
}

ENTRY %main (x: f32[64,256], w: f32[256,128]) -> f32[64,128] {
  %x = f32[64,256]{1,0} parameter(0)
  %w = f32[256,128]{1,0} parameter(1)
  %dh = f32[64,128]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot.dh
  %alg = f32[64,128]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot.alg
  %tf = f32[64,128]{1,0} fusion(%x, %w), kind=kCustom, calls=%fused_dot.tf
  %lib_dh = (f32[64,128]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"operation_queue_id":"0","gemm_backend_config":{"selected_algorithm":"0","alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"alpha_imag":0,"precision_config":{"operand_precision":["DEFAULT","HIGHEST"],"algorithm":"ALG_UNSET"},"epilogue":"DEFAULT"}}
  %lib_alg = (f32[64,128]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"operation_queue_id":"0","gemm_backend_config":{"selected_algorithm":"0","alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"alpha_imag":0,"precision_config":{"operand_precision":["DEFAULT","DEFAULT"],"algorithm":"ALG_DOT_F32_F32_F32"},"epilogue":"DEFAULT"}}
  %lib_tf = (f32[64,128]{1,0}, s8[1024]{0}) custom-call(%x, %w), custom_call_target="__cublas$lt$matmul", backend_config={"operation_queue_id":"0","gemm_backend_config":{"selected_algorithm":"0","alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"alpha_imag":0,"precision_config":{"operand_precision":["DEFAULT","DEFAULT"],"algorithm":"ALG_DOT_TF32_TF32_F32"},"epilogue":"DEFAULT"}}
  ROOT %r = f32[64,128]{1,0} add(%dh, %alg)
}
"""


def test_float32_gemms_at_full_precision_however_asked_for_are_rated_at_the_cuda_cores_rate():
    """XLA runs a float32 product on the CUDA cores when the higher of its two operand precisions is
    HIGHEST (`precision=(DEFAULT, HIGHEST)` prints `{default,highest}`) or when its algorithm is
    float32's (DotAlgorithmPreset.F32_F32_F32: `algorithm=dot_f32_f32_f32`, ALG_DOT_F32_F32_F32 in
    a cuBLAS call); these lines are XLA's own for an H100 (jaxlib 0.11). They were rated at tf32's
    rate, 7x too fast. The tf32 algorithm stays at tf32's."""
    ks = {k.name: k for k in aot.kernels(MIXED_PRECISION_HLO)}
    t = aot.TARGETS["h100"]
    for name in ("dh", "alg", "lib_dh", "lib_alg"):
        assert ks[name].types == ["f32xf32->f32 (highest)"], name
        assert aot.gemm_rate(ks[name], t) == t["peak_fp32"], name
    for name in ("tf", "lib_tf"):
        assert ks[name].types == ["f32xf32->f32"] and aot.gemm_rate(ks[name], t) == t["peak_tf32"], name


ALIAS_HLO = """
HloModule m

ENTRY %main (pos: s32[2], qkv: bf16[2,36,64], kc: bf16[2,12,64,320], vc: bf16[2,12,64,320]) -> bf16[2,12,1,64] {
  %pos = s32[2]{0} parameter(0)
  %qkv = bf16[2,36,64]{2,1,0} parameter(1)
  %kc = bf16[2,12,64,320]{3,2,1,0} parameter(2)
  %vc = bf16[2,12,64,320]{3,2,1,0} parameter(3)
  %step = (bf16[2,12,1,64]{3,2,1,0}, bf16[2,12,64,320]{3,2,1,0}, bf16[2,12,64,320]{3,2,1,0}) custom-call(%pos, %qkv, %qkv, %qkv, %kc, %vc), custom_call_target="__gpu$xla.gpu.triton", output_to_operand_aliasing={{1}: (4, {}), {2}: (5, {})}, api_version=API_VERSION_TYPED_FFI
  %plain = (bf16[2,12,1,64]{3,2,1,0}, bf16[2,12,64,320]{3,2,1,0}) custom-call(%qkv, %kc), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI
  ROOT %o = bf16[2,12,1,64]{3,2,1,0} get-tuple-element(%step), index=0
}
"""


def test_a_kernel_updating_buffers_in_place_writes_its_other_outputs_only():
    """A Pallas kernel whose outputs alias its operands (the decode attention's caches) updates them
    in place: its written bytes are its other outputs, not the caches again; an operand passed
    several times (the fused projection's output, read for queries, keys and values) is read once.
    (It counted each cache twice and the projection three times: vanilla's batch-64 decoding had
    1.69 GB outside GEMMs per token, 0.93 GB with this.)"""
    ks = {k.name: k for k in aot.kernels(ALIAS_HLO)}
    cache, out, qkv = 2 * 12 * 64 * 320 * 2, 2 * 12 * 64 * 2, 2 * 36 * 64 * 2
    assert ks["step"].bytes == out + 2 * 4 + qkv + 2 * cache
    assert ks["plain"].bytes == out + cache + qkv + cache  # no aliasing: every output is written


ALIAS_INDEX_HLO = """
HloModule m

ENTRY %main (x: f32[64,64], y: f32[64,64], t: (f32[8], bf16[16,2])) -> f32[64,64] {
  %x = f32[64,64]{1,0} parameter(0)
  %y = f32[64,64]{1,0} parameter(1)
  %t = (f32[8]{0}, bf16[16,2]{1,0}) parameter(2)
  %one = f32[64,64]{1,0} custom-call(%x, %y), custom_call_target="__gpu$xla.gpu.triton", operand_layout_constraints={f32[64,64]{1,0}, f32[64,64]{1,0}}, output_to_operand_aliasing={{}: (0, {})}, api_version=API_VERSION_TYPED_FFI, metadata={op_name="jit(f)/pallas_call"}
  %nested = (f32[4]{0}, (f32[8]{0}, bf16[16,2]{1,0}), s32[]) custom-call(%t, %x), custom_call_target="kernel", output_to_operand_aliasing={{1, 0}: (0, {0}), {1, 1}: (0, {1})}
  ROOT %r = f32[64,64]{1,0} add(%one, %y)
}
"""


def test_a_kernel_updating_its_only_output_or_a_nested_one_in_place_does_not_count_it_written():
    """An alias names the output it updates in place by its shape index: `{}` for a kernel with one
    output (the line is XLA's own, for a Pallas call with input_output_aliases={0: 0} compiled for
    an H100), `{1, 0}` inside a nested tuple. Neither is written again (the first counted its whole
    output and the second every element: only `{1}`-style indices were read)."""
    ks = {k.name: k for k in aot.kernels(ALIAS_INDEX_HLO)}
    assert ks["one"].bytes == 2 * 64 * 64 * 4  # x and y read, nothing but x's slots written
    assert ks["nested"].bytes == (4 * 4 + 4) + (8 * 4 + 16 * 2 * 2) + 64 * 64 * 4  # f32[4] and s32[] written; t and x read


def test_target_configs_parse_as_xla_expects():
    for name, t in aot.TARGETS.items():
        text = aot.target_config(name)
        assert f"core_count: {t['sms']}" in text and f'device_description_str: "{t["name"]}"' in text
        assert text.count("{") == text.count("}")


def test_a_missing_plugin_is_a_one_line_error(tmp_path):
    env = {**os.environ, "LLMJAX_AOT_DIR": str(tmp_path / "none")}
    r = subprocess.run([sys.executable, "-m", "llmjax.aot", "--config", "configs/vanilla.py:tiny"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "setup_aot.sh" in r.stderr


_PROGRAM = """import jax


def f(x):
    y = jax.numpy.tanh(x @ x.T)
    return (y * 2.0).sum()
"""


def _lowered_from(folder, text: str, name: str):
    """f of a module with source `text` written at folder/NAME.py, lowered for a (4, 8) input."""
    import importlib.util

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(text)
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return jax.jit(module.f).lower(jax.ShapeDtypeStruct((4, 8), np.float32))


def test_the_report_cache_keeps_a_compiled_program_and_misses_whatever_changed_it(tmp_path, monkeypatch):
    """The report cache (a compile-only device's programs cannot go into JAX's own cache): the same
    program compiled again is read back exactly, from a checkout anywhere; a program whose source
    moved, or another target, XLA flag or JAX setting, is compiled again; a damaged entry is
    compiled again and replaced."""
    from llmjax.compile_cache import FolderCache

    cache = FolderCache(tmp_path / "cache", max_bytes=-1)
    # (one line makes both: the locations name the callers' lines too)
    lowered, elsewhere = [_lowered_from(folder, _PROGRAM, "prog") for folder in (tmp_path / "a", tmp_path / "b" / "c")]
    first = aot.compile_for_report(lowered, "h100", cache)
    again = aot.compile_for_report(lowered, "h100", cache)
    assert (first.cached, again.cached) == (False, True)
    assert (again.text, again.memory, again.seconds) == (first.text, first.memory, first.seconds)
    assert "tanh" in first.text and first.memory["argument_bytes"] == 4 * 8 * 4
    key = aot.report_cache_key(lowered, "h100")
    # the same file in another folder (another checkout): the same entry
    assert aot.report_cache_key(elsewhere, "h100") == key and aot.compile_for_report(elsewhere, "h100", cache).cached
    # a line moved (the ops' locations, which the reports read, change), another file name, another program
    moved = _PROGRAM.replace("def f", "\ndef f")
    others = [_lowered_from(tmp_path / "d", moved, "prog"), _lowered_from(tmp_path / "e", _PROGRAM, "other"),
              _lowered_from(tmp_path / "f", _PROGRAM.replace("tanh", "sin"), "prog")]
    keys = {key, aot.report_cache_key(lowered, "h200")} | {aot.report_cache_key(lo, "h100") for lo in others}
    with monkeypatch.context() as m:
        m.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0")
        keys.add(aot.report_cache_key(lowered, "h100"))
    with jax.numpy_dtype_promotion("strict"):
        keys.add(aot.report_cache_key(lowered, "h100"))
    assert len(keys) == 7 and aot.report_cache_key(lowered, "h100") == key
    assert not aot.compile_for_report(others[0], "h100", cache).cached
    # paths inside a Pallas kernel's serialized Triton module too (whose byte offsets a path's length
    # changes: the reports lower their programs with file names only, _file_names_only)
    kernel = 'loc("{}/llmjax/models/layers.py":12:3) "\\00{}/llmjax/models/decode_norm.py\\00_kernel"'
    assert aot.canonical_paths(kernel.format("/work/a", "/work/a")) == aot.canonical_paths(kernel.format("/x/b-c", "/y"))
    assert aot.canonical_paths(kernel.format("/a", "/a")) != aot.canonical_paths(kernel.format("/a", "/a").replace("norm", "nurm"))
    # a damaged entry
    entry = tmp_path / "cache" / f"{key}-cache"
    entry.write_bytes(entry.read_bytes()[:100])
    damaged = aot.compile_for_report(lowered, "h100", cache)
    assert not damaged.cached and damaged.text == first.text
    assert aot.compile_for_report(lowered, "h100", cache).cached


def test_the_report_cache_is_the_tools_compilation_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMJAX_COMPILATION_CACHE", str(tmp_path / "c"))
    assert aot.report_cache()._path == tmp_path / "c" and aot.report_cache() is aot.report_cache()  # (one listing of the folder)
    monkeypatch.setenv("LLMJAX_COMPILATION_CACHE", "")
    assert aot.report_cache() is None
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LLMJAX_COMPILATION_CACHE", str(tmp_path / "file"))
    assert aot.report_cache() is None  # (compiled, not cached)


needs_plugin = pytest.mark.skipif(not (aot.plugin_dir() / "jax_plugins").is_dir(),
                                  reason="JAX's CUDA plugin is not in ./.aot (bash scripts/setup_aot.sh)")

@needs_plugin
def test_cudnn_attention_without_cudnn_is_a_one_line_error(tmp_path):
    plugin = tmp_path / "plugin"  # the plugin folder without cuDNN (as `setup_aot.sh --no-cudnn` leaves it)
    plugin.mkdir()
    for entry in aot.plugin_dir().iterdir():
        if entry.name == "jax_cuda13_plugin":  # (copied: its libraries look for cuDNN beside their real path)
            shutil.copytree(entry, plugin / entry.name)
        elif not entry.name.startswith("nvidia"):
            (plugin / entry.name).symlink_to(entry)
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "LLMJAX_AOT_DIR": str(plugin)}
    r = subprocess.run([sys.executable, "-m", "llmjax.aot", "--config", "configs/vanilla.py:tiny", "--suite", "train",
                        "--config.model.dtype=bfloat16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "setup_aot.sh" in r.stderr and "attention_impl=xla" in r.stderr


OVERRIDES = {"model.dtype": "bfloat16", "model.attention_impl": "xla"}  # (cuDNN attention needs cuDNN in ./.aot)

SCRIPT = """
import json, os, sys
from llmjax import aot
device = aot.gpu_device("h100")
from llmjax.config import load_config
cfg = load_config("configs/vanilla.py:tiny", json.loads(sys.argv[1]))
rows = [aot.train_report(cfg, device, "h100")]
for n in ("1", "2"):
    os.environ["LLMJAX_DECODE_MIN_ROWS"] = n
    rows.append(aot.decode_report(cfg, device, "h100", 1, 8, 24, top=10000))
for impl in ("auto", "xla"):  # the SSM's scan: its fused kernel (Pallas -> Triton) on a GPU, and XLA's
    # (without the convolution, the same few kernels either way: the scans compared alone)
    ssm = load_config("configs/ssm.py:tiny", {"model.dtype": "bfloat16", "model.scan_impl": impl, "model.d_conv": 0})
    rows.append(aot.train_report(ssm, device, "h100", top=10000))
xla = load_config("configs/vanilla.py:tiny", {**json.loads(sys.argv[1]), "model.decode_attention_impl": "xla"})
rows.append(aot.decode_report(xla, device, "h100", 1, 8, 24, top=10000))  # decoding without the fused attention kernel
rows.append(aot.decode_report(cfg, device, "h100", 4, 8, 24))  # four rows: four new tokens per decode step
rows.append(aot.decode_report(cfg, device, "h100", 1, 8, 24, top=10000, mode="topk"))  # top-k sampling's loop
mla = load_config("configs/mla.py:tiny", {**json.loads(sys.argv[1]), "model.d_ff": 128})  # (SwiGLU's two weights: 2 x 64 columns)
rows.append(aot.decode_report(mla, device, "h100", 1, 8, 24, top=10000))
modern = load_config("configs/modern.py:tiny", json.loads(sys.argv[1]))
rows.append(aot.decode_report(modern, device, "h100", 1, 8, 24, top=10000))  # rotary embeddings before the fused kernel
for impl in ("auto", "dense"):  # (8 experts: the sampler's 2 rows' 4 assignments are fewer)
    moe = load_config("configs/moe.py:tiny", {**json.loads(sys.argv[1]), "model.n_experts": 8, "model.moe_impl": impl})
    rows.append(aot.decode_report(moe, device, "h100", 1, 8, 24, top=10000))
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def compiled_rows(tmp_path_factory):
    def build(_):
        # XLA's autotuning off: compiling for a GPU that is not there, it picks the same kernels (every row
        # but compile_seconds identical, checked 2026-12-06 with jax 0.11.2) in 45 s, not 78 s, of the suite.
        # The programs XLA compiled before, the same lowered modules, are read from the report cache in the
        # tests' compilation cache folder (LLMJAX_COMPILATION_CACHE, conftest): 71 s -> 9 s (2026-12-07)
        env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "XLA_FLAGS": "--xla_gpu_autotune_level=0"}
        r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(OVERRIDES)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    return built_once(tmp_path_factory, "aot-compiled-rows", build)


@needs_plugin
def test_the_gpu_training_step_does_the_models_gemms_in_bf16(compiled_rows):
    """The training step compiled for an H100: its GEMM FLOPs are exactly the model's (forward and
    backward of every parameter product, the tied head once, and attention over the full square,
    as XLA's attention computes it), none of its GEMMs takes float32 operands except XLA's
    attention's (cuDNN's on a real GPU), and its arguments are exactly the training state and the
    batch."""
    train = compiled_rows[0]
    cfg = load_config("configs/vanilla.py:tiny", OVERRIDES)
    mcfg = model_config(cfg)
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(mcfg.replace(scan_layers=True), seed=0)), nnx.Param))
    matmul = sum(
        leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if str(path[-1].key) == "kernel" or (str(path[-1].key) == "embedding" and str(path[0].key) == "embed")
    )
    B, T, D, L = cfg.train.batch_size, mcfg.context_len, mcfg.d_model, mcfg.n_layer
    assert train["gemm_flops"] == B * T * 3 * (2 * matmul + 2 * 2 * T * D * L)
    assert all("BNTS" in w for w in train["wide_gemm_types"]), train["wide_gemm_types"]  # jax.nn's XLA attention only
    tx, _ = make_optimizer(cfg.train)
    state = {"params": params, "opt": jax.eval_shape(tx.init, params), "rng": np.zeros(2, np.uint32), "step": np.int32(0)}
    state_bytes = sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(state))
    assert train["argument_bytes"] == state_bytes + 4 * B * (T + 1)
    assert train["peak_bytes"] == train["argument_bytes"] + train["output_bytes"] + train["temp_bytes"] - train["alias_bytes"]
    assert train["alias_bytes"] >= state_bytes - 16  # the state is donated: updated in place


@needs_plugin
def test_a_padding_row_keeps_batch_one_decoding_in_gemms(compiled_rows):
    """Decoding one row, XLA's GPU compiler strength-reduces every vector x matrix product into an
    elementwise multiply and a reduction (no GEMM left); with the sampler's padding row (the GPU
    default) each parameter product is a GEMM and far fewer bytes move outside them."""
    one, two = compiled_rows[1], compiled_rows[2]
    assert (one["decode_rows"], two["decode_rows"]) == (1, 2)
    mcfg = model_config(load_config("configs/vanilla.py:tiny"))
    assert one["gemm_kernels"] == 0
    assert two["gemm_kernels"] >= 4 * mcfg.n_layer + 1  # qkv, out, fc, proj per layer and the head
    assert two["other_bytes"] < one["other_bytes"] / 2 and two["kernels"] < one["kernels"]


@needs_plugin
def test_the_ssm_compiles_its_fused_kernel_for_the_gpu(compiled_rows):
    """On a GPU the SSM's scan is the Pallas kernel, compiled by Triton for the H100: per layer one
    forward kernel and, in the backward pass, the forward again (keeping its states) and the backward
    kernel; it moves well under half the bytes of XLA's chunked associative scan in fewer kernels
    (the layer without its convolution, which adds the same kernels to both: at this tiny shape
    nearly a quarter of the fused step's bytes)."""
    fused, xla = compiled_rows[3], compiled_rows[4]
    n_layer = model_config(load_config("configs/ssm.py:tiny")).n_layer
    launches = lambda row, key: sum(k["launches"] for k in row["top_kernels"] if key in k["op"])  # noqa: E731
    assert launches(fused, "selective_scan/") == 2 * n_layer and launches(fused, "selective_scan_bwd/") == n_layer
    assert launches(xla, "selective_scan") == 0
    assert fused["other_bytes"] < xla["other_bytes"] / 2 and fused["kernels"] < xla["kernels"]


@needs_plugin
def test_gpu_decoding_attends_in_one_fused_kernel_per_layer(compiled_rows):
    """On a GPU each decoded token's attention step (bias, cache writes, attention) is one Triton
    kernel per layer, and each of its two norms another, the caches are updated in place (no copy as
    large as a layer's cache in the loop), no kernel of the loop only converts a value's type (the
    bfloat16 norms' scales and biases, rounded by XLA before the kernels, were 4 more per layer and
    token: vanilla 124M 120.4 -> 168.4 kernels per token at batch 1), and the token takes fewer
    kernels than with XLA's own attention step (compiled for an H100)."""
    fused, xla = compiled_rows[2], compiled_rows[5]
    mcfg = model_config(load_config("configs/vanilla.py:tiny"))
    ops = lambda row, key: sum(k["launches"] for k in row["top_kernels"] if key in k["op"])  # noqa: E731
    assert ops(fused, "decode_attention") == mcfg.n_layer and ops(xla, "decode_attention") == 0
    assert ops(fused, "decode_norm_rows") == ops(xla, "decode_norm_rows") == 2 * mcfg.n_layer  # the norms' kernels
    assert ops(fused, "scatter") == ops(xla, "scatter") - 2 * mcfg.n_layer  # the cache writes are in the kernel
    cache_mb = 2 * mcfg.n_head * mcfg.head_dim * fused["cache_len"] * 2 / 1e6  # one layer's keys, 2 rows, bf16
    assert not [k for k in fused["top_kernels"] if "copy" in k["name"] and k["mb_per_launch"] >= cache_mb / 2]
    assert fused["kernels"] <= xla["kernels"] - mcfg.n_layer, (fused["kernels"], xla["kernels"])  # at least one fewer per layer
    assert not [k["name"] for k in fused["top_kernels"] if k["op"].endswith("convert_element_type") and k["launches"] >= 1]


@needs_plugin
def test_gpu_decoding_rotates_queries_and_keys_in_one_kernel_per_layer(compiled_rows):
    """With rotary embeddings (modern), each decoded token's queries and keys are rotated in one
    kernel per layer before the fused attention kernel reads them (rotated apart, XLA made each its
    own: 2 a layer, 12 more kernels per token for the default modern)."""
    modern = compiled_rows[9]
    n_layer = model_config(load_config("configs/modern.py:tiny")).n_layer
    launches = lambda key: sum(k["launches"] for k in modern["top_kernels"] if k["op"].endswith(key))  # noqa: E731
    assert launches("decode_attention)/pallas_call") == n_layer  # (the fused kernel: else the rotation is not before it)
    assert launches("/concatenate") == n_layer  # (apply_rope's halves joined: the rotation's kernel)


@needs_plugin
def test_mla_decoding_attends_in_one_fused_kernel_per_layer(compiled_rows):
    """MLA's decoded token attends against the cached latents in one kernel per layer
    (decode_attention.latent_decode_attention: both cache writes, the scores, the softmax and the
    weighted sum of latents; XLA's path made about 10 kernels of them), after one rotation kernel
    for the queries' and the key's rotary parts together; the new latent's RMSNorm (kv_norm, XLA's
    reduction and normalisation: two kernels a layer) is done in the kernel too: the default mla at
    batch 1, compiled for an H100, 299.4 -> 204.4 -> 180.4 kernels per token."""
    mla = compiled_rows[8]
    n_layer = model_config(load_config("configs/mla.py:tiny")).n_layer
    launches = lambda key: sum(k["launches"] for k in mla["top_kernels"] if k["op"].endswith(key))  # noqa: E731
    assert launches("latent_decode_attention)/pallas_call") == n_layer
    assert launches("/concatenate") == n_layer  # (apply_rope's halves joined: the rotation's kernel)
    assert launches("/scatter") <= 1  # (the sampler's token; the caches are written in the kernel)
    assert launches("/reduce_sum") <= 1 and launches("/convert_element_type") <= 1  # (the sampler's; no kv_norm)


@needs_plugin
def test_mla_decoding_joins_no_weights_per_token(compiled_rows):
    """XLA's GPU compiler merges products that share an operand (q_proj's and kv_down's of the same
    x) into one GEMM over their joined weights; where the join cannot be fused into the GEMM (kv_down's
    r + p columns, no multiple of its tiles) it is a kernel of its own, in the decode loop made every
    token (the default mla: 4.4 MB a layer, 53 of the 78 MB per token moved outside GEMMs at batch 1).
    Decoding keeps the two products apart; SwiGLU's gate and up, joined inside their GEMM, are no
    kernel (a d_ff whose weights the GEMM's tiles divide, as the default config's)."""
    mla = compiled_rows[8]
    assert not [k["name"] for k in mla["top_kernels"] if k["name"].startswith("wrapped_concatenate") and k["launches"] >= 1]


@needs_plugin
def test_moe_decoding_one_row_reads_only_its_experts_weights(compiled_rows):
    """Decoding one row (two with the sampler's padding row: 4 assignments of 8 experts), the MoE
    layers read the weights of the routed experts alone, each gather fused into its product (no
    copy): per token at least the unrouted experts' weights fewer bytes than every expert's products
    (dense), in as many kernels (the default moe compiled for an H100: 0.39 GB a token instead of 0.62)."""
    gathered, dense = compiled_rows[10], compiled_rows[11]
    cfg = model_config(load_config("configs/moe.py:tiny"))
    moved = lambda row: sum(k["mb_per_launch"] * k["launches"] for k in row["top_kernels"]) * 1e6  # noqa: E731
    unrouted = cfg.n_layer * (8 - 2 * cfg.top_k) * 2 * cfg.d_model * cfg.d_ff * 2  # (bf16 w_in and w_out)
    assert moved(gathered) < moved(dense) - 0.9 * unrouted, (moved(gathered), moved(dense), unrouted)
    assert gathered["kernels"] <= dense["kernels"]
    assert not [k for k in gathered["top_kernels"] if k["op"].endswith("/gather") and k["launches"] >= 1]  # (none unfused)
    # the router's top-k taken of its logits: no softmax over every expert in the loop (1 kernel a layer)
    assert not [k["name"] for k in gathered["top_kernels"] if "softmax" in k["name"] and k["launches"] >= 1]


@needs_plugin
@pytest.mark.skipif(not (aot.plugin_dir() / "nvidia" / "cudnn").is_dir(), reason="no cuDNN in ./.aot (bash scripts/setup_aot.sh without --no-cudnn)")
def test_mla_attends_with_unpadded_values_in_cudnn():
    """MLA's values (v_head_dim) are narrower than its queries and keys (qk_nope + qk_rope): compiled
    for an H100, cuDNN's attention takes them unpadded, forward and backward (no zero columns moved)."""
    script = r"""
import re
from llmjax import aot
device = aot.gpu_device("h100")
from llmjax.config import load_config
texts = []
report = aot.compiled_report
aot.compiled_report = lambda compiled, *a, **k: texts.append(compiled.as_text()) or report(compiled, *a, **k)
aot.train_report(load_config("configs/mla.py:tiny", {"model.dtype": "bfloat16"}), device, "h100")
for line in texts[0].splitlines():
    if "__cudnn$fmha" in line:
        operands = line.split("operand_layout_constraints=")[1].split("api_version")[0]
        print(re.search(r'custom_call_target="([^"]*)"', line).group(1), re.findall(r"bf16\[([\d,]+)\]", operands))
"""
    cfg = model_config(load_config("configs/mla.py:tiny"))
    qk, vd = cfg.qk_nope_dim + cfg.qk_rope_dim, cfg.v_head_dim
    assert qk != vd
    for pad, want in (("0", [qk, qk, vd]), ("1", [qk, qk, qk])):  # (LLMJAX_CUDNN_PAD_VALUES=1: padded, as before)
        env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "LLMJAX_CUDNN_PAD_VALUES": pad}
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        calls = r.stdout.strip().splitlines()
        assert {c.split()[0] for c in calls} == {"__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"}, calls
        for call in calls:  # (q, k, v first, in that order)
            widths = [int(shape.split(",")[-1]) for shape in ast.literal_eval(call.split(" ", 1)[1])]
            assert widths[:3] == want, call


@needs_plugin
def test_decode_figures_are_per_step_of_one_token_for_each_row(compiled_rows):
    """A decode row's figures are per decode step, which makes one new token for each of the batch's
    rows (`tokens_per_step`): at batch 4, its GEMM FLOPs are four tokens' forward products (every
    parameter product and the tied head, 2 FLOPs per weight; the attention over the cache is no
    GEMM), not one token's as "per token" said, and so are its bytes and roofline time."""
    four = compiled_rows[6]
    mcfg = model_config(load_config("configs/vanilla.py:tiny", OVERRIDES))
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: build_model(mcfg.replace(scan_layers=True), seed=0)), nnx.Param))
    matmul = sum(
        leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if str(path[-1].key) == "kernel" or (str(path[-1].key) == "embedding" and str(path[0].key) == "embed")
    )
    assert (four["suite"], four["decode_rows"], four["tokens_per_step"]) == ("decode_b4", 4, 4)
    assert four["gemm_flops"] == four["tokens_per_step"] * 2 * matmul


@needs_plugin
def test_decoding_compiles_in_the_sampling_mode_asked_for(compiled_rows):
    """`decode_report(mode="topk")` (the CLI's --decode_modes=topk, as bench's) compiles the loop that
    draws a token (top-k 200 is all of the tiny variant's 65): its kernels include the draw's random
    keys, which greedy's loop has none of, and it is named apart."""
    greedy, topk = compiled_rows[2], compiled_rows[7]
    assert (greedy["suite"], greedy["decode_mode"], topk["suite"], topk["decode_mode"]) == ("decode_b1", "greedy", "decode_sampled_b1", "topk")

    def ops(row, word):
        return [k["op"] for k in row["top_kernels"] if word in k["op"]]

    assert ops(topk, "threefry") and not ops(greedy, "threefry")
    assert topk["kernels"] > greedy["kernels"]


@needs_plugin
def test_an_unknown_decode_mode_is_a_one_line_error():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "llmjax.aot", "--config", "configs/vanilla.py:tiny", "--suite", "decode",
                        "--decode_modes", "greedy,beam"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "--decode_modes takes greedy and/or topk, got greedy,beam" in r.stderr


@needs_plugin
def test_an_empty_suite_or_decode_batches_is_a_one_line_error():
    """`--suite=` or `--decode_batches=` with the decode suite compiled nothing and printed nothing,
    exit status 0; bench refuses both, and so does aot now."""
    from helpers import cli_cases

    base = ["--config", "configs/vanilla.py:tiny"]
    cases = [base + ["--suite="], base + ["--suite=decode", "--decode_batches="], base + ["--suite=train", "--quantize=int8"],
             base + ["--suite=decode", "--batch_size=4"], base + ["--suite=train", "--decode_batches=3", "--prompt_len=5"]]
    want = ["error: --suite is empty; choose from train, decode",
            "error: --decode_batches is empty; give the decode batch sizes (e.g. 1,64) or leave decode out of --suite",
            # (--quantize int8 without the decode suite was ignored: the float training step compiled, exit status 0)
            "error: --quantize int8 applies to the decode suite; --suite train compiles the float training step: add decode "
            "(--suite train,decode) or drop --quantize",
            # (a flag of a suite left out was ignored, exit status 0; bench refuses it)
            "error: --batch_size is for the train suite, which --suite decode does not compile: add train to --suite, or drop --batch_size",
            "error: --decode_batches is for the decode suite, which --suite train does not compile: add decode to --suite, or drop "
            "--decode_batches"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for r, line in zip(cli_cases("llmjax.aot", cases, env=env), want):
        assert (r.returncode, r.stderr, r.stdout) == (2, line + "\n", ""), r.stderr
