"""The benchmark CLI on CPU (tiny variants): every suite measures something, the table and the
generated section of docs/benchmarks.md are written, bad flags are one line."""

from __future__ import annotations

import json
import signal
import re
import subprocess
import sys

import jax
import pytest

import llmjax
from conftest import ROOT
from helpers import capped_python, cli_cases, cli_runs
from llmjax import bench
from llmjax.summary import summarize


@pytest.fixture(scope="module")
def row():
    cfg = llmjax.load_config(f"{ROOT}/configs/modern.py:tiny", {"train.batch_size": 8})
    return bench.bench(cfg, "configs/modern.py:tiny", suites={"train", "decode", "memory"}, steps=2, repeats=1,
                       decode_batches=[1, 3], prompt_len=5, new_tokens=6)


def test_a_row_has_every_field(row):
    for key in ("arch", "device", "batch_size", "seq_len", "params_total", "params_active", "train_tokens_per_sec", "mfu",
                "peak_memory_bytes", "decode_tokens_per_sec_b1", "decode_tokens_per_sec_b3", "decode_state_bytes"):
        assert key in row, key
    assert row["arch"] == "modern" and row["batch_size"] == 8 and row["seq_len"] == 64
    assert row["train_tokens_per_sec"] > 0 and row["step_time_ms"] > 0
    assert row["mfu"] is None and row["peak_memory_bytes"] is None  # the CPU reports neither
    assert row["compiled_memory_bytes"] > 0
    for b in (1, 3):
        assert row[f"decode_tokens_per_sec_b{b}"] > 0 and row[f"decode_sampled_tokens_per_sec_b{b}"] > 0
    assert row["params_total"] == row["params_active"] == summarize(llmjax.load_config(f"{ROOT}/configs/modern.py:tiny"))["params_total"]
    json.dumps(row)


def test_table_and_doc_rewrite(row):
    block = bench.table([row, {**row, "arch": "gqa", "mfu": 0.5, "peak_memory_bytes": 12.4e9}], "python -m llmjax.bench --all")
    assert block.startswith(bench.BEGIN) and block.endswith(bench.END)
    assert "| `modern` |" in block and "| `gqa` |" in block and "50.0%" in block and "12.40" in block
    doc = "# Benchmarks\n\nhand-written\n"
    once = bench.rewrite_doc(doc, block)
    assert once.startswith(doc.rstrip("\n")) and block in once
    twice = bench.rewrite_doc(once + "\nlater text\n", block.replace("modern", "mla"))
    assert "hand-written" in twice and "later text" in twice and "`mla`" in twice and "`modern`" not in twice
    assert twice.count(bench.BEGIN) == 1
    # a lost end marker: refused (a rewrite would cut everything from the begin marker to a new end)
    for damaged in (once.replace(bench.END, "") + "\nprecious\n", once + "\n" + bench.BEGIN + "\n", once.replace(bench.BEGIN, "")):
        with pytest.raises(bench.ConfigError, match="markers are damaged"):
            bench.rewrite_doc(damaged, block)


def test_a_doc_that_cannot_be_written_is_refused_before_measuring(tmp_path, monkeypatch):
    """--all writes its table into --doc through a temporary file beside it: a folder that cannot be
    written (read-only, or not this user's) was found out after every architecture had measured
    (Python's '[Errno 13] Permission denied' naming the temporary file), against the README's
    'checked before anything is measured'. (os.access answered as for a user without write access:
    these tests run as root, whom the permission bits do not stop.)"""
    import os

    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    bench.check_doc(doc)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p) == str(doc.parent) else access(p, mode, **k))
    with pytest.raises(OSError, match=re.escape(f"--doc={doc}: {doc.parent} cannot be written; give --doc a file in a folder that can")):
        bench.check_doc(doc)
    assert not doc.exists()


def test_the_table_records_the_command_without_its_doc():
    """The table's command is the one that measured its rows, without --doc (where it was written):
    `--doc FILE` (absl's two-argument form) left FILE in it, a command that fails with 'unexpected
    arguments'; an argument with a space is quoted, so that the command can be pasted back."""
    import shlex

    argv = ["/x/llmjax/bench.py", "--all", "--variant=tiny", "--doc", "/tmp/b.md", "--set", "train.mesh={'data': 1}", "-doc=c.md",
            "-doc", "d.md", "--repeats=1"]
    command = bench.recorded_command(argv)
    assert shlex.split(command) == ["python", "-m", "llmjax.bench", "--all", "--variant=tiny", "--set", "train.mesh={'data': 1}", "--repeats=1"]


def test_the_table_names_only_what_was_measured(row):
    """Without the decode suite the header named a decode prompt ('decode prompt 16 + 256 new
    tokens', the flags' defaults) and the table had decode columns of dashes; a row of the decode
    suite beside one without (--batch_size 8,16: decoded into the last row) names its prompt."""
    none = {k: None for k in row if k.startswith("decode_") and k.endswith(("_b1", "_b3", "_len", "_tokens"))}
    alone = bench.table([{**row, **none}], "cmd")
    assert "context 64. Command: `cmd`" in alone and "decode prompt" not in alone and "decode tok/s" not in alone
    assert "decode state (bf16, full context)" in alone  # (the state's size: computed, not measured)
    both = bench.table([{**row, **none, "batch_size": 4}, row], "cmd")
    assert "context 64, decode prompt 5 + 6 new tokens. Command" in both and "decode tok/s b3 (greedy / top-k)" in both
    assert "| `modern` | " in both and "| 4 | " in both and " - / - |" in both


def test_the_table_has_the_columns_of_the_suites_measured(row):
    """`--suite hellaswag` printed a table of training, memory and decode columns, all dashes, and
    no column for the items/s it measured (only `--json` had them); `--suite decode` had training
    and memory columns of dashes. Each suite's columns now appear where it ran, and only there."""
    nulls = {k: None for k in ("batch_size", "train_tokens_per_sec", "step_time_ms", "mfu", "peak_memory_bytes", "compiled_memory_bytes")}
    no_decode = {k: None for k in row if k.startswith("decode_") and k.endswith(("_b1", "_b3", "_len", "_tokens"))}
    train_cols = ("| batch |", "train tok/s", "MFU", "peak GB", "compiled GB")
    decode = bench.table([{**row, **nulls}], "cmd")
    assert "decode tok/s b1 (greedy / top-k)" in decode and not any(c in decode for c in train_cols), decode
    hella = {**row, **nulls, **no_decode, "hellaswag_items_per_sec": 123.4, "hellaswag_items": 16}
    for block in (bench.table([hella], "cmd"), bench.table([hella], "cmd", {"hellaswag"})):
        head, _, cells = block.splitlines()[3:6]
        assert head == "| arch | params (active) | HellaSwag items/s | decode state (bf16, full context) |", block
        assert cells.split(" | ")[2] == "123", block
    failed = bench.table([{**hella, "hellaswag_error": "boom"}], "cmd")
    assert "| hellaswag failed |" in failed
    # every suite: every column (the hellaswag and decode suites run into the last row)
    full = bench.table([{**row, "batch_size": 4}, {**row, "hellaswag_items_per_sec": 9.0}], "cmd", {"train", "memory", "decode", "hellaswag"})
    head = full.splitlines()[3]
    assert head == ("| arch | params (active) | batch | train tok/s | MFU | peak GB | compiled GB | decode tok/s b1 (greedy / top-k) | "
                    "decode tok/s b3 (greedy / top-k) | HellaSwag items/s | decode state (bf16, full context) |"), head
    assert [len(line.split(" | ")) for line in full.splitlines()[3:7]] == [11] * 4
    mem = bench.table([{**row, **no_decode, "train_tokens_per_sec": None, "mfu": None}], "cmd")  # (--suite memory --steps 0)
    assert "| batch | peak GB | compiled GB |" in mem and "train tok/s" not in mem


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmjax.bench", *args], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_cli_row_names_the_config_and_overrides_a_flagfile_gives(tmp_path):
    """A row measured from a --flagfile's --config and --config.KEY=VALUE records them, as the same
    arguments on the command line do (it recorded config null and no overrides, while measuring
    the config with them)."""
    flagfile = tmp_path / "bench.flags"
    flagfile.write_text("--config=configs/vanilla.py:tiny\n--config.model.n_layer=1\n")
    out = tmp_path / "rows.jsonl"
    r, r1 = cli_cases("llmjax.bench", [[f"--flagfile={flagfile}", "--suite=decode", "--decode_batches=1", "--new_tokens=1",
                                        "--prompt_len=2", "--repeats=1", "--json"],
                                       # absl's one-dash form, which applies as --config does: its row said "config": null;
                                       # an override's value as the next argument, and a boolean's --noconfig form: they were
                                       # recorded as "model.d_ff" (no value) and not at all
                                       ["-config=configs/vanilla.py:tiny", "--config.model.d_ff", "128", "-noconfig.model.bias",
                                        "--suite=memory", "--steps=0", f"--out={out}"]])
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])
    assert (row["config"], row["overrides"]) == ("configs/vanilla.py:tiny", ["model.n_layer=1"])
    assert row["params_total"] == summarize(llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"model.n_layer": 1}))["params_total"]
    assert r1.returncode == 0, r1.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["config"] == "configs/vanilla.py:tiny" and row["arch"] == "vanilla"
    assert row["overrides"] == ["model.d_ff=128", "model.bias=False"]
    assert row["params_total"] == summarize(llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"model.d_ff": 128, "model.bias": False}))["params_total"]
    # no decode suite: no decode prompt (the table's header named --prompt_len's default: test_the_table_names_only_what_was_measured)
    assert (row["decode_prompt_len"], row["decode_new_tokens"]) == (None, None)
    assert "decode prompt" not in r1.stdout and "| `vanilla` |" in r1.stdout, r1.stdout


def test_cli_all_rewrites_the_doc_table(tmp_path):
    """--all measures every architecture and rewrites the doc's table; an architecture that fails
    while measured (here ssm, made to raise) is a marked row and an error line, the others' rows are
    kept and the table written, and the exit status is 1 (it was a traceback and nothing written).
    Each row records the overrides given and its decode settings; a decode-only row has no batch.
    A --doc that is a symlink stays one, its target rewritten (it was replaced by a file)."""
    real = tmp_path / "real.md"
    real.write_text("# Benchmarks\n\nkept\n")
    doc = tmp_path / "benchmarks.md"
    doc.symlink_to(real)
    boom = ("import sys, llmjax.bench as b; real = b.bench\n"
            "def bench(cfg, spec, **kw):\n"
            "    if 'ssm' in spec: raise RuntimeError('boom')\n"
            "    return real(cfg, spec, **kw)\n"
            "b.bench = bench; b.define_flags(); b.cli.run(b.main)")
    r = subprocess.run([sys.executable, "-c", boom, "--all", "--variant=tiny", "--suite=decode", "--decode_batches=1", "--new_tokens=3",
                        "--prompt_len=4", "--repeats=1", "--set", "model.decode_norm_impl=xla", "--doc", str(doc),
                        f"--out={tmp_path / 'rows.jsonl'}"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.splitlines()[-2:] == ["error: configs/ssm.py:tiny: RuntimeError: boom", f"error: 1 of {len(llmjax.ARCHS)} rows failed (marked in the table)"]
    assert doc.is_symlink()
    text = real.read_text()
    assert "kept" in text and text.count("| `") == len(llmjax.ARCHS) and "| `ssm` | failed: RuntimeError: boom |" in text
    # the command without --doc FILE (test_the_table_records_the_command_without_its_doc)
    assert str(doc) not in text and "--set model.decode_norm_impl=xla --out=" in text
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert sorted(r["arch"] for r in rows) == sorted(llmjax.ARCHS)
    good = [r for r in rows if r["arch"] != "ssm"]
    assert all(r["decode_tokens_per_sec_b1"] > 0 and r["train_tokens_per_sec"] is None and r["batch_size"] is None for r in good)
    assert all(r["overrides"] == ["model.decode_norm_impl=xla"] and r["decode_norm_impl"] == "xla" and r["decode_grow"] is False
               for r in good)


def test_a_failed_decode_keeps_the_rows_training_figures(tmp_path):
    """A row measures training, then decoding, in one process (gpu_check's short rows): a decode
    that fails (a kernel that does not compile on that GPU, say) is the row's `decode_error`, an
    error line and exit 1; the row with its training figures is still written (it was a traceback
    and no row)."""
    boom = ("import llmjax.bench as b\n"
            "def bench_decode(*a, **k): raise RuntimeError('decode kernel failed\\nmore')\n"
            "b.bench_decode = bench_decode; b.define_flags(); b.cli.run(b.main)")
    out = tmp_path / "rows.jsonl"
    r = subprocess.run([sys.executable, "-c", boom, "--config=configs/gqa.py:tiny", "--suite=train,decode", "--batch_size=8",
                        "--steps=1", "--repeats=1", "--decode_modes=greedy", f"--out={out}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.splitlines()[-2:] == ["error: configs/gqa.py:tiny: decode: RuntimeError: decode kernel failed",
                                          "error: 1 of 1 rows failed (marked in the table)"]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["train_tokens_per_sec"] > 0 and row["decode_tokens_per_sec_b1"] is None
    assert row["decode_error"] == "RuntimeError: decode kernel failed" and "error" not in row
    assert "decode failed" in bench.table([row], "")


def test_a_stopped_row_is_written_with_what_it_measured(tmp_path):
    """gpu_check runs each step under `timeout`, whose SIGTERM came while short rows decoded: the
    row's training figures were lost with it. Now the suite it stops is the row's error, the row is
    written, no later row starts, and the command ends in one line with 128 + the signal's number."""
    stop = ("import os, signal, time, llmjax.bench as b\n"
            "def {fn}(*a, **k): os.kill(os.getpid(), signal.SIGTERM); time.sleep(120)\n"
            "b.{fn} = {fn}; b.define_flags(); b.cli.run(b.main)")
    out = tmp_path / "rows.jsonl"
    common = ["--config=configs/gqa.py:tiny", "--steps=1", "--repeats=1", f"--out={out}"]
    r = subprocess.run([sys.executable, "-c", stop.format(fn="bench_decode"), *common, "--suite=train,decode", "--batch_size=8",
                        "--decode_modes=greedy"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-2000:]
    assert r.stderr.splitlines()[-1] == f"error: stopped by SIGTERM: 1 of 1 rows written to {out}, the last one up to where it stopped"
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["train_tokens_per_sec"] > 0 and row["decode_tokens_per_sec_b1"] is None
    assert row["decode_error"] == "Stopped: stopped by SIGTERM"
    out.unlink()
    # stopped in a row's first suite: an error row, and the next batch size is not measured
    r = subprocess.run([sys.executable, "-c", stop.format(fn="bench_train"), *common, "--suite=train", "--batch_size=4,8"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr[-2000:]
    assert r.stderr.splitlines()[-2:] == ["error: configs/gqa.py:tiny: stopped by SIGTERM",
                                          f"error: stopped by SIGTERM: 1 of 2 rows written to {out}, the last one up to where it stopped"]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["error"] == "stopped by SIGTERM" and "train_tokens_per_sec" not in row


def test_out_takes_bench_rows_only_and_is_made_by_the_first_row(tmp_path):
    """--out appends rows: to a file of other text (a README.md given by mistake) it appended JSON; a
    new --out was made by the check before anything ran, and left empty where the first row failed."""
    from helpers import cli_cases

    notes = tmp_path / "notes.md"
    notes.write_text("# my notes\n")
    rows = tmp_path / "rows.jsonl"
    r, = cli_cases("llmjax.bench", [["--config=configs/vanilla.py:tiny", "--suite=memory", "--steps=0", f"--out={notes}"]])
    assert (r.returncode, r.stderr) == (2, f"error: --out {notes}: it is no file of bench rows (its first line is no JSON object), and "
                                           "rows are appended to it; give a new file or one bench wrote\n"), r.stderr
    assert notes.read_text() == "# my notes\n"
    from llmjax import bench as B

    (tmp_path / "ok.jsonl").write_text('\n{"arch": "vanilla"}\n{"arch": "mo')
    B.check_rows_file(tmp_path / "ok.jsonl")  # (rows bench wrote, the last cut short by a kill: gpu_check's next steps append theirs)
    boom = ("import llmjax.bench as b\n"
            "def bench(cfg, spec, **kw):\n"
            "    raise RuntimeError('boom')\n"
            "b.bench = bench; b.define_flags(); b.cli.run(b.main)")
    r = subprocess.run([sys.executable, "-c", boom, "--config=configs/vanilla.py:tiny", "--suite=memory", "--steps=0", f"--out={rows}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode != 0 and not rows.exists(), (r.returncode, r.stderr[-1000:])
    # --out /dev/stdout (or a pipe) is no file to read: reading it to check it waited forever where stdout was a pipe
    r = subprocess.run([sys.executable, "-m", "llmjax.bench", "--config=configs/vanilla.py:tiny", "--suite=memory", "--steps=0",
                        "--out=/dev/stdout"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and any(line.startswith('{"arch": "vanilla"') for line in r.stdout.splitlines()), r.stderr[-1000:]


def test_cli_bad_input_is_one_line():
    cases = []
    for args, needle in [([], "--config"), (["--config=configs/vanilla.py:tiny", "--suite=speed"], "unknown suite"),
                         (["--config=configs/vanilla.py:tiny", "--config.model.n_layr=2"], "n_layer"),
                         (["--config=configs/vanilla.py:tiny", "--decode_batches="], "--decode_batches is empty"),
                         (["--config=configs/vanilla.py:tiny", "--prompt_len=0"], "--prompt_len and --new_tokens must be at least 1"),
                         (["--config=configs/vanilla.py:tiny", "--new_tokens=-3"], "--prompt_len and --new_tokens must be at least 1"),
                         (["--config=configs/vanilla.py:tiny", "--suite="], "--suite is empty"),
                         # --steps 0 compiles only: with the train suite (the default set has it) its row measured nothing, silently
                         (["--config=configs/vanilla.py:tiny", "--steps=0"], "--suite decode,memory"),
                         (["--config=configs/vanilla.py:tiny", "--steps=0", "--suite=train"], "--suite memory"),
                         (["--config=configs/vanilla.py:tiny", "--suite=hellaswag", "--task_limit=-1"], "--task_limit must be at least 1"),
                         # --quantize int8 quantizes the decode and hellaswag suites' model: without them it was ignored, the row
                         # saying quantize=int8 of float figures
                         (["--config=configs/vanilla.py:tiny", "--suite=train,memory", "--quantize=int8"],
                          "--quantize int8 applies to the decode and hellaswag suites; --suite memory,train measures the float model"),
                         # a suite's own flag given where its suite does not run was ignored, silently (the row measured without it)
                         (["--config=configs/vanilla.py:tiny", "--task_limit=50"], "error: --task_limit is for the hellaswag suite, which "
                          "--suite train,decode,memory does not run: add hellaswag to --suite, or drop --task_limit\n"),
                         (["--config=configs/vanilla.py:tiny", "--suite=train", "--task_dir=tasks"], "--task_dir is for the hellaswag suite"),
                         (["--config=configs/vanilla.py:tiny", "--suite=train,memory", "--prompt_len=8"], "--prompt_len is for the decode suite"),
                         (["--config=configs/vanilla.py:tiny", "--suite=memory", "--decode_batches=1"], "--decode_batches is for the decode suite"),
                         (["--config=configs/vanilla.py:tiny", "--suite=memory", "--steps=0", "--profile=traces"],
                          "error: --profile is for the train and decode suites, which --suite memory does not run: add train or decode to "
                          "--suite, or drop --profile\n"),
                         (["--config=configs/vanilla.py:tiny", "--suite=decode", "--batch_size=16,32"],
                          "--batch_size is for the train and memory suites, which --suite decode does not run"),
                         (["--config=configs/vanilla.py:tiny", "--suite=hellaswag", "--repeats=5"],
                          "--repeats is for the train, memory and decode suites, which --suite hellaswag does not run: add train, memory or "
                          "decode to --suite"),
                         (["--config=configs/vanilla.py:tiny", "--out=/nonexistent/rows.jsonl"], "No such file or directory: /nonexistent"),
                         (["--config=configs/vanilla.py:tiny", "--out=/nonexistent/rows.jsonl"],
                          "(--out: give a file in a folder that exists and can be written)"),
                         (["--config=configs/vanilla.py:tiny", f"--out={ROOT / 'tests'}"], "Is a directory: " + str(ROOT / "tests") + " (--out: "),
                         # --set reads a value as --config.* does: True is a bool (it was refused: "True is of original type <class 'str'>"),
                         # so this row is planned and only the --out after it is refused
                         (["--config=configs/vanilla.py:tiny", "--set", "model.scan_layers=True", "--out=/nonexistent/rows.jsonl"],
                          "No such file or directory: /nonexistent"),
                         (["--config=configs/vanilla.py:tiny", "--set", "model.scan_layers=yes"], "error: model.scan_layers=yes: model.scan_layers takes true or false"),
                         # a --profile folder that cannot be made, and the hellaswag suite's task file, were found out after the
                         # other suites had measured (--profile: a profile_error, exit status 0)
                         (["--config=configs/vanilla.py:tiny", "--suite=train", "--steps=1", "--profile=README.md/traces"],
                          "error: --profile=README.md/traces: " + str(ROOT / "README.md") + " is a file, not a folder; give a folder to write into"),
                         (["--config=configs/vanilla.py:tiny", "--suite=train,hellaswag", "--set", "model.vocab_size=50257", "--set",
                           "model.padded_vocab_size=50304", "--task_dir=README.md/tasks"],
                          "error: cannot use README.md/tasks as the task directory (Not a directory); pass a folder"),
                         (["--all", "--variant=tiny", f"--doc={ROOT / 'tests' / 'fixtures'}"], "is not a file in an existing folder"),
                         # --all: --set applies to every architecture's config; the error names the one without the key
                         # (it said only "unknown config key 'model.n_kv_head'", a key gqa and modern have)
                         (["--all", "--variant=tiny", "--set", "model.n_kv_head=2"], "error: configs/vanilla.py:tiny: unknown config key 'model.n_kv_head'"),
                         # --set values were not checked against the config's ranges: batch size 0 was a ZeroDivisionError
                         # after it measured, grad_accum_steps=0 an IndexError (and --all wrote a table of failed rows)
                         (["--config=configs/vanilla.py:tiny", "--suite=train", "--set", "train.batch_size=0"],
                          "error: train.batch_size must be a finite number of at least 1, got 0"),
                         (["--config=configs/gqa.py:tiny", "--suite=memory", "--set", "train.grad_accum_steps=0"],
                          "error: train.grad_accum_steps must be a finite number of at least 1, got 0")]:
        cases.append((args, needle))
    for (args, needle), r in zip(cases, cli_cases("llmjax.bench", [args for args, _ in cases])):
        assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)


def test_doc_without_all_is_refused(tmp_path):
    """--doc names where --all writes its table: with --config it was ignored (the row printed,
    nothing written into the file, exit status 0)."""
    doc = tmp_path / "b.md"
    (r,) = cli_cases("llmjax.bench", [["--config=configs/vanilla.py:tiny", f"--doc={doc}", "--suite=memory", "--steps=0"]])
    assert (r.returncode, r.stdout) == (2, ""), r.stderr[-2000:]
    assert r.stderr == ("error: --doc is for --all (the table of every architecture); a --config row is printed, and --out FILE "
                        "writes it as JSON lines\n")
    assert not doc.exists()


def test_a_doc_that_is_not_a_benchmarks_document_is_refused_before_measuring(tmp_path):
    """--all appended its table to any --doc without markers (a config file), replaced the text
    between two markers mentioned in prose (README.md's sentence about them), and a file that is not
    text was a UnicodeDecodeError's traceback. Markers count on lines of their own; a file without
    them is taken only where its title is '# Benchmarks' (docs/benchmarks.md's); a new or empty one
    gets that title."""
    readme, config, binary = tmp_path / "README.md", tmp_path / "vanilla.py", tmp_path / "b.md"
    readme.write_text((ROOT / "README.md").read_text())
    config.write_text((ROOT / "configs" / "vanilla.py").read_text())
    binary.write_bytes(bytes(range(256)))
    cases = [(readme, "is not a benchmarks document"), (config, "is not a benchmarks document"), (binary, "is not a text file")]
    before = {doc: doc.read_bytes() for doc, _ in cases}
    runs = cli_cases("llmjax.bench", [["--all", "--variant=tiny", "--suite=memory", "--steps=0", f"--doc={doc}"] for doc, _ in cases])
    for (doc, needle), r in zip(cases, runs):
        assert (r.returncode, r.stdout) == (2, ""), r.stderr[-2000:]
        assert r.stderr.startswith(f"error: --doc={doc} {needle}") and r.stderr.count("\n") == 1, r.stderr[-2000:]
        assert doc.read_bytes() == before[doc]
    prose = f"# Benchmarks\n\nThe table goes between `{bench.BEGIN}` and\n`{bench.END}`, each on a line of its own.\n"
    block = bench.table([], "cmd")
    assert bench.rewrite_doc(prose, block) == prose + "\n## Generated results table (`python -m llmjax.bench --all`)\n\n" + block + "\n"
    empty = tmp_path / "empty.md"
    empty.write_text("\n")
    assert bench.read_doc(empty) == bench.read_doc(tmp_path / "new.md") == "# Benchmarks\n"
    assert bench.read_doc(ROOT / "docs" / "benchmarks.md").startswith("# Benchmarks\n")


def test_a_benchmarks_document_may_open_with_yaml_front_matter(tmp_path):
    """A static site's page, its '# Benchmarks' title after a front matter block (--- ... ---): it was
    refused as no benchmarks document. Taken now, the table appended after the title's text (or put
    between the markers) and the front matter kept byte for byte; front matter before another title
    (README.md's), or an opening '---' line never closed, is still refused."""
    front = "---\ntitle: Benchmarks\nlayout: page\n...\n"
    doc = tmp_path / "bench.md"
    doc.write_text(front + "\n# Benchmarks\n\nNotes.\n")
    block = bench.table([], "cmd")
    bench.check_doc(doc)
    written = bench.rewrite_doc(bench.read_doc(doc), block)
    assert written == front + "\n# Benchmarks\n\nNotes.\n\n## Generated results table (`python -m llmjax.bench --all`)\n\n" + block + "\n"
    doc.write_text(written)
    assert bench.rewrite_doc(bench.read_doc(doc), bench.table([], "other")) == written.replace(block, bench.table([], "other"))
    assert bench.front_matter_end("---\n---\n# Benchmarks") == 8 and bench.front_matter_end("---\n# Benchmarks\n") == 0
    for text in ("---\ntitle: x\n---\n# README\n", "---\n# Benchmarks\n", "---\n----\n# Benchmarks\n", "intro\n---\n---\n# Benchmarks\n"):
        doc.write_text(text)
        with pytest.raises(OSError, match=r"is not a benchmarks document .*no '# Benchmarks' title, first or after YAML front matter\)"):
            bench.check_doc(doc)


def test_out_of_device_memory_is_one_line():
    """XLA reports a failed device allocation as RESOURCE_EXHAUSTED at a result, or as INTERNAL at a
    dispatch (bench's timed step, here): both are recognised (cli.out_of_memory), and bench with
    --config says what to lower in one line, exit status 1, where it raised XLA's traceback. A context
    of 100,000 tokens needs terabytes; the address space is capped all the same."""
    from llmjax.cli import out_of_memory

    assert out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 42 bytes.")) == "Out of memory allocating 42 bytes."
    assert out_of_memory(RuntimeError("INTERNAL: Error dispatching computation: Out of memory allocating 7 bytes.\nmore")) == (
        "Out of memory allocating 7 bytes.")
    assert out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: too many handles")) is None  # (not device memory: cli.exhausted words it)
    assert out_of_memory(RuntimeError("INTERNAL: a kernel failed")) is None

    r = subprocess.run(capped_python(24, "-m", "llmjax.bench", "--config", "configs/vanilla.py:tiny", "--config.model.context_len=100000",
                                     "--suite=train", "--steps=1", "--repeats=1", "--json"), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert (r.returncode, r.stdout) == (1, ""), r.stderr[-2000:]
    assert re.fullmatch(r"error: configs/vanilla\.py:tiny: out of device memory \(Out of memory allocating \d+ bytes\.\); lower "
                        r"--batch_size \(or the config's train\.batch_size\), or set --config\.model\.remat=full\n", r.stderr), r.stderr[-2000:]


# RESOURCE_EXHAUSTED errors of XLA's that are not device memory, in XLA's words
# (xla/backends/gpu/runtime/host_memory_pool.cc, xla/stream_executor/cuda/cuda_executor.cc; absl's errno codes)
POOL = ("RESOURCE_EXHAUSTED: All 1024 elements in the host memory pool are in use. This is likely because there are more than 1024 "
        "concurrent calls to an XLA executable.")
PTX = "RESOURCE_EXHAUSTED: [0] Failed to load PTX text as a module (register allocation failed): INTERNAL: CUDA_ERROR_INVALID_PTX"
FILES = "RESOURCE_EXHAUSTED: could not open /tmp/jax-cache/x: Too many open files\nmore detail"


def test_an_exhausted_resource_that_is_not_device_memory_is_not_called_so(tmp_path):
    """cli.out_of_memory took every RESOURCE_EXHAUSTED for device memory, so a tool said 'out of
    device memory ...; lower --batch_size' for a full host memory pool, a GPU kernel's registers or
    a file limit. Device memory is now named only where XLA's words say so (its allocators' words
    on CPU, GPU and TPU); any other RESOURCE_EXHAUSTED reaching a tool is one line with XLA's first
    line and the advice that applies (cli.exhausted, in cli.run), exit status 1."""
    from llmjax.cli import exhausted, out_of_memory

    for words in ["RESOURCE_EXHAUSTED: Out of memory while trying to allocate 285212672 bytes.",
                  "RESOURCE_EXHAUSTED: Failed to allocate request for 32.00MiB (33554432B) on device ordinal 0",
                  "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 49.34G of 32.00G hbm.",
                  "RESOURCE_EXHAUSTED: cuMemAllocAsync failed: CUDA_ERROR_OUT_OF_MEMORY: out of memory"]:
        assert out_of_memory(RuntimeError(words)) is not None and exhausted(RuntimeError(words)) is None, words
    assert exhausted(RuntimeError(POOL)) == ("XLA ran out of a resource (RESOURCE_EXHAUSTED): " + POOL.split(": ", 1)[1][:-1] + "; more calls "
                                             "of one compiled program were in flight at once than XLA:GPU keeps room for; this is not memory "
                                             "running short: report it with the command that gave it")
    assert exhausted(RuntimeError(PTX)).endswith("needs more of the GPU's registers or shared memory than it has, which a smaller batch "
                                                 "may not change: try another kernel (e.g. --config.model.attention_impl=xla), or report it "
                                                 "with XLA's words")
    assert exhausted(RuntimeError(FILES)) == ("XLA ran out of a resource (RESOURCE_EXHAUSTED): could not open /tmp/jax-cache/x: Too many "
                                              "open files; the process may open no more files: raise its limit (ulimit -n) and run again")
    assert exhausted(RuntimeError("RESOURCE_EXHAUSTED: something else")).endswith(
        "something else; it is not device memory, so a smaller batch may not help; XLA's words name what ran out")
    assert exhausted(RuntimeError("INTERNAL: a kernel failed")) is None
    # a tool: llmjax.sample, whose checkpoint load raises each (it said 'out of device memory decoding ...' for all)
    script = tmp_path / "sample_raises.py"
    script.write_text("import json, os, jax, llmjax.sample as S\nfrom absl import flags\nfrom llmjax import cli\n"
                      "def load(*a, **k):\n    raise jax.errors.JaxRuntimeError(json.loads(os.environ['WORDS'])[flags.FLAGS.prompt])\n"
                      "S.load = load\nS.define_flags()\ncli.run(S.main)\n")
    import os

    words = {"pool": POOL, "oom": "RESOURCE_EXHAUSTED: Out of memory allocating 42 bytes."}
    runs = cli_cases(str(script), [["--checkpoint=runs/x", f"--prompt={k}"] for k in words], env={**os.environ, "WORDS": json.dumps(words)})
    got = dict(zip(words, runs))
    r = got["pool"]
    assert (r.returncode, r.stderr) == (1, "error: " + exhausted(RuntimeError(POOL)) + "\n"), r.stderr[-2000:]
    r = got["oom"]
    assert r.returncode == 2 and r.stderr.startswith("error: out of device memory decoding") and r.stderr.count("\n") == 1, r.stderr[-2000:]


def test_hellaswag_suite_scores_items(monkeypatch):
    """Items/s of the built-in scorer, every length bucket compiled before the timed pass (the
    warm-up put one request per bucket into one batch, which pads to the longest: the smaller
    buckets compiled while timed)."""
    from llmjax import downstream, scoring

    timed = downstream.score_task
    compiles = []

    def counted(*args, **kwargs):
        before = scoring._score_model._cache_size()
        out = timed(*args, **kwargs)
        compiles.append(scoring._score_model._cache_size() - before)
        return out

    monkeypatch.setattr(downstream, "score_task", counted)
    cfg = llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny",
                             {"model.vocab_size": 50257, "model.padded_vocab_size": 50304, "model.context_len": 128, "model.n_layer": 1})
    row = bench.bench(cfg, "configs/vanilla.py:tiny", suites={"hellaswag"}, steps=1, repeats=1, decode_batches=[1], prompt_len=4,
                      new_tokens=4, task_batch_size=4, task_limit=12, task_dir=str(ROOT / "tests" / "fixtures"))
    assert row["hellaswag_items"] == 12 and row["hellaswag_items_per_sec"] > 0 and row["train_tokens_per_sec"] is None
    assert 0 <= row["hellaswag_acc_norm_random_init"] <= 1
    assert compiles == [0]


def test_hellaswag_suite_refuses_a_character_model_before_measuring(monkeypatch):
    from llmjax.config import ConfigError

    monkeypatch.setattr(bench, "bench_train", lambda *a, **k: pytest.fail("measured before the vocabulary was checked"))
    with pytest.raises(ConfigError, match=r"GPT-2 BPE config \(vocab 50257\), not vocab 65; e\.g\. --set model\.vocab_size=50257"):
        bench.bench(llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny"), "x", suites={"train", "hellaswag"}, steps=1, repeats=1,
                    decode_batches=[1], prompt_len=4, new_tokens=4)
    r = _cli(f"--config={ROOT}/configs/vanilla.py:tiny", "--suite=train,hellaswag", "--batch_size=2,4", "--steps=1", "--repeats=1")
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and "GPT-2 BPE" in r.stderr, (r.stdout, r.stderr)


def test_own_peak_is_reported_only_when_this_measurement_set_it():
    assert bench.own_peak({}, {}) is None  # the CPU reports nothing
    assert bench.own_peak({"peak_bytes_in_use": 0}, {"peak_bytes_in_use": 5}) == 5  # first in the process
    assert bench.own_peak({"peak_bytes_in_use": 7}, {"peak_bytes_in_use": 9}) == 9  # rose during this one
    assert bench.own_peak({"peak_bytes_in_use": 9}, {"peak_bytes_in_use": 9}) is None  # an earlier one was higher


def test_the_rate_is_the_median_timed_block():
    """Three timed blocks of 1 s, 5 s and 2 s (a clock that moves only when a block runs): the rate is
    the units over the median block, 2 s, not over their mean (2.67 s) or the first block (1 s)."""
    from types import SimpleNamespace

    clock, durations = [0.0], iter([1.0, 5.0, 2.0])

    def run():
        clock[0] += next(durations)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
        assert bench._median_rate(run, 600, 3) == 300.0


def test_train_figures_by_hand(monkeypatch):
    """bench_train's arithmetic with the timing replaced by a block of --steps 2 steps in 0.5 s: a step
    of 2 accumulated micro-batches of 8 x 64 tokens is 1,024 tokens, so 2 * 1,024 / 0.5 = 4,096
    tokens/s and 250 ms a step; MFU is the model's FLOPs at that rate over the peak of all 8 devices
    (train.peak_flops_per_device is one device's), the FLOPs by hand (6N + 12 L H hd T; modern has no
    position table); and the timed blocks start after the warm-up block (the step's first runs)."""
    cfg = llmjax.load_config(f"{ROOT}/configs/modern.py:tiny",
                             {"train.batch_size": 8, "train.grad_accum_steps": 2, "train.peak_flops_per_device": 1e9})
    synced, seen = [], {}
    ready = jax.block_until_ready
    monkeypatch.setattr(jax, "block_until_ready", lambda x: synced.append(1) or ready(x))

    def rate(run, units, repeats):
        seen.update(units=units, repeats=repeats, blocks_before=len(synced))
        run()
        return units / 0.5

    monkeypatch.setattr(bench, "_median_rate", rate)
    row = bench.bench_train(cfg, steps=2, repeats=3, memory=False)
    assert seen == {"units": 2 * 2 * 8 * 64, "repeats": 3, "blocks_before": 1}
    assert row["train_tokens_per_sec"] == 4096 and row["step_time_ms"] == pytest.approx(250)
    m = cfg.model
    flops = 6 * summarize(cfg)["params_total"] + 12 * m.n_layer * m.n_head * m.head_dim * m.context_len
    assert jax.device_count() == 8 and row["mfu"] == pytest.approx(flops * 4096 / (8 * 1e9))


def test_decode_rate_counts_every_sequences_new_tokens(monkeypatch):
    """A run at batch 3 with a 5-token prompt and 6 new tokens makes 3 x 6 = 18 tokens (the prompt's
    are prefill, not decoded tokens; batch 1's run makes 6), and each batch size is timed after a
    run that compiled it."""
    calls, seen = [], []

    def generate(model, prompts, n, **kw):
        calls.append(len(prompts))
        return [[0] * n for _ in prompts]

    def rate(run, units, repeats):
        seen.append((units, len(calls)))
        run()
        return units / 0.5

    monkeypatch.setattr(bench, "generate", generate)
    monkeypatch.setattr(bench, "_median_rate", rate)
    row = bench.bench_decode(llmjax.load_config(f"{ROOT}/configs/modern.py:tiny"), batches=[1, 3], prompt_len=5, new_tokens=6,
                             repeats=2, modes=("greedy",))
    assert seen == [(6, 1), (18, 3)]
    assert row["decode_tokens_per_sec_b1"] == 12 and row["decode_tokens_per_sec_b3"] == 36


def test_mfu_peak_is_the_cards_own_datasheet_figure():
    """MFU's denominator, by the device kind CUDA reports: the PCIe and NVL forms of a card are
    lower-clocked than its SXM one (NVIDIA's datasheets, dense bf16: H100 SXM 989.4 TFLOP/s, H100
    PCIe 756, H100 NVL 835, H200 NVL 835); matched as plain 'H100'/'H200', their MFU was 1.31x and
    1.18x too low. An unknown card or a CPU: None (MFU null), unless train.peak_flops_per_device."""
    from types import SimpleNamespace

    from llmjax.train import peak_flops

    def peak(kind, platform="gpu", override=0.0):
        return peak_flops(SimpleNamespace(platform=platform, device_kind=kind), override)

    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == peak("NVIDIA GH200 480GB") == 989e12
    assert peak("NVIDIA H100 PCIe") == 756e12
    assert peak("NVIDIA H100 NVL") == peak("NVIDIA H200 NVL") == 835e12
    assert peak("NVIDIA A100-SXM4-80GB") == peak("NVIDIA A100-PCIE-40GB") == 312e12
    assert peak("NVIDIA L4") is None and peak("cpu", platform="cpu") is None
    assert peak("NVIDIA H100 PCIe", override=1e15) == 1e15


def test_cli_several_batch_sizes_in_one_process(tmp_path):
    out = tmp_path / "rows.jsonl"
    r = _cli("--config=configs/vanilla.py:tiny", "--suite=train,memory,decode", "--batch_size=16,8", "--steps=1", "--repeats=1",
             "--decode_batches=2", "--decode_modes=greedy", "--new_tokens=3", "--prompt_len=4", "--decode_unroll=2", "--json",
             f"--out={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["batch_size"] for row in rows] == [8, 16]  # smallest first
    assert all(row["train_tokens_per_sec"] > 0 and row["compiled_memory_bytes"] > 0 for row in rows)
    assert rows[1]["compiled_memory_bytes"] > rows[0]["compiled_memory_bytes"]
    assert rows[0]["decode_tokens_per_sec_b2"] is None and rows[1]["decode_tokens_per_sec_b2"] > 0  # decode once, last row
    assert rows[1]["decode_sampled_tokens_per_sec_b2"] is None  # --decode_modes=greedy
    assert rows[1]["decode_unroll"] == 2
    for args, needle in [(["--batch_size=0"], "at least 1"), (["--decode_modes=beam"], "--decode_modes"),
                         (["--decode_unroll=0"], "--decode_unroll"),
                         (["--batch_size=4"], "divisible by the 8 devices")]:  # the tests' 8 CPU devices
        r = _cli("--config=configs/vanilla.py:tiny", *args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_gpu_carry_script_asks_pip_for_the_pinned_wheels(tmp_path):
    """scripts/gpu_carry.sh asks pip for constraints.txt's pins of the packages the GPU machine's image
    lacks, as wheels for CPython 3.12, into .whl (pip stubbed here: no network), in a checkout whose
    .git is a file (a `git worktree`'s): there it failed, writing .git/info/exclude (set -e), before
    fetching anything; .whl and .task are git-ignored by .gitignore instead. A relative LLMJAX_TASK_DIR
    is from the folder it runs in (it was from the repository's)."""
    import os
    import shutil

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_carry.sh", repo / "scripts")
    shutil.copy(ROOT / "constraints.txt", repo)
    (repo / ".git").write_text("gitdir: /elsewhere/.git/worktrees/repo\n")
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\necho "$@" >"$STUB_ARGS"\n')
    stub.chmod(0o755)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "hellaswag_val.jsonl").write_text("items\n")
    # (LLMJAX_TASK_DIR relative to where the command runs, not to the repository)
    env = {**os.environ, "PYTHON": str(stub), "STUB_ARGS": str(tmp_path / "args"), "LLMJAX_TASK_DIR": "tasks"}
    r = subprocess.run(["bash", str(repo / "scripts" / "gpu_carry.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "args").read_text().split()
    assert args[:3] == ["-m", "pip", "download"] and {"--no-deps", "--only-binary=:all:"} <= set(args)
    assert args[args.index("--python-version") + 1] == "3.12" and args[args.index("-d") + 1] == ".whl"
    pins = {line.split("==")[0].lower(): line for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line}
    assert [a for a in args if "==" in a] == [pins[n] for n in ("grain", "array_record", "portpicker", "ml_collections", "gguf", "cloudpickle")]
    assert (repo / ".whl").is_dir() and (repo / ".task" / "hellaswag_val.jsonl").read_text() == "items\n"
    assert {"/.whl/", "/.task/"} <= set((ROOT / ".gitignore").read_text().splitlines())


def _gpu_check(out, args=("out",), **env):
    import os

    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_VARIANT": "tiny", "GPU_CHECK_WHEELS": str(out / "no-wheels"), **env}
    # (OUTDIR relative to where the command runs, not to the repository)
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True, cwd=out, env=env,
                          timeout=600)


def test_gpu_check_script_on_cpu(tmp_path):
    """scripts/gpu_check.sh (tiny configs): chosen steps run and write their rows (the profile step
    its traces too); a lent machine returns at most 8 files, so OUTDIR holds at most seven; steps
    that no longer fit the budget are skipped, logged, and make the exit status 1. The cuDNN
    preflight, run here where it must fail, switches the benchmarks to XLA's attention (its
    override, placed before --config, failed every benchmark after it)."""
    import tarfile

    r = _gpu_check(tmp_path, GPU_CHECK_ONLY="preflight: cuDNN attention forward|bench gqa|profile", GPU_CHECK_PREFLIGHT="1")
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]  # (the failed preflight)
    out = tmp_path / "out"
    assert "cuDNN attention failed its preflight: the benchmarks below use attention_impl=xla" in (out / "steps.log").read_text()
    names = {p.name for p in out.iterdir()}
    assert {"env.txt", "steps.log", "bench.jsonl", "bench_table.md", "logs.tgz", "traces.tgz"} <= names <= {
        "env.txt", "steps.log", "bench.jsonl", "bench_table.md", "bench.err", "logs.tgz", "traces.tgz"}
    rows = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [(row["arch"], row["batch_size"]) for row in rows] == [("gqa", 16), ("vanilla", 16)]
    assert all(row["attention_impl"] == "xla" and row["overrides"] == ["model.attention_impl=xla"] for row in rows)
    assert rows[0]["train_tokens_per_sec"] > 0 and rows[0]["decode_tokens_per_sec_b1"] > 0
    assert rows[0]["decode_sampled_tokens_per_sec_b1"] is None  # the short rows decode greedily
    assert "profile_train" not in rows[0]
    assert rows[1]["profile_train"]["events"] > 0 and rows[1]["profile_decode_b64"]["top"]
    with tarfile.open(out / "traces.tgz") as t:
        members = t.getnames()
    assert any(n.endswith("vanilla/summary.md") for n in members) and any(n.endswith(".xplane.pb") for n in members)
    steps = (out / "steps.log").read_text()
    assert "bench gqa (short)" in steps and "bench gqa (short) (limit 100s)\n   ok in" in steps and "modern" not in steps
    assert "| gqa | 16 |" in (out / "bench_table.md").read_text() and "model.attention_impl=xla" in (out / "bench_table.md").read_text()

    # relative paths in its variables are from the folder it runs in, as OUTDIR's (they were from the repository's)
    for d in ("wheels", "tasks", "nano"):
        (tmp_path / d).mkdir()
    r = _gpu_check(tmp_path, GPU_CHECK_BUDGET="25", GPU_CHECK_WHEELS="wheels", LLMJAX_TASK_DIR="tasks", NANOGPT_SRC="nano")
    assert r.returncode == 1
    steps = (out / "steps.log").read_text()
    assert "SKIP bench vanilla training (full) (out of time" in steps and "ok in" not in steps
    assert f"wheels {tmp_path}/wheels, task dir {tmp_path}/tasks, nanoGPT {tmp_path}/nano, anchors {(ROOT.parent / 'shared' / 'anchors').resolve()}\n" in (
        out / "env.txt").read_text()


def test_gpu_check_refuses_its_arguments_in_the_wrong_order(tmp_path):
    """`gpu_check.sh --sweep OUTDIR` took '--sweep' as OUTDIR (mkdir and cd refused it, OUTDIR became
    '') and OUTDIR as the mode: it ran the default mode and wrote its files into /, where none of
    them comes back from the GPU machine; an unknown mode ran the default mode. Each is one line,
    exit status 2, before anything runs or is written."""
    (tmp_path / "file").write_text("x")
    for args in (["--sweep", "out"], ["out", "--sweeep"], ["out", "--sweep", "more"], ["file"]):
        r = _gpu_check(tmp_path, GPU_CHECK_BUDGET="0", args=args)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (args, r.stdout, r.stderr)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], args


_GPU_CHECK_STUB = """#!{python} -S
import json, os, re, sys
env = {{k: v for k, v in os.environ.items() if k.startswith(("LLMJAX_", "XLA_FLAGS", "JAX_"))}}
with open(os.environ["STUB_ARGS"], "a") as f:
    f.write(json.dumps({{"args": sys.argv[1:], "env": env}}) + "\\n")
sys.exit(1 if re.search(os.environ.get("STUB_FAIL", "^$"), " ".join(sys.argv[1:])) else 0)
"""

# bench's main up to its first measurement: every check of the command line, the config and the
# environment (XLA_FLAGS, read when JAX starts its backend) done, nothing measured
_BENCH_CHECKS = """import json, os, sys
import llmjax.bench as b


def measured(cfg, spec, **kw):
    raise SystemExit(0)


if __name__ == "__main__":
    os.environ.update(json.loads(sys.argv.pop(1)))
    b.bench = measured
    b.define_flags()
    b.cli.run(b.main)
"""


def test_gpu_check_commands_pass_the_tools_checks(tmp_path):
    """Every command scripts/gpu_check.sh would run on the GPU machine, at the default configs, names
    flags, config keys, values and XLA flags that exist: each `python -m llmjax.bench` passes bench's
    checks (all made before it measures), its cuDNN preflights run up to the cuDNN call a CPU refuses,
    and each pytest step's files and -k names are there. A renamed flag or key fails its step there
    only, a GPU slot lost. Recorded by a stub Python, in the default mode with its fallbacks taken
    (cuDNN with narrower values, vanilla's fused decoding and the SSM's row failing) and in the sweep
    of every architecture it sweeps."""
    import os

    stub = tmp_path / "python"
    stub.write_text(_GPU_CHECK_STUB.format(python=sys.executable))
    stub.chmod(0o755)
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "hellaswag_val.jsonl").write_text("{}\n")
    env = {**os.environ, "PYTHON": str(stub), "STUB_ARGS": str(tmp_path / "args"), "GPU_CHECK_BUDGET": "100000",
           "GPU_CHECK_WHEELS": str(tmp_path / "no-wheels"), "LLMJAX_TASK_DIR": str(tmp_path / "task"), "TMPDIR": str(tmp_path),
           "LLMJAX_COMPILATION_CACHE": str(tmp_path / "cache")}
    runs = [(["out"], {"STUB_FAIL": r"narrower values ok|configs/ssm.py:default|configs/vanilla.py:default --suite=decode --repeats=3$"}),
            (["sweep", "--sweep"], {"GPU_CHECK_SWEEP_ARCHS": "vanilla modern moe ssm"})]
    procs = [subprocess.Popen(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=tmp_path, env={**env, **extra},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for args, extra in runs]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert "gpu_check: exit" in out, out[-3000:]
    steps = (tmp_path / "out" / "steps.log").read_text()
    assert "pad mla's values" in steps and "decode with XLA's" in steps and "bench ssm (short), XLA's scan" in steps
    calls = [json.loads(line) for line in (tmp_path / "args").read_text().splitlines()]
    benches = [c for c in calls if c["args"][:2] == ["-m", "llmjax.bench"]]
    assert len(benches) > 60
    (tmp_path / "bench_checks.py").write_text(_BENCH_CHECKS)
    checked = cli_runs([("bench_checks", [json.dumps(c["env"]), *c["args"][2:]]) for c in benches],
                       env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    failed = [f"{' '.join(c.args[1:])}: {c.stderr.strip()[-300:]}" for c in checked if c.returncode != 0]
    assert not failed, "\n".join(failed)

    # the cuDNN preflights up to cuDNN's call, which a CPU refuses
    preflights = [c["args"][1] for c in calls if c["args"][0] == "-c" and "causal_attention" in c["args"][1]]
    assert len(preflights) == 2
    for i, code in enumerate(preflights):
        (tmp_path / f"preflight{i}.py").write_text(code)
    for c in cli_runs([(str(tmp_path / f"preflight{i}.py"), []) for i in range(len(preflights))]):
        assert c.returncode == 1 and "ConfigError: model.attention_impl='cudnn' needs a CUDA GPU" in c.stderr, c.stderr[-2000:]

    tests = [c["args"] for c in calls if c["args"][:2] == ["-m", "pytest"]]
    assert len(tests) == 4
    for args in tests:
        files = [a for a in args if a.startswith("tests/")]
        assert files and all((ROOT / f).exists() for f in files), args
        text = "".join(p.read_text() for f in files for p in ([ROOT / f] if f.endswith(".py") else (ROOT / f).glob("test_*.py")))
        if "-k" in args:
            for name in re.split(r"\s+or\s+", args[args.index("-k") + 1]):
                assert name.startswith("not ") or re.search(rf"def test_\w*{name}", text), (name, args)


def test_gpu_check_sweep_rows_name_the_attention_that_runs(tmp_path):
    """Where cuDNN attention fails its preflight, every benchmark gets `--set model.attention_impl=xla`,
    which wins over a sweep row's `--config.model.attention_impl=cudnn`: the row recorded xla while
    its step in steps.log said cudnn. Recorded by a stub Python whose preflight fails."""
    stub = tmp_path / "python"
    stub.write_text(_GPU_CHECK_STUB.format(python=sys.executable))
    stub.chmod(0o755)
    r = _gpu_check(tmp_path, PYTHON=str(stub), STUB_ARGS=str(tmp_path / "args"), STUB_FAIL="cuDNN attention ok on", GPU_CHECK_VARIANT="default",
                   GPU_CHECK_BUDGET="100000", GPU_CHECK_ONLY="preflight: cuDNN attention forward|sweep (vanilla|modern) batch", TMPDIR=str(tmp_path))
    steps = (tmp_path / "out" / "steps.log").read_text()
    assert "gpu_check: exit" in r.stdout and "cuDNN attention failed its preflight" in steps, r.stdout[-3000:]
    names = re.findall(r"^== \S+ (sweep .*) \(limit", steps, re.M)
    assert len(names) == 5 and all(" xla loss_chunks " in n for n in names), names
    benches = [c["args"] for c in map(json.loads, (tmp_path / "args").read_text().splitlines()) if c["args"][:2] == ["-m", "llmjax.bench"]]
    assert len(benches) == 5 and all("--config.model.attention_impl=xla" in a and "model.attention_impl=xla" in a for a in benches), benches


def test_steps_zero_compiles_without_running():
    cfg = llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {"train.batch_size": 8})
    row = bench.bench(cfg, "configs/vanilla.py:tiny", suites={"memory"}, steps=0, repeats=1, decode_batches=[1], prompt_len=4,
                      new_tokens=4)
    assert row["compiled_memory_bytes"] > 0 and row["train_tokens_per_sec"] is None and row["peak_memory_bytes"] is None
    ran = bench.bench(cfg, "x", suites={"memory"}, steps=1, repeats=1, decode_batches=[1], prompt_len=4, new_tokens=4)
    assert ran["compiled_memory_bytes"] == row["compiled_memory_bytes"]
    assert row["decode_min_rows"] is None  # (a row without the decode suite has every key a decode row has: decode_min_rows was missing)


def test_an_ssm_row_names_its_convolution_width():
    """A sweep row without Mamba's convolution (gpu_check's last SSM row) is told apart from the
    default's by its `d_conv` (and its parameter count)."""
    rows = {}
    for d_conv in (4, 0):
        cfg = llmjax.load_config(f"{ROOT}/configs/ssm.py:tiny", {"train.batch_size": 8, "model.d_conv": d_conv})
        rows[d_conv] = bench.bench(cfg, "configs/ssm.py:tiny", suites={"memory"}, steps=0, repeats=1, decode_batches=[1],
                                   prompt_len=4, new_tokens=4)
    assert rows[4]["d_conv"] == 4 and rows[0]["d_conv"] == 0
    assert rows[4]["params_total"] - rows[0]["params_total"] == 2 * (4 + 1) * 128  # 2 layers of (K + 1) x d_inner


def test_compiled_flops_expose_a_step_that_computes_more_than_the_model_needs():
    """`compiled_flops_ratio` (XLA's count of the compiled step's FLOPs over the model's accounting)
    rises when the step does work the model does not need: the MoE's experts through ragged_dot
    (expanded to every row times every expert on the CPU) against the blocked layout. Layers
    unrolled: with scanned layers XLA counts the loop's body once, and no ratio is reported."""
    def ratio(**over):
        cfg = llmjax.load_config(f"{ROOT}/configs/moe.py:tiny", {"train.batch_size": 8, "model.scan_layers": False, **over})
        row = bench.bench(cfg, "configs/moe.py:tiny", suites={"memory"}, steps=0, repeats=1, decode_batches=[1], prompt_len=4,
                          new_tokens=4)
        assert row["compiled_flops_per_token"] > 0 and row["compiled_bytes_per_token"] > 0 and row["moe_impl"] == over["model.moe_impl"]
        return row["compiled_flops_ratio"]

    assert ratio(**{"model.moe_impl": "ragged_dot"}) > 1.4 * ratio(**{"model.moe_impl": "blocked"})
    assert ratio(**{"model.moe_impl": "blocked"}) > 0.9  # (the blocked layout's padding and routing: a little above 1)


def test_compiled_flops_are_not_reported_for_a_step_with_loops():
    """XLA's cost analysis counts a loop's body once: a scanned layer stack (or any loop) gets no
    FLOP figures rather than a wrong ratio."""
    import jax
    import jax.numpy as jnp

    from llmjax.bench import compiled_flops

    def f(a):
        return jax.lax.fori_loop(0, 4, lambda i, x: x @ a, a)

    compiled = jax.jit(f).lower(jnp.ones((64, 64))).compile()
    assert "while(" in compiled.as_text()
    assert set(compiled_flops(compiled, 64, 4 * 2 * 64 * 64).values()) == {None}


def test_compiled_flops_are_not_reported_on_a_gpu():
    """XLA's GPU cost analysis leaves out library calls (cuBLAS GEMMs, cuDNN attention): on an H200
    it counted 0.003 of vanilla's FLOPs, so a GPU row reports none rather than a wrong ratio."""
    import jax
    import jax.numpy as jnp

    from llmjax.bench import compiled_flops

    compiled = jax.jit(lambda a: a @ a).lower(jnp.ones((64, 64))).compile()
    assert compiled_flops(compiled, 64, 2 * 64 * 64)["compiled_flops_ratio"] == pytest.approx(1.0)  # 64 rows of a 64 x 64 product
    assert set(compiled_flops(compiled, 64, 2 * 64 * 64, "gpu").values()) == {None}

