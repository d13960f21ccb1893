"""`fedclip-edge export`: wiring only; the work is in `exporters.pipeline.export_artifact`.

Register with `app.command("export")(export)`. Errors are FedClipError (ExportError, ModelError,
...) and propagate to the main CLI, which prints one `error:` line and exits with their code.
"""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedclip_edge import cli_ranges as R
from fedclip_edge.exporters.export import export_artifact
from fedclip_edge.exporters.signature import sign_exported_artifact


class Precision(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def export(
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Artifact directory to create "
            "(written aside and renamed into place only after parity passes).",
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="open_clip architecture, or fedclip-tiny (the offline default)."
        ),
    ] = "fedclip-tiny",
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="open_clip tag, checkpoint file, or "
            "'none' for random init (fedclip-tiny "
            "defaults to 'synth')."
        ),
    ] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            help="fp32; fp16 (GPU providers/TensorRT: "
            "LayerNorm, softmax and I/O stay fp32); int8 "
            "(ONNX Runtime dynamic quantization, CPU)."
        ),
    ] = Precision.fp32,
    max_batch: Annotated[
        int,
        typer.Option(
            help="Largest batch the artifact is checked at (and the TensorRT profile's max).",
            **R.BATCH,
        ),
    ] = 32,
    opt_batch: Annotated[
        int, typer.Option(help="Typical device batch: the TensorRT profile's opt shape.", **R.BATCH)
    ] = 8,
    classes: Annotated[
        Path | None,
        typer.Option(
            help="Class names (a text file, one per line, "
            "or a DOMAIN/CLASS dataset folder): their "
            "prompt features ship with the model."
        ),
    ] = None,
    text_encoder: Annotated[
        bool, typer.Option("--text-encoder", help="Also export the text encoder to ONNX (fp32).")
    ] = False,
    trt: Annotated[
        bool,
        typer.Option(
            "--trt",
            help="Build a TensorRT engine too (on the "
            "device; prints the trtexec command where TensorRT is "
            "not importable).",
        ),
    ] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (17 or newer).", **R.OPSET)] = 17,
    seed: Annotated[int, typer.Option(help="Seed for random-init weights ('none').", **R.SEED)] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    sign_key: Annotated[
        Path | None,
        typer.Option(
            help="Sign the manifest (which lists every file's hash) with this private key "
            "(`fedclip-edge keys new`); agents verify it with the public half."
        ),
    ] = None,
) -> None:
    """Export CLIP's image encoder (and class prompt features) as a verified artifact."""

    console = Console(stderr=True)
    start = time.monotonic()

    def progress(msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - start:6.1f}s[/dim] {msg}")

    result = export_artifact(
        out,
        model=model,
        pretrained=pretrained,
        precision=precision.value,
        max_batch=max_batch,
        opt_batch=opt_batch,
        classes=classes,
        text_encoder=text_encoder,
        trt=trt,
        opset=opset,
        seed=seed,
        overwrite=force,
        progress=progress,
    )
    if sign_key is not None:
        sig = sign_exported_artifact(result.out, sign_key)
        console.print(f"signed: {sig}")
    m = result.manifest
    p = m["parity"]
    out_console = Console(width=None if sys.stdout.isatty() else 120)
    table = Table(
        title=f"{m['model']['name']} ({m['model']['pretrained']}) {m['precision']} -> {result.out}",
        show_header=True,
    )
    table.add_column("check")
    table.add_column("measured", justify="right")
    table.add_column("bound", justify="right")
    table.add_row(
        "min cosine vs PyTorch fp32", f"{p['min_cosine']:.6f}", f"{p['bound']['min_cosine']}"
    )
    if p.get("top1_agreement") is not None:
        table.add_row(
            f"zero-shot top-1 agreement ({p['top1_agreement_over']['count']} inputs)",
            f"{100 * p['top1_agreement']:.1f}%",
            f"{100 * p['bound']['min_top1_agreement']:.0f}%",
        )
    for name, s in p["sets"].items():
        table.add_row(f"  {name} ({s['count']})", f"{s['min_cosine']:.6f}", "")
    engine = m.get("tensorrt") or {}
    if engine.get("parity"):
        table.add_row(
            "TensorRT engine min cosine",
            f"{engine['parity']['min_cosine']:.6f}",
            f"{engine['parity']['bound']['min_cosine']}",
        )
    out_console.print(table)
    files = ", ".join(f"{k} {_size(v['bytes'])}" for k, v in m["files"].items())
    out_console.print(f"files: {files}")
    if engine.get("build_warning_count"):
        out_console.print(
            f"TensorRT build warnings: {engine['build_warning_count']} (see {engine['build_log']})"
        )
    for note in result.notes:
        out_console.print(f"[yellow]note:[/yellow] {note}")
    if result.trtexec:
        out_console.print("TensorRT 10 (JetPack 6):")
        out_console.print(result.trtexec["tensorrt10"], soft_wrap=True, highlight=False)
        out_console.print("TensorRT 11:")
        out_console.print(result.trtexec["tensorrt11"], soft_wrap=True, highlight=False)
