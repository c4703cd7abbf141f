"""JAX's persistent compilation cache, kept in a folder without a scan of that folder per write.

JAX (0.11.2) stores compiled programs through `jax._src.lru_cache.LRUCache` once
`jax_compilation_cache_dir` is set. With a size limit, every write first lists the whole folder
(a glob, a stat and an access-time file read per entry) to decide what to evict, all under one file
lock that every read and write of every process takes as well. A folder of 4,500 entries made each
write cost 0.9 s on a 2-core machine, so a cache that keeps small programs (the command-line tools
keep them all: loading beats compiling) gets slower the more it holds. Without a size limit there
is no scan and no lock, but nothing stops a reader from seeing an entry that another process is
still writing, and nothing bounds the folder.

`FolderCache` keeps JAX's file names (`<key>-cache`, so a folder JAX wrote stays readable) and
changes three things:
- a write goes to a temporary file that is renamed into place (atomic on one filesystem): a reader
  sees a whole entry or none, so neither reads nor writes need a lock;
- a read marks its entry as recently used by setting the file's modification time (no second file);
- the folder is listed once per process and then every `RESCAN_EVERY` writes (to see what other
  processes added), and the size in between is this process's running count. When the count
  passes the limit, the least recently used entries go until the folder is at `LOW_WATER` of it,
  so the next eviction is many writes away. Between two listings the folder can exceed the limit
  by what other processes wrote since the last one.

`install()` makes JAX build a `FolderCache` wherever it would build its own, from the same settings
(`jax_compilation_cache_dir`, `jax_compilation_cache_max_size`: -1 no limit, 0 no writes). It uses
JAX's private module `jax._src.compilation_cache`; with a JAX that lacks the hook it returns False
and JAX's own cache stays.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

CACHE_SUFFIX = "-cache"  # JAX's: <key>-cache holds an entry
ATIME_SUFFIX = "-atime"  # JAX's LRUCache keeps a last-use stamp beside each entry; we use the mtime
TMP_SUFFIX = ".tmp"
RESCAN_EVERY = 256  # writes between two listings of the folder
LOW_WATER = 0.8  # an eviction empties the folder down to this fraction of the limit
STALE_TMP_SECONDS = 3600  # a temporary file this old belongs to a writer that died: removed

_TMP_TAG = uuid.uuid4().hex[:8]
# a temporary file `put` writes: .PID.TAG.N.tmp (a listing removes only these, and only when stale:
# the folder is the user's to choose, LLMJAX_COMPILATION_CACHE=/tmp say, and its other files are not ours)
TMP_NAME = re.compile(rf"\.\d+\.[0-9a-f]{{8}}\.\d+{re.escape(TMP_SUFFIX)}")


class CacheWarning(UserWarning):
    """The cache's own warnings (a folder it cannot write, a program above its limit); the
    command-line tools show them as one line (`one_line_warnings`)."""


# JAX's own warnings about an entry it could not read (damaged: it compiles the program again, and
# FolderCache.put replaces the entry) or write (jax/_src/compiler.py)
JAX_ENTRY_WARNINGS = ("Error reading persistent compilation cache entry", "Error writing persistent compilation cache entry")


def one_line_warnings() -> None:
    """Show CacheWarnings, and JAX's warnings about a cache entry it could not read or write, as one
    line, `warning: <message>`, not Python's two (the warning's file and line, then the source line
    of the call); other warnings as before."""
    shown = warnings.showwarning
    if getattr(shown, "_llmjax", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CacheWarning):
            print(f"warning: {message}", file=file or sys.stderr, flush=True)
        elif issubclass(category, UserWarning) and str(message).startswith(JAX_ENTRY_WARNINGS):
            again = " (compiled again; the entry is replaced)" if str(message).startswith(JAX_ENTRY_WARNINGS[0]) else ""
            print(f"warning: {' '.join(str(message).split())}{again}", file=file or sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)

    show._llmjax = True
    warnings.showwarning = show
_tmp_counter = itertools.count()


class FolderCache:
    """A compilation cache in one local folder: atomic writes, least-recently-used eviction.
    `max_bytes`: the folder's size limit (-1: none; 0: nothing is written)."""

    def __init__(self, path: str | os.PathLike, *, max_bytes: int):
        self._path = Path(path)  # JAX's cache interface reads `_path`
        self._path.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.scans = 0  # how many times the folder was listed (tests check that writes do not list it)
        self._size: int | None = None  # bytes at the last listing plus this process's writes since
        self._writes_since_scan = 0
        self._lock = threading.Lock()

    def _entry(self, key: str) -> Path:
        if not key:
            raise ValueError("a compilation cache key cannot be empty")
        return self._path / f"{key}{CACHE_SUFFIX}"

    def get(self, key: str) -> bytes | None:
        path = self._entry(key)
        try:
            value = path.read_bytes()
        except FileNotFoundError:  # never written, or evicted by another process
            return None
        try:
            os.utime(path)  # recently used
        except OSError:
            pass
        return value

    def put(self, key: str, value: bytes) -> None:
        """Write the entry, replacing one already there: JAX puts a program only after a miss or a
        failed read, so an entry there is damaged (truncated, or written by another cache) or the
        same program another process just wrote. (Kept, a damaged entry was recompiled by every
        process, with a warning, and never evicted: each read refreshed it.)"""
        path = self._entry(key)
        if self.max_bytes == 0:
            return
        try:
            replaced = path.stat().st_size
        except OSError:
            replaced = 0
        if 0 < self.max_bytes < len(value):
            warnings.warn(f"a compiled program of {len(value)} bytes is larger than the compilation cache's limit ({self.max_bytes} bytes); "
                          "not cached", CacheWarning)
            return
        # (a short name: an entry's own name may already be near the filesystem's 255-byte limit; a
        # random part as well as the pid: processes of other machines or containers may share the folder)
        tmp = self._path / f".{os.getpid()}.{_TMP_TAG}.{next(_tmp_counter)}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(value)
            os.replace(tmp, path)  # atomic: readers see all of it or nothing
        except OSError as e:  # an unwritable folder or a full disk: said once, then nothing more is written
            with contextlib.suppress(OSError):  # (a read-only file system refuses even the unlink of no file: EROFS, before the warning)
                tmp.unlink(missing_ok=True)
            self.max_bytes = 0
            warnings.warn(f"cannot write to the compilation cache {self._path} ({e.strerror or e}), so compiled programs are not cached: "
                          "make room there, or set LLMJAX_COMPILATION_CACHE to a folder that can be written (empty: no cache)", CacheWarning)
            return
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        if self.max_bytes > 0:
            self._count(len(value) - replaced, key)

    def _count(self, nbytes: int, key: str) -> None:
        with self._lock:
            self._writes_since_scan += 1
            if self._size is None or self._writes_since_scan >= RESCAN_EVERY:
                self._size = self._scan()[1]  # the listing already includes this write
            else:
                self._size += nbytes
            if self._size > self.max_bytes:
                self._size = self._evict(int(self.max_bytes * LOW_WATER), keep=key)

    def _scan(self) -> tuple[list[tuple[float, int, str]], int]:
        """The folder's entries as (last use, bytes, key), and their total size. Removes
        temporary files left by writers that died."""
        self.scans += 1
        self._writes_since_scan = 0
        entries, total, now = [], 0, time.time()
        with os.scandir(self._path) as it:
            for e in it:
                try:
                    st = e.stat()
                except FileNotFoundError:  # evicted or renamed meanwhile
                    continue
                if e.name.endswith(CACHE_SUFFIX):
                    entries.append((st.st_mtime, st.st_size, e.name[: -len(CACHE_SUFFIX)]))
                    total += st.st_size
                elif TMP_NAME.fullmatch(e.name) and now - st.st_mtime > STALE_TMP_SECONDS:
                    Path(e.path).unlink(missing_ok=True)
        return entries, total

    def _evict(self, target: int, keep: str | None = None) -> int:
        """Remove the least recently used entries until the folder holds at most `target` bytes,
        never `keep` (the entry just written: one larger than `target` went as soon as it was
        written, with every other entry); returns what it holds then."""
        entries, total = self._scan()
        entries.sort()
        for _, size, key in entries:
            if total <= target:
                break
            if key == keep:
                continue
            (self._path / f"{key}{CACHE_SUFFIX}").unlink(missing_ok=True)
            (self._path / f"{key}{ATIME_SUFFIX}").unlink(missing_ok=True)
            total -= size
        return total


def install() -> bool:
    """Make JAX keep its persistent compilation cache in a `FolderCache` (from now on, and after
    any reset of JAX's cache). Returns False, leaving JAX's own cache, where this JAX has no hook."""
    try:
        from jax._src import compilation_cache as cc
        from jax._src import config
    except ImportError:
        return False
    if not callable(getattr(cc, "get_file_cache", None)) or not hasattr(cc, "VerificationCache"):
        return False
    if getattr(cc.get_file_cache, "_llmjax", False):
        return True

    def get_file_cache(path: str):
        if "://" in path and not path.startswith("file://"):  # a remote folder: JAX's own cache
            return jax_get_file_cache(path)
        cache = FolderCache(path.removeprefix("file://"), max_bytes=config.compilation_cache_max_size.value)
        if config.compilation_cache_check_contents.value:
            return cc.VerificationCache(cache), path
        return cache, path

    jax_get_file_cache = cc.get_file_cache
    get_file_cache._llmjax = True
    cc.get_file_cache = get_file_cache
    if cc._cache is not None and not isinstance(cc._cache, FolderCache):
        cc.reset_cache()  # built already (by JAX's own code): the next compile builds ours
    return True
