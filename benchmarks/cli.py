"""The `fedclip-edge bench ...` commands: options, progress lines and the printed results.

Why here: the benchmarks' modules are libraries (they return and write reports); typer and the
console live in this one file, as in every folder's cli.py. `fedclip_edge/cli.py` mounts these
functions on its `bench` sub-app.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge import cli_ranges as R
from fedclip_edge.benchmarks.aggregator import DEFAULT_DEVICES
from fedclip_edge.benchmarks.aggregator import run_bench as aggregator_bench
from fedclip_edge.benchmarks.brokers import KINDS
from fedclip_edge.benchmarks.extractor import DEFAULT_BACKENDS, DEFAULT_BATCHES, run_extractor_bench
from fedclip_edge.benchmarks.fedavg import run_bench as fedavg_bench
from fedclip_edge.benchmarks.render import CONTENTION_WARN, aggregator_table, extractor_table
from fedclip_edge.broker import cli_options as opt
from fedclip_edge.config import TrainConfig
from fedclip_edge.errors import ConfigError, FedClipError, Interrupted
from fedclip_edge.names import unknown_name


def bench_extractor(
    artifacts: Annotated[
        Path,
        typer.Option(help="An exported artifact, or a folder of them (e.g. one per precision)."),
    ],
    backends: Annotated[
        list[str] | None,
        typer.Option(
            help="Backends to time: torch, "
            "onnxruntime, tensorrt, auto; with "
            "':device' (onnxruntime:cuda, "
            "onnxruntime:tensorrt, torch:cuda)."
        ),
    ] = None,
    batch: Annotated[
        list[int] | None, typer.Option(help="Batch sizes: --batch 1 8 32.", **R.BATCH)
    ] = None,
    repeats: Annotated[
        int, typer.Option(help="Timed rounds per batch size (median).", **R.COUNT)
    ] = 5,
    warmup: Annotated[
        int, typer.Option(help="Untimed runs per backend and batch size.", **R.COUNT0)
    ] = 2,
    threads: Annotated[
        int | None,
        typer.Option(
            help="CPU threads for torch and ONNX Runtime (default: all cores).", **R.THREADS
        ),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Where to write the JSON report (default: ARTIFACTS/bench_extractor.json).",
        ),
    ] = None,
) -> None:
    """Images/s of every extractor backend in one run, with the ratio to PyTorch eager."""
    from rich.console import Console

    err = Console(stderr=True)
    start = time.monotonic()
    report = run_extractor_bench(
        artifacts,
        backends=tuple(backends or DEFAULT_BACKENDS),
        batches=tuple(batch or DEFAULT_BATCHES),
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        progress=lambda m: err.print(f"[dim]{time.monotonic() - start:6.1f}s[/dim] {m}"),
    )
    path = json_out or (Path(artifacts) / "bench_extractor.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(extractor_table(report))
    for t in report["targets"]:
        mark = "[green]met[/green]" if t["met"] else "[red]missed[/red]"
        console.print(
            f"target {t['what']} ({t['model']}): {t['ratio']:.2f}x "
            f"(want >= {t['min_ratio']}x) {mark}"
        )
    for s in report["skipped"]:
        console.print(f"[yellow]skipped[/yellow] {s['artifact']} {s['backend']}: {s['reason']}")
    busy = [r["others_cpu_share"] for r in report["results"] if r.get("others_cpu_share")]
    if busy and max(busy) > CONTENTION_WARN:
        console.print(
            f"[yellow]warning:[/yellow] other processes used up to {100 * max(busy):.0f}% of the "
            "CPUs while timing: these numbers are low; re-run on a quiet machine"
        )
    la, lb = report["load_average_before"], report["load_average_after"]
    console.print(
        f"load average before {la[0]:.2f}, after {lb[0]:.2f} "
        f"({report['machine']['cpu_count']} cores); JSON: {path}"
    )


def bench_fedavg(
    data: Annotated[Path, typer.Option(help="Dataset root: DOMAIN/CLASS/images.")],
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md and plots.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="open_clip architecture or fedclip-tiny.")
    ] = "fedclip-tiny",
    pretrained: Annotated[str | None, typer.Option(help="Tag, checkpoint file or 'none'.")] = None,
    clients: Annotated[int, typer.Option(help="Clients, one per domain.", **R.CLIENTS)] = 3,
    rounds: Annotated[int, typer.Option(help="Rounds of each method.", **R.ROUNDS)] = 3,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.", **R.EPOCHS)] = 1,
    test_domain: Annotated[
        str | None, typer.Option(help="Held-out domain for generalization.")
    ] = None,
    per_client: Annotated[
        int | None,
        typer.Option(help="Use at most this many images per client (a quick run).", **R.COUNT),
    ] = None,
    loss: Annotated[str, typer.Option(help="clip (reference) or ce.")] = "clip",
    lr: Annotated[float, typer.Option(help="Learning rate of both methods.", **R.LR)] = 5e-5,
    weight_decay: Annotated[
        float, typer.Option(help="Coupled L2 of both methods.", **R.WEIGHT_DECAY)
    ] = 0.2,
    fp16: Annotated[bool, typer.Option("--fp16", help="Ship FedCLIP's adapter in fp16.")] = False,
    fedavg_fp16: Annotated[
        bool, typer.Option("--fedavg-fp16", help="Ship full FedAvg's image tower in fp16 too.")
    ] = False,
    transport: Annotated[
        str, typer.Option(help="inproc, or mqtt: every exchange through a real broker.")
    ] = "inproc",
    broker: Annotated[
        str | None,
        typer.Option(help="mqtt: broker URL (default: a private mosquitto on loopback)."),
    ] = None,
    max_payload: Annotated[
        int, typer.Option(help="mqtt: payload bytes above which frames are chunked.", **R.PAYLOAD)
    ] = 64 * 1024 * 1024,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of splits, init and shuffling.", **R.SEED)] = 0,
    update_codec: opt.OptionalUpdateCodec = None,
    topk_fraction: opt.TopkFraction = 0.01,
    global_codec: opt.OptionalGlobalCodec = None,
    global_topk_fraction: opt.GlobalTopkFraction = None,
) -> None:
    """FedCLIP and full-model FedAvg side by side: time, bytes, accuracy, measured."""
    for flag, value in (
        ("--rounds", rounds), ("--clients", clients), ("--local-epochs", local_epochs)
    ):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if transport not in ("inproc", "mqtt"):
        raise ConfigError(f"unknown --transport {transport!r}; choose inproc or mqtt")
    if broker is not None and transport != "mqtt":
        raise ConfigError("--broker needs --transport mqtt")
    cfg = TrainConfig(lr=lr, weight_decay=weight_decay, loss=loss)
    try:
        report = fedavg_bench(
            data,
            out,
            model=model,
            pretrained=pretrained,
            clients=clients,
            rounds=rounds,
            local_epochs=local_epochs,
            test_domain=test_domain,
            per_client=per_client,
            cfg=cfg,
            dtype="float16" if fp16 else "float32",
            fedavg_dtype="float16" if fedavg_fp16 else "float32",
            device=device,
            seed=seed,
            transport=transport,
            broker=broker,
            max_payload=max_payload,
            update_codec=update_codec.value if update_codec is not None else None,
            topk_fraction=topk_fraction,
            global_codec=global_codec.value if global_codec is not None else None,
            global_topk_fraction=global_topk_fraction,
        )
    except KeyboardInterrupt:
        raise Interrupted(f"what was measured so far is in {Path(out) / 'bench.json'}") from None
    print((Path(out) / "bench.md").read_text())
    s = report["speedups"]
    if not all(math.isfinite(v) for v in (s["compute_per_round"], s["bytes_per_round"])):
        raise ConfigError("a ratio could not be computed (a method measured zero time or bytes)")


def bench_aggregator(
    out: Annotated[Path, typer.Option(help="Folder for bench_aggregator.json.")],
    devices: Annotated[
        list[int] | None,
        typer.Option(
            help="Simulated device counts, one round each: --devices 10 --devices 100.", **R.CLIENTS
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(help="Broker URL (default: a private broker on a free loopback port)."),
    ] = None,
    broker_kind: Annotated[
        str, typer.Option(help="Private broker: auto (mosquitto if installed), mosquitto, amqtt.")
    ] = "auto",
    dim: Annotated[
        int, typer.Option(help="Adapter width (512: ViT-B-32, 2.1 MB frames).", **R.DIM)
    ] = 512,
    publishers: Annotated[
        int, typer.Option(help="MQTT connections that speak for the simulated devices.", **R.COUNT)
    ] = 4,
    window: Annotated[
        int, typer.Option(help="Unacknowledged QoS 1 publishes per connection.", **R.COUNT)
    ] = 16,
    rate: Annotated[
        float,
        typer.Option(help="Cap on updates/s sent (0: as fast as the broker takes them).", **R.RATE),
    ] = 0.0,
    timeout: Annotated[
        float, typer.Option(help="Seconds allowed per device count.", **R.SECONDS)
    ] = 300.0,
    torch_threads: Annotated[
        int,
        typer.Option(
            help="torch threads in the aggregator (0: torch's default, as `aggregate`).",
            **R.THREADS,
        ),
    ] = 0,
    seed: Annotated[
        int, typer.Option(help="Seed of the global adapter and the updates.", **R.SEED)
    ] = 0,
    keep: Annotated[bool, typer.Option(help="Keep the aggregator's folders and logs.")] = False,
    sites: Annotated[
        int,
        typer.Option(help="Through this many site brokers bridged to a central one, a site "
                     "aggregator each (0: one broker, one aggregator).", min=0, max=1000),
    ] = 0,
    publishers_per_site: Annotated[
        int, typer.Option(help="--sites: MQTT connections per site broker.", min=1, max=1000)
    ] = 2,
) -> None:
    """N simulated devices, one round each, through a real broker: loss, updates/s, memory."""
    from rich.console import Console
    from rich.markup import escape

    if broker_kind not in KINDS:
        raise ConfigError(unknown_name("--broker-kind", broker_kind, KINDS))
    err = Console(stderr=True)
    start = time.monotonic()
    if sites:
        from fedclip_edge.benchmarks.hierarchy import run_hierarchy_bench

        if broker is not None:
            raise ConfigError("--sites starts its own brokers: drop --broker")
        rep = run_hierarchy_bench(
            list(devices or DEFAULT_DEVICES), sites, out, dim=dim, seed=seed,
            publishers_per_site=publishers_per_site, window=window, timeout_s=timeout,
            keep=keep,
            log=lambda m: err.print(f"[dim]{time.monotonic() - start:6.1f}s[/dim] {escape(m)}"),
        )
        print(json.dumps(rep["rows"], indent=2, default=str))
        if not rep["zero_loss"]:
            raise FedClipError("devices' updates were lost or an aggregator failed")
        return
    report = aggregator_bench(
        list(devices or DEFAULT_DEVICES),
        out,
        broker=broker,
        broker_kind=broker_kind,
        dim=dim,
        seed=seed,
        publishers=publishers,
        window=window,
        rate=rate,
        timeout_s=timeout,
        torch_threads=torch_threads,
        keep=keep,
        log=lambda m: err.print(f"[dim]{time.monotonic() - start:6.1f}s[/dim] {escape(m)}"),
    )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(aggregator_table(report))
    for f in report["findings"]:
        console.print(f"- {f}", markup=False)
    console.print(f"JSON: {Path(out) / 'bench_aggregator.json'}")
    if not report["zero_loss"]:
        raise FedClipError("updates were lost or the aggregator failed (see the table)")


def bench_soak(
    out: Annotated[Path, typer.Option(help="Run folder (data, logs, aggregator, soak.json).")],
    agents: Annotated[int, typer.Option(help="Device agents (processes).", min=2, max=1000)] = 8,
    rounds: Annotated[
        int, typer.Option(help="Federated rounds.", min=2, max=R.ROUNDS["max"])
    ] = 100,
    seed: Annotated[
        int, typer.Option(help="Seed of the chaos schedule and the job.", **R.SEED)
    ] = 0,
    kinds: Annotated[
        list[str] | None,
        typer.Option("--kind", help="Fault kinds (default all): kill_agent, restart_broker, "
                     "kill_aggregator, garbage, replay, foreign_signed, site_claim, flood, "
                     "cross_run."),
    ] = None,
    min_clients: Annotated[
        int | None,
        typer.Option(help="Updates needed per round (default: half the agents).", **R.CLIENTS),
    ] = None,
    per_class: Annotated[
        int, typer.Option(help="Synthetic images per domain and class.", **R.COUNT)
    ] = 10,
    timeout: Annotated[
        float, typer.Option(help="Seconds allowed for the whole run.", **R.SECONDS)
    ] = 3600.0,
    global_codec: opt.GlobalCodec = opt.CodecName.fp32,
    keyframe_every: opt.KeyframeEvery = 0,
    global_topk_fraction: opt.GlobalTopkFraction = None,
    update_codec: opt.UpdateCodec = opt.CodecName.fp32,
    secure_aggregation: Annotated[
        bool, typer.Option("--secure-aggregation", help="Secure aggregation on the aggregator "
                           "and every agent (benchmarks/soak_secure.py): forgeries made of its "
                           "messages, reconciled from the devices' own records.")
    ] = False,
) -> None:
    """A federation under a seeded chaos schedule (kills, broker and aggregator restarts,
    garbage, replays) over mosquitto, then a reconciliation of every update sent."""
    from rich.console import Console
    from rich.markup import escape

    from fedclip_edge.benchmarks.soak import FAULT_KINDS, SoakConfig, run_soak
    from fedclip_edge.benchmarks.soak_secure import run_secure_soak

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the soak's cleanup stops and reaps every child it started

    signal.signal(signal.SIGTERM, on_sigterm)
    cfg = SoakConfig(out=out, agents=agents, rounds=rounds, seed=seed, per_class=per_class,
                     min_clients=min_clients, kinds=tuple(kinds or FAULT_KINDS),
                     timeout_s=timeout, global_codec=global_codec.value,
                     keyframe_every=keyframe_every, global_topk_fraction=global_topk_fraction,
                     update_codec=update_codec.value,
                     secure_aggregation=secure_aggregation)
    err = Console(stderr=True)
    start = time.monotonic()
    run = run_secure_soak if secure_aggregation else run_soak
    report = run(
        cfg, log=lambda m: err.print(f"[dim]{time.monotonic() - start:6.1f}s[/dim] {escape(m)}")
    )
    print(report["line"])
    print(f"JSON: {Path(out) / 'soak.json'}")
    if not report["ok"]:
        failed = [k for k, v in report["checks"].items() if not v]
        raise FedClipError(f"soak failed: {', '.join(failed)} {report['error']}".rstrip())
