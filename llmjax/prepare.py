"""`python -m llmjax.prepare <dataset> [--out DIR] [--source PATH_OR_URL ...] [--workers N]`

Tokenises a corpus into the trainer's token format (llmjax.data: uint16 shards behind a 64-byte
header, and manifest.json), streaming and in parallel:

- datasets: `tinyshakespeare`, `tinyshakespeare_char` (the text shipped in the package),
  `tinystories` (TinyStoriesV2-GPT4 train and valid text of roneneldan/TinyStories) and `fineweb_edu`
  (HuggingFaceFW/fineweb-edu, sample-10BT: about 10B GPT-2 tokens in 14 parquet files). Downloads go
  through huggingface_hub (its cache; retried, but not a 4xx answer other than 408/429: that fails at
  once); `--source` takes local files or URLs instead:
  `.txt` (documents separated by `<|endoftext|>`), `.jsonl` (a "text" field per line) or `.parquet`
  (a "text" column), optionally as `train=PATH` / `val=PATH`.
- each document is preceded by the end-of-text token, so documents are separated by it (and a
  sample that starts from end-of-text starts a document); shards hold `--shard_tokens` tokens (100M)
  and a document may continue into the next shard.
- validation: the dataset's own split where it has one (TinyStories valid, or `val=` sources);
  otherwise a held-out tail of whole documents: those that start in the last 1% of the source
  bytes, and at least the last one; their count is recorded in the manifest. Everything is one
  pass over the sources.
- a .txt document longer than PIECE_CHARS (a book, a file without separators) is read in pieces cut
  where the tokens do not change (_txt_records), and also at the held-out tail's start.
- tokenisation runs in `--workers` processes (tiktoken's batch encoding), on batches of about 4 MB
  of text, with a bounded number in flight: memory stays flat whatever the corpus size. The
  progress bar shows source bytes (with ETA), documents, tokens and tokens/s.
- resumable: each finished shard is recorded in `.prepare_state.json` (atomically, with the
  document where the batch that completed it starts and how many of its tokens are written); a rerun with the same arguments skips the finished shards and
  redoes the partial one. manifest.json, which the trainer looks for, is written last, so an
  interrupted preparation is never mistaken for a finished one. Every file is written atomically.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
from concurrent.futures.process import BrokenProcessPool
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from absl import flags

from llmjax import data as D
from llmjax import tokenize_worker
from llmjax import tokenizer as tok
from llmjax.runtime import exclusive_folder, logger_level

EOT_TEXT = "<|endoftext|>"
SHARD_TOKENS = 100_000_000
BATCH_BYTES = 4 << 20
PIECE_CHARS = 1 << 16  # a longer .txt document is read in pieces (_txt_records)
STATE = ".prepare_state.json"
HUB = {
    "tinystories": dict(
        repo_id="roneneldan/TinyStories",
        files={"train": ["TinyStoriesV2-GPT4-train.txt"], "val": ["TinyStoriesV2-GPT4-valid.txt"]},
    ),
    "fineweb_edu": dict(repo_id="HuggingFaceFW/fineweb-edu", prefix="sample/10BT/", files=None),
}
DATASETS = (*D.BUILTIN, *HUB)


class PrepareError(ValueError):
    """A preparation problem a user can fix (one line)."""


# ---------------------------------------------------------------------------------------------
# Sources: files -> a stream of documents


@dataclass(frozen=True)
class Source:
    path: Path
    split: str | None  # "train", "val", or None (train, with a held-out val tail)
    url: str | None = None  # downloaded to `path` (download_url) where not there yet

    @property
    def kind(self) -> str:
        name = self.path.name.lower()
        for ext in ("parquet", "jsonl", "txt"):
            if name.endswith("." + ext):
                return ext
        raise PrepareError(f"{self.url or self.path}: unknown source type; use .txt (documents separated by {EOT_TEXT}), .jsonl or .parquet")


def read_documents(src: Source, mark: float | None = None) -> Iterator[tuple[str, int, bool]]:
    """(text, source bytes it took, whether it starts a document) for each document of a source,
    streamed. A .txt document longer than PIECE_CHARS comes in pieces, one of which starts at byte
    `mark` if the document holds it (_txt_records). Blank documents (and parquet's null rows) are
    skipped, in every format; a UTF-8 byte-order mark opening a txt file is not text. Text that is not
    UTF-8, or a txt file holding a NUL byte, is a PrepareError naming the file (`not_utf8`)."""
    try:
        # the bytes of skipped records count with the next document (the last one: with it), so that
        # the held-out tail is the last 1% of the source's bytes and the progress bar reaches the end
        last, skipped = None, 0
        for doc, nbytes, starts in _read_documents(src, mark):
            if doc is None:
                skipped += nbytes
                continue
            if last is not None:
                yield last
            last, skipped = (doc, nbytes + skipped, starts), 0
        if last is not None:
            yield last[0], last[1] + skipped, last[2]
    except (UnicodeDecodeError, _NulByte) as e:
        raise PrepareError(not_utf8(src.path) or f"{src.path} is not UTF-8 text ({getattr(e, 'reason', 'a NUL byte')}); "
                           "convert it, e.g. with iconv -f latin1 -t utf-8") from None


class _NulByte(Exception):
    """A .txt source holds a NUL character (said by `not_utf8`)."""


def not_utf8(path: Path) -> str | None:
    """Why a file is no UTF-8 text, in one line with the conversion to use: a UTF-16 or UTF-32
    byte-order mark, else its first NUL byte (UTF-16 text without a mark decodes as UTF-8 with a NUL
    after each ASCII character, silently: no text holds one) or byte that is not UTF-8, located by
    its offset in the file and its line; None if it has none. Read up to that place, in blocks."""
    fixed = path.with_name(path.stem + ".utf8" + path.suffix)

    def convert(encoding: str) -> str:
        return f"iconv -f {encoding} -t utf-8 {shlex.quote(str(path))} > {shlex.quote(str(fixed))}"

    with open(path, "rb") as f:
        head = f.read(4)
    for bom, kind in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):
        if head.startswith(bom):
            return f"{path} is {kind} text (it opens with {kind}'s byte-order mark), not UTF-8; convert it, e.g. with {convert(kind.lower())}"
    base, line, pending, NL = 0, 1, b"", b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            data, keep = pending + block, 0
            bad = None
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                if e.end == len(data) and e.reason == "unexpected end of data":  # a character the next block ends
                    keep = len(data) - e.start
                else:
                    bad = e
            nul = data.find(b"\0", 0, len(data) - keep)
            at = nul if nul >= 0 and (bad is None or nul < bad.start) else None if bad is None else bad.start
            where = "" if at is None else f"byte {base + at:,} (line {line + data.count(NL, 0, at):,})"
            if at == nul and base + at < 2:  # (UTF-16's ASCII characters: "a\0b\0", or "\0a\0b" big-endian)
                return (f"{path} holds a NUL byte at {where}, which no text holds: UTF-16 text without a byte-order mark? convert it, "
                        f"e.g. with {convert('utf-16le' if at else 'utf-16be')}; or it is no text file")
            if at == nul:
                return (f"{path} holds a NUL byte at {where}, which no text holds (a damaged or binary file?); remove the NUL bytes, "
                        f"e.g. with tr -d '\\000' < {shlex.quote(str(path))} > {shlex.quote(str(fixed))}")
            if at is not None:
                return (f"{path} is not UTF-8 text (0x{data[at]:02x}, {bad.reason}, at {where}); convert it, e.g. with "
                        f"{convert('latin1')} if it is Latin-1 (-f cp1252: Windows text)")
            line += data.count(NL, 0, len(data) - keep)
            base += len(data) - keep
            pending = data[len(data) - keep :]
    if pending:
        return (f"{path} is not UTF-8 text (0x{pending[0]:02x} at byte {base:,} (line {line:,}) starts a character that the file does not "
                f"finish); if it was not cut short, convert it, e.g. with {convert('latin1')} if it is Latin-1 (-f cp1252: Windows text)")
    return None


# Where a text can be cut so that GPT-2's tokens of the two parts are those of the whole: before a
# line break or a space that follows a character that is not whitespace. The tokeniser's regex
# pre-tokeniser ends a token there in any case, and what it reads after the cut does not depend on
# what came before. (Python's \S and str.isspace cover every character the regex's \s does.)
_CUT = re.compile(r"(?<=\S)[\n ]")


def _cut_before(text: str, limit: int) -> int:
    """The last cut (_CUT) at or before `limit`, a line break in its second half if there is one;
    `limit` itself where there is no cut at all (a stretch of PIECE_CHARS without a space or line
    break: the tokens may differ at that one place)."""
    for lo in (limit // 2, 1):
        for sep in ("\n", " "):
            i = text.rfind(sep, lo, limit + 1)
            while i >= lo:
                if not text[i - 1].isspace():
                    return i
                i = text.rfind(sep, lo, i)
    return limit


def _txt_records(f, mark: float | None) -> Iterator[tuple[str | None, int, bool]]:
    """The records of a .txt source: documents separated by end-of-text, a longer one than
    PIECE_CHARS cut into pieces of at most that (at _cut_before), so that a file without separators
    (a book, a dump) streams in bounded memory and is tokenised in parallel; a long document is also
    cut at byte `mark` (the held-out tail's start) or at the first cut after it."""
    rest, starts, offset = "", True, 0  # offset: the source bytes before `rest`
    held: list[tuple[str, int, bool]] = []  # a long document's leading blank pieces, until it shows text

    def records(text: str, sep_bytes: int, starts: bool, long: bool, ends: bool):
        nonlocal offset
        raw = text.encode()
        if long and not text.strip() and (held or starts):  # blank so far: skipped if the document stays blank
            if not ends:
                held.append((text, len(raw), starts))
                offset += len(raw)
                return
            for _, nbytes, first in held:
                yield None, nbytes, first
            held.clear()
            yield None, len(raw) + sep_bytes, starts
            offset += len(raw) + sep_bytes
            return
        for piece in held:  # (the document has text: its blank start is text too)
            yield piece
        held.clear()
        if long and mark is not None and offset < mark < offset + len(raw):
            at = len(raw[: math.ceil(mark - offset)].decode(errors="ignore"))
            m = _CUT.search(text, at)
            if m is not None and m.start() > 0:
                head, text = text[: m.start()], text[m.start() :]
                yield head, len(head.encode()), starts
                offset += len(head.encode())
                starts, raw = False, text.encode()
        # a piece of a long document that has text is never skipped: its whitespace is text too
        yield None if not long and not text.strip() else text, len(raw) + sep_bytes, starts
        offset += len(raw) + sep_bytes

    def pieces(text: str, keep: int):
        """The leading pieces of `text` while it is longer than PIECE_CHARS + `keep`; what is left."""
        nonlocal starts
        while len(text) > PIECE_CHARS + keep:
            cut = _cut_before(text, PIECE_CHARS)
            yield from records(text[:cut], 0, starts, long=True, ends=False)
            text, starts = text[cut:], False
        return text

    while True:
        block = f.read(1 << 22)
        if not block:
            break
        if "\0" in block:  # (UTF-16 text read as UTF-8: said by read_documents)
            raise _NulByte
        parts = (rest + block).split(EOT_TEXT)
        rest = parts.pop()
        for doc in parts:
            doc = yield from pieces(doc, 0)
            yield from records(doc, len(EOT_TEXT), starts, long=not starts, ends=True)
            starts = True
        rest = yield from pieces(rest, len(EOT_TEXT))  # (a partial end-of-text at its end stays in `rest`)
    rest = yield from pieces(rest, 0)
    yield from records(rest, 0, starts, long=not starts, ends=True)


def _read_documents(src: Source, mark: float | None) -> Iterator[tuple[str | None, int, bool]]:
    """(text or None for a skipped record, the source bytes it took, whether it starts a document)."""
    kind = src.kind
    if kind == "txt":
        with open(src.path, "r", encoding="utf-8-sig", newline="") as f:
            yield from _txt_records(f, mark)
    elif kind == "jsonl":
        with open(src.path, "rb") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    yield None, len(line), True
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise PrepareError(f"{src.path}: line {i + 1} is not a JSON object with a 'text' field") from None
                if text is not None and not isinstance(text, str):
                    raise PrepareError(f"{src.path}: line {i + 1} has a 'text' that is a {type(text).__name__}, not a string "
                                       "(null is skipped); convert the file to one document per line as {\"text\": \"...\"}")
                yield text if text and text.strip() else None, len(line), True
    else:
        pf = _parquet(src.path)
        # each row's share of the file: its text's share of the column's text bytes (a first pass over
        # the column in pyarrow; parquet compresses, so the file's bytes are spread by text bytes, a
        # null row taking an offset's 4)
        import pyarrow.compute as pc

        text_bytes = sum(4 * b.num_rows + (pc.sum(pc.binary_length(b.column(0))).as_py() or 0)
                         for b in pf.iter_batches(columns=["text"], batch_size=65536))
        scale = src.path.stat().st_size / max(text_bytes, 1)
        row = 0
        for batch in pf.iter_batches(columns=["text"], batch_size=2048):
            try:
                texts = batch.column(0).to_pylist()
            except UnicodeDecodeError:  # (parquet does not check its strings; said by the row, not by the file's bytes)
                raise PrepareError(_not_utf8_row(src.path, batch.column(0), row)) from None
            row += batch.num_rows
            for text in texts:
                yield text if text and text.strip() else None, (4 + len(text.encode() if text else b"")) * scale, True


def _not_utf8_row(path: Path, column, first_row: int) -> str:
    """Which row of a batch of a parquet 'text' column is not UTF-8 (the file's own bytes are
    compressed binary: locating a byte in them, as `not_utf8` does a text file, said to strip its
    NUL bytes with tr)."""
    for i, value in enumerate(column):
        try:
            value.as_py()
        except UnicodeDecodeError as e:
            return (f"{path}: row {first_row + i + 1:,} of its 'text' column is not UTF-8 text (0x{e.object[e.start]:02x}, {e.reason}, "
                    f"at byte {e.start:,} of the row); write the file again with that column decoded to UTF-8 (or without that row)")
    return f"{path}: its 'text' column holds text that is not UTF-8; write the file again with that column decoded to UTF-8"


def check_source(src: Source) -> None:
    """What can be known of a source without reading it through: its type, that it can be read, and
    a parquet file's 'text' column (a PrepareError or OSError naming the file)."""
    if src.kind == "parquet":
        _parquet(src.path)
    else:
        with open(src.path, "rb") as f:
            head = f.read(1 << 16)
        # UTF-16 or UTF-32 text (a byte-order mark or NUL bytes at its start): said now, not once the
        # sources before it are tokenised (the rest of a file is checked as it is read)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\0" in head:
            raise PrepareError(not_utf8(src.path) or f"{src.path} is not UTF-8 text")


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError("parquet sources need pyarrow: bash scripts/setup.sh prepare") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise PrepareError(f"{path} is not a readable parquet file ({type(e).__name__})") from None
    if "text" not in pf.schema_arrow.names:
        raise PrepareError(f"{path}: no 'text' column (has {', '.join(pf.schema_arrow.names)})")
    import pyarrow as pa

    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        raise PrepareError(f"{path}: its 'text' column holds {kind}, not strings")
    return pf


# ---------------------------------------------------------------------------------------------
# Downloads


def _unresolved(e: BaseException) -> bool:
    """Whether a host name could not be resolved somewhere in the error's chain (offline)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, socket.gaierror):
            return True
        e = e.__cause__ or e.__context__
    return False


def _refused(e: BaseException) -> str | None:
    """'HTTP 404 Not Found' where the server answered with a client error somewhere in the error's
    chain (urllib's HTTPError; huggingface_hub's HfHubHTTPError, its response's status): a missing
    file or one the user may not read, which asking again does not change. 408 (request timeout)
    and 429 (too many requests) are transient, as are the server's own errors (5xx): None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        status = e.code if isinstance(e, urllib.error.HTTPError) else getattr(response, "status_code", None)
        if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
            reason = e.reason if isinstance(e, urllib.error.HTTPError) else getattr(response, "reason_phrase", "")
            return f"HTTP {status} {reason}".strip()
        e = e.__cause__ or e.__context__
    return None


def _retry(fn, what: str, tries: int = 5, *, retries_itself: bool = False):
    """fn() with `tries` attempts, each failure said on stderr (offline, the waits add up).
    `retries_itself`: fn retries a connection itself (huggingface_hub: five times in about 23 s), so
    a host name it could not resolve ends the download at once. A client error the server answered
    (404, 403: `_refused`) ends it at once too."""
    for attempt in range(tries):
        try:
            return fn()
        except Exception as e:  # network errors come in many types
            if status := _refused(e):
                raise PrepareError(f"cannot download {what}: the server answered {status} (not retried: asking again gets the same); "
                                   "check the address and your access to it, or give local files with --source") from None
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if retries_itself and _unresolved(e):
                raise PrepareError(f"cannot download {what}: no network (its host name does not resolve); connect, or give local "
                                   "files with --source") from None
            if attempt == tries - 1:
                raise PrepareError(f"cannot download {what}: {why}") from None
            wait = min(2**attempt, 30)
            print(f"prepare: downloading {what} failed ({why[:200]}); try {attempt + 2} of {tries} in {wait} s", file=sys.stderr, flush=True)
            time.sleep(wait)


def url_target(url: str, cache: Path) -> Path:
    """Where `url` is downloaded in `cache`: named as the URL's path ends (without its query:
    ".../data.jsonl?download=true" is a .jsonl), so its type is known before it is downloaded."""
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]) or "download"
    return cache / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def download_url(url: str, target: Path) -> None:
    """Download `url` to `target` (atomically, retried), unless an earlier run did."""
    if target.is_file():
        return

    def fetch():
        with urllib.request.urlopen(url, timeout=60) as r:
            D.atomic_write_bytes(target, iter(lambda: r.read(1 << 20), b""))

    _retry(fetch, url)


def hub_sources(name: str) -> list[Source]:
    try:
        from huggingface_hub import HfApi, hf_hub_download
    except ImportError:
        raise PrepareError("downloading needs huggingface_hub: bash scripts/setup.sh prepare (or give local files with --source)") from None
    spec = HUB[name]
    files = spec["files"]
    # huggingface_hub's logger held to errors: offline, each of its own tries was a warning line on
    # stderr, twice (its handler's and absl's), a dozen lines before our one-line error
    with logger_level("huggingface_hub", logging.ERROR):
        if files is None:
            listing = _retry(lambda: HfApi().list_repo_files(spec["repo_id"], repo_type="dataset"), spec["repo_id"], retries_itself=True)
            files = {None: sorted(f for f in listing if f.startswith(spec["prefix"]) and f.endswith(".parquet"))}
        out = []
        for split, names in files.items():
            for fname in names:
                path = _retry(lambda f=fname: hf_hub_download(spec["repo_id"], f, repo_type="dataset"), f"{spec['repo_id']}/{fname}",
                              retries_itself=True)
                out.append(Source(Path(path), split))
    return out


def parse_sources(items: list[str], cache: Path, *, download: bool = True) -> list[Source]:
    """The --source arguments as Sources, each checked (a split, a file, its type: a URL's by its
    name) before any URL is downloaded; `download` False leaves that to `prepare`, after its own
    checks."""
    out = []
    for item in items:
        split = None
        prefix, eq, rest = item.partition("=")
        if eq and "/" not in prefix and "." not in prefix and not Path(item).expanduser().is_file():  # (a file may have = in its name)
            if prefix not in ("train", "val"):
                raise PrepareError(f"--source {item}: no such file, and {prefix}= is no split (train= or val=)")
            split, item = prefix, rest
        if not item:  # (Path("") is the working folder: "--source  is a folder", with a suggestion of //a.txt)
            raise PrepareError(f"--source {split + '=' if split else ''} is empty (a shell variable that was not set?); give a file, "
                               "or drop it")
        if item.startswith(("http://", "https://")):
            out.append(Source(url_target(item, cache), split, url=item))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            d = item.rstrip("/") or "/"
            raise PrepareError(f"--source {item} is a folder; give its files, one --source each (--source {d}/a.txt "
                               f"--source {d}/b.txt ...)")
        if not path.is_file():
            raise PrepareError(f"--source {item}: no such file")
        out.append(Source(path.absolute(), split))
    # every type now (Source.kind raises): a .jsonl.gz URL, or a missing file after a URL, was
    # refused only once the URL was downloaded (gigabytes, or a minute of retries offline)
    for src in out:
        src.kind  # noqa: B018 (the property raises for another type)
    if download:
        fetch_sources(out)
    return out


def fetch_sources(sources: list[Source]) -> None:
    for src in sources:
        if src.url is not None:
            download_url(src.url, src.path)


# ---------------------------------------------------------------------------------------------
# Tokenising


class ShardWriter:
    """Fills fixed-size shards of one split. `on_shard(shards, resume)` is called after each shard
    is written, with where the input must restart to redo what follows it."""

    def __init__(self, out: Path, split: str, shard_tokens: int, done: list[dict], on_shard):
        self.out, self.split, self.size = out, split, shard_tokens
        self.shards = list(done)
        self.parts: list[np.ndarray] = []  # the next shard's tokens so far (views of the batches': held, not copied)
        self.fill = 0
        self.on_shard = on_shard

    def add(self, tokens: np.ndarray, batch_doc: int, skip: int = 0) -> None:
        pos = skip
        while pos < len(tokens):
            n = min(self.size - self.fill, len(tokens) - pos)
            self.parts.append(tokens[pos : pos + n])
            self.fill += n
            pos += n
            if self.fill == self.size:  # restart: re-tokenise this batch, keep what follows `pos`
                self._flush({"doc": batch_doc, "skip_tokens": pos})

    def close(self, next_doc: int) -> None:
        if self.fill:
            self._flush({"doc": next_doc, "skip_tokens": 0})

    def _flush(self, resume: dict) -> None:
        entry = D.write_shard(self.out / f"{self.split}_{len(self.shards):04d}.bin", self.parts)
        self.shards.append(entry)
        self.parts, self.fill = [], 0
        self.on_shard(self.split, self.shards, resume)


def stream_documents(sources: list[Source], held_out: bool) -> Iterator[tuple[int, str, int, str, bool]]:
    """(index, text, source bytes, split, whether it starts a document) for every document (or piece
    of a long .txt document) of the sources, in order, in one pass. With `held_out`, the records
    that start in the last 1% of the source bytes form the validation split (a long .txt document is
    cut there), and the last one always does (one record of lookahead)."""
    if not held_out:
        n = 0
        for src in sources:
            for doc, nbytes, starts in read_documents(src):
                yield n, doc, nbytes, src.split or "train", starts
                n += 1
        return
    threshold = 0.99 * sum(s.path.stat().st_size for s in sources)
    seen, prev, n = 0, None, 0
    for src in sources:
        for doc, nbytes, starts in read_documents(src, mark=threshold - seen):
            if prev is not None:
                yield prev
            prev = (n, doc, nbytes, "val" if seen >= threshold else "train", starts)
            seen += nbytes
            n += 1
    if prev is not None:
        yield (*prev[:3], "val", prev[4])


def _stop(pool: cf.ProcessPoolExecutor) -> None:
    """Shut a pool down after an interruption or a failure: the batches not started are dropped
    (the next run redoes them), the ones running finish (a worker killed while it sends its tokens
    back leaves the result pipe cut mid-message, and the pool's reader waits on it for ever). A
    second Ctrl-C or SIGTERM waits the second or so this takes: it used to cut the shutdown short,
    and the command then hung at exit, joining workers that never got their stop."""
    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        pool.shutdown(wait=True, cancel_futures=True)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class _SignalsHeld:
    """SIGINT and SIGTERM held back for a moment and raised as it ends, where the main thread runs:
    the pool starts a spawned worker inside `submit`, writing its start-up data down a pipe, and a
    Ctrl-C or SIGTERM raised in the middle of that write left the worker reading half of it, a
    traceback (EOFError: Ran out of input) under the command's one line."""

    def __enter__(self):
        self.got, self.saved = [], {}
        if threading.current_thread() is threading.main_thread():
            self.saved = {sig: signal.signal(sig, lambda sig, frame: self.got.append(sig)) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        if self.got:  # (the first one, as its own handler would have taken it)
            handler = self.saved[self.got[0]]
            handler(self.got[0], None) if callable(handler) else signal.raise_signal(self.got[0])
        return False


def tokenize(stream, *, out: Path, shard_tokens: int, workers: int, state: dict, save_state, bar=None) -> dict:
    """Tokenise a document stream into train and val shards in one pass, resuming from
    state["resume"]. Returns the document counts per split (a long document cut between them counts
    in both) and in all ("documents")."""
    resume = state.get("resume", {"doc": 0, "skip_tokens": 0})
    closed = set(state.get("closed", []))

    def on_shard(split, shards, where):
        state[split] = shards
        state["resume"] = where
        save_state()

    writers = {sp: ShardWriter(out, sp, shard_tokens, state.get(sp, []), on_shard) for sp in ("train", "val")}
    counts = {"train": 0, "val": 0, "documents": 0, "records": 0}

    def batches():
        batch, size, first, split, last_split = [], 0, None, None, None
        for n, doc, nbytes, sp, starts in stream:
            counts[sp] += starts or sp != last_split
            counts["documents"] += starts
            counts["records"] += 1
            last_split = sp
            if n < resume["doc"]:  # done in an earlier run
                if bar is not None:
                    bar.update(nbytes)
                continue
            if batch and (sp != split or size >= BATCH_BYTES):
                yield first, split, batch, size
                batch, size = [], 0
            if not batch:
                first, split = n, sp
            batch.append((doc, starts))
            size += nbytes
        if batch:
            yield first, split, batch, size

    pending: collections.deque = collections.deque()
    skip = {"tokens": resume["skip_tokens"]}

    def take():
        fut, first, split, n_docs, nbytes = pending.popleft()
        toks = fut.result()
        for sp in ("train",) if split == "val" else ():
            if sp not in closed:  # the training documents are over: their last shard
                writers[sp].close(next_doc=first)
                closed.add(sp)
                state["closed"] = sorted(closed)
                save_state()
        writers[split].add(toks, first, skip["tokens"])
        skip["tokens"] = 0
        if bar is not None:
            bar.docs += n_docs  # (documents that start in the batch)
            bar.tokens += len(toks)
            rate = bar.tokens / max(time.perf_counter() - bar.t0, 1e-9)
            bar.set_postfix(docs=f"{bar.docs:,}", tokens=f"{bar.tokens:,}", tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(nbytes)

    ctx = multiprocessing.get_context("spawn")  # never fork a process that may run JAX threads
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=tokenize_worker.init, initargs=(os.getpid(),))
    try:
        for first, split, batch, nbytes in batches():
            docs, starts = zip(*batch)
            with _SignalsHeld():  # (it may start a worker)
                future = pool.submit(tokenize_worker.encode_documents, list(docs), list(starts))
            pending.append((future, first, split, sum(starts), nbytes))
            while len(pending) > 2 * workers or (pending and pending[0][0].done()):
                take()  # in order; at most 2 * workers batches of text in flight
        while pending:
            take()
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown()
    for sp in ("train", "val"):
        if sp not in closed:
            writers[sp].close(next_doc=counts["records"])
            closed.add(sp)
    return counts


def default_workers() -> int:
    """The CPUs this process may run on (taskset, Slurm's --cpus-per-task, a cgroup cpuset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # (macOS has no sched_getaffinity)
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# The whole preparation


def prepare(name: str, out: Path, sources: list[Source] | None = None, *, workers: int | None = None,
            shard_tokens: int = SHARD_TOKENS, progress: bool = True, stop_after_shards: int | None = None) -> D.TokenDataset:
    """Prepare dataset `name` into `out` from `sources` (default: its Hugging Face files). Returns
    the opened dataset. Idempotent; resumes an interrupted run with the same arguments."""
    out = Path(out).absolute()
    # (the dataset's folder under the data folder, and what data.dataset names: "" was the data
    # folder itself, and "a/../.." refused only after it made data/a)
    if not name.strip() or name != name.strip() or Path(name).is_absolute() or any(p in (".", "..") for p in name.replace("\\", "/").split("/")):
        raise PrepareError(f"dataset name {name!r} is no folder name under the data folder; give a name such as mytext (what "
                           "--config.data.dataset then names)")
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out} is a file, not a folder; give --out a folder (new or one this command wrote)")
    _refuse_anothers_unfinished(name, out, builtin=name in D.BUILTIN and not sources)
    if name in D.BUILTIN and not sources:
        return D.prepare_builtin(name, out, repair=True)
    if name not in DATASETS and not sources:
        raise PrepareError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)} (or give --source files)")
    if shard_tokens <= 0:
        raise PrepareError("--shard_tokens must be positive")
    if workers is not None and workers < 0:
        raise PrepareError(f"--workers must be at least 1 (0: one per CPU), got {workers}")
    workers = workers or default_workers()
    _refuse_users_folder(out)  # (and again under the lock, below)
    _refuse_another_dataset(name, out)
    # downloads (the hub's, a --source URL's) only once the arguments are known to be good: a user's
    # folder as --out was refused after fineweb_edu's 14 files were downloaded
    sources = sources if sources else hub_sources(name)
    # a file given twice (a shell glob and the file by name, say): its documents twice, and the
    # validation documents (its held-out tail, or all of it as val= and train=) training ones too
    # (a URL given twice: said with the URL, before it is downloaded)
    seen: dict[Path, Source] = {}
    for src in sources:
        if (first := seen.setdefault(src.path.resolve(), src)) is not src:
            how = "" if first.split == src.split else f" (as {first.split or 'a source'} and as {src.split or 'a source'})"
            again = "given twice" if src.path == first.path else f"{first.path} again"
            raise PrepareError(f"--source {src.url or src.path} is {again}{how}: its documents would be prepared twice, and validation "
                               "documents trained on; give each file once")
    fetch_sources(sources)
    for src in sources:  # each source's type now, not once the ones before it are tokenised (hours, for a corpus)
        check_source(src)
    # a source is known by its path, size and modification time: an edited file is read again
    args = {"dataset": name, "sources": [[str(s.path), s.split, s.path.stat().st_size, s.path.stat().st_mtime_ns] for s in sources],
            "shard_tokens": shard_tokens}

    if not any(s.split in (None, "train") for s in sources):
        raise PrepareError("no training source (give a file without 'val=')")
    # the folders made here, `out` first, then the parents it needed (a/b for a/b/c): a run that fails
    # before its first finished shard removes these (where still empty), never a folder that was there
    created = D.missing_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    with _only_preparation(out):  # (from here, what is in `out` is this run's to read and change)
        return _prepare_locked(name, out, sources, args, created, workers=workers, shard_tokens=shard_tokens, progress=progress,
                               stop_after_shards=stop_after_shards)


def _refuse_anothers_unfinished(name: str, out: Path, *, builtin: bool) -> None:
    """Refuse an `out` that holds an unfinished preparation of another dataset (or, for the shipped
    text, `builtin`, of any: prepare_builtin writes its shards over): it was started afresh, deleting
    its finished shards (hours of a corpus), where a finished one is refused (`_other`). One of this
    name with other sources or --shard_tokens still starts afresh (a source edited since, say)."""
    state = out / STATE
    if (out / D.MANIFEST).is_file() or not state.is_file():
        return
    try:
        theirs = json.loads(state.read_text())["args"]["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        theirs = None
    if builtin or (isinstance(theirs, str) and theirs != name):
        raise PrepareError(f"{out} holds an unfinished preparation{f' of {theirs!r}' if isinstance(theirs, str) else ''}, which "
                           f"this one would replace; resume it with `{D._resume_command(name, out, state)}`, or use another --out "
                           f"(or delete {out} to start over)")


def _other(old, new: dict) -> str:
    """How a prepared dataset's arguments (its manifest's `prepared_from`) differ from `new`: said as
    "from other sources" where another name or --shard_tokens was all that differed."""
    if not isinstance(old, dict) or not isinstance(old.get("sources"), list):
        return "from other sources (the shipped text, or an older llmjax's preparation)"
    if old.get("dataset") != new["dataset"]:
        return f"named '{old.get('dataset')}', not '{new['dataset']}'"
    if old.get("shard_tokens") != new["shard_tokens"]:
        return f"from the same sources with --shard_tokens {old.get('shard_tokens')}"
    try:
        before = {(str(src), split): rest for src, split, *rest in old["sources"]}
    except (TypeError, ValueError):
        before = {}
    changed = [src for src, split, *rest in new["sources"] if before.get((src, split), rest) != rest]
    if changed and len(before) == len(new["sources"]) and all((src, split) in before for src, split, *_ in new["sources"]):
        return f"from other sources: {changed[0]} changed since (its size or modification time)"
    return f"from other sources ({', '.join(str(src) for src, *_ in old['sources'][:3])}{', ...' if len(old['sources']) > 3 else ''})"


def _refuse_users_folder(out: Path) -> None:
    """Refuse an `out` that holds files no preparation wrote, and neither a manifest nor a state:
    a user's folder, left untouched."""
    if not (out / D.MANIFEST).is_file() and not (out / STATE).is_file():
        try:
            D.refuse_foreign(out, shards=False)
        except D.DataError as e:
            raise PrepareError(f"--out {e}") from None


def _refuse_another_dataset(name: str, out: Path) -> None:
    """Refuse an `out` that holds a dataset prepared under another name (or from the shipped text),
    as `_prepare_locked` does, but before anything is downloaded (its sources' files are needed to
    compare the rest)."""
    try:
        old = json.loads((out / D.MANIFEST).read_text()).get("prepared_from")
    except (OSError, ValueError, AttributeError):
        return  # (no manifest, or a damaged one: said under the lock)
    if not isinstance(old, dict) or old.get("dataset") != name:
        raise PrepareError(f"{out} already holds a prepared dataset {_other(old, {'dataset': name})}; use another --out or delete it")


def _only_preparation(out: Path):
    """An exclusive lock on the folder `out` while a preparation reads and writes it
    (`runtime.exclusive_folder`): a second one at once would remove the first's temporaries and
    the shards its state does not record yet, and the first would fail or list a shard that is gone."""
    return exclusive_folder(out, lambda: PrepareError(
        f"another preparation is writing {out} now; wait for it to end (a finished dataset is then kept, an unfinished one "
        f"resumed by the same command), or use another --out"))


def _prepare_locked(name: str, out: Path, sources: list[Source], args: dict, created: list[Path], *, workers: int, shard_tokens: int,
                    progress: bool, stop_after_shards: int | None) -> D.TokenDataset:
    manifest = out / D.MANIFEST
    _refuse_users_folder(out)
    if manifest.is_file():
        try:
            existing = json.loads(manifest.read_text())
        except (OSError, ValueError):
            raise PrepareError(f"{manifest} is damaged; delete {out} (or use another --out) to prepare it again") from None
        if existing.get("prepared_from") != args:
            raise PrepareError(f"{out} already holds a prepared dataset {_other(existing.get('prepared_from'), args)}; use another --out or "
                               "delete it")
        ds = D.TokenDataset.open(out)
        damaged = ds.damaged_shards()  # (a missing, cut or changed shard: the trainer says "prepare the dataset again")
        if not damaged:
            return ds
        print(f"prepare: {out}: {'; '.join(damaged)}; preparing it again", file=sys.stderr, flush=True)
        manifest.unlink()  # (the shards that are intact are read again below and, being the same bytes, rewritten)
    for stale in out.iterdir():  # temporaries of an interrupted write
        if D.OWN_TEMPORARY.fullmatch(stale.name):
            stale.unlink()
    state_path = out / STATE
    try:  # (our own record of finished shards: one that cannot be read starts afresh, as one of other arguments does)
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except (OSError, ValueError):  # (an empty file was JSONDecodeError's traceback)
        state = {}
    state = state if isinstance(state, dict) else {}  # ([] was AttributeError's)
    # (the state counts records, which depend on how .txt documents are cut: a state written by
    # another cut, or by a version that counted whole documents, is started afresh)
    state_args = {**args, "txt_piece_chars": PIECE_CHARS}
    if state.get("args") != state_args:
        finished = [s for split in ("train", "val") for s in (state.get(split) if isinstance(state.get(split), list) else [])]
        if finished and isinstance(state.get("args"), dict) and state["args"].get("txt_piece_chars") == PIECE_CHARS:
            # (said: its finished shards were deleted and prepared again with no word, hours of a large corpus's work)
            print(f"prepare: {out} holds an unfinished preparation {_other(state['args'], args)}; starting afresh: its "
                  f"{len(finished)} finished shard(s) are prepared again (the command that resumes it instead: "
                  f"{D._command(state['args'].get('dataset') or name, out, state['args'])})", file=sys.stderr, flush=True)
        state = {"args": state_args}
    for split in ("train", "val"):  # finished shards must still be intact
        for s in state.get(split, []):
            if not (out / s["file"]).is_file() or not D.verify_shard(out / s["file"], s["sha256"]):
                state = {"args": state_args}
                break
    recorded = {s["file"] for split in ("train", "val") for s in state.get(split, [])}
    for f in out.iterdir():  # shards of an unfinished or other run that the state does not vouch for
        if re.fullmatch(r"(train|val)_\d{4}\.bin", f.name) and f.name not in recorded:
            f.unlink()

    held_out = not any(s.split == "val" for s in sources)
    order = [s for s in sources if s.split != "val"] + [s for s in sources if s.split == "val"]
    bar = None
    if progress:
        from tqdm import tqdm

        total = sum(s.path.stat().st_size for s in sources)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"prepare {name}", file=sys.stderr, dynamic_ncols=True)
        bar.docs, bar.tokens, bar.t0 = 0, 0, time.perf_counter()

    def save():
        D.atomic_write_json(state_path, state)
        if stop_after_shards is not None and sum(len(state.get(k, [])) for k in ("train", "val")) >= stop_after_shards:
            raise KeyboardInterrupt  # tests: an interruption right after a shard

    try:
        D.atomic_write_json(state_path, state)
        counts = tokenize(stream_documents(order, held_out), out=out, shard_tokens=shard_tokens, workers=workers, state=state,
                          save_state=save, bar=bar)
    except BaseException:
        if created and not any(state.get(k) for k in ("train", "val")):  # (a bad source: no folder of nothing left behind)
            state_path.unlink(missing_ok=True)
            for f in out.iterdir():
                if D.OWN_TEMPORARY.fullmatch(f.name):
                    f.unlink(missing_ok=True)
            D.remove_empty(created)
        raise
    finally:
        if bar is not None:
            bar.close()
    if counts["train"] == 0 or counts["val"] == 0:
        # nothing to resume (the same sources give the same answer): what was written for them goes,
        # and a folder made here with it
        for f in [s["file"] for sp in ("train", "val") for s in state.get(sp, [])] + [STATE]:
            (out / f).unlink(missing_ok=True)
        D.remove_empty(created)
        raise PrepareError(f"the sources hold {counts['train']} training and {counts['val']} validation documents; both need at least one"
                           + (" (a held-out validation tail needs at least 2 documents: separate them with <|endoftext|> in a .txt, "
                              "or give a val= file)" if held_out else ""))
    splits = {sp: state[sp] for sp in ("train", "val")}
    extra = {"validation": {"held_out_tail_documents": counts["val"], "documents": counts["documents"]}} if held_out else {}
    D.write_manifest(out, name, tok.GPT2Tokenizer().description(), splits, prepared_from=args, **extra)
    state_path.unlink(missing_ok=True)
    return D.TokenDataset.open(out)


# ---------------------------------------------------------------------------------------------
# The command line


def define_flags():
    flags.DEFINE_string("out", None, "output folder (default: <data dir>/<dataset>; LLMJAX_DATA_DIR or data/)")
    flags.DEFINE_multi_string("source", [], "local file or URL (.txt, .jsonl, .parquet), optionally train=... or val=...")
    flags.DEFINE_integer("workers", None, "tokeniser processes (default: every core this process may use)")
    flags.DEFINE_integer("shard_tokens", SHARD_TOKENS, "tokens per shard")
    flags.DEFINE_bool("progress", True, "show a progress bar")


def main(argv):
    from llmjax import cli  # (here, not at the top: spawn imports this module in every worker, and cli imports JAX)

    def terminated(*_):  # a plain `kill` (`timeout`, a scheduler) stops as Ctrl-C does: the workers are shut down, not left behind
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    F = flags.FLAGS
    # a file among the arguments: one that --source did not take (`--source a.txt b.txt`, a shell glob
    # `--source texts/*.txt`); alone, it was the dataset's name, and only the first file was prepared
    files = [a for a in argv[1:]
             if a.lower().endswith((".txt", ".jsonl", ".parquet")) or (("/" in a or "." in a) and Path(a).expanduser().is_file())]
    if files:
        more = f" (and {len(files) - 1} more)" if len(files) > 1 else ""
        what = "a file" if Path(files[0]).expanduser().is_file() else "a file's name"  # (`prepare notes.txt`, no such file: no dataset name either)
        cli.fail(f"{files[0]}{more} is {what}, not a dataset name: --source takes one file, so give each its own (--source a.txt "
                 f"--source b.txt; many: printf -- '--source=%s\\n' texts/*.txt > sources.flags, then --flagfile=sources.flags), and "
                 f"name the dataset: python -m llmjax.prepare NAME --source ...")
    if len(argv) != 2:
        cli.fail(f"give one dataset: python -m llmjax.prepare <{'|'.join(DATASETS)}> [--out DIR] [--source FILE ...]"
                 + (f" (got {len(argv) - 1}: {' '.join(shlex.quote(a) for a in argv[1:])})" if len(argv) > 2 else ""))
    name = argv[1]
    cli.refuse_empty(out="the folder to prepare into")
    out = Path(F.out) if F.out else D.data_dir("data") / name
    try:
        sources = parse_sources(F.source, Path.home() / ".cache" / "llmjax" / "downloads", download=False) if F.source else None
        ds = prepare(name, out, sources, workers=F.workers, shard_tokens=F.shard_tokens, progress=F.progress)
    except (PrepareError, D.DataError) as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        kept = out.is_dir() and any(f.suffix == ".bin" for f in out.iterdir())  # (before its first shard: nothing, its folder gone)
        cli.fail(f"interrupted; finished shards are kept in {out}: run the same command to resume" if kept else
                 "interrupted before the first shard was finished; nothing was kept: run the same command to start again", code=130)
    except BrokenProcessPool:
        cli.fail(f"a tokeniser process died (killed, or out of memory: try fewer --workers); finished shards are kept in {out}: "
                 "run the same command to resume")
    except OSError as e:  # a full or read-only disk, an --out that is a file, a source that cannot be read
        where = f" {e.filename}" if e.filename else ""
        cli.fail(f"cannot write or read{where} ({e.strerror or type(e).__name__}); fix that and run the same command to resume")
    counts = ", ".join(f"{s}: {ds.num_tokens(s):,} tokens" for s in ds.manifest["splits"])
    print(f"prepared {name} in {out} ({counts})")


if __name__ == "__main__":  # (the module as imported, not this __main__ copy of it: cli.tool)
    from absl import flags

    from llmjax import cli

    prepare = cli.tool("llmjax.prepare")
    prepare.define_flags()
    flags.adopt_module_key_flags(prepare)  # (--help lists the key flags of __main__, which defines none now)
    cli.run(prepare.main)
