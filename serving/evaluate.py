"""Accuracy of a kept model two ways: in torch on cached features, and through a classifier on the
image files (the fused ONNX graph). The demo reports both so that a reader sees the deployed
graph answer as the adapter that was trained and gated (issue 17, item 6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.serving.store import ModelVersion
from fedclip_edge.train import predict


@dataclass(frozen=True)
class Scored:
    """Per-image predictions (class names) and the accuracy over those with a prediction."""

    predicted: list[str | None]  # None: the image was rejected (unreadable)
    truth: list[str]

    @property
    def correct(self) -> int:
        return sum(p == t for p, t in zip(self.predicted, self.truth, strict=True))

    @property
    def n(self) -> int:
        return len(self.truth)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")


def score_version(version: ModelVersion, features: torch.Tensor, labels: torch.Tensor,
                  class_names: Sequence[str]) -> Scored:
    """The version's adapter and text features on raw cached features (labels index
    `class_names`, the cache's classes; the version's own classes name its predictions)."""
    state, text, _ = version.load()
    adapter = AttentionAdapter(version.dim)
    adapter.load_state_dict(state)
    idx = predict(adapter, features, text)
    names = version.classes
    return Scored([names[int(i)] for i in idx], [class_names[int(y)] for y in labels])


def score_classifier(classifier: Any, images: Sequence[Path], truth: Sequence[str],
                     batch: int = 32) -> Scored:
    """A serving classifier (`open_classifier`) on image files, `batch` at a time."""
    predicted: list[str | None] = []
    for start in range(0, len(images), batch):
        chunk = [Path(p).read_bytes() for p in images[start : start + batch]]
        for answer in classifier.classify(chunk, top_k=1):
            predicted.append(getattr(answer, "label", None))
    return Scored(predicted, list(truth))
