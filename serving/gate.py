"""The gate a new model passes before a device serves it (issue 17, item 2).

Pure functions over accuracies measured on the device's own validation split, so a reader can
check each decision by hand. Why a gate: a federation round can make a device worse (its domain
is a minority, a round diverged); a device should keep serving what works for it, and say why it
did not switch.

The rule:
- the candidate is the personalized version when it is strictly better than the global one on
  the split (a tie keeps the global one: the federation's model, not a local copy), else global;
- it becomes current only if its accuracy is at least max(current's, zero-shot's) - margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedclip_edge.errors import ConfigError

# the agent's defaults (`--personalize-epochs`, `--promote-margin`); here, light to import
DEFAULT_PERSONALIZE_EPOCHS = 5
DEFAULT_PROMOTE_MARGIN = 0.0

# accuracies are k/n: compare with a tolerance so 0.7 - 0.1 >= 0.6 holds as it does on paper
EPS = 1e-9


@dataclass(frozen=True)
class GateDecision:
    """`promote`: the kind to make current ("global" or "personal"), or None to keep what is
    current; `reasons`: one line per kind measured, saying what happened to it and why."""

    promote: str | None
    candidate: str
    reasons: dict[str, str]


def check_margin(margin: float) -> float:
    if not isinstance(margin, (int, float)) or not math.isfinite(margin) or not 0 <= margin < 1:
        raise ConfigError(f"--promote-margin {margin!r}: a fraction in [0, 1) (0.02 = 2 points)")
    return float(margin)


def _p(x: float) -> str:
    return f"{x:.1%}"


def choose_candidate(global_acc: float, personal_acc: float | None) -> str:
    """ "personal" only when it is strictly better on the split (nan is never better)."""
    if personal_acc is None or math.isnan(personal_acc):
        return "global"
    if math.isnan(global_acc) or personal_acc > global_acc + EPS:
        return "personal"
    return "global"


def decide(
    *,
    zero_shot: float,
    global_acc: float,
    personal_acc: float | None = None,
    current_acc: float | None = None,
    current_name: str | None = None,
    margin: float = 0.0,
) -> GateDecision:
    """Which kind (if any) becomes current. `current_acc` is the current version's accuracy on
    the same split (None: no current version, or one for other classes that cannot be measured
    here). A validation split with no images (nan accuracies) promotes nothing."""
    margin = check_margin(margin)
    candidate = choose_candidate(global_acc, personal_acc)
    acc = personal_acc if candidate == "personal" else global_acc
    reasons: dict[str, str] = {}
    if personal_acc is not None:
        if candidate == "personal":
            reasons["global"] = (
                f"global kept, not promoted: the personalized adapter is better on val "
                f"({_p(personal_acc)} vs {_p(global_acc)})"
            )
        else:
            reasons["personal"] = (
                f"personal kept, not promoted: not better than the global adapter on val "
                f"({_p(personal_acc)} vs {_p(global_acc)})"
            )
    assert acc is not None
    if math.isnan(acc):
        reasons[candidate] = f"{candidate} kept, not promoted: no validation images to measure it"
        return GateDecision(None, candidate, reasons)
    bars = [("zero-shot", zero_shot)]
    if current_acc is not None and not math.isnan(current_acc):
        bars.append((f"current {current_name or 'version'}", current_acc))
    for label, bar in bars:
        if not math.isnan(bar) and acc < bar - margin - EPS:
            reasons[candidate] = (
                f"{candidate} kept, not promoted: val {_p(acc)} is {100 * (bar - acc):.1f} points "
                f"below {label} ({_p(bar)}), more than the margin {100 * margin:.1f}"
            )
            return GateDecision(None, candidate, reasons)
    against = ", ".join(f"{label} {_p(bar)}" for label, bar in bars)
    if current_name is not None and (current_acc is None or math.isnan(current_acc)):
        against += f", current {current_name} not comparable (other classes)"
    reasons[candidate] = (
        f"{candidate} promoted: val {_p(acc)} (vs {against}; margin {100 * margin:.1f} points)"
    )
    return GateDecision(candidate, candidate, reasons)
