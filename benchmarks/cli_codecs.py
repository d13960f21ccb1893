"""`fedclip-edge bench codecs`: wiring only; the work is in `benchmarks.codecs.run_codec_bench`.

Register with `bench_app.command("codecs")(bench_codecs)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge import cli_ranges as R
from fedclip_edge.broker.cli_options import TopkFraction


def bench_codecs(
    out: Annotated[
        Path | None, typer.Option(help="Folder for bench.json (nothing written without it).")
    ] = None,
    dim: Annotated[int, typer.Option(help="Adapter width: 512 is ViT-B-32.", **R.DIM)] = 512,
    repeats: Annotated[
        int, typer.Option(help="Timed runs per codec (median reported).", **R.COUNT)
    ] = 20,
    topk_fraction: TopkFraction = 0.01,
    tower: Annotated[
        bool,
        typer.Option(
            help="Build ViT-B-32 (random init) and encode its image tower to size full "
            "FedAvg's frame (about 10 s and 1.5 GB of memory)."
        ),
    ] = True,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic update.", **R.SEED)] = 0,
) -> None:
    """Bytes, encode and decode ms per update for every codec, against fp32 and full FedAvg."""
    from fedclip_edge.benchmarks.codecs import run_codec_bench

    run_codec_bench(
        dim=dim, repeats=repeats, topk_fraction=topk_fraction, tower=tower, seed=seed, out=out
    )
