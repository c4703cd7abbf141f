"""README facts checked cheaply: its Python API example runs, its command transcripts print what
they show, its Layout and the paths it cites are the files there are."""

import re

from conftest import ROOT


def test_readme_python_example_runs(monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(ROOT)
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


def test_readme_command_transcripts_print_what_they_show():
    """Each README block that shows a command (`$ python -m llmjax.TOOL ...`) and its output: the
    tool prints that output (an error: on stderr, exit status 2)."""
    import shlex

    from helpers import cli_runs

    blocks = [b.splitlines() for b in re.findall(r"```\n(\$ python -m llmjax\..*?)```", (ROOT / "README.md").read_text(), re.S)]
    assert blocks, "README shows no command transcript"
    runs = [(args[2], args[3:]) for args in (shlex.split(b[0].removeprefix("$ ")) for b in blocks)]
    for lines, r in zip(blocks, cli_runs(runs)):
        shown = "\n".join(lines[1:]) + "\n"
        if shown.startswith("error: "):
            assert (r.returncode, r.stderr, r.stdout) == (2, shown, ""), lines[0]
        else:
            assert (r.returncode, r.stdout) == (0, shown), lines[0]


def test_readme_layout_and_cited_paths_exist():
    """The Layout block names every module and script there is, and only those; every repository
    path the README cites (`llmjax/...`, `scripts/...`, `tests/...py::test`, `configs/...`, `docs/...`) exists."""
    text = (ROOT / "README.md").read_text()
    layout = text.split("\n## Layout\n", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"[\w.+-]+\.(?:py|sh)\b", layout))
    files = {p.name for d in ("llmjax", "llmjax/models", "scripts") for p in (ROOT / d).iterdir()
             if p.suffix in (".py", ".sh") and p.name != "__init__.py"}
    assert named == files, f"in Layout, not a file: {sorted(named - files)}; a file Layout leaves out: {sorted(files - named)}"
    cited = set()
    for path, test in re.findall(r"(?<![\w/.])((?:llmjax|scripts|tests|configs|docs)/(?:[\w/.-]|\{[\w,]+\})*\w)(?:::(\w+))?", text):
        head, _, rest = path.partition("{")  # tests/test_{models,sample}.py: each of them
        names, _, tail = rest.partition("}")
        cited |= {(head + name + tail, test) for name in names.split(",")} if rest else {(path, test)}
    cited.discard(("configs/name.py", ""))  # (the new architecture's config, in "Adding an architecture")
    assert len(cited) > 20
    for path, test in cited:
        assert (ROOT / path).exists(), path
        if test:
            assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), re.M), f"{path}::{test}"
