"""A device's model store: every adapter it learned, as immutable versions, and which one it serves.

Why a store and not one file: the agent writes a new model at the end of each job while a service
may be classifying with the current one; a version must appear whole or not at all (staged in a
hidden folder, fsynced, renamed), and a bad promotion must be undone by pointing back at an
older version, so versions are never rewritten or deleted here.

    STORE/current             the current version's name + "\\n" (atomic replace)
    STORE/history.jsonl       one line per promote/rollback: time, from, to, reason, action
    STORE/versions/v0001-global/{adapter.safetensors, manifest.json}

`adapter.safetensors` holds the AttentionAdapter state dict plus `text_features` [C, D] (the
classes' L2-normalized text features); `manifest.json` (format `fedclip-edge-model/1`) says where
it came from and lists each file's sha256, which `load_version` checks before anything is used.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from fedclip_edge.errors import ModelStoreError
from fedclip_edge.io import atomic_write_bytes, jsonable

FORMAT = "fedclip-edge-model/1"
ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
TEXT_KEY = "text_features"
KINDS = ("global", "personal")
NAME_RE = re.compile(r"^v(\d{4,})-(global|personal)$")
STAGING_PREFIX = ".staging-"
FUSED_KIND = "fused-classifier"
NORM_TOL = 1e-3


def utc_now() -> str:
    """ISO 8601 UTC to the second, as every manifest and history line writes time."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def adapter_shapes(dim: int) -> dict[str, tuple[int, ...]]:
    """The AttentionAdapter's state dict keys and shapes for width `dim` (fedclip_edge.adapter)."""
    return {
        "fea_attn.0.weight": (dim, dim),
        "fea_attn.0.bias": (dim,),
        "fea_attn.2.weight": (dim, dim),
        "fea_attn.2.bias": (dim,),
    }


def version_name(seq: int, kind: str) -> str:
    return f"v{seq:04d}-{kind}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_tensors(
    tensors: Mapping[str, torch.Tensor], dim: int, n_classes: int, where: str
) -> None:
    """Keys, shapes, dtype and finiteness of an adapter + text features; one line on failure."""
    expected = {**adapter_shapes(dim), TEXT_KEY: (n_classes, dim)}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ModelStoreError(
            f"{where}: not a dim-{dim} adapter with {n_classes} classes "
            f"(missing {missing or 'nothing'}, unexpected {extra or 'nothing'})"
        )
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise ModelStoreError(
                f"{where}: {key} has shape {list(t.shape)}, expected {list(shape)} "
                f"(dim {dim}, {n_classes} classes)"
            )
        if t.dtype != torch.float32:
            raise ModelStoreError(f"{where}: {key} is {t.dtype}, expected torch.float32")
        if not bool(torch.isfinite(t).all()):
            raise ModelStoreError(f"{where}: {key} holds NaN or inf")
    norms = tensors[TEXT_KEY].norm(dim=1)
    if n_classes and float((norms - 1).abs().max()) > NORM_TOL:
        raise ModelStoreError(f"{where}: {TEXT_KEY} rows are not L2-normalized")


@dataclass(frozen=True)
class ModelVersion:
    """One checked version folder; its files are immutable once it exists."""

    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def seq(self) -> int:
        m = NAME_RE.match(self.name)
        return int(m.group(1)) if m else 0

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def accuracy(self) -> dict[str, Any]:
        return dict(self.manifest.get("accuracy") or {})

    def load(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        """(adapter state dict, text features [C, D], logit scale), re-checked against the
        manifest's hash so that a file changed after listing is refused, not served."""
        tensors = _read_adapter(self.path, self.manifest)
        text = tensors.pop(TEXT_KEY)
        return tensors, text, float(self.manifest["logit_scale"])


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST_FILE
    if not path.is_dir():
        raise ModelStoreError(f"{path}: not a model version folder (no such folder)")
    if not file.is_file():
        raise ModelStoreError(f"{file}: missing (not a model version folder)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelStoreError(f"{file}: unreadable JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ModelStoreError(f"{file}: not a JSON object")
    if manifest.get("format") != FORMAT:
        raise ModelStoreError(
            f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r} (a foreign file)"
        )
    return manifest


def _check_manifest(path: Path, manifest: dict[str, Any]) -> None:
    file = path / MANIFEST_FILE
    name = manifest.get("name")
    m = NAME_RE.match(str(name))
    if not m or name != path.name:
        raise ModelStoreError(f"{file}: name {name!r} does not match its folder {path.name!r}")
    if manifest.get("kind") != m.group(2):
        raise ModelStoreError(f"{file}: kind {manifest.get('kind')!r} does not match {name!r}")
    dim = manifest.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
        raise ModelStoreError(f"{file}: dim {dim!r} is not a positive integer")
    classes = manifest.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ModelStoreError(f"{file}: classes must be a non-empty list of distinct names")
    scale = manifest.get("logit_scale")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ModelStoreError(f"{file}: logit_scale {scale!r} is not a positive number")
    entry = (manifest.get("files") or {}).get(ADAPTER_FILE)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ModelStoreError(f"{file}: files lists no sha256 for {ADAPTER_FILE}")


def _read_adapter(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    file = path / ADAPTER_FILE
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ModelStoreError(f"{file}: missing") from None
    except OSError as exc:
        raise ModelStoreError(f"{file}: unreadable ({exc})") from None
    entry = manifest["files"][ADAPTER_FILE]
    if len(raw) != entry.get("bytes", len(raw)) or _sha256(raw) != entry["sha256"]:
        raise ModelStoreError(
            f"{file}: sha256 or size differs from manifest.json (corrupt or replaced)"
        )
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise ModelStoreError(f"{file}: not a safetensors file ({exc})") from None
    _check_tensors(tensors, int(manifest["dim"]), len(manifest["classes"]), str(file))
    return tensors


def load_version(path: Path) -> ModelVersion:
    """A version folder after checking its format, name, file hashes and tensor shapes; a
    corrupt or foreign version is refused with one line naming the file and the fault."""
    path = Path(path)
    manifest = _read_manifest(path)
    _check_manifest(path, manifest)
    _read_adapter(path, manifest)
    return ModelVersion(name=path.name, path=path.resolve(), manifest=manifest)


def _before_rename(staging: Path) -> None:
    """Hook: runs with the version fully staged, just before it becomes visible (tests raise
    here to show a failed add leaves nothing behind)."""


class ModelStore:
    """Versions of one device's adapters and the `current` pointer a service reads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.current_file = self.root / "current"
        self.history_file = self.root / "history.jsonl"

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # ------------------------------------------------------------------ reading

    def _names(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        names = [p.name for p in self.versions_dir.iterdir() if NAME_RE.match(p.name)]
        return sorted(names, key=lambda n: int(NAME_RE.match(n).group(1)))  # type: ignore[union-attr]

    def scan(self) -> tuple[list[ModelVersion], list[tuple[str, str]]]:
        """(good versions by seq, [(name, why refused)]): `models list` shows both."""
        good: list[ModelVersion] = []
        bad: list[tuple[str, str]] = []
        for name in self._names():
            try:
                good.append(load_version(self.versions_dir / name))
            except ModelStoreError as exc:
                bad.append((name, str(exc)))
        return good, bad

    def versions(self) -> list[ModelVersion]:
        """The store's intact versions, oldest first (a corrupt one is left out; see scan)."""
        return self.scan()[0]

    def version(self, name: str) -> ModelVersion:
        if not NAME_RE.match(name):
            raise ModelStoreError(f"{name!r} is not a version name (v0001-global, v0002-personal)")
        path = self.versions_dir / name
        if not path.exists():
            raise ModelStoreError(f"{self.root}: no version {name!r}")
        return load_version(path)

    def current_name(self) -> str | None:
        """The pointer only (one small read): what a hot-swap watcher polls."""
        try:
            name = self.current_file.read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return name or None

    def current(self) -> ModelVersion | None:
        """The checked current version; a pointer to a missing or corrupt one is an error, never
        a silent fallback to something else."""
        name = self.current_name()
        return None if name is None else self.version(name)

    def history(self) -> list[dict[str, Any]]:
        if not self.history_file.is_file():
            return []
        out = []
        for n, line in enumerate(self.history_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ModelStoreError(f"{self.history_file}:{n}: not a JSON line") from None
        return out

    # ------------------------------------------------------------------ writing

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (agent, CLI); readers need no lock (renames are atomic). A
        failed write (disk full, read-only, a file where a folder should be) is one line."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / ".lock", "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        except OSError as exc:
            where = exc.filename or self.root
            raise ModelStoreError(
                f"{where}: cannot write the model store ({exc.strerror or exc})"
            ) from None

    def add(
        self,
        state: Mapping[str, torch.Tensor],
        text_features: torch.Tensor,
        manifest_fields: Mapping[str, Any],
    ) -> ModelVersion:
        """A new version, next in sequence, never current by itself (the gate decides). Staged in
        a hidden folder, fsynced, then renamed: a crash leaves the store as it was."""
        fields = dict(manifest_fields)
        kind = fields.get("kind")
        if kind not in KINDS:
            raise ModelStoreError(f"kind {kind!r}: a version is 'global' or 'personal'")
        classes = fields.get("classes")
        if not isinstance(classes, (list, tuple)) or not classes:
            raise ModelStoreError("a version needs its class names (manifest field 'classes')")
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        text = text_features.detach().to("cpu", torch.float32)
        text = torch.nn.functional.normalize(text, dim=-1).contiguous()
        dim = int(text.shape[-1]) if text.ndim == 2 else -1
        if text.ndim != 2 or text.shape[0] != len(classes):
            raise ModelStoreError(
                f"text_features has shape {list(text.shape)}, expected [{len(classes)}, D]"
            )
        tensors[TEXT_KEY] = text
        _check_tensors(tensors, dim, len(classes), "new version")
        data = safetensors.torch.save(tensors, metadata={"format": FORMAT})
        with self._locked():
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            self._clean_staging()
            names = [p.name for p in self.versions_dir.iterdir() if NAME_RE.match(p.name)]
            seq = 1 + max((int(NAME_RE.match(n).group(1)) for n in names), default=0)  # type: ignore[union-attr]
            name = version_name(seq, kind)
            manifest = {
                "format": FORMAT,
                "name": name,
                "kind": kind,
                **{k: v for k, v in fields.items() if k not in ("format", "name", "kind")},
                "dim": dim,
                "classes": list(classes),
                "logit_scale": float(fields.get("logit_scale", 100.0)),
                "created": fields.get("created") or utc_now(),
                "promoted": bool(fields.get("promoted", False)),
                "files": {ADAPTER_FILE: {"sha256": _sha256(data), "bytes": len(data)}},
            }
            staging = self.versions_dir / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
            staging.mkdir()
            try:
                atomic_write_bytes(staging / ADAPTER_FILE, data)
                text_json = json.dumps(jsonable(manifest), indent=2, allow_nan=False) + "\n"
                atomic_write_bytes(staging / MANIFEST_FILE, text_json.encode())
                _fsync_dir(staging)
                _before_rename(staging)
                os.rename(staging, self.versions_dir / name)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            _fsync_dir(self.versions_dir)
        return load_version(self.versions_dir / name)

    def _clean_staging(self) -> None:
        """Leftovers of an add killed mid-way (kill -9, power loss): never a version, removed."""
        for p in self.versions_dir.iterdir():
            if p.name.startswith(STAGING_PREFIX):
                shutil.rmtree(p, ignore_errors=True)

    def _set_current(self, to: str, reason: str, action: str) -> None:
        prev = self.current_name()
        atomic_write_bytes(self.current_file, (to + "\n").encode())
        line = {"time": utc_now(), "from": prev, "to": to, "reason": reason, "action": action}
        with open(self.history_file, "a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def promote(self, name: str, reason: str) -> ModelVersion:
        """Make `name` current (it is checked first); the change is one history line."""
        with self._locked():
            version = self.version(name)
            if self.current_name() != name:
                self._set_current(name, reason, "promote")
            return version

    def _stack(self) -> list[str]:
        """The chain of currents the history describes: a promote pushes, a rollback pops."""
        stack: list[str] = []
        for entry in self.history():
            to = entry.get("to")
            if entry.get("action") == "rollback":
                while stack and stack[-1] != to:
                    stack.pop()
            if to and (not stack or stack[-1] != to):
                stack.append(to)
        return stack

    def rollback(self, reason: str = "rollback") -> ModelVersion:
        """Back to the version that was current before the current one (again: further back)."""
        with self._locked():
            current = self.current_name()
            stack = self._stack()
            if current is None or not stack or stack[-1] != current or len(stack) < 2:
                raise ModelStoreError(
                    f"{self.root}: nothing to roll back to (current {current!r}, "
                    f"{max(len(stack) - 1, 0)} earlier current version(s) in history.jsonl)"
                )
            target = self.version(stack[-2])
            self._set_current(target.name, reason, "rollback")
            return target


def is_store(path: Path) -> bool:
    path = Path(path)
    return (path / "versions").is_dir() or (path / "current").is_file()


def resolve_model(path: Path) -> ModelVersion | Path:
    """What `classify`, `serve` and `export --adapter` take: a store (-> its current version),
    one version folder, or a fused export folder (-> the folder itself)."""
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelStoreError(f"{manifest_file}: unreadable JSON ({exc})") from None
        if isinstance(manifest, dict) and manifest.get("kind") == FUSED_KIND:
            return path
        return load_version(path)
    if is_store(path):
        current = ModelStore(path).current()
        if current is None:
            raise ModelStoreError(
                f"{path}: the store has no current version yet "
                f"(fedclip-edge models promote NAME --models {path})"
            )
        return current
    if not path.exists():
        raise ModelStoreError(f"{path}: no such model store, version or fused export")
    raise ModelStoreError(f"{path}: not a model store, a model version or a fused export")
