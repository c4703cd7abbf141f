"""Evaluation: the log-likelihood engine against a float64 reference and the trainer's loss; the
built-in HellaSwag / ARC scorer against lm-evaluation-harness's own tasks (offline, on the fixture
files in tests/fixtures); the harness model's batching, rolling and generation; task files; the
trainer's in-loop scoring; the command line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from conftest import ROOT
from helpers import capped_python, config, model, readme_py_block, scale_params
from llmjax import downstream, evaluate as E
from llmjax.scoring import Scorer, ScoreError, encode_pair, length_bucket, rolling_windows, scoring_config
from llmjax.tokenizer import GPT2Tokenizer

FIXTURES = ROOT / "tests" / "fixtures"
ARCHS = sorted(llmjax.ARCHS)
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def reference_scores(m, pairs, context_len):
    """Each request alone at its exact length (no padding, no batch-mates); float64 log-softmax."""
    out = []
    for ctx, cont in pairs:
        whole = (list(ctx) + list(cont))[-(context_len + 1) :]
        logits = np.asarray(m(jnp.asarray([whole[:-1]], jnp.int32))[0][0], np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        n = len(cont)
        rows = np.arange(len(whole) - 1 - n, len(whole) - 1)
        targets = np.asarray(whole[1:])[rows]
        ll = float(logp[rows, targets].sum())
        greedy = bool(np.all(logits[rows, : m.cfg.vocab_size].argmax(-1) == targets))
        out.append((ll, greedy))
    return out


def random_pairs(seed, n, context_len, vocab=65):
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        c = int(rng.integers(1, context_len + 20))  # some requests are longer than the context: cut on the left
        k = int(rng.integers(1, min(context_len, 24)))
        pairs.append((rng.integers(0, vocab, c).tolist(), rng.integers(0, vocab, k).tolist()))
    return pairs


def scoring_model(arch, **opts):
    m = model(arch, seed=3, **opts)
    if getattr(m.cfg, "moe_mode", None) == "capacity":
        m = llmjax.build_model(scoring_config(m.cfg), seed=3)
    return m


# --- the engine ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_scores_equal_the_float64_reference_for_every_arch(arch):
    """Each request's log-likelihood and greedy flag as the model computes them alone in float64. The
    head runs only on the K predictions a batch scores (K a length bucket of its longest
    continuation): among the requests, ones shorter than K (the K positions from the row's start),
    a continuation of the whole context, one of exactly K tokens, and ones cut on the left."""
    m = scale_params(llmjax.build_model(config(arch), seed=3), 4.0)  # sharper than at init: argmax ties would be luck
    L = m.cfg.context_len
    edges = [([5], list(range(L))), ([1, 2], list(range(17))), ([3] * 5, list(range(16))), (list(range(L + 9)), [7] * 24), ([9] * 40, [1])]
    pairs = random_pairs(0, 9, L) + [(c, [t % 65 for t in k]) for c, k in edges]
    got = Scorer.for_model(m, batch_size=4).score(pairs)
    want = reference_scores(m, pairs, m.cfg.context_len)
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=0, atol=2e-4)
    assert [g[1] for g in got] == [w[1] for w in want]


@pytest.mark.parametrize("arch,opts", [("vanilla", {}), ("moe", {"moe_mode": "capacity"}), ("linformer", {}), ("ssm", {})])
def test_batch_size_does_not_change_scores(arch, opts):
    m = scoring_model(arch, **opts)
    pairs = random_pairs(1, 11, m.cfg.context_len)
    runs = [Scorer.for_model(m, batch_size=b).score(pairs) for b in (1, 3, 8)]
    for other in runs[1:]:
        np.testing.assert_allclose([r[0] for r in other], [r[0] for r in runs[0]], rtol=0, atol=1e-4)
        assert [r[1] for r in other] == [r[1] for r in runs[0]]


def test_a_scorer_holds_the_parameters_it_was_made_with():
    """`Scorer.for_model` splits the model once: host (NumPy) parameters score alike, and a scorer
    keeps scoring the parameters the model had when it was made."""
    from flax import nnx

    m = llmjax.build_model(config("vanilla"), seed=3)
    pairs = random_pairs(2, 5, m.cfg.context_len)
    want = Scorer.for_model(m, batch_size=2).score(pairs)
    graphdef, state = nnx.split(m)
    host = nnx.merge(graphdef, jax.device_get(state))
    assert Scorer.for_model(host, batch_size=2).score(pairs) == want
    held = Scorer.for_model(m, batch_size=2)
    nnx.update(m, nnx.state(llmjax.build_model(config("vanilla"), seed=4)))  # other weights, in place
    assert held.score(pairs) == want and Scorer.for_model(m, batch_size=2).score(pairs) != want


def test_capacity_moe_is_scored_dropless():
    m = model("moe", moe_mode="capacity")
    with pytest.raises(ScoreError, match="dropless"):
        Scorer.for_model(m)
    assert scoring_config(m.cfg).moe_mode == "dropless" and scoring_config(model("vanilla").cfg) is model("vanilla").cfg


def test_length_buckets_and_bad_requests():
    assert [length_bucket(n, 1024) for n in (1, 16, 17, 100, 128, 129, 300, 1000, 1024)] == [16, 16, 32, 128, 128, 256, 384, 1024, 1024]
    assert length_bucket(300, 256) == 256
    s = Scorer.for_model(model("vanilla"))
    with pytest.raises(ScoreError, match=r"^request 2 of 2: a continuation of 65 tokens does not fit the model's context of 64: "
                                         r"score fewer items \(--limit\) or a model with a longer context$"):
        s.score([([1], [2]), ([1], list(range(65)))])  # (the harness's requests: which one, and what to do, was not said)
    with pytest.raises(ScoreError, match="^request 1 of 1: a request needs at least one context token"):
        s.score([([], [1, 2])])
    assert s.score([([1, 2], [])]) == [(0.0, True)]
    with pytest.raises(ScoreError, match="need a prefix token .* got None: a character vocabulary has none"):
        s.rolling([[1, 2, 3]], None)  # (a character tokenizer's eot_id)


def test_non_finite_log_likelihoods_are_an_error_not_a_score():
    """A float16 forward that overflows gave NaN log-likelihoods, and the metrics (numpy's argmax, as
    lm-eval's) counted the first NaN choice as the answer: acc 0.15 on 20 HellaSwag items, a number
    like any other. Now one line, from the scorer, the fast scorer and the harness alike."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llmjax.harness import LlmjaxLM
    from llmjax.sample import SampleError

    m = scale_params(llmjax.build_model(config("vanilla", dtype="float16", vocab_size=50257, padded_vocab_size=50304), seed=1), 100.0)
    pairs = random_pairs(3, 4, m.cfg.context_len)
    needle = r"^4 of 4 requests scored a log-likelihood of nan \(the first: request 1\); the model's forward overflowed \(float16 holds"
    with pytest.raises(ScoreError, match=needle):
        Scorer.for_model(m, 3).score(pairs)
    with pytest.raises(ScoreError, match="scored a log-likelihood of nan"):
        Scorer.for_model(m, 3).rolling([list(range(100))], 0)
    tok = GPT2Tokenizer()
    items = [downstream.Item("A man is", ("walking.", "running away."), 1)]
    with pytest.raises(ScoreError, match="2 of 2 requests scored a log-likelihood of nan"):
        downstream.score_task(Scorer.for_model(m, 2), tok, items)
    lm = LlmjaxLM(model=m, tokenizer=tok, batch_size=2)
    with pytest.raises(ScoreError, match="scored a log-likelihood of nan"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("A man is", " walking."), 0)], disable_tqdm=True)
    # text generated from NaN logits is an error too (the sampler's, before any text is returned)
    with pytest.raises(SampleError, match=r"^the model's logits were not finite \(NaN or inf\) for 1 of 1 rows"):
        lm.generate_until([Instance("generate_until", {}, ("A man is", {"until": ["\n"], "max_gen_toks": 4}), 0)], disable_tqdm=True)
    # one bad row among finite ones is named
    def one_nan(toks, starts, tgts, mask):
        ll = np.where(np.arange(len(toks)) == 1, np.nan, -1.0)
        return ll, np.zeros(len(toks), bool)

    with pytest.raises(ScoreError, match=r"^1 of 3 requests scored a log-likelihood of nan \(the first: request 2\)"):
        Scorer(one_nan, context_len=64, batch_size=4).score([([1], [2]), ([1, 2], [3]), ([1, 2, 3], [4])])


def test_rolling_windows_are_lm_evals():
    lm_utils = pytest.importorskip("lm_eval.utils")
    for n in (1, 5, 16, 17, 40, 100):
        toks = list(range(100, 100 + n))
        want = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(toks, 7, 16, 1)]
        assert rolling_windows(toks, 7, 16) == [(list(a), list(b)) for a, b in want]


def test_rolling_loglikelihood_is_the_trainers_loss():
    """-rolling log-likelihood = the trainer's eval_step loss summed over the same windows: the
    first predicts tokens 0..L-1 from end-of-text; the next predict the rest with a full context."""
    from llmjax.sharding import make_mesh
    from llmjax.train import build_steps

    cfg = config("vanilla")
    L = cfg.model.context_len  # 64
    steps = build_steps(cfg, make_mesh(cfg.train.mesh, jax.devices()[:1]))
    params = steps.init_state()["params"]
    m = llmjax.build_model(cfg, seed=0)
    from helpers import load_params

    load_params(m, jax.tree.map(np.asarray, params))
    prefix = 0
    rng = np.random.default_rng(5)
    for n in (10, L, 2 * L + 22):
        toks = rng.integers(0, 65, n).tolist()
        got = Scorer.for_model(m, batch_size=2).rolling([toks], prefix)[0]
        windows, masks = [[prefix] + toks[:L]], [np.arange(L) < min(n, L)]
        end = L
        while end < n:
            new_end = min(end + L, n)
            windows.append(toks[new_end - L - 1 : new_end])
            masks.append(np.arange(L) >= L - (new_end - end))
            end = new_end
        total = 0.0
        for w, mask in zip(windows, masks):
            w = (w + [0] * (L + 1))[: L + 1]
            s, c = steps.eval_step(params, jnp.asarray([w], jnp.int32), jnp.asarray([mask], jnp.float32))
            total += float(s)
        np.testing.assert_allclose(-got, total, rtol=2e-6)


# --- HellaSwag / ARC: the built-in scorer against lm-eval's own tasks -------------------------------


@pytest.fixture(scope="module")
def bpe_model():
    """A random GPT-2-BPE model with a context long enough for the fixture items."""
    cfg = config("vanilla", vocab_size=50257, padded_vocab_size=50304, context_len=256, scan_layers=False)
    return scale_params(llmjax.build_model(cfg, seed=1), 3.0), GPT2Tokenizer()


def test_encode_pair_is_lm_evals():
    pytest.importorskip("lm_eval")
    from llmjax.harness import LlmjaxLM

    tok = GPT2Tokenizer()
    lm = LlmjaxLM(model=model("vanilla", vocab_size=50257, padded_vocab_size=50304), tokenizer=tok)
    from lm_eval.api.instance import Instance

    cases = [("Hello", " world"), ("Question: x\nAnswer: ", "yes"), ("trailing  ", "tab\tand"), ("", "Starts here"),
             ("", "<|endoftext|>x"), ("un", "believable"), ("The cat", "")]
    from lm_eval.api.model import TemplateLM

    seen, ours = [], []
    reqs = [Instance("loglikelihood", {}, c, 0) for c in cases]
    lm._loglikelihood_tokens = lambda reqs, **k: seen.extend(reqs) or [(0.0, True)] * len(reqs)
    TemplateLM.loglikelihood(lm, reqs, disable_tqdm=True)  # (lm-eval's own tokenisation)
    lm._loglikelihood_tokens = lambda reqs, **k: ours.extend(reqs) or [(0.0, True)] * len(reqs)
    lm.loglikelihood(reqs, disable_tqdm=True)  # (the llmjax model's: encode_pair)
    assert [r[1:] for r in ours] == [encode_pair(tok, ctx, cont) for ctx, cont in cases]
    for (ctx, cont), (_, want_ctx, want_cont) in zip(cases, seen):
        assert encode_pair(tok, ctx, cont) == (list(want_ctx), list(want_cont)), (ctx, cont)


def test_an_empty_continuation_scores_zero(bpe_model):
    """An empty continuation has log-likelihood 0 (log 1) and is greedy, after any context; after an
    empty one it was lm-eval's IndexError traceback (TemplateLM.loglikelihood reads its first token)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llmjax.harness import LlmjaxLM

    m, tok = bpe_model
    lm = LlmjaxLM(model=m, tokenizer=tok, batch_size=2)
    cases = [("", ""), ("Hello", ""), ("", "Hello"), ("Hello", " world")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, c, 0) for c in cases], disable_tqdm=True)
    assert got[:2] == [(0.0, True), (0.0, True)]
    want = reference_scores(m, [([tok.eot_id], tok.encode("Hello")), (tok.encode("Hello"), tok.encode(" world"))], 256)
    np.testing.assert_allclose([g[0] for g in got[2:]], [w[0] for w in want], rtol=1e-5)


def lm_eval_run(lm, tasks, task_manager, limit=None):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, limit=limit, log_samples=True)


@pytest.fixture(scope="module")
def fixture_task_manager(tmp_path_factory):
    """lm-eval's TaskManager with hellaswag and arc_easy pointed at the fixture files (their YAMLs
    include lm-eval's own by path), as `run_harness` makes it: without lm-eval's other tasks, whose
    index took 10-15 s."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    assert E._local_task_configs(["hellaswag", "arc_easy"], FIXTURES, folder) == ["hellaswag", "arc_easy"]
    return TaskManager(include_path=str(folder), include_defaults=False)


def test_fast_scorer_equals_lm_evals_tasks_at_every_batch_size(bpe_model, fixture_task_manager, monkeypatch):
    from llmjax.harness import LlmjaxLM

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    m, tok = bpe_model
    tasks = ["hellaswag", "arc_easy"]
    fast = {t: downstream.score_task(Scorer.for_model(m, 5), tok, downstream.load_items(t, FIXTURES)) for t in tasks}
    assert fast["hellaswag"]["n"] == 40 and fast["arc_easy"]["n"] == 30
    for batch_size in (1, 3, 8):
        out = lm_eval_run(LlmjaxLM(model=m, tokenizer=tok, batch_size=batch_size), tasks, fixture_task_manager)
        for t in tasks:
            res = out["results"][t]
            assert res["acc,none"] == fast[t]["acc"] and res["acc_norm,none"] == fast[t]["acc_norm"], (t, batch_size)
            docs = sorted(out["samples"][t], key=lambda d: d["doc_id"])
            lls = [[r[0][0] for r in d["resps"]] for d in docs]
            assert [len(x) for x in lls] == [len(x) for x in fast[t]["loglikelihoods"]]
            np.testing.assert_allclose(np.concatenate(lls), np.concatenate(fast[t]["loglikelihoods"]), rtol=0, atol=1e-4)
    # the metrics are lm-eval's: argmax, and argmax per character (an item where they differ exists)
    items = downstream.load_items("hellaswag", FIXTURES)
    lls = fast["hellaswag"]["loglikelihoods"]
    acc = np.mean([np.argmax(x) == it.gold for x, it in zip(lls, items)])
    acc_norm = np.mean([np.argmax(np.array(x) / [len(c) for c in it.choices]) == it.gold for x, it in zip(lls, items)])
    assert (fast["hellaswag"]["acc"], fast["hellaswag"]["acc_norm"]) == (acc, acc_norm)


def test_preprocessing():
    items = downstream.load_items("hellaswag", FIXTURES)
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].choices[3] == "starts pulling up roofing on a roof." and items[0].gold == 3
    wiki = [it for it in items if "[" in it.context or any("[" in c for c in it.choices)]
    assert not wiki and any(". " in it.context for it in items[32:])
    arc = downstream.load_items("arc_easy", FIXTURES)
    assert arc[0].context.startswith("Question: Which statement best explains") and arc[0].context.endswith("\nAnswer:")
    assert sorted({len(it.choices) for it in arc}) == [3, 4, 5]
    assert downstream.load_items("arc_easy", FIXTURES, limit=4) == arc[:4]
    assert downstream.load_items("arc_easy", FIXTURES, limit=0) == arc
    for bad in (-1, 2.5):  # (-1 scored all but the last item)
        with pytest.raises(downstream.TaskError, match=f"limit must be a whole number >= 0 \\(0 or None: every item\\), got {bad}"):
            downstream.load_items("arc_easy", FIXTURES, limit=bad)
    # AI2's original jsonl format gives the same items
    row = json.loads((FIXTURES / "ARC-Easy-test.jsonl").read_text().splitlines()[0])
    original = {"id": row["id"], "answerKey": row["answerKey"],
                "question": {"stem": row["question"], "choices": [{"text": t, "label": lab} for t, lab in zip(row["choices"]["text"], row["choices"]["label"])]}}
    assert downstream._parse_arc(original) == arc[0]


def test_metrics_edge_cases_are_lm_evals():
    """acc / acc_norm by numpy's argmax and division, as lm-eval's: the first of equal scores wins, a
    choice empty after cleaning scores -inf per character (no ZeroDivisionError); with one item the
    standard errors are "N/A", as lm-eval writes them (NaN is not JSON)."""
    items = [downstream.Item("ctx", ("", "ab", "abcd"), 1), downstream.Item("ctx", ("x", "y"), 1)]
    m = downstream.metrics(items, [-1.0, -2.0, -4.0, -3.0, -3.0])
    # item 1: acc picks "" (-1.0); per character "" is -inf and "ab" ties "abcd" (-1.0): the first, the gold;
    # item 2: a tie, the first (not the gold)
    assert m["acc"] == 0.0 and m["acc_norm"] == 0.5
    m = downstream.metrics(items[:1], [-9.0, -2.0, -8.0])
    assert m["acc_norm"] == 1.0 and m["acc_stderr"] == "N/A" and m["acc_norm_stderr"] == "N/A"
    json.dumps(m, allow_nan=False)


def test_acc_norm_is_per_character_and_the_standard_errors_are_lm_evals():
    """acc_norm divides by the choice's characters (lm-eval's len(choice)): not its UTF-8 bytes (the
    fixture items are ASCII, where the two agree), nor the delimiter space; the standard errors are
    lm-eval's (sample standard deviation / sqrt(n)), as the fast scorer's results write them."""
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    items = [downstream.Item("ctx", ("\u00e9\u00e9\u00e9", "abcd"), 1),  # per character -1.1 < -1.0; per byte -0.55 > -1.0
             downstream.Item("ctx", ("a", "abcdefgh"), 1),  # per character -1.5 < -1.25; with the space -0.75 > -1.11
             downstream.Item("ctx", ("x", "y"), 0), downstream.Item("ctx", ("x", "y"), 1), downstream.Item("ctx", ("x", "y"), 0)]
    m = downstream.metrics(items, [-3.3, -4.0, -1.5, -10.0, -1.0, -2.0, -1.0, -2.0, -1.0, -2.0])
    acc, acc_norm = [0.0, 0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0, 1.0]
    assert (m["acc"], m["acc_norm"]) == (np.mean(acc), np.mean(acc_norm))
    assert m["acc_stderr"] == pytest.approx(lm_metrics.mean_stderr(acc), rel=1e-12)
    assert m["acc_norm_stderr"] == pytest.approx(lm_metrics.mean_stderr(acc_norm), rel=1e-12)
    entry = E._result_entry("hellaswag", m)  # (what --scorer=fast writes)
    assert (entry["acc_stderr,none"], entry["acc_norm_stderr,none"]) == (m["acc_stderr"], m["acc_norm_stderr"])

# --- the harness model: rolling and generation -------------------------------------------------------


def test_harness_samples_as_lm_evals_hf_model(bpe_model, monkeypatch):
    """A generate_until request that samples without a top_k drew from the whole vocabulary; lm-eval's
    HF model passes its arguments to Hugging Face's `generate`, whose top_k is then 50 (transformers'
    GenerationConfig default, where the model's generation_config.json sets none, as GPT-2's): so it
    is 50 here, 0 every token, and greedy unless the request samples at a temperature > 0."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    import llmjax.harness as H
    from llmjax.sample import Sampling

    m, tok = bpe_model
    lm = H.LlmjaxLM(model=m, tokenizer=tok, batch_size=3)
    seen = []
    monkeypatch.setattr(H, "generate", lambda model, prompts, n, *, sampling, **kw: seen.append(sampling) or [[] for _ in prompts])
    cases = [({"do_sample": True, "temperature": 0.7}, Sampling(temperature=0.7, top_k=50)),
             ({"do_sample": True, "temperature": 1.0, "top_k": 0}, Sampling(temperature=1.0, top_k=None)),
             ({"do_sample": True, "temperature": 1.0, "top_k": 5, "top_p": 0.9}, Sampling(temperature=1.0, top_k=5, top_p=0.9)),
             ({"do_sample": True}, Sampling(greedy=True)), ({"temperature": 0.0}, Sampling(greedy=True)),
             ({"do_sample": False, "temperature": 1.0}, Sampling(greedy=True))]
    for args, want in cases:
        seen.clear()
        lm.generate_until([Instance("generate_until", {}, ("A prompt", {"until": ["x"], "max_gen_toks": 3, **args}), 0)], disable_tqdm=True)
        assert seen == [want], (args, seen)


def test_harness_rolling_and_generate_until(bpe_model):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llmjax.harness import LlmjaxLM
    from llmjax.sample import Sampling, generate

    m, tok = bpe_model
    lm = LlmjaxLM(model=m, tokenizer=tok, batch_size=3)
    texts = ["A short text.", "word " * 400]  # the second needs two windows
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in texts], disable_tqdm=True)
    for text, ll in zip(texts, got):
        ids = tok.encode(text)
        want = sum(r[0] for r in reference_scores(m, rolling_windows(ids, tok.eot_id, 256), 256))
        np.testing.assert_allclose(ll, want, rtol=1e-5)

    prompt = "The quick brown fox"
    ids = generate(m, [tok.encode(prompt)], 24, sampling=Sampling(greedy=True), eot_id=tok.eot_id)[0]
    full = tok.decode(ids)
    stop = tok.decode(ids[6:8])  # a string the greedy continuation reaches
    want_cut = full[: full.index(stop)]
    reqs = [
        Instance("generate_until", {}, (prompt, {"until": [stop], "max_gen_toks": 24}), 0),
        Instance("generate_until", {}, (prompt, {"until": ["never appears"], "max_gen_toks": 5}), 1),
        Instance("generate_until", {}, (prompt, {"until": [stop, tok.decode(ids[2:3])], "max_gen_toks": 24, "do_sample": False}), 2),
    ]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert out[0] == want_cut and stop not in out[0]
    assert out[1] == tok.decode(ids[:5]) and len(tok.encode(out[1])) <= 5
    assert out[2] == full[: min(full.index(stop), full.index(tok.decode(ids[2:3])))]
    # sampling arguments as lm-eval's HF model takes them: top_k=1 is greedy whatever the temperature
    sampled = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["never appears"], "max_gen_toks": 5, "do_sample": True,
                                                                            "temperature": 1.0, "top_k": 1}), 0)], disable_tqdm=True)
    assert sampled == [tok.decode(ids[:5])]
    from llmjax.sample import SampleError

    with pytest.raises(SampleError, match="top_p must be in"):
        lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["x"], "max_gen_toks": 2, "do_sample": True, "temperature": 1.0,
                                                                    "top_p": 0}), 0)], disable_tqdm=True)
    # max_gen_toks as long as the context: the prompt keeps its last token, and the user is told
    last = tok.encode(prompt)[-1:]
    with pytest.warns(UserWarning, match="max_gen_toks=256 fills the model's whole context of 256"):
        whole = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["never appears"], "max_gen_toks": 256}), 0)],
                                  disable_tqdm=True)
    assert whole[0] == tok.decode(generate(m, [last], 256, sampling=Sampling(greedy=True), eot_id=tok.eot_id)[0])


def test_generate_until_keeps_the_last_context_minus_max_gen_toks_prompt_tokens(bpe_model):
    """As lm-eval's HF model: a prompt longer than context_len - max_gen_toks keeps exactly its last
    context_len - max_gen_toks tokens (one more overflowed the context at the last new token, which
    a slide then drew from half the context)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llmjax.harness import LlmjaxLM
    from llmjax.sample import Sampling, generate

    m, tok = bpe_model
    lm = LlmjaxLM(model=m, tokenizer=tok, batch_size=3)
    rng = np.random.default_rng(0)
    texts = [" ".join(str(x) for x in rng.integers(0, 1000, 300)) for _ in range(3)]
    max_gen = 8
    keep = m.cfg.context_len - max_gen
    ids = [lm.tok_encode(t) for t in texts]
    assert all(len(i) > keep for i in ids)
    want = [tok.decode(o) for o in generate(m, [i[-keep:] for i in ids], max_gen, sampling=Sampling(greedy=True), eot_id=tok.eot_id)]
    got = lm.generate_until([Instance("generate_until", {}, (t, {"until": ["never appears"], "max_gen_toks": max_gen}), 0)
                             for t in texts], disable_tqdm=True)
    assert got == want


def test_generate_until_draws_each_batch_with_its_own_seed(bpe_model):
    """Sampled requests get a seed per group and batch: the same request in two batches (batch size 1)
    draws two samples, not one stream twice (as lm-eval's HF model, whose torch generator moves on)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from llmjax.harness import LlmjaxLM

    m, tok = bpe_model
    lm = LlmjaxLM(model=m, tokenizer=tok, batch_size=1)
    args = ("The quick brown fox", {"until": ["never appears"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0, "top_k": 0})
    out = lm.generate_until([Instance("generate_until", {}, args, i) for i in range(3)], disable_tqdm=True)
    assert len(set(out)) == 3, out
    assert LlmjaxLM(model=m, tokenizer=tok, batch_size=1).generate_until(
        [Instance("generate_until", {}, args, i) for i in range(3)], disable_tqdm=True) == out  # (seeded: the same again)

# --- task files -----------------------------------------------------------------------------------


def test_task_files_are_checked_by_content(tmp_path):
    good = (FIXTURES / "hellaswag_val.jsonl").read_text().splitlines()
    (tmp_path / "hellaswag_val.jsonl").write_text("\n".join(good[:3] + ['{"ctx_a": "x"}'] + good[3:]) + "\n")
    with pytest.raises(downstream.TaskError, match=r"hellaswag_val.jsonl:4 is not a hellaswag item \(field 'activity_label'"):
        downstream.load_items("hellaswag", tmp_path)
    bad_label = json.loads(good[0]) | {"label": 7}
    (tmp_path / "hellaswag_val.jsonl").write_text(json.dumps(bad_label) + "\n")
    with pytest.raises(downstream.TaskError, match="label in 0-3"):
        downstream.load_items("hellaswag", tmp_path)
    with pytest.raises(downstream.TaskError, match="unknown task 'mmlu'"):
        downstream.load_items("mmlu", tmp_path)
    row = json.loads((FIXTURES / "ARC-Easy-test.jsonl").read_text().splitlines()[0]) | {"answerKey": "Z"}
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "ARC-Easy-test.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(downstream.TaskError, match=r"ARC-Easy-test.jsonl:1 is not an arc_easy item \(answerKey 'Z'"):
        downstream.load_items("arc_easy", tmp_path)


class FakeURL:
    def __init__(self, data: bytes):
        self.data, self.calls = data, 0

    def __call__(self, url, timeout=None):
        import io

        self.calls += 1
        return io.BytesIO(self.data)


def test_downloads_are_checked_then_cached(tmp_path, monkeypatch):
    import dataclasses

    monkeypatch.setattr(downstream.time, "sleep", lambda s: None)
    fake = FakeURL((FIXTURES / "hellaswag_val.jsonl").read_bytes())
    monkeypatch.setattr(downstream.urllib.request, "urlopen", fake)
    # the official split has 10,042 items: a 40-item download is refused and nothing is kept
    with pytest.raises(downstream.TaskError, match="holds 40 items, not 10042"):
        downstream.load_items("hellaswag", tmp_path / "a")
    assert not (tmp_path / "a").exists()  # (nor the folder made for it)
    monkeypatch.setitem(downstream.TASKS, "hellaswag", dataclasses.replace(downstream.TASKS["hellaswag"], count=40))
    items = downstream.load_items("hellaswag", tmp_path / "a")
    assert items == downstream.load_items("hellaswag", FIXTURES) and fake.calls == 2
    downstream.load_items("hellaswag", tmp_path / "a")
    assert fake.calls == 2  # cached
    monkeypatch.setenv("LLMJAX_TASK_DIR", str(tmp_path / "a"))
    assert downstream.find_file("hellaswag") == tmp_path / "a" / "hellaswag_val.jsonl"

    # ARC-Easy comes as the Hugging Face parquet and is kept as jsonl
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in (FIXTURES / "ARC-Easy-test.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arc.parquet")
    monkeypatch.setattr(downstream.urllib.request, "urlopen", FakeURL((tmp_path / "arc.parquet").read_bytes()))
    monkeypatch.setitem(downstream.TASKS, "arc_easy", dataclasses.replace(downstream.TASKS["arc_easy"], count=30))
    assert downstream.load_items("arc_easy", tmp_path / "b") == downstream.load_items("arc_easy", FIXTURES)

    def offline(url, timeout=None):
        raise OSError("network is unreachable")

    monkeypatch.setattr(downstream.urllib.request, "urlopen", offline)
    with pytest.raises(downstream.TaskError, match="cannot download hellaswag .* put hellaswag_val.jsonl in"):
        downstream.load_items("hellaswag", tmp_path / "c" / "d")
    assert not (tmp_path / "c").exists()  # the folders made for the download are gone again


def test_a_damaged_download_is_one_line_that_says_to_try_again(tmp_path, monkeypatch):
    """A download that is not the task's data (an HTML error page served with status 200, a cut
    connection): ARC's parquet was pyarrow's ArrowInvalid traceback, and HellaSwag's line told the
    user to delete a temporary file that was already gone. Nothing is kept either way."""
    monkeypatch.setattr(downstream.time, "sleep", lambda s: None)
    page = FakeURL(b"<!DOCTYPE html><html>429 Too Many Requests</html>\n")
    monkeypatch.setattr(downstream.urllib.request, "urlopen", page)
    cut = (FIXTURES / "hellaswag_val.jsonl").read_text().splitlines()
    for task, body, why in [("hellaswag", None, r"its line 1 is not a hellaswag item \(Expecting value"),
                            ("hellaswag", "\n".join(cut[:3] + [cut[3][:50]]), r"its line 4 is not a hellaswag item"),
                            ("arc_easy", None, r"not a parquet file: pyarrow's ArrowInvalid")]:
        if task == "arc_easy":
            pytest.importorskip("pyarrow")
        if body is not None:
            page.data = body.encode()
        spec = downstream.TASKS[task]
        with pytest.raises(downstream.TaskError, match=rf"^the download of {task} from {re.escape(spec.url)} is damaged \({why}.*\); "
                                                       rf"nothing was kept: try again later, or put {spec.file} in {tmp_path / 'x'}$"):
            downstream.load_items(task, tmp_path / "x")
        assert not (tmp_path / "x").exists()


def test_a_folder_that_cannot_take_the_download_is_one_line(monkeypatch):
    """An existing task directory that cannot be written (here /proc/self): an OSError traceback."""
    def no_network(url, timeout=None):
        raise AssertionError("nothing is fetched")

    monkeypatch.setattr(downstream.urllib.request, "urlopen", no_network)
    with pytest.raises(downstream.TaskError, match=r"^cannot write hellaswag's download into /proc/self \(.*\); put hellaswag_val.jsonl "
                                                   r"there or pass another task directory$"):
        downstream.find_file("hellaswag", "/proc/self")


def test_a_choice_longer_than_the_context_is_said_before_scoring(tmp_path):
    """The trainer refuses, before its first step, a task with a choice longer than the model's
    context (it trained to the first scoring step and died there with a traceback, unsaved); the
    standalone scorer names the item."""
    from llmjax.config import ConfigError
    from llmjax.tokenizer import GPT2Tokenizer
    from llmjax.train import train

    items = downstream.load_items("hellaswag", FIXTURES, limit=12)
    requests = downstream.requests_for(items, GPT2Tokenizer())
    longest = [max(len(c) for _, c in requests[4 * i : 4 * i + 4]) for i in range(len(items))]
    first = int(np.argmax(longest))  # (the first item with the longest choice)
    downstream.check_fit("hellaswag", items, requests, max(longest))
    with pytest.raises(downstream.TaskError, match=f"^hellaswag item {first + 1} has a choice of {max(longest)} tokens, more than the "
                                                   f"model's context of {max(longest) - 1}; score fewer items"):
        downstream.check_fit("hellaswag", items, requests, max(longest) - 1)
    cfg = llmjax.load_config(
        f"{ROOT}/configs/vanilla.py:tiny",
        {"data.dataset": "tinyshakespeare", "model.vocab_size": 50257, "model.padded_vocab_size": 50304, "model.context_len": max(longest) - 1,
         "train.max_steps": 4, "train.batch_size": 8, "eval.sample_tokens": 0, "eval.tasks": "hellaswag", "eval.tasks_limit": 12,
         "eval.tasks_batch_size": 8, "eval.tasks_dir": str(FIXTURES), "logging.progress_bar": False},
    )
    with pytest.raises(ConfigError, match=f"^eval.tasks: hellaswag item {first + 1} has a choice of {max(longest)} tokens"):
        train(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()  # (refused before anything was written)


def test_character_models_are_refused():
    from llmjax.tokenizer import CharTokenizer

    with pytest.raises(downstream.TaskError, match="character-level"):
        downstream.score_task(Scorer.for_model(model("vanilla")), CharTokenizer("abc"), [])


def test_a_character_model_is_refused_naming_the_lm_eval_tasks_asked_for(monkeypatch):
    """`--tasks lambada_openai` with a character-level checkpoint said "HellaSwag and ARC are scored on
    text ...", tasks that were not asked for; the line names lm-eval's tasks (not scored: refused first)."""
    from llmjax.tokenizer import CharTokenizer

    pytest.importorskip("lm_eval")
    from llmjax.harness import LlmjaxLM

    m = types.SimpleNamespace(cfg=types.SimpleNamespace(arch="vanilla", dtype="float32", context_len=64))
    monkeypatch.setattr(E, "load_for_scoring", lambda *a, **kw: types.SimpleNamespace(model=m, tokenizer=CharTokenizer("abc")))
    args = dict(batch_size=2, limit=None, device="cpu", checkpoint_path="runs/x", which="latest", dtype=None, task_dir=str(FIXTURES),
                num_fewshot=None, output_json=None)
    tail = r" are scored on text with the GPT-2 BPE tokenizer; this is a character-level model \(train a BPE config"
    for scorer, tasks, what in [("harness", "lambada_openai", r"lm-eval's tasks \(lambada_openai\)"),
                                ("harness", "hellaswag,lambada_openai", r"lm-eval's tasks \(hellaswag, lambada_openai\)"),
                                ("harness", "hellaswag,arc_easy", "HellaSwag and ARC"), ("fast", "arc_easy", "HellaSwag and ARC")]:
        with pytest.raises(downstream.TaskError, match=f"^{what}{tail}"):
            E.evaluate(types.SimpleNamespace(scorer=scorer, tasks=tasks, **args))
    with pytest.raises(downstream.TaskError, match=f"^lm-eval's tasks{tail}"):  # (the model made from Python: any task)
        LlmjaxLM(model=m, tokenizer=CharTokenizer("abc"))


# --- the trainer's in-loop scoring and the command line -------------------------------------------------


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A GPT-2-BPE run (tiny shakespeare) that scores hellaswag and arc_easy at steps 2 and 4, on 8 devices."""
    from llmjax.train import train

    cfg = llmjax.load_config(
        f"{ROOT}/configs/vanilla.py:tiny",
        {"data.dataset": "tinyshakespeare", "model.vocab_size": 50257, "model.padded_vocab_size": 50304, "model.context_len": 128,
         "train.max_steps": 4, "train.batch_size": 8, "eval.every_steps": 0, "eval.num_batches": 1, "eval.sample_tokens": 0,
         "eval.tasks": "hellaswag,arc_easy", "eval.tasks_every_steps": 2, "eval.tasks_limit": 12, "eval.tasks_batch_size": 8,
         "eval.tasks_dir": str(FIXTURES), "logging.progress_bar": False},
    )
    path = tmp_path_factory.mktemp("evaluate") / "run"
    train(cfg, path, quiet=True)
    return path


def test_the_readmes_scoring_example_runs(bpe_run, monkeypatch, capsys):
    """README's downstream-scoring example (a ```py block: it needs a trained run) runs as written, on
    a GPT-2 BPE run, with the fixture items as the task files."""
    code = readme_py_block("from llmjax.downstream import")
    assert '"runs/NAME"' in code
    monkeypatch.setenv("LLMJAX_TASK_DIR", str(FIXTURES))
    exec(compile(code.replace('"runs/NAME"', repr(str(bpe_run))), "README.md", "exec"), {})
    acc_norm, rolling = capsys.readouterr().out.splitlines()
    assert 0 <= float(acc_norm) <= 1 and "-" in rolling, (acc_norm, rolling)


def test_trainer_scores_tasks_in_the_loop(bpe_run):
    metrics = [json.loads(line) for line in (bpe_run / "metrics.jsonl").read_text().splitlines()]
    scored = {m["step"]: m for m in metrics if "hellaswag_acc" in m}
    assert sorted(scored) == [2, 4] and all("arc_easy_acc_norm" in m for m in scored.values())
    # the same figures as the standalone scorer on the saved checkpoint (8 sharded devices vs one)
    loaded = E.load_for_scoring(bpe_run)
    out = E.run_fast(loaded, ["hellaswag", "arc_easy"], batch_size=3, limit=12, task_dir=FIXTURES, progress=False)
    for t in ("hellaswag", "arc_easy"):
        assert out["results"][t]["acc,none"] == scored[4][f"{t}_acc"]
        assert out["results"][t]["acc_norm,none"] == scored[4][f"{t}_acc_norm"]


def test_trainer_writes_nan_for_tasks_scored_non_finite(tmp_path, monkeypatch):
    """Non-finite log-likelihoods in the loop (a forward that overflowed) give NaN acc and acc_norm,
    as the validation loss would be, not an accuracy counted from NaN choices, and the run goes on."""
    from llmjax.train import train

    real = Scorer.score

    def nan_scores(self, requests, progress=False):  # (the engine's own batches, then NaN log-likelihoods)
        self.batch_fn = (lambda fn: lambda *a: (np.full(self.batch_size, np.nan), np.asarray(fn(*a)[1])))(self.batch_fn)
        return real(self, requests, progress)

    monkeypatch.setattr(Scorer, "score", nan_scores)
    cfg = llmjax.load_config(
        f"{ROOT}/configs/vanilla.py:tiny",
        {"data.dataset": "tinyshakespeare", "model.vocab_size": 50257, "model.padded_vocab_size": 50304, "model.context_len": 128,
         "train.max_steps": 2, "train.batch_size": 8, "eval.every_steps": 0, "eval.num_batches": 1, "eval.sample_tokens": 0,
         "eval.tasks": "arc_easy", "eval.tasks_limit": 4, "eval.tasks_batch_size": 8, "eval.tasks_dir": str(FIXTURES),
         "logging.progress_bar": False},
    )
    train(cfg, tmp_path / "run", quiet=True)
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 2 and np.isnan(last["arc_easy_acc"]) and np.isnan(last["arc_easy_acc_norm"])


def test_trainer_refuses_tasks_it_cannot_score(tmp_path):
    from llmjax.config import ConfigError
    from llmjax.train import train

    base = {"train.max_steps": 2, "eval.sample_tokens": 0, "logging.progress_bar": False, "eval.tasks_dir": str(FIXTURES)}
    with pytest.raises(ConfigError, match="eval.tasks: .*character-level"):
        train(llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", base | {"eval.tasks": "hellaswag"}), tmp_path / "a", quiet=True)
    with pytest.raises(ConfigError, match="unknown task 'hellaswagg'"):
        train(llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", base | {"eval.tasks": "hellaswagg"}), tmp_path / "b", quiet=True)


def _cli(*args, script=None):
    cmd = [sys.executable, str(script)] if script else [sys.executable, "-m", "llmjax.evaluate"]
    env = {**__import__("os").environ, **OFFLINE}
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)


def test_cli_out_of_device_memory_is_one_line(bpe_run):
    """A --batch_size the device cannot hold (here 10,000 rows of logits over 50,304 tokens: 129 GB,
    which XLA's CPU allocator refuses) says to lower it, in one line; it was XLA's RESOURCE_EXHAUSTED
    traceback. (The process's address space is capped: the refusal must not rest on this machine's
    memory.)"""
    cmd = capped_python(24, "-m", "llmjax.evaluate", f"--checkpoint={bpe_run}", f"--task_dir={FIXTURES}", "--limit=4",
                        "--batch_size=10000", "--tasks=hellaswag", "--scorer=fast")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env={**__import__("os").environ, **OFFLINE})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == "", r.stderr[-2000:]
    assert re.fullmatch(r"error: out of device memory scoring batches of 10000 sequences \(Out of memory allocating \d+ bytes\.\); "
                        r"lower --batch_size", last), last


def test_an_ai2_arc_file_with_unicode_line_separators_reads_as_the_fast_scorer_reads_it(tmp_path):
    """JSON allows U+2028, U+2029 and U+0085 raw inside a string; the fast scorer reads a file by its
    newlines, but the harness's copy in the hub's layout split it with str.splitlines(), which also
    splits there: a JSONDecodeError traceback for a file the fast scorer scored."""
    pytest.importorskip("lm_eval")
    rows = []
    for k, line in enumerate((FIXTURES / "ARC-Easy-test.jsonl").read_text().splitlines()[:3]):
        row = json.loads(line)
        rows.append({"id": row["id"], "answerKey": row["answerKey"], "question": {
            "stem": row["question"] + "\u2028\u2029\x85"[k] + "(see figure)",
            "choices": [{"text": t, "label": lab} for t, lab in zip(row["choices"]["text"], row["choices"]["label"])]}})
    (tmp_path / "ARC-Easy-test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    items = downstream.load_items("arc_easy", tmp_path)
    assert len(items) == 3 and items[2].context.endswith("\x85(see figure)\nAnswer:")
    (tmp_path / "lm-eval").mkdir()
    assert E._local_task_configs(["arc_easy"], tmp_path, tmp_path / "lm-eval") == ["arc_easy"]
    hub = [json.loads(line) for line in (tmp_path / "lm-eval" / "ARC-Easy-test.jsonl").read_text(encoding="utf-8").split("\n") if line]
    assert [downstream._parse_arc(r) for r in hub] == items


def test_a_task_line_nested_past_pythons_recursion_limit_is_one_line(tmp_path):
    """A damaged line that nests deeper than Python's recursion limit (json's decoder recurses) was a
    RecursionError traceback; it is the damaged-file line that other bad JSON gives."""
    good = (FIXTURES / "hellaswag_val.jsonl").read_text().splitlines()
    (tmp_path / "hellaswag_val.jsonl").write_text("\n".join(good[:3] + ["[" * 100000 + "]" * 100000]) + "\n")
    with pytest.raises(downstream.TaskError, match=r"hellaswag_val.jsonl:4 is not a hellaswag item \(maximum recursion depth"):
        downstream.load_items("hellaswag", tmp_path)


def test_cli_harness_and_fast_scorer_agree(bpe_run, tmp_path):
    """Both scorers, on HellaSwag and on ARC-Easy given in AI2's original layout (lm-eval's own task
    reads the hub's: the harness gets a copy in that layout)."""
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hellaswag_val.jsonl").write_text((FIXTURES / "hellaswag_val.jsonl").read_text())
    ai2 = []
    for line in (FIXTURES / "ARC-Easy-test.jsonl").read_text().splitlines():
        row = json.loads(line)
        ai2.append({"id": row["id"], "answerKey": row["answerKey"], "question": {
            "stem": row["question"], "choices": [{"text": t, "label": lab} for t, lab in zip(row["choices"]["text"], row["choices"]["label"])]}})
    (tasks / "ARC-Easy-test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ai2))
    common = ["--tasks=hellaswag,arc_easy", f"--task_dir={tasks}", "--limit=10", "--batch_size=4"]
    r = _cli(f"--checkpoint={bpe_run}", *common, f"--output_json={tmp_path / 'h.json'}", "--device=cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    harness = json.loads(r.stdout)
    assert harness == json.loads((tmp_path / "h.json").read_text())
    r = _cli(f"--checkpoint_path={bpe_run}", *common, "--scorer=fast", script=ROOT / "scripts" / "run_benchmarks.py")
    assert r.returncode == 0, r.stderr[-3000:]
    fast = json.loads(r.stdout)
    for t in ("hellaswag", "arc_easy"):
        for key in ("acc,none", "acc_norm,none"):
            assert harness["results"][t][key] == fast["results"][t][key]
        assert harness["n-samples"][t] == fast["n-samples"][t] == 10
    assert harness["config"]["step"] == 4 and fast["config"]["scorer"] == "fast" and fast["items_per_sec"]["hellaswag"] > 0


def test_local_tasks_run_the_harness_offline(bpe_model, monkeypatch):
    """With local files for every task, lm-eval runs with `datasets` and `huggingface_hub` switched
    offline (their module flags: they read the environment when imported), and both are as they
    were afterwards."""
    lm_eval = pytest.importorskip("lm_eval")
    import datasets.config
    import huggingface_hub.constants

    m, tok = bpe_model
    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    seen = {}

    import lm_eval.evaluator

    def fake(**kw):
        seen["flags"] = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
        seen["git"] = lm_eval.evaluator.get_git_commit_hash()  # (what simple_evaluate records)
        return {"results": {}, "n-samples": {"hellaswag": 2}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    git = lm_eval.evaluator.get_git_commit_hash
    out = E.run_harness(types.SimpleNamespace(model=m, tokenizer=tok), ["hellaswag"], batch_size=2, limit=2, task_dir=FIXTURES)
    assert seen["flags"] == (True, True) and out["n-samples"] == {"hellaswag": 2}
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before
    # lm-eval's `git describe` of the current folder (not llmjax's; outside a repository git said 'fatal: not a
    # git repository' on stderr) is not run, and is lm-eval's own again afterwards
    assert seen["git"] is None and lm_eval.evaluator.get_git_commit_hash is git


def test_the_harness_indexes_lm_evals_own_tasks_only_where_one_is_asked(bpe_model, monkeypatch):
    """Every task from local files: lm-eval's TaskManager is made without lm-eval's own task folder
    (indexing its 14,683 tasks took 10-15 s of every such run; the local YAMLs include the two tasks'
    own files by path). A task that is not local needs that index."""
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.tasks

    made = []

    class Recorded(Exception):
        pass

    def record(**kw):
        made.append(kw.get("include_defaults", True))
        raise Recorded

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", record)
    m, tok = bpe_model
    for tasks in (["hellaswag", "arc_easy"], ["hellaswag", "piqa"]):
        with pytest.raises(Recorded):
            E.run_harness(types.SimpleNamespace(model=m, tokenizer=tok), tasks, batch_size=2, limit=2, task_dir=FIXTURES)
    assert made == [False, True]


def test_the_harness_reads_a_task_file_replaced_with_the_same_mtime(tmp_path, monkeypatch):
    """lm-eval's task reads a local file through `datasets`, whose shared cache knows a file by its
    path and mtime: a file replaced by another of the same mtime (cp -p, rsync -a, tar) was scored
    as the old one, while the fast scorer read the new. Each run now reads the file as it is."""
    pytest.importorskip("lm_eval")
    import os

    from lm_eval.tasks import TaskManager

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    lines = (FIXTURES / "hellaswag_val.jsonl").read_text().splitlines()
    file = tmp_path / "tasks" / "hellaswag_val.jsonl"
    file.parent.mkdir()

    def harness_docs(rows):
        file.write_text("\n".join(rows) + "\n")
        os.utime(file, (1e9, 1e9))  # (the same mtime each time)
        folder = tmp_path / f"yaml{len(rows)}"
        folder.mkdir()
        E._local_task_configs(["hellaswag"], file.parent, folder)
        task = TaskManager(include_path=str(folder), include_defaults=False).load(["hellaswag"])["tasks"]["hellaswag"]
        return [(d["query"], d["choices"], d["gold"]) for d in task.eval_docs]

    for rows in (lines[:3], lines[5:7]):
        got = harness_docs(rows)
        assert got == [(it.context, list(it.choices), it.gold) for it in downstream.load_items("hellaswag", file.parent)]


def test_registered_model_loads_a_checkpoint(bpe_run):
    pytest.importorskip("lm_eval")
    import llmjax.harness  # noqa: F401  (registers the model)
    from lm_eval.api.registry import get_model

    cls = get_model("llmjax")
    lm = cls.create_from_arg_string(f"checkpoint={bpe_run},batch_size=4,dtype=float32", {"device": "cpu"})
    assert lm.step == 4 and lm.batch_size == 4 and lm.max_length == 128 and lm.eot_token_id == 50256
    with pytest.raises(ValueError, match="batch_size must be a whole number"):
        cls.create_from_arg_string(f"checkpoint={bpe_run},batch_size=many")


def test_model_arguments_that_would_be_ignored_are_refused(tmp_path):
    """A misspelt model argument was accepted and ignored (`whcih=best` scored the latest checkpoint,
    `dtpye=bfloat16` float32), as were checkpoint options beside an in-memory model: one line each,
    before anything loads. What lm-eval itself adds (max_batch_size, trust_remote_code) is taken."""
    pytest.importorskip("lm_eval")
    import llmjax.harness  # noqa: F401  (registers the model)
    from lm_eval.api.registry import get_model

    cls = get_model("llmjax")
    nowhere = tmp_path / "no-run"
    for args, needle in [("whcih=best", r"unknown llmjax model argument 'whcih' \(did you mean 'which'\?\); it takes checkpoint, "),
                         ("dtpye=bfloat16", r"'dtpye' \(did you mean 'dtype'\?\)"),
                         (f"checkpoint_path={tmp_path / 'other'}", "name two runs; give one")]:
        with pytest.raises(ValueError, match=needle):
            cls.create_from_arg_string(f"checkpoint={nowhere},{args}", {"batch_size": 4, "max_batch_size": 64, "device": "cpu"})
    m, tok = model("vanilla", vocab_size=50257, padded_vocab_size=50304), GPT2Tokenizer()
    for kw in ({"dtype": "bfloat16"}, {"which": "best"}, {"checkpoint": str(nowhere)}, {"quantize": "int8"}):
        with pytest.raises(ValueError, match=f"^{next(iter(kw))} applies to a checkpoint; an in-memory model is scored as it is"):
            cls(model=m, tokenizer=tok, **kw)
    lm = cls(model=m, tokenizer=tok, batch_size="4", max_batch_size=64, trust_remote_code=True, device="cpu", seed=3, max_gen_toks=8)
    assert lm.batch_size == 4 and lm.max_gen_toks == 8
    # a seed generate_until cannot use is refused when the model is made: a negative one was taken, then
    # failed at the first generate_until (numpy's "expected non-negative integer", after every task before it)
    for seed, needle in [(-1, r"^seed must be >= 0, got -1$"), ("abc", r"^seed must be a whole number, got 'abc'$")]:
        with pytest.raises(ValueError, match=needle):
            cls(model=m, tokenizer=tok, seed=seed)
    assert cls(model=m, tokenizer=tok, seed=0).seed == 0


def test_the_printed_config_says_whether_the_token_table_was_quantized(monkeypatch):
    """`--quantize int8` with and without `--quantize_embeddings` score different models (an int8 token
    table too); the JSON's config said "quantize": "int8" for both."""
    m = types.SimpleNamespace(cfg=types.SimpleNamespace(arch="vanilla", dtype="float32"))
    loaded = types.SimpleNamespace(model=m, tokenizer=GPT2Tokenizer(), path="runs/x", step=3)
    seen = []
    monkeypatch.setattr(E, "load_for_scoring", lambda *a, **kw: seen.append(kw["quantize_embeddings"]) or loaded)
    monkeypatch.setattr(E, "run_fast", lambda *a, **kw: {})
    for flag in (False, True):
        args = types.SimpleNamespace(tasks="hellaswag", batch_size=2, limit=None, scorer="fast", device="cpu", checkpoint_path="runs/x",
                                     which="latest", dtype=None, task_dir=str(FIXTURES), num_fewshot=None, output_json=None,
                                     quantize="int8", quantize_embeddings=flag)
        config = E.evaluate(args)["config"]
        assert (config["quantize"], config["quantize_embeddings"]) == ("int8", flag)
    assert seen == [False, True]


def test_cli_errors_are_one_line(bpe_run, tmp_path):
    args = types.SimpleNamespace(tasks="hellaswag", batch_size=2, limit=None, scorer="fast", device="cuda:0", checkpoint_path=str(bpe_run),
                                 which="latest", dtype=None, task_dir=str(FIXTURES), num_fewshot=None, output_json=None)
    if jax.default_backend() == "cpu":
        with pytest.raises(E.EvalError, match="--device=cuda:0: JAX has no gpu backend"):
            E.evaluate(args)
    (tmp_path / "afile").write_text("x")
    damaged = tmp_path / "damaged"  # (a file lm-eval would fail on with a traceback)
    damaged.mkdir()
    (damaged / "hellaswag_val.jsonl").write_text("\n".join((FIXTURES / "hellaswag_val.jsonl").read_text().splitlines()[:2] + ['{"ctx_a": "x"']))
    for change, needle in [({"tasks": "mmlu"}, "unknown task 'mmlu'"), ({"device": "tpux"}, "use cuda"), ({"tasks": " "}, "--tasks is empty"),
                           ({"device": "cpu:99"}, "there are only"),
                           # (one line for both said neither which flag nor what to do)
                           ({"batch_size": 0}, r"^--batch_size must be >= 1, got 0$"),
                           ({"limit": 0}, r"^--limit must be >= 1, got 0; drop --limit to score every item$"),
                           ({"limit": -3}, r"^--limit must be >= 1, got -3; drop --limit"),
                           ({"output_json": str(tmp_path)}, "is a folder; give a file name"),
                           ({"output_json": str(tmp_path / "afile" / "m.json")}, "is a file, not a folder"),
                           # (a file as the task directory was "cannot use ... as the task directory (File exists); pass a folder")
                           ({"device": "cpu", "task_dir": str(tmp_path / "afile"), "tasks": "arc_easy"},
                            r"^the task directory .*afile is a file; give the folder that holds ARC-Easy-test.jsonl \(this file named "
                            r"ARC-Easy-test.jsonl, or a copy by that name\)$"),
                           ({"device": "cpu", "task_dir": str(damaged / "hellaswag_val.jsonl"), "tasks": "hellaswag"},
                            rf"^the task directory .*hellaswag_val.jsonl is a file; give the folder that holds hellaswag_val.jsonl \({re.escape(str(damaged))}\)$"),
                           ({"device": "cpu", "scorer": "harness", "num_fewshot": 1, "limit": 2}, "--num_fewshot=1 with hellaswag: .*use --num_fewshot=0"),
                           # the fast scorer is 0-shot: a few-shot request was scored 0-shot, with nothing said
                           ({"device": "cpu", "num_fewshot": 5}, r"^--num_fewshot=5: the fast scorer scores 0-shot only; drop --num_fewshot or use --scorer=harness$"),
                           ({"device": "cpu", "scorer": "harness", "num_fewshot": -1}, r"^--num_fewshot must be >= 0, got -1$"),
                           ({"device": "cpu", "scorer": "harness", "task_dir": str(damaged)}, r"hellaswag_val.jsonl:3 is not a hellaswag item"),
                           # a task whose data is on the hub, offline: was datasets' ConnectionError traceback
                           ({"device": "cpu", "scorer": "harness", "tasks": "arc_challenge", "limit": 2},
                            r"^arc_challenge: Couldn't reach .*from the Hugging Face hub: .* or score hellaswag and arc_easy \(local files\)$")]:
        with pytest.MonkeyPatch.context() as mp:
            for mod, name in E.offline_flags():  # (no network, whatever this machine has)
                mp.setattr(mod, name, True)
            with pytest.raises((E.EvalError, downstream.TaskError), match=needle):
                E.evaluate(types.SimpleNamespace(**(vars(args) | change)))
    r = _cli(f"--checkpoint={tmp_path / 'nope'}", "--scorer=fast")
    assert r.returncode == 2 and r.stderr.startswith("error: no such run") and r.stderr.count("\n") == 1, r.stderr


def test_an_empty_file_or_folder_flag_is_one_line(tmp_path):
    """`--output_json=` (or `--output_json "$F"` with F unset) was read as no --output_json: the scores
    printed, no file written, exit status 0; so were bench's --out and --profile, and --task_dir was
    the default folder, prepare's --out the data folder's, train's --workdir the default runs/<config>,
    compare's --out the folder it was run from. Each is refused in one line, before
    anything loads or is written (no run is needed: the checkpoint is never read)."""
    from helpers import cli_runs

    nowhere = str(tmp_path / "nowhere")
    cases = [("llmjax.evaluate", [f"--checkpoint={nowhere}", "--output_json="], "--output_json"),
             ("scripts/run_benchmarks.py", [f"--checkpoint={nowhere}", "--scorer=fast", "--task_dir", ""], "--task_dir"),
             ("llmjax.bench", ["--config=configs/vanilla.py:tiny", "--out="], "--out"),
             ("llmjax.bench", ["--config=configs/vanilla.py:tiny", "--profile="], "--profile"),
             ("llmjax.bench", ["--all", "--doc="], "--doc"),
             ("llmjax.prepare", ["mytext", f"--source={FIXTURES / 'hellaswag_val.jsonl'}", "--out="], "--out"),
             # (the trainer trained in the default runs/<config> instead; compare wrote its runs and results where it was run)
             ("llmjax.train", ["--config=configs/vanilla.py:tiny", "--workdir="], "--workdir"),
             ("llmjax.compare", ["--configs=configs/vanilla.py:tiny", "--out="], "--out"),
             ("llmjax.compare", ["--configs=configs/vanilla.py:tiny", "--task_dir="], "--task_dir")]
    for (module, args, flag), r in zip(cases, cli_runs([(module, args) for module, args, _ in cases])):
        assert (r.returncode, r.stdout) == (2, ""), (module, args, r.stderr[-2000:])
        assert re.fullmatch(rf"error: {flag} is empty \(a shell variable that was not set\?\); give .*, or drop {flag}\n", r.stderr), r.stderr
    assert not (ROOT / "data" / "mytext").exists()


def test_an_offline_hub_task_is_one_line(bpe_model, monkeypatch, capfd, caplog):
    """The harness on a task whose data is on the hub, offline: huggingface_hub logged a warning for
    each of its tries (six in about 23 s, each twice: its handler's line and absl's), 22 lines on the
    terminal before our one-line error. Scoring holds the hub's logger to errors, and leaves it as it was."""
    pytest.importorskip("lm_eval")
    import logging

    import huggingface_hub.utils._http as hub_http  # (its import gives the hub's logger its level and stderr handler)
    import lm_eval
    import lm_eval.tasks

    class Tasks:  # (lm-eval's own index of every task takes seconds to build)
        all_tasks = ["arc_challenge"]

        def __init__(self, include_path=None, include_defaults=True):
            pass

    def offline(**kw):  # (as `datasets` does through the hub: its _http module's warning, then the error)
        hub_http.logger.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD .../ai2_arc/resolve/main/README.md")
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Tasks)
    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    m, tok = bpe_model
    with caplog.at_level(logging.WARNING), pytest.raises(E.EvalError, match=r"^arc_challenge: Couldn't reach .* \(local files\)$"):
        E.run_harness(types.SimpleNamespace(model=m, tokenizer=tok), ["arc_challenge"], batch_size=2, limit=2, task_dir=FIXTURES)
    assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")], caplog.text
    assert capfd.readouterr().err == "" and hub_log.level == level


def test_a_task_named_twice_is_scored_once(bpe_model, monkeypatch):
    """`--scorer=fast --tasks hellaswag,hellaswag` scored HellaSwag twice (twice the time; the JSON held
    it once), where the harness scores it once."""
    m, tok = bpe_model
    calls = []
    real = Scorer.score
    monkeypatch.setattr(Scorer, "score", lambda self, reqs, progress=False: calls.append(len(reqs)) or real(self, reqs, progress))
    out = E.run_fast(types.SimpleNamespace(model=m, tokenizer=tok), ["hellaswag", " hellaswag", "arc_easy", "hellaswag"], batch_size=8, limit=2,
                     task_dir=FIXTURES, progress=False)
    assert calls == [4 * 2, sum(len(it.choices) for it in downstream.load_items("arc_easy", FIXTURES, limit=2))]  # (one call a task)
    assert list(out["results"]) == ["hellaswag", "arc_easy"] and out["n-samples"] == {"hellaswag": 2, "arc_easy": 2}
