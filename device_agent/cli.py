"""`fedclip-edge agent`: the typer function the main CLI registers (`app.command("agent")`).

Also runnable as `python -m fedclip_edge.device_agent.cli ...` for subprocess tests.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge import cli_ranges as R
from fedclip_edge.broker import cli_options as opt
from fedclip_edge.broker.protocol import DEFAULT_MAX_PAYLOAD
from fedclip_edge.serving.gate import DEFAULT_PERSONALIZE_EPOCHS, DEFAULT_PROMOTE_MARGIN

# The adapter's local training is a few small matrix products per batch (d x d, d <= 1024): one
# thread trains it in milliseconds, and more threads only contend with what else the device runs.
DEFAULT_AGENT_THREADS = 1


def agent(
    broker: Annotated[str, typer.Option(help="Broker URL: mqtt://host:port or mqtts://host:port")],
    job: Annotated[str, typer.Option(help="Job id (as given to the aggregator).")],
    client_id: Annotated[str, typer.Option(help="This device's id; also its MQTT username.")],
    data: Annotated[Path, typer.Option(help="Dataset folder (domain/class/image).")],
    artifacts: Annotated[
        Path, typer.Option(help="Exported artifact folder (fedclip-edge export).")
    ],
    backend: Annotated[
        str, typer.Option(help="auto | onnxruntime | tensorrt | torch (optionally :cpu/:cuda).")
    ] = "auto",
    domain: Annotated[
        str | None,
        typer.Option(help="Domain of --data this device holds (needed when it has several)."),
    ] = None,
    cache: Annotated[
        Path | None, typer.Option(help="Feature cache folder (re-used on restart).")
    ] = None,
    update_dtype: Annotated[
        str, typer.Option(help="Update payload dtype: float32 | float16 (older spelling of "
                          "--update-codec fp32 | fp16).")
    ] = "float32",
    update_codec: opt.OptionalUpdateCodec = None,
    topk_fraction: opt.TopkFraction = 0.01,
    state_file: Annotated[
        Path | None,
        typer.Option(help="Delta codecs' error-feedback state, kept across restarts "
                     "(default: in agent-state/ beside the feature cache)."),
    ] = None,
    models: Annotated[
        Path | None,
        typer.Option(help="This device's model store: the job's final global adapter and its "
                     "personalized copy are kept there as versions, the better one promoted "
                     "if the gate allows (default: models/CLIENT-ID beside the feature cache "
                     "folder; docs/serving.md)."),
    ] = None,
    personalize_epochs: Annotated[
        int,
        typer.Option(min=0, max=1_000, help="Local fine-tuning epochs of the final global "
                     "adapter on this device's training split (as simulate "
                     "--personalize-epochs); 0: none."),
    ] = DEFAULT_PERSONALIZE_EPOCHS,
    promote_margin: Annotated[
        float,
        typer.Option(min=0.0, max=0.99, help="The gate: a new version becomes current unless "
                     "its validation accuracy is below the current one's or zero-shot's by "
                     "more than this fraction (0.02 = 2 points)."),
    ] = DEFAULT_PROMOTE_MARGIN,
    max_payload: Annotated[
        int, typer.Option(help="MQTT payload bytes above which messages are chunked.", **R.PAYLOAD)
    ] = DEFAULT_MAX_PAYLOAD,
    idle_timeout: Annotated[
        float,
        typer.Option(
            help="Give up after this many seconds without a message from the aggregator.",
            **R.SECONDS,
        ),
    ] = 600.0,
    connect_timeout: opt.ConnectTimeout = 30.0,
    keepalive: Annotated[
        int,
        typer.Option(
            min=5, max=65535,
            help="MQTT keepalive seconds: the broker sends this device's will (offline) after "
            "1.5x this long without a packet. Longer suits flaky cellular links.",
        ),
    ] = 15,
    username: Annotated[
        str | None, typer.Option(help="MQTT username (default: the client id).")
    ] = None,
    password: opt.Password = None,
    ca_certs: opt.CaCerts = None,
    certfile: opt.Certfile = None,
    keyfile: opt.Keyfile = None,
    tls_insecure: opt.TlsInsecure = False,
    key: Annotated[
        Path | None, typer.Option(help="This device's private key: signs its updates.")
    ] = None,
    aggregator_key: Annotated[
        Path | None,
        typer.Option(help="The aggregator's public key: globals it did not sign are refused."),
    ] = None,
    artifact_key: Annotated[
        Path | None,
        typer.Option(help="The exporting key's public half: the artifact must be signed by it."),
    ] = None,
    insecure_unsigned: opt.InsecureUnsigned = False,
    threads: Annotated[
        int,
        typer.Option(
            min=1, max=256,
            help="CPU threads for torch (local training). The device does other work too "
            "(a camera pipeline, the runtime's own threads): one thread leaves it the rest.",
        ),
    ] = DEFAULT_AGENT_THREADS,
    dp_clip: Annotated[
        float | None,
        typer.Option(min=1e-9, max=1e9,
                     help="Local differential privacy: clip this device's update delta to this "
                     "L2 norm (over the whole adapter) before encoding and signing "
                     "(docs/privacy.md). Off unless given."),
    ] = None,
    dp_noise_multiplier: Annotated[
        float,
        typer.Option(min=0.0, max=1e6,
                     help="Local DP: Gaussian noise of std this x --dp-clip on every "
                     "coordinate of the clipped delta; the device logs its epsilon each round."),
    ] = 0.0,
    dp_delta: Annotated[
        float,
        typer.Option(min=1e-300, max=0.999,
                     help="Local DP: the delta at which the device reports its epsilon."),
    ] = 1e-5,
    secure_aggregation: opt.SecureAggregation = False,
    secagg_record: Annotated[
        Path | None,
        typer.Option(help="With --secure-aggregation: keep each clipped update delta this "
                     "device masks and sends in this folder (its own data, never sent; an "
                     "audit trail, as the secure soak reads it). Off unless given."),
    ] = None,
    config: opt.config_option("agent") = None,
) -> None:
    """Run a device agent: extract features once, then train and upload each round."""
    import torch

    from fedclip_edge.broker.transport import TlsOptions
    from fedclip_edge.device_agent.agent import run_agent

    # before any torch work; OpenMP's wait policy is set when the package loads (passive)
    torch.set_num_threads(threads)

    tls = TlsOptions.from_options(ca_certs, certfile, keyfile, tls_insecure)

    def log(line: str) -> None:
        print(f"[{client_id}] {line}", flush=True)

    if insecure_unsigned:
        print(opt.INSECURE_WARNING, file=sys.stderr, flush=True)

    run_agent(
        broker=broker,
        job=job,
        client_id=client_id,
        data=data,
        artifacts=artifacts,
        backend=backend,
        domain=domain,
        cache=cache,
        username=username,
        password=password,
        tls=tls,
        update_dtype=update_dtype,
        max_payload=max_payload,
        idle_timeout_s=idle_timeout,
        connect_timeout_s=connect_timeout,
        keepalive_s=keepalive,
        key_file=key,
        aggregator_key_file=aggregator_key,
        artifact_key_file=artifact_key,
        insecure_unsigned=insecure_unsigned,
        update_codec=update_codec.value if update_codec is not None else None,
        topk_fraction=topk_fraction,
        state_file=state_file,
        models=models,
        personalize_epochs=personalize_epochs,
        promote_margin=promote_margin,
        dp_clip=dp_clip,
        dp_noise_multiplier=dp_noise_multiplier,
        dp_delta=dp_delta,
        secure_aggregation=secure_aggregation,
        secagg_record=secagg_record,
        log=log,
    )


def doctor(
    artifacts: Annotated[
        Path | None, typer.Option(help="Also verify this artifact and run its golden set on "
                                  "every backend available here.")
    ] = None,
    artifact_key: Annotated[
        Path | None,
        typer.Option(help="With --artifacts: the exporting key's public half; the manifest's "
                     "signature must verify with it (without it, doctor says nothing was "
                     "verified)."),
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="Also check this broker: TCP, TLS, MQTT login.")
    ] = None,
    username: Annotated[
        str | None,
        typer.Option(help="MQTT username for the login check.", envvar="FEDCLIP_MQTT_USERNAME"),
    ] = None,
    password: opt.Password = None,
    # the credentials files make-dev-pki.sh writes (credentials/<user>.env) set these three
    ca_certs: Annotated[
        Path | None, typer.Option(help="TLS: CA bundle.", envvar="FEDCLIP_MQTT_CA_FILE")
    ] = None,
    certfile: opt.Certfile = None,
    keyfile: opt.Keyfile = None,
    tls_insecure: opt.TlsInsecure = False,
    cache: Annotated[
        Path | None, typer.Option(help="Cache folder to check (default: $FEDCLIP_EDGE_CACHE).")
    ] = None,
    min_free_gb: Annotated[
        float, typer.Option(help="Least free space for the cache.", **R.GB)
    ] = 1.0,
    timeout: Annotated[
        float, typer.Option(help="Seconds for each broker step.", **R.SECONDS)
    ] = 5.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as JSON.")] = False,
) -> None:
    """Check that this device can run the agent; exit 1 when any line is red."""
    import json

    from fedclip_edge.device_agent.doctor import BrokerOptions, failed, run_checks

    opts = None
    if broker is not None:
        opts = BrokerOptions(
            broker, username, password, *(str(p) if p else None for p in (ca_certs, certfile,
                                                                         keyfile)),
            insecure=tls_insecure, timeout_s=timeout,
        )
    if artifact_key is not None and artifacts is None:
        from fedclip_edge.errors import ConfigError

        raise ConfigError("--artifact-key checks an artifact: give --artifacts DIR too")
    rows = run_checks(artifacts=artifacts, broker=opts, cache=cache,
                      min_free_bytes=int(min_free_gb * 2**30), artifact_key=artifact_key)
    if json_out:
        typer.echo(json.dumps({"ok": not failed(rows), "checks": [r.to_dict() for r in rows]},
                              indent=2))
    elif sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
        mark = {"ok": "✓", "warn": "!", "fail": "✗"}
        table = Table(show_header=False, box=None, pad_edge=False)
        for r in rows:
            s = style[r.status]
            table.add_row(f"[{s}]{mark[r.status]}[/]", f"[{s}]{r.name}[/]", r.detail)
        Console().print(table)
    else:
        mark = {"ok": "✓", "warn": "!", "fail": "✗"}
        width = max(len(r.name) for r in rows)
        for r in rows:
            typer.echo(f"{mark[r.status]} {r.name:<{width}}  {r.detail}")
    if failed(rows):
        raise typer.Exit(1)


def main(argv: list[str] | None = None) -> int:
    """`python -m fedclip_edge.device_agent.cli ...`: errors as one `error:` line."""
    from fedclip_edge.cli_runner import run_command

    return run_command(agent, argv, "fedclip-edge agent")


if __name__ == "__main__":
    sys.exit(main())
