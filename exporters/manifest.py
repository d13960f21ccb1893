"""The artifact's manifest: write, read, verify; and staging so a failed export leaves nothing.

An artifact is one directory: the model files, `golden.npz`, optional class features, and
`manifest.json` last. Everything is written into a hidden sibling directory and renamed into
place only after parity has passed, so an export that fails (or is killed) never leaves a
directory with a manifest in it. Every file is listed with its sha256 and size; `verify_artifact`
refuses a missing or changed file with the file's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedclip_edge.errors import ExportError
from fedclip_edge.exporters.names import (
    ENCODER_KIND,
    FUSED_KIND,
    MANIFEST_FILE,
    PRECISIONS,
    SCHEMA,
    SCHEMA_VERSION,
)

# Top-level keys every manifest must have, and their JSON types.
REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema": str,
    "schema_version": int,
    "created": str,
    "model": dict,
    "preprocess": dict,
    "precision": str,
    "opset": int,
    "max_batch": int,
    "image_encoder": dict,
    "golden": dict,
    "parity": dict,
    "files": dict,
    "versions": dict,
}
REQUIRED_MODEL = ("name", "pretrained", "weights_sha256", "embed_dim")
REQUIRED_ENCODER = ("file", "inputs", "outputs")
# A fused classifier (exporters/fused.py) has `classifier` where an encoder has `image_encoder`.
REQUIRED_FUSED: dict[str, type | tuple[type, ...]] = {
    "classifier": dict,
    "model_version": dict,
    "classes": list,
}
KINDS = (ENCODER_KIND, FUSED_KIND)


def kind_of(data: Mapping[str, Any]) -> str:
    """`image-encoder` (also when absent: manifests written before kinds existed) or
    `fused-classifier`."""
    return str(data.get("kind") or ENCODER_KIND)


def graph_section(data: Mapping[str, Any]) -> str:
    """The manifest section that describes the artifact's ONNX graph."""
    return "classifier" if kind_of(data) == FUSED_KIND else "image_encoder"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under `root` except the manifest (relative POSIX paths)."""
    records: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_FILE:
            continue
        records[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return records


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Hash the files, validate, and write `manifest.json` atomically; returns what was written."""
    data = dict(manifest)
    data["files"] = file_records(root)
    validate_manifest(data)
    tmp = root / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST_FILE)
    return data


def validate_manifest(data: Mapping[str, Any]) -> None:
    """Schema check: the keys and types a runtime relies on (ExportError naming what is wrong)."""
    if data.get("schema") != SCHEMA:
        raise ExportError(f"not a fedclip-edge artifact manifest (schema {data.get('schema')!r})")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ExportError(
            f"artifact manifest version {data.get('schema_version')!r} is not supported "
            f"(this fedclip-edge reads version {SCHEMA_VERSION}): re-export the model"
        )
    kind = kind_of(data)
    if kind not in KINDS:
        raise ExportError(f"artifact manifest has unknown kind {kind!r} ({', '.join(KINDS)})")
    required = dict(REQUIRED)
    if kind == FUSED_KIND:
        del required["image_encoder"]
        required.update(REQUIRED_FUSED)
    for key, typ in required.items():
        if key not in data:
            raise ExportError(f"artifact manifest lacks {key!r}")
        if not isinstance(data[key], typ):
            raise ExportError(f"artifact manifest field {key!r} has the wrong type")
    for key in REQUIRED_MODEL:
        if key not in data["model"]:
            raise ExportError(f"artifact manifest lacks model.{key}")
    section = graph_section(data)
    for key in REQUIRED_ENCODER:
        if key not in data[section]:
            raise ExportError(f"artifact manifest lacks {section}.{key}")
    if data["precision"] not in PRECISIONS:
        raise ExportError(f"artifact manifest names unknown precision {data['precision']!r}")
    if data["max_batch"] < 1:
        raise ExportError("artifact manifest max_batch must be at least 1")
    for rel, rec in data["files"].items():
        if (
            not isinstance(rec, dict)
            or "sha256" not in rec
            or Path(rel).is_absolute()
            or ".." in Path(rel).parts
        ):
            raise ExportError(f"artifact manifest has a bad file entry {rel!r}")


def read_manifest(root: Path) -> dict[str, Any]:
    """Load and schema-check `root/manifest.json` (no hashing; see `verify_artifact`)."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise ExportError(f"artifact directory not found: {root}")
    if not path.is_file():
        raise ExportError(
            f"{root} has no {MANIFEST_FILE}: not an exported artifact (or unfinished)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object")
    validate_manifest(data)
    return data


def verify_artifact(root: Path, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check that every file the manifest lists is there with its recorded sha256."""
    root = Path(root)
    data = dict(manifest) if manifest is not None else read_manifest(root)
    referenced = [data[graph_section(data)]["file"], data["golden"]["file"]]
    for section in ("text_encoder", "class_features", "tensorrt"):
        entry = data.get(section)
        if isinstance(entry, dict) and entry.get("file"):
            referenced.append(entry["file"])
    for rel in referenced:
        if rel not in data["files"]:
            raise ExportError(f"artifact manifest references {rel} but lists no hash for it")
    for rel, rec in data["files"].items():
        path = root / rel
        if not path.is_file():
            raise ExportError(f"artifact file missing: {path} (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if "bytes" in rec and size != rec["bytes"]:
            raise ExportError(
                f"artifact file {rel} has {size} bytes, the manifest says {rec['bytes']}: "
                "it was changed or truncated after export"
            )
        if sha256_file(path) != rec["sha256"]:
            raise ExportError(
                f"artifact file {rel} does not match its sha256 in {MANIFEST_FILE}: "
                "it was changed after export"
            )
    return data


@contextlib.contextmanager
def staged_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling directory; on success rename it to `out`, on failure delete it."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(
            f"--out {out} already exists and is not empty: pass --force to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
