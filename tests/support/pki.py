"""A development PKI and a TLS mosquitto made the way the docs say (make-dev-pki.sh), for the
operator-path tests: the broker's config is the generated production one, only its listener
bound to loopback on a free port."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from support import mqtt as mh

ROOT = Path(__file__).resolve().parents[2]
PKI_SCRIPT = ROOT / "broker" / "scripts" / "make-dev-pki.sh"


def script_env() -> dict[str, str]:
    """The environment the scripts run in: this venv's `fedclip-edge` first on PATH."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}


def make_pki(out: Path, *devices: str, port: int | None = None, extra: tuple[str, ...] = ()
             ) -> Path:
    """`make-dev-pki.sh --out OUT [--port P] DEVICE...` (keys included); returns OUT."""
    mh.require_mosquitto("mosquitto_passwd", "openssl")
    args = ["bash", str(PKI_SCRIPT), "--out", str(out), *extra]
    if port is not None:
        args += ["--port", str(port)]
    res = subprocess.run([*args, *devices], capture_output=True, text=True, timeout=120,
                         env=script_env())
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def credentials(pki: Path, user: str) -> dict[str, str]:
    """credentials/<user>.env as a dict."""
    text = (pki / "credentials" / f"{user}.env").read_text()
    return dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)


@dataclass(frozen=True)
class TlsBroker:
    pki: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"mqtts://localhost:{self.port}"

    @property
    def ca(self) -> Path:
        return self.pki / "ca.crt"

    def log(self) -> str:
        return mh.mosquitto_log(self.proc)


@contextlib.contextmanager
def tls_mosquitto(pki: Path, workdir: Path) -> Iterator[TlsBroker]:
    """mosquitto with PKI/mosquitto.conf (made with --port), listening on loopback only."""
    conf = (pki / "mosquitto.conf").read_text()
    lines = [ln for ln in conf.splitlines() if ln.startswith("listener ")]
    assert len(lines) == 1, lines
    port = int(lines[0].split()[1])
    conf = conf.replace(f"\n{lines[0]}\n", f"\nlistener {port} 127.0.0.1\n")
    workdir.mkdir(parents=True, exist_ok=True)
    with mh.start_mosquitto(workdir, conf, port=port) as (proc, port):
        yield TlsBroker(pki, port, proc)


def fedclip(*args: str, env: dict[str, str] | None = None, timeout: float = 180.0,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`fedclip-edge ARGS` in a child process (stdout/stderr are pipes: log-file output)."""
    return subprocess.run([sys.executable, "-m", "fedclip_edge.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**script_env(), **(env or {})},
                          cwd=cwd or ROOT)


def aggregator_args(b: TlsBroker) -> list[str]:
    """The aggregator's broker, TLS and key flags on a make_pki broker (keys made)."""
    return ["--broker", b.url, "--ca-certs", str(b.ca), "--device-keys",
            str(b.pki / "keys" / "devices"), "--signing-key",
            str(b.pki / "keys" / "aggregator.key")]


def env_of(pki: Path, user: str) -> dict[str, str]:
    """FEDCLIP_MQTT_PASSWORD of `user` (as the unit's EnvironmentFile gives it)."""
    return {"FEDCLIP_MQTT_PASSWORD": credentials(pki, user)["FEDCLIP_MQTT_PASSWORD"]}
