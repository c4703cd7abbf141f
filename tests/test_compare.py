"""The comparison and plotting CLIs: fair plans, a table that is exactly the runs' figures, reused
runs, figures, matched small variants, one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llmjax
from conftest import ROOT
from helpers import users_config
from llmjax import compare as C, plot as P
from llmjax.summary import config_files, summarize

SPECS = [f"{ROOT}/configs/vanilla.py:tiny", f"{ROOT}/configs/modern.py:tiny"]


def test_small_variants_are_matched_for_a_fair_fight():
    """Every registered architecture's `small` (a new one too) within the README's 1.2%."""
    files = config_files()
    assert {p.stem for p in files} == set(llmjax.ARCHS)
    cfgs = [llmjax.load_config(f"{p}:small") for p in files]
    totals = [summarize(c)["params_total"] for c in cfgs]
    assert max(totals) / min(totals) < 1.012, {p.stem: t for p, t in zip(files, totals)}
    assert len({(c.model.context_len, c.model.vocab_size, c.data.dataset) for c in cfgs}) == 1


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    r = C.compare(SPECS, out=out, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    return out, r


def test_table_holds_the_runs_figures(result):
    import statistics

    out, r = result
    rows = {row["arch"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert sorted(rows) == ["modern", "vanilla"]
    for arch, spec in (("vanilla", SPECS[0]), ("modern", SPECS[1])):
        row = rows[arch]
        finals, rates = [], []
        for seed in (0, 1):
            lines = [json.loads(x) for x in (out / f"{arch}_tiny" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
            assert [m["step"] for m in lines if "val_loss" in m] == [2, 4]
            finals.append(lines[-1]["val_loss"])
            rates.append(statistics.median(m["tokens_per_sec"] for m in lines[1:]))
            cfg = json.loads((out / f"{arch}_tiny" / f"seed{seed}" / "config.json").read_text())
            assert cfg["train"]["seed"] == seed and cfg["train"]["max_steps"] == 4
        assert finals[0] != finals[1]  # the seeds differ
        assert row["val_loss_mean"] == pytest.approx(statistics.fmean(finals), abs=1e-12)
        assert row["val_loss_std"] == pytest.approx(statistics.stdev(finals), abs=1e-12)
        assert row["train_tokens_per_sec"] == pytest.approx(statistics.fmean(rates))
        assert row["params_total"] == summarize(llmjax.load_config(spec))["params_total"]
        assert row["tokens"] == 4 * 8 * 64 and row["peak_memory_bytes"] > 0 and row["hellaswag_acc_norm"] is None
    md = (out / "results.md").read_text()
    assert md == r["markdown"] and "`vanilla`" in md and "± " in md and "HellaSwag" not in md and "within " in md
    assert "Validation loss over the validation split's first 20 batches at the end" in md  # (the tiny recipe's final evaluation)
    assert "Resumed" not in md and all(row["resumed"] == {} for row in rows.values())
    assert "Settings that differ" not in md and json.loads((out / "results.json").read_text())["meta"]["differing_settings"] == []
    from PIL import Image

    with Image.open(out / "val_loss.png") as im:
        assert im.size[0] > 1000


def test_finished_runs_are_reused(result):
    out, _ = result
    before = (out / "vanilla_tiny" / "seed0" / "compare_run.json").read_text()
    C.compare(SPECS, out=out, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    assert (out / "vanilla_tiny" / "seed0" / "compare_run.json").read_text() == before


def test_a_finished_run_is_reused_under_flags_that_change_no_figure(result, tmp_path):
    """A rerun that differs only in settings that change no figure (here train.log_every_steps, as
    --task_dir or --batch_size given as the configs' own would) reuses the finished runs: it started
    the trainer again on each, which trained nothing, overwrote the run's wall time and peak memory
    with its own and had the table call the run resumed at its last step."""
    import shutil

    out, _ = result
    shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
    before = {s: (tmp_path / "vanilla_tiny" / f"seed{s}" / name).read_text() for s in (0, 1) for name in ("compare_run.json", "train.log")}
    r = C.compare(SPECS[:1], out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True,
                  overrides={"train.log_every_steps": 3})
    assert r["rows"][0]["resumed"] == {} and "Resumed" not in r["markdown"]
    assert {s: (tmp_path / "vanilla_tiny" / f"seed{s}" / name).read_text() for s in (0, 1) for name in ("compare_run.json", "train.log")} == before


def test_a_damaged_record_or_metrics_line_of_a_finished_run_is_one_line(result, tmp_path):
    """A finished run's compare_run.json empty, cut or not an object, or a metrics.jsonl line before
    the last damaged (the run counts as finished by its last line): each was a JSONDecodeError or
    AttributeError traceback. Now one line naming the file (and line), before anything trains, and
    nothing is changed."""
    import shutil

    out, _ = result
    for body in ("", '{"seed": 0, "retu', "[]"):
        shutil.rmtree(tmp_path / "vanilla_tiny", ignore_errors=True)
        shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
        record = tmp_path / "vanilla_tiny" / "seed1" / "compare_run.json"
        record.write_text(body)
        with pytest.raises(C.CompareError, match=rf"^{re.escape(str(record))} is damaged \((Expecting value|Unterminated string.*|a JSON list, "
                                                 rf"not an object)\): it records the run in .*seed1; delete that folder to train the run again$"):
            C.compare(SPECS[:1], out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
        assert record.read_text() == body
    for line in ("X" + "{", "[1]"):
        shutil.rmtree(tmp_path / "vanilla_tiny")
        shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
        metrics = tmp_path / "vanilla_tiny" / "seed0" / "metrics.jsonl"
        rows = metrics.read_text().splitlines()
        metrics.write_text("\n".join(rows[:1] + [line] + rows[2:]) + "\n")
        before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
        with pytest.raises(C.CompareError, match=rf"^{re.escape(str(metrics))}:2 is damaged \(.+\); mend or delete that line, or delete "
                                                 rf".*seed0 to train the run again$"):
            C.compare(SPECS[:1], out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
        assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before


def test_a_finished_run_of_an_edited_config_is_refused(result, tmp_path):
    """A finished run is reused only if its config is still the one asked for: after its config
    file changed (here: its config.json, as the file edited since), compare refuses in one line
    naming the change, rather than report the old run's figures beside the new config's size. A
    key the run predates counts as its default."""
    import shutil

    out, _ = result
    shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
    saved = tmp_path / "vanilla_tiny" / "seed1" / "config.json"
    orig = json.loads(saved.read_text())
    kw = dict(out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    edited = json.loads(json.dumps(orig))
    edited["model"]["n_layer"] += 1
    edited["train"]["lr"] *= 2
    saved.write_text(json.dumps(edited))
    n = orig["model"]["n_layer"]
    with pytest.raises(C.CompareError, match=rf"^\S+seed1 holds a finished run of another config \(model\.n_layer \({n + 1} -> {n}\); "
                                             r"train\.lr \([^)]+\)\): its figures are not this config's; delete that folder or use another --out$"):
        C.compare(SPECS[:1], **kw)
    del orig["model"]["decode_attention_impl"]  # (a key with a default, "auto")
    del orig["train"]["loss_scale"]  # (a float32 run from before the key: auto, as it trained)
    del orig["train"]["schedule"], orig["train"]["decay_fraction"]  # (from before the keys: cosine)
    final = orig["eval"].pop("final_num_batches")  # (from before the key: the whole split, not tiny's 20 batches)
    saved.write_text(json.dumps(orig))
    with pytest.raises(C.CompareError, match=r"another config \(eval\.final_num_batches \(0 -> 20\)\)"):
        C.compare(SPECS[:1], **kw)
    orig["eval"]["final_num_batches"] = final
    saved.write_text(json.dumps(orig))
    r = C.compare(SPECS[:1], **kw)
    assert r["rows"][0]["val_loss_per_seed"] == [json.loads(last)["val_loss"] for last in (
        (tmp_path / "vanilla_tiny" / f"seed{s}" / "metrics.jsonl").read_text().splitlines()[-1] for s in (0, 1))]


def test_a_run_of_other_code_is_refused(result, tmp_path):
    """A run is reused (or resumed) only by the llmjax code that trained it: after a model file was
    edited (to try an idea, or to fix one), the same command reported the old runs' figures as the
    new code's. A run from before runs recorded their code is reused as it was."""
    import shutil

    out, _ = result
    shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
    kw = dict(out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    saved = tmp_path / "vanilla_tiny" / "seed1" / "compare_code.json"
    code = json.loads(saved.read_text())
    assert code == C.code_fingerprint() and "models/attention.py" in code and "compare.py" not in code
    saved.write_text(json.dumps({**code, "models/attention.py": "0" * 16}))  # (as if attention.py was edited since)
    with pytest.raises(C.CompareError, match=r"^\S+seed1 holds a finished run trained by other llmjax code \(llmjax/models/attention\.py "
                                             r"changed since\): its figures are not this code's; delete that folder or use another --out$"):
        C.compare(SPECS[:1], **kw)
    (tmp_path / "vanilla_tiny" / "seed1" / "compare_run.json").unlink()  # (unfinished: it would be resumed)
    with pytest.raises(C.CompareError, match=r"seed1 holds a run trained by other llmjax code \(llmjax/models/attention\.py changed "
                                             r"since\): resuming it would splice the two"):
        C.compare(SPECS[:1], **kw)
    shutil.rmtree(tmp_path / "vanilla_tiny")
    shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
    saved.unlink()
    before = (tmp_path / "vanilla_tiny" / "seed1" / "compare_run.json").read_text()
    C.compare(SPECS[:1], **kw)
    assert (tmp_path / "vanilla_tiny" / "seed1" / "compare_run.json").read_text() == before


def test_a_rerun_with_other_settings_is_refused_and_draws_only_its_runs(result, tmp_path, monkeypatch):
    """Another --max_steps (or --set, or an edited config) into an --out holding runs of the old
    settings is refused in one line: resuming them spliced the two (a 20-step run went on to 40 under
    a new schedule and was reported as a 40-step run). A rerun with fewer seeds reports and draws
    exactly its runs (the figure averaged every seed folder on disk), and one seed has no spread."""
    import shutil

    from llmjax import plot

    out, _ = result
    shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
    kw = dict(out=tmp_path, eval_every=2, eval_batches=1, command="test", quiet=True)
    with pytest.raises(C.CompareError, match=r"seed0 holds a run of another config \(train\.max_steps \(4 -> 6\)\): resuming it would "
                                             r"splice the two; delete that folder or use another --out \(and 1 more folder like it: \S+seed1\)$"):
        C.compare(SPECS[:1], seeds=2, max_steps=6, **kw)
    drawn = []
    monkeypatch.setattr(plot, "draw", lambda curves, path, title="": drawn.append(curves))
    r = C.compare(SPECS[:1], seeds=1, max_steps=4, **kw)
    assert r["rows"][0]["seeds"] == 1 and r["rows"][0]["val_loss_std"] is None and "± " not in r["markdown"]
    assert [c["n_runs"] for c in drawn[0]] == [1]


def test_sigterm_stops_the_running_trainer_too(tmp_path):
    """SIGTERM to compare stops the trainer it started (which saves a checkpoint) and exits in one
    line; the trainer outlived it before, and a rerun started a second one on the same folder."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "llmjax.compare", f"--configs={SPECS[0]}", "--max_steps=100000", "--seeds=1",
                             "--eval_every=50000", "--tasks=", f"--out={tmp_path}"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "vanilla_tiny" / "seed0" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("error: interrupted; finished runs"), err[-2000:]
    left = [p for p in Path("/proc").glob("[0-9]*") if str(tmp_path) in _cmdline(p)]
    assert not left and any(d.name.isdigit() for d in (tmp_path / "vanilla_tiny" / "seed0" / "checkpoints").iterdir())


def _cmdline(p: Path) -> str:
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_run_resumed_twice_is_marked_and_leaves_out_the_compiling_step_after_each_resume(tmp_path):
    """A run interrupted and resumed by the next `compare` is timed by that process only: the table
    says so, naming the run and the step it resumed from (an uninterrupted one is unmarked: the
    `result` tests). Interrupted after step 2 and again after step 4, then finished: steps 1, 3 and
    5 compiled (each the first of its process), so tokens/s is the median of steps 2, 4 and 6. Only
    the last resume was known before: step 3, a compile (~0.5 s against ~15 ms a step), was in the
    median."""
    import statistics

    kw = dict(out=tmp_path, seeds=1, max_steps=6, eval_every=2, eval_batches=1, command="test", quiet=True)
    for stop in (2, 4):  # (as by a kill after its checkpoint)
        with pytest.raises(C.CompareError, match=f"stopped at step {stop} of 6 at its --set train.stop_at_step={stop}"):
            C.compare(SPECS[:1], overrides={"train.stop_at_step": stop, "train.checkpoint_every_steps": 2}, **kw)
        if stop == 2:
            (tmp_path / "vanilla_tiny" / "seed0" / "train.log").write_text("FIRST PART\n")  # (what the first part said)
    r = C.compare(SPECS[:1], **kw)
    log = (tmp_path / "vanilla_tiny" / "seed0" / "train.log").read_text()  # every part's (each resumed one's appended)
    assert log.startswith("FIRST PART\n") and "resumed from" in log, log
    assert r["markdown"].rstrip().endswith("train wall and peak memory are the resumed part's only: `vanilla` seed 0 from step 4.")
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["resumed"] == {"0": 4}
    lines = [json.loads(x) for x in (tmp_path / "vanilla_tiny" / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]  # the losses are the whole run's
    assert r["rows"][0]["train_tokens_per_sec"] == pytest.approx(statistics.median(lines[i]["tokens_per_sec"] for i in (1, 3, 5)))
    assert r["rows"][0]["resumed"] == {0: 4}  # (the part whose wall time and peak memory the table has)
    stats = json.loads((tmp_path / "vanilla_tiny" / "seed0" / "compare_run.json").read_text())
    assert stats["resumed_from_steps"] == [2, 4] and stats["resumed_from_step"] == 4


def test_a_run_finished_but_not_recorded_is_not_timed_by_a_trainer_that_trains_nothing(result, tmp_path):
    """A run that finished while its compare was being stopped (Ctrl-C during the last step's
    evaluation or scoring: the trainer completes them and saves) has no compare_run.json. The next
    compare started the trainer on it, which trained nothing, and reported that process's wall
    time (about 2 s) and peak memory as the run's ("resumed from step 4"). Now the trainer is not
    started, the run's wall time and CPU peak are unknown, left out of the means, and the table says so."""
    import shutil

    out, _ = result
    shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
    seed0 = json.loads((tmp_path / "vanilla_tiny" / "seed0" / "compare_run.json").read_text())
    (tmp_path / "vanilla_tiny" / "seed1" / "compare_run.json").unlink()
    log = (tmp_path / "vanilla_tiny" / "seed1" / "train.log").read_text()
    r = C.compare(SPECS[:1], out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    assert (tmp_path / "vanilla_tiny" / "seed1" / "train.log").read_text() == log  # (no trainer started)
    row = r["rows"][0]
    assert row["wall_seconds_mean"] == seed0["wall_seconds"] and row["peak_memory_bytes"] == seed0["max_rss_bytes"]
    assert row["resumed"] == {} and row["unrecorded"] == [1]
    assert r["markdown"].rstrip().endswith("so their train wall and peak memory were not measured (left out of the means): "
                                           "`vanilla` seed 1.")
    stats = json.loads((tmp_path / "vanilla_tiny" / "seed1" / "compare_run.json").read_text())
    assert stats["wall_seconds"] is None and stats["max_rss_bytes"] is None
    r = C.compare(SPECS[:1], out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    assert r["rows"][0] == row  # (reused as recorded)


def test_the_table_names_the_settings_that_differ_between_configs(result, tmp_path):
    """Two configs whose recipes differ (an optimizer setting compared on purpose, or a variant that
    got another recipe by mistake) compare, and the table says how: the note under it named the
    same data and tokens only, so lr 6e-4 against 1e-3 passed as a comparison of models."""
    f = users_config(tmp_path / "mine.py",
                     "MODELS = {'tiny': v.MODELS['tiny'], 'tiny_b2': v.MODELS['tiny']}\n"
                     "def get_config(variant='default'):\n"
                     "    return make_config(variant, MODELS, train={'tiny_b2': {'beta2': 0.95, 'warmup_steps': 2}})\n")
    specs = [f"{f}:tiny", f"{f}:tiny_b2"]
    plans = C.plan(specs, max_steps=4, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0,
                   overrides={"train.log_every_steps": 3})
    assert C.differing_settings(plans) == [f"train.beta2: 0.99 (`{specs[0]}`), 0.95 (`{specs[1]}`)",
                                           f"train.warmup_steps: 5 (`{specs[0]}`), 2 (`{specs[1]}`)"]
    assert C.differing_settings(C.plan(SPECS, max_steps=4, batch_size=None, eval_every=None, eval_batches=None, tasks="",
                                       tasks_limit=0, overrides={})) == []  # (the model alone differs)
    # the weights of the MoE's own auxiliary losses are not a difference of recipe; their values are
    moe = [f"{ROOT}/configs/moe.py:tiny", f"{ROOT}/configs/vanilla.py:tiny"]
    assert C.differing_settings(C.plan(moe, max_steps=4, batch_size=None, eval_every=None, eval_batches=None, tasks="",
                                       tasks_limit=0, overrides={})) == []
    aux_plans = [{"spec": s, "cfg": llmjax.load_config(path, over)}
             for s, path, over in [("a", moe[0], {}), ("b", moe[0], {"train.aux_loss_weights.router_z": 0.01}), ("c", moe[1], {})]]
    assert C.differing_settings(aux_plans) == ["train.aux_loss_weights.router_z: 0.001 (`a`), 0.01 (`b`), <absent> (`c`)"]
    out, _ = result
    saved = json.loads((out / "results.json").read_text())
    md = C.markdown(saved["rows"], "test", {**saved["meta"], "differing_settings": C.differing_settings(plans)})
    assert md.rstrip().endswith(f"Settings that differ between the configs (besides the model): train.beta2: 0.99 (`{specs[0]}`), "
                                f"0.95 (`{specs[1]}`); train.warmup_steps: 5 (`{specs[0]}`), 2 (`{specs[1]}`).")


def test_plans_refuse_unfair_comparisons():
    with pytest.raises(C.CompareError, match="model.context_len"):
        C.plan([SPECS[0], f"{ROOT}/configs/modern.py:small"], max_steps=2, batch_size=None, eval_every=None, eval_batches=None,
               tasks="", tasks_limit=0, overrides={})
    with pytest.raises(C.CompareError, match="listed twice"):
        C.plan([SPECS[0], SPECS[0]], max_steps=2, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0, overrides={})
    with pytest.raises(C.CompareError, match="--set train.seed would give every run the same seed"):  # (it came after --seeds' flag)
        C.plan([SPECS[0]], max_steps=2, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0,
               overrides={"train.seed": 7})
    # a --set of a setting compare derives from its own flags was silently overwritten (eval.every_steps by
    # --eval_every's default) or half applied (train.max_steps: checkpoint and evaluation steps from --max_steps)
    for key, flag in (("eval.every_steps", "--eval_every"), ("train.max_steps", "--max_steps"), ("train.batch_size", "--batch_size")):
        with pytest.raises(C.CompareError, match=f"^--set {key} is compare's own setting; use {flag}$"):
            C.plan([SPECS[0]], max_steps=20, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0,
                   overrides={key: 3})
    with pytest.raises(C.CompareError, match="--batch_size must be at least 1, got 0"):
        C.plan([SPECS[0]], max_steps=2, batch_size=0, eval_every=None, eval_batches=None, tasks="", tasks_limit=0, overrides={})
    plans = C.plan([SPECS[0]], max_steps=50, batch_size=4, eval_every=None, eval_batches=None, tasks="hellaswag", tasks_limit=0,
                   overrides={"model.vocab_size": 50257, "model.padded_vocab_size": 50304, "data.dataset": "tinyshakespeare"})
    o = plans[0]["overrides"]
    assert o["eval.tasks"] == "hellaswag" and o["eval.every_steps"] == 5 and o["train.batch_size"] == 4  # BPE: HellaSwag in the loop
    assert "eval.tasks" not in C.plan([SPECS[0]], max_steps=5, batch_size=None, eval_every=None, eval_batches=None, tasks="hellaswag",
                                      tasks_limit=0, overrides={})[0]["overrides"]  # characters: none


def test_an_unfair_pair_is_refused_with_the_setting_that_would_share_it(tmp_path):
    """The refusal's advice names what differs: it said '--batch_size sets every run's batch' for
    every difference, also for a grad_accum_steps or a dataset that --batch_size cannot change."""
    kw = dict(max_steps=2, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0, overrides={})
    for change, advice in (("cfg.train.grad_accum_steps = 2", "--set train.grad_accum_steps=1 sets every run's"),
                           ("cfg.train.batch_size = 4", "--batch_size 8 sets every run's batch"),
                           ("cfg.data.dataset = 'other'", "--set data.dataset=tinyshakespeare_char sets every run's"),
                           ("cfg.model.context_len = 32", "--set model.context_len=64 sets every run's")):
        other = tmp_path / f"other{len(change)}.py"
        other.write_text(f"import importlib.util\nspec = importlib.util.spec_from_file_location('base', {str(ROOT / 'configs' / 'vanilla.py')!r})\n"
                         f"base = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(base)\n\n\n"
                         f"def get_config(variant='default'):\n    cfg = base.get_config(variant)\n    {change}\n    return cfg\n")
        with pytest.raises(C.CompareError, match=rf"; compare configs that share it \({re.escape(advice)}\)$"):
            C.plan([SPECS[0], f"{other}:tiny"], **kw)


def test_eval_flags_given_as_zero_are_zero():
    """--eval_every=0 and --eval_batches=0 mean what the config keys' 0 means (at the last step only;
    no estimates); they were taken as not given: every max_steps // 10 steps over the configs' 20 batches."""
    kw = dict(max_steps=20, batch_size=None, tasks="", tasks_limit=0, overrides={})
    (p,) = C.plan([SPECS[0]], eval_every=0, eval_batches=0, **kw)
    assert (p["cfg"].eval.every_steps, p["cfg"].eval.num_batches) == (0, 0)
    (p,) = C.plan([SPECS[0]], eval_every=None, eval_batches=None, **kw)  # (not given: a tenth of the run, the config's)
    assert (p["cfg"].eval.every_steps, p["cfg"].eval.num_batches) == (2, llmjax.load_config(SPECS[0]).eval.num_batches)


def test_set_of_a_run_default_of_compares_is_applied():
    """compare's runs print no sample and keep one checkpoint, saved at the end; a --set of those keys
    (train.checkpoint_every_steps=5 on a long comparison, so that a crash loses less) was overwritten
    with nothing said. Now it applies; not given, compare's defaults do."""
    kw = dict(max_steps=20, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0)
    (p,) = C.plan([SPECS[0]], **kw, overrides={"train.keep_checkpoints": "3", "eval.sample_tokens": "50", "train.checkpoint_every_steps": "5"})
    c = p["cfg"]
    assert (c.train.keep_checkpoints, c.eval.sample_tokens, c.train.checkpoint_every_steps) == (3, 50, 5)
    assert {k: p["overrides"][k] for k in ("train.keep_checkpoints", "eval.sample_tokens", "train.checkpoint_every_steps")} == {
        "train.keep_checkpoints": 3, "eval.sample_tokens": 50, "train.checkpoint_every_steps": 5}
    (p,) = C.plan([SPECS[0]], **kw, overrides={})
    c = p["cfg"]
    assert (c.train.keep_checkpoints, c.eval.sample_tokens, c.train.checkpoint_every_steps) == (1, 0, 20)


def test_an_empty_entry_in_configs_is_no_config():
    """`--configs a,,b` or a trailing comma: the empty entry is skipped (it was "error: : config file ''
    not found"); here the --set after it is what is refused, naming the config."""
    from helpers import cli_cases

    (r,) = cli_cases("llmjax.compare", [["--configs", ",configs/vanilla.py:tiny,", "--set", "model.n_layr=2", "--tasks="]])
    assert (r.returncode, r.stderr) == (2, "error: configs/vanilla.py:tiny: --set unknown config key 'model.n_layr' "
                                           "(did you mean 'model.n_layer'?)\n"), r.stderr
    (r,) = cli_cases("llmjax.compare", [["--configs", ","]])
    assert r.returncode == 2 and r.stderr.startswith("error: --configs is required"), r.stderr


def test_set_values_are_parsed_by_the_keys_type():
    """`--set model.scan_layers=True` (as --config.model.scan_layers=True takes it) sets the bool; it
    was refused ("True is of original type <class 'str'>"), as JSON does not read True."""
    kw = dict(max_steps=2, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0)
    (p,) = C.plan([SPECS[0]], **kw, overrides={"model.scan_layers": "True", "train.lr": "2e-3", "data.dir": "2026"})
    assert (p["cfg"].model.scan_layers, p["cfg"].train.lr, p["cfg"].data.dir) == (True, 2e-3, "2026")
    assert p["overrides"]["model.scan_layers"] is True
    with pytest.raises(C.CompareError, match=r": --set model\.scan_layers=yes: model\.scan_layers takes true or false$"):
        C.plan([SPECS[0]], **kw, overrides={"model.scan_layers": "yes"})


def test_plans_check_each_config_with_compares_settings(tmp_path):
    """A config that compare's own settings make invalid is refused before any run: a wsd decay that
    --max_steps 9 puts inside one config's 8 warm-up steps was found by that config's first run,
    after the other config's runs had trained."""
    f = users_config(tmp_path / "mine.py",
                     "MODELS = {'tiny': v.MODELS['tiny'], 'tiny_w8': v.MODELS['tiny']}\n"
                     "def get_config(variant='default'):\n"
                     "    return make_config(variant, MODELS, train={'tiny_w8': {'warmup_steps': 8}})\n")
    specs = [f"{f}:tiny", f"{f}:tiny_w8"]
    kw = dict(batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0, overrides={"train.schedule": "wsd"})
    with pytest.raises(C.CompareError, match=rf"^{re.escape(specs[1])}: train.schedule=wsd: the decay \(2 of 9 steps, decay_fraction=0.2\) "
                                             r"would start inside the 8 warm-up steps"):
        C.plan(specs, max_steps=9, **kw)
    assert [p["cfg"].train.warmup_steps for p in C.plan(specs, max_steps=10, **kw)] == [5, 8]  # (decay from step 8: fine)


def test_hellaswag_column(tmp_path):
    """summarize_runs reads the in-loop scorer's acc_norm from the last metrics line."""
    plans = C.plan([SPECS[0]], max_steps=2, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0, overrides={})
    runs = []
    for seed, acc in ((0, 0.25), (1, 0.35)):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        lines = [{"step": 1, "tokens_per_sec": 10.0}, {"step": 2, "tokens_per_sec": 20.0, "val_loss": 3.0 + seed, "hellaswag_acc_norm": acc}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append((d, {"wall_seconds": 5.0, "max_rss_bytes": 2**30}))
    row = C.summarize_runs(plans[0], runs)
    assert row["hellaswag_acc_norm"] == pytest.approx(0.30) and row["val_loss_mean"] == 3.5 and row["train_tokens_per_sec"] == 20.0
    assert "HellaSwag acc_norm" in C.markdown([row], "cmd", {"dataset": "d", "context_len": 64, "seeds": "0, 1", "device": "CPU", "date": "x"})


def test_a_config_with_one_diverged_seed_has_no_mean(tmp_path):
    """Of seeds 0-2, seed 1 diverged at step 7: the row has no mean (the survivors alone would flatter
    the config) and no spread, names the seed and the others' losses, and its wall time is theirs."""
    plans = C.plan([SPECS[0]], max_steps=2, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0, overrides={})
    runs = []
    for seed in range(3):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        lines = [{"step": 1, "tokens_per_sec": 10.0}] + ([] if seed == 1 else [{"step": 2, "tokens_per_sec": 20.0, "val_loss": 3.0 + seed}])
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append((d, {"seed": seed, "wall_seconds": 5.0 + seed, "max_rss_bytes": 2**30}
                     | ({"returncode": 3, "non_finite_at_step": 7} if seed == 1 else {"returncode": 0})))
    row = C.summarize_runs(plans[0], runs)
    assert row["diverged"] == {1: 7} and row["val_loss_mean"] is None and row["val_loss_std"] is None
    assert row["val_loss_per_seed"] == [3.0, None, 5.0] and row["wall_seconds_mean"] == 6.0
    text = C.markdown([row], "cmd", {"dataset": "d", "context_len": 64, "seeds": "0, 1, 2", "device": "CPU", "date": "x"})
    assert "| diverged (seed 1; the others 3.0000, 5.0000) |" in text and "`vanilla` seed 1 at step 7." in text


def test_a_rows_figures_worked_by_hand(tmp_path):
    """summarize_runs and markdown against figures worked by hand, on three seeds of made-up metrics
    (4 steps of 2 accumulated micro-batches of 8 x 64 tokens):
    - the final loss is the last step's whole-split `val_loss` (not the train loss, the estimate
      beside it, or seed 0's lower one at step 2): 3.0, 3.5, 4.5; mean 11/3, sample std 0.7638;
    - tokens/s is each seed's median step, the compiling ones left out (the first, and seed 2's step
      3, the first after its resume from step 2): 200, 200 and median(100, 500) = 300; their mean 233.3;
    - peak memory the highest seed's; train wall and HellaSwag the seeds' means."""
    plans = C.plan([SPECS[0]], max_steps=4, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0,
                   overrides={"train.grad_accum_steps": 2})
    rates = {0: [5.0, 100.0, 400.0, 200.0], 1: [5.0, 100.0, 400.0, 200.0], 2: [5.0, 100.0, 7.0, 500.0]}
    finals, earlier, walls, hs = [3.0, 3.5, 4.5], [2.9, 3.9, 4.9], [10.0, 20.0, 60.0], [0.25, 0.30, 0.41]
    runs = []
    for seed in range(3):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        lines = [{"step": s, "tokens_per_sec": rates[seed][s - 1], "train_loss": finals[seed] - 0.2} for s in (1, 2, 3, 4)]
        lines[1]["val_loss"] = earlier[seed]
        lines[3].update(val_loss=finals[seed], val_loss_estimate=finals[seed] + 0.1, hellaswag_acc_norm=hs[seed])
        (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        runs.append((d, {"seed": seed, "returncode": 0, "wall_seconds": walls[seed], "max_rss_bytes": [1, 3, 2][seed] * 2**30,
                         "resumed_from_step": 2 if seed == 2 else 0, "resumed_from_steps": [2] if seed == 2 else []}))
    row = C.summarize_runs(plans[0], runs)
    assert row["val_loss_per_seed"] == finals and row["val_loss_mean"] == pytest.approx(11 / 3)
    assert row["val_loss_std"] == pytest.approx(0.763763, abs=1e-6)  # sqrt(((3 - 11/3)^2 + (3.5 - 11/3)^2 + (4.5 - 11/3)^2) / 2)
    assert row["train_tokens_per_sec"] == pytest.approx(700 / 3)
    assert row["peak_memory_bytes"] == 3 * 2**30 and row["wall_seconds_mean"] == 30.0 and row["hellaswag_acc_norm"] == pytest.approx(0.32)
    assert row["tokens"] == 4 * 2 * 8 * 64
    # the table: the better config first, the cells as computed, the total parameters' spread max/min - 1
    better = {**row, "arch": "modern", "config": "m", "params_total": 1_250_000, "params_active": 1_250_000, "val_loss_mean": 3.2,
              "val_loss_std": 0.1}
    text = C.markdown([{**row, "params_total": 1_000_000, "params_active": 1_000_000}, better], "cmd",
                      {"dataset": "d", "context_len": 64, "seeds": "0, 1, 2", "device": "CPU", "date": "x"})
    table = [x.split(" | ") for x in text.splitlines() if x.startswith("| `")]
    assert [r[0] for r in table] == ["| `modern`", "| `vanilla`"]
    assert table[1][2:8] == ["1.00M", f"{row['flops_per_token'] / 1e9:.3f}", "3.6667 ± 0.7638", "233", "3.00 GiB", "30"]
    assert "total parameters within 25.0% of each other" in text and "4,096 training tokens per run" in text


def test_plot_draws_the_estimates_mean_band_and_time_by_hand(tmp_path):
    """Two seeds of made-up metrics: the points are the periodic estimates (at the last step
    `val_loss_estimate`, not the whole-split `val_loss` beside it), their mean with a min-max band,
    at the tokens seen, and the time the sum of the steps' times up to and including the point's
    step, averaged over the seeds."""
    step_times = {"seed0": [2.0, 0.5, 0.5, 0.5], "seed1": [4.0, 0.5, 0.5, 0.5]}
    estimates = {"seed0": (3.0, 2.5), "seed1": (3.2, 2.7)}
    for name in step_times:
        p = tmp_path / "runs" / name
        p.mkdir(parents=True)
        (p / "config.json").write_text(json.dumps({"model": {"arch": "vanilla", "context_len": 64}, "train": {"batch_size": 4, "grad_accum_steps": 1}}))
        lines = [{"step": s, "tokens": s * 256, "step_time": step_times[name][s - 1]} for s in (1, 2, 3, 4)]
        lines[1]["val_loss"] = estimates[name][0]
        lines[3].update(val_loss=2.0, val_loss_estimate=estimates[name][1])
        (p / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (c,) = P.curves([tmp_path / "runs"])
    assert c["n_runs"] == 2 and list(c["tokens"]) == [512, 1024]
    np.testing.assert_allclose(c["mean"], [3.1, 2.6])
    np.testing.assert_allclose(c["low"], [3.0, 2.5])
    np.testing.assert_allclose(c["high"], [3.2, 2.7])
    np.testing.assert_allclose(c["seconds"], [(2.5 + 4.5) / 2, (3.5 + 5.5) / 2])


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_plot_cli(result, tmp_path):
    out, _ = result
    r = _cli("llmjax.plot", str(out / "vanilla_tiny"), str(out / "modern_tiny" / "seed1"), "-o", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.png").stat().st_size > 10_000
    c = P.curves([out / "vanilla_tiny", out / "modern_tiny" / "seed1"])
    assert [x["n_runs"] for x in c] == [2, 1] and list(c[0]["tokens"]) == [2 * 8 * 64, 4 * 8 * 64]
    assert [x["label"] for x in c] == ["vanilla", "modern"]  # one line per architecture: named by it
    named = P.curves([out / "vanilla_tiny", out / "modern_tiny", out / "vanilla_tiny" / "seed0"])
    assert [x["label"] for x in named] == ["vanilla_tiny", "modern_tiny", "seed0"]  # two of one: every line by its folder
    # two runs of one folder name: labelled by the paths given (both were "seed0")
    import shutil

    shutil.copytree(out / "vanilla_tiny" / "seed0", tmp_path / "other" / "seed0")
    twins = P.curves([out / "vanilla_tiny" / "seed0", tmp_path / "other" / "seed0"])
    assert [x["label"] for x in twins] == [str(out / "vanilla_tiny" / "seed0"), str(tmp_path / "other" / "seed0")]
    # a folder whose runs are of different models is refused (it was one line, their mean, named after the first)
    shutil.copytree(out / "modern_tiny" / "seed0", tmp_path / "other" / "seed1")
    r = _cli("llmjax.plot", str(tmp_path / "other"), "-o", str(tmp_path / "m.png"))
    assert r.returncode == 2 and "2 different models (modern, vanilla)" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    shutil.rmtree(tmp_path / "other")
    r = _cli("llmjax.plot", str(tmp_path), "-o", str(tmp_path / "q.png"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "no metrics.jsonl" in r.stderr and r.stderr.count("\n") == 1
    # the path printed is the file written; a name matplotlib cannot write, or a folder, is one line
    assert P.draw(c, tmp_path / "fig.svg") == tmp_path / "fig.svg" and (tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")
    for bad, needle in [(tmp_path / "noext", "give a file name ending in an image type"), (tmp_path / "x.foo", "image type"),
                        (tmp_path, "is a folder")]:
        with pytest.raises(P.PlotError, match=needle):
            P.draw(c, bad)
    assert not (tmp_path / "noext.png").exists() and not [f for f in tmp_path.iterdir() if f.name.startswith(".")]


def test_plot_of_a_folder_of_folders_of_runs_names_them(tmp_path):
    """`plot runs/compare` (compare's --out: one folder of seeds per config) said "neither a training
    run nor a folder of runs (no metrics.jsonl)", as a path that does not exist did: now each says
    what to pass."""
    for name in ("modern_tiny", "vanilla_tiny"):
        (tmp_path / "cmp" / name / "seed0").mkdir(parents=True)
        (tmp_path / "cmp" / name / "seed0" / "metrics.jsonl").write_text("")
    folders = " ".join(str(tmp_path / "cmp" / n) for n in ("modern_tiny", "vanilla_tiny"))
    with pytest.raises(P.PlotError, match=f"^{re.escape(str(tmp_path / 'cmp'))} holds folders of runs, not runs; pass each folder, "
                                          f"one line apiece: python -m llmjax.plot {re.escape(folders)} -o plot.png$"):
        P.curves([tmp_path / "cmp"])
    with pytest.raises(P.PlotError, match=f"^{re.escape(str(tmp_path / 'nothere'))} does not exist"):
        P.curves([tmp_path / "nothere"])
    with pytest.raises(P.PlotError, match="neither a training run nor a folder of runs"):
        P.curves([tmp_path / "cmp" / "modern_tiny" / "seed0" / "metrics.jsonl"])  # (a file: as before)


def test_plot_to_a_place_it_cannot_write_is_one_line(tmp_path):
    """-o in a folder that cannot be made or written (a file where a folder should be, /proc) was an
    OSError's traceback; now one line naming the image, and nothing left behind."""
    import numpy as np

    c = [{"label": "vanilla", "tokens": np.array([1.0, 2.0]), "seconds": np.array([0.1, 0.2]), "mean": np.array([3.0, 2.5]),
          "low": np.array([3.0, 2.5]), "high": np.array([3.0, 2.5]), "n_runs": 1}]
    (tmp_path / "afile").write_text("mine\n")
    for bad, needle in [(tmp_path / "afile" / "x.png", f"cannot write {tmp_path / 'afile' / 'x.png'}: {tmp_path / 'afile'} is a file, not a folder"),
                        (tmp_path / "afile" / "sub" / "x.png", f"{tmp_path / 'afile'} is a file, not a folder"),
                        (Path("/proc/llmjax_plot.png"), r"cannot write /proc/llmjax_plot.png \(")]:
        with pytest.raises(P.PlotError, match=needle):
            P.draw(c, bad)
    assert (tmp_path / "afile").read_text() == "mine\n" and sorted(f.name for f in tmp_path.iterdir()) == ["afile"]


def test_a_figure_of_no_lines_warns_nothing(tmp_path):
    """compare's figure where every run diverged at its first step has no line: matplotlib's
    "No artists with labels found to put in legend" UserWarning was printed under compare's output."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.draw([], tmp_path / "empty.png").stat().st_size > 0


def test_an_out_compare_cannot_use_is_refused_before_any_run(tmp_path):
    """--out holding a user's own results.md (notes in the folder given) had it replaced by the table,
    unsaid; a file as --out, or one where --out cannot be made, was an OSError's traceback (at the
    first run's turn). Now each is one line before any run, and nothing of the user's is changed."""
    kw = dict(seeds=1, max_steps=2, eval_every=2, eval_batches=1, tasks="", command="test", quiet=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("my notes\n")
    (mine / "val_loss.png").write_bytes(b"my figure")
    with pytest.raises(C.CompareError, match=rf"^--out {re.escape(str(mine))} holds results.md, val_loss.png that no compare wrote"):
        C.compare(SPECS[:1], out=mine, **kw)
    assert (mine / "results.md").read_text() == "my notes\n" and sorted(f.name for f in mine.iterdir()) == ["results.md", "val_loss.png"]
    (mine / "results.json").write_text(json.dumps({"mine": 1}))  # (a results.json of the user's own is no compare's)
    with pytest.raises(C.CompareError, match="holds results.json, results.md, val_loss.png that no compare wrote"):
        C.compare(SPECS[:1], out=mine, **kw)
    (tmp_path / "afile").write_text("mine\n")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(C.CompareError, match=rf"^--out {re.escape(str(out))}: {re.escape(str(tmp_path / 'afile'))} is a file, not a folder"):
            C.compare(SPECS[:1], out=out, **kw)
    with pytest.raises(C.CompareError, match=r"^--out /proc/llmjax_compare: cannot make it \("):
        C.compare(SPECS[:1], out=Path("/proc/llmjax_compare"), **kw)
    assert (tmp_path / "afile").read_text() == "mine\n" and sorted(f.name for f in tmp_path.iterdir()) == ["afile", "mine"]


def test_a_run_the_trainer_ends_short_of_max_steps_is_said_to_resume(tmp_path):
    """A trainer that exits 0 before --max_steps (--set train.stop_at_step, or a SIGTERM sent to it
    alone: both save a checkpoint) was reported as "did not finish; delete it and run again", which
    threw the resumable run away. Now the line says where it stopped and how to go on; its checkpoint is kept."""
    kw = dict(seeds=1, max_steps=2, eval_every=2, eval_batches=1, tasks="", command="test", quiet=True)
    with pytest.raises(C.CompareError, match=r"^training vanilla_tiny seed 0 stopped at step 1 of 2 at its --set train.stop_at_step=1: "
                                             r"run the command without that --set, or with a later step, to go on"):
        C.compare(SPECS[:1], out=tmp_path, overrides={"train.stop_at_step": "1"}, **kw)
    run = tmp_path / "vanilla_tiny" / "seed0"
    assert C._resumed_step(run) == 1 and not (run / "compare_run.json").exists()


def test_a_diverged_run_is_a_row_that_says_so_and_the_others_go_on(result, tmp_path, monkeypatch):
    """A run whose loss became NaN stopped the whole comparison ("training ... failed (exit 1)"), and
    the same command hit it again (it resumed from its last good checkpoint and diverged again): no
    table for the configs that trained fine. Now the trainer exits with its own status
    (cli.NON_FINITE_EXIT), compare records the run as diverged, goes on, and its row says so; a
    rerun reuses that record rather than diverging again."""
    import shutil

    out, _ = result
    shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")  # (finished: reused, nothing trained)
    # lr 1e10: step 1 (warm-up's lr / 5) stays finite and leaves parameters that make step 2 NaN
    f = users_config(tmp_path / "hot.py", "MODELS = {'tiny': v.MODELS['tiny']}\n"
                                         "def get_config(variant='default'):\n"
                                         "    return make_config(variant, MODELS, train={'tiny': {'lr': 1e10}})\n")
    specs = [SPECS[0], f"{f}:tiny"]
    kw = dict(out=tmp_path, seeds=1, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    r = C.compare(specs, **kw)
    hot = tmp_path / "hot_tiny" / "seed0"
    assert json.loads((hot / "compare_run.json").read_text())["non_finite_at_step"] == 2
    rows = {row["config"]: row for row in r["rows"]}
    assert rows[specs[1]]["diverged"] == {0: 2} and rows[specs[1]]["val_loss_mean"] is None
    assert rows[specs[1]]["val_loss_per_seed"] == [None]
    assert rows[specs[0]]["diverged"] == {} and rows[specs[0]]["val_loss_mean"] == rows[specs[0]]["val_loss_per_seed"][0]
    table = [x for x in r["markdown"].splitlines() if x.startswith("| `vanilla`")]
    assert [x.split(" | ")[4] for x in table] == [f"{rows[specs[0]]['val_loss_mean']:.4f}", "diverged (seed 0)"], table
    assert "Diverged (the loss, gradients or update became inf or NaN; " in r["markdown"] and "`vanilla` seed 0 at step 2." in r["markdown"]
    assert (tmp_path / "val_loss.png").is_file()

    def no_training(*a, **k):
        raise AssertionError("a trainer was started")

    monkeypatch.setattr(C.subprocess, "Popen", no_training)
    again = C.compare(specs, **kw)  # (both runs' records reused)
    assert again["markdown"].split("\n\n", 1)[1] == r["markdown"].split("\n\n", 1)[1]


def test_a_run_diverged_at_its_first_step_is_reused_and_a_fix_is_refused(tmp_path, monkeypatch):
    """A run whose first step diverged leaves no config.json or metrics.jsonl (the trainer takes a
    fresh run's files back): its record was not reused, so the same command trained and diverged it
    again, and a fix (a lower lr) was trained unsaid where one of a later step's divergence is
    refused. Now its record holds the config: reused by the same command, and another lr refused."""
    kw = dict(out=tmp_path, seeds=1, max_steps=2, eval_every=2, eval_batches=1, tasks="", command="test", quiet=True)
    r = C.compare(SPECS[:1], overrides={"train.lr": "1e38"}, **kw)  # (step 1's update overflows float32)
    run = tmp_path / "vanilla_tiny" / "seed0"
    assert r["rows"][0]["diverged"] == {0: 1} and not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()

    def no_training(*a, **k):
        raise AssertionError("a trainer was started")

    monkeypatch.setattr(C.subprocess, "Popen", no_training)
    assert C.compare(SPECS[:1], overrides={"train.lr": "1e38"}, **kw)["rows"] == r["rows"]
    with pytest.raises(C.CompareError, match=r"seed0 holds a diverged run of another config \(train\.lr \(1e\+38 -> 0\.001\)\)"):
        C.compare(SPECS[:1], overrides={"train.lr": "1e-3"}, **kw)


def test_a_second_compare_in_the_same_out_at_once_is_refused(result, tmp_path):
    """The same command started again while the first still ran started a second trainer in the run
    folder the first was training (resumed from its latest checkpoint; the table then called the run
    resumed after an interruption, with the second process's wall time). Now the second is one line,
    nothing of the first's touched; once the first ends, the same command goes on."""
    import shutil

    out = tmp_path / "cmp"
    shutil.copytree(result[0], out)
    before = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    kw = dict(seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    with C._only_compare(out):  # (as a compare running there holds it)
        with pytest.raises(C.CompareError, match=rf"^another compare is running in {re.escape(str(out))} now; wait for it to end"):
            C.compare(SPECS, out=out, **kw)
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == before
    C.compare(SPECS, out=out, **kw)  # (the finished runs reused)
    assert (out / "vanilla_tiny" / "seed0" / "compare_run.json").read_bytes() == before[out / "vanilla_tiny" / "seed0" / "compare_run.json"]


def test_compare_cli_errors_are_one_line(tmp_path):
    r = _cli("llmjax.compare", f"--configs={SPECS[0]},{ROOT}/configs/modern.py:small", f"--out={tmp_path}", "--max_steps=2")
    assert r.returncode == 2 and "context_len" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = _cli("llmjax.compare", f"--out={tmp_path}")
    assert r.returncode == 2 and "--configs is required" in r.stderr
    # task files that cannot be had: said before any run (it was the first BPE run's failure, its line cut at 300
    # characters, with no word of --task_dir, which compare did not have)
    r = _cli("llmjax.compare", f"--configs={ROOT}/configs/vanilla.py:tiny", "--set=model.vocab_size=50257", "--set=model.padded_vocab_size=50304",
             "--set=data.dataset=tinyshakespeare", "--task_dir=/proc/self", f"--out={tmp_path / 'bpe'}", "--max_steps=2")
    lines = r.stderr.splitlines()  # ("downloading hellaswag from ... to ...", then the error)
    assert r.returncode == 2 and len(lines) == 2 and lines[0].startswith("downloading hellaswag"), r.stderr
    assert lines[1].startswith("error: --tasks: cannot write hellaswag's download into /proc/self") and "--task_dir DIR" in lines[1], r.stderr
    assert not (tmp_path / "bpe").exists()


def test_plot_averages_the_seeds_of_one_model_run_differently(tmp_path):
    """Seeds of one model whose configs differ only in how it is run (remat, XLA's decode, scanned
    layers: train.EXECUTION_KEYS) are one model's runs, drawn as one line; a model key still refuses."""
    from llmjax import plot

    def run(name, **model):
        p = tmp_path / "runs" / name
        p.mkdir(parents=True)
        m = {"arch": "vanilla", "n_layer": 2, "d_model": 64, "context_len": 64, "remat": "none", "scan_layers": True,
             "decode_attention_impl": "auto", "decode_norm_impl": "auto", **model}
        (p / "config.json").write_text(json.dumps({"model": m, "train": {"batch_size": 4, "grad_accum_steps": 1}}))
        (p / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "step_time": 0.1, "val_loss": 3 - s / 100}) + "\n" for s in (2, 4)))

    run("seed0")
    run("seed1", remat="full", scan_layers=False, decode_attention_impl="xla", decode_norm_impl="xla")
    assert [c["n_runs"] for c in plot.curves([tmp_path / "runs"])] == [2]
    run("seed2", n_layer=3)
    with pytest.raises(plot.PlotError, match="2 different models"):
        plot.curves([tmp_path / "runs"])


def test_plot_reads_a_run_whose_last_metrics_line_was_cut_short(tmp_path):
    """A run stopped by a full disk (or a crash) mid-line, or one being written now, ends its
    metrics.jsonl in half a line: the trainer leaves it out when it resumes, and plot refused the
    whole run ('not a readable training run (JSONDecodeError ...)'). It is left out here too; a
    damaged line before the last is still refused."""
    from llmjax import plot

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"arch": "vanilla", "context_len": 64}, "train": {"batch_size": 4, "grad_accum_steps": 1}}))
    rows = "".join(json.dumps({"step": s, "step_time": 0.1, "val_loss": 3 - s / 100}) + "\n" for s in (2, 4))
    (run / "metrics.jsonl").write_text(rows + '{"step": 6, "step_time": 0.1, "val_lo')
    (c,) = plot.curves([run])
    assert list(c["tokens"]) == [2 * 4 * 64, 4 * 4 * 64] and list(c["mean"]) == [2.98, 2.96]
    (run / "metrics.jsonl").write_text('{"step": 1, "val_lo\n' + rows)
    with pytest.raises(plot.PlotError, match=rf"^{re.escape(str(run / 'metrics.jsonl'))}:1 is damaged \(Unterminated string starting at\); "
                                             "mend or delete that line$"):
        plot.curves([run])


def test_plot_names_a_damaged_metrics_line_or_config_in_one_line(tmp_path):
    """Rows that are JSON but no metrics row (null, a list, an object without its step), and a
    config.json of no run's shape, were AttributeError, KeyError and TypeError tracebacks; a line
    before the last cut short said JSONDecodeError's 'line 1 column 13' and 'pass run directories'
    of a run directory. Each now names the file and line."""
    from llmjax import plot

    run = tmp_path / "run"
    run.mkdir()
    config = {"model": {"arch": "vanilla", "context_len": 64}, "train": {"batch_size": 4, "grad_accum_steps": 1}}
    good = json.dumps({"step": 2, "step_time": 0.1, "val_loss": 3.0})
    for row, why in [("null", "no metrics row: a JSON object with its step"), ("[1, 2]", "no metrics row: a JSON object with its step"),
                     ('{"val_loss": 3.0}', "no metrics row: a JSON object with its step"),
                     ('{"step": true, "val_loss": 3.0}', "no metrics row: a JSON object with its step"),
                     ('{"step": 4, "val_loss": "3.0"}', "its val_loss or tokens is not a number"),
                     ('{"step": 4, "val_loss": 3.0, "tokens": null}', "its val_loss or tokens is not a number")]:
        (run / "config.json").write_text(json.dumps(config))
        (run / "metrics.jsonl").write_text(f"{good}\n{row}\n{good}\n")
        with pytest.raises(plot.PlotError, match=rf"^{re.escape(str(run / 'metrics.jsonl'))}:2 is damaged \({re.escape(why)}\); "
                                                 "mend or delete that line$"):
            plot.curves([run])
    (run / "metrics.jsonl").write_text(f"{good}\n")
    for bad in ("[]", "{}", '{"model": {"arch": "vanilla"}}', '{"model": 1, "train": {}}', "{"):
        (run / "config.json").write_text(bad)
        with pytest.raises(plot.PlotError, match=rf"^{re.escape(str(run / 'config.json'))} is damaged \(.*\); it is the run's config"):
            plot.curves([run])
    (run / "config.json").write_text(json.dumps({**config, "train": {"batch_size": 4}}))  # (needed by a row without its tokens)
    with pytest.raises(plot.PlotError, match=r"config.json is damaged \(its batch_size, grad_accum_steps or context_len: 'grad_accum_steps'\)"):
        plot.curves([run])
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "val_loss": 3.0, "tokens": 512}) + "\n")
    assert list(plot.curves([run])[0]["tokens"]) == [512]  # (not needed: a row with its tokens)


def test_plot_draws_labels_and_titles_as_written_in_every_format_it_offers(tmp_path):
    """A run folder named '_base' had no legend entry (matplotlib leaves out labels starting with
    '_'); '$' in a folder's name or --title was read as mathtext (a ParseSyntaxException's
    traceback, or garbled); .pgf, offered, needs LaTeX (a RuntimeError's traceback); .eps and .ps
    printed a warning line of their missing transparency; -o a link to an earlier figure replaced
    the link. A figure's texts are drawn as written, every format offered writes cleanly, a link is kept."""
    import numpy as np
    from llmjax import plot

    def curve(label, n):
        return {"label": label, "tokens": np.array([1.0, 2.0]), "seconds": np.array([0.1, 0.2]), "mean": np.array([3.0, 2.5]),
                "low": np.array([2.9, 2.4]), "high": np.array([3.1, 2.6]), "n_runs": n}

    c = [curve("_base", 1), curve("cost$5_$", 2), curve(r"lr$1e-3$^", 1)]
    svg = plot.draw(c, tmp_path / "f.svg", title=r"$\frac$ 50% _x").read_text()
    for text in ("_base", "cost$5_$ (2 seeds)", "lr$1e-3$^", r"$\frac$ 50% _x"):
        assert f"<!-- {text} -->" in svg  # (matplotlib's SVG names each text it draws, as drawn)
    with pytest.raises(plot.PlotError, match="give a file name ending in an image type matplotlib writes"):
        plot.draw(c, tmp_path / "f.pgf")
    (tmp_path / "target.png").write_bytes(b"earlier")
    (tmp_path / "link.png").symlink_to(tmp_path / "target.png")
    assert plot.draw(c, tmp_path / "link.png") == tmp_path / "target.png"
    assert (tmp_path / "link.png").is_symlink() and (tmp_path / "target.png").read_bytes()[:4] == b"\x89PNG"
    run = tmp_path / "runs" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"arch": "vanilla", "context_len": 64}, "train": {"batch_size": 4, "grad_accum_steps": 1}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": 3 - s / 100}) + "\n" for s in (2, 4)))
    shutil.copytree(run, tmp_path / "runs" / "seed1")
    for fmt in ("eps", "ps"):
        r = _cli("llmjax.plot", str(tmp_path / "runs"), "-o", str(tmp_path / f"f.{fmt}"))
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
    r = _cli("llmjax.plot", str(tmp_path / "runs"), "--out=")  # (an unset shell variable: it said ". is a folder")
    assert (r.returncode, r.stderr) == (2, "error: -o is empty (a shell variable that was not set?); give the image's file name "
                                           "(e.g. plot.png), or drop -o\n")


def test_plot_refuses_a_folder_of_runs_trained_with_different_settings(tmp_path):
    """A folder of one model's runs at two learning rates (a sweep) was drawn as one line, the mean
    of the two, as if they were seeds. Now it is refused naming the setting; seeds that differ only
    in their seed, logging and checkpoints, stop step, mesh or loss chunks are still one line."""
    from llmjax import plot

    def run(name, **train):
        p = tmp_path / "runs" / name
        p.mkdir(parents=True)
        m = {"arch": "vanilla", "n_layer": 2, "d_model": 64, "context_len": 64}
        t = {"batch_size": 4, "grad_accum_steps": 1, "lr": 1e-3, "seed": 0, **train}
        (p / "config.json").write_text(json.dumps({"model": m, "train": t, "data": {"dataset": "d", "dir": "data"}}))
        (p / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "step_time": 0.1, "val_loss": 3 - s / 100}) + "\n" for s in (2, 4)))

    run("seed0")
    run("seed1", seed=1, log_every_steps=7, checkpoint_every_steps=3, mesh={"data": 2}, loss_chunks=8, stop_at_step=4)
    assert [c["n_runs"] for c in plot.curves([tmp_path / "runs"])] == [2]
    run("lr3e-3", lr=3e-3)
    with pytest.raises(plot.PlotError, match=re.escape("were trained with different settings (train.lr: 0.003 (lr3e-3), 0.001 (seed0), "
                                                       "0.001 (seed1)); a folder's runs are drawn as one line, their mean: pass each run")):
        plot.curves([tmp_path / "runs"])


def test_the_code_fingerprint_holds_the_trainers_modules_only(result, tmp_path):
    """The fingerprint is of the modules the trainer may run: an editor's lock file beside a model
    file (Emacs' `.#modern.py`, a link to nowhere: compare stopped with a FileNotFoundError
    traceback), a copy (`modern copy.py`) or a notebook's checkpoint change nothing, and nor does an
    edit of lm-eval's model or the standalone evaluator (a finished run was refused as 'trained by
    other llmjax code' after harness.py was edited), whichever code recorded the run. The trainer
    imports none of the modules left out (checked in a fresh process)."""
    import shutil

    pkg = tmp_path / "pkg"
    shutil.copytree(Path(C.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    want = C.code_fingerprint(pkg)
    assert want == C.code_fingerprint() and "models/modern.py" in want and "harness.py" not in want
    (pkg / "models" / ".#modern.py").symlink_to("user@host.1234:1700000000")
    shutil.copy(pkg / "models" / "modern.py", pkg / "models" / "modern copy.py")
    (pkg / ".ipynb_checkpoints").mkdir()
    (pkg / ".ipynb_checkpoints" / "train-checkpoint.py").write_text("x = 1\n")
    (pkg / "harness.py").write_text("# edited\n")
    assert C.code_fingerprint(pkg) == want

    out, _ = result
    shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
    saved = tmp_path / "vanilla_tiny" / "seed1" / "compare_code.json"
    saved.write_text(json.dumps({**json.loads(saved.read_text()), "harness.py": "0" * 16, "evaluate.py": "0" * 16}))
    before = (tmp_path / "vanilla_tiny" / "seed1" / "compare_run.json").read_text()
    C.compare(SPECS[:1], out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    assert (tmp_path / "vanilla_tiny" / "seed1" / "compare_run.json").read_text() == before  # (reused)

    code = ("import sys, llmjax.train, llmjax.export, llmjax.prepare, llmjax.quant, llmjax.compile_cache, llmjax.sample, "
            "llmjax.downstream\nprint(' '.join(m for m in sys.modules if m.startswith('llmjax.')))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded = {m.split(".", 1)[1].replace(".", "/") + ".py" for m in r.stdout.split()}
    assert r.returncode == 0 and "train.py" in loaded and not loaded & C.NOT_TRAINING, (r.stderr, loaded & C.NOT_TRAINING)


def test_a_figure_that_cannot_be_written_keeps_the_table(result, tmp_path, monkeypatch):
    """The figure is drawn last, after results.json and results.md: a PlotError there (a full disk)
    was a traceback after the training, the table never shown. Now the table is returned (and
    printed) with the figure's error, which the command says in one line, exit status 1."""
    import shutil

    from llmjax import plot

    out, _ = result
    for spec in ("vanilla_tiny", "modern_tiny"):
        shutil.copytree(out / spec, tmp_path / spec)

    def full(*a, **k):
        raise plot.PlotError(f"cannot write {tmp_path / 'val_loss.png'} (No space left on device); give an image name in a folder you can write")

    monkeypatch.setattr(plot, "draw", full)
    r = C.compare(SPECS, out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    assert r["figure"] is None and r["figure_error"].startswith("cannot write") and "No space left" in r["figure_error"]
    assert (tmp_path / "results.md").read_text() == r["markdown"] and [row["arch"] for row in r["rows"]] == [row["arch"] for row in result[1]["rows"]]


def test_a_run_stopped_before_its_first_checkpoint_starts_again_with_the_code_fixed(result, tmp_path):
    """A run that stopped before any checkpoint (a crash in a model file being tried) is started
    again from step 0 by the same command once the file is fixed: nothing of the first try is
    kept, so it is no run of other code (it was refused: 'resuming it would splice the two'). The
    run then records the code that trained it."""
    import shutil

    out, _ = result
    shutil.copytree(out / "vanilla_tiny", tmp_path / "vanilla_tiny")
    seed1 = tmp_path / "vanilla_tiny" / "seed1"
    for name in ("compare_run.json", "metrics.jsonl"):
        (seed1 / name).unlink()
    shutil.rmtree(seed1 / "checkpoints")
    code = json.loads((seed1 / "compare_code.json").read_text())
    (seed1 / "compare_code.json").write_text(json.dumps({**code, "models/vanilla.py": "0" * 16}))  # (edited since the crash)
    r = C.compare(SPECS[:1], out=tmp_path, seeds=2, max_steps=4, eval_every=2, eval_batches=1, command="test", quiet=True)
    want = [json.loads(x) for x in (out / "vanilla_tiny" / "seed1" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (seed1 / "metrics.jsonl").read_text().splitlines()]
    assert [m["train_loss"] for m in got] == [m["train_loss"] for m in want] and got[-1]["val_loss"] == want[-1]["val_loss"]
    assert r["rows"][0]["resumed"] == {} and json.loads((seed1 / "compare_code.json").read_text()) == C.code_fingerprint()


def test_the_table_says_what_the_final_validation_loss_covers(result):
    """The whole split (eval.final_num_batches=0, the GPU and small recipes'), its first N batches,
    or each config's own (named among the settings that differ)."""
    out, _ = result
    saved = json.loads((out / "results.json").read_text())
    rows, meta = saved["rows"], saved["meta"]
    assert meta["final_eval_batches"] == [20]
    for batches, words in (([0], "over the whole validation split at the end"), ([5], "over the validation split's first 5 batches"),
                           ([0, 5], "as each config's eval.final_num_batches sets")):
        assert words in C.markdown(rows, "test", {**meta, "final_eval_batches": batches})
    plans = C.plan(SPECS, max_steps=2, batch_size=None, eval_every=None, eval_batches=None, tasks="", tasks_limit=0,
                   overrides={"eval.final_num_batches": 0})
    assert {p["cfg"].eval.final_num_batches for p in plans} == {0} and C.differing_settings(plans) == []


def test_every_folder_is_checked_before_anything_trains(result, tmp_path):
    """A folder that cannot be reused or resumed is refused before any run trains (it was refused
    when its config's turn came: after the configs before it had trained, and one folder at a time)."""
    import shutil

    out, _ = result
    shutil.copytree(out / "modern_tiny", tmp_path / "modern_tiny")
    with pytest.raises(C.CompareError, match=r"^\S+modern_tiny/seed0 holds a run of another config \(train\.max_steps \(4 -> 6\)\).*"
                                             r"\(and 1 more folder like it: \S+modern_tiny/seed1\)$"):
        C.compare(SPECS, out=tmp_path, seeds=2, max_steps=6, eval_every=2, eval_batches=1, command="test", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["modern_tiny"]  # (vanilla's runs never started)


def test_a_run_whose_every_step_compiled_has_no_tokens_per_sec(tmp_path):
    """With one step, its only step compiled: there is no step to time. Its tokens/s was that
    compiling step's (about 1,000 against ~30,000 for vanilla:tiny's later steps on the 2-core VM),
    shown as the run's speed; now it is unknown (null, '-' in the table)."""
    r = C.compare(SPECS[:1], out=tmp_path, seeds=1, max_steps=1, eval_every=1, eval_batches=1, command="test", quiet=True)
    assert r["rows"][0]["train_tokens_per_sec"] is None
    row = next(x for x in r["markdown"].splitlines() if x.startswith("| `vanilla`"))
    assert row.split(" | ")[5] == "-", row
