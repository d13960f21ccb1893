"""Command-line options that several commands share (agent and aggregator talk to the same
broker the same way), declared once so their names and help stay the same."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge.codecs import CODECS

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

# Update codecs (fedclip_edge.codecs): one choice list for simulate, agent, demo and bench fedavg,
# built from CODECS so --help always lists every codec the wire format reads.

CodecName = Enum("CodecName", {c.replace("-", "_"): c for c in CODECS}, type=str)
UpdateCodec = Annotated[
    CodecName,
    typer.Option(
        "--update-codec",
        help="How updates travel: fp32/fp16 send the adapter; delta-fp16, int8 (per-row scales), "
        "topk and topk-int8 send the change to the round's global, with error feedback.",
        case_sensitive=False,
    ),
]
TopkFraction = Annotated[
    float,
    typer.Option(
        "--topk-fraction",
        help="topk codecs: fraction (0, 1] of each tensor's entries sent per round.",
    ),
]
