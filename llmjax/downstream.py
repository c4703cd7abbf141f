"""HellaSwag and ARC-Easy, scored fast and exactly as lm-evaluation-harness scores them.

The data are the official files: HellaSwag's validation jsonl from the rowanz/hellaswag repository
on GitHub (10,042 items) and ARC-Easy's test split (2,376 questions; Hugging Face `allenai/ai2_arc`
parquet, kept as jsonl). Each is downloaded on first use into the task directory
($LLMJAX_TASK_DIR, default ~/.cache/llmjax/tasks) and checked by content (item count and every
item's fields), never by checksum; a local copy is used as is when the directory already holds it
(as `hellaswag_val.jsonl` or `hellaswag/hellaswag_val.jsonl`, `ARC-Easy-test.jsonl` or
`arc_easy/ARC-Easy-test.jsonl`).

Preprocessing and metrics are lm-eval's `hellaswag` and `arc_easy` tasks (0-shot):
- HellaSwag: context `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`,
  choices `preprocess(ending)`, where preprocess strips, turns " [title]" into ". ", drops
  bracketed WikiHow artefacts and double spaces;
- ARC: context "Question: {question}\\nAnswer:", choices the answer texts;
- each choice is scored as the continuation " " + choice (llmjax.scoring, lm-eval's tokenisation
  rules); `acc` takes the choice of highest log-likelihood, `acc_norm` the highest
  log-likelihood per character of the choice; ties go to the first.
The test suite checks per-item log-likelihoods and both metrics against lm-eval's own tasks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from llmjax.scoring import Scorer, encode_pair

TASK_NAMES = ("hellaswag", "arc_easy")


class TaskError(ValueError):
    """A task-data problem a user can fix (one line)."""


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _parse_hellaswag(doc: dict) -> Item:
    fields = {"activity_label": str, "ctx_a": str, "ctx_b": str, "endings": list, "label": (int, str)}
    for key, kind in fields.items():
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"field '{key}' missing or not {getattr(kind, '__name__', 'int')}")
    label = int(doc["label"])
    if len(doc["endings"]) != 4 or not all(isinstance(e, str) for e in doc["endings"]) or not 0 <= label < 4:
        raise ValueError("needs 4 string endings and a label in 0-3")
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Item(_hellaswag_clean(doc["activity_label"] + ": " + ctx), tuple(_hellaswag_clean(e) for e in doc["endings"]), label)


def _arc_doc(doc: dict) -> tuple[str, list[str], list[str], str]:
    """(question, choice texts, choice labels, answer key) of a Hugging Face `ai2_arc` row or an
    original AI2 jsonl row ({"question": {"stem", "choices": [{"text", "label"}]}})."""
    q = doc.get("question")
    if isinstance(q, dict):  # AI2's original format
        texts = [c.get("text") for c in q.get("choices", [])]
        labels = [c.get("label") for c in q.get("choices", [])]
        q = q.get("stem")
    else:
        choices = doc.get("choices") or {}
        texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(q, str) or not isinstance(texts, list) or not isinstance(labels, list) or not texts:
        raise ValueError("needs a question and choices {text, label}")
    if len(texts) != len(labels) or not all(isinstance(t, str) for t in texts + labels):
        raise ValueError("choices need as many string labels as texts")
    key = doc.get("answerKey")
    if key not in labels:
        raise ValueError(f"answerKey {key!r} is not among the labels {labels}")
    return q, texts, labels, key


def _parse_arc(doc: dict) -> Item:
    q, texts, labels, key = _arc_doc(doc)
    return Item(f"Question: {q}\nAnswer:", tuple(texts), labels.index(key))


def write_hub_arc(path: Path, out: Path) -> Path:
    """`path` itself when every row is in the Hugging Face `ai2_arc` layout (what lm-eval's arc_easy
    reads); else a copy at `out` with every row in that layout (id, question, choices {text, label},
    answerKey)."""
    with open(path, encoding="utf-8") as f:  # (by newlines, as parse_file: str.splitlines() also splits at U+2028,
        rows = [json.loads(line) for line in f if line.strip()]  # U+2029 and U+0085, which JSON allows in a string)
    if not any(isinstance(r.get("question"), dict) for r in rows):
        return Path(path)
    hub = []
    for r in rows:
        q, texts, labels, key = _arc_doc(r)
        hub.append({"id": r.get("id"), "question": q, "choices": {"text": texts, "label": labels}, "answerKey": key})
    out.write_text("".join(json.dumps(r) + "\n" for r in hub), encoding="utf-8")
    return out


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    file: str  # the file name in the task directory
    url: str
    count: int  # items in the official split
    parse: Callable[[dict], Item]
    split: str  # the split lm-eval's task scores


HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
ARC_EASY_URL = "https://huggingface.co/datasets/allenai/ai2_arc/resolve/main/ARC-Easy/test-00000-of-00001.parquet"
TASKS = {
    "hellaswag": TaskSpec("hellaswag", "hellaswag_val.jsonl", HELLASWAG_URL, 10042, _parse_hellaswag, "validation"),
    "arc_easy": TaskSpec("arc_easy", "ARC-Easy-test.jsonl", ARC_EASY_URL, 2376, _parse_arc, "test"),
}


def task_dir(configured: str | os.PathLike | None = None) -> Path:
    """Where task files are found and downloaded to: the argument, else $LLMJAX_TASK_DIR, else
    ~/.cache/llmjax/tasks."""
    return Path(configured or os.environ.get("LLMJAX_TASK_DIR") or Path.home() / ".cache" / "llmjax" / "tasks").expanduser()


def check_names(names: Sequence[str]) -> list[str]:
    """The task names, stripped, each once (in their first order), or a TaskError naming an unknown one."""
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))  # (hellaswag,hellaswag was scored twice)
    for n in names:
        if n not in TASKS:
            raise TaskError(f"unknown task '{n}' for the built-in scorer; it scores {', '.join(TASK_NAMES)}")
    return names


def parse_file(path: Path, spec: TaskSpec, *, downloaded_to: Path | None = None) -> list[Item]:
    """Every item of a task jsonl, or a one-line TaskError naming the first bad line.
    `downloaded_to`: `path` is a fresh download (a temporary file) for that folder; a damaged
    one is then said to be the download's (there is no file to delete)."""

    def bad(lineno: int | None, what: str) -> TaskError:
        if downloaded_to is not None:
            return damaged_download(spec, downloaded_to, f"its line {lineno} {what}" if lineno else f"it {what}")
        return TaskError(f"{path}{f':{lineno}' if lineno else ''} {what}; delete the file to download it again")

    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    items.append(spec.parse(json.loads(line)))
                except (ValueError, TypeError, AttributeError, RecursionError) as e:  # (json's decoder recurses)
                    raise bad(lineno, f"is not {'an' if spec.name[0] in 'aeiou' else 'a'} {spec.name} item ({e})") from None
    except OSError as e:
        raise TaskError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise bad(None, "is not UTF-8 text") from None
    if not items:
        if downloaded_to is not None:
            raise damaged_download(spec, downloaded_to, f"it holds no {spec.name} items")
        raise TaskError(f"{path} holds no {spec.name} items")
    return items


def damaged_download(spec: TaskSpec, folder: Path, what: str) -> TaskError:
    """A download that is not the task's data (an error page, a cut connection): nothing was kept."""
    return TaskError(f"the download of {spec.name} from {spec.url} is damaged ({what}); nothing was kept: "
                     f"try again later, or put {spec.file} in {folder}")


def _download(spec: TaskSpec, target: Path, tries: int = 4) -> None:
    """Fetch the official file into `target` (HellaSwag as is; ARC's parquet converted to jsonl),
    checking its content before it is moved into place. Folders it creates for it are removed
    again if the download fails."""
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # (deepest first)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TaskError(f"cannot use {target.parent} as the task directory ({e.strerror}); pass a folder") from None
    try:
        _fetch(spec, target, tries)
    except BaseException as e:
        for p in created:
            try:
                p.rmdir()
            except OSError:  # (not empty: someone else's)
                break
        if isinstance(e, OSError):  # (the folder cannot be written: network errors are TaskErrors already)
            raise TaskError(f"cannot write {spec.name}'s download into {target.parent} ({e.strerror or e}); "
                            f"put {spec.file} there or pass another task directory") from None
        raise


def _fetch(spec: TaskSpec, target: Path, tries: int) -> None:
    print(f"downloading {spec.name} from {spec.url} to {target}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        raw = Path(tmp) / spec.url.rsplit("/", 1)[-1]
        for attempt in range(tries):
            try:
                with urllib.request.urlopen(spec.url, timeout=60) as r, open(raw, "wb") as f:
                    while chunk := r.read(1 << 20):
                        f.write(chunk)
                break
            except Exception as e:  # network errors come in many types
                if attempt == tries - 1:
                    raise TaskError(
                        f"cannot download {spec.name} from {spec.url} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"put {spec.file} in {target.parent} or pass another task directory"
                    ) from None
                time.sleep(2**attempt)
        out = Path(tmp) / spec.file
        if raw.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise TaskError(f"reading {spec.name}'s parquet needs pyarrow: bash scripts/setup.sh prepare") from None
            import pyarrow as pa

            try:
                rows = pq.read_table(raw).to_pylist()
            except (pa.ArrowException, ValueError) as e:  # (an error page or a cut download: pyarrow's traceback before)
                raise damaged_download(spec, target.parent, f"not a parquet file: pyarrow's {type(e).__name__}") from None
            out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        else:
            raw.replace(out)
        items = parse_file(out, spec, downloaded_to=target.parent)
        if len(items) != spec.count:
            raise TaskError(f"the download of {spec.name} holds {len(items)} items, not {spec.count}; try again later")
        out.replace(target)


def find_file(name: str, directory: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """The task's file in the task directory (downloading it there when missing)."""
    spec = TASKS[check_names([name])[0]]
    base = task_dir(directory)
    if base.is_file():  # (a task's file given itself: "cannot use X as the task directory (File exists)")
        raise TaskError(f"the task directory {base} is a file; give the folder that holds {spec.file}"
                        + (f" ({base.parent})" if base.name == spec.file else f" (this file named {spec.file}, or a copy by that name)"))
    for candidate in (base / spec.file, base / spec.name / spec.file):
        if candidate.is_file():
            return candidate
    if not download:
        raise TaskError(f"no {spec.file} in {base}; download it from {spec.url}")
    _download(spec, base / spec.file)
    return base / spec.file


def load_items(name: str, directory: str | os.PathLike | None = None, *, limit: int | None = None) -> list[Item]:
    """The task's items in file order (the first `limit` of them). A downloaded file must hold
    the whole official split; a file found in the directory is used as is (e.g. a subset), with a
    note on stderr when its count differs from the official one. `limit` None or 0: every item."""
    spec = TASKS[check_names([name])[0]]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        # (a negative limit sliced from the end: -1, "no limit" elsewhere, scored all but the last item, unsaid)
        raise TaskError(f"limit must be a whole number >= 0 (0 or None: every item), got {limit!r}")
    path = find_file(name, directory)
    items = parse_file(path, spec)
    if len(items) != spec.count:
        print(f"note: {path} holds {len(items)} {spec.name} items (the official {spec.split} split has {spec.count})", file=sys.stderr)
    return items[:limit] if limit else items


def requests_for(items: Sequence[Item], tokenizer) -> list[tuple[list[int], list[int]]]:
    """The (context, continuation) token pairs of every choice of every item, item-major."""
    return [encode_pair(tokenizer, item.context, " " + choice) for item in items for choice in item.choices]


def metrics(items: Sequence[Item], lls: Sequence[float]) -> dict:
    """acc and acc_norm (log-likelihood per character of the choice) with their standard errors,
    plus each item's choice log-likelihoods."""
    per_item, correct, correct_norm, k = [], [], [], 0
    for item in items:
        scores = list(lls[k : k + len(item.choices)])
        k += len(item.choices)
        per_item.append(scores)
        # numpy's argmax and division, as lm-eval's: the first of equal scores wins, and an empty
        # choice's score per character is -inf (its continuation, " ", still has a log-likelihood)
        best = int(np.argmax(scores))
        with np.errstate(divide="ignore", invalid="ignore"):
            best_norm = int(np.argmax(np.asarray(scores) / np.asarray([float(len(c)) for c in item.choices])))
        correct.append(float(best == item.gold))
        correct_norm.append(float(best_norm == item.gold))
    n = len(items)

    def stderr(xs):
        if n < 2:
            return "N/A"  # (as lm-eval writes it; NaN is not JSON)
        mean = sum(xs) / n
        return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)

    return {
        "acc": sum(correct) / n, "acc_stderr": stderr(correct),
        "acc_norm": sum(correct_norm) / n, "acc_norm_stderr": stderr(correct_norm),
        "n": n, "loglikelihoods": per_item,
    }


def check_fit(name: str, items: Sequence[Item], requests: Sequence[tuple[list[int], list[int]]], context_len: int) -> None:
    """Raise TaskError, naming the first item, where a choice's tokens do not fit `context_len`
    (lm-eval's harness refuses such a request too: a score would need more than the context)."""
    k = 0
    for i, item in enumerate(items):
        longest = max(len(cont) for _, cont in requests[k : k + len(item.choices)])
        k += len(item.choices)
        if longest > context_len:
            raise TaskError(f"{name} item {i + 1} has a choice of {longest} tokens, more than the model's context of {context_len}; "
                            f"score fewer items (eval.tasks_limit, --limit) or use a model with a longer context")


def score_task(scorer: Scorer, tokenizer, items: Sequence[Item], *, progress: bool = False, requests=None) -> dict:
    """lm-eval's metrics for `items`, scored with `scorer` (see `metrics`); `requests`: theirs
    from `requests_for`, when already made."""
    check_tokenizer(tokenizer)
    results = scorer.score(requests if requests is not None else requests_for(items, tokenizer), progress=progress)
    return metrics(items, [ll for ll, _ in results])


def check_tokenizer(tokenizer, tasks: Sequence[str] | None = TASK_NAMES) -> None:
    """Refuse a character-level model (no end-of-text token), naming `tasks` (None: lm-eval's, whichever)."""
    if getattr(tokenizer, "eot_id", None) is None:
        if tasks is not None and set(tasks) <= set(TASKS):
            what = "HellaSwag and ARC"
        else:  # (the harness's: "HellaSwag and ARC" misnamed e.g. lambada_openai)
            what = "lm-eval's tasks" + (f" ({', '.join(tasks)})" if tasks else "")
        raise TaskError(
            f"{what} are scored on text with the GPT-2 BPE tokenizer; this is a character-level model "
            "(train a BPE config, e.g. data.dataset=tinyshakespeare, to score it)"
        )
