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
