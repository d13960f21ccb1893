"""`open_classifier`: a store, a version folder and a fused export give the same answers, and
`decode` turns any bytes into a preprocessed image or an ImageRejected with one line."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from support.fused import fused_export

from fedclip_edge.errors import DataError
from fedclip_edge.serving.classifier import (
    MAX_PIXELS,
    ImageRejected,
    Prediction,
    decode_image,
    open_classifier,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory, exported_artifact) -> tuple[Path, Path]:
    """(store whose current version pairs with the fp32 artifact, its fused fp32 export)."""
    return fused_export(tmp_path_factory, exported_artifact("fp32"), "fp32")


@pytest.fixture(scope="module")
def fused(models):
    return open_classifier(models[1])


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _samples() -> list[bytes]:
    from fedclip_edge.data import synth

    return [_png(synth.render(d, c, 3, i, size=56))
            for i, (d, c) in enumerate([("photo", "circle"), ("sketch", "star"),
                                        ("cartoon", "heart"), ("art_painting", "square")])]


def test_store_version_and_fused_export_agree(models) -> None:
    store, fused_dir = models
    images = _samples()
    by_store = open_classifier(store)
    by_version = open_classifier(store / "versions" / by_store.version)
    by_fused = open_classifier(fused_dir)
    assert by_store.version == by_version.version == by_fused.version == "v0001-global"
    assert by_store.classes == by_fused.classes == ["circle", "square", "star", "heart"]
    x = np.stack([by_store.decode(b) for b in images])
    assert x.shape == (4, *by_store.input_shape)
    p_store, p_fused = by_store.predict(x), by_fused.predict(x)
    assert p_store.shape == (4, 4) and np.allclose(p_store.sum(1), 1, atol=1e-5)
    assert np.abs(p_store - p_fused).max() < 1e-4
    assert np.abs(by_version.predict(x) - p_store).max() == 0
    preds = by_fused.classify(images, top_k=2)
    assert all(isinstance(p, Prediction) for p in preds)
    for p, row in zip(preds, p_fused, strict=True):
        assert p.label == by_fused.classes[int(row.argmax())]
        assert p.score == pytest.approx(float(row.max()))
        assert len(p.topk) == 2 and p.topk[0] == (p.label, p.score)
        assert p.model_version == "v0001-global"


def test_predict_chunks_to_max_batch(models) -> None:
    clf = open_classifier(models[1], max_batch=3)
    x = np.stack([clf.decode(b) for b in _samples() * 2])  # 8 images, chunks of 3
    whole = open_classifier(models[1], max_batch=8).predict(x)
    assert np.abs(clf.predict(x) - whole).max() < 1e-6


def test_classify_keeps_order_and_rejects_per_image(fused) -> None:
    good = _samples()
    out = fused.classify([good[0], b"", good[1], b"not an image"])
    assert isinstance(out[0], Prediction) and isinstance(out[2], Prediction)
    assert isinstance(out[1], ImageRejected) and isinstance(out[3], ImageRejected)
    assert out[1].reason == "empty body: no image bytes"


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height and carries a little compressed data (a bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))


def _reject(fused, data: bytes) -> str:
    with pytest.raises(ImageRejected) as err:
        fused.decode(data)
    assert isinstance(err.value, DataError)
    reason = err.value.reason
    assert reason and "\n" not in reason
    return reason


def test_hostile_inputs_are_rejected_with_one_line(fused) -> None:
    jpeg = _jpeg(Image.new("RGB", (64, 64), (200, 10, 10)))
    assert _reject(fused, b"") == "empty body: no image bytes"
    assert "cannot decode" in _reject(fused, jpeg[: len(jpeg) // 2])  # truncated JPEG
    assert _reject(fused, b"\x89PNG\r\n\x1a\n" + b"\x13garbage" * 50)
    rng = np.random.default_rng(0)
    assert _reject(fused, rng.bytes(20_000)) == "not an image (unrecognized format)"
    assert "too large" in _reject(fused, _png_header_only(60_000, 60_000))  # never decoded
    # a real one: 20 Mpx of zeros, ~20 kB as PNG, above the bound of 16.8 Mpx
    bomb = _png(Image.new("L", (5000, 4000)))
    assert len(bomb) < 100_000 and 5000 * 4000 > MAX_PIXELS
    assert "too large" in _reject(fused, bomb)


def test_odd_but_valid_images_decode(fused) -> None:
    shape = fused.input_shape
    for img in (Image.new("L", (1, 1), 7), Image.new("RGBA", (300, 20)),
                Image.new("P", (33, 77)), Image.new("CMYK", (40, 40)),
                Image.new("I;16", (20, 30))):
        out = fused.decode(_png(img) if img.mode != "CMYK" else _jpeg(img))
        assert out.shape == shape and out.dtype == np.float32


def _mutations() -> st.SearchStrategy[bytes]:
    seed = _jpeg(Image.new("RGB", (40, 30), (10, 200, 30)))
    seed_png = _png(Image.new("RGB", (30, 40), (10, 20, 230)))

    def mutate(base: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
        data = bytearray(base[: max(0, len(base) - cut)])
        for pos, val in flips:
            if data:
                data[pos % len(data)] = val
        return bytes(data)

    return st.builds(mutate, st.sampled_from([seed, seed_png]), st.integers(0, 400),
                     st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                              max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=4096), _mutations()))
def test_decode_returns_an_image_or_rejects_never_anything_else(data: bytes) -> None:
    from fedclip_edge.exporters.preprocess import PreprocessConfig

    cfg = PreprocessConfig(size=(32, 32))
    try:
        out = decode_image(data, cfg)
    except ImageRejected as exc:
        assert exc.reason and "\n" not in exc.reason
    else:
        assert out.shape == (3, 32, 32) and out.dtype == np.float32
