"""`fedclip-edge broker ...`: wiring only; the broker lives in `fedclip_edge.broker.embedded`.

The main CLI registers it with `app.add_typer(broker_app, name="broker")`. Errors are
TransportError and propagate to the main CLI, which prints one `error:` line. Run as a module
(`python -m fedclip_edge.broker.cli run --port 1883`) it does the same on its own.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from typing import Annotated

import typer

from fedclip_edge.broker.embedded import DEFAULT_HOST, DEFAULT_PORT, run_broker

broker_app = typer.Typer(
    help="MQTT broker: an embedded one for local runs, demos and tests (production: mosquitto, "
    "see docs/broker.md).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@broker_app.callback()
def _group() -> None:
    """MQTT broker: an embedded one for local runs, demos and tests (production: mosquitto)."""
    # A callback keeps `run` a subcommand when this app is used on its own (Typer would
    # otherwise collapse a one-command app into that command).


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@broker_app.command("run")
def run(
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Clients connect anonymously: keep it on loopback "
            "unless the network is yours alone."
        ),
    ] = DEFAULT_HOST,
    port: Annotated[
        int,
        typer.Option(
            help="TCP port; 0 picks a free one (the ready line says which).", min=0, max=65535
        ),
    ] = DEFAULT_PORT,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the broker's own (amqtt) log.")
    ] = False,
) -> None:
    """Run an embedded MQTT broker (amqtt, anonymous) until SIGTERM or Ctrl-C.

    Prints `broker listening on mqtt://HOST:PORT` when clients can connect.
    """
    if verbose:
        logging.getLogger("amqtt").setLevel(logging.INFO)
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not _is_loopback(host):
        typer.echo(
            f"warning: listening on {host}: the embedded broker accepts anonymous clients; "
            "use mosquitto with TLS and passwords (docs/broker.md) for anything but a private "
            "network",
            err=True,
        )
    run_broker(host, port, quiet=not verbose)
    typer.echo("broker stopped", err=True)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry: usage errors as Typer shows them, a FedClipError as one `error:` line
    and its exit code (TransportError: 8)."""
    from fedclip_edge.errors import FedClipError

    try:
        broker_app(args=argv, prog_name="fedclip-edge broker", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except FedClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
