"""`python -m llmjax.bench --config configs/<arch>.py[:variant] [--suite train,decode,memory] [--batch_size N[,N]] [--json]`

One row of the results table, measured on this machine's default JAX backend:

- train: tokens/s and MFU of the trainer's own jitted step (`llmjax.train.build_steps`: the same
  optimizer, shardings, donation) on device-resident random tokens, so the input pipeline is not
  timed; warm-up and compilation excluded; median over `--repeats` timed blocks of `--steps` steps,
  each block synchronised at its end. `--steps 0` compiles the step without running it (the memory
  suite's compiled analysis, at any size on any machine; no tokens/s, no device peak: refused with the
  train suite).
- memory: the device's peak bytes in use (`memory_stats`, with XLA preallocation off; null where the
  device reports none, as the CPU does, or where an earlier row of the same process peaked higher:
  measure such a row alone) and XLA's compiled memory analysis of the step (arguments, outputs and
  temporaries), which every backend gives.
- decode: the sampler's tokens/s (`llmjax.sample.generate`, prefill included) for a
  `--prompt_len`-token prompt and `--new_tokens` new tokens at batch 1 and 64 (`--decode_batches`),
  greedy and top-k 200 sampling (`--decode_modes`); random weights cast for inference as a loaded
  checkpoint is; and the decode state of one sequence at full context (`llmjax.summary`).
  `--decode_unroll N`: the decode loop tests its stop condition every N steps (default 16; 1 = every
  step, which on a GPU copies a flag to the host and waits for it after every token).
- hellaswag (not run by default): items/s of the built-in HellaSwag scorer over the validation set
  (`--task_limit`, `--task_batch_size`, `--task_dir`), every length bucket compiled first.

`--batch_size 16,32` gives one row per batch size in one process (smallest first; the decode and
hellaswag suites run once, into the last row). `--all` measures every registered architecture's
`--variant` and rewrites the generated table in docs/benchmarks.md (between its `bench:begin` /
`bench:end` markers) with card, versions, date and command; `--out FILE` also writes the rows as JSON
lines. Each row records XLA_FLAGS. `--profile DIR` traces one more block of training steps and one
more decode run per batch size with `jax.profiler` (into DIR/<arch>/) and adds each trace's summary
to the row (`llmjax.tracing`: device busy fraction, time per kind of operation, the top operations).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before any backend starts: true peaks

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from llmjax import cli  # noqa: E402
from llmjax.config import ConfigError, load_config, model_config, parse_value, set_key, validate  # noqa: E402
from llmjax.models import selective_scan  # noqa: E402
from llmjax.registry import build_model  # noqa: E402
from llmjax.sample import DECODE_UNROLL, SampleError, Sampling, decode_grows, decode_min_rows, generate, inference_params  # noqa: E402
from llmjax.scoring import ScoreError  # noqa: E402
from llmjax.sharding import make_mesh  # noqa: E402
from llmjax.summary import config_files, summarize  # noqa: E402
from llmjax.train import peak_flops  # noqa: E402

SUITES = ("train", "decode", "memory", "hellaswag")
DEFAULT_SUITES = ("train", "decode", "memory")
# the flags that only these suites read: given without any of them, each was ignored, silently
SUITE_FLAGS = {"batch_size": ("train", "memory"), "steps": ("train", "memory"), "repeats": ("train", "memory", "decode"),
               "decode_batches": ("decode",), "decode_modes": ("decode",), "prompt_len": ("decode",), "new_tokens": ("decode",),
               "decode_unroll": ("decode",), "task_batch_size": ("hellaswag",), "task_limit": ("hellaswag",),
               "task_dir": ("hellaswag",), "profile": ("train", "decode")}
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _median_rate(run, units: float, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return units / statistics.median(times)


def own_peak(before: dict, after: dict) -> int | None:
    """A measurement's peak bytes from the device's memory statistics before and after it. The device
    reports the process's peak so far, which is this measurement's only when it rose meanwhile;
    otherwise an earlier one peaked higher and this one's is unknown (None), as it is on a device
    that reports nothing."""
    peak_after, peak_before = after.get("peak_bytes_in_use"), before.get("peak_bytes_in_use", 0)
    return peak_after if peak_after is not None and peak_after > peak_before else None


SUITE_ERRORS = ("hellaswag_error", "decode_error")  # a later suite's failure in a row that kept the earlier figures


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


class Stopped(Exception):
    """SIGTERM or Ctrl-C while a row measures (gpu_check runs each step under `timeout`): the suite
    it stops is the row's error like any other failure, so a row keeps the figures its earlier
    suites measured; the row is written and the command ends."""


_signal = {"armed": False, "got": None}  # what `_on_signal` saw; it raises Stopped only while armed


def _on_signal(signum, frame):
    _signal["got"] = signum
    if _signal["armed"]:  # (unarmed, while a finished row is written: the loop stops after writing it)
        _signal["armed"] = False
        raise Stopped(f"stopped by {signal.Signals(signum).name}")


def _later_suite(row: dict, suite: str, kept: bool, fn) -> None:
    """`row.update(fn())` for a suite that runs after others: where the earlier ones measured
    something (`kept`), a failure here is recorded as `<suite>_error` (the CLI reports it and exits
    1) instead of losing their figures with the row; with nothing measured yet it is raised."""
    if _signal["got"] is not None:  # (stopped in an earlier suite of the row)
        row[f"{suite}_error"] = f"not run: stopped by {signal.Signals(_signal['got']).name}"
        return
    if not kept:
        row.update(fn())
        return
    try:
        row.update(fn())
    except Exception as e:  # noqa: BLE001  (e.g. a decode kernel that fails on this GPU: the training row stays)
        row[f"{suite}_error"] = _one_line(e)


def _profile(row: dict, key: str, fn, directory: Path | None, hlo: str | None = None) -> None:
    """With a `directory`: run `fn` once more under the profiler and put the trace's summary into
    `row[key]` (llmjax.tracing), and its markdown into directory/../summary.md. A profiler that
    cannot start (no CUPTI, say) leaves a one-line `profile_error`, not a failed row."""
    if directory is None:
        return
    from llmjax import tracing

    try:
        _, summary = tracing.traced(fn, directory, hlo=hlo)
    except Exception as e:  # the profiler's failures must not cost the measured figures
        row["profile_error"] = f"{key}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return
    row[key] = summary
    with open(directory.parent / "summary.md", "a") as f:
        f.write(tracing.format_summary(f"{directory.parent.name} {directory.name}", summary) + "\n\n")


def bench_train(cfg, *, steps: int, repeats: int, memory: bool, profile_dir: Path | None = None) -> dict:
    """Tokens/s, MFU and memory of the trainer's step on random tokens; with `profile_dir`, the
    summary of a profiled block of steps."""
    from llmjax.train import build_steps

    mcfg, tcfg = model_config(cfg), cfg.train
    mesh = make_mesh(tcfg.mesh, None)
    B, T, accum = tcfg.batch_size, mcfg.context_len, tcfg.grad_accum_steps
    s = build_steps(cfg, mesh)
    dev = mesh.devices.flat[0]
    before = dev.memory_stats() or {}
    row = {"train_tokens_per_sec": None, "step_time_ms": None, "mfu": None, "peak_memory_bytes": None}
    with jax.set_mesh(mesh):
        if steps == 0:  # compile only (the memory analysis), nothing allocated or run
            state = jax.eval_shape(s.init_state)
            tokens = jax.ShapeDtypeStruct((accum, B, T + 1), jnp.int32, sharding=s.tok_shard)
            compiled = s.train_step.lower(state, tokens).compile()
        else:
            state = s.init_state()
            tokens = jax.device_put(
                jax.random.randint(jax.random.key(1), (accum, B, T + 1), 0, mcfg.vocab_size, dtype=jnp.int32), s.tok_shard
            )
            compiled = s.train_step.lower(state, tokens).compile()
            holder = {"state": state}

            def block(n):
                st = holder["state"]
                for _ in range(n):
                    st, metrics = compiled(st, tokens)
                jax.block_until_ready(metrics["train_loss"])
                holder["state"] = st

            block(2)  # warm-up
            tps = _median_rate(lambda: block(steps), steps * accum * B * T, repeats)
            peak = peak_flops(dev, tcfg.peak_flops_per_device)
            row.update(train_tokens_per_sec=tps, step_time_ms=1e3 * accum * B * T / tps,
                       mfu=summarize(mcfg)["flops_per_token"] * tps / (peak * mesh.devices.size) if peak else None)
            if memory:
                row["peak_memory_bytes"] = own_peak(before, dev.memory_stats() or {})
            _profile(row, "profile_train", lambda: block(min(steps, 5)), profile_dir and profile_dir / f"train_b{B}",
                     hlo=compiled.as_text() if profile_dir else None)
    if memory:
        row["memory_in_use_before_bytes"] = before.get("bytes_in_use")
        row.update(compiled_flops(compiled, accum * B * T, summarize(mcfg)["flops_per_token"], dev.platform, mesh.devices.size))
        m = compiled.memory_analysis()
        row["compiled_memory_bytes"] = (
            int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) if m else None
        )
    return row


def compiled_flops(compiled, tokens: int, model_flops_per_token: float, platform: str = "cpu", devices: int = 1) -> dict:
    """XLA's count of the FLOPs the compiled step performs on its `devices` (XLA counts one device's
    share of a partitioned program; work every device repeats, such as the optimizer's update of
    replicated parameters, counts once per device), per token, and its ratio to the model's
    accounting (`flops_per_token`, which MFU uses): above 1 where the step computes more than the
    model needs (remat's recomputation, masked attention blocks, padding, a product expanded to
    dense); XLA counts no FLOPs inside library calls it does not see into (cuDNN attention on a GPU).
    Also XLA's estimate of the bytes the step's operations read and write, per token (FLOPs over
    bytes: the step's arithmetic intensity). None where the backend gives no cost analysis, and on
    a GPU, where XLA's count leaves out every library call (cuBLAS GEMMs as well as cuDNN attention:
    an H200 gave 0.003 of `vanilla`'s FLOPs), so the figures would say nothing. None too where the
    step has a loop (scanned layers, gradient accumulation, the SSM's chunked scan, the loss over
    vocabulary chunks): XLA counts a loop's body once, whatever its trip count (`vanilla:tiny`'s
    step with its two layers scanned: 0.56 of the model's FLOPs; unrolled: 1.04)."""
    if platform == "gpu" or re.search(r"\bwhile\(", compiled.as_text() or ""):
        return {"compiled_flops_per_token": None, "compiled_flops_ratio": None, "compiled_bytes_per_token": None}
    try:
        cost = compiled.cost_analysis() or {}
    except Exception:  # (a backend without a cost model)
        cost = {}
    flops, moved = devices * float(cost.get("flops", 0.0)), devices * float(cost.get("bytes accessed", 0.0))
    return {"compiled_flops_per_token": flops / tokens if flops > 0 else None,
            "compiled_flops_ratio": flops / tokens / model_flops_per_token if flops > 0 else None,
            "compiled_bytes_per_token": moved / tokens if moved > 0 else None}


def check_rows_file(path: Path) -> None:
    """A ConfigError where the existing --out file is no file of bench rows (bench appends rows): its
    first line that is not blank no JSON object. (Only the first: a row cut short by a kill, the last
    one, must not stop gpu_check's later steps from appending theirs.)"""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        ok = not first or isinstance(json.loads(first), dict)
    except ValueError:  # (UnicodeDecodeError too)
        ok = False
    if not ok:
        raise ConfigError(f"--out {path}: it is no file of bench rows (its first line is no JSON object), and rows are appended to "
                          "it; give a new file or one bench wrote")


def writable_folder(path: str, flag: str) -> None:
    """An OSError (one line) where `path` is not a folder that exists or can be made and written:
    a file there or above it, a folder that cannot be written."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise OSError(f"{flag}={path}: {p} is a file, not a folder; give a folder to write into")
    if not os.access(p, os.W_OK):
        raise OSError(f"{flag}={path}: {p} cannot be written; give a folder that can")


DOC_TITLE = "# Benchmarks"


def front_matter_end(text: str) -> int:
    """Where the text after a YAML front matter block that opens `text` starts (a line '---' first,
    up to the next line '---' or '...', as Jekyll reads it; a static site's page); 0 where none."""
    m = re.match(r"---[ \t]*\r?\n(?:.*?\r?\n)??(?:---|\.\.\.)[ \t]*(?:\r?\n|\Z)", text, re.DOTALL)
    return m.end() if m else 0


def read_doc(doc: Path) -> str:
    """The text of --all's `doc`, or DOC_TITLE where it is new or empty. An OSError (one line) where
    it is not a benchmarks document: not text (its bytes were a UnicodeDecodeError's traceback), or
    a document with no generated table whose title is not DOC_TITLE (README.md, a config: the table
    was appended to it). The title may follow a YAML front matter block (a static site's page: the
    table goes in after it, or between the markers, and it is kept as it is)."""
    try:
        text = doc.read_text() if doc.exists() else ""
    except UnicodeDecodeError:
        raise OSError(f"--doc={doc} is not a text file; give --doc the markdown file for the table (default {DOC})") from None
    titled = text[front_matter_end(text):].lstrip().startswith(DOC_TITLE)
    if text.strip() and not markers(text, BEGIN) and not markers(text, END) and not titled:
        raise OSError(f"--doc={doc} is not a benchmarks document (no {BEGIN} / {END} markers, no '{DOC_TITLE}' title, first or after "
                      "YAML front matter); give docs/benchmarks.md or a new file, or put the two marker lines where the table goes")
    return text if text.strip() else DOC_TITLE + "\n"


def check_doc(doc: Path) -> None:
    """An OSError (one line) where --all could not write its table into `doc` once measured: not a
    file in an existing folder, a folder that cannot be written (the table goes in through a
    temporary file there: it was refused after every row had measured), not a benchmarks document
    (`read_doc`), damaged markers."""
    if not doc.parent.is_dir() or doc.is_dir():
        raise OSError(f"--doc={doc} is not a file in an existing folder")
    if not os.access(doc.parent, os.W_OK | os.X_OK):
        raise OSError(f"--doc={doc}: {doc.parent} cannot be written; give --doc a file in a folder that can")
    rewrite_doc(read_doc(doc), table([], ""))  # (damaged markers: refused now)


def inference_model(mcfg, quantize: str | None = None):
    """Random weights prepared as a loaded checkpoint is (llmjax.sample.load): kernels and token
    table in the compute dtype, or int8 (llmjax.quant)."""
    model = build_model(mcfg, seed=0)
    if quantize not in (None, "", "none"):
        from llmjax import quant

        return quant.apply(model, quantize)
    return nnx.merge(nnx.graphdef(model), inference_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), mcfg.compute_dtype))


DECODE_MODES = {"greedy": ("", Sampling(greedy=True)), "topk": ("sampled_", Sampling(temperature=1.0, top_k=200))}


def bench_decode(cfg, *, batches: list[int], prompt_len: int, new_tokens: int, repeats: int, quantize: str | None = None,
                 modes=tuple(DECODE_MODES), unroll: int = DECODE_UNROLL, profile_dir: Path | None = None) -> dict:
    """The sampler's tokens/s at each batch size, greedy and/or top-k 200 sampling (`modes`), its
    decode loop testing the stop condition every `unroll` steps; with `profile_dir`, the summary of
    a profiled run at each."""
    from llmjax.quant import weight_bytes

    mcfg = model_config(cfg).replace(scan_layers=False)
    model = inference_model(mcfg, quantize)
    rng = np.random.default_rng(0)
    row = {"decode_weight_bytes": weight_bytes(model), "decode_min_rows": decode_min_rows(jax.default_backend())}
    for name, sampling in (DECODE_MODES[m] for m in modes):
        for b in batches:
            prompts = rng.integers(0, mcfg.vocab_size, (b, prompt_len)).tolist()

            def run():
                out = generate(model, prompts, new_tokens, sampling=sampling, seed=0, unroll=unroll)
                assert all(len(o) == new_tokens for o in out)

            run()  # compile
            row[f"decode_{name}tokens_per_sec_b{b}"] = _median_rate(run, b * new_tokens, repeats)
            _profile(row, f"profile_decode_{name}b{b}", run, profile_dir and profile_dir / f"decode_{name}b{b}")
    return row


def check_hellaswag(mcfg) -> None:
    """The hellaswag suite scores text with GPT-2's BPE: refuse other vocabularies before anything runs."""
    from llmjax.tokenizer import GPT2Tokenizer

    if mcfg.vocab_size != GPT2Tokenizer.vocab_size:
        raise ConfigError(f"the hellaswag suite needs a GPT-2 BPE config (vocab 50257), not vocab {mcfg.vocab_size}; "
                          "e.g. --set model.vocab_size=50257 --set model.padded_vocab_size=50304")


def bench_hellaswag(cfg, *, batch_size: int, limit: int | None, task_dir: str | None, quantize: str | None = None) -> dict:
    """HellaSwag items/s of the built-in scorer (llmjax.downstream, the trainer's in-loop one) with
    random weights cast for inference; every length bucket compiled before the timed pass."""
    from llmjax import downstream
    from llmjax.scoring import Scorer, scoring_config
    from llmjax.tokenizer import GPT2Tokenizer

    mcfg = scoring_config(model_config(cfg).replace(scan_layers=False))
    check_hellaswag(mcfg)
    model = inference_model(mcfg, quantize)
    tok = GPT2Tokenizer()
    try:
        items = downstream.load_items("hellaswag", task_dir, limit=limit)
    except downstream.TaskError as e:
        raise ConfigError(str(e)) from None
    scorer = Scorer.for_model(model, batch_size)
    scorer.warm_up(downstream.requests_for(items, tok))  # (every batch shape compiled before the timed pass)
    t0 = time.perf_counter()
    m = downstream.score_task(scorer, tok, items)
    dt = time.perf_counter() - t0
    return {"hellaswag_items_per_sec": len(items) / dt, "hellaswag_items": len(items), "hellaswag_batch_size": batch_size,
            "hellaswag_acc_norm_random_init": m["acc_norm"]}


def device_name() -> str:
    d = jax.devices()[0]
    return d.device_kind if d.platform == "gpu" else f"{d.platform} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def bench(cfg, spec: str, *, suites, steps, repeats, decode_batches, prompt_len, new_tokens, task_batch_size=32, task_limit=None,
          task_dir=None, quantize=None, decode_modes=tuple(DECODE_MODES), decode_unroll=DECODE_UNROLL, profile=None,
          overrides=()) -> dict:
    """One row for the run config `cfg` (named `spec` in the row, with the `overrides` given on the
    command line, as key=value); with `profile` (a directory), the training and decoding suites
    also trace one more run each into profile/<arch>/ and summarise it. `batch_size` is the
    training batch, null in a row without the train and memory suites."""
    mcfg = model_config(cfg)
    if "hellaswag" in suites:
        check_hellaswag(mcfg)
    profile_dir = Path(profile) / mcfg.arch if profile else None
    summ = summarize(mcfg)
    row = {
        "arch": mcfg.arch,
        "config": spec,
        "overrides": list(overrides),
        "device": device_name(),
        "n_devices": jax.device_count(),
        "dtype": mcfg.dtype,
        "matmul_dtype": mcfg.matmul_dtype or mcfg.dtype,
        "scan_layers": mcfg.scan_layers,
        "remat": mcfg.remat,
        "loss_chunks": cfg.train.loss_chunks,
        "deterministic": bool(cfg.train.get("deterministic", False)),
        "attention_impl": mcfg.attention_impl,
        **{k: getattr(mcfg, k) for k in ("moe_mode", "moe_impl", "moe_block_rows", "capacity_factor", "scan_chunk", "scan_impl", "d_conv", "decode_attention_impl", "decode_norm_impl") if hasattr(mcfg, k)},
        # (the SSM's fused scan: steps between its backward's kept states, LLMJAX_SSM_BACKWARD_CHUNK's sweep rows apart)
        **({"ssm_backward_chunk": selective_scan.backward_chunk()} if mcfg.arch == "ssm" else {}),
        "batch_size": cfg.train.batch_size if suites & {"train", "memory"} else None,
        "seq_len": mcfg.context_len,
        "params_total": summ["params_total"],
        "params_active": summ["params_active"],
        "flops_per_token": summ["flops_per_token"],
        "train_tokens_per_sec": None,
        "step_time_ms": None,
        "mfu": None,
        "peak_memory_bytes": None,
        "memory_in_use_before_bytes": None,
        "compiled_memory_bytes": None,
        "compiled_flops_per_token": None,
        "compiled_flops_ratio": None,
        "compiled_bytes_per_token": None,
        **{f"decode_{k}tokens_per_sec_b{b}": None for k in ("", "sampled_") for b in decode_batches},
        "decode_state_bytes": summ["decode_state_bytes"],
        "quantize": quantize or "none",
        "decode_weight_bytes": None,
        "decode_prompt_len": prompt_len if "decode" in suites else None,  # (null in a row without the decode suite)
        "decode_new_tokens": new_tokens if "decode" in suites else None,
        "decode_unroll": decode_unroll,
        "decode_grow": decode_grows(jax.default_backend()),
        "decode_min_rows": None,  # (the decode suite's; every row has the same keys)
        "jax": jax.__version__,
        "flax": flax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if "train" in suites or "memory" in suites:
        row.update(bench_train(cfg, steps=steps, repeats=repeats, memory="memory" in suites,
                               profile_dir=profile_dir if "train" in suites else None))
        if "train" not in suites:
            for k in ("train_tokens_per_sec", "step_time_ms", "mfu"):
                row[k] = None
    kept = bool(suites & {"train", "memory"})
    if "hellaswag" in suites:
        _later_suite(row, "hellaswag", kept, lambda: bench_hellaswag(cfg, batch_size=task_batch_size, limit=task_limit,
                                                                     task_dir=task_dir, quantize=quantize))
        kept = kept or "hellaswag_error" not in row
    if "decode" in suites:
        _later_suite(row, "decode", kept, lambda: bench_decode(cfg, batches=decode_batches, prompt_len=prompt_len, new_tokens=new_tokens,
                                                               repeats=repeats, quantize=quantize, modes=decode_modes,
                                                               unroll=decode_unroll, profile_dir=profile_dir))
    return row


# --- the table in docs/benchmarks.md ----------------------------------------------------------------


def _fmt(v, kind=""):
    if v is None:
        return "-"
    if kind == "pct":
        return f"{v:.1%}"
    if kind == "gb":
        return f"{v / 1e9:.2f}"
    if kind == "m":
        return f"{v / 1e6:.2f}M"
    return f"{v:,.0f}"


def table(rows: list[dict], command: str, suites=None) -> str:
    """The markdown table of `rows`, with the columns of the `suites` measured (default: those the
    rows hold figures of): no training columns of dashes after `--suite decode`, and the hellaswag
    suite's items/s where it ran."""
    ok = [r for r in rows if "error" not in r]
    if suites is None:
        suites = {s for s, key in (("train", "train_tokens_per_sec"), ("memory", "compiled_memory_bytes"), ("decode", "decode_prompt_len"))
                  if any(r.get(key) is not None for r in ok)}
        suites |= {"hellaswag"} if any("hellaswag_items_per_sec" in r or "hellaswag_error" in r for r in ok) else set()
    decoded = [r for r in ok if r.get("decode_prompt_len") is not None]  # (rows the decode suite ran in)
    b = sorted({int(k.rsplit("_b", 1)[1]) for r in decoded for k in r if k.startswith("decode_tokens_per_sec_b")})
    # (column, its cell in a row); the training batch with the train or memory suite, as a row's batch_size
    cols = [("batch", lambda r: _fmt(r["batch_size"]))] if {"train", "memory"} & set(suites) else []
    if "train" in suites:
        cols += [("train tok/s", lambda r: _fmt(r["train_tokens_per_sec"])), ("MFU", lambda r: _fmt(r["mfu"], "pct"))]
    if "memory" in suites:
        cols += [("peak GB", lambda r: _fmt(r["peak_memory_bytes"], "gb")), ("compiled GB", lambda r: _fmt(r["compiled_memory_bytes"], "gb"))]
    cols += [(f"decode tok/s b{x} (greedy / top-k)",
              lambda r, x=x: "decode failed" if "decode_error" in r else
              f"{_fmt(r.get(f'decode_tokens_per_sec_b{x}'))} / {_fmt(r.get(f'decode_sampled_tokens_per_sec_b{x}'))}") for x in b]
    if "hellaswag" in suites:
        cols += [("HellaSwag items/s", lambda r: "hellaswag failed" if "hellaswag_error" in r else _fmt(r.get("hellaswag_items_per_sec")))]
    head = ["arch", "params (active)"] + [c for c, _ in cols] + ["decode state (bf16, full context)"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        if "error" in r:  # (a row that failed: its message, the rest empty)
            cells = [f"`{r['arch']}`", "failed: " + r["error"][:160].replace("|", "/")] + ["-"] * (len(head) - 2)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells = [f"`{r['arch']}`", _fmt(r["params_active"], "m")] + [cell(r) for _, cell in cols]
        cells.append(f"{r['decode_state_bytes'] / 2**20:.2f} MiB")
        lines.append("| " + " | ".join(cells) + " |")
    r0 = next((r for r in rows if "error" not in r), None)
    decode = f", decode prompt {decoded[0]['decode_prompt_len']} + {decoded[0]['decode_new_tokens']} new tokens" if decoded else ""
    meta = (f"Measured {r0['date']} on {r0['device']} x{r0['n_devices']}, jax {r0['jax']}, flax {r0['flax']}, "
            f"context {r0['seq_len']}{decode}. Command: `{command}`" if r0 else f"Every row failed. Command: `{command}`")
    return "\n".join([BEGIN, meta, "", *lines, END])


def rewrite_doc(text: str, block: str) -> str:
    """`text` with its generated table (between BEGIN and END, each on a line of its own) replaced
    by `block`, or `block` appended where it has none. Refused (ConfigError) where the markers are
    not exactly one BEGIN followed by one END: a lost marker would make the next rewrite cut
    hand-written text."""
    begins, ends = markers(text, BEGIN), markers(text, END)
    if not begins and not ends:
        return text.rstrip("\n") + "\n\n## Generated results table (`python -m llmjax.bench --all`)\n\n" + block + "\n"
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise ConfigError(f"the generated table's markers are damaged ({len(begins)} x {BEGIN}, {len(ends)} x {END}, each on a line "
                          "of its own); mend them (one of each, in that order) or pass another --doc")
    a, b = begins[0], ends[0] + len(END)
    return text[:a] + block + text[b:]


def markers(text: str, marker: str) -> list[int]:
    """Where `marker` stands on a line of its own in `text`: a mention of it in prose (README.md's)
    is not one (with one of each mentioned, --doc README.md replaced the text between them)."""
    return [m.start() for m in re.finditer(rf"^{re.escape(marker)}[ \t]*\r?$", text, re.MULTILINE)]


# --- command line ------------------------------------------------------------------------------------


def define_flags():
    cli.define_config_flag(required=False)
    flags.adopt_module_key_flags(cli)  # (--help lists --config with the tool's own flags)
    flags.DEFINE_bool("all", False, "every registered architecture's --variant; rewrites the table in docs/benchmarks.md")
    flags.DEFINE_string("variant", "default", "with --all: the variant of each config")
    flags.DEFINE_list("suite", list(DEFAULT_SUITES), "suites to run: train, decode, memory, hellaswag")
    flags.DEFINE_list("batch_size", [], "training batch sizes (default: the config's); several give one row each in one "
                      "process, smallest first (a row's peak memory is the process's so far), decode and hellaswag in the last")
    flags.DEFINE_integer("steps", 10, "training steps per timed block (0: compile only, for the memory suite's analysis)")
    flags.DEFINE_integer("repeats", 3, "timed blocks (the median is reported)")
    flags.DEFINE_list("decode_batches", ["1", "64"], "decode batch sizes")
    flags.DEFINE_list("decode_modes", list(DECODE_MODES), "decode suite: greedy and/or topk (top-k 200 sampling)")
    flags.DEFINE_integer("prompt_len", 16, "decode prompt tokens")
    flags.DEFINE_integer("new_tokens", 256, "decode new tokens")
    flags.DEFINE_integer("decode_unroll", DECODE_UNROLL, "decode steps per test of the decode loop's stop condition (1: every step)")
    flags.DEFINE_multi_string("set", [], "config overrides key=value, e.g. --set model.remat=dots (with --all, or with --config "
                              "after its --config.* overrides, wherever given)")
    flags.DEFINE_integer("task_batch_size", 32, "hellaswag suite: sequences per forward pass")
    flags.DEFINE_integer("task_limit", None, "hellaswag suite: the first N items (default: all 10,042)")
    flags.DEFINE_string("task_dir", None, "hellaswag suite: where hellaswag_val.jsonl is or is downloaded to")
    flags.DEFINE_enum("quantize", "none", ["none", "int8"], "decode and hellaswag suites: int8 weight-only model (llmjax.quant)")
    flags.DEFINE_string("profile", None, "trace one more block of training steps (at most 5) and one more decode run per batch "
                        "size with jax.profiler into DIR/<arch>/; rows get the traces' summaries (llmjax.tracing), "
                        "DIR/<arch>/summary.md their tables")
    flags.DEFINE_bool("json", False, "print JSON rows instead of a table")
    flags.DEFINE_string("out", None, "also write the rows as JSON lines here")
    flags.DEFINE_string("doc", str(DOC), "with --all: the markdown file whose generated table is rewritten")


def recorded_command(argv: list[str]) -> str:
    """The command the table records: `argv` without its --doc (where the table was written, in any of
    absl's forms: --doc=FILE, --doc FILE, one dash), shell-quoted. (`--doc FILE` left FILE in it, a
    command that fails with 'unexpected arguments'.)"""
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif re.fullmatch(r"--?doc", arg):
            skip = True
        elif not re.match(r"--?doc=", arg):
            kept.append(arg)
    return shlex.join(["python", "-m", "llmjax.bench", *kept])


def config_overrides(argv: list[str], boolean) -> list[str]:
    """The --config.KEY overrides in `argv` (the command line as parsed), each as KEY=VALUE, in the
    order given: absl's forms --config.KEY=VALUE, --config.KEY VALUE, and for a boolean key (`boolean(KEY)`)
    --config.KEY and --noconfig.KEY. (The two-argument form was recorded as KEY alone, without its
    value, and --noconfig.KEY not at all.)"""
    out, i = [], 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            break
        m = re.fullmatch(r"--(no)?config\.([^=]+)(?:=(.*))?", arg, re.DOTALL)
        if m:
            no, key, value = m.groups()
            if no:
                out.append(f"{key}=False")
            elif value is not None:
                out.append(f"{key}={value}")
            elif boolean(key):
                out.append(f"{key}=True")
            elif i + 1 < len(argv):
                out.append(f"{key}={argv[i + 1]}")
                i += 1
        i += 1
    return out


def _listed(names, word: str) -> str:
    """'a', 'a or b', 'a, b or c' (`word` 'or')."""
    return f"{', '.join(names[:-1])} {word} {names[-1]}" if len(names) > 1 else names[0]


def main(argv):
    F = flags.FLAGS
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.refuse_empty(out="a file for the JSON lines", profile="a folder for the traces", doc="a markdown file",
                     task_dir="the folder of hellaswag_val.jsonl")
    if (F.config is not None) == F.all:
        cli.fail("give --config configs/<arch>.py[:variant] or --all")
    if F.config is not None and F["variant"].present:  # (it was ignored: the spec's variant was measured)
        path, _ = cli.split_spec(F["config"].config_filename)  # (as given: --config, -config or a --flagfile's)
        cli.fail(f"--variant is for --all; with --config put the variant in it: --config {path}:{F.variant}")
    if F.config is not None and F["doc"].present:  # (it was ignored: the row was printed, nothing written into FILE)
        cli.fail("--doc is for --all (the table of every architecture); a --config row is printed, and --out FILE writes it as "
                 "JSON lines")
    unknown = [s for s in F.suite if s not in SUITES]
    if unknown:
        cli.fail(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    from llmjax.runtime import enable_compilation_cache, tune_host_allocator

    enable_compilation_cache()
    if jax.default_backend() == "cpu":
        tune_host_allocator()
    overrides = {}
    for item in F.set:
        if "=" not in item:
            cli.fail(f"--set takes key=value, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k] = v  # (parsed by each row's config: as --config.KEY=VALUE, by the key's type)
    try:
        batches = [int(b) for b in F.decode_batches]
        train_batches = sorted({int(b) for b in F.batch_size}) or [None]
    except ValueError:
        cli.fail(f"--batch_size and --decode_batches take integers, got {F.batch_size} and {F.decode_batches}")
    if min(batches + [b for b in train_batches if b is not None], default=1) < 1:
        cli.fail("batch sizes must be at least 1")
    if "decode" in F.suite and not batches:
        cli.fail("--decode_batches is empty; give the decode batch sizes (e.g. 1,64) or leave decode out of --suite")
    if F.prompt_len < 1 or F.new_tokens < 1:
        cli.fail(f"--prompt_len and --new_tokens must be at least 1, got {F.prompt_len} and {F.new_tokens}")
    if F.steps < 0 or F.repeats < 1 or F.decode_unroll < 1:
        cli.fail("--steps must be at least 0 (0: compile only), --repeats and --decode_unroll at least 1")
    if not F.decode_modes or not set(F.decode_modes) <= set(DECODE_MODES):
        cli.fail(f"--decode_modes takes {', '.join(DECODE_MODES)}, got {','.join(F.decode_modes)}")
    suites = set(F.suite)
    if not suites:
        cli.fail(f"--suite is empty; choose from {', '.join(SUITES)}")
    for name, needs in SUITE_FLAGS.items():
        if F[name].present and not suites & set(needs):
            cli.fail(f"--{name} is for the {_listed(needs, 'and')} suite{'s' * (len(needs) > 1)}, which --suite {','.join(F.suite)} "
                     f"does not run: add {_listed(needs, 'or')} to --suite, or drop --{name}")
    if F.steps == 0 and "train" in suites:  # (its row had no tokens/s and no MFU, and said nothing)
        cli.fail(f"--steps 0 compiles the training step without running it: the train suite has nothing to time; give --steps 1 or "
                 f"more, or leave train out (--suite {','.join(sorted(suites - {'train'})) or 'memory'}) for the compiled analysis alone")
    if F.quantize != "none" and not suites & {"decode", "hellaswag"}:  # (ignored: a row saying quantize=int8 of a float model)
        cli.fail(f"--quantize {F.quantize} applies to the decode and hellaswag suites; --suite {','.join(sorted(suites))} measures the float "
                 f"model: add decode or hellaswag to --suite, or drop --quantize")
    if F.task_batch_size < 1 or (F.task_limit is not None and F.task_limit < 1):
        cli.fail(f"--task_batch_size and --task_limit must be at least 1 (no --task_limit: every item), got {F.task_batch_size} "
                 f"and {F.task_limit}")
    try:
        decode_grows(jax.default_backend())
    except SampleError as e:
        cli.fail(str(e))
    train_suites = suites & {"train", "memory"}
    if F.config is not None:
        runs = [(F["config"].config_filename, F.config)]  # (the spec as given, in any of absl's forms: -config, a --flagfile)
    else:
        runs = [(f"configs/{p.stem}.py:{F.variant}", f"{p}:{F.variant}") for p in config_files()]  # (a new architecture too)
    # the row's overrides as given: --config.KEY=VALUE (with --config, in any of absl's forms) and --set KEY=VALUE
    given = config_overrides(cli.command_line(), lambda key: F[f"config.{key}"].boolean) + list(F.set)
    # everything a user can get wrong is checked before anything is measured: every row's config and
    # overrides, the hellaswag suite's vocabulary, the --out file and the --doc's markers
    planned, current = [], None
    try:
        for spec, source in runs:
            current = spec  # (with --all, an error names the config it is about: --set applies to each)
            sizes = train_batches if train_suites else train_batches[-1:]
            for i, batch_size in enumerate(sizes):
                cfg = load_config(source) if isinstance(source, str) else source
                cfg = cfg.copy_and_resolve_references() if hasattr(cfg, "copy_and_resolve_references") else cfg
                with cfg.unlocked():
                    for key, text in overrides.items():
                        set_key(cfg, key, parse_value(cfg, key, text))
                    if batch_size:
                        set_key(cfg, "train.batch_size", batch_size)
                validate(cfg)  # (--set train.batch_size=0 was a ZeroDivisionError after it measured, grad_accum_steps=0 an IndexError)
                mcfg = model_config(cfg)
                if "hellaswag" in suites:
                    check_hellaswag(mcfg)
                planned.append((spec, cfg, mcfg.arch, i == len(sizes) - 1))
        current = None
        if "hellaswag" in suites:  # (its file found, or downloaded, now: it was after the earlier suites had measured)
            from llmjax.downstream import TaskError, find_file

            try:
                find_file("hellaswag", F.task_dir)
            except TaskError as e:
                raise ConfigError(str(e)) from None
        if F.profile:  # (a folder the traces cannot go in was a profile_error after every row had measured, exit status 0)
            writable_folder(F.profile, "--profile")
        if F.all:
            check_doc(Path(F.doc).resolve())  # (a symlink: its target is the document)
        if F.out:
            try:
                if os.path.exists(F.out):  # (rows are appended: to README.md, say, they were)
                    with open(F.out, "a"):
                        pass
                    if os.path.isfile(F.out):  # (not /dev/stdout or a pipe: reading one would wait)
                        check_rows_file(Path(F.out))
                else:  # (made here, it was left empty where the first row failed)
                    with open(F.out, "x"):
                        pass
                    os.unlink(F.out)
            except OSError as e:  # (Python's words alone did not say which flag's file it was)
                raise OSError(f"{e.strerror}: {F.out} (--out: give a file in a folder that exists and can be written)") from None
    except ConfigError as e:
        cli.fail(f"{current}: {e}" if F.all and current else str(e))
    except OSError as e:
        cli.fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e))
    rows, failed = [], 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    for spec, cfg, arch, last in planned:
        try:
            _signal["armed"] = _signal["got"] is None
            if not _signal["armed"]:
                break
            row = bench(cfg, spec, suites=suites if last else train_suites, steps=F.steps, repeats=F.repeats,
                        decode_batches=batches, prompt_len=F.prompt_len, new_tokens=F.new_tokens,
                        task_batch_size=F.task_batch_size, task_limit=F.task_limit, task_dir=F.task_dir,
                        quantize=F.quantize, decode_modes=tuple(F.decode_modes), decode_unroll=F.decode_unroll,
                        profile=F.profile, overrides=given)
        except Stopped as e:  # (during the row's first suite: nothing measured)
            row, message = None, str(e)
        except (ConfigError, SampleError, ScoreError) as e:
            if not F.all:
                cli.fail(str(e))
            row, message = None, str(e)
        except Exception as e:  # noqa: BLE001  (--all: one architecture's failure must not lose the others' rows)
            if not F.all:
                what = cli.out_of_memory(e) if isinstance(e, jax.errors.JaxRuntimeError) else None
                if what is None:
                    raise
                cli.fail(f"{spec}: out of device memory ({what}); lower --batch_size (or the config's train.batch_size), or set "
                         "--config.model.remat=full", code=1)
            row, message = None, _one_line(e)
        finally:
            _signal["armed"] = False
        if row is not None and any(k in row for k in SUITE_ERRORS):  # (its earlier suites' figures kept)
            failed += 1
            print(f"error: {spec}: " + "; ".join(f"{k[: -len('_error')]}: {row[k]}" for k in SUITE_ERRORS if k in row),
                  file=sys.stderr, flush=True)
        if row is None:
            failed += 1
            print(f"error: {spec}: {message}", file=sys.stderr, flush=True)
            row = {"arch": arch, "config": spec, "overrides": given, "error": message}
        rows.append(row)
        if F.json:
            print(json.dumps(row), flush=True)
        if F.out:
            with open(F.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    if _signal["got"] is not None:  # (the rows measured are written; the table and --doc are left as they were)
        name = signal.Signals(_signal["got"]).name
        cli.fail(f"stopped by {name}: {len(rows)} of {len(planned)} rows written" + (f" to {F.out}" if F.out else "")
                 + ", the last one up to where it stopped",
                 code=128 + _signal["got"])
    command = recorded_command(sys.argv)
    block = table(rows, command, suites)
    if not F.json:
        print(block.replace(BEGIN + "\n", "").replace("\n" + END, ""))
        if F.profile:
            from llmjax.tracing import format_summary

            for r in rows:
                for key in (k for k, v in r.items() if k.startswith("profile_") and isinstance(v, dict)):
                    print("\n" + format_summary(f"{r['arch']} batch {r['batch_size']} {key[len('profile_'):]}", r[key]))
                if r.get("profile_error"):
                    print(f"\nprofile error ({r['arch']}): {r['profile_error']}")
    if F.all:
        from llmjax.data import atomic_write_bytes

        path = Path(F.doc).resolve()  # (a symlink was replaced by a file: the link lost, its target not updated)
        try:
            text = rewrite_doc(read_doc(path), block)
            atomic_write_bytes(path, text.encode())  # (a failed write leaves the document as it was)
        except ConfigError as e:
            cli.fail(str(e))
        except OSError as e:  # (a full disk, say: Python's words named the temporary file)
            cli.fail(f"cannot write --doc {path}: {e.strerror or e} (the rows are printed above)", code=1)
    if failed:
        cli.fail(f"{failed} of {len(rows)} rows failed (marked in the table)", code=1)


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    from absl import flags

    from llmjax import cli

    bench = cli.tool("llmjax.bench")
    bench.define_flags()
    flags.adopt_module_key_flags(bench)  # (--help lists the key flags of __main__, which defines none now)
    cli.run(bench.main)
