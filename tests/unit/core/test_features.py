"""Feature cache: written once, reused by content, corrupt or foreign caches recomputed."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedclip_edge.data.folder import scan_dataset
from fedclip_edge.data.synth import write_dataset
from fedclip_edge.errors import CacheError
from fedclip_edge.features import extract_features, load_feature_cache


class FakeEncoder:
    """Deterministic stand-in for an image tower: mean colour per channel, tiled to 6-d."""

    def __init__(self, tag: str = "fake") -> None:
        self.identity = {
            "model": tag,
            "pretrained": "none",
            "weights_sha256": "0" * 64,
            "precision": "fp32",
        }
        self.preprocess_cfg = {"size": [8, 8]}
        self.calls = 0

    def preprocess(self, image):
        return torch.tensor(np.array(image.resize((8, 8)))).permute(2, 0, 1).float() / 255

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += batch.shape[0]
        m = batch.mean(dim=(2, 3))
        return torch.cat([m, m * 2], dim=1)


@pytest.fixture()
def dataset(tmp_path: Path):
    write_dataset(tmp_path / "data", per_class=2, seed=0, domains=("photo", "sketch"))
    return scan_dataset(tmp_path / "data")


def _extract(dataset, out, enc):
    text = torch.randn(len(dataset.classes), 6)
    return extract_features(dataset, enc, text, 100.0, out, progress=False, log=lambda s: None)


def test_cache_schema_and_reuse(dataset, tmp_path):
    out = tmp_path / "cache"
    enc = FakeEncoder()
    fs, report = _extract(dataset, out, enc)
    n = 2 * len(dataset.classes)
    assert report.encoded == 2 * n and report.reused == 0 and enc.calls == 2 * n
    t = load_file(str(out / "photo.safetensors"))
    assert t["features"].dtype == torch.float32 and t["features"].shape == (n, 6)
    assert t["labels"].dtype == torch.int64 and t["labels"].tolist() == sorted(t["labels"].tolist())
    assert t["content_sha256"].shape == (n, 32)

    enc2 = FakeEncoder()
    fs2, report2 = _extract(dataset, out, enc2)
    assert report2.encoded == 0 and report2.reused == 2 * n and enc2.calls == 0
    assert torch.equal(fs2.domains["photo"].features, fs.domains["photo"].features)

    loaded = load_feature_cache(out)
    assert sorted(loaded.domains) == ["photo", "sketch"]
    assert loaded.class_names == list(dataset.classes)


def test_changed_image_is_the_only_one_re_encoded(dataset, tmp_path):
    out = tmp_path / "cache"
    _extract(dataset, out, FakeEncoder())
    victim = dataset.records["photo"][0].path
    from PIL import Image

    Image.new("RGB", (64, 64), (255, 0, 0)).save(victim)
    enc = FakeEncoder()
    _, report = _extract(scan_dataset(dataset.root), out, enc)
    assert report.encoded == 1 and enc.calls == 1


def test_other_model_cache_is_reported_and_recomputed(dataset, tmp_path):
    out = tmp_path / "cache"
    _extract(dataset, out, FakeEncoder("model-a"))
    lines = []
    enc = FakeEncoder("model-b")
    _, report = extract_features(
        dataset,
        enc,
        torch.randn(len(dataset.classes), 6),
        100.0,
        out,
        progress=False,
        log=lines.append,
    )
    assert report.encoded == enc.calls == 2 * 2 * len(dataset.classes)
    assert any("model-a" in line and "model-b" in line for line in lines)


def test_corrupt_cache_file_is_reported_and_recomputed(dataset, tmp_path):
    out = tmp_path / "cache"
    _extract(dataset, out, FakeEncoder())
    (out / "sketch.safetensors").write_bytes(b"\x00garbage")
    lines = []
    _, report = extract_features(
        dataset,
        FakeEncoder(),
        torch.randn(len(dataset.classes), 6),
        100.0,
        out,
        progress=False,
        log=lines.append,
    )
    assert report.recomputed == [str(out / "sketch.safetensors")]
    assert any("corrupt" in line for line in lines)
    assert report.encoded == 2 * len(dataset.classes)  # only sketch, photo reused


def test_nan_in_cache_is_not_trusted(dataset, tmp_path):
    out = tmp_path / "cache"
    _extract(dataset, out, FakeEncoder())
    path = out / "photo.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    t = load_file(str(path))
    t["features"][0, 0] = float("nan")
    save_file(t, str(path), metadata=meta)
    with pytest.raises(CacheError, match="non-finite"):
        load_feature_cache(out)


def test_unreadable_image_is_skipped_with_its_name(dataset, tmp_path):
    bad = dataset.records["sketch"][1].path
    bad.write_bytes(b"not a png")
    lines = []
    fs, report = extract_features(
        dataset,
        FakeEncoder(),
        torch.randn(len(dataset.classes), 6),
        100.0,
        tmp_path / "cache",
        progress=False,
        log=lines.append,
    )
    assert len(report.skipped) == 1 and bad.name in report.skipped[0]
    assert any(bad.name in line for line in lines)
    assert len(fs.domains["sketch"]) == 2 * len(dataset.classes) - 1


def test_load_cache_errors(tmp_path):
    with pytest.raises(CacheError, match="not found"):
        load_feature_cache(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match="text.safetensors"):
        load_feature_cache(tmp_path / "empty")
