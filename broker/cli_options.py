"""Command-line options that several commands share (agent and aggregator talk to the same
broker the same way), declared once so their names and help stay the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Password = Annotated[
    str | None, typer.Option(help="MQTT password.", envvar="FEDCLIP_MQTT_PASSWORD")
]
CaCerts = Annotated[Path | None, typer.Option(help="TLS: CA bundle.")]
Certfile = Annotated[Path | None, typer.Option(help="TLS: client certificate.")]
Keyfile = Annotated[Path | None, typer.Option(help="TLS: client key.")]
TlsInsecure = Annotated[bool, typer.Option(help="TLS: skip hostname check.")]
ConnectTimeout = Annotated[float, typer.Option(help="Seconds to reach the broker.")]
InsecureUnsigned = Annotated[
    bool,
    typer.Option(
        "--insecure-unsigned",
        help="Run without signatures (anyone who can publish on the broker can then forge or "
        "replay updates and globals). Prints a warning.",
    ),
]

INSECURE_WARNING = (
    "warning: --insecure-unsigned: updates and globals are not signed; anyone who can publish "
    "on this broker can forge or replay them"
)
