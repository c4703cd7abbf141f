"""llmjax.tracing: profiler traces summarised, on a real CPU trace and on a GPU-shaped trace built
from an XSpace text proto (kernels on two streams, a derived line that repeats them)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT
from llmjax import tracing

GPU_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 13
    name: "Stream #13(Compute)"
    timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000 stats { metadata_id: 10 str_value: "custom-call.3" } }
    events { metadata_id: 2 offset_ps: 5000000 duration_ps: 1000000 stats { metadata_id: 10 str_value: "loop_fusion.2" } }
    events { metadata_id: 3 offset_ps: 7000000 duration_ps: 2000000 stats { metadata_id: 10 str_value: "custom-call.7" } }
  }
  lines {
    id: 20
    name: "Stream #20(MemcpyD2D)"
    timestamp_ns: 1000
    events { metadata_id: 4 offset_ps: 3000000 duration_ps: 3000000 stats { metadata_id: 10 str_value: "copy.5" } }
  }
  lines {
    id: 99
    name: "XLA Ops"
    timestamp_ns: 1000
    events { metadata_id: 2 offset_ps: 5000000 duration_ps: 1000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n" } }
  event_metadata { key: 2 value { id: 2 name: "loop_fusion_2" } }
  event_metadata { key: 3 value { id: 3 name: "cudnn_generated_fort_native_sdpa_sm90_knob_7" } }
  event_metadata { key: 4 value { id: 4 name: "MemcpyD2D" } }
  stat_metadata { key: 10 value { id: 10 name: "hlo_op" } }
}
planes { id: 2 name: "/host:CPU" }
"""


def test_gpu_shaped_trace():
    """Stream lines only (the derived 'XLA Ops' line repeats a kernel); kinds from kernel and HLO op
    names; busy time is the union over streams (the copy overlaps the gemm); shares sum to one."""
    s = tracing.summarize(jax.profiler.ProfileData.from_text_proto(GPU_TRACE))
    assert s["where"] == "device" and s["events"] == 4
    # intervals (us): gemm 0-4, copy 3-6, fusion 5-6, attention 7-9 -> busy 8 of span 9
    assert s["busy_ms"] == pytest.approx(0.008) and s["span_ms"] == pytest.approx(0.009)
    assert s["busy_fraction"] == pytest.approx(8 / 9)
    assert s["kinds_ms"] == pytest.approx({"matmul": 0.004, "copy": 0.003, "attention": 0.002, "fusion": 0.001})
    assert [(t["op"], t["kind"], t["count"]) for t in s["top"]] == [
        ("custom-call", "matmul", 1), ("copy", "copy", 1), ("custom-call", "attention", 1), ("loop_fusion", "fusion", 1)]
    assert sum(t["share"] for t in s["top"]) == pytest.approx(1.0)
    assert tracing.summarize(jax.profiler.ProfileData.from_text_proto(GPU_TRACE), wall_s=18e-6)["busy_fraction"] == pytest.approx(8 / 18)


GRAPH_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 14
    name: "Stream #14(Compute)"
    timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000 stats { metadata_id: 10 str_value: "command_buffer_1" } }
    events { metadata_id: 2 offset_ps: 3990000 duration_ps: 2000000 stats { metadata_id: 10 str_value: "command_buffer_1" } }
    events { metadata_id: 1 offset_ps: 5985000 duration_ps: 4000000 stats { metadata_id: 10 str_value: "command_buffer_1" } }
    events { metadata_id: 3 offset_ps: 9980000 duration_ps: 1000000 stats { metadata_id: 10 str_value: "command_buffer_1" } }
  }
  event_metadata { key: 1 value { id: 1 name: "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT" } }
  event_metadata { key: 2 value { id: 2 name: "loop_multiply_fusion_12" } }
  event_metadata { key: 3 value { id: 3 name: "input_reduce_fusion_32" } }
  stat_metadata { key: 10 value { id: 10 name: "hlo_op" } }
}
"""


def test_gpu_trace_of_a_cuda_graph():
    """Kernels that XLA runs in a CUDA graph (command buffer): each carries the graph's op, and their
    timestamps overlap by a few nanoseconds. Every kernel counts (an overlap is not a parent event),
    and rows go by kernel name; cuBLAS's nvjet kernels are matmuls. (Before: the overlapping
    kernels were taken for parents and dropped, which reported an H200 training step 63% busy when
    it was 99% busy.)"""
    s = tracing.summarize(jax.profiler.ProfileData.from_text_proto(GRAPH_TRACE))
    assert s["events"] == 4
    assert s["busy_ms"] == pytest.approx(0.01098) and s["busy_fraction"] == pytest.approx(1.0)
    assert [(t["op"], t["kind"], t["count"]) for t in s["top"]] == [
        ("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT", "matmul", 2), ("loop_multiply_fusion_12", "fusion", 1),
        ("input_reduce_fusion_32", "fusion", 1)]


CONCURRENT_TRACE = """
planes {
  id: 1
  name: "/device:GPU:0"
  lines {
    id: 14
    name: "Stream #14(Compute)"
    timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 100000000 stats { metadata_id: 10 str_value: "command_buffer_1" } }
    events { metadata_id: 2 offset_ps: 10000000 duration_ps: 10000000 stats { metadata_id: 10 str_value: "command_buffer_1" } }
  }
  event_metadata { key: 1 value { id: 1 name: "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT" } }
  event_metadata { key: 2 value { id: 2 name: "loop_multiply_fusion_12" } }
  stat_metadata { key: 10 value { id: 10 name: "hlo_op" } }
}
"""


def test_a_kernel_inside_another_on_a_device_line_is_counted():
    """Kernels on a device line never nest: a short one running inside a long one (a concurrent
    branch of a CUDA graph) is a kernel of its own, and the long one is not dropped as its parent."""
    s = tracing.summarize(jax.profiler.ProfileData.from_text_proto(CONCURRENT_TRACE))
    assert s["events"] == 2 and s["busy_ms"] == pytest.approx(0.1)
    assert s["kinds_ms"] == pytest.approx({"matmul": 0.1, "fusion": 0.01})


def test_cpu_trace_of_a_loop(tmp_path):
    """A real trace: the loop's body runs 7 times; the while loop's own event, which holds its body's,
    is not counted again; busy time is within the wall time."""
    f = jax.jit(lambda x: jax.lax.fori_loop(0, 7, lambda i, x: jnp.tanh(x @ x) * 0.5, x).sum())
    x = jnp.ones((128, 128))
    f(x).block_until_ready()
    hlo = f.lower(x).compile().as_text()
    out, s = tracing.traced(lambda: f(x).block_until_ready(), tmp_path / "trace", hlo=hlo)
    # the product runs in a YNNPACK fusion (`ynn_fusion`, its only name in the trace): with the
    # program's HLO it counts as a matmul (by name alone it was a fusion)
    assert "ynn_fusion" not in hlo or tracing.fusion_kinds(hlo)
    assert max(s["kinds_ms"], key=s["kinds_ms"].get) == "matmul", s["kinds_ms"]
    assert float(out) == pytest.approx(float(f(x)))
    assert s["where"] == "host" and s["events"] >= 7
    assert 0 < s["busy_ms"] <= s["wall_ms"] and 0 < s["busy_fraction"] <= 1
    ops = {t["op"]: t for t in s["top"]}
    assert not any(op.startswith("while") for op in ops), ops
    assert any(t["count"] % 7 == 0 and t["count"] > 0 for t in s["top"])  # the body's operations, once per trip
    assert list(tmp_path.glob("trace/**/*.xplane.pb"))

    r = subprocess.run([sys.executable, "-m", "llmjax.tracing", str(tmp_path / "trace")], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0 and "host events" in r.stdout and "| operation | kind |" in r.stdout, r.stderr
    (tmp_path / "none").mkdir()  # (a folder with no trace; a path that does not exist: test below)
    r = subprocess.run([sys.executable, "-m", "llmjax.tracing", str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: no *.xplane.pb") and r.stderr.count("\n") == 1
    # a trace file itself; a damaged one (cut short, as by a killed job) is one line naming it
    trace = next(tmp_path.glob("trace/**/*.xplane.pb"))
    r = subprocess.run([sys.executable, "-m", "llmjax.tracing", str(trace)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "host events" in r.stdout, r.stderr
    (tmp_path / "cut.xplane.pb").write_bytes(trace.read_bytes()[:2000])
    r = subprocess.run([sys.executable, "-m", "llmjax.tracing", str(tmp_path / "cut.xplane.pb")], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {tmp_path / 'cut.xplane.pb'} is not a readable trace") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("names, kind", [
    (("sm90_xmma_gemm_bf16", "custom-call.1"), "matmul"), (("ynn_fusion", "dot.3"), "matmul"),
    (("fmha_fwd", "custom-call.2"), "attention"), (("nccl_all_reduce", "all-reduce.1"), "collective"),
    (("transpose_copy_fusion", "transpose_copy_fusion.2"), "copy"), (("loop_add_fusion", ""), "fusion"),
    (("wrapped_reduce", "wrapped_reduce.1"), "other")])
def test_kinds(names, kind):
    assert tracing.kind_of(*names) == kind


def test_an_empty_trace_file_is_one_line(tmp_path):
    """A trace file of no bytes (a job killed before it wrote) is a damaged trace: one line, exit 2
    (it parsed as an empty trace and printed a summary of 0 events, exit 0)."""
    (tmp_path / "empty.xplane.pb").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a readable trace"):
        tracing.summarize(tmp_path / "empty.xplane.pb")
    assert tracing.main([str(tmp_path)]) == 2


def test_the_cli_tells_a_flag_an_empty_or_missing_path_and_help_anywhere(tmp_path, monkeypatch, capsys):
    """Every argument was a path: "" searched the current folder whole and summarised the newest trace
    under it, "--top" said "no *.xplane.pb under --top", a missing path that nothing was under it,
    and --help was honoured first only."""
    (tmp_path / "t.xplane.pb").write_bytes(b"")  # (one the current folder's search would find)
    monkeypatch.chdir(tmp_path)
    cases = [([""], "error: '' does not exist; pass a directory written by jax.profiler.trace"),
             ([str(tmp_path / "nothere")], f"error: '{tmp_path / 'nothere'}' does not exist;"),
             ([str(tmp_path), "--top"], "error: unknown flag --top: this tool takes trace folders or files only; usage:")]
    for argv, message in cases:
        assert tracing.main(argv) == 2
        out, err = capsys.readouterr()
        assert (out, err.count("\n")) == ("", 1) and err.startswith(message), err
    assert tracing.main([str(tmp_path), "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m llmjax.tracing DIR|FILE")
