"""keep_models (serving/keep.py): what a device writes and promotes at the end of a job. The gate's
arithmetic is hand-checked in test_gate.py; here: the versions written, their manifests, that the
recorded accuracies are the stored adapters' accuracies, and the pointer after each job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.config import TrainConfig
from fedclip_edge.errors import ConfigError
from fedclip_edge.serving import keep as keep_mod
from fedclip_edge.serving.gate import decide
from fedclip_edge.serving.keep import artifact_record, keep_models
from fedclip_edge.serving.store import ModelStore
from fedclip_edge.train import accuracy

D, C, N = 16, 4, 200
CLASSES = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=-1)
    labels = torch.arange(N) % C
    shift = torch.zeros(D)
    shift[:4] = 1.5
    feats = text[labels] + 0.35 * torch.randn(N, D, generator=g) + shift
    torch.manual_seed(0)
    good = AttentionAdapter(D).state_dict()
    # a "bad" global: attention only on the 4 shifted channels, where every class looks alike
    bad = {k: v.clone() for k, v in good.items()}
    bad["fea_attn.2.weight"] = torch.zeros(D, D)
    bad["fea_attn.2.bias"] = torch.cat([torch.full((4,), 20.0), torch.zeros(D - 4)])
    return {
        "text": text,
        "train": (feats[:120], labels[:120]),
        "val": (feats[120:160], labels[120:160]),
        "good": good,
        "bad": bad,
    }


def _acc(state, data) -> float:
    a = AttentionAdapter(D)
    a.load_state_dict(state)
    return accuracy(a, *data["val"], data["text"])


def _keep(store, data, state, **kw):
    lines: list[str] = []
    kept = keep_models(
        store,
        global_state=state,
        text_features=data["text"],
        classes=CLASSES,
        logit_scale=100.0,
        train=data["train"],
        val=data["val"],
        train_cfg=TrainConfig().with_overrides(lr=1e-3),
        provenance={
            "job": "job-1",
            "round": 7,
            "client_id": "dev-a",
            "global_sha256": "ab" * 32,
            "signature_checked": True,
            "artifact": {"path": "/x"},
        },
        generator=torch.Generator().manual_seed(1),
        log=lines.append,
        **kw,
    )
    return kept, lines


def test_the_scene(data) -> None:
    """The fixture's numbers the other tests rely on (40 validation images)."""
    zs = accuracy(None, *data["val"], data["text"])
    assert (zs, _acc(data["good"], data), _acc(data["bad"], data)) == pytest.approx(
        (0.65, 0.575, 0.25)
    )


def test_writes_both_versions_with_their_provenance(tmp_path: Path, data) -> None:
    store = ModelStore(tmp_path / "m")
    kept, lines = _keep(store, data, data["good"], personalize_epochs=5, promote_margin=0.1)
    g, p = kept.global_version, kept.personal_version
    assert (g.name, p.name) == ("v0001-global", "v0002-personal")
    for v in (g, p):
        m = v.manifest
        assert (m["job"], m["round"], m["client_id"], m["signature_checked"]) == (
            "job-1",
            7,
            "dev-a",
            True,
        )
        assert m["global_sha256"] == "ab" * 32 and m["classes"] == CLASSES
        assert m["artifact"] == {"path": "/x"} and m["accuracy"]["n"] == 40
    assert p.manifest["personalize_epochs"] == 5 and "personalize_epochs" not in g.manifest
    # the recorded accuracies are those of the stored adapters on the split
    acc = g.manifest["accuracy"]
    assert acc["zero_shot"] == pytest.approx(0.65) and acc["global"] == pytest.approx(0.575)
    assert acc["global"] == pytest.approx(_acc(g.load()[0], data))
    assert acc["personal"] == pytest.approx(_acc(p.load()[0], data))
    # the stored global is the global given, bit for bit
    assert all(torch.equal(g.load()[0][k], data["good"][k]) for k in data["good"])
    # the decision is the gate's on those numbers, recorded in the manifests and the log
    d = decide(
        zero_shot=acc["zero_shot"],
        global_acc=acc["global"],
        personal_acc=acc["personal"],
        margin=0.1,
    )
    assert kept.decision == d and d.promote is not None
    promoted = p if d.promote == "personal" else g
    assert [v.manifest["gate_candidate"] for v in (g, p)] == [d.candidate == "global",
                                                             d.candidate == "personal"]
    assert kept.current == store.current_name() == promoted.name
    assert (
        promoted.manifest["promoted"] is True and promoted.manifest["gate"] == d.reasons[d.promote]
    )
    assert lines == [
        f"model {g.name}: {d.reasons['global']}",
        f"model {p.name}: {d.reasons['personal']}",
    ]
    assert store.history()[-1]["reason"] == d.reasons[d.promote]


def test_a_worse_global_is_kept_not_promoted_then_a_good_one_is(tmp_path: Path, data) -> None:
    store = ModelStore(tmp_path / "m")
    first, _ = _keep(store, data, data["good"], personalize_epochs=0, promote_margin=0.1)
    assert first.current == "v0001-global" and first.personal_version is None
    # bad global: 25% < max(current 57.5%, zero-shot 65%) - 10 points -> kept
    kept, lines = _keep(store, data, data["bad"], personalize_epochs=0, promote_margin=0.1)
    assert kept.decision.promote is None and store.current_name() == "v0001-global"
    assert lines == [
        "model v0002-global: global kept, not promoted: val 25.0% is 40.0 points "
        "below zero-shot (65.0%), more than the margin 10.0"
    ]
    m = kept.global_version.manifest
    assert m["promoted"] is False and m["compared_with"]["name"] == "v0001-global"
    assert m["compared_with"]["val_accuracy"] == pytest.approx(0.575)
    # the good one again: 57.5% is within 10 points of zero-shot and equal to current
    kept, _ = _keep(store, data, data["good"], personalize_epochs=0, promote_margin=0.1)
    assert store.current_name() == "v0003-global" == kept.current
    # margin 0: 57.5% is below zero-shot's 65% -> not promoted
    kept, _ = _keep(store, data, data["good"], personalize_epochs=0, promote_margin=0.0)
    assert kept.decision.promote is None and store.current_name() == "v0003-global"


def test_the_personalized_version_wins_only_when_better(tmp_path: Path, data, monkeypatch) -> None:
    """With personalization made deterministic (it returns the good adapter): from the bad
    global, personal (57.5%) > global (25%): personal is promoted."""

    def fake_personalize(state, features, labels, text, cfg, epochs, **kw):
        a = AttentionAdapter(D)
        a.load_state_dict(data["good"])
        return a

    monkeypatch.setattr(keep_mod, "personalize", fake_personalize)
    store = ModelStore(tmp_path / "m")
    kept, lines = _keep(store, data, data["bad"], personalize_epochs=3, promote_margin=0.1)
    assert kept.decision.promote == "personal" and store.current_name() == "v0002-personal"
    assert lines[0] == (
        "model v0001-global: global kept, not promoted: the personalized adapter "
        "is better on val (57.5% vs 25.0%)"
    )
    assert lines[1].startswith("model v0002-personal: personal promoted: val 57.5%")


def test_a_current_for_other_classes_is_not_compared(tmp_path: Path, data) -> None:
    store = ModelStore(tmp_path / "m")
    v = store.add(data["good"], torch.randn(2, D), {"kind": "global", "classes": ["x", "y"]})
    store.promote(v.name, "old job")
    kept, lines = _keep(store, data, data["good"], personalize_epochs=0, promote_margin=0.1)
    assert kept.current == "v0002-global"
    assert "current v0001-global not comparable (other classes)" in lines[0]


def test_bad_options(tmp_path: Path, data) -> None:
    with pytest.raises(ConfigError, match="--promote-margin"):
        _keep(tmp_path / "m", data, data["good"], promote_margin=2.0)
    assert not (tmp_path / "m").exists()


def test_artifact_record(tmp_path: Path) -> None:
    raw = json.dumps(
        {"model": {"name": "fedclip-tiny", "weights_sha256": "w"}, "precision": "fp32"}
    ).encode()
    (tmp_path / "manifest.json").write_bytes(raw)
    rec = artifact_record(tmp_path)
    assert rec["model"] == "fedclip-tiny" and rec["precision"] == "fp32"
    assert rec["weights_sha256"] == "w" and rec["path"] == str(tmp_path.resolve())
    import hashlib

    assert rec["manifest_sha256"] == hashlib.sha256(raw).hexdigest()
