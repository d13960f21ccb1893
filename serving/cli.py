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


def serve(
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m",
            help="A model store (hot swap when its `current` changes), one version folder, or "
            "a fused export (fedclip-edge export --adapter).",
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8080,
    max_batch: Annotated[
        int, typer.Option(min=1, max=1024, help="Images per model call (micro-batching).")
    ] = 8,
    max_wait_ms: Annotated[
        float,
        typer.Option(min=0, max=10_000, help="How long the first image of a batch waits for "
                     "others (ms); a backlog makes full batches without waiting."),
    ] = 5.0,
    queue_size: Annotated[
        int, typer.Option(min=1, max=100_000, help="Requests that may wait for the model; "
                          "beyond, 503 with Retry-After.")
    ] = 64,
    max_body_mb: Annotated[
        float, typer.Option(min=0.001, max=2048, help="Largest image body (MiB); beyond, 413.")
    ] = 8.0,
    backend: Annotated[
        str, typer.Option(help="auto | onnxruntime | tensorrt | torch (optionally :cpu/:cuda).")
    ] = "auto",
    poll_s: Annotated[
        float, typer.Option(min=0.01, max=3600, help="How often a store's `current` is read.")
    ] = 0.5,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's log level: critical | error | warning | info.")
    ] = "warning",
) -> None:
    """Serve the model over HTTP: POST /classify, GET /healthz, GET /metrics, POST /reload."""
    import logging

    from fedclip_edge.serving.service import connection_limit, create_app, run_server

    logging.getLogger("fedclip_edge.serving").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    app = create_app(
        model,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        max_body_bytes=int(max_body_mb * 2**20),
        backend=backend,
        poll_s=poll_s,
    )
    service = app.state.service
    typer.echo(
        f"serving {service.holder.version or 'nothing yet'} from {model} on http://{host}:{port} "
        f"(max batch {max_batch}, queue {queue_size}"
        + (", watching the store for a new current" if service.holder.store else "")
        + ")",
        err=True,
    )
    run_server(app, host, port, limit_concurrency=connection_limit(queue_size, max_batch),
               log_level=log_level)


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
    top_k: Annotated[int, typer.Option("--top-k", help="Classes per row.", min=1, max=100_000)] = 3,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON line per image (and per labelled folder).")
    ] = False,
    backend: Annotated[
        str,
        typer.Option(help="auto, onnxruntime[:cpu|cuda|tensorrt], tensorrt; a version folder "
                     "also takes torch."),
    ] = "auto",
    batch: Annotated[
        int, typer.Option(help="Images decoded and predicted together.", min=1, max=65_536)
    ] = 32,
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
