"""Dataset preparation, offline: txt / jsonl / parquet fixtures -> shards that decode back to the
source documents, held-out and given validation splits, resuming after an interruption gives the
same bytes, damaged shards are caught, and the command line's one-line errors."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from llmjax import data as D
from llmjax import prepare as P
from llmjax.config import ConfigError
from llmjax.tokenizer import GPT2Tokenizer, gpt2_encoding

EOT = "<|endoftext|>"
WORDS = "the cat sat on a mat and ran to town with a big red hat, naïve café 東京 🙂 — \"quoted\" 123 over\tunder".split(" ")


def make_docs(n: int, seed: int = 0, long: int = 200) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, long)))
        docs.append(("\n" if i % 4 == 1 else "") + text + ("\n\n" if i % 3 else ""))
    return docs


def write_sources(tmp_path, docs, name="docs"):
    txt = tmp_path / f"{name}.txt"
    txt.write_text(EOT.join(docs) + EOT + "\n", encoding="utf-8")  # the trailing blank piece is not a document
    jsonl = tmp_path / f"{name}.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), parquet, row_group_size=37)
    return txt, jsonl, parquet


def files(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.name.endswith(".bin")}


def decoded(ds, split):
    return GPT2Tokenizer().decode(np.concatenate([np.asarray(s) for s in ds.split(split)]))


@pytest.fixture(scope="module")
def docs():
    return make_docs(300)


def test_txt_jsonl_parquet_decode_back_to_the_documents(tmp_path, docs):
    srcs = write_sources(tmp_path, docs)
    streams = []
    for src in srcs:
        out = tmp_path / f"out_{src.suffix[1:]}"
        ds = P.prepare("mine", out, [P.Source(src, None)], workers=2, shard_tokens=3000, progress=False)
        n_val = ds.manifest["validation"]["held_out_tail_documents"]
        assert ds.manifest["validation"]["documents"] == 300 and 1 <= n_val <= 9  # about 1% of the text
        assert decoded(ds, "train") == "".join(EOT + d for d in docs[:-n_val])
        assert decoded(ds, "val") == "".join(EOT + d for d in docs[-n_val:])
        assert all(s["tokens"] == 3000 for s in ds.manifest["splits"]["train"][:-1])
        assert ds.tokenizer().eot_id == 50256
        streams.append(np.concatenate([np.asarray(s) for sp in ("train", "val") for s in ds.split(sp)]))
    np.testing.assert_array_equal(streams[0], streams[1])  # the same documents give the same tokens from any format
    np.testing.assert_array_equal(streams[0], streams[2])
    assert not (tmp_path / "out_txt" / P.STATE).exists()


def test_sources_as_users_have_them(tmp_path, docs):
    """A byte-order mark opening a txt file is not text; parquet's null and blank rows are skipped
    like blank txt/jsonl documents (the three formats give the same tokens); text that is not UTF-8 is
    one line naming the file; a source edited in place, even to the same size, is read again."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt, jsonl, _ = write_sources(tmp_path, docs[:40])
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + txt.read_bytes())
    blanks = tmp_path / "blanks.parquet"
    rows = [d for i, d in enumerate(docs[:40]) for d in ([d, None, "", "  \n"] if i % 7 == 0 else [d])]
    pq.write_table(pa.table({"text": rows}), blanks)
    outs = {src.name: files(tmp_path / f"out_{src.name}") for src in (txt, jsonl, bom, blanks)
            if P.prepare("mine", tmp_path / f"out_{src.name}", [P.Source(src, None)], workers=1, shard_tokens=5000, progress=False)}
    assert outs["bom.txt"] == outs["docs.txt"] == outs["docs.jsonl"] == outs["blanks.parquet"]
    for name, raw in [("latin.txt", "caf\xe9 au lait".encode("latin-1")), ("latin.jsonl", b'{"text": "caf\xe9"}\n')]:
        (tmp_path / name).write_bytes(raw + raw)
        with pytest.raises(P.PrepareError, match=rf"{name} is not UTF-8 text .*iconv"):
            P.prepare("mine", tmp_path / ("o_" + name), [P.Source(tmp_path / name, None)], workers=1, progress=False)
    edited = tmp_path / "edited.txt"
    edited.write_text(EOT.join(docs[:40]).replace("cat", "dog") + EOT)
    first = P.prepare("mine", tmp_path / "ed", [P.Source(edited, None)], workers=1, shard_tokens=5000, progress=False)
    assert "dog" in decoded(first, "train")
    time.sleep(0.01)
    edited.write_text(edited.read_text().replace("dog", "cow"))  # same size, new content
    with pytest.raises(P.PrepareError, match="already holds a prepared dataset from other sources"):
        P.prepare("mine", tmp_path / "ed", [P.Source(edited, None)], workers=1, shard_tokens=5000, progress=False)


def test_text_in_another_encoding_is_refused_with_the_conversion_that_fits(tmp_path):
    """UTF-16 text (Windows PowerShell's `>` writes it) is refused with the iconv that converts it, not
    latin1's (which gave a NUL after each character); without a byte-order mark it was prepared as
    that silently (it decodes as UTF-8). A byte that is not UTF-8, or a NUL, is located in the file."""
    text = "one document\nof two lines" + EOT + "and another one\n"
    val = tmp_path / "val.txt"
    val.write_text("held out text")
    cases = {"bom16.txt": (b"\xff\xfe" + text.encode("utf-16-le"), "is UTF-16 text .*iconv -f utf-16 -t utf-8 "),
             "bom16.jsonl": ('{"text": "hi"}\n'.encode("utf-16"), "is UTF-16 text .*iconv -f utf-16 -t utf-8 "),
             "le16.txt": (text.encode("utf-16-le"), r"holds a NUL byte at byte 1 \(line 1\).*iconv -f utf-16le -t utf-8 "),
             "latin.txt": ("first line\nsecond\ncaf\xe9 au lait".encode("latin-1"), r"is not UTF-8 text \(0xe9, .* at byte 21 \(line 3\)\).*iconv -f latin1"),
             "end.txt": ("first line\ncaf\xe9".encode("latin-1"), r"is not UTF-8 text \(0xe9 at byte 14 \(line 2\) starts .*iconv -f latin1"),
             # past the first 64 KB (not checked before reading): found as the file is read
             "nul.txt": (b"x y\n" * 20_000 + b"z\0", r"holds a NUL byte at byte 80,001 \(line 20,001\).*tr -d")}
    for name, (raw, needle) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(P.PrepareError, match=rf"{name} {needle}"):
            P.prepare("mine", tmp_path / f"o_{name}", [P.Source(tmp_path / name, "train"), P.Source(val, "val")], workers=1, progress=False)
        assert not (tmp_path / f"o_{name}").exists()


def test_bad_output_folders_and_settings_are_one_line(tmp_path, docs):
    txt, _, _ = write_sources(tmp_path, docs[:20])
    with pytest.raises(P.PrepareError, match="--workers must be at least 1"):
        P.prepare("mine", tmp_path / "w", [P.Source(txt, None)], workers=-1, progress=False)
    (tmp_path / "dm").mkdir()
    (tmp_path / "dm" / D.MANIFEST).write_text("{not json")
    with pytest.raises(P.PrepareError, match="is damaged; delete"):
        P.prepare("mine", tmp_path / "dm", [P.Source(txt, None)], workers=1, progress=False)
    P.prepare("mine", tmp_path / "other", [P.Source(txt, None)], workers=1, progress=False)
    with pytest.raises(D.DataError, match="holds the prepared dataset 'mine', not 'tinyshakespeare_char'"):
        P.prepare("tinyshakespeare_char", tmp_path / "other")
    # a dataset name that is no folder under the data folder: "" prepared into the data folder itself,
    # and "a/../.." made data/a before its refusal
    for name in ("", " mine", "a/../..", "..", "./mine", str(tmp_path / "abs")):
        with pytest.raises(P.PrepareError, match=f"^dataset name {re.escape(repr(name))} is no folder name under the data folder; "):
            P.prepare(name, tmp_path / "data" / name, [P.Source(txt, None)], workers=1, progress=False)
    assert not (tmp_path / "data").exists() and not (tmp_path / "abs").exists()


def test_held_out_tail_is_one_percent_of_the_text_and_at_least_one_document(tmp_path):
    docs = ["short"] * 50 + ["x" * 40_000]  # the last document alone is far more than 1%
    txt = tmp_path / "a.txt"
    txt.write_text(EOT.join(docs))
    ds = P.prepare("mine", tmp_path / "o", [P.Source(txt, None)], workers=1, shard_tokens=10**6, progress=False)
    assert ds.manifest["validation"]["held_out_tail_documents"] == 1
    docs = [f"document {i} " * 10 for i in range(1000)]  # equal sizes: the last 1% of bytes is the last 10 documents
    txt.write_text(EOT.join(docs))
    ds = P.prepare("mine", tmp_path / "o2", [P.Source(txt, None)], workers=1, shard_tokens=10**6, progress=False)
    assert 9 <= ds.manifest["validation"]["held_out_tail_documents"] <= 11
    # skipped records (blank documents, null texts and rows) count as the bytes they take: the same
    # tail (it fell to one document when they were left out of the count)
    import pyarrow as pa
    import pyarrow.parquet as pq

    gappy = {"b.txt": lambda p: p.write_text(EOT.join(d + EOT + "\n\n" for d in docs)),
             "b.jsonl": lambda p: p.write_text("".join(json.dumps({"text": d}) + "\n" + '{"text": null}\n\n' for d in docs)),
             "b.parquet": lambda p: pq.write_table(pa.table({"text": [x for d in docs for x in (d, None, " ")]}), p)}
    for name, write in gappy.items():
        write(tmp_path / name)
        ds = P.prepare("mine", tmp_path / f"o_{name}", [P.Source(tmp_path / name, None)], workers=1, shard_tokens=10**6, progress=False)
        assert 9 <= ds.manifest["validation"]["held_out_tail_documents"] <= 11, name
    # a parquet row's share is its text's, not one row's: ten long rows at the end are the last 1%
    rows = ["few words here " * 3] * 990 + ["many words " * 2500] * 10
    pq.write_table(pa.table({"text": rows}), tmp_path / "skew.parquet")
    ds = P.prepare("mine", tmp_path / "o_skew", [P.Source(tmp_path / "skew.parquet", None)], workers=1, shard_tokens=10**6, progress=False)
    assert ds.manifest["validation"]["held_out_tail_documents"] == 1  # (by rows it was 10: 40% of the tokens)


def _tokens(ds):
    return np.concatenate([np.asarray(s) for sp in ("train", "val") for s in ds.split(sp)])


def test_long_txt_documents_come_in_pieces_with_the_same_tokens(tmp_path, monkeypatch):
    """A .txt document longer than PIECE_CHARS is read in pieces, cut where GPT-2's tokens do not
    change: a file without end-of-text separators (a book) streams in bounded memory, gives exactly
    the tokens of the whole text, and its held-out tail is its last 1% (it was the whole file)."""
    enc = gpt2_encoding()
    book = (ROOT / "llmjax" / "assets" / "tinyshakespeare.txt").read_text()
    (tmp_path / "book.txt").write_text(book)
    ds = P.prepare("mine", tmp_path / "o", [P.Source(tmp_path / "book.txt", None)], workers=2, shard_tokens=10**5, progress=False)
    np.testing.assert_array_equal(_tokens(ds), [enc.eot_token] + enc.encode_ordinary(book))
    assert ds.manifest["validation"] == {"held_out_tail_documents": 1, "documents": 1}
    assert 0.009 < ds.num_tokens("val") / ds.num_tokens("train") < 0.012
    # short pieces, and whitespace where a cut could change the tokens (runs of spaces, tabs, CRLF,
    # leading and trailing blanks): the same tokens as the jsonl of the same documents, which is not cut
    monkeypatch.setattr(P, "PIECE_CHARS", 300)
    # (and a blank document longer than a piece: skipped, as in every format; its pieces were kept)
    docs = make_docs(60, seed=2, long=300)
    docs = docs[:30] + [" \n\t" * 250] + docs[30:] + ["   lead" + " x  y\t\tz \r\nw" * 80 + "\n\n\n   "]
    txt, jsonl, _ = write_sources(tmp_path, docs, "long")
    txt_ds, jsonl_ds = (P.prepare("m", tmp_path / f"o_{src.suffix[1:]}", [P.Source(src, None)], workers=2, shard_tokens=997,
                                  progress=False) for src in (txt, jsonl))
    np.testing.assert_array_equal(_tokens(txt_ds), _tokens(jsonl_ds))
    assert txt_ds.manifest["validation"]["documents"] == jsonl_ds.manifest["validation"]["documents"] == len(docs) - 1
    share = {k: len(decoded(d, "val").encode()) / txt.stat().st_size for k, d in (("txt", txt_ds), ("jsonl", jsonl_ds))}
    assert 0.0095 < share["txt"] < 0.0102 and share["jsonl"] > 0.02  # the last 1% of the bytes (less the final separator), though the last document is 2%
    # no space or line break after a character for longer than a piece (even a blank one): cut there,
    # so the tokens may differ, the text not
    dense = ["short", "東京🙂x" * 400, "\n" * 700 + "end"]
    (tmp_path / "dense.txt").write_text(EOT.join(dense))
    ds = P.prepare("m", tmp_path / "o_dense", [P.Source(tmp_path / "dense.txt", None)], workers=1, shard_tokens=10**5, progress=False)
    assert decoded(ds, "train") + decoded(ds, "val") == "".join(EOT + d for d in dense)


def test_long_txt_documents_with_runs_of_whitespace_are_cut_where_the_tokens_do_not_change(tmp_path, monkeypatch):
    """Code, poems and markdown hold long runs of line breaks and spaces: a piece cut inside one (or
    the held-out tail's cut at its mark) changed GPT-2's tokens ("\\n\\n" is one token), which the
    documents above, with runs of two at most, never showed. The tokens are tiktoken's of each whole
    document, whatever the pieces, batches and workers."""
    enc = gpt2_encoding()
    monkeypatch.setattr(P, "PIECE_CHARS", 300)
    monkeypatch.setattr(P, "BATCH_BYTES", 3000)  # (several batches, in two workers)
    for seed in range(4):  # (the held-out tail's cut falls elsewhere in each)
        rng = random.Random(seed)
        docs = ["".join(" " * rng.randint(0, 9) + " ".join(rng.choice(WORDS[:12]) for _ in range(rng.randint(1, 8)))
                        + rng.choice(["\n" * rng.randint(1, 30), " " * rng.randint(1, 30) + "\n"]) for _ in range(rng.randint(30, 120)))
                for _ in range(10)]
        txt = tmp_path / f"code{seed}.txt"
        txt.write_text(EOT.join(docs))
        ds = P.prepare("m", tmp_path / f"o{seed}", [P.Source(txt, None)], workers=2, shard_tokens=1000, progress=False)
        np.testing.assert_array_equal(_tokens(ds), [t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)])


def test_a_long_txt_document_in_a_later_source_is_cut_at_the_last_percent_of_all_sources(tmp_path):
    """The held-out tail's cut in a long .txt document (a book) is where the last 1% of the bytes of
    all the sources starts, counted from the start of the first: the book after a file of short
    documents is cut there, not at the end of its last piece (PIECE_CHARS, here 2% of the text)."""
    enc = gpt2_encoding()
    docs = make_docs(60, seed=4)
    book = (ROOT / "llmjax" / "assets" / "tinyshakespeare.txt").read_text()[:200_000]
    (tmp_path / "a.txt").write_text(EOT.join(docs))
    (tmp_path / "book.txt").write_text(book)
    ds = P.prepare("m", tmp_path / "o", [P.Source(tmp_path / "a.txt", None), P.Source(tmp_path / "book.txt", None)], workers=2,
                   shard_tokens=10**5, progress=False)
    np.testing.assert_array_equal(_tokens(ds), [t for d in docs + [book] for t in [enc.eot_token] + enc.encode_ordinary(d)])
    share = len(decoded(ds, "val").encode()) / sum((tmp_path / f).stat().st_size for f in ("a.txt", "book.txt"))
    assert 0.0095 < share < 0.0105, share


def test_given_validation_split_and_idempotence(tmp_path, docs):
    train, _, _ = write_sources(tmp_path, docs[:200], "train")
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[200:]))
    sources = [P.Source(train, "train"), P.Source(val, "val")]
    ds = P.prepare("tinystories", tmp_path / "out", sources, workers=1, shard_tokens=10**6, progress=False)
    assert decoded(ds, "train") == "".join(EOT + d for d in docs[:200])
    assert decoded(ds, "val") == "".join(EOT + d for d in docs[200:])
    assert "validation" not in ds.manifest
    before = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    P.prepare("tinystories", tmp_path / "out", sources, workers=1, shard_tokens=10**6, progress=False)  # already done
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(P.PrepareError, match="other sources"):
        P.prepare("tinystories", tmp_path / "out", sources[:1], workers=1, shard_tokens=10**6, progress=False)
    # val= given before train= (the order of the flags): the same shards, the training split's last
    # partial one included (a validation batch first closed the training split before it began)
    small = [P.prepare("tinystories", tmp_path / f"small{i}", order, workers=1, shard_tokens=3000, progress=False)
             for i, order in enumerate((sources, sources[::-1]))]
    assert files(small[1].path) == files(small[0].path) and small[1].manifest["splits"] == small[0].manifest["splits"]
    assert decoded(small[1], "train") == "".join(EOT + d for d in docs[:200])


def test_a_folder_prepared_otherwise_says_what_differs(tmp_path, docs):
    """Another dataset name or --shard_tokens over a prepared folder was refused as 'from other
    sources', with the same sources."""
    txt, jsonl, _ = write_sources(tmp_path, docs[:20])
    out = tmp_path / "o"
    P.prepare("mine", out, [P.Source(txt, None)], workers=1, shard_tokens=5000, progress=False)
    for name, sources, size, needle in [("mine", [txt], 4000, "from the same sources with --shard_tokens 5000;"),
                                        ("yours", [txt], 5000, "named 'mine', not 'yours';"),
                                        ("mine", [jsonl], 5000, f"from other sources \\({txt}\\);")]:
        with pytest.raises(P.PrepareError, match=f"already holds a prepared dataset {needle} use another --out or delete it"):
            P.prepare(name, out, [P.Source(s, None) for s in sources], workers=1, shard_tokens=size, progress=False)


def test_interrupted_then_resumed_gives_the_same_bytes(tmp_path, monkeypatch):
    docs = make_docs(400, seed=1, long=400)
    txt, _, parquet = write_sources(tmp_path, docs)
    monkeypatch.setattr(P, "BATCH_BYTES", 20_000)  # many batches, so shards end inside batches
    monkeypatch.setattr(P, "PIECE_CHARS", 700)  # and the longer .txt documents come in pieces
    for src in (txt, parquet):
        ref = tmp_path / f"ref_{src.suffix[1:]}"
        ds = P.prepare("x", ref, [P.Source(src, None)], workers=2, shard_tokens=4000, progress=False)
        # (many batches in two workers, pieces and shards ending inside batches: tiktoken's tokens of each whole document; the
        # resumed runs are compared with this one alone, which one batch in a worker's place, or a piece taken to start a
        # document, would pass)
        enc = gpt2_encoding()
        np.testing.assert_array_equal(_tokens(ds), [t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)])
        out = tmp_path / f"resumed_{src.suffix[1:]}"
        for stop in (2, 5, 9, 10):  # interrupted right after the 2nd, 5th, ... shard, then run again
            with pytest.raises(KeyboardInterrupt):
                P.prepare("x", out, [P.Source(src, None)], workers=2, shard_tokens=4000, progress=False, stop_after_shards=stop)
            assert not (out / "manifest.json").exists()
            with pytest.raises(D.DataError, match="no dataset"):
                D.TokenDataset.open(out)
        state = json.loads((out / P.STATE).read_text())
        assert len(state["train"]) == 10
        P.prepare("x", out, [P.Source(src, None)], workers=2, shard_tokens=4000, progress=False)
        assert files(out) == files(ref) and len(files(ref)) > 12
        assert json.loads((out / "manifest.json").read_text())["splits"] == json.loads((ref / "manifest.json").read_text())["splits"]
    # a state written by a version that counted whole .txt documents (no piece size in its args) is
    # started afresh: its document index would point elsewhere among today's records
    with pytest.raises(KeyboardInterrupt):
        P.prepare("x", tmp_path / "old", [P.Source(txt, None)], workers=2, shard_tokens=4000, progress=False, stop_after_shards=5)
    state = json.loads((tmp_path / "old" / P.STATE).read_text())
    del state["args"]["txt_piece_chars"]
    (tmp_path / "old" / P.STATE).write_text(json.dumps(state))
    seen = []
    real = P.tokenize
    monkeypatch.setattr(P, "tokenize", lambda stream, **kw: seen.append(dict(kw["state"])) or real(stream, **kw))
    P.prepare("x", tmp_path / "old", [P.Source(txt, None)], workers=2, shard_tokens=4000, progress=False)
    assert "resume" not in seen[0] and "train" not in seen[0]
    assert files(tmp_path / "old") == files(tmp_path / "ref_txt")


def test_an_unfinished_preparation_started_afresh_says_so(tmp_path, docs, capsys):
    """The same name prepared again with another --shard_tokens (or another source path) into a
    folder holding an unfinished preparation: it starts afresh, as it must (its shards and records
    would not match), but its finished shards were deleted with no word. Now one line says so and
    gives the command that would have resumed it."""
    own, _, _ = write_sources(tmp_path, docs[:60])
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        P.prepare("mine", out, [P.Source(own, None)], workers=1, shard_tokens=1000, progress=False, stop_after_shards=5)
    capsys.readouterr()
    ds = P.prepare("mine", out, [P.Source(own, None)], workers=1, shard_tokens=3000, progress=False)
    err = capsys.readouterr().err
    assert err == (f"prepare: {out} holds an unfinished preparation from the same sources with --shard_tokens 1000; starting afresh: "
                   f"its 5 finished shard(s) are prepared again (the command that resumes it instead: python -m llmjax.prepare mine "
                   f"--out {out} --shard_tokens 1000 --source {own})\n"), err
    # the old preparation's shards that the new one has fewer of are gone, not left beside the dataset
    assert sorted(files(out)) == sorted(s["file"] for sp in ("train", "val") for s in ds.manifest["splits"][sp])
    assert len(ds.manifest["splits"]["train"]) < 5
    P.prepare("mine", tmp_path / "again", [P.Source(own, None)], workers=1, shard_tokens=3000, progress=False)
    assert capsys.readouterr().err == ""  # (nothing said for a new folder)


def _wait_for_shards(proc, out, n: int) -> None:
    """Until the preparation writing `out` has recorded `n` finished training shards (or ended)."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(json.loads((out / P.STATE).read_text()).get("train", [])) >= n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)


def test_killed_process_resumes_to_the_same_bytes(tmp_path):
    """SIGKILL at an arbitrary moment (after some shards), then the same command again."""
    docs = make_docs(3000, seed=2, long=300)
    txt, _, _ = write_sources(tmp_path, docs)
    args = [sys.executable, "-m", "llmjax.prepare", "mine", f"--source={txt}", "--shard_tokens=20000", "--workers=2", "--noprogress"]
    ref = tmp_path / "ref"
    assert subprocess.run(args + [f"--out={ref}"], capture_output=True, cwd=ROOT, timeout=300).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen(args + [f"--out={out}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_shards(proc, out, 3)
    killed = proc.poll() is None
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if killed:
        assert not (out / "manifest.json").exists()
    r = subprocess.run(args + [f"--out={out}"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert files(out) == files(ref)
    assert not [f for f in out.iterdir() if f.name.endswith(".tmp")]


def test_damaged_shards_are_caught(tmp_path, docs):
    txt, _, _ = write_sources(tmp_path, docs)
    out = tmp_path / "out"
    P.prepare("mine", out, [P.Source(txt, None)], workers=1, shard_tokens=3000, progress=False)
    shard = out / "train_0001.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:-10])
    with pytest.raises(D.DataError, match="truncated"):
        D.TokenDataset.open(out).split("train")
    shard.write_bytes(b"XXXXXXXX" + good[8:])
    with pytest.raises(D.DataError, match="bad magic"):
        D.TokenDataset.open(out).split("train")
    shard.write_bytes(good)
    D.TokenDataset.open(out).split("train")
    # a damaged finished shard of an interrupted preparation is redone, not trusted
    out2 = tmp_path / "out2"
    with pytest.raises(KeyboardInterrupt):
        P.prepare("mine", out2, [P.Source(txt, None)], workers=1, shard_tokens=3000, progress=False, stop_after_shards=3)
    (out2 / "train_0000.bin").write_bytes(b"junk")
    P.prepare("mine", out2, [P.Source(txt, None)], workers=1, shard_tokens=3000, progress=False)
    assert files(out2) == files(out)


def test_trained_on_a_prepared_dataset(tmp_path, docs, monkeypatch):
    """The trainer reads what prepare writes (GPT-2 vocabulary, by dataset name under data.dir)."""
    import llmjax
    from llmjax.train import train

    txt, _, _ = write_sources(tmp_path, docs)
    P.prepare("mystories", tmp_path / "data" / "mystories", [P.Source(txt, None)], workers=1, shard_tokens=5000, progress=False)
    over = {"data.dataset": "mystories", "data.dir": str(tmp_path / "data"), "model.vocab_size": 50257, "model.padded_vocab_size": 50304,
            "model.context_len": 32, "train.max_steps": 3, "train.batch_size": 8, "eval.num_batches": 1, "eval.sample_tokens": 0,
            "logging.progress_bar": False}
    cfg = llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", over)
    monkeypatch.delenv("LLMJAX_DATA_DIR")
    run = train(cfg, tmp_path / "run", quiet=True)
    assert run.step == 3 and np.isfinite(run.last_val_loss)
    # a validation split shorter than one window is said before the first step, not at the first evaluation
    val = sum(len(s) for s in D.open_dataset("mystories", str(tmp_path / "data")).split("val"))
    with pytest.raises(ConfigError, match=f"dataset 'mystories': the split is shorter than one window of {val + 9} tokens"):
        train(llmjax.load_config(f"{ROOT}/configs/vanilla.py:tiny", {**over, "model.context_len": val + 8}), tmp_path / "run2", quiet=True)
    assert not (tmp_path / "run2").exists()  # (nor the workdir: it was left behind, empty)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "llmjax.prepare", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_text_that_is_no_string_is_one_line(tmp_path):
    """A parquet 'text' column of numbers (or lists), a jsonl 'text' that is a list (a chat format):
    one line naming the file (null texts are skipped, not errors)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "int.parquet")
    pq.write_table(pa.table({"text": [["a"], ["b"]]}), tmp_path / "list.parquet")
    (tmp_path / "chat.jsonl").write_text('{"text": "fine"}\n{"text": null}\n{"text": [{"role": "user", "content": "hi"}]}\n')
    for name, needle in [("int.parquet", "its 'text' column holds int64, not strings"), ("list.parquet", "its .text. column holds list<.*>, not strings"),
                         ("chat.jsonl", "line 3 has a 'text' that is a list, not a string")]:
        with pytest.raises(P.PrepareError, match=rf"{name}: {needle}"):
            P.prepare("mine", tmp_path / f"o_{name}", [P.Source(tmp_path / name, None)], workers=1, progress=False)
        assert not (tmp_path / f"o_{name}").exists()  # (a folder of nothing but a state is not left behind)
    # --out a/b/c made a and b too: all three go, and of kept/x/y only x and y (kept was there before)
    (tmp_path / "kept").mkdir()
    for out, gone, stays in [(tmp_path / "a" / "b" / "c", tmp_path / "a", tmp_path), (tmp_path / "kept" / "x" / "y", tmp_path / "kept" / "x",
                                                                                       tmp_path / "kept")]:
        with pytest.raises(P.PrepareError, match="chat.jsonl: line 3"):
            P.prepare("mine", out, [P.Source(tmp_path / "chat.jsonl", None)], workers=1, progress=False)
        assert not gone.exists() and stays.is_dir()
    assert not any((tmp_path / "kept").iterdir())
    # a folder that was there before is kept (empty, as it was)
    (tmp_path / "mine").mkdir()
    with pytest.raises(P.PrepareError, match="chat.jsonl: line 3"):
        P.prepare("mine", tmp_path / "mine", [P.Source(tmp_path / "chat.jsonl", None)], workers=1, progress=False)
    assert (tmp_path / "mine").is_dir()


def test_a_parquet_text_that_is_not_utf8_names_its_row(tmp_path):
    """Parquet does not check its strings: a row that is no UTF-8 is named, with what to do; it was
    located among the file's compressed bytes as a NUL byte, with the advice to strip them with tr."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [b"first document", b"second"] * 1100 + [b"caf\xe9 au lait", b"last"]  # (the bad row in the second batch of 2048)
    offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int32)
    text = pa.Array.from_buffers(pa.string(), len(rows), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(rows))])
    pq.write_table(pa.table({"text": text}), tmp_path / "bad.parquet")
    with pytest.raises(P.PrepareError, match=r"bad.parquet: row 2,201 of its 'text' column is not UTF-8 text \(0xe9, invalid continuation "
                                             r"byte, at byte 3 of the row\); write the file again with that column decoded to UTF-8"):
        P.prepare("mine", tmp_path / "out", [P.Source(tmp_path / "bad.parquet", None)], workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_bad_later_source_is_refused_before_anything_is_tokenised(tmp_path, docs, monkeypatch):
    """A source of an unknown type, or a parquet file without a 'text' column, after a good one: refused
    at once, not once the sources before it are tokenised (hours, for a corpus), and nothing is written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt, _, _ = write_sources(tmp_path, docs)
    (tmp_path / "notes.md").write_text("# notes\n")
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "nocol.parquet")
    monkeypatch.setattr(P, "BATCH_BYTES", 1000)  # (many batches: shards of the first source are written before it ends)
    read = []
    real = P._read_documents
    monkeypatch.setattr(P, "_read_documents", lambda src, mark: read.append(src.path.name) or real(src, mark))
    for bad, needle in [("notes.md", "unknown source type"), ("nocol.parquet", "no 'text' column")]:
        out = tmp_path / f"o_{bad}"
        with pytest.raises(P.PrepareError, match=needle):
            P.prepare("mine", out, [P.Source(txt, None), P.Source(tmp_path / bad, "val")], workers=1, shard_tokens=2000, progress=False)
        assert not out.exists() and read == []


def test_sources_without_two_documents_leave_no_folder(tmp_path):
    """Empty, blank or one-document sources are refused after reading them; the folder made for them
    (its state, a validation shard) is removed, and one that was there before is left empty."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": "  \\n"}\n\n')
    (tmp_path / "one.txt").write_text("a single document, no separator")
    for name in ("empty.txt", "blank.jsonl", "one.txt"):
        out = tmp_path / f"o_{name}"
        with pytest.raises(P.PrepareError, match="both need at least one"):
            P.prepare("mine", out, [P.Source(tmp_path / name, None)], workers=1, progress=False)
        assert not out.exists(), sorted(f.name for f in out.iterdir())
    with pytest.raises(P.PrepareError, match="both need at least one"):  # (the parents made for it go too)
        P.prepare("mine", tmp_path / "p" / "q" / "r", [P.Source(tmp_path / "one.txt", None)], workers=1, progress=False)
    assert not (tmp_path / "p").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(P.PrepareError, match="1 validation documents"):
        P.prepare("mine", tmp_path / "mine", [P.Source(tmp_path / "one.txt", None)], workers=1, progress=False)
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_a_second_preparation_into_the_same_folder_at_once_is_refused(tmp_path, docs):
    """Two preparations into one folder at once: the second removed the first's temporaries and
    unrecorded shards (the first then failed, or listed a shard that was gone). The second is refused
    in one line while the first holds the folder, and touches nothing; after it, the same command works."""
    import fcntl

    txt, _, _ = write_sources(tmp_path, docs[:40])
    out = tmp_path / "out"
    out.mkdir()
    (out / P.STATE).write_text("{}")
    (out / "train_0000.bin").write_bytes(b"being recorded")
    (out / ".train_0001.bin.x1y2.tmp").write_bytes(b"being written")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    fd = os.open(out, os.O_RDONLY)  # the first preparation's hold on the folder
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(P.PrepareError, match=f"another preparation is writing {out} now; wait for it to end"):
            P.prepare("mine", out, [P.Source(txt, None)], workers=1, progress=False)
        assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    finally:
        os.close(fd)
    ds = P.prepare("mine", out, [P.Source(txt, None)], workers=1, progress=False)
    assert decoded(ds, "train").startswith(EOT + docs[0])


def test_a_shard_size_larger_than_the_data_takes_only_what_the_data_needs(tmp_path, docs):
    """A --shard_tokens far above the corpus (one shard, whatever its size) held that many tokens in
    memory from the start: 2**40 failed to allocate 2 TiB. A shard is now written from the batches'
    tokens as they came, to the same bytes."""
    txt, _, _ = write_sources(tmp_path, docs[:60])
    want = P.prepare("mine", tmp_path / "small", [P.Source(txt, None)], workers=1, shard_tokens=1000, progress=False)
    ds = P.prepare("mine", tmp_path / "one", [P.Source(txt, None)], workers=1, shard_tokens=1 << 40, progress=False)
    assert [len(ds.split(sp)) for sp in ("train", "val")] == [1, 1]
    for sp in ("train", "val"):
        np.testing.assert_array_equal(np.concatenate(ds.split(sp)), np.concatenate(want.split(sp)))
    # a shard written from its pieces is the one written from their concatenation
    pieces = [np.arange(i, 3 * i, dtype=np.uint16) for i in range(0, 300, 7)]
    entry = D.write_shard(tmp_path / "pieces.bin", pieces)
    assert entry == {**D.write_shard(tmp_path / "joined.bin", np.concatenate(pieces)), "file": "pieces.bin"}
    assert (tmp_path / "pieces.bin").read_bytes() == (tmp_path / "joined.bin").read_bytes()
    with pytest.raises(D.DataError, match="do not fit in uint16"):
        D.write_shard(tmp_path / "big.bin", [np.arange(3), np.array([70000])])
    for bad in (65536, -1):  # (the first values that wrap, written as 0 and 65535)
        with pytest.raises(D.DataError, match="do not fit in uint16"):
            D.write_shard(tmp_path / "big.bin", np.array([1, bad]))
    D.write_shard(tmp_path / "top.bin", np.array([0, 65535]))
    np.testing.assert_array_equal(D.open_shard(tmp_path / "top.bin"), [0, 65535])


def test_cli_errors_are_one_line(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single document, no separator")
    for args, needle in [
        (["nosuch"], "unknown dataset"),
        ([], "give one dataset"),
        (["mine", f"--source={tmp_path / 'missing.txt'}"], "no such file"),
        (["mine", f"--source={one}", f"--out={tmp_path / 'o'}", "--noprogress"], "needs at least 2 documents"),  # found while reading
        (["mine", f"--source=test={one}"], "no such file, and test= is no split (train= or val=)"),
        (["mine", f"--source={tmp_path}/x.csv"], "no such file"),
        (["mine", f"--source={tmp_path}"], f"--source {tmp_path} is a folder; give its files, one --source each"),
    ]:
        r = _cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and needle in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)


def test_files_that_source_did_not_take_are_refused(tmp_path):
    """`--source a.txt b.txt` (a shell glob, `--source texts/*.txt`) gives --source the first file
    only: the others were the dataset's name, or too many names; a lone second file was taken as the
    name, and only the first file prepared, silently (into a folder named after the second)."""
    from helpers import cli_cases

    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("doc one<|endoftext|>doc two<|endoftext|>doc three")
    a, b, out = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "o"
    runs = cli_cases("llmjax.prepare", [["--source", str(a), str(b), f"--out={out}", "--noprogress"],
                                        ["mine", "--source", str(a), str(b), f"--out={out}", "--noprogress"],
                                        ["mine", "other", f"--out={out}"], [str(tmp_path / "notes.txt"), f"--out={out}"]])
    for r, needle in zip(runs, [f"{b} is a file, not a dataset name: --source takes one file, so give each its own",
                                f"{b} is a file, not a dataset name", "give one dataset: .* \\(got 2: mine other\\)",
                                f"{tmp_path / 'notes.txt'} is a file's name, not a dataset name"]):  # (no such file: not 'is a file')
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and re.match(f"error: {needle}", r.stderr), r.stderr
    assert not out.exists()


def test_a_file_given_twice_is_refused(tmp_path, docs):
    """The same file twice (a glob and its name, a link to it, train= and val=) was prepared twice:
    its held-out tail's documents, or its val= copy, were training documents too."""
    txt, _, _ = write_sources(tmp_path, docs[:20])
    (tmp_path / "link.txt").symlink_to(txt)
    for sources, needle in [([P.Source(txt, None), P.Source(txt, None)], f"{txt} is given twice:"),
                            ([P.Source(txt, "train"), P.Source(txt, "val")], f"{txt} is given twice \\(as train and as val\\):"),
                            ([P.Source(txt, None), P.Source(tmp_path / "link.txt", None)], f"{tmp_path / 'link.txt'} is {txt} again:")]:
        with pytest.raises(P.PrepareError, match=f"--source {needle} its documents would be prepared twice"):
            P.prepare("mine", tmp_path / "o", sources, workers=1, progress=False)
        assert not (tmp_path / "o").exists()


def test_source_arguments(tmp_path, monkeypatch):
    """`train=`/`val=` prefix a split, but a file with = in its name is that file; a URL's file is
    named as its path ends, without the query (a .jsonl served as ...?download=true was refused)."""
    import io

    monkeypatch.chdir(tmp_path)
    (tmp_path / "k=v.txt").write_text("x")
    (tmp_path / "a.txt").write_text("x")
    got = P.parse_sources(["k=v.txt", "val=a.txt", str(tmp_path / "k=v.txt")], tmp_path / "cache")
    assert [(s.path.name, s.split) for s in got] == [("k=v.txt", None), ("a.txt", "val"), ("k=v.txt", None)]
    with pytest.raises(P.PrepareError, match="test= is no split"):
        P.parse_sources(["test=a.txt"], tmp_path / "cache")
    urls = []
    monkeypatch.setattr(P.urllib.request, "urlopen", lambda url, timeout=None: urls.append(url) or io.BytesIO(b'{"text": "hi"}\n'))
    [src] = P.parse_sources(["train=https://example.org/d/my%20data.jsonl?download=true"], tmp_path / "cache")
    assert src.split == "train" and src.path.name == "my data.jsonl" and src.kind == "jsonl" and src.path.read_text() == '{"text": "hi"}\n'
    assert urls == ["https://example.org/d/my%20data.jsonl?download=true"]


def test_nothing_is_downloaded_before_the_arguments_are_known_to_be_good(tmp_path, monkeypatch, docs):
    """A URL of another type (.jsonl.gz), a missing file after a URL, a bad setting or a user's
    folder as --out is refused before any download (they were refused once it was done: gigabytes,
    fineweb_edu's 14 files, or a minute of retries offline); then the same URL downloads once."""
    import io

    urls = []
    body = "".join(json.dumps({"text": d}) + "\n" for d in docs[:20]).encode()
    monkeypatch.setattr(P.urllib.request, "urlopen", lambda url, timeout=None: urls.append(url) or io.BytesIO(body))
    monkeypatch.setattr(P, "hub_sources", lambda name: urls.append(name) or [])
    cache = tmp_path / "cache"
    url = "https://example.org/d.jsonl"
    with pytest.raises(P.PrepareError, match=r"^https://example.org/d.jsonl.gz: unknown source type; use .txt"):
        P.parse_sources([url + ".gz"], cache)
    with pytest.raises(P.PrepareError, match=r"missing.txt: no such file"):
        P.parse_sources([url, str(tmp_path / "missing.txt")], cache)
    sources = P.parse_sources([url], cache, download=False)
    with pytest.raises(P.PrepareError, match="--shard_tokens must be positive"):
        P.prepare("mine", tmp_path / "out", sources, shard_tokens=0, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("mine")
    for srcs, name in ((sources, "mine"), (None, "fineweb_edu")):
        with pytest.raises(P.PrepareError, match="holds files that no preparation wrote"):
            P.prepare(name, tmp_path / "mine", srcs, workers=1, progress=False)
    twice = P.parse_sources([url, "val=" + url], cache, download=False)  # (it named the downloaded file, in the cache)
    with pytest.raises(P.PrepareError, match=rf"^--source {url} is given twice \(as a source and as val\):"):
        P.prepare("mine", tmp_path / "out", twice, workers=1, progress=False)
    assert urls == [] and not cache.exists()
    ds = P.prepare("mine", tmp_path / "out", sources, workers=1, progress=False)
    assert urls == [url] and decoded(ds, "train").startswith(EOT + docs[0])
    with pytest.raises(P.PrepareError, match="already holds a prepared dataset named 'mine', not 'fineweb_edu'; use another --out"):
        P.prepare("fineweb_edu", tmp_path / "out", None, workers=1, progress=False)
    assert urls == [url]
    # the command too (it tried the unreachable URL five times, 15 s, and said it could not download it)
    r = _cli("mine", "--source=http://127.0.0.1:9/d.jsonl", "--shard_tokens=0", f"--out={tmp_path / 'o'}")
    assert r.returncode == 2 and r.stderr == "error: --shard_tokens must be positive\n", r.stderr


def test_cli_prepares_the_builtin_datasets(tmp_path):
    r = _cli("tinyshakespeare", f"--out={tmp_path / 'ts'}")
    assert r.returncode == 0, r.stderr
    assert "301,966" in r.stdout and D.TokenDataset.open(tmp_path / "ts").num_tokens("val") == 36059


def test_hub_sources_list_download_and_retry(monkeypatch, tmp_path, capsys):
    """fineweb_edu: the sample-10BT parquet files are listed and downloaded through huggingface_hub,
    with retries; tinystories: its train and valid files, as the two splits (no network: mocked)."""
    import huggingface_hub

    calls = {"download": [], "failures": 1}

    def fake_download(repo_id, filename, repo_type):
        assert repo_type == "dataset"
        if calls["failures"]:
            calls["failures"] -= 1
            raise ConnectionError("flaky network")
        calls["download"].append((repo_id, filename))
        path = tmp_path / filename.replace("/", "_")
        path.write_text("x")
        return str(path)

    class FakeApi:
        def list_repo_files(self, repo_id, repo_type):
            return ["README.md", "sample/10BT/001_00000.parquet", "sample/10BT/000_00000.parquet", "sample/100BT/000.parquet", "data/x.parquet"]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(P.time, "sleep", lambda s: None)
    srcs = P.hub_sources("fineweb_edu")
    assert calls["download"] == [("HuggingFaceFW/fineweb-edu", "sample/10BT/000_00000.parquet"), ("HuggingFaceFW/fineweb-edu", "sample/10BT/001_00000.parquet")]
    # each failed try is said (offline, the waits add up), one line each
    assert capsys.readouterr().err == ("prepare: downloading HuggingFaceFW/fineweb-edu/sample/10BT/000_00000.parquet failed "
                                       "(ConnectionError: flaky network); try 2 of 5 in 1 s\n")
    assert [s.split for s in srcs] == [None, None]  # no validation split: a held-out tail
    srcs = P.hub_sources("tinystories")
    assert [(s.path.name, s.split) for s in srcs] == [("TinyStoriesV2-GPT4-train.txt", "train"), ("TinyStoriesV2-GPT4-valid.txt", "val")]
    calls["failures"] = 10
    with pytest.raises(P.PrepareError, match="cannot download .*flaky network"):
        P.hub_sources("tinystories")
    # offline (a host name that does not resolve, after huggingface_hub's own five tries): at once
    import socket

    def offline(repo_id, filename, repo_type):
        calls["offline"] = calls.get("offline", 0) + 1
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as e:
            raise OSError("An error happened while trying to locate the file on the Hub") from e

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    capsys.readouterr()
    with pytest.raises(P.PrepareError, match=r"cannot download roneneldan/TinyStories/.*: no network .*give local files with --source"):
        P.hub_sources("tinystories")
    assert calls["offline"] == 1 and capsys.readouterr().err == ""


def test_a_download_the_server_refuses_fails_at_once(tmp_path, monkeypatch, capsys):
    """A 404 or 403 (any 4xx but 408 and 429) is not retried: one request, one line with the URL and
    the status (the command tried five times, waiting 15 s, each try a line on stderr); 408, 429
    and 5xx answers are still retried. The hub's client errors likewise (huggingface_hub's
    HfHubHTTPError, its response's status)."""
    import http.server
    import threading

    import httpx
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    answers, requests = [], []

    class Server(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            status = answers.pop(0) if answers else 200
            if status != 200:
                return self.send_error(status)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"text": "hi"}\n')

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/d.jsonl"
    try:
        for status, reason in ((404, "Not Found"), (403, "Forbidden"), (410, "Gone")):
            answers[:], requests[:] = [status] * 5, []
            with pytest.raises(P.PrepareError) as e:
                P.download_url(url, P.url_target(url, tmp_path / f"cache{status}"))
            assert str(e.value) == (f"cannot download {url}: the server answered HTTP {status} {reason} (not retried: asking again gets "
                                    "the same); check the address and your access to it, or give local files with --source")
            assert len(requests) == 1 and capsys.readouterr().err == ""
        monkeypatch.setattr(P.time, "sleep", lambda s: None)
        answers[:], requests[:] = [408, 429, 503], []
        target = P.url_target(url, tmp_path / "cache")
        P.download_url(url, target)
        assert len(requests) == 4 and target.read_text() == '{"text": "hi"}\n'
        assert capsys.readouterr().err.count("try ") == 3
        answers[:] = [404]
        r = _cli("mine", f"--source={url.replace('d.jsonl', 'e.jsonl')}", f"--out={tmp_path / 'o'}", "--workers=1")
        assert r.returncode == 2 and r.stderr == (f"error: cannot download {url.replace('d.jsonl', 'e.jsonl')}: the server answered HTTP "
                                                  "404 Not Found (not retried: asking again gets the same); check the address and your "
                                                  "access to it, or give local files with --source\n"), r.stderr
    finally:
        server.shutdown()
    calls = []

    def gone(repo_id, filename, repo_type):
        calls.append(filename)
        response = httpx.Response(404, request=httpx.Request("GET", f"https://huggingface.co/{repo_id}/{filename}"))
        raise HfHubHTTPError("404 Client Error: Entry not found", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gone)
    with pytest.raises(P.PrepareError, match=r"^cannot download roneneldan/TinyStories/TinyStoriesV2-GPT4-train.txt: the server "
                                             r"answered HTTP 404 Not Found \(not retried"):
        P.hub_sources("tinystories")
    assert len(calls) == 1


def test_an_offline_hub_download_is_one_line(monkeypatch, capfd, caplog):
    """`python -m llmjax.prepare tinystories` offline: huggingface_hub logs a warning for each of its
    own tries (six in about 23 s, each twice: its handler's line and absl's), a dozen lines on the
    terminal before our one-line error. The download holds the hub's logger to errors, and leaves
    it as it was."""
    import logging
    import socket

    import huggingface_hub
    import huggingface_hub.utils._http as hub_http  # (its import gives the hub's logger its level and stderr handler)

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level

    def offline(repo_id, filename, repo_type):  # (as the hub does: its _http module's warning, then the error)
        hub_http.logger.warning(f"'[Errno -2] Name or service not known' thrown while requesting HEAD {repo_id}/{filename}")
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as e:
            raise OSError("An error happened while trying to locate the file on the Hub") from e

    class OfflineApi:
        def list_repo_files(self, repo_id, repo_type):
            offline(repo_id, "", repo_type)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineApi)
    for name in ("tinystories", "fineweb_edu"):  # (a download; a listing)
        with caplog.at_level(logging.WARNING), pytest.raises(P.PrepareError, match=r"^cannot download .*: no network .*--source$"):
            P.hub_sources(name)
        assert not [r for r in caplog.records if r.name.startswith("huggingface_hub")], caplog.text
        assert capfd.readouterr().err == "" and hub_log.level == level


def test_prepare_again_repairs_a_dataset_whose_shards_are_missing_or_changed(tmp_path, docs):
    """The trainer says "prepare the dataset again" for a missing, truncated or changed shard: the
    same prepare command then writes it again (it used to answer "prepared" and change nothing)."""
    txt, _, _ = write_sources(tmp_path, docs)
    out = tmp_path / "out"
    P.prepare("mine", out, [P.Source(txt, None)], workers=1, shard_tokens=3000, progress=False)
    good = files(out)
    (out / "train_0001.bin").unlink()
    shard = out / "train_0002.bin"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\0\0")  # same size, changed
    ds = P.prepare("mine", out, [P.Source(txt, None)], workers=1, shard_tokens=3000, progress=False)
    assert files(out) == good and not ds.damaged_shards()
    ds.split("train")
    # the built-in datasets too (the trainer prepares them on first use; it opens a damaged one as it
    # is, and its own check names the damage and says to prepare it again: this command)
    ts = tmp_path / "ts"
    D.prepare_builtin("tinyshakespeare_char", ts)
    shards = files(ts)
    (ts / "train_0000.bin").unlink()
    (ts / "val_0000.bin").write_bytes(b"junk")
    assert D.prepare_builtin("tinyshakespeare_char", ts).damaged_shards()
    assert not P.prepare("tinyshakespeare_char", ts).damaged_shards()
    assert files(ts) == shards


def test_write_errors_and_a_dead_worker_are_one_line(tmp_path):
    """An --out that is a file or cannot be written (a full disk is the same OSError), and a
    tokeniser worker killed (the kernel's OOM killer): one line, no traceback."""
    two = tmp_path / "two.txt"
    two.write_text(f"one document{EOT}another")
    (tmp_path / "afile").write_text("")
    for args in (["mine", f"--source={two}", f"--out={tmp_path / 'afile'}", "--noprogress"],
                 ["tinyshakespeare", f"--out={tmp_path / 'afile' / 'ts'}"]):
        r = _cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "afile" in r.stderr, (args, r.stderr)
    docs = make_docs(3000, seed=3, long=300)
    txt, _, _ = write_sources(tmp_path, docs)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "llmjax.prepare", "mine", f"--source={txt}", "--shard_tokens=2000", "--workers=1",
                             "--noprogress", f"--out={out}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker = _wait_for_worker(proc)
    os.kill(worker, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0:  # (the worker may have had nothing left to do)
        assert proc.returncode == 2 and err.startswith("error: ") and err.count("\n") == 1 and "resume" in err, err


def _children(pid: int) -> list[int]:
    r = subprocess.run(["pgrep", "-P", str(pid), "-f", "spawn_main"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def _wait_for_worker(proc) -> int:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        kids = _children(proc.pid)
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise AssertionError("no tokeniser worker started")


def _gone(pids: list[int], seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if not [p for p in pids if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split(")")[-1][:3]]:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_workers_are_light_and_do_not_outlive_a_killed_preparation(tmp_path, sig):
    """The spawned workers import tiktoken and NumPy, not JAX (spawn imports the main module,
    llmjax.prepare, in each); a plain `kill` of the command (SIGTERM: `timeout`, a scheduler) stops
    it in one line and its workers with it, and a SIGKILL's workers exit on their own (they were
    left behind for good, holding their memory)."""
    r = subprocess.run([sys.executable, "-c", "import sys, llmjax.prepare; print('jax' in sys.modules, 'grain' in sys.modules)"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.stdout.split() == ["False", "False"], r.stderr
    docs = make_docs(3000, seed=4, long=300)
    txt, _, _ = write_sources(tmp_path, docs)
    log = tmp_path / "stderr"
    with open(log, "w") as stderr:  # (a file, not a pipe: workers left behind would hold a pipe open)
        proc = subprocess.Popen([sys.executable, "-m", "llmjax.prepare", "mine", f"--source={txt}", "--shard_tokens=2000", "--workers=2",
                                 "--noprogress", f"--out={tmp_path / 'out'}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    _wait_for_worker(proc)
    kids = _children(proc.pid)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    err = log.read_text()
    try:
        assert _gone(kids, 15), "tokeniser workers outlived the preparation"
    finally:
        for p in kids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    if sig == signal.SIGTERM and proc.returncode != 0:  # (the line says whether shards were kept, as they were)
        kept = (tmp_path / "out").is_dir() and any(f.suffix == ".bin" for f in (tmp_path / "out").iterdir())
        assert err.startswith("error: ") and err.count("\n") == 1 and ("resume" in err) == kept, (kept, err)


def test_an_interruption_before_the_first_shard_says_nothing_was_kept(tmp_path):
    """Interrupted before its first shard, a preparation keeps nothing (a folder it made goes too),
    but the line said 'finished shards are kept in OUT: run the same command to resume'."""
    (tmp_path / "a.txt").write_text("doc one<|endoftext|>doc two")
    code = ("import sys\n"
            "from llmjax import cli, prepare as P\n"
            "def interrupted(*a, **k):\n"
            "    raise KeyboardInterrupt\n"
            "P.prepare = interrupted\n"
            f"sys.argv = ['prepare', 'mine', '--source={tmp_path / 'a.txt'}', '--out={tmp_path / 'out'}']\n"
            "P.define_flags()\n"
            "cli.run(P.main)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stderr == ("error: interrupted before the first shard was finished; nothing was kept: run the same "
                                                "command to start again\n"), r.stderr


def test_default_workers_are_the_cpus_this_process_may_use(monkeypatch):
    """`taskset`, Slurm's --cpus-per-task and cgroup cpusets limit the CPUs a process may run on;
    os.cpu_count() counts the machine's (128 workers on a node where the job has 8 cores)."""
    monkeypatch.setattr(P.os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(P.os, "cpu_count", lambda: 128)
    assert P.default_workers() == 3


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_second_ctrl_c_does_not_hang_the_command(tmp_path):
    """Ctrl-C twice (a terminal sends it to the whole group): the first one's wait for the work in
    flight was cut by the second, the workers never got their shutdown, and the command hung at
    exit for good. The batches not started are dropped (the next run redoes them): it stops in a
    second or so, in one line."""
    txt = tmp_path / "docs.txt"  # (several 4 MB batches in flight when it comes)
    txt.write_text(EOT.join(make_docs(12000, seed=5, long=500)), encoding="utf-8")
    out = tmp_path / "out"
    log = tmp_path / "stderr"
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # (an ignored SIGINT is inherited: a background job's)
    with open(log, "w") as stderr:
        if ignored:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen([sys.executable, "-m", "llmjax.prepare", "mine", f"--source={txt}", "--shard_tokens=2000", "--workers=2",
                                     "--noprogress", f"--out={out}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
    _wait_for_shards(proc, out, 2)
    kids = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for p in kids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError("a second Ctrl-C left the command hanging")
    assert _gone(kids, 15)
    err = log.read_text()
    assert proc.returncode in (130, -signal.SIGINT) and err.startswith("error: interrupted") and err.count("\n") == 1, err


def test_a_users_folder_is_never_written_into(tmp_path, docs):
    """--out on a folder no preparation wrote (no manifest, no state) is refused and left as it was:
    an interrupted run's clean-up used to delete every `.*.tmp` and every unrecorded shard name in it."""
    txt, _, _ = write_sources(tmp_path, docs[:20])
    mine = tmp_path / "myfolder"
    mine.mkdir()
    user = {".draft.tmp": b"notes", "train_0007.bin": b"mine", "input.txt": b"text"}
    for name, data in user.items():
        (mine / name).write_bytes(data)
    for dataset, sources in (("mine", [P.Source(txt, None)]), ("tinyshakespeare_char", None)):
        with pytest.raises((P.PrepareError, D.DataError), match="holds files that no preparation wrote"):
            P.prepare(dataset, mine, sources, workers=1, progress=False)
        assert {f.name: f.read_bytes() for f in mine.iterdir()} == user
    # a folder this command wrote keeps working: an interrupted run's own temporaries are cleared, a
    # user's file of another name beside them is kept
    out = tmp_path / "out"
    ds = P.prepare("mine", out, [P.Source(txt, None)], workers=1, progress=False)
    (out / D.MANIFEST).unlink()
    (out / P.STATE).write_text("{}")
    (out / ".train_0000.bin.abc123.tmp").write_bytes(b"half")
    (out / ".notes.tmp").write_bytes(b"kept")
    again = P.prepare("mine", out, [P.Source(txt, None)], workers=1, progress=False)
    assert files(again.path) == files(ds.path)
    assert not (out / ".train_0000.bin.abc123.tmp").exists() and (out / ".notes.tmp").read_bytes() == b"kept"


def test_training_on_an_unfinished_preparation_says_how_to_resume_it(tmp_path, docs, monkeypatch):
    """A dataset whose preparation was interrupted is named as unfinished, with the command (its
    sources) that resumes it; that command then finishes it. (It was 'unknown dataset'.)"""
    import shlex

    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path))
    txt = write_sources(tmp_path, docs)[0]
    extra = tmp_path / "held out.txt"
    extra.write_text("a held-out document of its own.\n")
    out = tmp_path / "mine"
    with pytest.raises(KeyboardInterrupt):
        P.prepare("mine", out, [P.Source(txt, None), P.Source(extra, "val")], workers=1, shard_tokens=3000, progress=False,
                  stop_after_shards=1)
    with pytest.raises(D.DataError, match=r"^dataset 'mine' in .* is unfinished") as e:
        D.open_dataset("mine", "data")
    message = str(e.value)
    assert "\n" not in message
    command = shlex.split(message.split("to resume it: ", 1)[1])
    assert command[:5] == ["python", "-m", "llmjax.prepare", "mine", "--out"] and command[5] == str(out)
    # the state's --shard_tokens too (another size starts afresh, rewriting what was written)
    assert command[6:] == ["--shard_tokens", "3000", "--source", str(txt), "--source", f"val={extra}"]
    first = (out / "train_0000.bin").stat()
    sources = P.parse_sources(command[9::2], tmp_path / "cache")
    P.prepare("mine", out, sources, workers=1, shard_tokens=int(command[7]), progress=False)
    assert D.open_dataset("mine", "data").split("val")
    assert (out / "train_0000.bin").stat().st_ino == first.st_ino  # (resumed: the finished shard kept, not written again)


def test_an_unfinished_preparations_command_names_shard_tokens_only_when_not_the_default(tmp_path, docs, monkeypatch):
    """The resume command of a preparation at the default --shard_tokens names none."""
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(P, "SHARD_TOKENS", 3000)
    txt = write_sources(tmp_path, docs)[0]
    with pytest.raises(KeyboardInterrupt):
        P.prepare("mine", tmp_path / "mine", [P.Source(txt, None)], workers=1, shard_tokens=3000, progress=False, stop_after_shards=1)
    with pytest.raises(D.DataError, match=rf"to resume it: python -m llmjax.prepare mine --out {tmp_path}/mine --source {txt}$"):
        D.open_dataset("mine", "data")


def test_an_unfinished_preparations_command_keeps_train_and_quotes_its_folder(tmp_path, docs, monkeypatch):
    """The resume command gives a train= source as train= (without it the same file is another
    split, another preparation: the command started afresh, rewriting the finished shards), and
    quotes --out for a shell (a data folder with a space in its name: --out was cut at the space). It
    names the dataset the state records, not the folder's name (prepared as 'mine' with --out into
    the folder 'stories' that training names: 'stories' is another preparation, started afresh)."""
    import shlex

    data = tmp_path / "my data"
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(data))
    txt = write_sources(tmp_path, docs)[0]
    held = tmp_path / "held.txt"
    held.write_text("a held-out document of its own.\n")
    out = data / "stories"
    with pytest.raises(KeyboardInterrupt):
        P.prepare("mine", out, [P.Source(txt, "train"), P.Source(held, "val")], workers=1, shard_tokens=3000, progress=False,
                  stop_after_shards=1)
    with pytest.raises(D.DataError, match="to resume it: ") as e:
        D.open_dataset("stories", "data")
    command = shlex.split(str(e.value).split("to resume it: ", 1)[1])
    assert command == ["python", "-m", "llmjax.prepare", "mine", "--out", str(out), "--shard_tokens", "3000",
                       "--source", f"train={txt}", "--source", f"val={held}"]
    first = (out / "train_0000.bin").stat()
    P.prepare(command[3], Path(command[5]), P.parse_sources(command[9::2], tmp_path / "cache"), workers=1, shard_tokens=int(command[7]),
              progress=False)
    assert (out / "train_0000.bin").stat().st_ino == first.st_ino  # (resumed: the finished shard kept, not written again)


def test_an_unfinished_hub_datasets_command_names_sources_unless_the_hubs(tmp_path, monkeypatch):
    """A hub dataset's name prepared from one's own files: the command names them (it named none, and
    run as printed it downloaded the hub's files and started afresh, deleting the finished shards);
    prepared from the hub's own files (its cache): none, as before."""
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path))
    out = tmp_path / "tinystories"
    out.mkdir()
    hub = tmp_path / "hf" / "datasets--roneneldan--TinyStories" / "snapshots" / "abc"
    own = tmp_path / "stories.txt"
    for sources, tail in (([[str(hub / "TinyStoriesV2-GPT4-train.txt"), "train", 1, 1], [str(hub / "TinyStoriesV2-GPT4-valid.txt"), "val", 1, 1]],
                           f"--out {out}"),
                          ([[str(own), None, 1, 1]], f"--out {out} --source {own}")):
        (out / P.STATE).write_text(json.dumps({"args": {"dataset": "tinystories", "sources": sources, "shard_tokens": P.SHARD_TOKENS}}))
        with pytest.raises(D.DataError, match=rf"to resume it: python -m llmjax.prepare tinystories {re.escape(tail)}$"):
            D.open_dataset("tinystories", "data")


def test_an_unfinished_preparation_under_a_built_in_name_is_not_written_over(tmp_path, monkeypatch):
    """A built-in name prepared from one's own --source files and interrupted is said to be
    unfinished, with its command, as any other: training on it wrote the shipped Shakespeare over its
    shards, and trained on that, the user's state beside a manifest of another text."""
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path))
    out = tmp_path / "tinyshakespeare"
    out.mkdir()
    own = tmp_path / "mine.txt"
    (out / P.STATE).write_text(json.dumps({"args": {"dataset": "tinyshakespeare", "sources": [[str(own), None, 1, 1]],
                                                    "shard_tokens": P.SHARD_TOKENS}}))
    (out / "train_0000.bin").write_bytes(b"the user's shard")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(D.DataError, match=rf"is unfinished .* python -m llmjax.prepare tinyshakespeare --out {re.escape(str(out))} "
                                          rf"--source {re.escape(str(own))}$"):
        D.open_dataset("tinyshakespeare", "data")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_an_unfinished_preparation_of_another_dataset_is_not_started_over(tmp_path, docs):
    """An --out holding another dataset's unfinished preparation was started afresh, silently: its
    finished shards (hours of a corpus) deleted, where a finished one is refused. So was one under
    a built-in name prepared from --source files, by `prepare tinyshakespeare`, which wrote the
    shipped text over its shards. Both are refused, naming the command that resumes it, and nothing
    is changed."""
    txt = write_sources(tmp_path, docs[:20])[0]
    own = tmp_path / "mine.txt"
    for theirs in ("mine", "tinyshakespeare"):
        out = tmp_path / theirs
        out.mkdir()
        (out / P.STATE).write_text(json.dumps({"args": {"dataset": theirs, "sources": [[str(own), None, 1, 1]],
                                                        "shard_tokens": P.SHARD_TOKENS}}))
        (out / "train_0000.bin").write_bytes(b"a finished shard")
        before = {f.name: f.read_bytes() for f in out.iterdir()}
        for name, sources in (("other", [P.Source(txt, None)]), ("tinyshakespeare", None)):
            with pytest.raises(P.PrepareError, match=rf"^{re.escape(str(out))} holds an unfinished preparation of '{theirs}', which this one "
                                                     rf"would replace; resume it with `python -m llmjax.prepare {theirs} --out "
                                                     rf"{re.escape(str(out))} --source {re.escape(str(own))}`, or use another --out"):
                P.prepare(name, out, sources, workers=1, progress=False)
            assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_a_damaged_built_in_name_prepared_from_ones_own_files_is_not_replaced_by_the_shipped_text(tmp_path, docs):
    """`python -m llmjax.prepare tinyshakespeare` (no --source) repairs a damaged built-in dataset by
    writing the shipped text again: over one prepared from the user's own files under that name, it
    replaced their dataset with Shakespeare, silently. Now refused, with the command that repairs it."""
    own, _, _ = write_sources(tmp_path, docs[:20])
    out = tmp_path / "tinyshakespeare"
    P.prepare("tinyshakespeare", out, [P.Source(own, None)], workers=1, progress=False)
    (out / "val_0000.bin").unlink()
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(D.DataError, match=rf"prepared from other text .*val_0000.bin cannot be read.*python -m llmjax.prepare "
                                          rf"tinyshakespeare --out {re.escape(str(out))} --source {re.escape(str(own))}$"):
        P.prepare("tinyshakespeare", out)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    ds = P.prepare("tinyshakespeare", out, [P.Source(own, None)], workers=1, progress=False)  # (the command it names repairs it)
    assert decoded(ds, "train") + decoded(ds, "val") == "".join(EOT + d for d in docs[:20])


def test_a_built_in_name_whose_manifest_cannot_be_read_is_kept_not_replaced_by_the_shipped_text(tmp_path, docs, monkeypatch):
    """A built-in name prepared from one's own files, its manifest then cut short or of another
    format version: the trainer (data.open_dataset) and `prepare NAME` took it for no dataset and
    wrote the shipped text over its shards, silently (train_0001... left behind, in no manifest).
    Now one line that says what to do, and every file kept; the shipped text's own dataset of
    another format version is still prepared again."""
    own, _, _ = write_sources(tmp_path, docs[:20])
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "data" / "tinyshakespeare"
    P.prepare("tinyshakespeare", out, [P.Source(own, None)], workers=1, progress=False, shard_tokens=2000)
    assert len(list(out.glob("train_*.bin"))) > 1
    text = (out / D.MANIFEST).read_text()
    for manifest, why in [(text[:100], "is not valid JSON"), (text.replace(f'"version": {D.VERSION}', '"version": 99'), "is not an llmjax token manifest")]:
        (out / D.MANIFEST).write_text(manifest)
        before = {f.name: f.read_bytes() for f in out.iterdir()}
        for prepare in (lambda: D.open_dataset("tinyshakespeare", "unused"), lambda: P.prepare("tinyshakespeare", out)):
            with pytest.raises(D.DataError, match=rf"manifest.json {why}.*, so what its shards hold is not known \(they are kept\); delete "
                                                  rf"{re.escape(str(out))} to prepare 'tinyshakespeare' again"):
                prepare()
            assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # the shipped text's own, of another format version (an older llmjax's): prepared again
    shipped = tmp_path / "shipped"
    D.prepare_builtin("tinyshakespeare_char", shipped)
    want = {f.name: f.read_bytes() for f in shipped.iterdir()}
    old = json.loads((shipped / D.MANIFEST).read_text()) | {"version": 99}
    (shipped / D.MANIFEST).write_text(json.dumps(old))
    D.prepare_builtin("tinyshakespeare_char", shipped)
    assert {f.name: f.read_bytes() for f in shipped.iterdir()} == want


def test_a_damaged_record_of_finished_shards_starts_afresh(tmp_path, docs):
    """The preparation's own record of its finished shards (.prepare_state.json) empty or not an
    object was JSONDecodeError's or AttributeError's traceback; it starts afresh, as a record of
    other arguments does, and gives the same bytes."""
    own, _, _ = write_sources(tmp_path, docs[:20])
    want = {f.name: f.read_bytes() for f in P.prepare("t", tmp_path / "want", [P.Source(own, None)], workers=1, progress=False).path.iterdir()}
    for i, body in enumerate(["", "[]", "{\"args\": "]):
        out = tmp_path / f"out{i}"
        out.mkdir()
        (out / P.STATE).write_text(body)
        ds = P.prepare("t", out, [P.Source(own, None)], workers=1, progress=False)
        assert {f.name: f.read_bytes() for f in ds.path.iterdir()} == want, body


def test_an_empty_source_is_one_line():
    """`--source "$F"` with F unset (and train=, val= with nothing after): Path("") is the working
    folder, so it was "--source  is a folder", suggesting --source //a.txt."""
    for item, said in [("", "--source  is empty"), ("train=", "--source train= is empty"), ("val=", "--source val= is empty")]:
        with pytest.raises(P.PrepareError, match=re.escape(said + " (a shell variable that was not set?); give a file, or drop it")):
            P.parse_sources([item], Path("/nonexistent"), download=False)


def test_a_path_flag_given_as_flag_equals_tilde_is_under_the_home_folder(tmp_path):
    """`--out=~/x` (and `~` in a --flagfile's name and in its lines) reaches the tools unexpanded: the
    shell expands `--out ~/x` only. It went to a folder literally named `~` in the working directory;
    every tool's path flags (llmjax.cli.PATH_FLAGS) are now expanded as the shell would have."""
    from helpers import cli_cases

    home = tmp_path / "home"
    home.mkdir()
    (home / "p.flags").write_text("--out=~/data/b\n")
    a, b = cli_cases("llmjax.prepare", [["tinyshakespeare_char", "--out=~/data/a"], ["tinyshakespeare_char", "--flagfile=~/p.flags"]],
                     env={**os.environ, "HOME": str(home)})
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert f"in {home / 'data' / 'a'} " in a.stdout and f"in {home / 'data' / 'b'} " in b.stdout
    assert (home / "data" / "a" / "manifest.json").is_file() and (home / "data" / "b" / "manifest.json").is_file()
    assert not (ROOT / "~").exists()


def test_a_signal_while_a_worker_starts_is_raised_once_it_has_started():
    """The pool starts a spawned worker inside `submit`, writing its start-up data down a pipe: a
    SIGTERM raised in the middle of that write left the worker with half of it, an EOFError traceback
    under the command's one line (seen once in CI). prepare holds SIGINT and SIGTERM back around
    `submit` and raises the first as the handler in place would have, once it returns."""
    from llmjax.prepare import _SignalsHeld

    def terminated(*_):
        raise KeyboardInterrupt

    saved = signal.signal(signal.SIGTERM, terminated)
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with _SignalsHeld():
                signal.raise_signal(signal.SIGTERM)
                steps.append("after the signal")  # (the work inside goes on to its end)
        assert steps == ["after the signal"] and signal.getsignal(signal.SIGTERM) is terminated
        with _SignalsHeld():  # (no signal: nothing raised)
            steps.append("quiet")
    finally:
        signal.signal(signal.SIGTERM, saved)
    assert steps == ["after the signal", "quiet"]


def test_a_damaged_shipped_bpe_file_is_one_line_in_prepare_and_train(tmp_path, monkeypatch):
    """A shipped GPT-2 BPE file not as shipped: prepare's workers raised it (a _RemoteTraceback), and
    training on a built-in dataset not yet prepared raised it from the preparation (a traceback);
    training on one prepared said 'prepare it again', which does not mend the package. Each is the
    one line sample and evaluate give, and nothing is left behind."""
    import shutil

    copy = tmp_path / "copy"  # (the package, its encoder.json with a byte more: as a damaged install)
    shutil.copytree(ROOT / "llmjax", copy / "llmjax", ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "llmjax" / "assets" / "gpt2" / "encoder.json", "a") as f:
        f.write(" ")
    (tmp_path / "a.txt").write_text("hello world\nmore text\n")
    (tmp_path / "b.txt").write_text("held out\n")
    r = subprocess.run([sys.executable, "-m", "llmjax.prepare", "mine", f"--source=train={tmp_path / 'a.txt'}", f"--source=val={tmp_path / 'b.txt'}",
                        "--noprogress", f"--out={tmp_path / 'out'}"], capture_output=True, text=True, cwd=copy, timeout=300)
    said = (f"error: the shipped GPT-2 BPE file {copy / 'llmjax' / 'assets' / 'gpt2' / 'encoder.json'} is corrupt (its sha256 is not "
            f"tiktoken's); reinstall llmjax\n")
    assert (r.returncode, r.stderr) == (2, said), r.stderr
    assert not (tmp_path / "out").exists()
    # the trainer, in process: the package's files as that copy's (its error is the CLI's line: cli.run)
    from llmjax import tokenizer
    from llmjax.tokenizer import InstallError
    from llmjax.train import train
    from test_train import cfg

    D.open_dataset("tinyshakespeare", str(tmp_path / "data"))  # (prepared while the package is whole)
    monkeypatch.setattr(tokenizer, "ASSETS", copy / "llmjax" / "assets")
    tokenizer.gpt2_encoding.cache_clear()
    try:
        for data_dir in (tmp_path / "empty", tmp_path / "data"):  # (not prepared: its preparation; prepared: read)
            c = cfg("vanilla", data__dataset="tinyshakespeare", data__dir=str(data_dir), model__vocab_size=50257,
                    model__padded_vocab_size=50304)
            with pytest.raises((InstallError, ConfigError), match=rf"^{re.escape(said[7:-1])}$"):
                train(c, tmp_path / "run", quiet=True)
            assert not (tmp_path / "run").exists()
        assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.*"))  # (no half-prepared dataset)
    finally:
        tokenizer.gpt2_encoding.cache_clear()
