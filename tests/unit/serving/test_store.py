"""The model store (serving/store.py): versions appear whole or not at all, `current` moves only
by promote/rollback (each one history line), and a corrupt or foreign version is refused with one
line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.errors import ModelStoreError
from fedclip_edge.serving import store as store_mod
from fedclip_edge.serving.store import (
    ModelStore,
    load_version,
    resolve_model,
)

DIM = 8
CLASSES = ["dog", "cat", "car"]


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return AttentionAdapter(DIM).state_dict()


def _text(n: int = len(CLASSES), dim: int = DIM) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(1))


def _fields(kind: str = "global", **extra) -> dict:
    return {
        "kind": kind,
        "job": "j1",
        "round": 3,
        "client_id": "dev-1",
        "classes": CLASSES,
        "accuracy": {"split": "val", "n": 10, "zero_shot": 0.5, "global": 0.6},
        **extra,
    }


def _add(store: ModelStore, kind: str = "global", seed: int = 0):
    return store.add(_state(seed), _text(), _fields(kind))


def test_add_writes_a_checked_version_that_loads_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "m")
    v = _add(store)
    assert v.name == "v0001-global" and v.path == (tmp_path / "m/versions/v0001-global").resolve()
    assert v.manifest["format"] == "fedclip-edge-model/1" and v.manifest["job"] == "j1"
    assert v.classes == CLASSES and v.dim == DIM and v.manifest["promoted"] is False
    state, text, scale = v.load()
    for key, value in _state(0).items():
        assert torch.equal(state[key], value)
    assert text.shape == (3, DIM) and torch.allclose(text.norm(dim=1), torch.ones(3))
    assert torch.allclose(text, torch.nn.functional.normalize(_text(), dim=-1))
    assert scale == 100.0
    assert store.current() is None and store.current_name() is None  # add never promotes
    # the sequence runs across kinds
    assert _add(store, "personal", seed=1).name == "v0002-personal"
    assert [x.name for x in store.versions()] == ["v0001-global", "v0002-personal"]


def test_a_failure_mid_add_leaves_no_half_version(tmp_path: Path, monkeypatch) -> None:
    store = ModelStore(tmp_path / "m")
    _add(store)
    seen: list[Path] = []

    def crash(staging: Path) -> None:
        # the version is fully staged (both files) at this moment, and still invisible
        assert sorted(p.name for p in staging.iterdir()) == ["adapter.safetensors", "manifest.json"]
        assert [v.name for v in store.versions()] == ["v0001-global"]
        seen.append(staging)
        raise OSError("disk gone")

    monkeypatch.setattr(store_mod, "_before_rename", crash)
    with pytest.raises(ModelStoreError, match="cannot write the model store") as err:
        _add(store, "personal")
    assert "disk gone" in str(err.value) and "\n" not in str(err.value)
    assert seen and not seen[0].exists()
    assert sorted(p.name for p in store.versions_dir.iterdir()) == ["v0001-global"]
    monkeypatch.undo()
    assert _add(store, "personal").name == "v0002-personal"  # the number was not burnt


def test_a_killed_add_leftover_is_ignored_then_cleaned(tmp_path: Path) -> None:
    """kill -9 mid-add leaves a hidden staging folder: never listed, removed by the next add."""
    store = ModelStore(tmp_path / "m")
    _add(store)
    leftover = store.versions_dir / ".staging-deadbeef"
    leftover.mkdir()
    (leftover / "adapter.safetensors").write_bytes(b"half")
    assert [v.name for v in store.versions()] == ["v0001-global"]
    assert store.scan()[1] == []
    _add(store)
    assert not leftover.exists()


def test_promote_rollback_and_history(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "m")
    for i in range(3):
        _add(store, seed=i)
    store.promote("v0001-global", "first")
    store.promote("v0002-global", "better")
    store.promote("v0003-global", "better again")
    assert store.current_name() == "v0003-global"
    assert store.current_file.read_text() == "v0003-global\n"
    assert store.rollback("bad on device").name == "v0002-global"
    assert store.rollback().name == "v0001-global"  # again: further back, not a toggle
    with pytest.raises(ModelStoreError, match="nothing to roll back to"):
        store.rollback()
    assert store.current_name() == "v0001-global"
    hist = store.history()
    assert [(h["from"], h["to"], h["action"]) for h in hist] == [
        (None, "v0001-global", "promote"),
        ("v0001-global", "v0002-global", "promote"),
        ("v0002-global", "v0003-global", "promote"),
        ("v0003-global", "v0002-global", "rollback"),
        ("v0002-global", "v0001-global", "rollback"),
    ]
    assert hist[1]["reason"] == "better" and hist[3]["reason"] == "bad on device"
    store.promote("v0001-global", "again")  # already current: no history line
    assert len(store.history()) == 5
    store.promote("v0003-global", "re-promote")
    assert store.rollback().name == "v0001-global"


def test_a_store_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ModelStoreError, match="cannot write the model store"):
        _add(ModelStore(tmp_path / "file"))


def test_rollback_on_an_empty_store_and_unknown_names(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "m")
    with pytest.raises(ModelStoreError, match="nothing to roll back to"):
        store.rollback()
    _add(store)
    with pytest.raises(ModelStoreError, match="no version 'v0009-global'"):
        store.promote("v0009-global", "x")
    with pytest.raises(ModelStoreError, match="not a version name"):
        store.promote("../../etc", "x")
    assert store.current_name() is None and store.history() == []


def _corrupt_cases():
    def flip_byte(v: Path) -> None:
        f = v / "adapter.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x01
        f.write_bytes(bytes(data))

    def wrong_format(v: Path) -> None:
        m = json.loads((v / "manifest.json").read_text())
        m["format"] = "someone-else/3"
        (v / "manifest.json").write_text(json.dumps(m))

    def missing_file(v: Path) -> None:
        (v / "adapter.safetensors").unlink()

    def missing_manifest(v: Path) -> None:
        (v / "manifest.json").unlink()

    def garbage_manifest(v: Path) -> None:
        (v / "manifest.json").write_text("{not json")

    def _rewrite(v: Path, tensors: dict, **manifest_changes) -> None:
        data = safetensors.torch.save(tensors)
        (v / "adapter.safetensors").write_bytes(data)
        m = json.loads((v / "manifest.json").read_text())
        m["files"]["adapter.safetensors"] = {"sha256": store_mod._sha256(data), "bytes": len(data)}
        m.update(manifest_changes)
        (v / "manifest.json").write_text(json.dumps(m))

    def wrong_dim(v: Path) -> None:  # a consistent file of another width than the manifest says
        _rewrite(v, {**AttentionAdapter(DIM * 2).state_dict(), "text_features": _n(3, DIM * 2)})

    def wrong_classes(v: Path) -> None:  # 4 text rows, 3 class names
        _rewrite(v, {**_state(), "text_features": _n(4, DIM)})

    def foreign_tensors(v: Path) -> None:
        _rewrite(v, {"weight": torch.zeros(3), "text_features": _n(3, DIM)})

    def name_mismatch(v: Path) -> None:
        m = json.loads((v / "manifest.json").read_text())
        m["name"] = "v0007-global"
        (v / "manifest.json").write_text(json.dumps(m))

    def not_normalized(v: Path) -> None:
        _rewrite(v, {**_state(), "text_features": 3 * _n(3, DIM)})

    return [
        (flip_byte, "adapter.safetensors: sha256 or size differs"),
        (wrong_format, "format 'someone-else/3', expected 'fedclip-edge-model/1'"),
        (missing_file, "adapter.safetensors: missing"),
        (missing_manifest, "manifest.json: missing"),
        (garbage_manifest, "manifest.json: unreadable JSON"),
        (wrong_dim, "fea_attn.0.weight has shape [16, 16], expected [8, 8]"),
        (wrong_classes, "text_features has shape [4, 8], expected [3, 8]"),
        (foreign_tensors, "not a dim-8 adapter with 3 classes"),
        (name_mismatch, "does not match its folder"),
        (not_normalized, "not L2-normalized"),
    ]


def _n(rows: int, dim: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(rows, dim), dim=-1)


@pytest.mark.parametrize(
    ("damage", "message"), _corrupt_cases(), ids=lambda x: getattr(x, "__name__", "")
)
def test_corrupt_or_foreign_versions_are_refused_with_one_line(
    tmp_path: Path, damage, message: str
) -> None:
    store = ModelStore(tmp_path / "m")
    good = _add(store)
    store.promote(good.name, "ok")
    bad = _add(store, seed=1)
    store.promote(bad.name, "ok")
    damage(bad.path)
    with pytest.raises(ModelStoreError) as err:
        load_version(bad.path)
    text = str(err.value)
    assert message in text and "\n" not in text
    assert str(bad.path) in text or bad.path.name in text  # names the file
    # the store lists the good one, reports the bad one, and never serves it
    versions, refused = store.scan()
    assert [v.name for v in versions] == [good.name]
    assert [name for name, _ in refused] == [bad.name]
    with pytest.raises(ModelStoreError, match="v0002-global"):
        store.current()
    with pytest.raises(ModelStoreError):
        resolve_model(store.root)
    # rolling back to the intact one works
    assert store.rollback().name == good.name
    assert resolve_model(store.root).name == good.name


def test_load_rechecks_the_hash(tmp_path: Path) -> None:
    """A file replaced after the version was listed is refused at load, not served."""
    v = _add(ModelStore(tmp_path / "m"))
    f = v.path / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ModelStoreError, match="sha256"):
        v.load()


def test_add_refuses_bad_input(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "m")
    with pytest.raises(ModelStoreError, match="'global' or 'personal'"):
        store.add(_state(), _text(), _fields("best"))
    with pytest.raises(ModelStoreError, match=r"expected \[3, D\]"):
        store.add(_state(), _text(n=2), _fields())
    with pytest.raises(ModelStoreError, match="not a dim-8 adapter"):
        store.add({"x": torch.zeros(2)}, _text(), _fields())
    with pytest.raises(ModelStoreError, match="fea_attn.0.weight has shape"):
        store.add(AttentionAdapter(4).state_dict(), _text(), _fields())
    assert not store.versions_dir.exists() or store.versions() == []


def test_resolve_model(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "m")
    v1 = _add(store)
    with pytest.raises(ModelStoreError, match="no current version yet"):
        resolve_model(store.root)
    store.promote(v1.name, "x")
    assert resolve_model(store.root).name == v1.name
    assert resolve_model(v1.path).name == v1.name
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "manifest.json").write_text(json.dumps({"kind": "fused-classifier"}))
    assert resolve_model(fused) == fused
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"kind": "image-encoder"}))
    with pytest.raises(ModelStoreError, match="format None"):
        resolve_model(other)
    with pytest.raises(ModelStoreError, match="no such model store"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelStoreError, match="not a model store, a model version or a fused"):
        resolve_model(tmp_path / "empty")
