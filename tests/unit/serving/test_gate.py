"""The promotion gate (serving/gate.py): every case a number a reader can check by hand.
Accuracies are k/20 (a 20-image validation split), margins in points."""

from __future__ import annotations

import math

import pytest

from fedclip_edge.errors import ConfigError
from fedclip_edge.serving.gate import choose_candidate, decide


def test_personal_only_when_strictly_better() -> None:
    assert choose_candidate(0.60, 0.65) == "personal"
    assert choose_candidate(0.60, 0.60) == "global"  # a tie keeps the federation's model
    assert choose_candidate(0.60, 0.55) == "global"
    assert choose_candidate(0.60, None) == "global"
    assert choose_candidate(0.60, math.nan) == "global"


def test_first_model_on_a_device_against_zero_shot() -> None:
    d = decide(zero_shot=0.50, global_acc=0.60, personal_acc=0.70)
    assert (d.promote, d.candidate) == ("personal", "personal")
    assert (
        d.reasons["personal"]
        == "personal promoted: val 70.0% (vs zero-shot 50.0%; margin 0.0 points)"
    )
    assert d.reasons["global"] == (
        "global kept, not promoted: the personalized adapter is better on val (70.0% vs 60.0%)"
    )


def test_not_promoted_below_zero_shot_beyond_the_margin() -> None:
    # 0.55 is 5 points below zero-shot 0.60: kept with margin 0.02, promoted with margin 0.05
    d = decide(zero_shot=0.60, global_acc=0.55, personal_acc=0.50, margin=0.02)
    assert d.promote is None and d.candidate == "global"
    assert d.reasons["global"] == (
        "global kept, not promoted: val 55.0% is 5.0 points below zero-shot (60.0%), "
        "more than the margin 2.0"
    )
    assert d.reasons["personal"].startswith("personal kept, not promoted: not better than")
    assert decide(zero_shot=0.60, global_acc=0.55, margin=0.05).promote == "global"  # exactly at


def test_against_the_current_version() -> None:
    kw = {"zero_shot": 0.40, "current_name": "v0002-personal", "current_acc": 0.75}
    d = decide(global_acc=0.65, personal_acc=0.70, margin=0.02, **kw)
    assert d.promote is None
    assert d.reasons["personal"] == (
        "personal kept, not promoted: val 70.0% is 5.0 points below current v0002-personal "
        "(75.0%), more than the margin 2.0"
    )
    d = decide(global_acc=0.65, personal_acc=0.70, margin=0.05, **kw)  # 5 points: within
    assert d.promote == "personal"
    assert "vs zero-shot 40.0%, current v0002-personal 75.0%" in d.reasons["personal"]
    assert decide(global_acc=0.80, personal_acc=0.75, **kw).promote == "global"


def test_a_current_for_other_classes_is_not_a_bar() -> None:
    d = decide(zero_shot=0.40, global_acc=0.50, current_name="v0001-global", current_acc=None)
    assert d.promote == "global"
    assert "current v0001-global not comparable (other classes)" in d.reasons["global"]


def test_global_only_and_empty_split() -> None:
    d = decide(zero_shot=0.5, global_acc=0.5)
    assert d.promote == "global" and set(d.reasons) == {"global"}
    d = decide(zero_shot=math.nan, global_acc=math.nan, personal_acc=math.nan)
    assert d.promote is None and "no validation images" in d.reasons["global"]


@pytest.mark.parametrize("margin", [-0.01, 1.0, math.nan, 5])
def test_margin_must_be_a_fraction(margin: float) -> None:
    with pytest.raises(ConfigError, match="--promote-margin"):
        decide(zero_shot=0.5, global_acc=0.5, margin=margin)
