"""Message fields: every number and text a message carries, typed and bounded at decoding.

A value outside these bounds is refused with `MessageRejected("fields")`, so nothing downstream
(float(), torch.manual_seed, allocations by dim) sees it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedclip_edge.broker.envelope import MessageRejected, _is_int
from fedclip_edge.broker.topics import _ID_RE


def _need(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    v = header.get(key)
    ok = _is_int(v) if kind is int else isinstance(v, kind) and not isinstance(v, bool)
    if not ok:
        raise MessageRejected("fields", f"{header.get('type')} field {key!r} is missing or wrong")
    return v


MAX_ROUND = 2**31 - 1
MAX_SAMPLES = 10**9
MAX_DIM = 65536
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.manual_seed takes
MAX_SECONDS = 1e7
MAX_METRIC = 1e15  # |value| of a numeric metric (bytes, seconds, accuracies, losses)
MAX_TEXT = 256
MAX_ENTRIES = 64  # keys of samples / versions / metrics / train
MAX_HAVE = 100_000  # client ids a global lists
# The only metric that may be text; every other metric is a number or null.
TEXT_METRICS = frozenset({"backend", "update_codec", "update_dtype", "site_weighting"})


def _int_field(header: Mapping[str, Any], key: str, lo: int, hi: int, default: Any = ...) -> int:
    """An integer in [lo, hi]; `default` (when given) if the key is absent."""
    v = header.get(key, default) if default is not ... else header.get(key)
    if not _is_int(v) or not lo <= v <= hi:
        raise MessageRejected(
            "fields", f"{header.get('type')} field {key!r} must be an integer in [{lo}, {hi}]"
        )
    return v


def _text_field(header: Mapping[str, Any], key: str, default: Any = ..., *, ident: bool = False):
    """A string of at most MAX_TEXT characters; with `ident`, a job or client id."""
    v = header.get(key, default) if default is not ... else header.get(key)
    ok = isinstance(v, str) and len(v) <= MAX_TEXT and (not ident or bool(_ID_RE.match(v)))
    if not ok:
        what = "an id (1-64 of A-Z a-z 0-9 _ . -)" if ident else f"a string of <= {MAX_TEXT}"
        raise MessageRejected("fields", f"{header.get('type')} field {key!r} must be {what}")
    return v


def _is_number(v: Any, bound: float) -> bool:
    """A finite int or float with |v| <= bound (JSON's 1e400 parses to inf; 10**400 is an int)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    if isinstance(v, int):
        return -bound <= v <= bound
    return math.isfinite(v) and abs(v) <= bound


def _flat_object(header: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = header.get(key)
    if v is None:
        return {}
    if (
        not isinstance(v, dict)
        or len(v) > MAX_ENTRIES
        or not all(isinstance(k, str) and 0 < len(k) <= MAX_TEXT for k in v)
    ):
        raise MessageRejected(
            "fields", f"{header.get('type')} field {key!r} must be an object of <= {MAX_ENTRIES}"
        )
    return v


def _check_metrics(metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
        if v is None or _is_number(v, MAX_METRIC):
            continue
        if k in TEXT_METRICS and isinstance(v, str) and len(v) <= MAX_TEXT:
            continue
        raise MessageRejected(
            "fields", f"update metric {k!r} must be a finite number of magnitude <= {MAX_METRIC:g}"
        )


def _check_train(train: Mapping[str, Any]) -> None:
    """Training settings as plain values (their meaning is checked by the agent's TrainConfig)."""
    for k, v in train.items():
        if v is None or isinstance(v, bool) or _is_number(v, MAX_METRIC):
            continue
        if isinstance(v, str) and len(v) <= MAX_TEXT:
            continue
        if isinstance(v, list) and len(v) <= 8 and all(_is_number(x, MAX_METRIC) for x in v):
            continue
        raise MessageRejected("fields", f"global 'train' setting {k!r} has a value out of range")
