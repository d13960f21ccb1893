"""`fedclip-edge export`: wiring only; the work is in `exporters.export.export_artifact`.

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

from fedclip_edge.errors import ConfigError, ExportError
from fedclip_edge.exporters.export import ExportResult, export_artifact, resolve_classes
from fedclip_edge.exporters.names import FUSED_KIND
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
        Precision | None,
        typer.Option(
            help="fp32; fp16 (GPU providers/TensorRT: "
            "LayerNorm, softmax and I/O stay fp32); int8 "
            "(ONNX Runtime dynamic quantization, CPU). Default fp32; with --adapter the "
            "artifact's own."
        ),
    ] = None,
    max_batch: Annotated[
        int,
        typer.Option(
            help="Largest batch the artifact is checked at (and the TensorRT profile's max)."
        ),
    ] = 32,
    opt_batch: Annotated[
        int, typer.Option(help="Typical device batch: the TensorRT profile's opt shape.")
    ] = 8,
    classes: Annotated[
        str | None,
        typer.Option(
            help="Class names (a text file, one per line, "
            "or a DOMAIN/CLASS dataset folder): their "
            "prompt features ship with the model. With --adapter also 'a,b,c'; default there: "
            "the model version's classes."
        ),
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option(
            "--text-encoder",
            help="Alone: also export the text encoder to ONNX (fp32). With --adapter: DIR (an "
            "export made with --text-encoder) or a prompts FILE ('CLASS' or 'CLASS: PROMPT' "
            "lines) for classes the model version does not have.",
        ),
    ] = None,
    trt: Annotated[
        bool,
        typer.Option(
            "--trt",
            help="Build a TensorRT engine too (on the "
            "device; prints the trtexec command where TensorRT is "
            "not importable).",
        ),
    ] = False,
    opset: Annotated[int, typer.Option(help="ONNX opset (17 or newer).")] = 17,
    seed: Annotated[int, typer.Option(help="Seed for random-init weights ('none').")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out.")] = False,
    sign_key: Annotated[
        Path | None,
        typer.Option(
            help="Sign the manifest (which lists every file's hash) with this private key "
            "(`fedclip-edge keys new`); agents verify it with the public half."
        ),
    ] = None,
    adapter: Annotated[
        Path | None,
        typer.Option(
            "--adapter",
            help="Export a fused classifier (image -> class probabilities) of this model store "
            "(its current version) or version folder, from the encoder artifact it pairs with; "
            "--model/--pretrained/--max-batch/--opset come from that artifact.",
        ),
    ] = None,
) -> None:
    """Export CLIP's image encoder (and class prompt features) as a verified artifact, or with
    --adapter a fused classifier of a model version."""

    console = Console(stderr=True)
    start = time.monotonic()

    def progress(msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - start:6.1f}s[/dim] {msg}")

    if adapter is not None:
        result = _export_fused(adapter, out, classes, precision, text_encoder, trt, force,
                               progress)
    else:
        if text_encoder:
            raise ConfigError(
                f"--text-encoder {text_encoder}: a value is for --adapter exports; alone it "
                "exports the text encoder"
            )
        result = export_artifact(
            out,
            model=model,
            pretrained=pretrained,
            precision=(precision or Precision.fp32).value,
            max_batch=max_batch,
            opt_batch=opt_batch,
            classes=Path(classes) if classes else None,
            text_encoder=text_encoder is not None,
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
    if m.get("kind") == FUSED_KIND:
        _print_fused(result)
        return
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


def _fused_classes(spec: str | None) -> list[str] | None:
    """--classes for a fused export: a file, a dataset folder, or 'a,b,c'."""
    if spec is None:
        return None
    if Path(spec).expanduser().exists() or "," not in spec:
        return resolve_classes(Path(spec))
    return resolve_classes([c.strip() for c in spec.split(",") if c.strip()])


def _export_fused(
    adapter: Path,
    out: Path,
    classes: str | None,
    precision: Precision | None,
    text_encoder: str | None,
    trt: bool,
    force: bool,
    progress,
) -> ExportResult:
    from fedclip_edge.exporters.fused import FusedSource, export_fused
    from fedclip_edge.serving.store import resolve_model

    resolved = resolve_model(adapter)
    if isinstance(resolved, Path):
        raise ExportError(f"{adapter} is already a fused classifier: give its model store or "
                          "version folder")
    if text_encoder == "":
        raise ConfigError("--text-encoder with --adapter needs a value: an export made with "
                          "--text-encoder, or a prompts file")
    source = FusedSource.from_version(resolved)
    progress(f"fusing {source.name} of {adapter}")
    return export_fused(
        source,
        out,
        classes=_fused_classes(classes),
        precision=precision.value if precision else None,
        text_encoder=Path(text_encoder) if text_encoder else None,
        trt=trt,
        overwrite=force,
        progress=progress,
    )


def _print_fused(result: ExportResult) -> None:
    m = result.manifest
    p = m["parity"]
    out_console = Console(width=None if sys.stdout.isatty() else 120)
    mv = m["model_version"]
    table = Table(
        title=f"fused classifier {mv['name']} ({len(m['classes'])} classes) {m['precision']} "
        f"-> {result.out}",
    )
    table.add_column("check vs the torch composition")
    table.add_column("top-1 agreement", justify="right")
    table.add_column("max |prob diff|", justify="right")
    for name, s in p["sets"].items():
        diff = s["max_abs_prob_diff"]
        table.add_row(f"{name} ({s['count']})", f"{100 * s['top1_agreement']:.1f}%",
                      "-" if diff is None else f"{diff:.2e}")
    table.add_row(f"pooled (bound {100 * p['bound']['min_top1_agreement']:.0f}%)",
                  f"{100 * p['top1_agreement']:.1f}%", f"{p['max_abs_prob_diff']:.2e}")
    out_console.print(table)
    src = m["class_source"]
    if src["encoded"]:
        out_console.print(f"new classes {', '.join(src['encoded'])} encoded by "
                          f"{src['text_encoder']}")
    files = ", ".join(f"{k} {_size(v['bytes'])}" for k, v in m["files"].items())
    out_console.print(f"files: {files}")
    for note in result.notes:
        out_console.print(f"[yellow]note:[/yellow] {note}")
    if result.trtexec:
        out_console.print("TensorRT 10 (JetPack 6):")
        out_console.print(result.trtexec["tensorrt10"], soft_wrap=True, highlight=False)
        out_console.print("TensorRT 11:")
        out_console.print(result.trtexec["tensorrt11"], soft_wrap=True, highlight=False)
