"""Token shards, manifests, the built-in datasets, tokenizers and grain batches."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from llmjax import data as D
from llmjax import tokenizer as tok


def test_shard_round_trip_and_header(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000).astype(np.uint16)
    entry = D.write_shard(tmp_path / "s.bin", tokens)
    assert entry["tokens"] == 1000 and D.verify_shard(tmp_path / "s.bin", entry["sha256"])
    np.testing.assert_array_equal(D.open_shard(tmp_path / "s.bin", 1000), tokens)
    raw = (tmp_path / "s.bin").read_bytes()
    assert raw[:8] == b"LLMJAXTK" and len(raw) == 64 + 2000
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temporary file left behind


def test_truncated_foreign_and_mismatched_shards_are_clear_errors(tmp_path):
    D.write_shard(tmp_path / "s.bin", np.arange(100, dtype=np.uint16))
    raw = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-10])
    with pytest.raises(D.DataError, match="truncated or corrupt: header says 100 tokens, file holds 95"):
        D.open_shard(tmp_path / "cut.bin")
    (tmp_path / "foreign.bin").write_bytes(b"\x00" * 300)
    with pytest.raises(D.DataError, match="not an llmjax token shard"):
        D.open_shard(tmp_path / "foreign.bin")
    with pytest.raises(D.DataError, match="manifest says 99"):
        D.open_shard(tmp_path / "s.bin", expected_tokens=99)
    with pytest.raises(D.DataError, match="missing"):
        D.open_shard(tmp_path / "nope.bin")


def test_manifest_validation(tmp_path):
    with pytest.raises(D.DataError, match="no manifest.json"):
        D.TokenDataset.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(D.DataError, match="not valid JSON"):
        D.TokenDataset.open(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(D.DataError, match="not an llmjax token manifest"):
        D.TokenDataset.open(tmp_path)
    (tmp_path / "manifest.json").write_text("[]")
    with pytest.raises(D.DataError, match="not an llmjax token manifest"):
        D.TokenDataset.open(tmp_path)
    good = {"format": "llmjax-tokens", "version": D.VERSION, "dataset": "x", "tokenizer": {"kind": "gpt2"},
            "splits": {"train": [{"file": "train_0000.bin", "tokens": 5}]}}
    for broken in ({k: v for k, v in good.items() if k != "splits"}, {k: v for k, v in good.items() if k != "dataset"},
                   {**good, "splits": {"train": [{"file": 3}]}}, {**good, "splits": ["train"]}):
        (tmp_path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(D.DataError, match="is damaged"):
            D.TokenDataset.open(tmp_path)


def test_a_manifest_that_is_not_text_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(D.DataError, match="manifest.json is not UTF-8 text, so no manifest of a prepared dataset; prepare the dataset again"):
        D.TokenDataset.open(tmp_path)


def test_damaged_shards_are_found_by_their_sha256(tmp_path):
    ds = D.prepare_builtin("tinyshakespeare_char", tmp_path / "ds")
    assert ds.damaged_shards() == []
    val = ds.path / ds.manifest["splits"]["val"][0]["file"]
    raw = bytearray(val.read_bytes())
    raw[-1] ^= 0x80
    val.write_bytes(bytes(raw))
    changed = "val_0000.bin changed since it was prepared (its sha256 differs from the manifest's)"
    assert ds.damaged_shards() == [changed]
    (ds.path / "train_0000.bin").unlink()
    assert ds.damaged_shards() == ["train_0000.bin cannot be read (No such file or directory)", changed]
    ds.manifest["splits"]["train"][0]["file"] = "bad\0name.bin"  # (open() raises ValueError, not OSError)
    assert ds.damaged_shards()[0].startswith("bad\0name.bin cannot be read (")


def test_a_failed_shard_check_stops_every_process_in_one_line(tmp_path):
    """The trainer's answer to the shard check: damaged shards, or a check that raised (counted as
    damaged, so that with several processes every one still reaches the all-gather), become one line."""
    import concurrent.futures

    from llmjax.config import ConfigError
    from llmjax.train import check_shards

    ds = D.prepare_builtin("tinyshakespeare_char", tmp_path / "ds")
    done = concurrent.futures.Future()
    done.set_result([])
    check_shards(ds, done, 1)  # nothing damaged: nothing happens
    failed = concurrent.futures.Future()
    failed.set_exception(MemoryError("out of memory"))
    with pytest.raises(ConfigError, match=r"^dataset 'tinyshakespeare_char' in .*: \(the check failed: MemoryError: out of memory\); "
                                          r"delete that folder and prepare it again\. Stopped at step 7, nothing saved$"):
        check_shards(ds, failed, 7)


def test_builtin_datasets_prepare_once_and_decode_back(data_dir):
    text = (tok.ASSETS / "tinyshakespeare.txt").read_text()
    cut = int(len(text) * 0.9)
    char = D.open_dataset("tinyshakespeare_char", "unused")  # LLMJAX_DATA_DIR wins over data.dir
    assert char.path == data_dir / "tinyshakespeare_char"
    t = char.tokenizer()
    assert t.vocab_size == 65
    # nanoGPT's shakespeare_char ids (its sorted alphabet), the same in every process and on every host
    # that prepares it (an order of set() differs between processes: another host's token ids)
    assert t.chars == "".join(sorted(set(text))) and t.chars.startswith("\n !$&'")
    assert t.decode(char.split("train")[0]) == text[:cut] and t.decode(char.split("val")[0]) == text[cut:]
    mtime = (char.path / "manifest.json").stat().st_mtime_ns
    assert D.open_dataset("tinyshakespeare_char", "unused").manifest == char.manifest
    assert (char.path / "manifest.json").stat().st_mtime_ns == mtime  # idempotent: nothing rewritten
    bpe = D.open_dataset("tinyshakespeare", "unused")
    assert bpe.num_tokens("train") == 301_966 and bpe.num_tokens("val") == 36_059  # nanoGPT's figures
    assert bpe.tokenizer().decode(bpe.split("val")[0]) == text[cut:]


def test_unprepared_dataset_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path))
    with pytest.raises(D.DataError) as err:
        D.open_dataset("fineweb_edu", "data")
    assert f"python -m llmjax.prepare fineweb_edu --out {tmp_path / 'fineweb_edu'}" in str(err.value)


def test_tokenizers():
    gpt2 = tok.GPT2Tokenizer()
    assert gpt2.encode("Hello world") == [15496, 995] and gpt2.decode([15496, 995]) == "Hello world"
    assert gpt2.eot_id == 50256 and tok.from_description(gpt2.description()).encode("hi") == gpt2.encode("hi")
    char = tok.CharTokenizer("abc\n")
    assert char.decode(char.encode("cab\n")) == "cab\n"
    assert tok.from_description(char.description()).chars == "abc\n"
    with pytest.raises(tok.TokenizerError, match="'z' is not in this model's 4-character vocabulary"):
        char.encode("z")


def test_end_of_text_in_what_users_write(monkeypatch, tmp_path):
    """Training text keeps a literal "<|endoftext|>" as text, as nanoGPT prepares data; prompts and
    evaluation requests read it as the token, as nanoGPT's sampler and Hugging Face's tokenizer do."""
    from llmjax.scoring import encode_pair

    gpt2 = tok.GPT2Tokenizer()
    assert gpt2.encode_prompt("<|endoftext|>Once") == [50256, 7454]
    assert gpt2.encode("<|endoftext|>Once")[-1] == 7454 and 50256 not in gpt2.encode("<|endoftext|>Once")
    from llmjax.tokenize_worker import encode_documents  # (what llmjax.prepare writes of a .jsonl or .parquet text)

    assert encode_documents(["<|endoftext|>Once"]).tolist() == [50256] + gpt2.encode("<|endoftext|>Once")
    assert gpt2.encode_prompt("plain text") == gpt2.encode("plain text")
    assert encode_pair(gpt2, "", "<|endoftext|>Hello") == ([50256], [15496])  # lm-eval's rule for an empty context
    char = tok.CharTokenizer("<|>a")
    assert char.encode_prompt("<|>") == char.encode("<|>")


def test_the_gpt2_ranks_are_tiktokens_from_both_files(monkeypatch):
    """The encoding's ranks, read from encoder.json alone, are exactly those tiktoken builds from
    vocab.bpe's merges and encoder.json (which asserts the two agree), and it encodes as tiktoken's
    own "gpt2" encoding would (the merges applied by rank)."""
    import tiktoken.load

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # (tiktoken then reads the local files directly)
    folder = tok.ASSETS / "gpt2"
    want = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(folder / "vocab.bpe"),
                                                         encoder_json_file=str(folder / "encoder.json"))
    enc = tok.gpt2_encoding()
    assert enc._mergeable_ranks == want and len(want) == 50256 and enc.n_vocab == 50257
    assert enc.encode("Ünïcödé 😀 tabs\t\tand   spaces <|endoftext|>", allowed_special="all")[-1] == 50256


def test_the_shipped_bpe_files_are_checked_without_tiktokens_cache(monkeypatch, tmp_path):
    """The GPT-2 BPE files are checked against tiktoken's sha256 by llmjax itself: a damaged copy is
    one line whatever TIKTOKEN_CACHE_DIR says, and an unwritable cache folder does not matter."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "afile" / "cache"))  # cannot be created
    (tmp_path / "afile").write_text("x")
    tok.gpt2_encoding.cache_clear()
    try:
        assert tok.gpt2_encoding().encode_ordinary("Hello world") == [15496, 995]
        assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "afile" / "cache")  # (restored)
        bad = tmp_path / "assets"
        (bad / "gpt2").mkdir(parents=True)
        lines = (tok.ASSETS / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").splitlines(keepends=True)
        lines[1], lines[2] = lines[2], lines[1]  # two merges swapped
        (bad / "gpt2" / "vocab.bpe").write_text("".join(lines), encoding="utf-8")
        (bad / "gpt2" / "encoder.json").write_bytes((tok.ASSETS / "gpt2" / "encoder.json").read_bytes())
        monkeypatch.setattr(tok, "ASSETS", bad)
        for cache in ("", str(tmp_path / "c")):
            monkeypatch.setenv("TIKTOKEN_CACHE_DIR", cache)
            tok.gpt2_encoding.cache_clear()
            with pytest.raises(tok.TokenizerError, match="vocab.bpe is corrupt"):
                tok.gpt2_encoding()
    finally:
        tok.gpt2_encoding.cache_clear()
    with pytest.raises(tok.TokenizerError, match="vocab_size 5 but 3 characters"):
        tok.from_description({"kind": "char", "vocab_size": 5, "chars": "abc"})
    with pytest.raises(tok.TokenizerError, match="not a tokenizer description"):
        tok.from_description([])
    for damaged in ({"kind": "char"}, {"kind": "char", "chars": ["a", "b"]}):  # (a KeyError, a TypeError)
        with pytest.raises(tok.TokenizerError, match="without its 'chars'"):
            tok.from_description(damaged)
    with pytest.raises(tok.TokenizerError, match="unknown tokenizer kind 'bpe'"):
        tok.from_description({"kind": "bpe"})


def _shards():
    return [np.arange(0, 500, dtype=np.uint16), np.arange(1000, 1300, dtype=np.uint16)]


def test_windows_never_cross_shards_and_cover_every_start():
    src = D.WindowSource(_shards(), 9)
    assert len(src) == (500 - 8) + (300 - 8)
    windows = [src[i] for i in range(len(src))]
    assert all(np.all(np.diff(w) == 1) for w in windows)  # contiguous: never spans two shards
    assert {int(w[0]) for w in windows} == set(range(0, 492)) | set(range(1000, 1292))


def test_a_split_too_short_for_a_window_says_whether_its_shards_or_its_tokens_are():
    """Shards shorter than a window, in a split that holds many windows of tokens: said as such
    (prepare with larger shards), not as a split shorter than one window (lower the context)."""
    short = [np.arange(i * 500, (i + 1) * 500, dtype=np.uint16) for i in range(4)]
    with pytest.raises(D.DataError, match=r"shards are shorter than one window of 1025 tokens \(train: 2000 tokens in shards of at "
                                          r"most 500; a window never crosses shards\); prepare the dataset again with a larger --shard_tokens"):
        D.train_batches(short, seq_len=1024, global_batch=2, seed=0)
    with pytest.raises(D.DataError, match=r"the split is shorter than one window of 2001 tokens \(val: 2000 tokens\); lower model.context_len"):
        D.WindowSource(short, 2001, "val")
    # a small corpus's held-out tail (1% of it) is shorter than a window: more validation text is the fix, not only a shorter context
    with pytest.raises(D.DataError, match=r"\(val: 2000 tokens\); lower model.context_len, or prepare the dataset with more validation "
                                          r"text \(a held-out tail is the last 1% of the text; a val= --source gives the split\)$"):
        D.WindowSource(short, 2001, "val")
    with pytest.raises(D.DataError, match=r"\(train: 2000 tokens\); lower model.context_len, or prepare the dataset from more text$"):
        D.WindowSource(short, 2001, "train")
    assert len(D.WindowSource(short, 500)) == 4


def test_train_batches_deterministic_resumable_and_process_sharded():
    it = D.train_batches(_shards(), seq_len=8, global_batch=6, seed=3)
    first = [next(it) for _ in range(5)]
    again = D.train_batches(_shards(), seq_len=8, global_batch=6, seed=3)
    for a in first:
        np.testing.assert_array_equal(a, next(again))
    state = again.get_state()
    want = [next(again) for _ in range(3)]
    resumed = D.train_batches(_shards(), seq_len=8, global_batch=6, seed=3)
    resumed.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(resumed), w)
    other = D.train_batches(_shards(), seq_len=8, global_batch=6, seed=4)
    assert not np.array_equal(next(other), first[0])
    # Two processes: each gets half the rows; together, the same windows as one process.
    halves = [D.train_batches(_shards(), seq_len=8, global_batch=6, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for step in range(5):
        parts = [next(h) for h in halves]
        assert parts[0].shape == (3, 9)
        assert sorted(map(tuple, np.concatenate(parts).tolist())) == sorted(map(tuple, first[step].tolist()))


def test_every_window_once_per_epoch_in_a_new_order_each_epoch():
    """An epoch of train_batches is every window of the split exactly once, and the next epoch is
    another order of them (a repeat that replayed the first epoch's order passed the tests above)."""
    src = D.WindowSource(_shards(), 9)  # 784 windows: 98 batches of 8 make one epoch
    everything = sorted(tuple(src[i].tolist()) for i in range(len(src)))
    it = D.train_batches(_shards(), seq_len=8, global_batch=8, seed=3, threads=0)
    epochs = [[tuple(row) for _ in range(len(src) // 8) for row in next(it).tolist()] for _ in range(2)]
    for rows in epochs:
        assert sorted(rows) == everything  # each window once
    assert epochs[0] != epochs[1]
    assert sum(a == b for a, b in zip(*epochs)) < 20  # (a fresh order, not a rotated or partly kept one)


def test_sequential_windows_score_every_token_once():
    shards = _shards()
    seen = []
    for toks, mask in D.sequential_windows(shards, seq_len=7, batch=4):
        assert toks.shape == (4, 8) and mask.shape == (4, 7)
        for row, m in zip(toks, mask):
            seen += [int(t) for t, keep in zip(row[1:], m) if keep]
    want = [int(t) for s in shards for t in s[1:]]
    assert seen == want
    for seq_len, batch in ((7, 4), (1, 1), (50, 3), (1000, 2)):
        assert D.sequential_batch_count(shards, seq_len=seq_len, batch=batch) == len(list(D.sequential_windows(shards, seq_len=seq_len, batch=batch)))


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    D.atomic_write_json(target, {"a": 1})

    def broken():
        yield b"partial"
        raise OSError("disk full")

    with pytest.raises(OSError):
        D.atomic_write_bytes(target, broken())
    assert json.loads(target.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["f.json"]


def test_atomic_write_keeps_the_permissions_of_the_file_it_replaces(tmp_path):
    """A rewritten file (bench --doc's document, evaluate --output_json's, compare's results) keeps
    its own mode (it took 0666 & ~umask); a new one gets what a file written in place would."""
    new = tmp_path / "new.md"
    D.atomic_write_bytes(new, b"a")
    assert new.stat().st_mode & 0o7777 == 0o666 & ~D.umask()
    for mode, kept in ((0o600, 0o600), (0o755, 0o755), (0o640, 0o640), (0o444, 0o644)):  # (writable by its owner: the trainer
        target = tmp_path / f"doc{mode:o}.md"  # appends to the metrics.jsonl it rewrote on a resume)
        target.write_text("old")
        target.chmod(mode)
        D.atomic_write_bytes(target, b"new")
        assert (target.read_text(), target.stat().st_mode & 0o7777) == ("new", kept)


def test_a_misspelt_name_of_a_prepared_dataset_is_suggested(tmp_path, monkeypatch):
    """A typo of the user's own prepared dataset names it, as a typo of a built-in one does."""
    monkeypatch.setenv("LLMJAX_DATA_DIR", str(tmp_path))
    (tmp_path / "mytexts").mkdir()
    (tmp_path / "mytexts" / D.MANIFEST).write_text("{}")
    (tmp_path / "mytext_unfinished").mkdir()  # no manifest: not a prepared dataset, never suggested
    with pytest.raises(D.DataError, match=r"^unknown dataset 'mytext' \(did you mean 'mytexts'\?\)"):
        D.open_dataset("mytext", "data")


def test_a_train_split_with_fewer_windows_than_one_batch_is_refused():
    """grain's repeat filled a batch from a split of fewer windows than its rows with the same
    windows again (65 tokens at seq_len 64: one window, 8 copies of it); refused, in one line. The
    windows of every shard count (a window never crosses shards), and a batch of as many rows as the
    split has windows is taken."""
    with pytest.raises(D.DataError, match=r"^the train split is too small for one batch: 65 tokens hold 1 window of 65 tokens "
                                          r"\(model.context_len \+ 1\), and one batch needs 8 different windows \(train.batch_size x "
                                          r"train.grad_accum_steps\), 72 tokens or more; lower train.batch_size or model.context_len, "
                                          r"or prepare the dataset from more text$"):
        D.train_batches([np.arange(65, dtype=np.uint16)], seq_len=64, global_batch=8, seed=0)
    two = [np.arange(12, dtype=np.uint16), np.arange(100, 112, dtype=np.uint16)]  # 4 windows of 9 in each
    with pytest.raises(D.DataError, match=r"24 tokens hold 8 windows of 9 tokens .* needs 9 different windows"):
        D.train_batches(two, seq_len=8, global_batch=9, seed=0)
    batch = next(D.train_batches(two, seq_len=8, global_batch=8, seed=0, threads=0))
    assert len({tuple(row) for row in batch.tolist()}) == 8  # every window once
