"""The central-DP options (`--dp-*`) that `simulate` and `aggregate` share, declared once so
their names, help and ranges stay the same (the library is fedclip_edge/privacy/central.py;
docs/privacy.md explains each)."""

from __future__ import annotations

from typing import Annotated

import typer

from fedclip_edge.privacy.central import DEFAULT_CLIP

_PANEL = "Central differential privacy (docs/privacy.md)"

NoiseMultiplier = Annotated[
    float | None,
    typer.Option("--dp-noise-multiplier", min=0.0, max=1e6, rich_help_panel=_PANEL,
                 help="Central DP (DP-FedAvg, user level) on: Gaussian noise of std z x C on "
                 "the sum of clipped deltas; 0 clips without noise (no finite epsilon)."),
]
Clip = Annotated[
    float | None,
    typer.Option("--dp-clip", min=1e-12, max=1e6, rich_help_panel=_PANEL,
                 help=f"L2 clip C of each device's delta to the round's global (default "
                 f"{DEFAULT_CLIP:g}; the start value with --dp-adaptive-clip)."),
]
AdaptiveClip = Annotated[
    bool,
    typer.Option("--dp-adaptive-clip", rich_help_panel=_PANEL,
                 help="Move C each round toward --dp-clip-quantile of the devices' delta norms "
                 "(Andrew et al. 2021; its noised count is accounted)."),
]
ClipQuantile = Annotated[
    float | None,
    typer.Option("--dp-clip-quantile", min=0.0, max=1.0, rich_help_panel=_PANEL,
                 help="Adaptive clipping's target quantile (default 0.5: the median norm)."),
]
Population = Annotated[
    int | None,
    typer.Option("--dp-population", min=1, max=10**9, rich_help_panel=_PANEL,
                 help="Devices in the population: sampling rate q = devices per round / N "
                 "(default: the devices per round, q = 1, an upper bound)."),
]
PerRound = Annotated[
    int | None,
    typer.Option("--dp-per-round", min=1, max=10**9, rich_help_panel=_PANEL,
                 help="Expected devices per round, the noised sum's fixed divisor (default: "
                 "the devices online when the first round opens, kept for the job)."),
]
Delta = Annotated[
    float | None,
    typer.Option("--dp-delta", min=0.0, max=1.0, rich_help_panel=_PANEL,
                 help="The delta epsilon is reported at (default 1 / population)."),
]
TargetEpsilon = Annotated[
    float | None,
    typer.Option("--dp-target-epsilon", min=0.0, max=1e6, rich_help_panel=_PANEL,
                 help="Refuse a job whose planned rounds would spend more; stop (committed, "
                 "resumable) before a round would."),
]
Accountant = Annotated[
    str | None,
    typer.Option("--dp-accountant", rich_help_panel=_PANEL,
                 help="dp-accounting's rdp (default) or pld (tighter, slower)."),
]
