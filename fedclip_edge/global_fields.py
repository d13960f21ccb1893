"""The fields a compressed global's envelope carries, checked without torch.

Why apart from `global_codec`: the message parser (`broker.messages`) stays free of torch; this
module needs only the codec names.
"""

from __future__ import annotations

from typing import Any

# As fedclip_edge.codecs.CODECS (a test keeps them equal): that module imports torch.
CODECS: tuple[str, ...] = ("fp32", "fp16", "delta-fp16", "int8", "topk", "topk-int8")

_DELTA_KEYS = frozenset({"codec", "base_round", "digest"})

# Round 1's global when the device makes it itself (`global_codec.derive_initial` from the
# global's signed seed and the adapter width): the envelope's frame is empty, its `delta` is
# {"codec": DERIVED, "base_round": 0, "digest": the aggregator's global}.
DERIVED = "derived"
# What a device (or site) that can derive says in its hello's `versions`: the aggregator derives
# round 1 only when every active client says so (an older one gets round 1 dense, as before).
DERIVE_KEY, DERIVE_VERSION = "derive_initial", "1"


def check_delta_fields(d: Any) -> dict[str, Any]:
    """A global envelope's `delta` ({codec, base_round, digest}) from the network, checked;
    ValueError (one line) otherwise."""
    if not isinstance(d, dict) or set(d) != _DELTA_KEYS:
        raise ValueError(f"must be an object with exactly {sorted(_DELTA_KEYS)}")
    if (d["codec"] not in CODECS and d["codec"] != DERIVED) or d["codec"] == "fp32":
        raise ValueError(f"unknown global codec {str(d['codec'])[:40]!r}")
    base = d["base_round"]
    if not isinstance(base, int) or isinstance(base, bool) or not 0 <= base < 2**31:
        raise ValueError("base_round must be a round number")
    if d["codec"] == DERIVED and base != 0:
        raise ValueError("a derived global has base_round 0 (the seed's)")
    digest = d["digest"]
    if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise ValueError("digest must be 64 lowercase hex digits (sha256)")
    return {"codec": d["codec"], "base_round": base, "digest": digest}
