"""Where the time goes: a `jax.profiler` trace of a piece of work, summarised.

`traced(fn, directory)` runs `fn()` under `jax.profiler.trace` and returns its result with a
summary of the trace: how long the device was busy against the wall time of the call (a busy
fraction well below 1 means the host, launches or synchronisation bound the work, not the device),
and the device time per XLA operation, grouped into kinds (matmul, attention, fusion, copy,
collective, other) and listed largest first. On a GPU the events are the kernels and copies on the
device's streams (`/device:GPU:N` planes, as CUPTI records them); on the CPU, the XLA thunks the
runtime executes (host events carrying an `hlo_op`). The trace itself (`*.xplane.pb`) stays in
`directory` for TensorBoard or XProf.

`python -m llmjax.tracing DIR [DIR ...]` prints the summary of traces already on disk (the latest
`*.xplane.pb` under each DIR), e.g. traces brought back from a GPU machine.
"""

from __future__ import annotations

import re
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import jax

KINDS = (  # first match wins; matched against the kernel name and the HLO operation, lower-cased
    ("attention", r"sdpa|fmha|flash|attention|cudnn|softmax_fusion"),
    ("matmul", r"gemm|cublas|nvjet|xmma|cutlass|\bdot\b|dot[._]|dot_|convolution|triton_gemm"),
    ("collective", r"all-reduce|all_reduce|all-gather|all_gather|reduce-scatter|reduce_scatter|nccl|collective|all-to-all"),
    ("copy", r"memcpy|memset|^copy|copy[._]|copy_start|dynamic-update-slice|dynamic_update_slice"),
    ("fusion", r"fusion"),
)


def kind_of(*names: str) -> str:
    text = " ".join(n.lower() for n in names if n)
    for kind, pattern in KINDS:
        if re.search(pattern, text):
            return kind
    return "other"


def fusion_kinds(hlo_text: str) -> dict[str, str]:
    """{fusion name: kind} for the fusions of a compiled HLO module that compute a product: on the
    CPU, XLA runs most dots inside YNNPACK fusions (`ynn_fusion.N`, the trace's only name for them),
    which by name alone would count as fusions; 'matmul' where the fused computation holds a dot
    or a convolution."""
    from llmjax.aot import _called, parse_hlo

    comps, _ = parse_hlo(hlo_text)

    def has_product(name: str, depth: int = 0) -> bool:
        return depth < 4 and any(i.opcode in ("dot", "convolution") or (i.opcode == "fusion" and any(
            has_product(c, depth + 1) for c in _called(i.attrs, "calls"))) for i in comps.get(name, []))

    return {i.name: "matmul" for comp in comps.values() for i in comp
            if i.opcode == "fusion" and any(has_product(c) for c in _called(i.attrs, "calls"))}


def _events(profile) -> list[tuple[str, str, float, float, str]]:
    """(name, hlo_op, start_ns, duration_ns, where) of the device's work in a ProfileData: the
    events on GPU device planes' stream lines when the trace has device planes, otherwise the host
    events that carry an `hlo_op` (the CPU runtime's thunks). Events that hold others on their line
    (a while loop's thunk holds its body's) are left out: their parts are counted."""
    planes = [p for p in profile.planes if p.name.startswith("/device:")]
    where = "device" if planes else "host"
    if not planes:
        planes = [p for p in profile.planes if p.name.startswith("/host:CPU")]
    out = []
    with warnings.catch_warnings():  # jaxlib's event_stats type warns when iterated (jax 0.11)
        warnings.simplefilter("ignore", DeprecationWarning)
        for plane in planes:
            lines = list(plane.lines)
            if where == "device" and any(ln.name.startswith("Stream") for ln in lines):
                lines = [ln for ln in lines if ln.name.startswith("Stream")]  # derived lines repeat the kernels
            for line in lines:
                evs = []
                for e in line.events:
                    op = dict(e.stats).get("hlo_op")
                    if (where == "device" or op is not None) and e.duration_ns > 0:
                        evs.append((float(e.start_ns), float(e.duration_ns), e.name, str(op or "")))
                evs.sort(key=lambda v: (v[0], -v[1]))
                for i, (start, dur, name, op) in enumerate(evs):
                    # an event that holds the next one (a while loop, a call) is counted through its
                    # parts; one that merely overlaps the next (kernels of a CUDA graph, whose
                    # timestamps interleave by a few ns) is counted itself
                    # (host lines only: kernels on a device line never nest, and one running inside a
                    # longer one is a concurrent branch of a CUDA graph, not its part)
                    if where == "host" and i + 1 < len(evs) and evs[i + 1][0] < start + dur and evs[i + 1][0] + evs[i + 1][1] <= start + dur:
                        continue
                    out.append((name, op, start, dur, where))
    return out


def _union_ns(intervals) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def summarize(profile, *, wall_s: float | None = None, top: int = 12, hlo: str | None = None) -> dict:
    """A summary of a ProfileData (or the path of an `.xplane.pb`): events, busy and span times,
    busy fraction (of `wall_s` when given, else of the span), time per kind and the `top` operations
    by time (name without its `.N` suffix, so all `dot.*` make one row; kind, count, ms, share of
    the summed time). `hlo`: the traced program's compiled HLO text, whose fusions that hold a
    product then count as matmuls (fusion_kinds). A trace that cannot be read is a ValueError."""
    if isinstance(profile, (str, Path)):
        path = profile
        try:
            profile = jax.profiler.ProfileData.from_file(str(profile))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{profile} is not a readable trace ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        if not list(profile.planes):  # (an empty file parses as an empty trace: a job killed before it wrote)
            raise ValueError(f"{path} is not a readable trace (it holds nothing)")
    known = fusion_kinds(hlo) if hlo else {}
    intervals, by_op, by_kind, count = [], defaultdict(float), defaultdict(float), defaultdict(int)
    where = None
    for name, op, start, dur, where in _events(profile):
        intervals.append((start, start + dur))
        # one row per kind of operation (dot.12, dot.40 -> dot); kernels that XLA runs inside a CUDA
        # graph all carry the graph's op (command_buffer_N): those rows go by kernel name instead
        key = re.sub(r"\.\d+$", "", name if not op or op.startswith("command_buffer") else op)
        k = known.get(op) or known.get(name) or kind_of(name, op)
        by_op[(key, k)] += dur
        count[(key, k)] += 1
        by_kind[k] += dur
    busy = _union_ns(intervals)
    span = (max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0
    total = sum(by_kind.values()) or 1.0
    denom = wall_s * 1e9 if wall_s else span
    ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "where": where or "none",
        "events": len(intervals),
        "busy_ms": busy / 1e6,
        "span_ms": span / 1e6,
        "wall_ms": wall_s * 1e3 if wall_s else None,
        "busy_fraction": busy / denom if denom else None,
        "kinds_ms": {k: v / 1e6 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"op": op, "kind": k, "count": count[(op, k)], "ms": v / 1e6, "share": v / total} for (op, k), v in ops],
    }


def latest_trace(directory: str | Path) -> Path:
    """`directory` itself when it is a trace file, else the latest *.xplane.pb under it."""
    if Path(directory).is_file():
        return Path(directory)
    if str(directory) == "" or not Path(directory).exists():  # ("" was the current folder, searched whole, without a word)
        raise FileNotFoundError(f"{str(directory)!r} does not exist; pass a directory written by jax.profiler.trace "
                                "(bench --profile's) or one of its *.xplane.pb files")
    paths = sorted(Path(directory).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {directory}; pass a directory written by jax.profiler.trace")
    return paths[-1]


def traced(fn, directory: str | Path, *, top: int = 12, hlo: str | None = None):
    """(fn()'s result, summary of its trace; `hlo` as `summarize`). `fn` must wait for its own results
    (block_until_ready or device_get), so the trace holds all of its device work and the wall time
    is the work's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(directory)):
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
    return out, summarize(latest_trace(directory), wall_s=wall, top=top, hlo=hlo)


def format_summary(title: str, s: dict) -> str:
    frac = "-" if s["busy_fraction"] is None else f"{s['busy_fraction']:.0%}"
    wall = "" if s["wall_ms"] is None else f", wall {s['wall_ms']:.2f} ms"
    lines = [
        f"## {title}",
        f"{s['events']} {s['where']} events; busy {s['busy_ms']:.2f} ms of span {s['span_ms']:.2f} ms{wall}: busy {frac}",
        "by kind: " + ", ".join(f"{k} {v:.2f} ms" for k, v in s["kinds_ms"].items()),
        "",
        "| operation | kind | count | ms | share |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    lines += [f"| `{t['op'][:60]}` | {t['kind']} | {t['count']} | {t['ms']:.3f} | {t['share']:.1%} |" for t in s["top"]]
    return "\n".join(lines)


USAGE = "usage: python -m llmjax.tracing DIR|FILE [...]   (summaries of the latest *.xplane.pb under each DIR, or of FILE)"


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    if not argv:
        print(USAGE, file=sys.stderr)
        return 2
    flag = next((a for a in argv if a.startswith("-") and not Path(a).exists()), None)
    if flag is not None:  # (--top was taken for a folder: "no *.xplane.pb under --top")
        print(f"error: unknown flag {flag}: this tool takes trace folders or files only; {USAGE}", file=sys.stderr)
        return 2
    for d in argv:
        try:
            path = latest_trace(d)
            summary = summarize(path, top=20)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(format_summary(str(path), summary) + "\n")
    return 0


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: llmjax.cli.tool, without absl)
    import importlib

    sys.exit(importlib.import_module("llmjax.tracing").main(sys.argv[1:]))
