"""`fedclip-edge bench infer`: wiring only; the work is in `benchmarks.infer.run_infer_bench`.

Register with `bench_app.command("infer")(bench_infer)`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge import cli_ranges as R


def bench_infer(
    out: Annotated[Path, typer.Option(help="Folder for bench_infer.json/.md and the exports "
                                      "(OUT/work, reused by a re-run).")] = Path("bench-infer"),
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="Models: --models fedclip-tiny ViT-B-32 (open_clip names "
                     "build with --pretrained weights; 'none' is random, no download)."),
    ] = None,
    pretrained: Annotated[str, typer.Option(help="Weights of the open_clip models.")] = "none",
    precisions: Annotated[
        list[str] | None, typer.Option("--precisions", help="Fused graphs: fp32 fp16 int8.")
    ] = None,
    batch: Annotated[
        list[int] | None, typer.Option(help="Batch sizes: --batch 1 8.", **R.BATCH)
    ] = None,
    rounds: Annotated[
        int, typer.Option(help="Timed calls per backend and batch.", **R.ROUNDS)
    ] = 15,
    warmup: Annotated[int, typer.Option(help="Untimed calls first.", **R.COUNT0)] = 2,
    threads: Annotated[
        int | None,
        typer.Option(help="CPU threads for torch and ONNX Runtime (default: all).", **R.THREADS),
    ] = None,
    serve_model: Annotated[
        str | None, typer.Option(help="Model of the service load run (default: the last).")
    ] = None,
    serve_seconds: Annotated[
        float, typer.Option(help="Seconds of each load run (0: no service run).", **R.SECONDS0)
    ] = 30.0,
    serve_clients: Annotated[int, typer.Option(help="Concurrent HTTP clients.", **R.CLIENTS)] = 8,
    serve_batch: Annotated[int, typer.Option(**R.BATCH, help="The service's --max-batch and the "
                                             "bare classifier's batch.")] = 8,
    swaps: Annotated[int, typer.Option(help="Hot swaps during the service's run.", **R.COUNT0)] = 3,
) -> None:
    """Images/s and p50/p99 from JPEG bytes: torch composition vs fused ONNX fp32/fp16/int8
    (TensorRT where present), and the service vs the bare classifier under hot swaps."""
    from rich.console import Console

    from fedclip_edge.benchmarks.infer import DEFAULT_MODELS, DEFAULT_PRECISIONS, run_infer_bench
    from fedclip_edge.benchmarks.render import infer_markdown, infer_serve_lines, infer_table

    err = Console(stderr=True)
    start = time.monotonic()
    report = run_infer_bench(
        out,
        models=tuple(models or DEFAULT_MODELS),
        pretrained=pretrained,
        precisions=tuple(precisions or DEFAULT_PRECISIONS),
        batches=tuple(batch or (1, 8)),
        rounds=rounds,
        warmup=warmup,
        threads=threads,
        serve_model=serve_model,
        serve_seconds=serve_seconds,
        serve_clients=serve_clients,
        serve_batch=serve_batch,
        swaps=swaps,
        progress=lambda m: err.print(f"[dim]{time.monotonic() - start:6.1f}s[/dim] {m}"),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_infer.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench_infer.md").write_text(infer_markdown(report))
    console = Console(width=None if sys.stdout.isatty() else 140)
    console.print(infer_table(report))
    for line in infer_serve_lines(report):
        console.print(line)
    for g in report["goals"]:
        mark = "[green]met[/green]" if g["met"] else "[red]missed[/red]"
        ratio = "" if g.get("ratio") is None else f"{g['ratio']:.2f}x (want >= {g['min_ratio']}x) "
        console.print(f"goal {g['what']} ({g['model']}): {ratio}{mark}")
    for s in report["skipped"]:
        console.print(f"[yellow]skipped[/yellow] {s['model']} {s['backend']}: {s['reason']}")
    la, lb = report["load_average_before"], report["load_average_after"]
    console.print(f"load average before {la[0]:.2f}, after {lb[0]:.2f} "
                  f"({report['machine']['cpu_count']} cores); JSON: {out / 'bench_infer.json'}")
