"""docs/api.md's examples run: every ```python block, in order, as one script (later blocks use
what earlier ones made), in a temporary folder. A broken example fails here, naming its block.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```\s*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, code) of each ```python block."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


def test_blocks_are_found():
    """The extractor itself: a page with two blocks and a non-python one gives two."""
    page = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = a\n```\n"
    assert python_blocks(page) == [(3, "a = 1\n"), (9, "b = a\n")]


def test_api_page_covers_the_public_pieces():
    text = API_MD.read_text()
    for name in (
        "build_features",
        "simulate",
        "export_artifact",
        "open_extractor",
        "Aggregator",
        "Agent",
        "FedAvg",
    ):
        assert any(name in code for _, code in python_blocks(text)), name


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_md"}
    for line, code in python_blocks(API_MD.read_text()):
        try:
            exec(compile(code, f"{API_MD.name}:{line}", "exec"), namespace)  # noqa: S102
        except Exception as exc:  # the block's line number in the failure, not just a trace
            pytest.fail(f"docs/api.md block at line {line} failed: {type(exc).__name__}: {exc}")
    out = capsys.readouterr().out
    assert "result after round 2" in out and "selected round (seed 0)" in out
