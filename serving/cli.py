"""`fedclip-edge models ...` (and, from the other serving parts, `classify` and `serve`): the
device's model store from a shell. Registered by fedclip_edge/cli.py's `_register_parts`.

Each command is its own function so that the serving parts add theirs without touching others'.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge.serving.store import ModelStore, ModelVersion
from fedclip_edge.tables import pct, text_table

models_app = typer.Typer(
    help="A device's model store: the versions its agent kept, which one is current.",
    no_args_is_help=True,
)

ModelsDir = Annotated[
    Path,
    typer.Option("--models", help="The model store folder (the agent's --models)."),
]


def _row(v: ModelVersion, current: str | None) -> dict:
    m = v.manifest
    acc = v.accuracy
    return {
        "name": v.name,
        "kind": v.kind,
        "job": m.get("job"),
        "round": m.get("round"),
        "client_id": m.get("client_id"),
        "accuracy": acc,
        "promoted": bool(m.get("promoted")),
        "gate": m.get("gate"),
        "created": m.get("created"),
        "current": v.name == current,
    }


@models_app.command("list")
def models_list(
    models: ModelsDir,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per version.")] = False,
) -> None:
    """Every version, oldest first; `*` marks the current one. Corrupt versions are listed as
    such (never served)."""
    store = ModelStore(models)
    good, bad = store.scan()
    current = store.current_name()
    if as_json:
        for v in good:
            typer.echo(json.dumps(_row(v, current)))
        for name, why in bad:
            typer.echo(json.dumps({"name": name, "error": why, "current": name == current}))
        return
    if not good and not bad:
        typer.echo(f"{models}: no versions yet")
        return
    rows = []
    for v in good:
        acc = v.accuracy
        rows.append(
            [
                f"{'*' if v.name == current else ' '} {v.name}",
                v.kind,
                str(v.manifest.get("job", "-")),
                str(v.manifest.get("round", "-")),
                str(acc.get("n", "-")),
                pct(acc.get("zero_shot")),
                pct(acc.get("global")),
                pct(acc.get("personal")),
            ]
        )
    headers = ["  version", "kind", "job", "round", "val n", "zero-shot", "global", "personal"]
    for line in text_table(headers, rows):
        typer.echo(line)
    for name, why in bad:
        typer.echo(f"{'*' if name == current else ' '} {name}  refused: {why}")
    if current is None:
        typer.echo("no current version (fedclip-edge models promote NAME --models DIR)")


@models_app.command("promote")
def models_promote(
    name: Annotated[str, typer.Argument(help="The version to make current (e.g. v0002-personal).")],
    models: ModelsDir,
    reason: Annotated[str, typer.Option(help="Recorded in history.jsonl.")] = "by hand",
) -> None:
    """Make a version current by hand (the gate is the agent's; this is the operator's say)."""
    store = ModelStore(models)
    before = store.current_name()
    v = store.promote(name, reason)
    typer.echo(f"current: {v.name} (was {before or 'none'})")


@models_app.command("rollback")
def models_rollback(
    models: ModelsDir,
    reason: Annotated[str, typer.Option(help="Recorded in history.jsonl.")] = "by hand",
) -> None:
    """Point `current` back at the version that was current before it."""
    store = ModelStore(models)
    before = store.current_name()
    v = store.rollback(reason)
    typer.echo(f"current: {v.name} (was {before})")


def classify(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Image files and folders (FOLDER/CLASS/x.jpg folders also get an "
                       "accuracy line).", show_default=False),
    ],
    model: Annotated[
        Path,
        typer.Option("--model", help="A model store (its current version), one version folder, "
                     "or a fused export (export --adapter)."),
    ],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes per row.", min=1)] = 3,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per image (and per labelled folder).")
    ] = False,
    backend: Annotated[
        str,
        typer.Option(help="auto, onnxruntime[:cpu|cuda|tensorrt], tensorrt; a version folder "
                     "also takes torch."),
    ] = "auto",
    batch: Annotated[int, typer.Option(help="Images decoded and predicted together.", min=1)] = 32,
) -> None:
    """Classify images with a device's model: one row per image; exits 2 when no image could be
    classified (a file that is not an image is its own error row, the rest goes on)."""
    from fedclip_edge.errors import DataError
    from fedclip_edge.progress import progress
    from fedclip_edge.serving.classifier import open_classifier
    from fedclip_edge.serving.classify import accuracies, classify_items, collect

    items, missing = collect(paths)
    clf = open_classifier(model, backend=backend, max_batch=batch)
    emit = (lambda row: typer.echo(json.dumps(row.to_dict()))) if as_json else None
    for row in missing:
        if emit:
            emit(row)
    with progress("classify", len(items), "images", enabled=len(items) > batch) as bar:
        rows = classify_items(clf, items, top_k=top_k, on_row=emit, advance=bar.advance)
    rows = missing + rows
    folders = accuracies(rows, clf.classes)
    if as_json:
        for acc in folders:
            typer.echo(json.dumps({**acc.to_dict(), "model_version": clf.version}))
    else:
        table = []
        for r in rows:
            if r.prediction is None:
                table.append([str(r.item.path), "error", "-", r.error or "?"])
                continue
            p = r.prediction
            mark = "" if r.correct is None else (" ok" if r.correct else f" (is {r.item.truth})")
            table.append([str(r.item.path), p.label + mark, f"{p.score:.3f}",
                          ", ".join(f"{c} {s:.3f}" for c, s in p.topk)])
        for line in text_table(["image", "label", "score", "top-k"], table):
            typer.echo(line)
        typer.echo(f"model {clf.version} ({clf.backend})")
        for acc in folders:
            typer.echo(acc.line())
    done = sum(1 for r in rows if r.prediction is not None)
    if not done:
        raise DataError(f"no image could be classified ({len(rows)} given, "
                        f"{len(rows) - done} errors)" if rows else "no images found in "
                        + ", ".join(map(str, paths)))
