"""Where a broker is and how to speak TLS to it: `parse_broker_url` and `TlsOptions`.

Why a module of its own: both are plain values read from the command line, shared by the MQTT
transport, the agent's doctor and the benchmarks; broker/transport.py re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from fedclip_edge.errors import TransportError


@dataclass(frozen=True)
class TlsOptions:
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False  # skip hostname verification (self-signed test setups only)

    @classmethod
    def from_options(
        cls,
        ca_certs: Any = None,
        certfile: Any = None,
        keyfile: Any = None,
        insecure: bool = False,
    ) -> TlsOptions | None:
        """From CLI options (paths or None); None when no TLS option was given."""
        if not (ca_certs or certfile or keyfile or insecure):
            return None
        return cls(*(str(p) if p else None for p in (ca_certs, certfile, keyfile)), insecure)


def parse_broker_url(url: str) -> tuple[str, int, bool, str | None, str | None]:
    """'mqtt://[user:pass@]host[:port]' or 'mqtts://...' -> (host, port, tls, user, password)."""
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise TransportError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    tls = parsed.scheme in ("mqtts", "ssl")
    if not parsed.hostname:
        raise TransportError(f"broker URL {url!r} has no host")
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise TransportError(f"broker URL {url!r} has an invalid port") from None
    user = unquote(parsed.username) if parsed.username else None
    password = unquote(parsed.password) if parsed.password else None
    return parsed.hostname, port, tls, user, password
