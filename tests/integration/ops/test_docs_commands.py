"""Docs that cannot drift (issue 21): the shell blocks of docs/deploy.md, docs/operations.md and
docs/hierarchy.md.

- Every fenced block says what it is (```bash, ```text, ```yaml ...): a bare fence fails.
- Every ```bash block runs here, in order, one bash process per page, in an empty folder that
  holds the checkout's `broker/` and `deploy/` (as a checkout does), with only the fixture
  values below substituted (ports); or it is preceded by `<!-- not run by tests: WHY -->`.
- In the blocks that do not run, every `fedclip-edge` command line is checked against the real
  commands (each flag exists), so a renamed flag breaks here, not on a fleet.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import mqtt as mh
from support.cli import command_options
from support.pki import ROOT

PAGES = ["deploy.md", "operations.md", "hierarchy.md"]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run by tests[^>]*-->\s*$")


def blocks(text: str) -> list[tuple[int, str, str, bool]]:
    """(line, language, code, runs) of each fenced block."""
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1).strip(), m.group(2),
                    not NOT_RUN.search(before)))
    return out


def commands(code: str) -> list[list[str]]:
    """The `fedclip-edge ...` command lines of a shell block (continuations joined)."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        m = re.search(r"(?:^|[;(&|]\s*|exec\s+)fedclip-edge\s+(.*)", line)
        if not m:
            continue
        rest = re.split(r"\)?\s*(?:>>?|\||&&|;)", m.group(1))[0]
        try:
            out.append(shlex.split(rest))
        except ValueError:
            out.append(rest.split())
    return out


def test_the_block_parser() -> None:
    page = ("x\n```bash\nfedclip-edge keys new --out k --id a\n```\n"
            "<!-- not run by tests: needs a Jetson -->\n```bash\nsudo x\n```\n```text\ny\n```\n")
    assert [(lang, runs) for _, lang, _, runs in blocks(page)] == [
        ("bash", True), ("bash", False), ("text", True)]
    assert commands("(set -a; exec fedclip-edge agent --job j \\\n  --key k) > a.log 2>&1 &") == [
        ["agent", "--job", "j", "--key", "k"]]


@pytest.mark.parametrize("page", PAGES)
def test_every_block_says_what_it_is_and_flags_are_real(page: str) -> None:
    text = (ROOT / "docs" / page).read_text()
    found = blocks(text)
    assert found, page
    for line, lang, code, _ in found:
        assert lang, f"docs/{page}:{line}: a bare ``` fence: say bash, text, yaml ..."
        if lang == "bash":
            for argv in commands(code):
                _check(argv, f"docs/{page}:{line}")


# The README already shows `serve` (another branch); until it is merged it is the only name
# allowed to be missing. Anything else missing fails.
PENDING_SERVING = {"serve"}


def test_readme_command_lines_use_real_flags() -> None:
    """README.md's ```bash blocks are synopses (`[--flag V]`, `a|b`): not run, but every
    command and every flag they name must exist."""
    text = (ROOT / "README.md").read_text()
    options = command_options()
    checked, missing = 0, set()
    for line, lang, code, _ in blocks(text):
        if lang != "bash":
            continue
        for argv in commands(code):
            flat = [t for a in argv for t in a.strip("[](),").split("/") if t]
            if flat[0] not in options:
                missing.add(flat[0])
                continue
            if flat[0] == "export" and "--adapter" in flat and "--adapter" not in options["export"]:
                missing.add("export --adapter")
                continue
            _check(flat, f"README.md:{line}")
            checked += 1
    assert missing <= PENDING_SERVING, f"README.md names commands that do not exist: {missing}"
    assert checked >= 10, checked


def _check(argv: list[str], where: str) -> None:
    """The longest command prefix of argv exists, and each --flag is one of its options."""
    options = command_options()
    words = [a for a in argv if not a.startswith("-")]
    command = next((" ".join(words[:n]) for n in range(len(words), 0, -1)
                    if " ".join(words[:n]) in options), None)
    assert command is not None, f"{where}: no such command: fedclip-edge {' '.join(argv)}"
    for a in argv:
        if a.startswith("--"):
            flag = a.split("=", 1)[0]
            assert flag in options[command], f"{where}: `fedclip-edge {command}` has no {flag}"


def _page_script(page: str, subs: dict[str, str]) -> str:
    text = (ROOT / "docs" / page).read_text()
    parts = []
    for line, lang, code, runs in blocks(text):
        if lang != "bash" or not runs:
            continue
        for old, new in subs.items():
            code = code.replace(old, new)
        parts.append(f"echo '### docs/{page}:{line}' >&2\n{code}")
    return "\n".join(parts)


PREAMBLE = """set -euo pipefail
# a root shell's mosquitto would drop to the `mosquitto` user, who cannot enter a private tmp
mosquitto() {
  if [ "$(id -u)" = 0 ]; then grep -q '^user root' "$2" || echo 'user root' >> "$2"; fi
  # in the background (`mosquitto ... &`: a subshell) become the broker, so that `$!`, a
  # page's `kill` and the trap below reach mosquitto itself, not a shell that waits for it
  if [ "$BASHPID" != "$$" ]; then exec mosquitto "$@"; fi
  command mosquitto "$@"
}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
"""


def _run(page: str, tmp_path: Path, subs: dict[str, str], timeout: float) -> str:
    script = _page_script(page, subs)
    assert script, f"docs/{page} has no block that runs"
    for name in ("broker", "deploy"):
        (tmp_path / name).symlink_to(ROOT / name)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}:/usr/sbin:{os.environ.get('PATH', '')}"}
    env.pop("FEDCLIP_MQTT_PASSWORD", None)
    res = subprocess.run(["bash", "-c", PREAMBLE + script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=timeout)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in tmp_path.glob("*.log"))
    assert res.returncode == 0, f"docs/{page}: rc {res.returncode}\n{res.stderr[-4000:]}{logs}"
    return res.stdout + res.stderr


def _stop_pid(pidfile: Path) -> None:
    """SIGTERM the process a page's block started in the background, if it still runs."""
    try:
        os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
    except (OSError, ValueError, IndexError):
        pass  # never started, or already gone


@pytest.mark.integration
def test_deploy_md_blocks_run(tmp_path: Path) -> None:
    mh.require_mosquitto("mosquitto_passwd", "openssl")
    out = _run("deploy.md", tmp_path, {}, 300)
    assert (tmp_path / "keys" / "devices" / "dev-a.pub").is_file()
    assert "dev-b  SHA256:" in out
    assert (tmp_path / "broker-dev" / "keys" / "exporter.key").is_file()


@pytest.mark.integration
def test_hierarchy_md_blocks_run(tmp_path: Path) -> None:
    mh.require_mosquitto("mosquitto_passwd", "openssl")
    out = _run("hierarchy.md", tmp_path, {}, 300)
    assert "site-a.pub" in out and "dev-1.pub" in out
    conf = (tmp_path / "site-a-pki" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 18884$", conf, re.M)
    assert (tmp_path / "ca.crt").read_text().count("BEGIN CERTIFICATE") == 2


@pytest.mark.integration
@pytest.mark.mosquitto
def test_operations_md_walkthrough_runs(tmp_path: Path) -> None:
    mh.require_mosquitto("mosquitto_passwd", "openssl")
    port, metrics = mh.free_port(), mh.free_port()
    try:
        out = _run("operations.md", tmp_path, {"18883": str(port), "9464": str(metrics)}, 900)
    finally:  # the page stops its broker at its end; a failure before that must not leak it
        _stop_pid(tmp_path / "fleet" / "mosquitto.pid")
    log = (tmp_path / "aggregator.log").read_text()
    assert "interrupted: before any round was committed: nothing to keep" in log, log
    assert "job shapes done: 3 rounds" in log, log
    assert re.search(r"^fedclip_devices_online 1", out, re.M), out
    assert "job shapes: done" in out  # the last status
    rounds = [ln for ln in log.splitlines() if ln.startswith("round ") and " | clients " in ln]
    assert len(rounds) == 3 and all(" | codec fp32 x2" in ln for ln in rounds), log
    assert not any(ch in log for ch in "┏┃━"), "a box table in the log file"
    agent_log = (tmp_path / "dev-1.log").read_text()
    assert "connected to the broker; waiting for the aggregator's global" in agent_log
