"""`fedclip-edge bench flood`: wiring only; the work is in `benchmarks.flood.run_bench`.

Register with `bench_app.command("flood")(bench_flood)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge import cli_ranges as R


def bench_flood(
    out: Annotated[Path, typer.Option(help="Folder for bench_flood.json and each case's run.")],
    seconds: Annotated[
        float, typer.Option(help="How long the flooder publishes, seconds.", **R.SECONDS)
    ] = 30.0,
    mode: Annotated[
        list[str] | None,
        typer.Option(help="before (wildcard subscriptions, rate limit only: merge2's "
                     "transport) and/or after (per-id subscriptions and the penalty box); "
                     "default both."),
    ] = None,
    flooder: Annotated[
        list[str] | None,
        typer.Option(help="unregistered and/or registered (in the job's device keys, no agent "
                     "running for it), or none (a control run: nothing published); default "
                     "unregistered and registered."),
    ] = None,
    round_timeout: Annotated[
        float, typer.Option(help="The aggregator's round deadline, seconds (the command "
                            "line's default).", **R.SECONDS)
    ] = 60.0,
) -> None:
    """An honest round's time under a garbage flood on one id's update topic (issue 22):
    loopback mosquitto, the command line's aggregator transport, 3 agents on small features."""
    from fedclip_edge.benchmarks.flood import run_bench

    modes, floods = mode or ["before", "after"], flooder or ["unregistered", "registered"]
    bad = [m for m in modes if m not in ("before", "after")] + [
        f for f in floods if f not in ("unregistered", "registered", "none")]
    if bad:
        raise typer.BadParameter(f"unknown: {', '.join(bad)}")
    print("| mode | flooding id | flood messages | reached the aggregator | quiet rounds "
          "(median) | slowest round during the flood | dropped | load average |")
    print("|---|---|---:|---:|---:|---:|---|---|")
    run_bench(out, seconds=seconds, cases=tuple((m, f) for m in modes for f in floods),
              round_timeout_s=round_timeout, log=print)
