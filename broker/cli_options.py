"""Command-line options that several commands share (agent and aggregator talk to the same
broker the same way), declared once so their names and help stay the same."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from fedclip_edge import cli_ranges as R
from fedclip_edge.codecs import CODECS

Password = Annotated[
    str | None, typer.Option(help="MQTT password.", envvar="FEDCLIP_MQTT_PASSWORD")
]
CaCerts = Annotated[Path | None, typer.Option(help="TLS: CA bundle.")]
Certfile = Annotated[Path | None, typer.Option(help="TLS: client certificate.")]
Keyfile = Annotated[Path | None, typer.Option(help="TLS: client key.")]
TlsInsecure = Annotated[bool, typer.Option(help="TLS: skip hostname check.")]
ConnectTimeout = Annotated[
    float, typer.Option(help="Seconds to reach the broker.", **R.SECONDS)
]
InsecureUnsigned = Annotated[
    bool,
    typer.Option(
        "--insecure-unsigned",
        help="Run without signatures (anyone who can publish on the broker can then forge or "
        "replay updates and globals). Prints a warning.",
    ),
]

SecureAggregation = Annotated[
    bool,
    typer.Option(
        "--secure-aggregation",
        help="Secure aggregation: the aggregator learns only each round's sum of updates "
        "(pairwise masks, docs/privacy.md); aggregator and every agent must give it.",
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
GlobalCodec = Annotated[
    CodecName,
    typer.Option(
        "--global-codec",
        help="How the global goes down: fp32 dense (as before); any other codec sends the "
        "change since the last round, with the server's error feedback (docs/codecs.md).",
        case_sensitive=False,
    ),
]
KeyframeEvery = Annotated[
    int,
    typer.Option(help="With --global-codec: a dense global every K rounds (0: round 1 "
                 "only; devices that miss a round ask for one).", min=0, max=R.ROUNDS["max"]),
]
GlobalTopkFraction = Annotated[
    float | None,
    typer.Option(
        "--global-topk-fraction",
        help="topk global codecs: fraction (0, 1] of each tensor's change sent down per round "
        "(default: --topk-fraction's, or 0.01).",
        **R.FRACTION,
    ),
]
OptionalGlobalCodec = Annotated[
    CodecName | None,
    typer.Option(
        "--global-codec",
        help="How the global goes down: unset or fp32 dense; any other codec sends the change "
        "since the last round, with the server's error feedback (docs/codecs.md).",
        case_sensitive=False,
    ),
]
# The agent's: unset means its --update-dtype decides (fp32, or fp16 with float16).
OptionalUpdateCodec = Annotated[
    CodecName | None,
    typer.Option(
        "--update-codec",
        help="How updates travel: fp32/fp16 send the adapter; delta-fp16, int8 (per-row scales), "
        "topk and topk-int8 send the change to the round's global, with error feedback "
        "(default: fp32, or fp16 with --update-dtype float16).",
        case_sensitive=False,
    ),
]
TopkFraction = Annotated[
    float,
    typer.Option(
        "--topk-fraction",
        help="topk codecs: fraction (0, 1] of each tensor's entries sent per round.",
        **R.FRACTION,
    ),
]


def config_option(command: str) -> Any:
    """`--config FILE` for `command`: an eager option whose callback puts the file's values in
    click's default map, so they fill the options the command line left out (flags and
    environment variables still win) and satisfy required ones."""
    from fedclip_edge.jobconfig import load_job_config

    def load(ctx: typer.Context, value: Path | None) -> Path | None:
        if value is not None:
            values = load_job_config(value).options(command)
            ctx.default_map = {**(ctx.default_map or {}), **values}
        return value

    return Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Job config file (TOML sections \\[broker] \\[job] \\[train] \\[aggregator] "
            "\\[agent] \\[demo]); "
            "flags override it. See examples/job.toml.",
            is_eager=True,
            callback=load,
        ),
    ]

# Aggregation strategies (fedclip_edge.strategy): the same three options on simulate, aggregate
# and demo.
Strategy = Annotated[
    str,
    typer.Option(
        help="Aggregation: fedavg-clip (FedAvg, each delta clipped at 3x the round's median "
        "norm) | fedavg | clip | trimmed-mean | median (docs/strategies.md)."
    ),
]
ClipBound = Annotated[
    str | None, typer.Option(help="clip: L2 bound of a client's delta, or 'auto' (median).")
]
Trim = Annotated[
    float | None, typer.Option(help="trimmed-mean: fraction dropped at each end (0.2).", **R.TRIM)
]
