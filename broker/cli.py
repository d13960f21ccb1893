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
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer
from rich.console import Console

from fedclip_edge import cli_dp as dpo
from fedclip_edge import cli_ranges as R
from fedclip_edge.broker import authn
from fedclip_edge.broker import cli_options as opt
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.embedded import DEFAULT_HOST, DEFAULT_PORT, run_broker
from fedclip_edge.broker.hierarchy import SiteRegistry
from fedclip_edge.broker.penalty import PenaltyBox
from fedclip_edge.broker.ratelimit import SenderRateLimit
from fedclip_edge.broker.status import build_status, collect_retained, format_status
from fedclip_edge.broker.transport import DEFAULT_MAX_INFLIGHT_BYTES, MqttTransport, TlsOptions
from fedclip_edge.cli_runner import run_app, run_command
from fedclip_edge.config import train_config
from fedclip_edge.errors import ConfigError, Interrupted
from fedclip_edge.privacy.central import aggregator_dp, dp_config, dp_strategy
from fedclip_edge.signing import KeyRegistry, load_private_key, load_public_key
from fedclip_edge.strategy import CLI_DEFAULT_STRATEGY

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
    out: Annotated[Path, typer.Option(help="Output folder: state, adapters, metrics, plot.")],
    rounds: Annotated[
        int | None,
        typer.Option(help="Federated rounds to run (a site: the central's).", **R.ROUNDS),
    ] = None,
    min_clients: Annotated[
        int, typer.Option(help="Updates needed to aggregate a round.", **R.CLIENTS)
    ] = 1,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for updates.", **R.SECONDS)
    ] = 60.0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/state.json.")] = False,
    seed: Annotated[
        int, typer.Option(help="Seed: initial adapter and devices' training.", **R.SEED)
    ] = 0,
    preset: Annotated[str, typer.Option(help="Local training preset: reference | learning.")] = (
        "reference"
    ),
    lr: Annotated[
        float | None, typer.Option(help="Override the preset's learning rate.", **R.LR)
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Override local epochs per round.", **R.EPOCHS)
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Override the local batch size.", **R.BATCH)
    ] = None,
    weighting: Annotated[str, typer.Option(help="FedAvg weights: uniform | samples.")] = (
        "uniform"
    ),
    on_short: Annotated[str, typer.Option(help="Too few updates: retry | stop.")] = "retry",
    max_retries: Annotated[int, typer.Option(help="Retries of a short round.", **R.RETRIES)] = 2,
    wait_clients: Annotated[
        float, typer.Option(help="Seconds to wait for devices first.", **R.SECONDS0)
    ] = 60.0,
    dim: Annotated[
        int | None, typer.Option(help="Feature width (default: from devices).", **R.DIM)
    ] = None,
    eval_features: Annotated[
        Path | None,
        typer.Option(help="Feature cache for held-out accuracy of each global adapter."),
    ] = None,
    eval_domain: Annotated[str | None, typer.Option(help="Domain of --eval-features.")] = None,
    max_payload: Annotated[
        int, typer.Option(help="MQTT payload bytes above which messages are chunked.", **R.PAYLOAD)
    ] = P.DEFAULT_MAX_PAYLOAD,
    username: Annotated[str | None, typer.Option(help="MQTT username.")] = P.AGGREGATOR_ID,
    password: opt.Password = None,
    ca_certs: opt.CaCerts = None,
    certfile: opt.Certfile = None,
    keyfile: opt.Keyfile = None,
    tls_insecure: opt.TlsInsecure = False,
    connect_timeout: opt.ConnectTimeout = 30.0,
    max_inflight_mb: Annotated[
        float,
        typer.Option(
            help="Bytes of received, not yet validated updates held in memory (MiB); beyond "
            "it the broker keeps them (updates are acknowledged only once validated).",
            **R.MB,
        ),
    ] = DEFAULT_MAX_INFLIGHT_BYTES / 2**20,
    device_keys: Annotated[
        Path | None,
        typer.Option(
            help="Who may take part: a folder of <device-id>.pub files (or one file of "
            "'<id> <base64 key>' lines). Unregistered or badly signed messages are refused."
        ),
    ] = None,
    signing_key: Annotated[
        Path | None, typer.Option(help="The aggregator's private key: signs every global.")
    ] = None,
    site_keys: Annotated[
        Path | None,
        typer.Option(help="Central: the sites it accepts, as --device-keys (a folder of "
                     "<site>.pub, with an optional <site>.max-weight). Without it no hello may "
                     "say 'site' in a signed job."),
    ] = None,
    site_max_weight: Annotated[
        float,
        typer.Option(help="Central: the largest weight (devices or samples) a site without "
                     "its own <site>.max-weight may claim.", min=1.0, max=1e12),
    ] = 10_000.0,
    insecure_unsigned: opt.InsecureUnsigned = False,
    metrics_port: Annotated[
        int, typer.Option(help="Serve Prometheus metrics on this port (0: off).", min=0, max=65535)
    ] = 0,
    metrics_host: Annotated[
        str, typer.Option(help="Address for --metrics-port (0.0.0.0: every interface).")
    ] = "127.0.0.1",
    upstream: Annotated[
        str | None,
        typer.Option(
            help="Run as a SITE aggregator under the central job at this broker URL (the "
            "central's broker, or this site's own when a bridge carries the central's topics: "
            "see --upstream-prefix and docs/hierarchy.md)."
        ),
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(help="Site id: this site's client id (and bridge username) upstream."),
    ] = None,
    upstream_prefix: Annotated[
        str,
        typer.Option(help="Topic prefix of the central job's topics on the --upstream broker."),
    ] = P.PREFIX,
    upstream_username: Annotated[
        str | None, typer.Option(help="MQTT username upstream (default: --site).")
    ] = None,
    upstream_password: Annotated[
        str | None,
        typer.Option(help="MQTT password upstream.", envvar="FEDCLIP_UPSTREAM_PASSWORD"),
    ] = None,
    upstream_key: Annotated[
        Path | None,
        typer.Option(help="Site: the central aggregator's public key (its globals are signed)."),
    ] = None,
    strategy: opt.Strategy = CLI_DEFAULT_STRATEGY,
    clip_bound: opt.ClipBound = None,
    trim: opt.Trim = None,
    secure_aggregation: opt.SecureAggregation = False,
    secagg_clip: Annotated[
        float,
        typer.Option(min=1e-9, max=1e9, help="Secure aggregation: each device clips its "
                     "update delta coordinate-wise to [-this, this] (the fixed-point range)."),
    ] = 1.0,
    global_codec: opt.GlobalCodec = opt.CodecName.fp32,
    keyframe_every: opt.KeyframeEvery = 0,
    global_topk_fraction: opt.GlobalTopkFraction = None,
    config: opt.config_option("aggregate") = None,
    dp_noise_multiplier: dpo.NoiseMultiplier = None,
    dp_clip: dpo.Clip = None,
    dp_adaptive_clip: dpo.AdaptiveClip = False,
    dp_clip_quantile: dpo.ClipQuantile = None,
    dp_population: dpo.Population = None,
    dp_per_round: dpo.PerRound = None,
    dp_delta: dpo.Delta = None,
    dp_target_epsilon: dpo.TargetEpsilon = None,
    dp_accountant: dpo.Accountant = None,
) -> None:
    """Run the aggregator of a federated job over MQTT (or a site aggregator: --upstream)."""
    if secure_aggregation and strategy == CLI_DEFAULT_STRATEGY and clip_bound is None:
        # the default's per-update clip cannot run on a sum; the devices clip instead
        print(f"secure aggregation: strategy fedavg (the default {CLI_DEFAULT_STRATEGY} clips "
              "each update by its own norm; devices clip to --secagg-clip instead)", flush=True)
        strategy = "fedavg"
    if (upstream is None) != (site is None):
        raise ConfigError("give --upstream and --site together (a site aggregator)")
    dp = aggregator_dp(
        dp_config(dp_noise_multiplier, clip=dp_clip, adaptive=dp_adaptive_clip,
                  quantile=dp_clip_quantile, population=dp_population, per_round=dp_per_round,
                  delta=dp_delta, target_epsilon=dp_target_epsilon, accountant=dp_accountant),
        rounds=rounds, min_clients=min_clients, sites=bool(site_keys), resume=resume,
        site=site if upstream is not None else None)
    if dp is not None and secure_aggregation:
        raise ConfigError("central DP (--dp-*) clips each device's update at the aggregator, which "
                          "--secure-aggregation hides: use the agents' local DP (agent --dp-clip "
                          "--dp-noise-multiplier) with secure aggregation (docs/privacy.md)")
    if dp is not None:
        strategy, note = dp_strategy(strategy, weighting)
        if note:
            print(note, flush=True)
    if upstream is None and rounds is None:
        raise ConfigError("--rounds is required (except for a site: --upstream, --site)")
    if upstream is not None and global_codec.value != "fp32":
        raise ConfigError("--global-codec is for a central or a plain aggregator; a site "
                          "forwards the central's (compressed when the central's is)")
    if site is not None:
        try:
            P.check_id(site, "--site")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    site_session = uuid.uuid4().hex[:12]
    train = train_config(preset, {"lr": lr, "epochs": epochs, "batch_size": batch_size}).to_dict()
    cfg = AggregatorConfig(
        job=job,
        rounds=rounds or 1,
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
        registry=KeyRegistry.load(device_keys) if device_keys else None,
        sites=SiteRegistry.load(site_keys, site_max_weight) if site_keys else None,
        signing_key=load_private_key(signing_key) if signing_key else None,
        insecure_unsigned=insecure_unsigned,
        strategy=strategy,
        strategy_options={"bound": clip_bound, "trim": trim},
        secure_aggregation=secure_aggregation,
        secagg_clip=secagg_clip,
        global_codec=global_codec.value,
        keyframe_every=keyframe_every,
        global_topk_fraction=global_topk_fraction or 0.01,
    )
    if insecure_unsigned:
        print(opt.INSECURE_WARNING, file=sys.stderr, flush=True)
    tls = TlsOptions.from_options(ca_certs, certfile, keyfile, tls_insecure)
    from fedclip_edge.broker.prevalidate import PrevalidatingMqttTransport

    transport = PrevalidatingMqttTransport(
        broker,
        f"{P.AGGREGATOR_ID}-{job}",
        username=username,
        password=password,
        tls=tls,
        max_payload=max_payload,
        manual_ack=True,
        max_inflight_bytes=int(max_inflight_mb * 2**20),
        # nothing larger than an update (plus its envelope) is reassembled from chunks
        max_message_bytes=cfg.max_update_bytes + 2**20,
        # a flood costs its sender: over-limit messages dropped, counted, one line per interval
        rate_limit=SenderRateLimit(log=lambda line: print(line, flush=True)),
        # signed jobs: a registered id over its limit is unsubscribed at the broker a while
        penalty=PenaltyBox(log=lambda line: print(line, flush=True)),
    )
    log, console = make_log(sys.stdout)

    agg: Aggregator
    up_transport = None
    prom = metrics = None
    if metrics_port:  # imported only when asked: the exporter's package is needed for it alone
        from fedclip_edge.broker.prom import PromHooks, serve_metrics

        prom = PromHooks()
    if upstream is not None and site is not None:
        from fedclip_edge.broker.remap import RemappedMqttTransport
        from fedclip_edge.broker.site import SiteAggregator

        if upstream_key is None and not insecure_unsigned:
            raise ConfigError("a site checks the central's signed globals: give --upstream-key")
        up_transport = RemappedMqttTransport(
            upstream,
            site,
            username=upstream_username or site,
            password=upstream_password,
            tls=tls,
            max_payload=max_payload,
            topic_prefix=upstream_prefix,
            will=(P.status_topic(job, site),
                  authn.signed_will(site, job, site_session, cfg.signing_key), True),
        )
        agg = SiteAggregator(
            transport, up_transport, cfg, site=site, log=log, console=console, hooks=prom,
            upstream_key=load_public_key(upstream_key) if upstream_key else None,
            session=site_session, plugins=() if dp is None else (dp,),
        )
    else:
        agg = Aggregator(transport, cfg, log=log, console=console, hooks=prom,
                         plugins=() if dp is None else (dp,))
    if dp is not None:  # the expected count: the devices online when round 1 opens
        dp.fleet_size = lambda: max(agg.roster.active_count, cfg.min_clients)
    if prom is not None:
        metrics = serve_metrics(agg, prom, metrics_host, metrics_port)
        log(f"metrics for Prometheus at {metrics.url}")

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # state.json holds the last committed round: --resume goes on

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if not resume:  # a resumed job keeps what its session queued while it was down
            discard_session(broker, transport.client_id, username, password, tls,
                            connect_timeout)
        agg.run()
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(agg.completed)) from None
    finally:
        transport.close()
        if transport.rate_limit is not None:
            transport.rate_limit.report(force=True)  # the drops of the last, unfinished interval
        if metrics is not None:
            metrics.close()
        if up_transport is not None:
            up_transport.close()


def discard_session(url: str, client_id: str, username: str | None, password: str | None,
                    tls: TlsOptions | None, timeout_s: float) -> None:
    """Connect once with a clean session, so the job's persistent session starts empty.

    Why: the broker keeps a persistent session per client id (per username on the production
    broker, which sets `use_username_as_clientid`): without this, a new job inherits the last
    job's subscriptions and queued messages and counts them as `rejected (job)` every round.
    Nothing of this job is lost: devices send again what a new aggregator session lacks. Not
    with --resume: the session then holds this job's messages of the time it was down."""
    probe = MqttTransport(url, client_id, username=username, password=password, tls=tls,
                          clean_session=True)
    try:
        probe.connect(timeout_s)
    finally:
        probe.close()


def status(
    broker: Annotated[
        str | None, typer.Option(help="Broker URL: read the job's retained topics there.")
    ] = None,
    job: Annotated[str | None, typer.Option(help="Job id (with --out: from its state.json).")] = (
        None
    ),
    out: Annotated[
        Path | None,
        typer.Option(help="The aggregator's --out folder: accuracy, latency, bytes, rejections."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, for machines.")] = (
        False
    ),
    wait: Annotated[
        float,
        typer.Option(help="Seconds without a new retained message that end the read.", **R.SECONDS),
    ] = 1.0,
    username: Annotated[str | None, typer.Option(help="MQTT username (read-only is enough).")] = (
        None
    ),
    password: opt.Password = None,
    ca_certs: opt.CaCerts = None,
    certfile: opt.Certfile = None,
    keyfile: opt.Keyfile = None,
    tls_insecure: opt.TlsInsecure = False,
    connect_timeout: opt.ConnectTimeout = 10.0,
    device_keys: Annotated[
        Path | None,
        typer.Option(help="The devices' public keys (as the aggregator's --device-keys): with "
                     "--aggregator-key, only signed retained state is shown."),
    ] = None,
    aggregator_key: Annotated[
        Path | None,
        typer.Option(help="The aggregator's public key: its globals and controls must verify."),
    ] = None,
) -> None:
    """Show a job: devices and backends, the round, who answered, accuracy, latency, bytes,
    rejections; from the broker's retained topics and/or the aggregator's run folder."""
    import json
    import os

    from fedclip_edge.broker.status import Signers

    if broker is None and out is None:
        raise ConfigError("give --broker URL --job J, --out DIR, or both")
    if broker is not None and job is None:
        raise ConfigError("--broker needs --job")
    if job is not None:
        try:
            P.check_id(job, "job")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if (device_keys is None) != (aggregator_key is None):
        raise ConfigError("give --device-keys and --aggregator-key together (who signs what)")
    signers = None
    if device_keys is not None and aggregator_key is not None:
        signers = Signers(KeyRegistry.load(device_keys),
                          KeyRegistry({P.AGGREGATOR_ID: load_public_key(aggregator_key)}))
    messages = None
    if broker is not None:
        assert job is not None
        transport = MqttTransport(
            broker,
            f"status-{os.getpid()}-{os.urandom(3).hex()}",
            username=username,
            password=password,
            tls=TlsOptions.from_options(ca_certs, certfile, keyfile, tls_insecure),
            clean_session=True,  # a look, not a member: leave no session behind
        )
        try:
            messages = collect_retained(
                transport, job, connect_timeout_s=connect_timeout, quiet_s=wait
            )
        finally:
            transport.close()
    st = build_status(job, messages, out, broker=broker, signers=signers)
    typer.echo(json.dumps(st, indent=2, allow_nan=False) if as_json else format_status(st))


AGGREGATE_INTERRUPTED_BEFORE = "before any round was committed: nothing to keep; re-run to start"


def interrupted_message(completed: int) -> str:
    """What Ctrl-C (or SIGTERM) leaves: the last committed round, or nothing yet."""
    if completed < 1:
        return AGGREGATE_INTERRUPTED_BEFORE
    return f"state of round {completed} (the last committed) is kept; re-run with --resume"


def make_log(stream: TextIO) -> tuple[Callable[[str], None], Console | None]:
    """The aggregator's log and console for `stream`: on a terminal, rich (per-round client
    tables); otherwise (a file, the journal) plain lines, one per event, never wrapped, and no
    per-client tables (N rows a round for a fleet): the final table ends the run either way."""
    if stream.isatty():
        console = Console(file=stream)

        def log(line: str) -> None:
            console.print(line, markup=False, highlight=False, soft_wrap=True)

        return log, console

    def plain(line: str) -> None:
        print(line, file=stream, flush=True)

    return plain, None


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m fedclip_edge.broker.cli run|aggregate ...`): usage errors
    as Typer shows them, a FedClipError as one `error:` line and its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["status"]:
        return run_command(status, args[1:], "fedclip-edge status")
    if args[:1] == ["aggregate"]:
        return run_command(aggregate, args[1:], "fedclip-edge aggregate")
    return run_app(broker_app, args, "fedclip-edge broker")


if __name__ == "__main__":
    sys.exit(main())
