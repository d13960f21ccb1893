"""The numpy/PIL preprocessing matches open_clip's own eval transform on real images."""

from __future__ import annotations

import numpy as np
import pytest
from open_clip.transform import image_transform
from PIL import Image

from fedclip_edge.data import synth
from fedclip_edge.data.folder import load_image, scan_dataset
from fedclip_edge.errors import ExportError
from fedclip_edge.exporters.preprocess import PreprocessConfig, preprocess_image, preprocess_images


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Image.Image]:
    """Synthetic PNGs from disk (every domain and class), plus odd sizes and modes."""
    root = tmp_path_factory.mktemp("synth")
    synth.write_dataset(root, per_class=1, seed=3, size=64)
    ds = scan_dataset(root)
    out = [load_image(r.path) for recs in ds.records.values() for r in recs]
    rng = np.random.default_rng(0)
    for w, h in [(80, 50), (50, 91), (33, 200), (301, 17), (224, 224)]:
        out.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    out.append(synth.render("cartoon", "house", 0, 0, size=97).convert("RGBA"))
    out.append(synth.render("sketch", "moon", 0, 0, size=70).resize((90, 60)).convert("L"))
    return out


def test_matches_the_models_own_transform(images: list[Image.Image]) -> None:
    from support.export import MODEL

    from fedclip_edge.models import load_model

    loaded = load_model(MODEL, "none")
    cfg = PreprocessConfig.from_dict(loaded.preprocess_cfg)
    for im in images:
        expected = loaded.preprocess(im).numpy()
        np.testing.assert_allclose(preprocess_image(im, cfg), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("resize_mode", ["shortest", "longest", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80), (224, 224)])
def test_matches_open_clip_for_every_mode(
    images: list[Image.Image], resize_mode: str, interpolation: str, size: tuple[int, int]
) -> None:
    cfg = PreprocessConfig(
        size=size, resize_mode=resize_mode, interpolation=interpolation, fill_color=9
    )
    ref = image_transform(
        size,
        is_train=False,
        mean=cfg.mean,
        std=cfg.std,
        resize_mode=resize_mode,
        interpolation=interpolation,
        fill_color=9,
    )
    for im in images[::3] + images[-7:]:
        got = preprocess_image(im, cfg)
        assert got.shape == (3, *size) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref(im).numpy(), rtol=0, atol=1e-6)


def test_batch_and_round_trip() -> None:
    cfg = PreprocessConfig(size=(32, 32))
    ims = [synth.render("photo", c, 0, 0, size=40) for c in synth.CLASSES[:3]]
    batch = preprocess_images(ims, cfg)
    assert batch.shape == (3, 3, 32, 32)
    assert preprocess_images([], cfg).shape == (0, 3, 32, 32)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad",
    [{"interpolation": "nearest"}, {"resize_mode": "crop"}, {"mode": "L"}, {"size": [1, 2, 3]}],
)
def test_rejects_what_it_cannot_reproduce(bad: dict) -> None:
    with pytest.raises(ExportError):
        PreprocessConfig.from_dict({"size": [64, 64], **bad})
