"""`python -m llmjax.aot --config configs/<arch>.py[:variant] [--target h100|h200] [--suite train,decode] [--json]`

Compile the trainer's step and the sampler's prefill and decode loop for a GPU, on a machine that
has none, and read what XLA made of them: the kernels each step launches, every matrix product's
operand types, the device memory the step needs, the bytes its other kernels move, and a roofline
time. It answers, between two GPU slots, questions a GPU profile would otherwise be needed for:
did a change remove the kernels it meant to, does any GEMM run in float32, does the step fit the
memory target, how long does XLA's GPU compiler take.

How: JAX's CUDA plugin (the `jax-cuda13-plugin` and `jax-cuda13-pjrt` wheels of the installed
jaxlib's version, and cuDNN's `nvidia-cudnn-cu13` for its attention; `bash scripts/setup_aot.sh`
puts them in ./.aot, outside the virtual environment, where they would make every JAX process look
for a GPU) gives a compile-only device for a described GPU (`TARGETS`); the step is traced with
`runtime.compiling_for("gpu")` (cuDNN attention, as on the GPU) and compiled by XLA's GPU compiler
without running anything. This must happen before JAX starts its backends in the process: the CLI
does it first thing; from Python, call `gpu_device()` first.

A program compiled before (the same lowered module for the same target, versions and settings) is
read back from the report cache (`compile_for_report`), in the tools' compilation cache folder.

What it cannot know: with no GPU to time candidates on, XLA skips autotuning, so each GEMM gets a
default Triton configuration instead of the one (or the cuBLAS call) a real compile would pick: the
kernel count and memory are those of a real compile, GEMM speed is not measured. The roofline time
assumes every kernel at the card's datasheet rate (bf16 tensor cores for 16-bit GEMMs, tf32 for
float32 ones at the default precision, the CUDA cores' float32 rate for those at
`Precision.HIGHEST`, memory bandwidth for the rest) and leaves out library attention (cuDNN), launch
gaps and overlap: a lower bound to compare two versions of a step by, not a prediction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from pathlib import Path

# A GPU is described by the facts XLA's GPU compiler plans with (stream_executor.GpuTargetConfigProto,
# text format): the compute capability, SM count, memory size and bandwidth, cache, clock and
# per-block limits (NVIDIA's datasheets and CUDA's device properties for these cards), plus the
# bf16 dense peak MFU uses, the tf32 one for float32 GEMMs at the default precision and the CUDA
# cores' float32 one for those asked for at Precision.HIGHEST (which no tensor core runs).
TARGETS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", sms=132, memory=85_520_809_984, bandwidth=3.35e12, l2=52_428_800,
                 clock_ghz=1.98, peak_bf16=989e12, peak_tf32=494e12, peak_fp32=67e12),
    "h200": dict(name="NVIDIA H200", sms=132, memory=150_754_820_096, bandwidth=4.8e12, l2=52_428_800,
                 clock_ghz=1.98, peak_bf16=989e12, peak_tf32=494e12, peak_fp32=67e12),
}

PLUGIN_DIR_ENV = "LLMJAX_AOT_DIR"
SETUP_HINT = "install JAX's CUDA plugin for compile-only use with `bash scripts/setup_aot.sh` (or set LLMJAX_AOT_DIR to where it is)"


class AotError(RuntimeError):
    """Compiling for a GPU without one cannot go ahead (one line saying what to do)."""


def target_config(target: str) -> str:
    t = TARGETS[target]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {t['sms']}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(t['bandwidth'])}
  l2_cache_size: {t['l2']}
  clock_rate_ghz: {t['clock_ghz']}
  device_memory_size: {t['memory']}
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{t['name']}"
"""


def plugin_dir() -> Path:
    return Path(os.environ.get(PLUGIN_DIR_ENV) or Path(__file__).resolve().parents[1] / ".aot")


_devices: dict[str, object] = {}


def gpu_device(target: str = "h100"):
    """A compile-only device of the described GPU `target` (no GPU needed). Puts the plugin folder
    on sys.path and keeps JAX's own backends on the CPU; call it before anything starts JAX's
    backends in this process."""
    if target not in TARGETS:
        raise AotError(f"--target={target}: unknown GPU; choose one of {', '.join(TARGETS)}")
    if target in _devices:
        return _devices[target]
    folder = plugin_dir()
    installed = importlib.util.find_spec("jax_plugins") is not None and importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
    if not installed and not (folder / "jax_plugins").is_dir():  # (a GPU machine has it installed)
        raise AotError(f"no JAX CUDA plugin in {folder}: {SETUP_HINT}")
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"  # (it checks the CUDA runtime of a GPU there is not)
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    import jax
    from jax._src import xla_bridge
    from jax.experimental import topologies

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")  # the plugin registers; JAX itself still runs on the CPU
    xla_bridge._discover_and_register_pjrt_plugins()
    if "cuda" not in xla_bridge._topology_factories:
        try:  # JAX imported its plugin namespace before the folder was on sys.path: register this one now
            import jax_plugins.xla_cuda13 as plugin

            plugin.initialize()
        except Exception:  # (reported below as the plugin not loading)
            pass
    _find_cudnn()
    try:
        topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=target_config(target))
    except NotImplementedError as e:
        raise AotError(
            f"JAX's CUDA plugin did not load (it must be found before JAX starts its backends, and match jaxlib "
            f"{jax.lib.__version__}): {SETUP_HINT}"
        ) from e
    _devices[target] = topo.devices[0]
    return _devices[target]


def _find_cudnn() -> None:
    """JAX looks up the plugin's CUDA version module (which cuDNN attention asks for cuDNN's
    version) when it is imported; imported before the plugin folder was on sys.path, it has none:
    give it the plugin's now."""
    from jax._src import lib
    from jax._src.cudnn import fused_attention_stablehlo

    if lib.cuda_versions is None:
        try:
            lib.cuda_versions = fused_attention_stablehlo.cuda_versions = importlib.import_module("jax_cuda13_plugin._versions")
        except ImportError:  # (cuDNN attention then says it finds no cuDNN)
            pass
    # cuDNN attention asks the default backend (here the CPU) for the GPU's compute capability, to
    # choose what it may use (e.g. values narrower than keys: models.attention.causal_attention);
    # answer for the described target, compute capability 9.0 (TARGETS)
    fused_attention_stablehlo.check_compute_capability = lambda c: tuple(int(x) for x in c.split(".")) <= (9, 0)
    fused_attention_stablehlo.is_cuda_compute_capability_equal = lambda c: tuple(int(x) for x in c.split(".")) == (9, 0)


# ---------------------------------------------------------------------------------------------
# Reading XLA's optimised HLO

DTYPE_BYTES = {"pred": 1, "s1": 0.125, "u1": 0.125, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
               "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f4e2m1fn": 0.5, "f8e3m4": 1, "f8e4m3": 1, "f8e4m3fn": 1,
               "f8e4m3fnuz": 1, "f8e4m3b11fnuz": 1, "f8e5m2": 1, "f8e5m2fnuz": 1, "f8e8m0fnu": 1, "bf16": 2, "f16": 2, "f32": 4,
               "f64": 8, "c64": 8, "c128": 16}
_WORKSPACE = re.compile(r"s8\[\d+\](\{[^}]*\})?")  # a library call's scratch buffer, in its result tuple
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
# instructions that launch nothing themselves (control flow runs the computations it names)
NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
             "after-all", "add-dependency", "opt-barrier", "partition-id", "replica-id", "domain", "copy-done",
             "send-done", "recv-done", "all-reduce-done", "all-gather-done", "collective-permute-done", "async-done",
             "async-update"}


def shape_bytes(shape: str) -> float:
    return sum(DTYPE_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _ARRAY.findall(shape))


def _itemsize(shape: str) -> int:
    """Bytes per element of an array shape's type (its first array's, for a tuple)."""
    arrays = _ARRAY.findall(shape)
    return DTYPE_BYTES[arrays[0][0]] if arrays else 1


def _split_shape(rest: str) -> tuple[str, str]:
    """('shape', 'opcode(...)...') of an instruction's right-hand side."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += (c == "(") - (c == ")")
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    inner: str = ""  # the text between the opcode's parentheses


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    shape, tail = _split_shape(m.group(2))
    op, _, args = tail.partition("(")
    depth, end = 1, 0
    for end, c in enumerate(args):
        depth += (c == "(") - (c == ")")
        if depth == 0:
            break
    operands = re.findall(r"%([\w.\-]+)", args[:end])
    return Instr(m.group(1), shape, op.strip(), operands, args[end + 1 :], args[:end])


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """({computation: instructions}, entry name) of an HLO module's text."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group(2)
            comps[current] = []
            entry = current if h.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            ins = _parse_instr(line)
            if ins:
                comps[current].append(ins)
    return comps, entry


def _called(attrs: str, key: str) -> list[str]:
    m = re.search(key + r"=\{([^}]*)\}", attrs) or re.search(key + r"=%?([\w.\-]+)", attrs)
    return re.findall(r"[\w.\-]+", m.group(1).replace("%", "")) if m else []


def _trip_count(attrs: str) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
    return int(m.group(1)) if m else None


def _op_name(ins: Instr) -> str:
    m = re.search(r'op_name="([^"]*)"', ins.attrs)
    return m.group(1) if m else ""


def _highest(attrs: str) -> bool:
    """Whether a dot (its HLO attributes) or a cuBLAS call (its backend config) asks for float32's
    full precision, which a GPU runs on its CUDA cores instead of as a tf32 tensor-core GEMM: either
    operand at Precision.HIGHEST (XLA reads the higher of the two: `{default,highest}` too), or the
    float32 dot algorithm (jax.lax.DotAlgorithmPreset.F32_F32_F32)."""
    precisions = re.findall(r'operand_precision=\{([^}]*)\}|"operand_precision":\[([^\]]*)\]', attrs)
    if any("highest" in (a + b).lower() for a, b in precisions):
        return True
    return bool(re.search(r'algorithm=dot_f32_f32_f32\b|"algorithm":"ALG_DOT_F32_F32_F32"', attrs))


def _dot_flops(comp: list[Instr]) -> tuple[float, list[str], str]:
    """FLOPs of the dots in a fused computation, their operand types (a float32 product at
    Precision.HIGHEST marked "(highest)") and the first one's JAX op name."""
    shapes = {i.name: i.shape for i in comp}
    flops, types, op = 0.0, [], ""
    for i in comp:
        if i.opcode != "dot":
            continue
        lhs = _ARRAY.search(shapes.get(i.operands[0], ""))
        rhs = _ARRAY.search(shapes.get(i.operands[1], ""))
        out = _ARRAY.search(i.shape)
        if not (lhs and rhs and out):
            continue
        lhs_dims = [int(d) for d in lhs.group(2).split(",") if d]
        contracting = [int(d) for d in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs).group(1).split(",") if d]
        flops += 2.0 * math.prod(int(d) for d in out.group(2).split(",") if d) * math.prod(lhs_dims[d] for d in contracting)
        types.append(f"{lhs.group(1)}x{rhs.group(1)}->{out.group(1)}" + (HIGHEST if _highest(i.attrs) else ""))
        op = op or _op_name(i)
    return flops, types, op


NARROW = ("bf16xbf16", "f16xf16", "f8")  # GEMM operand types at the tensor cores' full rate
HIGHEST = " (highest)"  # marks a GEMM type computed at Precision.HIGHEST
SLICING = ("gather", "dynamic-slice", "slice")  # read part of their first operand
IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}  # write part of their first operand: the update's index


def _is_param(name: str, by_name: dict) -> bool:
    """Whether `name` is a fusion parameter, through bitcasts only (an update in place of that buffer;
    through a convert it is a new buffer, written whole)."""
    while name in by_name and by_name[name].opcode == "bitcast" and by_name[name].operands:
        name = by_name[name].operands[0]
    return name in by_name and by_name[name].opcode == "parameter"


def fusion_bytes(comp: list[Instr], operand_shapes: list[str], result_shape: str) -> float:
    """Bytes a fused kernel reads and writes: each operand whole, except one the kernel only
    slices (gather, dynamic-slice, slice: the slices) or updates in place (dynamic-update-slice, scatter:
    nothing read; the update written instead of the whole result)."""
    index = {i.name: int(i.inner) for i in comp if i.opcode == "parameter" and i.inner.strip().isdigit()}
    users: dict[str, list[tuple[Instr, int]]] = {}
    for i in comp:
        for pos, o in enumerate(i.operands):
            users.setdefault(o, []).append((i, pos))
    by_name = {i.name: i for i in comp}

    def uses_of(name: str, through=("bitcast", "convert")) -> list[tuple[Instr, int]]:
        out = []
        for u, pos in users.get(name, []):
            out += uses_of(u.name, through) if u.opcode in through else [(u, pos)]
        return out

    total = 0.0
    for name, n in index.items():
        if n >= len(operand_shapes):
            continue
        uses = uses_of(name)  # (a slice reads per element, so through converts as well)
        direct = uses_of(name, ("bitcast",))  # updated in place: the buffer itself, not a converted copy
        if uses and all(u.opcode in SLICING and pos == 0 for u, pos in uses):
            # (the slices' elements in the operand's own type: XLA may convert it before slicing)
            total += sum(shape_bytes(u.shape) / _itemsize(u.shape) * _itemsize(operand_shapes[n]) for u, _ in uses)
        elif direct and all(u.opcode in IN_PLACE and pos == 0 for u, pos in direct):
            continue
        else:
            total += shape_bytes(operand_shapes[n])
    root = comp[-1] if comp else None
    roots = [by_name[o] for o in root.operands if o in by_name] if root is not None and root.opcode == "tuple" else [root]
    for r in roots:
        while r is not None and r.opcode == "bitcast" and r.operands and r.operands[0] in by_name:
            r = by_name[r.operands[0]]
        if r is not None and r.opcode in IN_PLACE and len(r.operands) > IN_PLACE[r.opcode] and _is_param(r.operands[0], by_name):
            total += shape_bytes(by_name[r.operands[IN_PLACE[r.opcode]]].shape) if r.operands[IN_PLACE[r.opcode]] in by_name else 0
        elif r is not None:
            total += shape_bytes(r.shape)
    return total if root is not None else shape_bytes(result_shape) + sum(shape_bytes(x) for x in operand_shapes)


@dataclasses.dataclass
class Kernel:
    name: str
    kind: str  # "gemm", "attention" (a cuDNN call), "other"
    count: int  # launches per run of the program (loop trip counts multiplied in)
    bytes: float  # operands read + result written, per launch
    flops: float  # GEMM FLOPs per launch
    types: list[str]  # GEMM operand types
    op: str = ""  # the JAX op it computes (metadata op_name: the jitted function's path to it)


def _written_bytes(i: Instr) -> float:
    """The bytes a kernel writes: its result, less any result an output-to-operand aliasing updates
    in place (a Pallas kernel's caches: it writes the slots it stores, unknown here, not the buffer).
    An alias names a result by its shape index: `{1}` the tuple's second element, `{1,0}` an element
    of a nested tuple, `{}` the whole result (a kernel with one output, updated in place)."""
    m = re.search(r"output_to_operand_aliasing=(\{.*?\})(?:, [a-z_]+=|$)", i.attrs)
    if not m:
        return shape_bytes(i.shape)
    aliased = [tuple(int(d) for d in k.split(",") if d.strip()) for k in re.findall(r"\{([\d,\s]*)\}: \(", m.group(1))]
    written, index = 0.0, []  # (index: the shape index of the element the walk is at)
    for tok in re.finditer(r"\(|\)|,|" + _ARRAY.pattern + r"(?:\{[^}]*\})?", i.shape):
        if tok.group(0) == "(":
            index.append(0)
        elif tok.group(0) == ")":
            index.pop()
        elif tok.group(0) == ",":
            if index:
                index[-1] += 1
        elif not any(tuple(index[: len(a)]) == a for a in aliased):
            written += DTYPE_BYTES[tok.group(1)] * math.prod(int(d) for d in tok.group(2).split(",") if d)
    return written


def kernels(text: str) -> list[Kernel]:
    """Every kernel the program launches, with its launch count: the entry computation's, and those
    of the computations its loops, conditionals and command buffers run (a loop's body times its
    trip count when XLA knows it, and then no condition; else the body once and the condition twice)."""
    comps, entry = parse_hlo(text)
    out: list[Kernel] = []

    def walk(name: str, times: int):
        comp = comps.get(name, [])
        shapes = {i.name: i.shape for i in comp}
        for i in comp:
            if i.opcode == "while":
                # with a known trip count XLA's GPU runtime runs the body that many times and never
                # the condition (WhileThunk); otherwise the condition once more than the body (once here)
                known = _trip_count(i.attrs)
                for c in _called(i.attrs, "condition") if known is None else ():
                    walk(c, times * 2)
                for c in _called(i.attrs, "body"):
                    walk(c, times * (known or 1))
            elif i.opcode == "conditional":
                for key in ("branch_computations", "true_computation", "false_computation"):
                    for c in _called(i.attrs, key):
                        walk(c, times)
            elif i.opcode == "call":
                for c in _called(i.attrs, "to_apply"):
                    walk(c, times)
            elif i.opcode == "async-start":  # (the wrapped operation runs as the computation it calls)
                for c in _called(i.attrs, "calls"):
                    walk(c, times)
            elif i.opcode not in NO_KERNEL and not i.opcode.endswith("-done"):
                moved = _written_bytes(i) + sum(shape_bytes(shapes.get(o, "")) for o in dict.fromkeys(i.operands))
                flops, types, op = 0.0, [], _op_name(i)
                target = re.search(r'custom_call_target="([^"]*)"', i.attrs)
                if i.opcode in ("fusion", "fusion-start"):  # (an async fusion: its result tuple is not its output)
                    for c in _called(i.attrs, "calls"):
                        f, t, o = _dot_flops(comps.get(c, []))
                        flops, types, op = flops + f, types + t, o or op
                        moved = fusion_bytes(comps.get(c, []), [shapes.get(o, "") for o in i.operands], i.shape)
                elif target and ("gemm" in target.group(1) or "matmul" in target.group(1)):
                    flops, types = _custom_gemm(i, shapes)
                    # (its result tuple's last element is the library's scratch workspace, not data)
                    moved = shape_bytes(_WORKSPACE.sub("", i.shape)) + sum(shape_bytes(shapes.get(o, "")) for o in i.operands)
                kind = "attention" if target and "fmha" in target.group(1) else "gemm" if types else "other"
                out.append(Kernel(i.name, kind, times, moved, flops, types, op))

    walk(entry, 1)
    return out


def _custom_gemm(i: Instr, shapes: dict[str, str]) -> tuple[float, list[str]]:
    """FLOPs and types of a cuBLAS GEMM call (its backend config names the contracting dims)."""
    a, b = (_ARRAY.search(shapes.get(o, "")) for o in i.operands[:2])
    out = _ARRAY.search(i.shape)
    m = re.search(r'"lhs_contracting_dimensions":\["?(\d+)', i.attrs)
    if not (a and b and out and m):
        return 0.0, []
    a_dims = [int(d) for d in a.group(2).split(",") if d]
    return 2.0 * math.prod(int(d) for d in out.group(2).split(",") if d) * a_dims[int(m.group(1))], [
        f"{a.group(1)}x{b.group(1)}->{out.group(1)}" + (HIGHEST if _highest(i.attrs) else "")
    ]


def gemm_rate(k: Kernel, t: dict) -> float:
    """The datasheet FLOP/s a GEMM kernel runs at on target `t`: the bf16 tensor-core peak when
    every product is 16-bit or narrower, the CUDA cores' float32 rate when any asks for
    Precision.HIGHEST, else tf32's."""
    if all(ty.startswith(NARROW) for ty in k.types):
        return t["peak_bf16"]
    return t["peak_fp32"] if any(ty.endswith(HIGHEST) for ty in k.types) else t["peak_tf32"]


def summarize_kernels(ks: list[Kernel], target: str, per: float = 1.0) -> dict:
    """Launches, GEMM FLOPs by operand type, bytes of the other kernels and the roofline time (ms),
    each divided by `per` (e.g. tokens per decode loop)."""
    t = TARGETS[target]
    gemm = [k for k in ks if k.kind == "gemm"]
    other = [k for k in ks if k.kind == "other"]
    by_type: dict[str, float] = {}
    for k in gemm:
        for ty in set(k.types):
            by_type[ty] = by_type.get(ty, 0.0) + k.count * k.flops / per
    wide = sorted({f"{ty} ({k.op})" for k in gemm for ty in k.types if not ty.startswith(NARROW)})

    def seconds(k: Kernel) -> float:
        return k.count * max(k.flops / gemm_rate(k, t), k.bytes / t["bandwidth"])

    return {
        "kernels": sum(k.count for k in ks) / per,
        "gemm_kernels": sum(k.count for k in gemm) / per,
        "attention_kernels": sum(k.count for k in ks if k.kind == "attention") / per,
        "other_kernels": sum(k.count for k in other) / per,
        "gemm_flops": sum(k.count * k.flops for k in gemm) / per,
        "gemm_flops_by_type": by_type,
        "wide_gemm_types": wide,
        "other_bytes": sum(k.count * k.bytes for k in other) / per,
        "roofline_ms": 1e3 * sum(seconds(k) for k in gemm + other) / per,
        "roofline_gemm_ms": 1e3 * sum(seconds(k) for k in gemm) / per,
        "roofline_other_ms": 1e3 * sum(seconds(k) for k in other) / per,
    }


def top_kernels(ks: list[Kernel], target: str, n: int = 10, per: float = 1.0) -> list[dict]:
    """The `n` kernels with the longest roofline time over the run (launches x time per launch)."""
    t = TARGETS[target]

    def ms(k: Kernel) -> float:
        return 1e3 * k.count * max(k.flops / gemm_rate(k, t), k.bytes / t["bandwidth"]) / per

    ranked = sorted((k for k in ks if k.kind != "attention"), key=ms, reverse=True)[:n]
    return [{"name": k.name, "kind": k.kind, "op": k.op, "launches": k.count / per, "mb_per_launch": k.bytes / 1e6, "ms": ms(k)}
            for k in ranked]


def memory(compiled) -> dict:
    """The compiled program's device memory: arguments, results, temporaries, and the peak it needs
    (arguments + results + temporaries - donated buffers the results reuse)."""
    m = compiled.memory_analysis()
    args, outs, temp, alias = (int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias"))
    return {"argument_bytes": args, "output_bytes": outs, "temp_bytes": temp, "alias_bytes": alias,
            "peak_bytes": args + outs + temp - alias}


def compiled_report(compiled: Compiled, target: str, per: float = 1.0, top: int = 0) -> dict:
    """Memory, kernels, GEMM types, bytes and roofline of a compiled program for `target` (each
    divided by `per`), with its `top` costliest kernels when asked."""
    ks = kernels(compiled.text)
    row = {**compiled.memory, **summarize_kernels(ks, target, per)}
    if top:
        row["top_kernels"] = top_kernels(ks, target, top, per)
    return row


# ---------------------------------------------------------------------------------------------
# The trainer's step and the sampler's loop, compiled for the target


@dataclasses.dataclass
class Compiled:
    """What a report reads of one compiled program: XLA's optimised HLO text, its memory analysis
    (`memory`), how long XLA took to compile it, and whether this came from the report cache."""

    text: str
    memory: dict
    seconds: float
    cached: bool = False


REPORT_CACHE_VERSION = 1
# an absolute path to a Python file, anywhere in a lowered module's text: in its locations
# (loc("/x/llmjax/models/layers.py":12:3)) and inside the Pallas kernels' serialized Triton modules
_SOURCE_PATH = re.compile(r"(?:/[^/\s\"'\\:()]+)+/([^/\s\"'\\:()]+\.py)\b")


def _plugin_versions() -> list[str]:
    folder = plugin_dir()
    names = sorted(p.name for p in folder.glob("*.dist-info")) if folder.is_dir() else []
    if not names:  # (a GPU machine's installed plugin)
        from importlib import metadata

        for dist in ("jax-cuda13-plugin", "jax-cuda13-pjrt"):
            try:
                names.append(f"{dist}-{metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                pass
    return names


def report_cache_key(lowered, target: str) -> str:
    """The report cache's key for compiling `lowered` for `target`: a hash of everything the
    compiled program depends on. The lowered module with its source locations (which name XLA's
    ops: the reports read them) and the Pallas kernels' own, each file by name only
    (`canonical_paths`), so that a checkout elsewhere hits the same entry and an edit that moves a
    traced line misses it; the target's description;
    jax, jaxlib and the plugin's versions; $XLA_FLAGS; whether cuDNN was found; and JAX's settings
    (those about caches, logging and transfer guards left out)."""
    import hashlib

    import jax
    from jax._src import lib

    settings = sorted((k, repr(v)) for k, v in jax.config.values.items()
                      if not re.search(r"cache|log|dump|transfer_guard|mtls|traceback|profil", k))
    head = json.dumps([REPORT_CACHE_VERSION, target, target_config(target), jax.__version__, lib.version_str, _plugin_versions(),
                       os.environ.get("XLA_FLAGS", ""), _cudnn_found(), settings])
    h = hashlib.sha256(head.encode())
    h.update(canonical_paths(lowered.as_text(debug_info=True)).encode())
    return f"llmjax-aot-{h.hexdigest()}"


def canonical_paths(text: str) -> str:
    """`text` with every absolute path to a Python file cut to the file's name: the same program
    lowered in a checkout elsewhere (another clone, another virtual environment) reads the same."""
    return _SOURCE_PATH.sub(r"\1", text)


@contextlib.contextmanager
def _file_names_only():
    """Lowering inside: source files named without their folders (JAX's
    jax_hlo_source_file_canonicalization_regex), in the module's locations and in the Pallas kernels'
    serialized Triton modules, whose byte offsets a path's length changes: `canonical_paths` cannot
    make those the same for a checkout elsewhere. XLA's metadata then names each op's file alone."""
    import jax

    before = jax.config.jax_hlo_source_file_canonicalization_regex
    jax.config.update("jax_hlo_source_file_canonicalization_regex", r".*/")
    try:
        yield
    finally:
        jax.config.update("jax_hlo_source_file_canonicalization_regex", before)


def _cudnn_found() -> bool:
    try:
        return importlib.util.find_spec("nvidia.cudnn") is not None
    except (ImportError, ValueError):
        return False


def report_cache():
    """The folder cache (llmjax.compile_cache.FolderCache) that keeps compiled programs' reports,
    in the command-line tools' compilation cache folder (llmjax.runtime: $LLMJAX_COMPILATION_CACHE,
    ~/.cache/llmjax/jax by default), or None where that cache is off. A compile-only device's
    programs cannot be stored in JAX's own cache (they cannot be loaded back: nothing can run them),
    so their HLO text and memory analysis are kept instead."""
    from llmjax.compile_cache import FolderCache
    from llmjax.runtime import compilation_cache_settings

    import jax

    settings = compilation_cache_settings()
    if settings is None or "://" in settings["jax_compilation_cache_dir"]:
        return None
    # (a size limit the user set in $JAX_COMPILATION_CACHE_MAX_SIZE: as JAX read it)
    folder, limit = settings["jax_compilation_cache_dir"], settings.get("jax_compilation_cache_max_size", jax.config.jax_compilation_cache_max_size)
    if (folder, limit) not in _report_caches:  # (one per folder: a FolderCache lists its folder at its first write)
        try:
            _report_caches[folder, limit] = FolderCache(folder, max_bytes=limit)
        except OSError:  # (a folder that cannot be made: no cache, as the tools' own compiles have none then)
            return None
    return _report_caches[folder, limit]


_report_caches: dict[tuple[str, int], object] = {}


def compile_for_report(lowered, target: str, cache=None) -> Compiled:
    """`lowered` compiled for `target` (its HLO text and memory analysis), read from `cache` (a
    FolderCache) when the same program was compiled before, else compiled and put there. An entry
    that cannot be read (damaged, or another version's) is compiled again and replaced."""
    import zlib

    key = report_cache_key(lowered, target) if cache is not None else None
    if key is not None:
        raw = cache.get(key)
        if raw is not None:
            try:
                entry = json.loads(zlib.decompress(raw))
                return Compiled(entry["text"], entry["memory"], float(entry["seconds"]), cached=True)
            except (zlib.error, ValueError, KeyError, TypeError):
                pass
    t0 = time.perf_counter()
    compiled = lowered.compile()
    out = Compiled(compiled.as_text(), memory(compiled), time.perf_counter() - t0)
    if key is not None:
        cache.put(key, zlib.compress(json.dumps({"text": out.text, "memory": out.memory, "seconds": out.seconds}).encode()))
    return out


def train_report(cfg, device, target: str, top: int = 0) -> dict:
    """The trainer's step at `cfg`'s batch size, compiled for `device`, per step."""
    import jax
    import jax.numpy as jnp

    from llmjax import runtime
    from llmjax.config import model_config
    from llmjax.sharding import make_mesh
    from llmjax.summary import summarize
    from llmjax.train import build_steps

    mcfg, tcfg = model_config(cfg), cfg.train
    mesh = make_mesh({"data": 1}, [device])
    B, T, accum = tcfg.batch_size, mcfg.context_len, tcfg.grad_accum_steps
    with runtime.compiling_for("gpu"), jax.set_mesh(mesh), jax.default_device(device), _file_names_only():  # (Pallas asks the default device)
        s = build_steps(cfg, mesh)
        state = jax.eval_shape(s.init_state)
        tokens = jax.ShapeDtypeStruct((accum, B, T + 1), jnp.int32, sharding=s.tok_shard)
        compiled = compile_for_report(s.train_step.lower(state, tokens), target, report_cache())
    row = {"suite": "train", "batch_size": B, "seq_len": T, "compile_seconds": compiled.seconds, "compile_cached": compiled.cached,
           **compiled_report(compiled, target, top=top)}
    row["model_flops"] = summarize(mcfg)["flops_per_token"] * accum * B * T
    return row


def decode_report(cfg, device, target: str, batch: int, prompt_len: int, new_tokens: int, unroll: int | None = None,
                  top: int = 0, quantize: str | None = None, mode: str = "greedy") -> dict:
    """The sampler's prefill and decode loop (llmjax.sample) for `batch` prompts of `prompt_len`
    tokens and `new_tokens` new ones, compiled for `device`; the loop's figures per decode step,
    which makes one new token for each of the `batch` rows (`tokens_per_step`: divide the FLOPs,
    bytes and roofline time by it for one token's share). `mode` is one of bench's DECODE_MODES:
    greedy, or topk (temperature 1, top-k 200)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from llmjax import runtime, sample
    from llmjax.bench import DECODE_MODES, inference_model
    from llmjax.config import model_config

    unroll = unroll or sample.DECODE_UNROLL
    mcfg = model_config(cfg).replace(scan_layers=False)
    sh = jax.sharding.SingleDeviceSharding(device)

    def place(tree):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree)

    with runtime.compiling_for("gpu"), jax.default_device(device), _file_names_only():
        graphdef, params = nnx.split(nnx.eval_shape(lambda: inference_model(mcfg, quantize)))
        params = place(params)
        prefill, decode = sample._jitted()
        rows = max(batch, sample.decode_min_rows("gpu"))  # as `generate` pads a batch on a GPU
        T0 = sample.bucket(prompt_len, mcfg.context_len)
        cache_len = min(mcfg.context_len, sample._round_up(T0 + new_tokens, 64))
        state = place(jax.eval_shape(lambda: sample.start_state(rows, new_tokens, 0)))
        toks = jax.ShapeDtypeStruct((rows, T0), jnp.int32, sharding=sh)
        lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sh)
        prefix, sampling = DECODE_MODES[mode]
        kw = dict(sampling=sampling, eot=-1)
        lowered = prefill.lower(graphdef, params, state, toks, lengths, cache_len=cache_len, **kw)
        cache = report_cache()
        pre = compile_for_report(lowered, target, cache)
        state = place(lowered.out_info)
        steps = jax.ShapeDtypeStruct((), jnp.int32, sharding=sh)
        dec = compile_for_report(decode.lower(graphdef, params, state, steps, unroll=unroll, **kw), target, cache)
    prefill_row = compiled_report(pre, target)
    row = {"suite": f"decode_{prefix}b{batch}", "decode_mode": mode, "batch_size": batch, "prompt_len": T0, "cache_len": cache_len, "unroll": unroll,
           "compile_seconds": pre.seconds + dec.seconds, "compile_cached": pre.cached and dec.cached, "prefill_kernels": prefill_row["kernels"],
           "prefill_peak_bytes": prefill_row["peak_bytes"], "decode_rows": rows, "tokens_per_step": batch}
    per_step = compiled_report(dec, target, per=unroll, top=top)  # the loop's body: `unroll` steps
    row.update({k: v for k, v in per_step.items() if not k.endswith("_bytes") or k == "other_bytes"})
    row["decode_peak_bytes"] = per_step["peak_bytes"]
    row["kernels_per_layer"] = per_step["kernels"] / mcfg.n_layer
    return row


# ---------------------------------------------------------------------------------------------
# CLI


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def format_rows(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append(f"== {r['arch']} {r['suite']} on {r['target']} (compile-only)")
        for k, v in r.items():
            if k in ("arch", "suite", "target"):
                continue
            if k == "top_kernels":
                lines.append(f"  {k}")
                lines += [f"    {x['ms']:8.4f} ms  {x['launches']:5.0f} x {x['mb_per_launch']:9.3f} MB  {x['kind']:5s} {x['name']}  {x['op']}"
                          for x in v]
                continue
            if k.endswith("_bytes") and isinstance(v, (int, float)):
                v = f"{v / 1e9:.3f} GB"
            elif isinstance(v, dict):
                v = ", ".join(f"{a}: {b:.4g}" for a, b in v.items()) or "-"
            lines.append(f"  {k:24s} {_fmt(v)}")
    return "\n".join(lines)


def define_flags():
    from absl import flags

    from llmjax import cli

    cli.define_config_flag()
    flags.adopt_module_key_flags(cli)  # (--help lists them with the tool's own flags)
    flags.DEFINE_enum("target", "h100", list(TARGETS), "the GPU to compile for")
    flags.DEFINE_list("suite", ["train", "decode"], "what to compile: train (the trainer's step), decode (the sampler)")
    flags.DEFINE_integer("batch_size", None, "training batch size (default: the config's train.batch_size)")
    flags.DEFINE_list("decode_batches", ["1", "64"], "decode batch sizes")
    flags.DEFINE_integer("prompt_len", 16, "decode prompt tokens")
    flags.DEFINE_integer("new_tokens", 256, "decode new tokens")
    flags.DEFINE_enum("quantize", None, ["int8"], "decode with int8 weight-only quantization (llmjax.quant)")
    flags.DEFINE_list("decode_modes", ["greedy"], "decode: greedy and/or topk (temperature 1, top-k 200 sampling), as bench's")
    flags.DEFINE_integer("top", 0, "also list the N kernels with the longest roofline time")
    flags.DEFINE_bool("json", False, "print one JSON object per row instead of the text report")


def main(argv):
    from absl import flags

    from llmjax import cli
    from llmjax.config import model_config

    F = flags.FLAGS
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    unknown = [s for s in F.suite if s not in ("train", "decode")]
    if unknown:
        cli.fail(f"unknown suite(s) {', '.join(unknown)}; choose from train, decode")
    if not F.suite:  # (it compiled nothing and printed nothing, exit status 0)
        cli.fail("--suite is empty; choose from train, decode")
    # (a flag of a suite left out was ignored, as bench refuses it: --batch_size with --suite decode, say)
    for name, suite in (("batch_size", "train"), ("decode_batches", "decode"), ("prompt_len", "decode"), ("new_tokens", "decode"),
                        ("decode_modes", "decode")):
        if F[name].present and suite not in F.suite:
            cli.fail(f"--{name} is for the {suite} suite, which --suite {','.join(F.suite)} does not compile: add {suite} to --suite, "
                     f"or drop --{name}")
    if F.quantize and "decode" not in F.suite:  # (it was ignored: the float training step compiled)
        cli.fail(f"--quantize {F.quantize} applies to the decode suite; --suite train compiles the float training step: add decode "
                 "(--suite train,decode) or drop --quantize")
    try:
        batches = [int(b) for b in F.decode_batches]
    except ValueError:
        cli.fail(f"--decode_batches takes integers, got {','.join(F.decode_batches)}")
    if "decode" in F.suite and not batches:
        cli.fail("--decode_batches is empty; give the decode batch sizes (e.g. 1,64) or leave decode out of --suite")
    if F.top < 0:
        cli.fail(f"--top must be at least 0, got {F.top}")
    if min(batches + [1 if F.batch_size is None else F.batch_size]) < 1 or F.prompt_len < 1 or F.new_tokens < 1:
        cli.fail("batch sizes, --prompt_len and --new_tokens must be at least 1")
    try:
        device = gpu_device(F.target)
    except AotError as e:
        cli.fail(str(e))
    from llmjax.bench import DECODE_MODES  # (after gpu_device: it imports JAX)

    if not F.decode_modes or any(m not in DECODE_MODES for m in F.decode_modes):
        cli.fail(f"--decode_modes takes {' and/or '.join(DECODE_MODES)}, got {','.join(F.decode_modes) or 'none'}")
    cfg = F.config.copy_and_resolve_references()
    if F.batch_size:
        with cfg.unlocked():
            cfg.train.batch_size = F.batch_size
    arch = model_config(cfg).arch
    rows = []
    try:
        if "train" in F.suite:
            rows.append(train_report(cfg, device, F.target, F.top))
        if "decode" in F.suite:
            rows += [decode_report(cfg, device, F.target, b, F.prompt_len, F.new_tokens, top=F.top, quantize=F.quantize, mode=m)
                     for m in F.decode_modes for b in batches]
    except RuntimeError as e:
        if "cuDNN not found" not in str(e):
            raise
        cli.fail(f"cuDNN attention needs cuDNN beside the plugin (setup_aot.sh --no-cudnn leaves it out): run "
                 f"`bash scripts/setup_aot.sh`, or compile with --config.model.attention_impl=xla")
    for r in rows:
        r.update(arch=arch, target=F.target)
        print(json.dumps(r) if F.json else format_rows([r]), flush=True)


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    from absl import flags

    from llmjax import cli

    aot = cli.tool("llmjax.aot")
    aot.define_flags()
    flags.adopt_module_key_flags(aot)  # (--help lists the key flags of __main__, which defines none now)
    cli.run(aot.main)
