"""Parity of a fused classifier against the torch composition (see exporters/fused.py).

The reference is the PyTorch AttentionAdapter and the class matrix applied in float32 to the
encoder's reference features; the candidate is the fused graph's logits. Top-1 agreement
(pooled over every input set) is gated; logit and probability differences are recorded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedclip_edge.exporters import parity

# Top-1 agreement with the torch composition an export must reach (pooled over every input).
FUSED_AGREEMENT = {"fp32": 1.0, "fp16": 0.99, "int8": 0.99}


def torch_composition(
    state: dict[str, np.ndarray], class_matrix: np.ndarray, features: np.ndarray
) -> np.ndarray:
    """The reference logits: PyTorch AttentionAdapter, then @ class matrix, in float32."""
    import torch

    from fedclip_edge.adapter import AttentionAdapter

    adapter = AttentionAdapter(class_matrix.shape[0]).eval()
    adapter.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
    with torch.no_grad():
        g = adapter(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return (g @ torch.from_numpy(class_matrix)).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def fused_parity(
    ref_logits: dict[str, np.ndarray],
    cand_logits: dict[str, np.ndarray],
    precision: str,
    where: str,
    pooled_sets: list[str] | None = None,
) -> dict[str, Any]:
    """Per-set and pooled agreement, logit and probability differences, and the verdict."""
    per_set: dict[str, Any] = {}
    agree_all: list[np.ndarray] = []
    pooled_names = list(ref_logits) if pooled_sets is None else pooled_sets
    for name in ref_logits:
        ref, got = ref_logits[name], cand_logits[name]
        same = ref.argmax(1) == got.argmax(1)
        if name in pooled_names:
            agree_all.append(same)
        finite = bool(np.all(np.isfinite(got)))
        per_set[name] = {
            "count": int(len(ref)),
            "top1_agreement": float(same.mean()),
            "max_abs_logit_diff": float(np.abs(ref - got).max()) if finite else None,
            "max_abs_prob_diff": float(np.abs(softmax(ref) - softmax(got)).max())
            if finite
            else None,
            "min_cosine_logits": float(parity.cosine_rows(ref, got).min()),
            "distinct_reference_predictions": int(len(np.unique(ref.argmax(1)))),
        }
    pooled = np.concatenate(agree_all)
    bound = FUSED_AGREEMENT[precision]
    agreement = float(pooled.mean())
    diffs = [s["max_abs_prob_diff"] for s in per_set.values()]
    ok = agreement >= bound and None not in diffs  # None: non-finite logits somewhere
    if bound >= 1.0:  # fp32: every set, the single-image and max-batch runs included
        ok = ok and all(s["top1_agreement"] == 1.0 for s in per_set.values())
    return {
        "status": "passed" if ok else "failed",
        "measured_on": where,
        "reference": "torch composition: PyTorch AttentionAdapter and class matrix (float32) on "
        "the encoder's reference features",
        "bound": {"min_top1_agreement": bound},
        "top1_agreement": agreement,
        "top1_agreement_over": {"sets": pooled_names, "count": int(len(pooled))},
        "max_abs_prob_diff": max((d for d in diffs if d is not None), default=None),
        "sets": per_set,
    }
