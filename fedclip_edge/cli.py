"""The `fedclip-edge` command line: wiring only, the work lives in the library.

Every FedClipError becomes one `error: ...` line and the error's exit code.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge import __version__
from fedclip_edge import cli_dp as dpo
from fedclip_edge import cli_ranges as R
from fedclip_edge.benchmarks.cli import (
    bench_aggregator,
    bench_extractor,
    bench_fedavg,
    bench_soak,
)
from fedclip_edge.benchmarks.cli_codecs import bench_codecs
from fedclip_edge.benchmarks.cli_flood import bench_flood
from fedclip_edge.benchmarks.cli_infer import bench_infer
from fedclip_edge.benchmarks.cli_secagg import bench_secagg
from fedclip_edge.broker import cli_options as opt
from fedclip_edge.broker.cli import aggregate, broker_app, status
from fedclip_edge.broker.cli_options import (
    CodecName,
    GlobalCodec,
    GlobalTopkFraction,
    TopkFraction,
    UpdateCodec,
    config_option,
)
from fedclip_edge.broker.demo import run_mqtt_demo
from fedclip_edge.cli_keys import keys_app
from fedclip_edge.cli_runner import (  # noqa: F401  (run_command: re-exported for one release)
    INTERRUPTED,
    expand_multi_values,
    run_app,
    run_command,
)
from fedclip_edge.data.synth import write_dataset
from fedclip_edge.device_agent.cli import agent, doctor
from fedclip_edge.errors import ConfigError
from fedclip_edge.exporters.cli import export
from fedclip_edge.models import list_architectures
from fedclip_edge.models.tiny import ensure_pretrained
from fedclip_edge.privacy.central import dp_config
from fedclip_edge.runs import build_features, run_demo, run_simulation
from fedclip_edge.serving.cli import classify, models_app, serve
from fedclip_edge.strategy import CLI_DEFAULT_STRATEGY

app = typer.Typer(
    name="fedclip-edge",
    help="Federated personalization of CLIP on edge devices (FedCLIP).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Datasets: synthetic domains, ImageFolder layout.", no_args_is_help=True
)
model_app = typer.Typer(
    help="Models: the offline default, open_clip architectures.", no_args_is_help=True
)
bench_app = typer.Typer(help="Benchmarks that measure both sides in one run.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="open_clip architecture, or fedclip-tiny (the offline default)."
    ),
]
PretrainedOpt = Annotated[
    str | None,
    typer.Option(
        help="open_clip tag (openai, laion2b_s34b_b79k, ...), a checkpoint file, or 'none' for "
        "random init. fedclip-tiny defaults to 'synth' (built here on first use)."
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fedclip-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """FedCLIP keeps CLIP frozen and federates a 0.5M-parameter attention adapter."""


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write DOMAIN/CLASS/*.png into.")],
    per_class: Annotated[int, typer.Option(help="Images per domain and class.", **R.COUNT)] = 30,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.", **R.SEED)] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.", **R.IMAGE_SIDE)] = 64,
) -> None:
    """Write the synthetic four-style dataset (a PACS stand-in that needs no download)."""

    info = write_dataset(out, per_class=per_class, seed=seed, size=size, progress=True)
    typer.echo(
        f"wrote {info['images']} images: {len(info['domains'])} domains "
        f"({', '.join(info['domains'])}) x {len(info['classes'])} classes to {out}"
    )


@model_app.command("prepare")
def model_prepare(
    seed: Annotated[int, typer.Option(help="Pretraining seed.", **R.SEED)] = 0,
) -> None:
    """Build (or find cached) the offline default model and print its zero-shot accuracy."""

    path, meta = ensure_pretrained(seed=seed)
    zs = ", ".join(f"{d} {a:.1%}" for d, a in meta["zero_shot"].items())
    typer.echo(
        f"{meta['model']} (seed {seed}) at {path}\nzero-shot accuracy per synthetic domain: {zs}"
    )


@model_app.command("list")
def model_list() -> None:
    """Architectures that open_clip can build here (weights are a separate matter)."""

    typer.echo("\n".join(list_architectures()))


@app.command("features")
def features(
    data: Annotated[Path, typer.Option(help="Dataset root: DOMAIN/CLASS/image files.")],
    out: Annotated[Path, typer.Option(help="Cache folder (re-runs reuse what is there).")],
    model: ModelOpt = "fedclip-tiny",
    pretrained: PretrainedOpt = None,
    domains: Annotated[list[str] | None, typer.Option(help="Only these domains.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per encoder call.", **R.BATCH)] = 32,
) -> None:
    """Encode every image once with the frozen image tower and cache the features."""

    build_features(
        data, out, model=model, pretrained=pretrained, domains=domains, batch_size=batch_size
    )


@app.command("simulate")
def simulate_cmd(
    test_domain: Annotated[str, typer.Option(help="Held-out domain (generalization target).")],
    out: Annotated[Path, typer.Option(help="Output folder for summary.json.")],
    data: Annotated[
        Path | None, typer.Option(help="Dataset root (features are cached in OUT/features).")
    ] = None,
    features_dir: Annotated[
        Path | None,
        typer.Option("--features", help="A feature cache from `fedclip-edge features`."),
    ] = None,
    model: ModelOpt = "fedclip-tiny",
    pretrained: PretrainedOpt = None,
    rounds: Annotated[int, typer.Option(help="Federated rounds.", **R.ROUNDS)] = 20,
    seeds: Annotated[
        list[int] | None, typer.Option(help="One run per seed: --seeds 0 1 2.", **R.SEED)
    ] = None,
    preset: Annotated[
        str,
        typer.Option(
            help="'reference' (the paper's: Adam lr 5e-5, weight "
            "decay 0.2, clip loss) or 'learning' (lr 1e-3, weight "
            "decay 0, ce loss)."
        ),
    ] = "reference",
    lr: Annotated[
        float | None, typer.Option(help="Override the preset's learning rate.", **R.LR)
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Override: coupled L2.", **R.WEIGHT_DECAY)
    ] = None,
    loss: Annotated[str | None, typer.Option(help="Override: clip or ce.")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Override: local epochs per round.", **R.EPOCHS)
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Override: local batch size.", **R.BATCH)
    ] = None,
    weighting: Annotated[str, typer.Option(help="uniform (reference) or samples.")] = "uniform",
    personalize_epochs: Annotated[
        int,
        typer.Option(
            help="Local fine-tuning epochs of the global adapter before evaluation.", **R.EPOCHS0
        ),
    ] = 0,
    strategy: opt.Strategy = CLI_DEFAULT_STRATEGY,
    clip_bound: opt.ClipBound = None,
    trim: opt.Trim = None,
    update_codec: UpdateCodec = CodecName.fp32,
    topk_fraction: TopkFraction = 0.01,
    clients_per_domain: Annotated[
        int, typer.Option(help="Split each training domain into this many clients (devices "
                          "named <domain>-<i>; the held-out domain stays whole).", **R.COUNT)
    ] = 1,
    clients_per_round: Annotated[
        int | None, typer.Option(help="Poisson-sample clients: each takes part in a round with "
                                 "probability this / clients (default: all, every round).",
                                 **R.COUNT)
    ] = None,
    dp_noise_multiplier: dpo.NoiseMultiplier = None,
    dp_clip: dpo.Clip = None,
    dp_adaptive_clip: dpo.AdaptiveClip = False,
    dp_clip_quantile: dpo.ClipQuantile = None,
    dp_population: dpo.Population = None,
    dp_delta: dpo.Delta = None,
    dp_target_epsilon: dpo.TargetEpsilon = None,
    dp_accountant: dpo.Accountant = None,
    global_codec: GlobalCodec = CodecName.fp32,
    global_topk_fraction: GlobalTopkFraction = None,
) -> None:
    """Run FedCLIP in one process: the paper's leave-one-domain-out protocol."""

    if (data is None) == (features_dir is None):
        raise ConfigError("give exactly one of --data DIR or --features CACHE_DIR")
    dp = dp_config(dp_noise_multiplier, clip=dp_clip, adaptive=dp_adaptive_clip,
                   quantile=dp_clip_quantile, population=dp_population, delta=dp_delta,
                   target_epsilon=dp_target_epsilon, accountant=dp_accountant)
    run_simulation(
        out,
        data=data,
        features_dir=features_dir,
        model=model,
        pretrained=pretrained,
        test_domain=test_domain,
        rounds=rounds,
        seeds=tuple(seeds or (0,)),
        preset=preset,
        overrides={
            "lr": lr,
            "weight_decay": weight_decay,
            "loss": loss,
            "epochs": epochs,
            "batch_size": batch_size,
        },
        weighting=weighting,
        personalize_epochs=personalize_epochs,
        strategy=strategy,
        strategy_options={"bound": clip_bound, "trim": trim},
        update_codec=update_codec.value,
        topk_fraction=topk_fraction,
        dp=dp,
        clients_per_domain=clients_per_domain,
        clients_per_round=clients_per_round,
        global_codec=global_codec.value,
        global_topk_fraction=global_topk_fraction,
    )


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Folder for data, artifact, logs and reports.")] = Path(
        "demo-out"
    ),
    rounds: Annotated[int, typer.Option(help="Federated rounds.", **R.ROUNDS)] = 15,
    per_class: Annotated[
        int, typer.Option(help="Synthetic images per domain and class.", **R.COUNT)
    ] = 100,
    test_domain: Annotated[str, typer.Option(help="Held-out domain.")] = "photo",
    broker: Annotated[
        str | None,
        typer.Option(
            help="Use this broker (mqtt://host:port) instead of starting the embedded one."
        ),
    ] = None,
    inproc: Annotated[
        bool,
        typer.Option(
            "--inproc",
            help="No MQTT: the in-process simulation, reference and "
            "learning settings side by side over --seeds.",
        ),
    ] = False,
    seeds: Annotated[
        list[int] | None, typer.Option(help="--inproc: one run per seed.", **R.SEED)
    ] = None,
    personalize_epochs: Annotated[
        int,
        typer.Option(help="--inproc: local epochs on the global adapter (learning).", **R.EPOCHS0),
    ] = 5,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the earlier run in OUT/aggregator from its last committed round "
            "(default: a fresh job; an earlier run moves to OUT/runs/<time>)."
        ),
    ] = False,
    job: Annotated[
        str | None, typer.Option(help="Job id (default: demo-<unix time>).")
    ] = None,
    preset: Annotated[str, typer.Option(help="Local training preset: learning | reference.")] = (
        "learning"
    ),
    seed: Annotated[
        int, typer.Option(help="Seed: initial adapter and devices' training.", **R.SEED)
    ] = 0,
    lr: Annotated[
        float | None, typer.Option(help="Override the preset's learning rate.", **R.LR)
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Override local epochs per round.", **R.EPOCHS)
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Override the local batch size.", **R.BATCH)
    ] = None,
    round_timeout: Annotated[
        float, typer.Option(help="Seconds to wait for updates.", **R.SECONDS)
    ] = 60.0,
    strategy: opt.Strategy = CLI_DEFAULT_STRATEGY,
    clip_bound: opt.ClipBound = None,
    trim: opt.Trim = None,
    update_codec: UpdateCodec = CodecName.fp32,
    topk_fraction: TopkFraction = 0.01,
    secure_aggregation: opt.SecureAggregation = False,
    global_codec: GlobalCodec = CodecName.fp32,
    global_topk_fraction: GlobalTopkFraction = None,
    config: config_option("demo") = None,
    dp_noise_multiplier: dpo.NoiseMultiplier = None,
    dp_clip: dpo.Clip = None,
    dp_population: dpo.Population = None,
    dp_delta: dpo.Delta = None,
) -> None:
    """The whole federation on this machine, no downloads: broker, agents, aggregator."""
    dp = dp_config(dp_noise_multiplier, clip=dp_clip, population=dp_population, delta=dp_delta)
    if dp is not None and not inproc:
        raise ConfigError("--dp-* on the demo is for --inproc (both settings with central DP); "
                          "over MQTT run `fedclip-edge aggregate --dp-noise-multiplier ...`")
    if secure_aggregation and (inproc or update_codec.value != "fp32"):
        raise ConfigError("--secure-aggregation is for the MQTT demo's fp32 updates (not "
                          "--inproc, not --update-codec)")
    if secure_aggregation and strategy == CLI_DEFAULT_STRATEGY and clip_bound is None:
        print(f"secure aggregation: strategy fedavg (the default {CLI_DEFAULT_STRATEGY} clips "
              "each update by its own norm; devices clip instead)", flush=True)
        strategy = "fedavg"
    if inproc and resume:
        raise ConfigError("--resume continues an MQTT demo run; --inproc runs are quick to redo")
    if inproc and update_codec.value != "fp32":
        raise ConfigError("--update-codec is for the MQTT demo's agents; with --inproc use "
                          "`fedclip-edge simulate --update-codec`")
    if inproc and global_codec.value != "fp32":
        raise ConfigError("--global-codec is for the MQTT demo's aggregator; with --inproc use "
                          "`fedclip-edge simulate --global-codec`")
    if inproc:

        run_demo(
            out,
            rounds=rounds,
            per_class=per_class,
            test_domain=test_domain,
            seeds=tuple(seeds or (0, 1, 2)),
            personalize_epochs=personalize_epochs,
            dp=dp,
        )
        return

    run_mqtt_demo(
        out,
        rounds=rounds,
        per_class=per_class,
        test_domain=test_domain,
        broker=broker,
        preset=preset,
        round_timeout=round_timeout,
        seed=seed,
        job=job,
        resume=resume,
        train_overrides={"lr": lr, "epochs": epochs, "batch_size": batch_size},
        strategy=strategy,
        strategy_options={"bound": clip_bound, "trim": trim},
        update_codec=update_codec.value,
        topk_fraction=topk_fraction,
        secure_aggregation=secure_aggregation,
        global_codec=global_codec.value,
        global_topk_fraction=global_topk_fraction,
    )


def _register_parts() -> None:
    """Commands whose options live with their part of the toolkit (imported here, at start).
    Once per process: typer appends on every registration, so each in-process `main()` call
    (tests, embedding code) had grown the command tree again and every later call rebuilt all
    copies (19 s for one test late in the unit suite, 3 s alone)."""
    if any(c.name == "export" for c in app.registered_commands):
        return  # registered already (by an earlier call)
    app.command("export")(export)
    app.command("agent")(agent)
    app.command("doctor")(doctor)
    app.command("aggregate")(aggregate)
    app.command("status")(status)
    app.command("serve")(serve)
    app.add_typer(broker_app, name="broker")
    app.add_typer(keys_app, name="keys")
    app.add_typer(models_app, name="models")
    app.command("classify")(classify)
    bench_app.command("extractor")(bench_extractor)
    bench_app.command("fedavg")(bench_fedavg)
    bench_app.command("aggregator")(bench_aggregator)
    bench_app.command("soak")(bench_soak)
    bench_app.command("codecs")(bench_codecs)
    bench_app.command("infer")(bench_infer)
    bench_app.command("secagg")(bench_secagg)
    bench_app.command("flood")(bench_flood)


def main(argv: list[str] | None = None) -> int:
    """Entry point: one clear line and an exit code for a user's mistake, not a traceback."""
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    _register_parts()
    return run_app(app, argv, "fedclip-edge")


if __name__ == "__main__":
    sys.exit(main())
