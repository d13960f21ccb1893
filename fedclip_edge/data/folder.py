"""Loader for the DomainBed / ImageFolder layout ``ROOT/<domain>/<class>/<file>``.

PACS, VLCS, Office-Home and this project's synthetic set all use it. Scanning checks the
layout up front, so a wrong path or a half-copied dataset fails with one line naming the
folder instead of a shape error deep inside training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fedclip_edge.errors import DataError
from fedclip_edge.names import did_you_mean

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})


@dataclass(frozen=True)
class ImageRecord:
    """One image file with its label (index into the sorted class names) and domain."""

    path: Path
    label: int
    class_name: str
    domain: str


@dataclass(frozen=True)
class DomainDataset:
    """A scanned dataset: per domain, its records sorted by path (so runs are repeatable)."""

    root: Path
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    records: dict[str, list[ImageRecord]]

    def __len__(self) -> int:
        return sum(len(r) for r in self.records.values())


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def _images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively (like torchvision's ImageFolder), sorted."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder).parts
        if any(_hidden(part) for part in rel):
            continue
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _class_mismatch(root: Path, per_domain: dict[str, list[str]]) -> str:
    """Describe which domains lack or add classes, relative to the majority of domains."""
    counts: dict[str, int] = {}
    for names in per_domain.values():
        for c in names:
            counts[c] = counts.get(c, 0) + 1
    n = len(per_domain)
    expected = {c for c, k in counts.items() if 2 * k > n}
    parts = []
    for d, names in per_domain.items():
        have = set(names)
        lacks, extra = sorted(expected - have), sorted(have - expected)
        bits = []
        if lacks:
            bits.append(f"lacks {', '.join(lacks)}")
        if extra:
            bits.append(f"has extra {', '.join(extra)}")
        if bits:
            parts.append(f"{d} {' and '.join(bits)}")
    return f"class folders differ across domains in {root}: " + "; ".join(parts)


def scan_dataset(root: Path, domains: Sequence[str] | None = None) -> DomainDataset:
    """Index ``root/<domain>/<class>/<image>``; raise DataError on any layout problem.

    `domains` picks and orders a subset (default: every domain folder, sorted). Labels are
    positions in the sorted class names, which must be the same in every chosen domain.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset root {root} does not exist")
    if not root.is_dir():
        raise DataError(f"dataset root {root} is not a directory")
    available = _subdirs(root)
    if not available:
        raise DataError(
            f"dataset root {root} has no domain folders (expected ROOT/<domain>/<class>)"
        )
    if domains is None:
        chosen = tuple(available)
    else:
        chosen = tuple(dict.fromkeys(domains))  # drop repeats, keep order
        if not chosen:
            raise DataError(f"no domains requested for dataset {root}")
        missing = [d for d in chosen if d not in available]
        if missing:
            raise DataError(
                f"domain {', '.join(missing)} not found in {root}"
                f"{did_you_mean(missing[0], available)}; available: {', '.join(available)}"
            )

    per_domain: dict[str, list[str]] = {}
    files: dict[str, dict[str, list[Path]]] = {}
    for d in chosen:
        names = _subdirs(root / d)
        if not names:
            raise DataError(f"domain folder {root / d} has no class folders")
        files[d] = {c: _images(root / d / c) for c in names}
        if not any(files[d].values()):
            raise DataError(
                f"domain folder {root / d} has no images "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        empty = [c for c, paths in files[d].items() if not paths]
        if empty:
            raise DataError(f"class folder {root / d / empty[0]} has no images")
        per_domain[d] = names

    if any(names != per_domain[chosen[0]] for names in per_domain.values()):
        raise DataError(_class_mismatch(root, per_domain))
    classes = tuple(per_domain[chosen[0]])
    label = {c: i for i, c in enumerate(classes)}
    records = {
        d: [
            ImageRecord(path=p, label=label[c], class_name=c, domain=d)
            for c in classes
            for p in files[d][c]
        ]
        for d in chosen
    }
    for d in chosen:
        records[d].sort(key=lambda r: r.path.as_posix())
    return DomainDataset(root=root, domains=chosen, classes=classes, records=records)


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB, fully decoded now so a corrupt file fails here, by name."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (
        OSError,
        SyntaxError,
        ValueError,
        UnidentifiedImageError,
        Image.DecompressionBombError,
    ) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read image {path}: {reason}") from exc
