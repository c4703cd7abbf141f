"""Token datasets: binary shards + a manifest, the built-in Shakespeare datasets, and grain loading.

On disk, a dataset is a folder:

    <data dir>/<dataset>/manifest.json     splits, shard names, token counts, sha256, tokenizer
    <data dir>/<dataset>/train_0000.bin    a shard: a 64-byte header, then uint16 tokens
    <data dir>/<dataset>/val_0000.bin

Shard header (little-endian): magic b"LLMJAXTK", u32 format version, u32 dtype code (1 = uint16),
u64 token count, zero padding to 64 bytes. Every file is written to a temporary name and renamed,
so a reader never sees a half-written one; a truncated or foreign file is a clear error when opened.
One reader serves every dataset (the preparation tool writes large corpora in this same format).

Training batches are random windows of context + 1 tokens, drawn through grain: the window starts
are shuffled per epoch from the seed, sliced across processes, read and batched in background
threads; the iterator's state is small and checkpointable.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shlex
import struct
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from llmjax import tokenizer as tok

MAGIC = b"LLMJAXTK"
VERSION = 1
DTYPE_CODES = {1: np.uint16}
HEADER = struct.Struct("<8sIIQ")
HEADER_BYTES = 64
MANIFEST = "manifest.json"
BUILTIN = ("tinyshakespeare", "tinyshakespeare_char")
PREPARE_HINT = "python -m llmjax.prepare {name} --out {dir}"


class DataError(ValueError):
    """A data problem a user can fix; the message is one line that says how."""


# what a preparation writes in its folder: shards, the manifest, the resumable state, and their
# temporaries (atomic_write_bytes: .NAME.RANDOM.tmp)
OWN_FILES = r"(train|val)_\d{4}\.bin|manifest\.json|\.prepare_state\.json"
OWN_TEMPORARY = re.compile(rf"\.({OWN_FILES})\.[^/]+\.tmp")


def foreign_files(folder: Path, *, shards: bool) -> list[str]:
    """The names in `folder` that no preparation wrote (`shards`: shard and manifest names count as
    ours, else only temporaries do): a folder holding any is a user's, and nothing in it is touched."""
    own = re.compile(rf"{OWN_TEMPORARY.pattern}|{OWN_FILES}" if shards else OWN_TEMPORARY.pattern)
    return sorted(f.name for f in Path(folder).iterdir() if not own.fullmatch(f.name)) if Path(folder).is_dir() else []


def refuse_foreign(folder: Path, *, shards: bool) -> None:
    if others := foreign_files(folder, shards=shards):
        raise DataError(f"{folder} holds files that no preparation wrote ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                        "give a new folder, or one a preparation wrote (nothing in it is changed)")


# ---------------------------------------------------------------------------------------------
# Atomic files


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status): setting
    it to read it, even for a moment, is process-wide, and another thread's files made in that moment
    would get the wrong permissions."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, chunks) -> None:
    """Write `chunks` (bytes or an iterable of bytes-like) to `path` via a temporary file + rename.
    A file it replaces keeps its permissions, its owner's write permission added; a new one gets
    what a file written in place would."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # (mkstemp makes it 0600; a document rewritten, bench --doc's, took 0666 & ~umask, not its own 0600 or 0755;
        # writable by its owner whatever it was: a run's file the trainer rewrites, then appends to, as metrics.jsonl)
        mode = stat.S_IMODE(os.stat(path).st_mode) | stat.S_IWUSR
    except OSError:
        mode = 0o666 & ~umask()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:  # (a failed write names no file)
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def missing_folders(path: Path) -> list[Path]:
    """`path` and those of its parents that do not exist yet, `path` first: what making it creates,
    for `remove_empty` to take back (a tool refused or failed before writing anything there)."""
    path = Path(path).absolute()
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_empty(folders: list[Path]) -> None:
    """rmdir each of `folders` in order (the leaf first) while it is empty, passing over one that was
    never made; stop at the first that is not empty (something was written into it meanwhile: it and
    its parents stay)."""
    for d in folders:
        if not d.exists():
            continue
        try:
            d.rmdir()
        except OSError:
            return


def metrics_rows(path: Path, *, cut_last: bool = False, check=None) -> list[dict]:
    """The rows of a run's metrics.jsonl (`path`), each a JSON object with its step (and, with
    `check`, for which check(row) gives "" rather than what is wrong). A damaged line is a ValueError
    that names the file and line ("PATH:LINE is damaged (why)"); with `cut_last`, a
    last line that is not whole JSON (a run a crash or a full disk stopped mid-line, or one being
    written) is left out, as the trainer leaves it out when it resumes. OSError: the file unread."""
    lines = [(i, x) for i, x in enumerate(Path(path).read_text().splitlines(), start=1) if x.strip()]
    rows = []
    for i, x in lines:
        try:
            row = json.loads(x)
        except ValueError as e:
            if cut_last and i == lines[-1][0]:
                break
            why = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
        else:
            step = row.get("step") if isinstance(row, dict) else None
            why = "" if isinstance(step, int) and not isinstance(step, bool) else "no metrics row: a JSON object with its step"
            why = why or (check(row) if check is not None else "")
        if why:
            raise ValueError(f"{path}:{i} is damaged ({why})")
        rows.append(row)
    return rows


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


# ---------------------------------------------------------------------------------------------
# Shards


def write_shard(path: Path, tokens: np.ndarray | list[np.ndarray]) -> dict:
    """Write one shard atomically from its tokens (an array, or a list of arrays written one after
    another, never joined in memory); returns its manifest entry (file, tokens, sha256)."""
    parts = [np.asarray(p) for p in tokens] if isinstance(tokens, list) else [np.asarray(tokens)]
    if any(p.size and (p.min() < 0 or p.max() > np.iinfo(np.uint16).max) for p in parts):
        raise DataError(f"tokens for {path} do not fit in uint16")
    count = sum(p.size for p in parts)
    header = HEADER.pack(MAGIC, VERSION, 1, count).ljust(HEADER_BYTES, b"\0")
    digest = hashlib.sha256(header)

    def chunks():
        yield header
        for p in parts:
            body = p.astype("<u2").tobytes()
            digest.update(body)
            yield body

    atomic_write_bytes(path, chunks())
    return {"file": Path(path).name, "tokens": int(count), "sha256": digest.hexdigest()}


def open_shard(path: Path, expected_tokens: int | None = None) -> np.memmap:
    """Memory-map a shard's tokens after checking its header and size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard {path} is missing; prepare the dataset again")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise DataError(f"{path} is not an llmjax token shard (bad magic); prepare the dataset again")
    _, version, dtype_code, count = HEADER.unpack(raw[: HEADER.size])
    if version != VERSION or dtype_code not in DTYPE_CODES:
        raise DataError(f"{path} has shard format version {version}, dtype code {dtype_code}; this llmjax reads version {VERSION}")
    itemsize = np.dtype(DTYPE_CODES[dtype_code]).itemsize
    if size != HEADER_BYTES + count * itemsize:
        raise DataError(f"{path} is truncated or corrupt: header says {count} tokens, file holds {(size - HEADER_BYTES) // itemsize}; prepare the dataset again")
    if expected_tokens is not None and count != expected_tokens:
        raise DataError(f"{path} holds {count} tokens but the manifest says {expected_tokens}; prepare the dataset again")
    if count == 0:
        return np.zeros((0,), DTYPE_CODES[dtype_code])
    return np.memmap(path, dtype=np.dtype(DTYPE_CODES[dtype_code]).newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(count,))


def verify_shard(path: Path, sha256: str) -> bool:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest() == sha256


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass
class TokenDataset:
    """A prepared dataset: its manifest, tokenizer and memory-mapped splits."""

    path: Path
    manifest: dict

    @classmethod
    def open(cls, path: Path) -> "TokenDataset":
        path = Path(path)
        file = path / MANIFEST
        if not file.is_file():
            raise DataError(f"no dataset at {path} (no {MANIFEST})")
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{file} is not valid JSON ({e.msg}); prepare the dataset again") from None
        except UnicodeDecodeError:
            raise DataError(f"{file} is not UTF-8 text, so no manifest of a prepared dataset; prepare the dataset again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != "llmjax-tokens" or manifest.get("version") != VERSION:
            raise DataError(f"{file} is not an llmjax token manifest of version {VERSION}")
        splits = manifest.get("splits")
        shards_ok = isinstance(splits, dict) and all(
            isinstance(v, list) and all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int) for s in v)
            for v in splits.values())
        if not (isinstance(manifest.get("dataset"), str) and isinstance(manifest.get("tokenizer"), dict) and shards_ok):
            raise DataError(f"{file} is damaged (its dataset, tokenizer or splits are missing or malformed); prepare the dataset again")
        return cls(path, manifest)

    @property
    def name(self) -> str:
        return self.manifest["dataset"]

    def tokenizer(self):
        return tok.from_description(self.manifest["tokenizer"])

    def split(self, name: str) -> list[np.ndarray]:
        if name not in self.manifest["splits"]:
            raise DataError(f"dataset {self.name} has no '{name}' split (has {', '.join(self.manifest['splits'])})")
        return [open_shard(self.path / s["file"], s["tokens"]) for s in self.manifest["splits"][name]]

    def num_tokens(self, name: str) -> int:
        return sum(s["tokens"] for s in self.manifest["splits"][name])

    def damaged_shards(self) -> list[str]:
        """The shard files of every split that are missing, unreadable or no longer match the
        sha256 their manifest records (changed since they were prepared), each as its file and what
        is wrong with it: read whole, hashed at
        about 0.6 GB/s on one core of our CPU VM (hashlib releases the GIL: a thread runs beside
        compilation)."""
        bad = []
        for shards in self.manifest["splits"].values():
            for s in shards:
                try:
                    if "sha256" in s and not verify_shard(self.path / s["file"], s["sha256"]):
                        bad.append(f"{s['file']} changed since it was prepared (its sha256 differs from the manifest's)")
                except (OSError, ValueError) as e:  # (ValueError: a manifest file name no path can have)
                    bad.append(f"{s['file']} cannot be read ({getattr(e, 'strerror', None) or e})")
        return bad


def write_manifest(path: Path, dataset: str, tokenizer_desc: dict, splits: dict[str, list[dict]], **extra) -> None:
    atomic_write_json(
        Path(path) / MANIFEST,
        {"format": "llmjax-tokens", "version": VERSION, "dataset": dataset, "tokenizer": tokenizer_desc, "splits": splits, **extra},
    )


def data_dir(configured: str) -> Path:
    """The data directory: $LLMJAX_DATA_DIR if set, else the configured `data.dir`."""
    return Path(os.environ.get("LLMJAX_DATA_DIR") or configured)


def prepare_builtin(name: str, out: Path, *, repair: bool = False) -> TokenDataset:
    """Tokenise the shipped tinyshakespeare.txt (90/10 train/val split by characters, as nanoGPT)
    with GPT-2 BPE (`tinyshakespeare`) or characters (`tinyshakespeare_char`). Idempotent.
    `repair` (python -m llmjax.prepare): a prepared dataset with a missing, cut or changed shard is
    written again (the trainer opens it as it is: its own check of the shards names the damage and
    says to prepare it again)."""
    out = Path(out)
    try:
        ds = TokenDataset.open(out)
    except DataError as e:
        ds = None
        # a manifest that cannot be read says nothing of what its shards hold: the user's own text
        # under this name (--source files) was replaced with the shipped one, silently. Only the
        # shipped text's own dataset, of another format version, is prepared again.
        try:
            old = json.loads((out / MANIFEST).read_text(encoding="utf-8")) if (out / MANIFEST).exists() else None
        except (OSError, ValueError):
            old = False
        if old is not None and not (isinstance(old, dict) and old.get("format") == "llmjax-tokens" and old.get("dataset") == name
                                    and "prepared_from" not in old):
            again = _command(name, out, old.get("prepared_from") if isinstance(old, dict) else None)
            raise DataError(f"{e.args[0].split('; ')[0]}, so what its shards hold is not known (they are kept); delete {out} to prepare "
                            f"'{name}' again from the shipped text, or prepare it again from your own files: {again}") from None
    if ds is not None:
        if ds.manifest.get("dataset") != name:
            raise DataError(f"{out} holds the prepared dataset '{ds.manifest.get('dataset')}', not '{name}'; use another folder")
        if not repair or not (damaged := ds.damaged_shards()):  # (a few MB: a missing, cut or changed shard is written again)
            return ds
        if isinstance(ds.manifest.get("prepared_from"), dict):  # (not the shipped text: repaired from its own sources, not replaced)
            raise DataError(f"{out} holds '{name}' prepared from other text than the shipped one (--source files), and {'; '.join(damaged)}; "
                            f"prepare it again from that text: {_command(name, out, ds.manifest['prepared_from'])}")
    refuse_foreign(out, shards=True)  # (its shards are written over: not in a user's folder)
    text = (tok.ASSETS / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tokenizer = tok.CharTokenizer.from_text(text) if name == "tinyshakespeare_char" else tok.GPT2Tokenizer()
    cut = int(len(text) * 0.9)
    splits = {}
    for split, part in (("train", text[:cut]), ("val", text[cut:])):
        splits[split] = [write_shard(out / f"{split}_0000.bin", np.array(tokenizer.encode(part), np.uint16))]
    write_manifest(out, name, tokenizer.description(), splits, source="llmjax/assets/tinyshakespeare.txt (karpathy/char-rnn)")
    return TokenDataset.open(out)


def _prepare_hint(name: str, path: Path) -> str:
    """PREPARE_HINT for `name` and `path`, quoted for a shell (a folder with a space in its name)."""
    return PREPARE_HINT.format(name=shlex.quote(name), dir=shlex.quote(str(path)))


def _resume_command(name: str, path: Path, state: Path) -> str:
    """The `llmjax.prepare` command an unfinished preparation's state records (its sources)."""
    try:
        args = json.loads(state.read_text())["args"]
    except (OSError, ValueError, KeyError, TypeError):
        args = {}
    return _command(name, path, args)


def _command(name: str, path: Path, args) -> str:
    """The `llmjax.prepare` command of a preparation's arguments (a state's, or a manifest's
    `prepared_from`): its dataset name, shard size and sources."""
    from llmjax.prepare import HUB, SHARD_TOKENS

    # the name it was prepared under, which the state records (another starts afresh): a folder
    # prepared with --out under another name than its own is trained on by the folder's name
    if isinstance(args, dict) and isinstance(args.get("dataset"), str) and args["dataset"]:
        name = args["dataset"]
    command = _prepare_hint(name, path)
    # (another --shard_tokens than the state's starts the preparation afresh: the command gives the state's)
    size = args.get("shard_tokens") if isinstance(args, dict) else None
    if isinstance(size, int) and size != SHARD_TOKENS:
        command += f" --shard_tokens {size}"
    try:
        sources = [(str(src), split) for src, split, *_ in args["sources"]]
    except (KeyError, TypeError, ValueError):
        return command + " --source FILE ..."
    # the hub's own files (in its cache, under datasets--OWNER--NAME): the command names none, and
    # downloads them again; a hub dataset's name prepared from --source files names those
    if name in HUB and sources and all(f"datasets--{HUB[name]['repo_id'].replace('/', '--')}" in Path(src).parts
                                       for src, _ in sources):
        return command
    # each with its split as given: train= too (a source's split is part of the state's arguments:
    # the same file without train= is another preparation, started afresh)
    return command + "".join(f" --source {split + '=' if split in ('train', 'val') else ''}{shlex.quote(src)}"
                             for src, split in sources)


def open_dataset(name: str, configured_dir: str) -> TokenDataset:
    """Open a prepared dataset; the built-in ones are prepared on first use."""
    path = data_dir(configured_dir) / name
    from llmjax.prepare import STATE

    try:  # (a folder that cannot be read: said below, as before)
        unfinished = not (path / MANIFEST).is_file() and (path / STATE).is_file()
    except OSError:
        unfinished = False
    # a preparation that stopped before its end: the same command resumes it (a built-in name's too,
    # prepared from --source files: prepare_builtin wrote the shipped text over its shards)
    if unfinished:
        raise DataError(f"dataset '{name}' in {path} is unfinished (its preparation stopped before the end); run the command "
                        f"that prepared it again to resume it: {_resume_command(name, path, path / STATE)}")
    if name in BUILTIN:
        try:
            return prepare_builtin(name, path)
        except OSError as e:  # (a data.dir that cannot be written: not the workdir's problem)
            raise DataError(f"cannot prepare dataset '{name}' in {path} ({e.strerror or e}); set --config.data.dir to a folder "
                            f"you can write") from None
    if not (path / MANIFEST).is_file():
        from llmjax.prepare import DATASETS

        if name not in DATASETS:
            try:  # the user's own prepared datasets too, not only the built-in names
                prepared = sorted(d.name for d in path.parent.iterdir() if (d / MANIFEST).is_file())
            except OSError:
                prepared = []
            close = difflib.get_close_matches(name, prepared + [d for d in DATASETS if d not in prepared], n=1, cutoff=0.5)
            raise DataError(f"unknown dataset '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                            + f": no prepared dataset of that name in {path.parent}, and llmjax.prepare knows {', '.join(DATASETS)}; "
                            f"for your own text: {_prepare_hint(name, path)} --source FILE")
        raise DataError(f"dataset '{name}' is not prepared in {path}; prepare it with: {_prepare_hint(name, path)}")
    return TokenDataset.open(path)


# ---------------------------------------------------------------------------------------------
# Windows and batches


class WindowSource:
    """Index i -> the i-th window of `length` tokens, over every start position of every shard
    (a window never crosses a shard boundary)."""

    def __init__(self, shards: list[np.ndarray], length: int, split: str | None = None):
        self.shards, self.length = shards, length
        counts = np.array([max(len(s) - length + 1, 0) for s in shards], np.int64)
        if counts.sum() == 0:
            total = sum(len(s) for s in shards)
            which = f"{split}: " if split else ""
            if total >= length:  # (long enough, but in shards that are not)
                raise DataError(f"the split's shards are shorter than one window of {length} tokens ({which}{total} tokens in shards of at "
                                f"most {max(len(s) for s in shards)}; a window never crosses shards); prepare the dataset again with a "
                                "larger --shard_tokens, or lower model.context_len")
            more = {"val": ", or prepare the dataset with more validation text (a held-out tail is the last 1% of the text; a val= "
                            "--source gives the split)", "train": ", or prepare the dataset from more text"}.get(split, "")
            raise DataError(f"the split is shorter than one window of {length} tokens ({which}{total} tokens); lower model.context_len{more}")
        self.offsets = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, i, side="right") - 1)
        start = int(i - self.offsets[shard])
        return np.asarray(self.shards[shard][start : start + self.length], np.int32)


# How train.seed becomes the shuffle's seed. grain reshuffles epoch e with (its seed + e), so with the
# seed itself (order 1, checkpoints before 2026-12-08) seed s + 1's epochs were seed s's from its
# second epoch on: `compare --seeds` runs saw one order one epoch apart. Order 2 draws the shuffle's
# seed from train.seed (numpy's SeedSequence), so nearby seeds' orders share no epoch. A run resumes
# in the order its checkpoint names (llmjax.train), so a run begun in order 1 finishes in it.
DATA_ORDER = 2


def shuffle_seed(seed: int, order: int = DATA_ORDER) -> int:
    """The shuffle's seed (grain's, < 2**32) for train.seed `seed` in data order `order`."""
    return seed if order == 1 else int(np.random.SeedSequence(seed).generate_state(1)[0])


def train_batches(
    shards: list[np.ndarray],
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    threads: int = 2,
    prefetch: int = 8,
    order: int = DATA_ORDER,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's rows of each global batch: int32
    (global_batch / process_count, seq_len + 1) random windows. Window starts are shuffled from
    `seed` (shuffle_seed: in data order `order`), reshuffled every epoch; process p takes elements
    p, p + P, ... of the shuffled stream, so the union over processes of step s's rows is the same
    set for any process count."""
    if global_batch % process_count:
        raise DataError(f"train.batch_size={global_batch} must be divisible by the {process_count} processes")
    import grain  # (here: grain imports JAX, and the preparation's workers import this module)

    source = WindowSource(shards, seq_len + 1, "train")
    if len(source) < global_batch:  # (else grain's repeat fills the batch with the same windows again: 8 copies of one)
        n = len(source)
        raise DataError(f"the train split is too small for one batch: {sum(len(s) for s in shards)} tokens hold {n} window{'s' * (n != 1)} "
                        f"of {seq_len + 1} tokens (model.context_len + 1), and one batch needs {global_batch} different windows "
                        f"(train.batch_size x train.grad_accum_steps), {global_batch + seq_len} tokens or more; lower "
                        "train.batch_size or model.context_len, or prepare the dataset from more text")
    ds = grain.MapDataset.range(len(source)).shuffle(seed=shuffle_seed(seed, order)).repeat(None)
    ds = ds[process_index::process_count].map(source.__getitem__)
    ds = ds.batch(global_batch // process_count, drop_remainder=True, batch_fn=np.stack)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)))


def sample_windows(shards: list[np.ndarray], *, seq_len: int, batch: int, num_batches: int, seed: int) -> Iterator[np.ndarray]:
    """`num_batches` batches of random windows, the same ones for the same seed (loss estimates)."""
    source = WindowSource(shards, seq_len + 1)
    rng = np.random.default_rng(seed)
    for _ in range(num_batches):
        yield np.stack([source[int(i)] for i in rng.integers(0, len(source), batch)])


def sequential_batch_count(shards: list[np.ndarray], *, seq_len: int, batch: int) -> int:
    """How many batches `sequential_windows` yields for these shards."""
    windows = sum(-(-max(len(shard) - 1, 0) // seq_len) for shard in shards)
    return -(-windows // batch)


def sequential_windows(shards: list[np.ndarray], *, seq_len: int, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The whole split as windows of seq_len + 1 tokens overlapping by one, so every token after a
    shard's first is a target exactly once. Yields (tokens, mask) batches; the mask (over targets)
    is 0 on padding, including the padded rows of the last batch."""
    rows, masks = [], []
    for shard in shards:
        for start in range(0, max(len(shard) - 1, 0), seq_len):
            window = np.asarray(shard[start : start + seq_len + 1], np.int32)
            n = len(window) - 1
            rows.append(np.pad(window, (0, seq_len + 1 - len(window))))
            masks.append((np.arange(seq_len) < n).astype(np.float32))
            if len(rows) == batch:
                yield np.stack(rows), np.stack(masks)
                rows, masks = [], []
    if rows:
        pad = batch - len(rows)
        yield (
            np.concatenate([np.stack(rows), np.zeros((pad, seq_len + 1), np.int32)]),
            np.concatenate([np.stack(masks), np.zeros((pad, seq_len), np.float32)]),
        )
