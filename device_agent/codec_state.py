"""The agent's error-feedback state: what its delta codec did not send yet, kept across restarts.

Why a file: a delta codec (int8, topk, ...) leaves a residual that the next round's delta carries
(`fedclip_edge.codecs.ErrorFeedback`); losing it on a restart silently drops what earlier rounds
held back. The file also keeps the last update as it was encoded (the signed envelope, bytes) with
its round and the sha256 of the global frame it was built on: the residual in the file already
accounts for that update, so after a restart in the same round the agent must re-send those bytes,
never train and encode again (that would apply the residual twice).

One safetensors file, written atomically (`fedclip_edge.io.atomic_write_bytes`, fsync) before the
update is published: tensors `r.<name>` (float32 residuals) and `update` (uint8, the envelope);
metadata names the job, client, codec, adapter width, round and global hash. A file that is
unreadable or belongs to another job, client, codec or width is ignored with one warning line:
the agent starts from a zero residual rather than crash or mix another model's residual in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from fedclip_edge.io import atomic_write_bytes

KIND = "fedclip-edge/agent-codec-state/v1"


def global_digest(frame: bytes) -> str:
    """sha256 of the global frame an update was encoded against (its delta's base)."""
    return hashlib.sha256(frame).hexdigest()


def default_state_path(cache: Path | None, job: str, client: str) -> Path:
    """`agent-state/<job>-<client>.safetensors` beside the feature cache folder (its parent when
    --cache is given, else the project's cache folder): not inside it, whose *.safetensors files
    are the feature cache's own domains."""
    if cache is not None:
        base = Path(cache).resolve().parent
    else:
        from fedclip_edge.models.registry import cache_dir

        base = cache_dir()
    return base / "agent-state" / f"{job}-{client}.safetensors"


@dataclass
class CodecState:
    """The residual (per adapter tensor) and the last encoded update, for one job and client."""

    job: str
    client: str
    codec: str
    dim: int
    residual: dict[str, torch.Tensor] = field(default_factory=dict)
    round: int = -1  # round of `update`; -1: none
    update: bytes = b""  # the signed update envelope as published
    global_sha256: str = ""

    def save(self, path: Path) -> None:
        """Atomically (tmp + fsync + rename): a crash leaves the previous state or this one."""
        tensors = {f"r.{k}": v.detach().to(torch.float32).contiguous()
                   for k, v in self.residual.items()}
        tensors["update"] = torch.from_numpy(np.frombuffer(self.update, dtype=np.uint8).copy())
        meta = {
            "kind": KIND, "job": self.job, "client": self.client, "codec": self.codec,
            "dim": str(self.dim), "round": str(self.round), "global_sha256": self.global_sha256,
        }
        atomic_write_bytes(Path(path), safetensors.torch.save(tensors, metadata=meta))

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        job: str,
        client: str,
        codec: str,
        shapes: dict[str, tuple[int, ...]],
        log: Callable[[str], None] = print,
    ) -> CodecState:
        """The saved state, or an empty one (missing file: silently; unreadable or another
        job/client/codec/width: with one warning line)."""
        dim = _dim_of(shapes)
        empty = cls(job, client, codec, dim)
        path = Path(path)
        if not path.exists():
            return empty
        why = _check(path, job=job, client=client, codec=codec, dim=dim, shapes=shapes)
        if isinstance(why, str):
            log(f"warning: error-feedback state {path} ignored ({why}); starting from a zero "
                "residual")
            return empty
        tensors, meta = why
        residual = {k[2:]: v for k, v in tensors.items() if k.startswith("r.")}
        return cls(job, client, codec, dim, residual, int(meta["round"]),
                   tensors["update"].numpy().tobytes(), meta.get("global_sha256", ""))


def _dim_of(shapes: dict[str, tuple[int, ...]]) -> int:
    return max((s[-1] for s in shapes.values() if s), default=0)


def _check(
    path: Path, *, job: str, client: str, codec: str, dim: int,
    shapes: dict[str, tuple[int, ...]],
) -> str | tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata, or why they cannot be used (one short reason)."""
    try:
        raw = path.read_bytes()
        tensors = safetensors.torch.load(raw)  # validates the header and every tensor's bytes
        header_len = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as exc:  # any parser failure: corrupt, truncated, not ours
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        return f"unreadable: {first}"
    if meta.get("kind") != KIND:
        return "not an agent codec state file"
    for key, want in (("job", job), ("client", client), ("codec", codec), ("dim", str(dim))):
        if meta.get(key) != want:
            return f"saved for {key} {meta.get(key)!r}, this agent runs {want!r}"
    try:
        int(meta["round"])
    except (KeyError, ValueError):
        return "no round in its metadata"
    update = tensors.get("update")
    if update is None or update.dtype != torch.uint8 or update.dim() != 1:
        return "no saved update"
    residual = {k[2:]: v for k, v in tensors.items() if k.startswith("r.")}
    if residual and set(residual) != set(shapes):
        return "its residual names other tensors than this adapter's"
    for name, r in residual.items():
        if tuple(r.shape) != tuple(shapes[name]) or r.dtype != torch.float32:
            return f"residual {name!r} has shape {list(r.shape)}, the adapter {list(shapes[name])}"
        if not bool(torch.isfinite(r).all()):
            return f"residual {name!r} is not finite"
    return tensors, meta
