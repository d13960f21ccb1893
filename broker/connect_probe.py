"""Why a connection to the broker fails, in words an operator can act on.

paho's network thread retries a failed connect silently, so a wrong TLS setting used to end as
"broker not reachable within 30s" while the cause was certain after the first attempt. This
probe repeats the attempt with the standard library (TCP, then a TLS handshake as paho would make
it) and names the cause: the broker's certificate does not verify (pass --ca-certs), or the two
ends speak different protocols (mqtt:// to a TLS port, mqtts:// to a plain one). Standard library
only; bounded by `timeout_s` per step.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnosis:
    """`certain`: retrying cannot help (a TLS setting); else a transient cause (nothing listens
    yet) worth naming when the wait ends."""

    certain: bool
    message: str


def _ctx(ca_certs: str | None, certfile: str | None, keyfile: str | None,
         insecure: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca_certs)
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    if insecure:
        ctx.check_hostname = False
    return ctx


def diagnose(
    host: str,
    port: int,
    tls: bool,
    *,
    ca_certs: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
    insecure: bool = False,
    timeout_s: float = 5.0,
) -> Diagnosis | None:
    """The cause of a failing connect to host:port, or None when TCP and TLS both work (the
    problem is then above them: MQTT login, which paho reports itself)."""
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return Diagnosis(False, f"{where}: {exc.strerror or exc}")
    with sock:
        if tls:
            return _tls_cause(sock, host, where, ca_certs, certfile, keyfile, insecure)
    return _plain_cause(host, port, where, timeout_s)


def _tls_cause(sock: socket.socket, host: str, where: str, ca_certs: str | None,
               certfile: str | None, keyfile: str | None, insecure: bool) -> Diagnosis | None:
    try:
        ctx = _ctx(ca_certs, certfile, keyfile, insecure)
    except (OSError, ssl.SSLError) as exc:
        return Diagnosis(True, f"TLS settings unusable: {exc}")
    try:
        with ctx.wrap_socket(sock, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as exc:
        why = exc.verify_message or str(exc)
        if "hostname" in why.lower() or "ip address mismatch" in why.lower():
            return Diagnosis(True, f"TLS certificate verify failed ({why}): the broker's "
                             f"certificate does not name {host}; connect by a name it holds "
                             "(make-dev-pki.sh --host) or pass --tls-insecure (tests only)")
        fix = ("pass --ca-certs with the CA that signed the broker's certificate"
               if ca_certs is None else
               f"--ca-certs {ca_certs} is not the CA that signed the broker's certificate")
        return Diagnosis(True, f"TLS certificate verify failed ({why}): {fix}")
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError) as exc:
        return Diagnosis(True, f"protocol mismatch: mqtts:// to a plain MQTT port? {where} "
                         f"did not complete a TLS handshake ({type(exc).__name__}: {exc}); use "
                         "mqtt:// for this port, or the broker's TLS port (8883)")
    except OSError as exc:
        return Diagnosis(False, f"{where}: TLS handshake: {exc}")


def _plain_cause(host: str, port: int, where: str, timeout_s: float) -> Diagnosis | None:
    """A plain client: does the port speak TLS instead? (A handshake that completes says so.)"""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw, server_hostname=host):
            pass
    except (OSError, ssl.SSLError):
        return None  # not TLS: the plain connection's trouble is elsewhere
    return Diagnosis(True, f"protocol mismatch: mqtt:// to a TLS port: {where} speaks TLS; use "
                     "mqtts:// (with --ca-certs)")
