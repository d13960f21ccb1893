"""Write-then-replace files and strict JSON, once for every side.

A crash (or a kill -9) at any moment leaves either the old file or the new one, never half of
one: caches, round state and reports are all written this way.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedclip_edge.errors import ConfigError


def make_out_dir(path: Path | str, flag: str = "--out") -> Path:
    """Create an output folder before any work is done, so a folder that cannot be made (a
    file in the way, a read-only or virtual file system) is one clear error, not a traceback
    after the work it was meant to keep."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def jsonable(obj: Any) -> Any:
    """NaN/inf become null (strict JSON allows neither); dataclasses become dicts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        return jsonable(asdict(obj))
    return obj


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write to a hidden sibling, fsync, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any, *, fsync: bool = True) -> None:
    """Strict JSON (NaN -> null), indented, written atomically."""
    text = json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode(), fsync=fsync)
