"""The README's Python API example runs as written."""

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
