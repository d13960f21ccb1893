"""Parity of an exported encoder against PyTorch fp32: the numbers an export must meet.

Two measures, on two kinds of input:
- minimum cosine similarity between each image's exported and PyTorch features (the bound),
  plus a "centered" cosine (both sides minus the PyTorch batch mean) that is recorded, not
  gated: with random weights CLIP features share a large common part, and the centered number
  shows how well the image-dependent part survives;
- agreement of zero-shot top-1 predictions against the class prompts' text features.
Inputs: real images (the project's synthetic dataset, preprocessed exactly as on the device) and
random tensors (inputs outside the image range, where overflow shows first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedclip_edge.errors import ExportError


@dataclass(frozen=True)
class Bound:
    """What a precision must reach against PyTorch fp32."""

    min_cosine: float
    min_top1_agreement: float


BOUNDS: dict[str, Bound] = {
    "fp32": Bound(min_cosine=0.9999, min_top1_agreement=0.99),
    "fp16": Bound(min_cosine=0.999, min_top1_agreement=0.99),
    "int8": Bound(min_cosine=0.99, min_top1_agreement=0.95),
}


def bound_for(precision: str) -> Bound:
    """The parity bound of a precision (ExportError for an unknown one)."""
    try:
        return BOUNDS[precision]
    except KeyError:
        raise ExportError(f"unknown precision {precision!r} (fp32, fp16, int8)") from None


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows, in float64."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ExportError(f"feature shapes differ: {a.shape} vs {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return np.full(a.shape[0], -1.0)  # inf/nan (an fp16 overflow) counts as a total miss
    return np.sum(_unit(a) * _unit(b), axis=-1)


def zero_shot_top1(features: np.ndarray, class_features: np.ndarray) -> np.ndarray:
    """Index of the best-matching class prompt for each row (both sides L2-normalized)."""
    return np.argmax(_unit(features) @ _unit(class_features).T, axis=-1)


def measure(
    reference: np.ndarray, candidate: np.ndarray, class_features: np.ndarray | None
) -> dict[str, Any]:
    """Parity numbers of one input set."""
    cos = cosine_rows(reference, candidate)
    ref = np.asarray(reference, dtype=np.float64)
    mean = ref.mean(axis=0, keepdims=True)
    centered = cosine_rows(ref - mean, np.asarray(candidate, dtype=np.float64) - mean)
    out: dict[str, Any] = {
        "count": int(ref.shape[0]),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "min_cosine_centered": float(centered.min()) if ref.shape[0] > 1 else None,
        "top1_agreement": None,
    }
    if class_features is not None and len(class_features):
        same = zero_shot_top1(reference, class_features) == zero_shot_top1(
            candidate, class_features
        )
        out["top1_agreement"] = float(same.mean())
        out["distinct_reference_predictions"] = int(
            len(np.unique(zero_shot_top1(reference, class_features)))
        )
    return out


def report(
    sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    class_features: np.ndarray | None,
    precision: str,
    measured_on: str,
    agreement_on: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Parity over several named input sets, with the overall numbers and the verdict.

    Cosine gates on the minimum over every set. Top-1 agreement gates on the sets named in
    `agreement_on` (default: all) pooled together: a rate over a batch of 1 or 8 is too coarse.
    """
    bound = bound_for(precision)
    pooled = list(sets) if agreement_on is None else [n for n in agreement_on if n in sets]
    per_set = {
        name: measure(ref, cand, class_features if name in pooled else None)
        for name, (ref, cand) in sets.items()
    }
    min_cos = min(s["min_cosine"] for s in per_set.values())
    agreement = None
    agreement_count = 0
    if class_features is not None and len(class_features) and pooled:
        ref = np.concatenate([sets[n][0] for n in pooled])
        cand = np.concatenate([sets[n][1] for n in pooled])
        agreement = float(
            np.mean(zero_shot_top1(ref, class_features) == zero_shot_top1(cand, class_features))
        )
        agreement_count = int(len(ref))
    passed = min_cos >= bound.min_cosine and (
        agreement is None or agreement >= bound.min_top1_agreement
    )
    return {
        "status": "passed" if passed else "failed",
        "measured_on": measured_on,
        "reference": "PyTorch fp32 on CPU",
        "bound": asdict(bound),
        "min_cosine": min_cos,
        "top1_agreement": agreement,
        "top1_agreement_over": {"sets": pooled, "count": agreement_count},
        "sets": per_set,
    }


def describe_failure(rep: Mapping[str, Any], what: str) -> str:
    """One line with the numbers that missed."""
    b = rep["bound"]
    parts = [f"min cosine {rep['min_cosine']:.6f} (bound {b['min_cosine']})"]
    if rep.get("top1_agreement") is not None:
        parts.append(
            f"top-1 agreement {100 * rep['top1_agreement']:.1f}% "
            f"(bound {100 * b['min_top1_agreement']:.0f}%)"
        )
    return f"{what} misses its parity bound: " + ", ".join(parts)


def require(rep: Mapping[str, Any], what: str) -> None:
    """Raise ExportError with the numbers unless the report passed."""
    if rep["status"] != "passed":
        raise ExportError(describe_failure(rep, what))


def synthetic_images(size: int, per_domain: int = 8, seed: int = 1234) -> list[Any]:
    """Rendered images of the project's synthetic dataset: every domain, cycling classes."""
    from fedclip_edge.data import synth

    images = []
    k = 0
    for domain in synth.DOMAINS:
        for i in range(per_domain):
            cls = synth.CLASSES[k % len(synth.CLASSES)]
            images.append(synth.render(domain, cls, seed, i, size=size))
            k += 1
    return images


def random_inputs(count: int, image_size: Sequence[int], seed: int = 4321) -> np.ndarray:
    """Random preprocessed-space tensors: standard normal (wider than any real image)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((count, 3, *image_size)).astype(np.float32)
