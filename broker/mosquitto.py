"""One launcher of a private mosquitto, for benchmarks and tests.

Why: a real broker's limits (packet size, queues, ACL, TLS) are what a run meets in production;
the embedded amqtt broker has none of them. Benchmarks and tests used to start mosquitto in two
places with two sets of bugs; this is the one. It finds the binary (PATH, then the sbin folders
a non-root PATH lacks), picks a free loopback port, writes a config (or takes yours, with
`{port}` filled in), starts the process, waits (bounded) until the port accepts connections and
stops it with `stop_process` at exit, whatever happens in between.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedclip_edge.broker.procs import stop_process
from fedclip_edge.errors import ConfigError, TransportError

HOST = "127.0.0.1"
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin", "/snap/bin")


def find_tool(name: str) -> str | None:
    """`shutil.which`, then the sbin folders (Debian installs mosquitto in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN_DIRS:
        cand = Path(folder) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def mosquitto_binary() -> str | None:
    """Path of the mosquitto broker binary, or None."""
    return find_tool("mosquitto")


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago; another process may take it first (then the
    broker fails to bind and `run_mosquitto` says so with its log)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when host:port accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class TlsListener:
    """A second listener with TLS (server certificate and key, the CA that signed clients')."""

    port: int
    certfile: Path
    keyfile: Path
    cafile: Path | None = None
    require_certificate: bool = False


def mosquitto_config(
    port: int,
    *,
    host: str = HOST,
    allow_anonymous: bool = True,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    max_packet_size: int | None = None,
    persistence_dir: Path | None = None,
    tls: TlsListener | None = None,
    extra: str = "",
) -> str:
    """The text of a private broker's config: one loopback listener, persistence off unless a
    folder is given, settings shared by all listeners."""
    lines = ["per_listener_settings false", f"allow_anonymous {str(allow_anonymous).lower()}"]
    if password_file is not None:
        lines.append(f"password_file {password_file}")
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    if max_packet_size is not None:
        lines.append(f"max_packet_size {int(max_packet_size)}")
    if persistence_dir is None:
        lines.append("persistence false")
    else:
        lines += ["persistence true", f"persistence_location {str(persistence_dir).rstrip('/')}/"]
    lines.append(f"listener {port} {host}")
    if tls is not None:
        lines += [f"listener {tls.port} {host}", f"certfile {tls.certfile}",
                  f"keyfile {tls.keyfile}"]
        if tls.cafile is not None:
            lines.append(f"cafile {tls.cafile}")
        if tls.require_certificate:
            lines.append("require_certificate true")
    if extra:
        lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


@dataclass
class Mosquitto:
    """A running private mosquitto: its process, port, files and the config it was given."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    binary: str
    conf_path: Path
    log_path: Path
    config: str
    extra_ports: tuple[int, ...] = field(default_factory=tuple)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """What mosquitto wrote so far: attach it to error and assertion messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def version(self) -> str:
        """mosquitto's first `-h` line (e.g. 'mosquitto version 2.0.11'), '' if unknown."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [self.binary, "-h"], capture_output=True, text=True, timeout=5
            ).stdout.splitlines()
            return out[0] if out else ""
        return ""


def _as_root(text: str) -> str:
    """As root mosquitto drops to user `mosquitto`, which cannot read a private tmp folder."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        if not any(line.strip().startswith("user ") for line in text.splitlines()):
            return "user root\n" + text
    return text


@contextlib.contextmanager
def run_mosquitto(
    workdir: Path,
    config: str | None = None,
    *,
    port: int | None = None,
    host: str = HOST,
    wait_ports: Sequence[int] = (),
    timeout: float = 10.0,
    binary: str | None = None,
    allow_anonymous: bool = True,
    password_file: Path | None = None,
    acl_file: Path | None = None,
    max_packet_size: int | None = None,
    persistence_dir: Path | None = None,
    tls: TlsListener | None = None,
    extra: str = "",
) -> Iterator[Mosquitto]:
    """A private mosquitto on `host:port` (a free port when None) until the block ends.

    `config`: the whole text, used as is with `{port}` replaced (then the keyword settings are
    ignored); otherwise `mosquitto_config` builds it from them. Yields once `port` and every
    port in `wait_ports` (and the TLS listener's) accept connections, within `timeout` seconds;
    raises TransportError with mosquitto's log if it exits or never listens, ConfigError when
    there is no binary. The config and log are written to WORKDIR/mosquitto-PORT.{conf,log}.
    """
    binary = binary or mosquitto_binary()
    if binary is None:
        raise ConfigError(
            "no mosquitto binary found (Debian/Ubuntu: apt install mosquitto mosquitto-clients)"
        )
    port = free_port(host) if port is None else port
    if config is None:
        text = mosquitto_config(
            port, host=host, allow_anonymous=allow_anonymous, password_file=password_file,
            acl_file=acl_file, max_packet_size=max_packet_size,
            persistence_dir=persistence_dir, tls=tls, extra=extra,
        )
    else:
        text = config.replace("{port}", str(port))
    waits = (port, *wait_ports, *((tls.port,) if tls is not None and config is None else ()))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if persistence_dir is not None and config is None:
        # mosquitto does not create it: without it every save fails ("Error saving in-memory
        # database") and a restart silently loses the sessions and queued messages
        Path(persistence_dir).mkdir(parents=True, exist_ok=True)
    conf_path, log_path = workdir / f"mosquitto-{port}.conf", workdir / f"mosquitto-{port}.log"
    conf_path.write_text(_as_root(text))
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [binary, "-c", str(conf_path)], stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    broker = Mosquitto(proc, host, port, binary, conf_path, log_path, text, tuple(waits[1:]))
    try:
        deadline = time.monotonic() + timeout
        for p in waits:
            while not accepts(host, p, timeout=0.2):
                if proc.poll() is not None:
                    raise TransportError(
                        f"mosquitto exited with {proc.returncode} before listening on port "
                        f"{p}:\n{broker.log()}"
                    )
                if time.monotonic() >= deadline:
                    raise TransportError(
                        f"mosquitto did not listen on port {p} within {timeout:g} s:\n"
                        f"{broker.log()}"
                    )
                time.sleep(0.02)
        yield broker
    finally:
        stop_process(proc)
