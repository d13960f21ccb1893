"""The server side's commands: `fedclip-edge broker run` and `fedclip-edge aggregate`.

Wiring only: the broker lives in `embedded.py`, the aggregator in `aggregator.py`. The main CLI
registers `broker_app` and `aggregate`. Run as a module, `python -m fedclip_edge.broker.cli run
--port 1883` or `python -m fedclip_edge.broker.cli aggregate --broker ...` do the same on their
own, with the same one-line errors.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedclip_edge.broker import cli_options as opt
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.embedded import DEFAULT_HOST, DEFAULT_PORT, run_broker
from fedclip_edge.broker.transport import MqttTransport, TlsOptions
from fedclip_edge.cli_runner import run_app, run_command
from fedclip_edge.errors import Interrupted

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


def aggregate(
    broker: Annotated[str, typer.Option(help="Broker URL: mqtt://host:port or mqtts://host:port")],
    job: Annotated[str, typer.Option(help="Job id (a topic level: A-Z a-z 0-9 _ . -).")],
    rounds: Annotated[int, typer.Option(help="Federated rounds to run.")],
    out: Annotated[Path, typer.Option(help="Output folder: state, adapters, metrics, plot.")],
    min_clients: Annotated[int, typer.Option(help="Updates needed to aggregate a round.")] = 1,
    round_timeout: Annotated[float, typer.Option(help="Seconds to wait for updates.")] = 60.0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/state.json.")] = False,
    seed: Annotated[int, typer.Option(help="Seed: initial adapter and devices' training.")] = 0,
    preset: Annotated[str, typer.Option(help="Local training preset: reference | learning.")] = (
        "reference"
    ),
    lr: Annotated[float | None, typer.Option(help="Override the preset's learning rate.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override local epochs per round.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the local batch size.")] = None,
    weighting: Annotated[str, typer.Option(help="FedAvg weights: uniform | samples.")] = (
        "uniform"
    ),
    on_short: Annotated[str, typer.Option(help="Too few updates: retry | stop.")] = "retry",
    max_retries: Annotated[int, typer.Option(help="Retries of a short round.")] = 2,
    wait_clients: Annotated[float, typer.Option(help="Seconds to wait for devices first.")] = 60.0,
    dim: Annotated[int | None, typer.Option(help="Feature width (default: from devices).")] = None,
    eval_features: Annotated[
        Path | None,
        typer.Option(help="Feature cache for held-out accuracy of each global adapter."),
    ] = None,
    eval_domain: Annotated[str | None, typer.Option(help="Domain of --eval-features.")] = None,
    max_payload: Annotated[
        int, typer.Option(help="MQTT payload bytes above which messages are chunked.")
    ] = P.DEFAULT_MAX_PAYLOAD,
    username: Annotated[str | None, typer.Option(help="MQTT username.")] = P.AGGREGATOR_ID,
    password: opt.Password = None,
    ca_certs: opt.CaCerts = None,
    certfile: opt.Certfile = None,
    keyfile: opt.Keyfile = None,
    tls_insecure: opt.TlsInsecure = False,
    connect_timeout: opt.ConnectTimeout = 30.0,
    config: opt.config_option("aggregate") = None,
) -> None:
    """Run the aggregator of a federated job over MQTT."""
    import sys

    from fedclip_edge.runs import train_config

    train = train_config(preset, {"lr": lr, "epochs": epochs, "batch_size": batch_size}).to_dict()
    cfg = AggregatorConfig(
        job=job,
        rounds=rounds,
        out=out,
        min_clients=min_clients,
        round_timeout_s=round_timeout,
        seed=seed,
        weighting=weighting,
        train=train,
        dim=dim,
        on_short=on_short,
        max_retries=max_retries,
        wait_clients_s=wait_clients,
        eval_features=eval_features,
        eval_domain=eval_domain,
        resume=resume,
        connect_timeout_s=connect_timeout,
    )
    tls = TlsOptions.from_options(ca_certs, certfile, keyfile, tls_insecure)
    transport = MqttTransport(
        broker,
        f"{P.AGGREGATOR_ID}-{job}",
        username=username,
        password=password,
        tls=tls,
        max_payload=max_payload,
    )
    console = Console(width=None if sys.stdout.isatty() else 160)

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    agg = Aggregator(transport, cfg, log=log, console=console)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # state.json holds the last committed round: --resume goes on

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        agg.run()
    except KeyboardInterrupt:
        raise Interrupted(AGGREGATE_INTERRUPTED) from None
    finally:
        transport.close()


AGGREGATE_INTERRUPTED = "state of the last completed round is kept; re-run with --resume"


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m fedclip_edge.broker.cli run|aggregate ...`): usage errors
    as Typer shows them, a FedClipError as one `error:` line and its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["aggregate"]:
        return run_command(aggregate, args[1:], "fedclip-edge aggregate")
    return run_app(broker_app, args, "fedclip-edge broker")


if __name__ == "__main__":
    sys.exit(main())
