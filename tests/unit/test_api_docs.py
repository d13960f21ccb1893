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


# --- README and the docs pages: short, linked, about the product -------------------------------

ROOT = API_MD.parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 250
LINK = re.compile(r"\]\(([^)\s]+)\)")
# words that name the way the project was built (work items, phases), not the product
WORK_WORDS = re.compile(r"\bissue \d+|\bphases? \d|\bthis session\b|\bprevious session\b", re.I)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # no code comments
    return {github_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def test_github_anchor():
    assert github_anchor("The offline default model: `fedclip-tiny`") == (
        "the-offline-default-model-fedclip-tiny"
    )
    assert github_anchor("10,000 devices at ViT-B-32 width (dim 512)") == (
        "10000-devices-at-vit-b-32-width-dim-512"
    )


def test_readme_fits_its_limit():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (limit {README_MAX_LINES})"


def test_readme_keeps_the_quickstart_commands():
    text = README.read_text()
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in text
        assert (ROOT / command.split()[1]).is_file(), command


def test_readme_and_docs_links_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and its #anchor a
    heading of that file; a page moved or a heading renamed fails here."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                # the serving docs arrive with the serving part; until then it is the only gap
                if file == ROOT / "docs" / "serving.md" and not (ROOT / "serving").is_dir():
                    continue
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_docs_speak_of_the_product():
    found = [
        f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
        for page in [README, *sorted((ROOT / "docs").glob("*.md"))]
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if WORK_WORDS.search(line)
    ]
    assert not found, "\n".join(found)
