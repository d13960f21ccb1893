"""Did-you-mean for mistyped names (models, tags, domains, presets, config keys).

A user who types `ViT-B-3` should read one line that names the closest real choice, not a
list of a hundred architectures or a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """`" (did you mean 'ViT-B-32'?)"`, or "" when nothing is close. Case-insensitive match,
    the suggestion spelled as the choice is."""
    options = [str(c) for c in choices]
    by_lower: dict[str, str] = {}
    for c in options:
        by_lower.setdefault(c.lower(), c)
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=3, cutoff=cutoff)
    if not close:
        return ""
    # only the near-ties of the best match: 'min_client' -> 'min_clients', not 'wait_clients'
    score = {c: difflib.SequenceMatcher(None, str(name).lower(), c).ratio() for c in close}
    best = max(score.values())
    close = [c for c in close if score[c] >= best - 0.05]
    quoted = " or ".join(f"'{by_lower[c]}'" for c in close)
    return f" (did you mean {quoted}?)"


def unknown_name(kind: str, name: str, choices: Iterable[str], listing: str | None = None) -> str:
    """The one-line message for an unknown name: what was wrong, the closest choices, and
    either all choices (when few) or the command that lists them."""
    options = list(choices)
    msg = f"unknown {kind} {name!r}{did_you_mean(name, options)}"
    if listing:
        return f"{msg}; list them with `{listing}`"
    if options:
        return f"{msg}; choose one of {', '.join(options)}"
    return msg
