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

# Update codecs (fedclip_edge.codecs): one choice list for simulate, agent, demo and bench fedavg,
# built from CODECS so --help always lists every codec the wire format reads.
from enum import Enum  # noqa: E402

from fedclip_edge.codecs import CODECS  # noqa: E402

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
