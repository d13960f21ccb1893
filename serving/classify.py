"""`classify`'s work: files and folders in, one row per image, an accuracy per labelled folder.

A folder is walked for image files (by suffix, hidden entries skipped); an image two or more
levels below the folder given is labelled by its parent folder's name (the ImageFolder layout,
`FOLDER/CLASS/x.jpg`, and also the project's `DOMAIN/CLASS/x.png`), and the folder gets an
accuracy over its labelled images. A file named on the command line is always tried, whatever its
suffix. A file that does not decode, or a path that does not exist, is a row with its error; the
rest goes on. Images are decoded and predicted in batches of the classifier's max batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclip_edge.serving.classifier import Classifier, ImageRejected, Prediction

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)


@dataclass
class Item:
    """One image to classify: where it is, which argument it came from, its folder label."""

    path: Path
    source: Path
    truth: str | None = None


@dataclass
class Row:
    """One image's outcome: a prediction or an error."""

    item: Item
    prediction: Prediction | None = None
    error: str | None = None

    @property
    def correct(self) -> bool | None:
        if self.item.truth is None or self.prediction is None:
            return None
        return self.prediction.label == self.item.truth

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": str(self.item.path)}
        if self.prediction is not None:
            d.update(self.prediction.to_dict())
        else:
            d["error"] = self.error
        if self.item.truth is not None:
            d["truth"] = self.item.truth
        return d


@dataclass
class FolderAccuracy:
    """Accuracy over one folder argument's labelled images."""

    folder: Path
    correct: int
    total: int
    errors: int
    unknown_labels: list[str]

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def line(self) -> str:
        acc = "-" if self.accuracy is None else f"{100 * self.accuracy:.1f}%"
        text = f"{self.folder}: accuracy {acc} ({self.correct}/{self.total} labelled images)"
        if self.errors:
            text += f", {self.errors} not classified"
        if self.unknown_labels:
            text += (f"; folders the model has no class for (always wrong): "
                     f"{', '.join(self.unknown_labels)}")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "accuracy": self.accuracy, "correct": self.correct,
                "total": self.total, "not_classified": self.errors,
                "unknown_labels": self.unknown_labels}


def collect(paths: Iterable[Path]) -> tuple[list[Item], list[Row]]:
    """Images to classify, and rows for paths that do not exist."""
    items: list[Item] = []
    missing: list[Row] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                rel = f.relative_to(path)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    truth = f.parent.name if len(rel.parts) >= 2 else None
                    items.append(Item(f, path, truth))
        elif path.exists():
            items.append(Item(path, path))
        else:
            missing.append(Row(Item(path, path), error="no such file or folder"))
    return items, missing


def classify_items(
    classifier: Classifier,
    items: list[Item],
    *,
    top_k: int = 3,
    on_row: Callable[[Row], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[Row]:
    """Decode and predict in batches; every item gets a row, in order."""
    rows: list[Row] = []
    step = classifier.max_batch
    for start in range(0, len(items), step):
        chunk = items[start : start + step]
        blobs: list[bytes | None] = []
        read_errors: dict[int, str] = {}
        for i, item in enumerate(chunk):
            try:
                blobs.append(item.path.read_bytes())
            except OSError as exc:
                blobs.append(None)
                read_errors[i] = f"cannot read: {exc.strerror or exc}"
        results = classifier.classify([b if b is not None else b"" for b in blobs], top_k)
        for i, (item, res) in enumerate(zip(chunk, results, strict=True)):
            if i in read_errors:
                row = Row(item, error=read_errors[i])
            elif isinstance(res, ImageRejected):
                row = Row(item, error=res.reason)
            else:
                row = Row(item, prediction=res)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        if advance is not None:
            advance(len(chunk))
    return rows


def accuracies(rows: list[Row], classes: list[str]) -> list[FolderAccuracy]:
    """One FolderAccuracy per folder argument that holds labelled images."""
    known = set(classes)
    by_folder: dict[Path, list[Row]] = {}
    for row in rows:
        if row.item.truth is not None:
            by_folder.setdefault(row.item.source, []).append(row)
    out = []
    for folder, group in by_folder.items():
        done = [r for r in group if r.prediction is not None]
        out.append(FolderAccuracy(
            folder=folder,
            correct=sum(1 for r in done if r.correct),
            total=len(done),
            errors=len(group) - len(done),
            unknown_labels=sorted({r.item.truth for r in group if r.item.truth not in known}),
        ))
    return out
