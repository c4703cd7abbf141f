"""What every `python -m llmjax.<tool>` shares: the `--config path[:variant]` flag with
`--config.group.key=value` overrides (ml_collections config_flags), and one-line errors.

A user's mistake (a missing file, an unknown variant or key, a value of the wrong type) ends the
program with `error: <what to do>` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import signal
import sys
from pathlib import Path
from typing import Callable

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

import llmjax
from llmjax.config import ConfigError, check_key, flags_spec, load_config, parse_value, split_spec, validate
from llmjax.tokenizer import InstallError

FLAGS = flags.FLAGS

# the trainer's exit status when its loss, gradients or update became inf or NaN (llmjax.train.NonFinite):
# `llmjax.compare` records such a run as diverged and goes on with the others
NON_FINITE_EXIT = 3


def define_config_flag(required: bool = True):
    try:  # (config_flags reads sys.argv's --flagfiles here already: one that cannot be read was its traceback)
        return config_flags.DEFINE_config_file(
            "config",
            default=None,
            help_string="config file and variant, e.g. configs/modern.py or configs/modern.py:tiny; "
            "override keys with --config.train.lr=3e-4",
            lock_config=True,
        )
    except flags.Error as e:
        fail(_flagfile_error(e))


# the last line `fail` said (llmjax.train tells a multi-process run's other processes what stopped this one)
last_error: str | None = None


def fail(message: str, code: int = 2):
    global last_error
    # (one line whatever it quotes: a value with a newline in it, --config.model.dtype=$'float32\n', split the line in two)
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    last_error = message
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class TextOut:
    """Model text for stdout (the sampler's samples, the trainer's end-of-run sample). A character
    stdout's encoding cannot hold (a latin-1 or cp1252 terminal or pipe, where a GPT-2 BPE model may
    write any character) is written as a \\uXXXX escape, as Python writes stderr, and counted: it was
    UnicodeEncodeError, a traceback that ended the text where it stood. `warn` says how many, once,
    on stderr. A stream whose own errors handler is not strict (PYTHONIOENCODING=latin-1:replace)
    writes as it was told."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.encoding = getattr(self.stream, "encoding", None) or "utf-8"
        self.strict = getattr(self.stream, "errors", "strict") == "strict"
        self.escaped = 0

    def write(self, text: str, flush: bool = False):
        if self.strict:
            try:
                text.encode(self.encoding)
            except UnicodeEncodeError:
                self.escaped += sum(1 for c in text if not _encodes(c, self.encoding))
                text = text.encode(self.encoding, "backslashreplace").decode(self.encoding)
        self.stream.write(text)
        if flush:
            self.stream.flush()

    def warn(self):
        if self.escaped:
            print(f"warning: {self.escaped} character(s) of the text are not in the output's encoding ({self.encoding}) and were "
                  "written as \\uXXXX escapes; for the characters themselves set PYTHONIOENCODING=utf-8 (or a UTF-8 locale)",
                  file=sys.stderr, flush=True)
            self.escaped = 0


def _encodes(char: str, encoding: str) -> bool:
    try:
        char.encode(encoding)
        return True
    except UnicodeEncodeError:
        return False


def _config_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """The --config spec and the dotted keys of the --config.* overrides in argv."""
    spec, keys = None, []
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
        elif arg.startswith("--config."):
            keys.append(arg[len("--config.") :].split("=", 1)[0])
    return spec, keys


def _override_values(argv: list[str], cfg) -> list[tuple[str, str]]:
    """(key, text) of each override in argv (up to `--`) that gives a value: --config.KEY=VALUE, and
    absl's --config.KEY VALUE for a key that is not a bool (a bool's --config.KEY alone means true)."""
    out, i = [], 1
    while i < len(argv) and argv[i] != "--":
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, text = arg[len("--config.") :].partition("=")
            if eq:
                out.append((key, text))
            elif i + 1 < len(argv) and not isinstance(cfg[key], bool):
                out.append((key, argv[i + 1]))
                i += 1
        i += 1
    return out


def _with_spec(argv: list[str], spec: str) -> list[str]:
    """argv with its (last) --config value replaced by `spec`."""
    out = list(argv)
    for i in range(len(out) - 1, 0, -1):
        if out[i].startswith("--config="):
            out[i] = f"--config={spec}"
            break
        if out[i] == "--config" and i + 1 < len(out):
            out[i + 1] = spec
            break
    return out


def config_spec(argv: list[str]) -> str | None:
    """The `--config` spec as given on the command line (e.g. configs/modern.py:tiny)."""
    return _config_args(argv)[0]


def _misplaced_override(argv: list[str]) -> str | None:
    """The first --config.KEY=VALUE override with no --config before it (config_flags: 'Unknown
    command line flag' without one, 'Found ... before a value for --config' before it), else None.
    absl's forms count: -config (one dash), and a --flagfile, which may give --config (config_flags judges)."""
    seen_config = False
    for arg in argv[1:]:
        if arg == "--":
            break
        if re.fullmatch(r"--?(config|flagfile)(=.*)?", arg, re.DOTALL):
            seen_config = True
        elif re.match(r"--?(no)?config\.", arg) and not seen_config:
            return arg
    return None


_COMMAND_LINE: list[str] | None = None  # (argv as _parse read it)


def command_line() -> list[str]:
    """The command line as parsed (sys.argv before that): each --flagfile's arguments in its place,
    absl's one-dash -config forms written with two dashes."""
    return list(_COMMAND_LINE if _COMMAND_LINE is not None else sys.argv)


def _expand(argv: list[str]) -> list[str]:
    """argv with every --flagfile replaced by its arguments (absl's own reading, as FLAGS(argv) does
    it) and -config, -config=... and -config.KEY=... written --config...: our checks of the spec
    and its overrides, and config_flags' ':default' (flags_spec), then see every form of them."""
    out = _home([*argv[:1], *FLAGS.read_flags_from_files(_home(argv)[1:], force_gnu=False)])
    for i, arg in enumerate(out[1:], start=1):
        if arg == "--":
            break
        if re.match(r"-(no)?config(\.|=|$)", arg):
            out[i] = "-" + arg
    return out


def _home(argv: list[str]) -> list[str]:
    """argv with `--PATH_FLAG=~...` expanded: the shell expands `--out ~/x`, not `--out=~/x`."""
    out = list(argv)
    for i, arg in enumerate(out[1:], start=1):
        if arg == "--":
            break
        if (m := re.match(rf"(--?)({'|'.join(PATH_FLAGS)})=(~.*)$", arg)) is not None:
            out[i] = f"{m[1]}{m[2]}={os.path.expanduser(m[3])}"
    return out


# flags that name a file or folder: `--out=~/x` reaches us unexpanded (the shell expands `--out ~/x`
# only); _expand expands it, as the shell would have (a flagfile's lines too)
PATH_FLAGS = ("workdir", "out", "o", "doc", "output_json", "checkpoint", "checkpoint_path", "prompt_file", "config", "task_dir",
              "profile", "flagfile")


def _flagfile_error(e: Exception) -> str:
    """absl's 'ERROR:: Unable to open flagfile: ...' as one line, without its prefix."""
    return re.sub(r"^ERROR::\s*", "", " ".join(str(e).split()))


def _asks_for_help(argv: list[str]) -> bool:
    """Whether the command line has absl's --help, -?, --helpfull, --helpshort or --helpxml (before a `--`)."""
    words = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    return any(w.startswith("-") and w.lstrip("-").split("=")[0] in ("help", "?", "helpfull", "helpshort", "helpxml") for w in words)


def _parse(argv: list[str]):
    global _COMMAND_LINE
    try:
        argv = _expand(argv)
    except flags.Error as e:  # (a --flagfile that cannot be read)
        fail(_flagfile_error(e))
    _COMMAND_LINE = argv
    spec, keys = _config_args(argv)
    # (absl keeps the last --config: two configs trained the second, silently; with overrides between them
    # config_flags said "The flag 'config.train.max_steps' is defined twice")
    if "config" in FLAGS and len(specs := [v for _, v in given(argv, ("config",))]) > 1:
        fail(f"--config is given {len(specs)} times ({', '.join(specs)}); give one config, then its overrides "
             "(--config.KEY=VALUE)")
    early = _misplaced_override(argv)
    if early is not None and "config" in FLAGS:
        fail(f"{early} comes before --config; give --config {spec} first, then its overrides" if spec is not None else
             f"{early} overrides a key of the --config file; give --config configs/FILE.py[:variant] before it")
    try:
        if spec is not None:  # our own checks first: clearer messages than config_flags'
            cfg = load_config(spec)
            values = {key: check_key(cfg, key) for key in keys}
            # (a group given whole and one of its keys: config_flags said "max_steps is not a valid key or attribute
            # of <class 'ml_collections...ConfigDict'>", where the group had replaced the config's)
            for group in (k for k, v in values.items() if isinstance(v, ConfigDict)):
                if inner := next((k for k in keys if k.startswith(group + ".")), None):
                    raise ConfigError(f"--config.{group}={{...}} replaces the whole group and --config.{inner} sets one of its keys; "
                                      f"set them one by one, --config.{group}.KEY=VALUE")
            for key, text in _override_values(argv, cfg):  # (config_flags: "('Non-boolean argument to boolean flag', 'yes')")
                try:
                    parse_value(cfg, key, text)
                except ConfigError as e:
                    raise ConfigError(f"--config.{e}") from None
            argv = _with_spec(argv, flags_spec(spec))  # (config_flags calls get_config as load_config did)
        # config_flags imports the --config file: no bytecode cache written beside it (load_config writes
        # none either), which a later load of the file rewritten within the second at the same size would read
        dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
        try:
            rest = FLAGS(argv)
        except SystemExit as e:  # (absl's --help and its kin print the flags, then exit 1: a help asked for is no failure)
            if e.code == 1 and _asks_for_help(argv):
                sys.exit(0)
            raise
        except OSError as e:  # (the help's text to a standard output that fails: `--help | true` was 'error: [Errno 32] Broken pipe')
            if not _asks_for_help(argv):
                raise
            if isinstance(e, BrokenPipeError):
                _reader_gone()
            e.on_stdout = True
            fail(file_system_error(e) or f"standard output: {e.strerror or e}", code=1)
        finally:
            sys.dont_write_bytecode = dont_write
        if spec is not None:
            validate(FLAGS["config"].value)
        return rest
    except ConfigError as e:
        fail(str(e))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        text = " ".join(str(e).replace("\\n", " ").split())
        fail(re.sub(r"^flag (--\S+): ", r"\1: ", text) or type(e).__name__)


def _reader_gone():
    """The reader of stdout went away (`... | head`): stop quietly, as other tools do."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's exit flush would fail again)
    sys.exit(141)  # 128 + SIGPIPE, the shell's status for a tool killed by it


class Terminated(KeyboardInterrupt):
    """A SIGTERM where a tool installed `terminate`: it stops as a Ctrl-C stops it, in one line, but
    with exit status 143 (128 + SIGTERM). Without it, the process ended at once, silently, with -15."""


def terminate(signum, frame):
    """signal.signal(signal.SIGTERM, cli.terminate): a SIGTERM raises Terminated in the main thread."""
    raise Terminated


def tool(name: str):
    """The tool's module as other modules import it (`llmjax.sample`), for its `__main__` block to
    run: `python -m llmjax.sample` runs the file as `__main__`, a second copy of its classes beside
    the module's own, so an object the copy made was not the module's kind where other modules check
    (the sampler on a Hugging Face folder: `export.load_gpt2`'s `generate` refused `__main__.Sampling`,
    a traceback) and an error the module raised was not the one the copy caught."""
    import importlib

    return importlib.import_module(name)


def run(main: Callable[[list[str]], None]):
    """absl's app.run with flag errors and ConfigErrors reported as one line."""

    def guarded(argv):
        logging.set_verbosity(logging.WARNING)  # Orbax and grain log every save at INFO
        if signal.getsignal(signal.SIGINT) is llmjax._interrupted_while_starting:  # (the tool has imported: Ctrl-C is
            signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt again, which tools handle)
        if sys.stdout is None:  # (`>&-`: an AttributeError's traceback at the first text, after the work: a training run's closing sample)
            fail("standard output is closed, and this tool writes its results there; redirect it to a file (or /dev/null) instead")
        if not isinstance(sys.stdout, _Stdout):  # (a process that runs several tools: one wrapper, not one per tool)
            sys.stdout = _Stdout(sys.stdout)
        try:
            main(argv)
            sys.stdout.flush()  # (here, not at Python's exit: a full disk there was 'Exception ignored in: <_io.TextIOWrapper ...>')
        except (ConfigError, InstallError) as e:  # (InstallError: a shipped file damaged, met in prepare's workers or
            fail(str(e))  # a built-in dataset's preparation: a traceback, a _RemoteTraceback for the workers')
        except RuntimeError as e:  # (XLA's JaxRuntimeError: a tool words device memory itself, cli.out_of_memory)
            line = exhausted(e) if type(e).__name__ == "JaxRuntimeError" else None
            if line is None:
                raise
            fail(line, code=1)
        except KeyboardInterrupt as e:  # (a tool that keeps something says what in its own handler)
            fail("interrupted by SIGTERM", code=143) if isinstance(e, Terminated) else fail("interrupted", code=130)
        except BrokenPipeError:  # the reader of stdout went away (`... | head`): stop quietly, as other tools do
            _reader_gone()
        except OSError as e:  # where a tool did not word it itself (pathlib's exists() and is_dir() pass EACCES on)
            line = file_system_error(e)
            if line is None:
                raise
            fail(line, code=1)

    app.run(guarded, flags_parser=_parse)


# XLA's words for a device allocation that failed: 'Out of memory while trying to allocate N bytes.'
# (the GPU's allocator), 'Out of memory allocating N bytes.' (the CPU's), 'CUDA_ERROR_OUT_OF_MEMORY: out of
# memory', 'Ran out of memory in memory space hbm' (TPU), 'Failed to allocate request for 32.00MiB
# (33554432B) on device ordinal 0' (stream executor), 'Error allocating device buffer: ...' (TPU)
_DEVICE_MEMORY = re.compile(r"(?i)(out of memory|failed to allocate request for|error allocating device buffer)[^\n]*")

# what to do for XLA's RESOURCE_EXHAUSTED of something other than device memory, by its words
# (absl gives ENOSPC, EDQUOT, EMFILE and ENFILE that code too; XLA:GPU its host memory pool's limit
# (backends/gpu/runtime/host_memory_pool.cc) and its kernels' register and shared-memory limits
# (stream_executor/cuda/cuda_executor.cc, the Triton emitter))
_EXHAUSTED_ADVICE = [
    (r"host memory pool", "more calls of one compiled program were in flight at once than XLA:GPU keeps room for; this is not "
                          "memory running short: report it with the command that gave it"),
    (r"too many open files|file descriptor|\bE[MN]FILE\b", "the process may open no more files: raise its limit (ulimit -n) and run again"),
    (r"no space left|disk quota|\bENOSPC\b|\bEDQUOT\b", "a disk is full: make room and run again"),
    (r"shared memory|register allocation|registers", "a GPU kernel XLA built needs more of the GPU's registers or shared memory than it has, which a smaller "
                                "batch may not change: try another kernel (e.g. --config.model.attention_impl=xla), or report it with XLA's words"),
]


class _Stdout:
    """sys.stdout while a tool runs, whose write and flush mark their OSError as standard output's:
    Python's names no file (`> /dev/full`, or a full disk under `> out.txt`, was 'a file: No space
    left on device')."""

    def __init__(self, stream):
        self.stream, self.failed = stream, False

    def write(self, text):
        try:
            return self.stream.write(text)
        except OSError as e:
            raise self._failed(e)

    def flush(self):
        try:
            self.stream.flush()
        except OSError as e:
            raise self._failed(e)

    def _failed(self, error: OSError) -> OSError:
        error.on_stdout = True
        if not self.failed:  # (the text it still holds failed Python's exit flush again: a traceback after the tool's line)
            self.failed = True
            atexit.register(lambda: os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno()))
        return error

    def __getattr__(self, name):  # (encoding, errors, fileno, isatty, ...: the stream's own)
        return getattr(self.stream, name)


def file_system_error(error: OSError) -> str | None:
    """One line for a path the user may not read or write, or a full disk; None for other OS errors
    (their traceback is what a report needs)."""
    where = ("standard output" if getattr(error, "on_stdout", False) else
             " -> ".join(str(f) for f in (error.filename, error.filename2) if f is not None) or "a file")
    if error.errno in (errno.EACCES, errno.EPERM):
        return (f"{where}: {error.strerror or 'permission denied'} (the user this runs as may not read or write there): "
                f"choose another path, or change its permissions")
    if error.errno == errno.EROFS:  # (no permission mends it)
        return f"{where}: {error.strerror or 'read-only file system'}: nothing can be written on that disk; choose a path on another, or mount it read-write"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        full = "your disk quota is used up" if error.errno == errno.EDQUOT else "a disk is full"
        return f"{where}: {error.strerror or 'no space left'}: {full}; make room and run again"
    return None


def out_of_memory(error: BaseException) -> str | None:
    """XLA's own words for a device allocation that failed ('Out of memory allocating N bytes.'),
    whether raised as RESOURCE_EXHAUSTED (at a result) or INTERNAL (at a dispatch); None for any
    other error, a RESOURCE_EXHAUSTED of another resource too (`exhausted` words that one)."""
    found = _DEVICE_MEMORY.search(str(error))
    return None if found is None else " ".join(found.group(0).split())[:200]


def exhausted(error: BaseException) -> str | None:
    """One line for XLA's RESOURCE_EXHAUSTED of something other than device memory (a file limit, a
    full disk, a GPU kernel's registers or shared memory, XLA:GPU's host memory pool): the first line of XLA's
    message and the advice that applies; None for device memory (`out_of_memory`) and other errors."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text or out_of_memory(error) is not None:
        return None
    lines = [line.strip() for line in text.split("RESOURCE_EXHAUSTED", 1)[1].lstrip(":").splitlines()]
    first = next((line for line in lines if line), "(no message)")[:300].rstrip(".")
    advice = next((a for pattern, a in _EXHAUSTED_ADVICE if re.search(pattern, first, re.IGNORECASE)),
                  "it is not device memory, so a smaller batch may not help; XLA's words name what ran out")
    return f"XLA ran out of a resource (RESOURCE_EXHAUSTED): {first}; {advice}"


def define_checkpoint_flags():
    """--checkpoint_path (alias --checkpoint) and --which: the flags of every tool that reads a run."""
    flags.DEFINE_string("checkpoint_path", None, "a training run directory (runs/NAME), one of its checkpoints/<step>, "
                        "or OpenAI GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a Hugging Face GPT-2 folder")
    flags.DEFINE_alias("checkpoint", "checkpoint_path")
    flags.DEFINE_enum("which", "latest", ["latest", "best"], "with a run directory: its latest checkpoint or the best by val loss")


def given(argv: list[str], names: tuple[str, ...]) -> list[tuple[str, str]]:
    """('--name', value) for each time a flag of `names` (a flag and its aliases) is given in argv,
    read as absl reads it: `--name=value` or `--name value`, one dash or two; a non-boolean flag's
    separate value is not itself a flag; nothing after `--`."""
    out, args = [], iter(argv[1:])
    for arg in args:
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name, eq, value = arg[2 if arg.startswith("--") else 1 :].partition("=")
        flag = FLAGS[name] if name in FLAGS else None
        if flag is None or (flag.boolean and not eq):
            continue
        if not eq:
            value = next(args, None)
            if value is None:
                break
        if name in names:
            out.append((f"--{name}", value))
    return out


def refuse_empty(**paths: str) -> None:
    """Refuse each file or folder flag of `paths` (name -> what it takes) given an empty value
    (`--out=`, or `--out "$DIR"` with DIR unset): absl reads it as given, and the tool went on as
    without it, silently (its results not written, or written to the default place)."""
    for name, what in paths.items():
        if FLAGS[name].present and FLAGS[name].value == "":
            fail(f"--{name} is empty (a shell variable that was not set?); give {what}, or drop --{name}")


def start_run_reader(argv: list[str], example: str) -> None:
    """The common start of a tool that reads a training run (sample, evaluate, export): no stray
    arguments, --checkpoint_path given once (absl keeps the last of several values, its alias
    --checkpoint's among them), JAX's compilation cache on, Orbax's read-only notice off."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    paths = given(command_line(), ("checkpoint", "checkpoint_path"))
    for name, value in paths[1:]:
        if Path(value) != Path(paths[0][1]):  # (the same run written twice, runs/x and runs/x/, is one)
            fail(f"{paths[0][0]}={paths[0][1]} and {name}={value} name two runs; give one")
    if not FLAGS.checkpoint_path:
        fail(f"--checkpoint_path is required: a training run directory such as {example}")
    from llmjax.runtime import enable_compilation_cache

    enable_compilation_cache()
    logging.set_verbosity(logging.ERROR)  # Orbax logs its read-only mode at WARNING


__all__ = ["define_checkpoint_flags", "define_config_flag", "fail", "refuse_empty", "run", "split_spec", "start_run_reader"]
