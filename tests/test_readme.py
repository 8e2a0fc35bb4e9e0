"""README.md: its Python code blocks run, and it stays short.

Every ```python block is executed, in order, in one namespace (later blocks use the model and data
of earlier ones), as a reader would paste them. They run at a smaller scale than written: each
key of SMALL (an exact text of the README) is replaced by its value before the run, and the test
fails if a key no longer occurs, so the README and this table cannot drift apart silently.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_LINES = 250
SMALL = {
    "range(2000)": "range(20)",
    "n_samples=10_000": "n_samples=64",
    "n_samples=1_000": "n_samples=32",
}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_is_under_250_lines():
    assert len(README.read_text().splitlines()) < MAX_LINES


def test_every_small_substitution_matches_the_readme():
    code = "\n".join(python_blocks(README.read_text()))
    for text in SMALL:
        assert text in code, f"README.md no longer contains {text!r}: update SMALL in {Path(__file__).name}"


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        for text, small in SMALL.items():
            block = block.replace(text, small)
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:  # name the block, not just the line inside it
            pytest.fail(f"README.md python block {i + 1} raised {type(e).__name__}: {e}\n{block}")


def test_no_document_uses_the_banned_word():
    """Documents state facts, the command that measures them and where; not who ran what when."""
    word = "sess" + "ion"
    skip = {".venv", ".venv-cpu", "build", "build-cpu", ".git", "node_modules"}
    docs = [p for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts)]
    assert README in docs
    offenders = [str(p.relative_to(ROOT)) for p in docs if word in p.read_text().lower()]
    assert not offenders, f"{word!r} in {offenders}"
