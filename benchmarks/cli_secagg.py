"""`fedclip-edge bench secagg`: wiring only; the work is in `benchmarks.secagg.run_bench`.

Register with `bench_app.command("secagg")(bench_secagg)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge import cli_ranges as R


def bench_secagg(
    out: Annotated[
        Path | None, typer.Option(help="Folder for bench_secagg.json (nothing written without it).")
    ] = None,
    devices: Annotated[
        list[int] | None,
        typer.Option(help="Device counts (at least 3), each run plain, secure and secure with "
                     "dropouts: --devices 10 --devices 100 (the default).", min=3, max=10_000),
    ] = None,
    dim: Annotated[
        list[int] | None,
        typer.Option(help="Adapter width (512: ViT-B-32): one for every count, or one per "
                     "--devices in order.", **R.DIM),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Rounds of each run.", **R.ROUNDS)] = 2,
    dropout: Annotated[
        float, typer.Option(help="Share of the devices that drop out each round of the "
                            "dropout run (at least one).", min=0.0, max=0.33)
    ] = 0.1,
    drop_after: Annotated[
        list[str] | None,
        typer.Option(help="The step after which a dropped device stops: keys, shares or "
                     "masked, cycled over the round's dropped devices (default: shares, "
                     "masked: one before masking, one after)."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Round deadline of each run, seconds.", **R.SECONDS)
    ] = 900.0,
    seed: Annotated[
        int, typer.Option(help="Seed of the global adapter and the updates.", **R.SEED)
    ] = 0,
) -> None:
    """Secure aggregation's cost per round beside the plain round: bytes per device,
    aggregator CPU, wall time, device masking; checked against the plain mean."""
    from fedclip_edge.benchmarks.secagg import DEFAULT_DEVICES, run_bench

    run_bench(list(devices or DEFAULT_DEVICES), out, dims=list(dim or [512]), rounds=rounds,
              dropout=dropout, drop_after=tuple(drop_after or ("shares", "masked")),
              seed=seed, timeout_s=timeout)
