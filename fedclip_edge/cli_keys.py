"""`fedclip-edge keys`: make and inspect the Ed25519 keys that sign updates, globals and
artifacts. Registered by cli.py; also runnable as `python -m fedclip_edge.cli_keys` (light: no
torch), which the dev PKI script can use."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fedclip_edge.cli_runner import run_app
from fedclip_edge.errors import SigningError
from fedclip_edge.signing import (
    KeyRegistry,
    check_key_id,
    fingerprint,
    load_private_key,
    load_public_key,
    new_keypair,
)

keys_app = typer.Typer(
    help="Ed25519 keys: who may take part, who signed an update, a global, an artifact.",
    no_args_is_help=True,
)


# Key ids that are not devices: the aggregator signs globals, the exporter signs artifacts.
NOT_DEVICES = ("aggregator", "exporter")
REGISTRY_DIR = "devices"
SITES_DIR = "sites"  # a central's `aggregate --site-keys`: sites are not devices (issue 22)


@keys_app.command("new")
def keys_new(
    out: Annotated[Path, typer.Option(help="Folder for <ID>.key (mode 0600) and <ID>.pub.")],
    ids: Annotated[
        list[str] | None,
        typer.Option("--id", help="Key id = device id (or 'aggregator'); repeat for several."),
    ] = None,
    sites: Annotated[
        list[str] | None,
        typer.Option("--site", help="A site aggregator's key id: its public half goes to "
                     "OUT/sites/ (the central's `aggregate --site-keys`); repeatable."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing keys.")] = False,
) -> None:
    """Make one key pair per --id and --site. Give the .pub files to the other side; keep .key
    private.

    Every --id but 'aggregator' and 'exporter' is a device: its public half also goes to
    OUT/devices/, the folder `aggregate --device-keys` reads (who may take part). A --site's goes
    to OUT/sites/ instead: a central accepts a hello that says "site" only from those keys."""
    ids, sites = list(ids or []), list(sites or [])
    if not ids and not sites:
        raise SigningError("give at least one --id or --site")
    for key_id in ids + sites:  # check all first: no half-done batch because of the last id
        check_key_id(key_id)
    if len(set(ids + sites)) != len(ids + sites):
        raise SigningError("an --id or --site is given twice")
    for key_id in sites:
        if key_id in NOT_DEVICES:
            raise SigningError(f"--site {key_id}: '{key_id}' is not a site's id")
    devices = [i for i in ids if i not in NOT_DEVICES]
    folders = {**{d: out / REGISTRY_DIR for d in devices}, **{s: out / SITES_DIR for s in sites}}
    if not force:  # refuse before making anything, as new_keypair does for the pair itself
        for key_id, folder in folders.items():
            if (folder / f"{key_id}.pub").exists():
                raise SigningError(f"{folder / f'{key_id}.pub'} exists; refusing to replace "
                                   "a key (use --force)")
    for key_id in ids + sites:
        key_path, pub_path = new_keypair(out, key_id, overwrite=force)
        typer.echo(f"{key_id}  {fingerprint(load_public_key(pub_path))}  {key_path}  {pub_path}")
        if key_id in folders:
            folder = folders[key_id]
            folder.mkdir(exist_ok=True)
            tmp = folder / f".{key_id}.pub.tmp"
            tmp.write_bytes(pub_path.read_bytes())
            tmp.chmod(0o644)
            tmp.replace(folder / f"{key_id}.pub")
    if devices:
        typer.echo(f"device registry {out / REGISTRY_DIR}/ ({', '.join(devices)}): give it to "
                   "`aggregate --device-keys`")
    if sites:
        typer.echo(f"site registry {out / SITES_DIR}/ ({', '.join(sites)}): give it to the "
                   "central's `aggregate --site-keys`")


@keys_app.command("show")
def keys_show(
    path: Annotated[
        Path,
        typer.Argument(help="A .key or .pub file, a folder of .pub files, or a registry file."),
    ],
) -> None:
    """Print key ids and fingerprints (SHA256:..., as ssh-keygen -l) to compare keys by eye."""
    if path.is_file() and path.suffix == ".key":
        key = load_private_key(path)
        typer.echo(f"{path.stem}  {fingerprint(key)}  (private key {path})")
        return
    registry = KeyRegistry.load(path)
    for key_id in registry.ids():
        typer.echo(f"{key_id}  {fingerprint(registry.get(key_id))}")  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    return run_app(keys_app, argv, "fedclip-edge keys")


if __name__ == "__main__":
    sys.exit(main())
