"""Data layer: synthetic renderer, ImageFolder scanning, the 60/20/20 split."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclip_edge.data import (
    CLASSES,
    DOMAINS,
    DomainDataset,
    caption,
    load_image,
    render,
    sample_batch,
    scan_dataset,
    split_indices,
    write_dataset,
)
from fedclip_edge.errors import ConfigError, DataError

PER_CLASS = 2


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, per_class=PER_CLASS, seed=3, size=32)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.png"))
    }


def _png(path: Path, color: tuple[int, int, int] = (10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)


# ----------------------------------------------------------------------------- synth


def test_catalogue_shape() -> None:
    assert DOMAINS == ("photo", "art_painting", "cartoon", "sketch")
    assert len(CLASSES) >= 7
    assert list(CLASSES) == sorted(CLASSES)  # index == label from scan_dataset
    assert all(c.isalpha() and c.islower() for c in CLASSES)


@pytest.mark.parametrize("domain", DOMAINS)
def test_render_is_deterministic_rgb(domain: str) -> None:
    a = render(domain, "star", seed=7, index=5, size=48)
    b = render(domain, "star", seed=7, index=5, size=48)
    assert a.mode == "RGB" and a.size == (48, 48)
    assert a.tobytes() == b.tobytes()
    assert render(domain, "star", seed=7, index=6, size=48).tobytes() != a.tobytes()
    assert render(domain, "star", seed=8, index=5, size=48).tobytes() != a.tobytes()


def test_render_differs_across_domains_and_classes() -> None:
    images = {(d, c): render(d, c, 0, 0, 32).tobytes() for d in DOMAINS for c in CLASSES[:3]}
    assert len(set(images.values())) == len(images)


def test_sketch_is_grey_pencil_on_paper() -> None:
    arr = np.asarray(render("sketch", "house", 0, 1), dtype=np.int16)
    assert np.median(arr) > 200  # mostly paper
    assert arr.min() < 140  # with dark strokes
    assert np.abs(arr[..., 0] - arr[..., 2]).max() < 40  # near-grey (slight paper tint)


def test_render_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="unknown synthetic domain 'clipart'"):
        render("clipart", "star", 0, 0)
    with pytest.raises(ConfigError, match="unknown synthetic class 'dog'"):
        render("photo", "dog", 0, 0)


def test_caption_names_the_class_verbatim() -> None:
    rng = random.Random(0)
    for d in DOMAINS:
        for c in CLASSES:
            for _ in range(5):
                text = caption(d, c, rng, color="red")
                assert c in text.split()
                assert text == text.strip() and "  " not in text
    assert caption("sketch", "star", random.Random(1)).startswith("a ")
    # Without a colour, none is ever invented.
    texts = {caption("photo", "elephant", random.Random(i)) for i in range(50)}
    assert not any(name in t for t in texts for name in ("red", "blue", "green"))
    assert any(t.startswith("an ") or " an elephant" in t for t in texts)  # article agrees


def test_sample_batch_is_balanced_and_reproducible() -> None:
    n = len(DOMAINS) * len(CLASSES)
    images, captions, labels, domains = sample_batch(n, seed=4, size=32)
    assert len(images) == len(captions) == len(labels) == len(domains) == n
    assert sorted(zip(domains, labels, strict=True)) == sorted(
        (d, i) for d in DOMAINS for i in range(len(CLASSES))
    )
    for cap, label in zip(captions, labels, strict=True):
        assert CLASSES[label] in cap
    again = sample_batch(n, seed=4, size=32)
    assert [im.tobytes() for im in again[0]] == [im.tobytes() for im in images]
    assert again[1:] == (captions, labels, domains)
    # Indices of pretraining images are far from those of a written dataset.
    assert all(
        render(d, CLASSES[lab], 4, 0, 32).tobytes() != im.tobytes()
        for im, lab, d in zip(images[:4], labels[:4], domains[:4], strict=True)
    )


def test_sample_batch_subset_labels_index_the_given_classes() -> None:
    _, captions, labels, domains = sample_batch(
        6, seed=0, domains=("cartoon",), classes=("moon", "circle")
    )
    assert set(domains) == {"cartoon"} and set(labels) == {0, 1}
    for cap, label in zip(captions, labels, strict=True):
        assert ("moon", "circle")[label] in cap


# ----------------------------------------------------------------------------- write


def test_write_dataset_layout_and_summary(tmp_path: Path) -> None:
    summary = write_dataset(
        tmp_path,
        per_class=2,
        seed=1,
        size=24,
        domains=("photo", "sketch"),
        classes=("star", "heart"),
    )
    assert summary == {
        "root": str(tmp_path),
        "domains": ["photo", "sketch"],
        "classes": ["star", "heart"],
        "per_class": 2,
        "images": 8,
        "seed": 1,
        "size": 24,
    }
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == [
        f"{d}/{c}/{d}_{c}_{i:04d}.png"
        for d in ("photo", "sketch")
        for c in ("heart", "star")
        for i in range(2)
    ]
    img = Image.open(tmp_path / "sketch/star/sketch_star_0001.png")
    assert img.size == (24, 24) and img.mode == "RGB"
    assert img.tobytes() == render("sketch", "star", 1, 1, 24).tobytes()


def test_write_dataset_is_idempotent_and_drops_stale_files(tmp_path: Path) -> None:
    kw = {"seed": 2, "size": 24, "domains": ("cartoon",), "classes": ("moon",)}
    write_dataset(tmp_path, per_class=3, **kw)
    first = _digests(tmp_path)
    write_dataset(tmp_path, per_class=3, **kw)
    assert _digests(tmp_path) == first
    (tmp_path / "cartoon/moon/notes.png").write_bytes(b"not ours")  # foreign file: kept
    write_dataset(tmp_path, per_class=2, **kw)
    names = sorted(p.name for p in (tmp_path / "cartoon/moon").iterdir())
    assert names == ["cartoon_moon_0000.png", "cartoon_moon_0001.png", "notes.png"]


def test_full_written_set_scans(synth_root: Path) -> None:
    ds = scan_dataset(synth_root)
    assert isinstance(ds, DomainDataset)
    assert ds.domains == tuple(sorted(DOMAINS))
    assert ds.classes == CLASSES
    assert len(ds) == len(DOMAINS) * len(CLASSES) * PER_CLASS
    for d in DOMAINS:
        recs = ds.records[d]
        assert len(recs) == len(CLASSES) * PER_CLASS
        assert [r.path for r in recs] == sorted(r.path for r in recs)
        for r in recs:
            assert r.domain == d and r.path.parent.name == r.class_name
            assert CLASSES[r.label] == r.class_name
    img = load_image(ds.records["photo"][0].path)
    assert img.mode == "RGB" and img.size == (32, 32)


# ----------------------------------------------------------------------------- folder


def test_scan_subset_keeps_requested_order(synth_root: Path) -> None:
    ds = scan_dataset(synth_root, domains=["sketch", "photo"])
    assert ds.domains == ("sketch", "photo")
    assert set(ds.records) == {"sketch", "photo"}


def test_scan_ignores_hidden_and_non_images_and_reads_upper_case(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "cat" / "x.png")
    _png(tmp_path / "a" / "dog" / "Y.PNG")
    _png(tmp_path / "a" / "dog" / ".hidden.png")
    _png(tmp_path / "a" / ".cache" / "z.png")
    (tmp_path / "a" / "dog" / "readme.txt").write_text("hi")
    (tmp_path / "a" / "dog" / "Thumbs.db").write_bytes(b"")
    ds = scan_dataset(tmp_path)
    assert ds.classes == ("cat", "dog")
    assert [(r.path.name, r.label) for r in ds.records["a"]] == [("x.png", 0), ("Y.PNG", 1)]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as info:
        scan_dataset(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_root_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        scan_dataset(f)


def test_root_without_domains(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no domain folders"):
        scan_dataset(tmp_path)


def test_requested_domain_missing_lists_available(synth_root: Path) -> None:
    with pytest.raises(DataError, match="domain clipart not found") as info:
        scan_dataset(synth_root, domains=["photo", "clipart"])
    assert "available: art_painting, cartoon, photo, sketch" in str(info.value)


def test_domain_without_class_folders(tmp_path: Path) -> None:
    _png(tmp_path / "photo" / "cat" / "1.png")
    (tmp_path / "sketch").mkdir()
    with pytest.raises(DataError, match="no class folders") as info:
        scan_dataset(tmp_path)
    assert str(tmp_path / "sketch") in str(info.value)


def test_domain_without_images(tmp_path: Path) -> None:
    (tmp_path / "photo" / "cat").mkdir(parents=True)
    (tmp_path / "photo" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="has no images") as info:
        scan_dataset(tmp_path)
    assert str(tmp_path / "photo") in str(info.value)


def test_empty_class_folder(tmp_path: Path) -> None:
    _png(tmp_path / "photo" / "cat" / "1.png")
    (tmp_path / "photo" / "dog").mkdir()
    with pytest.raises(DataError, match="class folder .*dog has no images"):
        scan_dataset(tmp_path)


def test_mismatched_class_lists_name_domain_and_classes(tmp_path: Path) -> None:
    for d in ("photo", "cartoon", "sketch"):
        for c in ("cat", "dog"):
            _png(tmp_path / d / c / "1.png")
    _png(tmp_path / "sketch" / "horse" / "1.png")
    (tmp_path / "cartoon" / "dog" / "1.png").unlink()
    (tmp_path / "cartoon" / "dog").rmdir()
    with pytest.raises(DataError, match="class folders differ") as info:
        scan_dataset(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "cartoon lacks dog" in msg and "sketch has extra horse" in msg
    assert "photo" not in msg.split(":", 1)[1]  # the consistent domain is not blamed
    # Restricting to domains that agree is fine.
    assert scan_dataset(tmp_path, domains=["photo"]).classes == ("cat", "dog")


def test_corrupt_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "photo" / "cat" / "broken.jpg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(DataError, match="cannot read image") as info:
        load_image(bad)
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


def test_truncated_image_is_named(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    render("photo", "star", 0, 0, 32).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.png"):
        load_image(cut)


def test_missing_image_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="gone.png"):
        load_image(tmp_path / "gone.png")


def test_load_image_converts_to_rgb(tmp_path: Path) -> None:
    p = tmp_path / "grey.png"
    Image.new("L", (3, 5), 128).save(p)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (3, 5)


# ----------------------------------------------------------------------------- split


def test_split_sizes_by_hand() -> None:
    for n, sizes in [
        (10, (6, 2, 2)),
        (7, (4, 1, 2)),
        (3, (1, 0, 2)),
        (1, (0, 0, 1)),
        (0, (0, 0, 0)),
    ]:
        parts = split_indices(n, seed=0)
        assert tuple(len(p) for p in parts) == sizes, n


@pytest.mark.parametrize("n", [10, 11, 97])
def test_split_disjoint_cover_deterministic(n: int) -> None:
    tr, va, te = split_indices(n, seed=5)
    joined = np.concatenate([tr, va, te])
    assert sorted(joined.tolist()) == list(range(n))
    again = split_indices(n, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again, strict=True))
    other = split_indices(n, seed=6)
    assert not np.array_equal(joined, np.concatenate(other))


def test_split_matches_reference_shuffle() -> None:
    # The FedCLIP reference: np.random.seed(seed); np.random.shuffle(index); slice 60/20/20.
    n, seed = 23, 1
    index = np.arange(n)
    np.random.RandomState(seed).shuffle(index)
    tr, va, te = split_indices(n, seed)
    l1, l2 = int(n * 0.6), int(n * 0.2)
    assert tr.tolist() == index[:l1].tolist()
    assert va.tolist() == index[l1 : l1 + l2].tolist()
    assert te.tolist() == index[l1 + l2 :].tolist()


def test_split_rejects_bad_fractions() -> None:
    with pytest.raises(ConfigError, match="summing to 1"):
        split_indices(10, 0, (0.5, 0.2, 0.2))
    with pytest.raises(ConfigError):
        split_indices(-1, 0)
