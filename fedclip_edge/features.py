"""Encode every image once and keep the features on disk.

FedCLIP's encoder never changes, so features are computed once per image and reused for every
round (the reference re-encodes each image every round). Cache layout, one folder:

- `text.safetensors`: `text_features` float32 [C, D] (raw, unnormalized) for the prompts
  "a picture of a <class>"; metadata: schema, identity, class names, logit scale.
- `<domain>.safetensors`: `features` float32 [N, D] (raw encoder output, unnormalized),
  `labels` int64 [N], `content_sha256` uint8 [N, 32] (sha256 of each image file's bytes);
  metadata: schema, identity, domain, class names, relative paths, preprocessing, `complete`.

A cache file is trusted only if it parses, its identity (model, weights hash, precision) and class
list match, its shapes agree and its values are finite; anything else is reported and recomputed.
Rows are reused by image content hash, so a re-run (or a run resumed after a crash: domain files
are checkpointed every few hundred images) encodes only what is new.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedclip_edge.data.folder import DomainDataset, ImageRecord, load_image
from fedclip_edge.errors import CacheError, DataError

SCHEMA = "fedclip-edge/features/v1"
TEXT_FILE = "text.safetensors"


class ImageEncoder(Protocol):
    """What feature extraction needs from a backend (torch, ONNX Runtime, TensorRT)."""

    identity: dict[str, Any]  # model, pretrained, weights_sha256, precision
    preprocess_cfg: dict[str, Any]

    def preprocess(self, image: Any) -> torch.Tensor | np.ndarray: ...

    def encode(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchEncoder:
    """The PyTorch image tower with open_clip's own preprocessing (fp32 reference)."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.identity = {**loaded.identity, "precision": "fp32"}
        self.preprocess_cfg = loaded.preprocess_cfg

    def preprocess(self, image: Any) -> torch.Tensor:
        return self.loaded.preprocess(image)

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        from fedclip_edge.models import encode_images

        return encode_images(self.loaded, batch)


@dataclass
class DomainFeatures:
    domain: str
    features: torch.Tensor  # [N, D] float32, raw
    labels: torch.Tensor  # [N] int64
    paths: list[str]
    content_sha256: torch.Tensor  # [N, 32] uint8

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class FeatureSet:
    identity: dict[str, Any]
    class_names: list[str]
    text_features: torch.Tensor  # [C, D] float32, raw
    logit_scale: float
    domains: dict[str, DomainFeatures] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.text_features.shape[1])


@dataclass
class ExtractReport:
    encoded: int = 0
    reused: int = 0
    skipped: list[str] = field(default_factory=list)  # unreadable images, one line each
    recomputed: list[str] = field(default_factory=list)  # cache files that were not trusted
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoded": self.encoded,
            "reused": self.reused,
            "skipped": self.skipped,
            "recomputed": self.recomputed,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2) if self.encoded else None,
        }


def file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def _same_identity(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("model", "pretrained", "weights_sha256", "precision")
    return all(a.get(k) == b.get(k) for k in keys)


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(tmp),
        metadata={"fedclip_edge": json.dumps(meta)},
    )
    os.replace(tmp, path)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a cache file, or CacheError naming what is wrong with it."""
    from safetensors import safe_open

    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get("fedclip_edge")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CacheError(
            f"cache file {path} is corrupt ({str(exc).splitlines()[0][:120]})"
        ) from exc
    if raw is None:
        raise CacheError(f"cache file {path} has no fedclip-edge metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CacheError(f"cache file {path} has unreadable metadata") from exc
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise CacheError(f"cache file {path} is not a {SCHEMA} file")
    return tensors, meta


def read_domain(
    path: Path, identity: dict[str, Any] | None, class_names: list[str] | None
) -> tuple[DomainFeatures, dict[str, Any]]:
    """Load one domain file, checking it against the expected identity and classes."""
    tensors, meta = _read(path)
    if identity is not None and not _same_identity(meta.get("identity", {}), identity):
        got = meta.get("identity", {})
        raise CacheError(
            f"cache file {path} was made by {got.get('model')}/{got.get('pretrained')} "
            f"({got.get('precision')}, weights {str(got.get('weights_sha256'))[:12]}), not by "
            f"{identity.get('model')}/{identity.get('pretrained')} ({identity.get('precision')}, "
            f"weights {str(identity.get('weights_sha256'))[:12]})"
        )
    if class_names is not None and meta.get("class_names") != list(class_names):
        raise CacheError(f"cache file {path} has other class names than the dataset")
    feats, labels, hashes = (tensors.get(k) for k in ("features", "labels", "content_sha256"))
    if feats is None or labels is None or hashes is None:
        raise CacheError(f"cache file {path} lacks features, labels or content_sha256")
    n = labels.shape[0]
    paths = meta.get("paths")
    if (
        feats.ndim != 2
        or feats.dtype != torch.float32
        or feats.shape[0] != n
        or labels.dtype != torch.int64
        or hashes.shape != (n, 32)
        or hashes.dtype != torch.uint8
        or not isinstance(paths, list)
        or len(paths) != n
    ):
        raise CacheError(f"cache file {path} has inconsistent shapes or dtypes")
    if not torch.isfinite(feats).all():
        raise CacheError(f"cache file {path} holds non-finite features")
    ncls = len(meta.get("class_names") or [])
    if n and (int(labels.min()) < 0 or int(labels.max()) >= ncls):
        raise CacheError(f"cache file {path} holds labels outside the class list")
    return DomainFeatures(meta.get("domain", path.stem), feats, labels, paths, hashes), meta


def _batched(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _encode_domain(
    domain: str,
    records: list[ImageRecord],
    root: Path,
    encoder: ImageEncoder,
    class_names: list[str],
    out: Path,
    report: ExtractReport,
    *,
    batch_size: int,
    checkpoint_every: int,
    on_progress: Callable[[int], None],
    log: Callable[[str], None],
) -> DomainFeatures:
    path = out / f"{domain}.safetensors"
    cached: dict[bytes, torch.Tensor] = {}
    if path.exists():
        try:
            old, _ = read_domain(path, encoder.identity, class_names)
            cached = {
                bytes(h.tolist()): f for h, f in zip(old.content_sha256, old.features, strict=True)
            }
        except CacheError as exc:
            report.recomputed.append(str(path))
            log(f"warning: {exc}; recomputing it")

    meta = {
        "schema": SCHEMA,
        "identity": encoder.identity,
        "domain": domain,
        "class_names": class_names,
        "preprocess": encoder.preprocess_cfg,
    }
    rows: list[tuple[str, int, bytes, torch.Tensor]] = []  # done, in record order
    todo: list[tuple[str, int, bytes, Path]] = []
    for rec in records:
        rel = str(rec.path.relative_to(root)) if rec.path.is_relative_to(root) else str(rec.path)
        try:
            digest = file_sha256(rec.path)
        except OSError as exc:
            report.skipped.append(f"{rec.path}: {exc.strerror or exc}")
            log(f"error: cannot read image {rec.path} ({exc.strerror or exc}); skipped")
            continue
        if digest in cached:
            rows.append((rel, rec.label, digest, cached[digest]))
            report.reused += 1
            on_progress(1)
        else:
            todo.append((rel, rec.label, digest, rec.path))

    def save(complete: bool) -> DomainFeatures:
        order = {
            str(r.path.relative_to(root)) if r.path.is_relative_to(root) else str(r.path): i
            for i, r in enumerate(records)
        }
        done = sorted(rows, key=lambda r: order[r[0]])
        dim = done[0][3].shape[0] if done else 0
        df = DomainFeatures(
            domain,
            torch.stack([r[3] for r in done]) if done else torch.zeros(0, dim),
            torch.tensor([r[1] for r in done], dtype=torch.int64),
            [r[0] for r in done],
            torch.tensor([list(r[2]) for r in done], dtype=torch.uint8).reshape(-1, 32),
        )
        _atomic_save(
            {
                "features": df.features.float(),
                "labels": df.labels,
                "content_sha256": df.content_sha256,
            },
            {**meta, "paths": df.paths, "complete": complete},
            path,
        )
        return df

    since_save = 0
    for chunk in _batched(todo, batch_size):
        pixels, kept = [], []
        for item in chunk:
            try:
                pixels.append(torch.as_tensor(encoder.preprocess(load_image(item[3]))))
                kept.append(item)
            except DataError as exc:
                report.skipped.append(str(exc))
                log(f"error: {exc}; skipped")
                on_progress(1)
        if not kept:
            continue
        t0 = time.perf_counter()
        feats = encoder.encode(torch.stack(pixels)).float()
        report.seconds += time.perf_counter() - t0
        if feats.shape[0] != len(kept) or not torch.isfinite(feats).all():
            raise CacheError(
                f"the encoder returned {list(feats.shape)} features with non-finite values or the "
                f"wrong count for {len(kept)} images of {domain}: the model or artifact is broken"
            )
        for item, f in zip(kept, feats, strict=True):
            rows.append((item[0], item[1], item[2], f.clone()))
        report.encoded += len(kept)
        since_save += len(kept)
        on_progress(len(chunk))
        if since_save >= checkpoint_every:
            save(complete=False)
            since_save = 0
    return save(complete=True)


def extract_features(
    dataset: DomainDataset,
    encoder: ImageEncoder,
    text_features: torch.Tensor,
    logit_scale: float,
    out: Path,
    *,
    batch_size: int = 32,
    checkpoint_every: int = 512,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[FeatureSet, ExtractReport]:
    """Encode each image of `dataset` not already cached in `out`; write and return the cache.

    Timing in the report covers encoder calls only (images/s of the backend); reading and
    decoding images is the loader's cost and is left out.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    class_names = list(dataset.classes)
    if text_features.shape[0] != len(class_names):
        raise CacheError(f"{text_features.shape[0]} text features for {len(class_names)} classes")
    _atomic_save(
        {"text_features": text_features.float().cpu()},
        {
            "schema": SCHEMA,
            "identity": encoder.identity,
            "class_names": class_names,
            "logit_scale": float(logit_scale),
        },
        out / TEXT_FILE,
    )
    report = ExtractReport()
    fs = FeatureSet(
        dict(encoder.identity), class_names, text_features.float().cpu(), float(logit_scale)
    )
    total = sum(len(v) for v in dataset.records.values())
    from fedclip_edge.progress import progress as track

    with track("features", total, "images", enabled=progress) as bar:

        def advance(n: int) -> None:
            bar.advance(n)

        for domain in dataset.domains:
            bar.describe(domain)
            fs.domains[domain] = _encode_domain(
                domain,
                dataset.records[domain],
                dataset.root,
                encoder,
                class_names,
                out,
                report,
                batch_size=batch_size,
                checkpoint_every=checkpoint_every,
                on_progress=advance,
                log=log,
            )
    return fs, report


def load_feature_cache(path: Path, domains: Iterable[str] | None = None) -> FeatureSet:
    """Read a cache folder written by `extract_features`; every file is checked."""
    path = Path(path)
    text_path = path / TEXT_FILE
    if not path.is_dir():
        raise CacheError(f"feature cache folder not found: {path}")
    if not text_path.is_file():
        raise CacheError(f"{path} is not a feature cache: {TEXT_FILE} is missing")
    tensors, meta = _read(text_path)
    text = tensors.get("text_features")
    names = meta.get("class_names")
    if text is None or not isinstance(names, list) or text.ndim != 2 or text.shape[0] != len(names):
        raise CacheError(f"cache file {text_path} has inconsistent text features")
    fs = FeatureSet(meta["identity"], names, text.float(), float(meta.get("logit_scale", 100.0)))
    wanted = (
        list(domains)
        if domains is not None
        else sorted(p.stem for p in path.glob("*.safetensors") if p.name != TEXT_FILE)
    )
    for d in wanted:
        f = path / f"{d}.safetensors"
        if not f.is_file():
            available = sorted(p.stem for p in path.glob("*.safetensors") if p.name != TEXT_FILE)
            raise CacheError(
                f"no features for domain {d!r} in {path} (has: {', '.join(available)})"
            )
        df, dmeta = read_domain(f, fs.identity, names)
        if not dmeta.get("complete", False):
            raise CacheError(
                f"cache file {f} is incomplete (extraction was interrupted); re-run "
                "`fedclip-edge features` to finish it"
            )
        if df.features.shape[1] != fs.dim:
            raise CacheError(
                f"cache file {f} has {df.features.shape[1]}-d features, text has {fs.dim}"
            )
        fs.domains[d] = df
    if not fs.domains:
        raise CacheError(f"feature cache {path} holds no domain files")
    return fs
