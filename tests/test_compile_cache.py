"""llmjax.compile_cache.FolderCache: JAX's persistent compilation cache without a folder scan per
write (atomic writes, least-recently-used eviction with a running size count)."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from llmjax import compile_cache
from llmjax.compile_cache import ATIME_SUFFIX, CACHE_SUFFIX, FolderCache


def files(path):
    return sorted(p.name for p in path.iterdir())


def test_round_trip_replacing_and_no_temporary_files_stay(tmp_path):
    cache = FolderCache(tmp_path, max_bytes=1 << 20)
    assert cache.get("k1") is None
    cache.put("k1", b"abc")
    assert cache.get("k1") == b"abc"
    cache.put("k1", b"abcdef")  # JAX puts only after a miss or a failed read: the entry there is damaged
    assert cache.get("k1") == b"abcdef"
    assert files(tmp_path) == [f"k1{CACHE_SUFFIX}"]  # (no temporary file left)
    with pytest.raises(ValueError, match="empty"):
        cache.put("", b"x")
    longest = "jit_" + "f" * (249 - 4 - 65) + "-" + "0" * 64  # <key>-cache: the filesystem's 255-byte limit
    cache.put(longest, b"long")
    assert cache.get(longest) == b"long"


def test_a_reader_never_sees_an_entry_being_written(tmp_path, monkeypatch):
    """The entry appears whole or not at all: during the write (up to the rename) a reader finds
    nothing, and a write that fails leaves neither the entry nor a temporary file (and is said once,
    as a warning: a compile must not fail because its cache cannot be written)."""
    cache = FolderCache(tmp_path, max_bytes=1 << 20)
    other_process = FolderCache(tmp_path, max_bytes=1 << 20)
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(other_process.get("k"))  # the whole value was written to the temporary file by now
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    cache.put("k", b"v" * 100_000)
    assert seen == [None] and other_process.get("k") == b"v" * 100_000

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.warns(UserWarning, match="cannot write to the compilation cache .*disk full"):
        cache.put("k2", b"w" * 1000)
    assert cache.get("k2") is None
    assert files(tmp_path) == [f"k{CACHE_SUFFIX}"]


def test_the_least_recently_used_entries_go_first(tmp_path):
    cache = FolderCache(tmp_path, max_bytes=1000)
    now = time.time()
    for i, key in enumerate("abcd"):  # a is the oldest write, d the newest
        cache.put(key, bytes(200))
        os.utime(tmp_path / f"{key}{CACHE_SUFFIX}", (now - 100 + i, now - 100 + i))
    (tmp_path / f"b{ATIME_SUFFIX}").write_bytes(bytes(8))  # JAX's LRUCache stamp beside an entry
    assert cache.get("a") == bytes(200)  # a read makes `a` the most recently used
    cache.put("e", bytes(200))  # 1000 bytes: at the limit, nothing goes
    assert files(tmp_path) == sorted([f"{k}{CACHE_SUFFIX}" for k in "abcde"] + [f"b{ATIME_SUFFIX}"])
    cache.put("f", bytes(200))  # 1200 > 1000: down to 800 (LOW_WATER), the two least recently used go
    assert files(tmp_path) == sorted(f"{k}{CACHE_SUFFIX}" for k in "adef")


def test_writes_do_not_list_the_folder_each_time(tmp_path):
    """JAX's LRUCache lists the whole folder on every write (0.9 s per write at 4,500 entries on
    a 2-core machine); this cache once per process and then once per RESCAN_EVERY writes."""
    cache = FolderCache(tmp_path, max_bytes=1 << 30)
    for i in range(600):
        cache.put(f"k{i}", b"x" * 10)
    assert cache.scans == 1 + 600 // compile_cache.RESCAN_EVERY
    unlimited = FolderCache(tmp_path, max_bytes=-1)
    unlimited.put("u", b"x")
    assert unlimited.scans == 0 and unlimited.get("u") == b"x"
    off = FolderCache(tmp_path / "off", max_bytes=0)
    off.put("z", b"x")
    assert off.get("z") is None


def test_what_other_processes_wrote_counts_at_the_next_listing(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "RESCAN_EVERY", 4)
    ours, theirs = FolderCache(tmp_path, max_bytes=1000), FolderCache(tmp_path, max_bytes=1000)
    ours.put("first", bytes(100))  # ours lists the folder: 100 bytes
    for i in range(9):
        theirs.put(f"t{i}", bytes(100))  # theirs counts its own: 1000 bytes, no eviction
    for i in range(3):  # ours: 300 bytes by its own count; the 4th write lists the folder (1300)
        ours.put(f"o{i}", bytes(100))
        assert sum(f.stat().st_size for f in tmp_path.iterdir()) == 1100 + 100 * i
    ours.put("o3", bytes(100))  # its 4th write since the listing: lists 1400 bytes, evicts to 800
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) <= 800


def test_a_folder_jax_wrote_stays_readable_and_dead_writers_leave_nothing(tmp_path):
    from jax._src.lru_cache import LRUCache

    LRUCache(str(tmp_path), max_size=1 << 20).put("jaxkey", b"compiled")
    cache = FolderCache(tmp_path, max_bytes=1 << 20)
    assert cache.get("jaxkey") == b"compiled"
    stale = tmp_path / f".123.0badc0de.0{compile_cache.TMP_SUFFIX}"  # (a temporary file's name as `put` makes it)
    fresh = tmp_path / f".456.0badc0de.0{compile_cache.TMP_SUFFIX}"
    # not the cache's, though old and named *.tmp: the folder is the user's to choose (LLMJAX_COMPILATION_CACHE=/tmp,
    # say), and a listing removed every *.tmp file of another program's there that was an hour old
    theirs = [tmp_path / "draft.tmp", tmp_path / f".{os.getpid()}.notes.1{compile_cache.TMP_SUFFIX}"]
    for p in (stale, fresh, *theirs):
        p.write_bytes(b"half")
    old = time.time() - compile_cache.STALE_TMP_SECONDS - 10
    for p in (stale, *theirs):
        os.utime(p, (old, old))
    cache.put("new", b"x")  # the first write lists the folder
    assert not stale.exists() and fresh.exists() and all(p.exists() for p in theirs)


def test_jax_keeps_its_programs_in_a_folder_cache_across_processes(tmp_path):
    """Through `llmjax.runtime.enable_compilation_cache` (what the command-line tools call): a
    second process loads the first one's programs (JAX's cache-hit events) and compiles none."""
    script = textwrap.dedent(
        """
        import json, os, sys
        import jax, jax.numpy as jnp
        from jax._src import compilation_cache as cc, monitoring
        from llmjax.compile_cache import FolderCache
        from llmjax.runtime import enable_compilation_cache

        events = []
        monitoring.register_event_listener(lambda name, **kw: events.append(name))
        enable_compilation_cache()
        y = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))(jnp.arange(12.0).reshape(3, 4))
        print(json.dumps({"cache": type(cc._cache).__name__, "y": y.tolist(),
                          "hits": events.count("/jax/compilation_cache/cache_hits"),
                          "misses": events.count("/jax/compilation_cache/cache_misses")}))
        """
    )
    env = {**os.environ, "LLMJAX_COMPILATION_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    runs = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1]) for _ in range(2)]
    assert runs[0]["cache"] == runs[1]["cache"] == "FolderCache"
    assert runs[0]["hits"] == 0 and runs[0]["misses"] >= 1
    assert runs[1]["hits"] == runs[0]["misses"] and runs[1]["misses"] == 0
    assert runs[1]["y"] == runs[0]["y"]
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(CACHE_SUFFIX)]
    # a damaged entry (cut in half: a crash in JAX's own cache, which writes in place) is read,
    # fails, is compiled again and replaced: the next process loads it (it was kept, and every
    # process recompiled it)
    entries = sorted((tmp_path / "cache").glob(f"*{CACHE_SUFFIX}"))
    sizes = [p.stat().st_size for p in entries]
    for p in entries:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    again = [json.loads(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1]) for _ in range(2)]
    assert again[0]["y"] == runs[0]["y"] and again[1]["hits"] == runs[0]["misses"] and again[1]["misses"] == 0
    # (replaced whole: a recompiled program's serialised size may differ by a few bytes)
    assert all(p.stat().st_size > 0.9 * size for p, size in zip(entries, sizes))


def test_an_unwritable_folder_warns_once_and_stops_writing(tmp_path, monkeypatch):
    """A folder that cannot be written (permissions, a full disk): one warning, no exception (JAX
    would warn again for every program), and no more attempts."""
    cache = FolderCache(tmp_path, max_bytes=1 << 20)
    calls = []

    def refuse(src, dst):
        calls.append(dst)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(compile_cache.os, "replace", refuse)
    with pytest.warns(UserWarning, match="cannot write to the compilation cache .*Permission denied"):
        cache.put("a" * 8, b"x" * 10)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put("b" * 8, b"y" * 10)
    assert len(calls) == 1 and files(tmp_path) == []


def test_a_read_only_folder_warns_once_and_stops_writing(tmp_path, monkeypatch):
    """On a read-only file system the temporary file cannot be made, and unlinking it (which is not
    there) fails too, with EROFS: that second OSError escaped before the warning and the switch-off,
    so JAX warned once per program (29 lines for a tiny run)."""
    import errno
    from pathlib import Path

    cache = FolderCache(tmp_path, max_bytes=1 << 20)
    opened = []

    def read_only(*args, **kwargs):
        opened.append(args[0])
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(compile_cache, "open", read_only, raising=False)
    monkeypatch.setattr(Path, "unlink", lambda self, missing_ok=False: read_only(self))
    with pytest.warns(UserWarning, match="cannot write to the compilation cache .*Read-only file system"):
        cache.put("a" * 8, b"x" * 10)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put("b" * 8, b"y" * 10)
    assert len(opened) == 2 and cache.max_bytes == 0  # (the write, its unlink; nothing after the switch-off)


def test_a_file_url_or_tilde_cache_folder_is_a_local_folder(monkeypatch):
    """LLMJAX_COMPILATION_CACHE=file:///x reached JAX's compiler as a URL, which it took for an etils
    path of a scheme it lacks (KeyError 'file://' at the first compile); file://~/x made a folder
    named '~'."""
    import os

    from llmjax import runtime

    home = os.path.expanduser("~")
    for given, want in [("file:///tmp/x", "/tmp/x"), ("file://~/c", f"{home}/c"), ("~/c", f"{home}/c"), ("/srv/c", "/srv/c")]:
        assert runtime.compilation_cache_settings({"LLMJAX_COMPILATION_CACHE": given})["jax_compilation_cache_dir"] == want, given


def test_an_entry_above_the_low_water_mark_is_not_evicted_as_it_is_written(tmp_path):
    """An entry larger than the eviction's target (LOW_WATER of the limit) but within the limit stays:
    the eviction it set off removed it too, with every other entry, right after writing it."""
    import time

    cache = FolderCache(tmp_path, max_bytes=100)
    cache.put("old", b"a" * 20)
    time.sleep(0.01)
    cache.put("new", b"b" * 90)
    assert cache.get("new") == b"b" * 90 and cache.get("old") is None


def test_the_tools_take_the_cache_settings_a_user_gave_jax(tmp_path, monkeypatch, capsys):
    """`enable_compilation_cache` (every command-line tool's): LLMJAX_COMPILATION_CACHE first, else
    the folder JAX_COMPILATION_CACHE_DIR names (it was ignored: 16 GiB went to ~/.cache instead),
    and a size limit or minimum compile time set through JAX's variables is kept; a folder that
    cannot be made is one warning line and no cache (it was JAX's warning about reading an entry)."""
    import jax

    from llmjax import runtime

    updates = {}
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.__setitem__(name, value))
    monkeypatch.setattr(compile_cache, "install", lambda: True)
    for name in ("LLMJAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE",
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def enabled(**env):
        updates.clear()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return runtime.enable_compilation_cache()

    default = str(tmp_path / "home" / ".cache" / "llmjax" / "jax")
    assert enabled() == default and updates == {"jax_compilation_cache_dir": default, "jax_persistent_cache_min_compile_time_secs": 0,
                                                "jax_compilation_cache_max_size": runtime.CACHE_MAX_BYTES}
    theirs = str(tmp_path / "jax-cache")
    assert enabled(JAX_COMPILATION_CACHE_DIR=theirs, JAX_COMPILATION_CACHE_MAX_SIZE="1000") == theirs
    assert updates == {"jax_compilation_cache_dir": theirs, "jax_persistent_cache_min_compile_time_secs": 0}
    assert enabled(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1", LLMJAX_COMPILATION_CACHE="~/ours") == str(tmp_path / "home" / "ours")
    assert updates == {"jax_compilation_cache_dir": str(tmp_path / "home" / "ours")}
    assert enabled(LLMJAX_COMPILATION_CACHE="") is None and updates == {}
    (tmp_path / "a-file").write_text("")
    assert enabled(LLMJAX_COMPILATION_CACHE=str(tmp_path / "a-file")) is None and updates == {}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: the compilation cache folder {tmp_path / 'a-file'} cannot be made (a file is in its place)")


def test_the_tools_say_a_cache_they_cannot_write_in_one_line(tmp_path, monkeypatch, capsys):
    """A full disk or a read-only cache folder under a command-line tool (enable_compilation_cache):
    one line that says what to do, not Python's warning lines (this file's name and line, then the
    source line of the call)."""
    import warnings

    import jax

    from llmjax import runtime

    monkeypatch.setattr(jax.config, "update", lambda name, value: None)
    monkeypatch.setattr(compile_cache, "install", lambda: True)
    monkeypatch.setenv("LLMJAX_COMPILATION_CACHE", str(tmp_path / "cache"))

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compile_cache.os, "replace", full)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        runtime.enable_compilation_cache()
        FolderCache(tmp_path / "cache", max_bytes=1 << 20).put("a" * 8, b"x" * 10)
    err = capsys.readouterr().err
    assert err == (f"warning: cannot write to the compilation cache {tmp_path / 'cache'} (No space left on device), so compiled programs "
                   "are not cached: make room there, or set LLMJAX_COMPILATION_CACHE to a folder that can be written (empty: no cache)\n")


def test_the_tools_say_a_damaged_entry_in_one_line(monkeypatch, capsys):
    """JAX's warning about an entry it cannot read (cut short, or another program's bytes: it compiles
    the program again, and FolderCache replaces the entry) under a command-line tool: one line, not
    Python's two (jax/_src/compiler.py's name and line, then `  warnings.warn(`)."""
    import warnings

    import jax

    from llmjax import runtime

    monkeypatch.setattr(jax.config, "update", lambda name, value: None)
    monkeypatch.setattr(compile_cache, "install", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        runtime.enable_compilation_cache()
        warnings.warn("Error reading persistent compilation cache entry for 'jit_step': error: Error -3 while decompressing data: "
                      "incorrect header check", UserWarning)
    assert capsys.readouterr().err == ("warning: Error reading persistent compilation cache entry for 'jit_step': error: Error -3 while "
                                       "decompressing data: incorrect header check (compiled again; the entry is replaced)\n")


def test_the_tuning_switches_take_0_for_off(monkeypatch):
    """LLMJAX_NO_MALLOC_TUNING / LLMJAX_NO_XLA_TUNING: any value turned the tuning off, 0 and false too."""
    import jax.numpy as jnp

    from llmjax import runtime

    for value, off in [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("false", False), ("", False),
                       ("off", False), (" No ", False)]:
        monkeypatch.setenv("LLMJAX_NO_XLA_TUNING", value)
        assert runtime.turned_off("LLMJAX_NO_XLA_TUNING") == off, value
        assert (runtime.cpu_compiler_options(jnp.float32, "cpu") is None) == off, value  # (the pinned jaxlib: measured on)


def test_a_jax_setting_it_cannot_read_is_one_line_in_every_tool():
    """JAX_COMPILATION_CACHE_MAX_SIZE (the README names it) set to no number was a ValueError's
    traceback from JAX's import, in every tool."""
    from conftest import ROOT

    for name, value, said in [("JAX_COMPILATION_CACHE_MAX_SIZE", "abc", 'Invalid value "abc" for JAX flag jax_compilation_cache_max_size'),
                              ("JAX_ENABLE_X64", "maybe", "invalid truth value 'maybe' for environment 'JAX_ENABLE_X64'")]:
        r = subprocess.run([sys.executable, "-m", "llmjax.summary", "--config", "configs/modern.py:tiny"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**os.environ, name: value})
        assert (r.returncode, r.stdout, r.stderr) == (2, "", f"error: the environment variable {name}={value!r} is not a value JAX reads "
                                                             f"({said}); set it to one, or unset it\n"), r.stderr
