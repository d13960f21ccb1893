"""The mosquitto bridge of a site broker to the central one, as config text.

Why: a site aggregator talks to the central job through its own broker when the site has one
outbound link (a bridge) and no direct route; mosquitto's bridge then carries exactly the
topics a hierarchy needs, remapped under a prefix so the site's devices (`fedclip/J/...` on the
site broker) and the central job (`fedclip-up/J/...` on the same broker) never mix:

    central fedclip/J/global, control   --in-->   site fedclip-up/J/global, control
    site fedclip-up/J/update/SITE, status/SITE   --out-->   central fedclip/J/update/SITE, ...

`broker/mosquitto/bridge-site.conf` is the production template (TLS, credentials); this builds
the same text for tests and the benchmark (and prints it for an operator to start from).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.remap import check_prefix
from fedclip_edge.errors import ConfigError

DEFAULT_UP_PREFIX = "fedclip-up"


@dataclass(frozen=True)
class BridgeTls:
    """The bridge verifies the central broker with `cafile` (client certificate optional)."""

    cafile: Path
    certfile: Path | None = None
    keyfile: Path | None = None
    insecure: bool = False  # skip host name verification (self-signed test setups only)


def bridge_config(
    *,
    site: str,
    address: str,
    job: str = "+",
    prefix: str = DEFAULT_UP_PREFIX,
    username: str | None = None,
    password: str | None = None,
    tls: BridgeTls | None = None,
    name: str | None = None,
    qos: int = P.QOS,
) -> str:
    """The `connection` block a site broker's config appends: one bridge to `address`
    (host:port of the central broker) for job `job` ('+': every job) of site `site`.

    Only the four topic patterns the hierarchy needs, QoS 1, a persistent session on the
    central (`cleansession false`: the central queues the globals while the link is down, the
    site broker queues its partials), mosquitto's own bridge protocol (`try_private true`: a
    retained global stays retained on the site broker). The central authenticates the bridge
    as `username` (default: the site id): its ACL pattern `fedclip/+/update/%u` then lets it
    publish only the site's own update and status.
    """
    try:
        P.check_id(site, "site id")
        if job != "+":
            P.check_id(job, "job")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    check_prefix(prefix)
    if ":" not in address or any(c.isspace() for c in address):
        raise ConfigError(f"bridge address {address!r} must be host:port")
    lines = [
        f"connection {name or 'fedclip-' + site}",
        f"address {address}",
        "bridge_protocol_version mqttv311",
        "try_private true",
        "cleansession false",
        f"remote_clientid {site}",
        f"local_clientid bridge-{site}",
        "notifications false",
        "start_type automatic",
        "restart_timeout 1 30",
        "keepalive_interval 30",
    ]
    user = username or site
    lines.append(f"remote_username {user}")
    if password is not None:
        lines.append(f"remote_password {password}")
    if tls is not None:
        lines.append(f"bridge_cafile {tls.cafile}")
        if tls.certfile is not None and tls.keyfile is not None:
            lines += [f"bridge_certfile {tls.certfile}", f"bridge_keyfile {tls.keyfile}"]
        lines.append(f"bridge_insecure {str(tls.insecure).lower()}")
        lines.append("bridge_tls_version tlsv1.2")
    local, remote = f"{prefix}/", f"{P.PREFIX}/"
    lines += [
        f"topic {job}/global in {qos} {local} {remote}",
        f"topic {job}/control in {qos} {local} {remote}",
        f"topic {job}/update/{site} out {qos} {local} {remote}",
        f"topic {job}/status/{site} out {qos} {local} {remote}",
    ]
    return "\n".join(lines) + "\n"


# The shipped template and the placeholders `render_bridge_template` fills in.
TEMPLATE = Path(__file__).resolve().parent / "mosquitto" / "bridge-site.conf"
_T_SITE = "SITE"
_T_ADDRESS = "central.example.org:8883"
_T_PASSWORD = "CHANGE-ME"
_T_CAFILE = "/etc/mosquitto/fedclip/central-ca.crt"


def render_bridge_template(
    *,
    site: str,
    address: str,
    password: str,
    cafile: Path,
    job: str = "+",
    template: Path = TEMPLATE,
) -> str:
    """`broker/mosquitto/bridge-site.conf` with its placeholders filled in: the site id, the
    central's host:port, the bridge's password on the central and the CA that signed the
    central's certificate; `job` pins the four topic patterns to one job.

    Why: an operator copies that file, so the tests render the same file rather than a second
    hand-written copy; a placeholder missing from the template (it drifted) is a ConfigError.
    """
    try:
        P.check_id(site, "site id")
        if job != "+":
            P.check_id(job, "job")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if ":" not in address or any(c.isspace() for c in address):
        raise ConfigError(f"bridge address {address!r} must be host:port")
    if not password or any(c.isspace() for c in password):
        raise ConfigError("the bridge password must be non-empty without white space")
    text = Path(template).read_text()
    for token in (_T_ADDRESS, _T_PASSWORD, _T_CAFILE, "topic +/"):
        if token not in text:
            raise ConfigError(f"{template} no longer contains {token!r}")
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            out.append(line)  # comments stay as shipped
            continue
        line = (line.replace(_T_ADDRESS, address).replace(_T_PASSWORD, password)
                .replace(_T_CAFILE, str(cafile)))
        key, _, value = line.partition(" ")
        value = " ".join(site if w == _T_SITE else w.replace(f"-{_T_SITE}", f"-{site}")
                         .replace(f"/{_T_SITE}", f"/{site}") for w in value.split(" "))
        if key == "topic" and value.startswith("+/"):
            value = f"{job}/{value[2:]}"
        out.append(f"{key} {value}")
    return "\n".join(out) + "\n"
