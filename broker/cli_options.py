"""Command-line options that several commands share (agent and aggregator talk to the same
broker the same way), declared once so their names and help stay the same."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

Password = Annotated[
    str | None, typer.Option(help="MQTT password.", envvar="FEDCLIP_MQTT_PASSWORD")
]
CaCerts = Annotated[Path | None, typer.Option(help="TLS: CA bundle.")]
Certfile = Annotated[Path | None, typer.Option(help="TLS: client certificate.")]
Keyfile = Annotated[Path | None, typer.Option(help="TLS: client key.")]
TlsInsecure = Annotated[bool, typer.Option(help="TLS: skip hostname check.")]
ConnectTimeout = Annotated[float, typer.Option(help="Seconds to reach the broker.")]


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
            help="Job config file (TOML: [broker] [job] [train] [aggregator] [agent] [demo]); "
            "flags override it. See examples/job.toml.",
            is_eager=True,
            callback=load,
        ),
    ]
