"""Run a shipped systemd unit's `ExecStart` as systemd would: the command line parsed from the
unit, its environment from the unit's `Environment=` lines and an env file shaped like the
unit's `.env.example` (every variable the example defines, values pointed at fixtures)."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
INSTALLED_BIN = "/opt/fedclip-edge/venv/bin/fedclip-edge"
STATE = "/var/lib/fedclip-edge"  # StateDirectory=fedclip-edge


def unit_text(unit: str) -> str:
    return (SYSTEMD / unit).read_text().replace("\\\n", " ")


def env_example(name: str) -> dict[str, str]:
    """KEY=VALUE lines of deploy/systemd/NAME.env.example."""
    text = (SYSTEMD / f"{name}.env.example").read_text()
    return dict(ln.split("=", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))


def unit_environment(unit: str) -> dict[str, str]:
    """The unit's own Environment= assignments."""
    out = {}
    for ln in unit_text(unit).splitlines():
        if ln.startswith("Environment="):
            k, v = ln.removeprefix("Environment=").split("=", 1)
            out[k] = v
    return out


def exec_start(unit: str, env: dict[str, str], state_dir: Path) -> list[str]:
    """ExecStart expanded as systemd does (`${X}`: one word, `$X` alone: split at spaces), the
    installed command replaced by this interpreter's, /var/lib/fedclip-edge by `state_dir`."""
    line = next(ln for ln in unit_text(unit).splitlines() if ln.startswith("ExecStart="))
    argv: list[str] = []
    for word in shlex.split(line.removeprefix("ExecStart=")):
        alone = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if alone:
            argv += env.get(alone.group(1), "").split()
            continue
        word = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env.get(m.group(1), ""), word)
        argv.append(word.replace(STATE, str(state_dir)))
    assert argv[0] == INSTALLED_BIN, argv[0]
    return [sys.executable, "-m", "fedclip_edge.cli", *argv[1:]]


class Proc:
    """A child whose output lines are collected; `wait_for(text)` blocks until one has it."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, cwd="/")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(text in ln for ln in self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    self.cond.wait(0.5)  # the last lines of a process that ended
                    raise AssertionError(f"no line with {text!r} (rc {self.p.poll()}):\n"
                                         + "\n".join(self.lines))
                self.cond.wait(min(left, 0.5))

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)  # KillSignal=SIGTERM
            try:
                return self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                return self.p.wait(10)
        return self.p.returncode
