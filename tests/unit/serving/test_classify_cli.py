"""`fedclip-edge classify` and `export --adapter` from a shell.

The labelled folder is built so that its accuracy is known by construction: three images sit in
the folder of the class the model gives them (asked through the library first), one in another
class's folder, so the accuracy line must read 75.0% (3/4); a broken file is its own row.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from support.fused import fused_export

from fedclip_edge.cli import main
from fedclip_edge.cli_runner import expand_optional_values
from fedclip_edge.serving.classifier import open_classifier


@pytest.fixture(scope="module")
def models(tmp_path_factory, exported_artifact) -> tuple[Path, Path]:
    return fused_export(tmp_path_factory, exported_artifact("fp32"), "fp32")


def _png(i: int) -> bytes:
    from fedclip_edge.data import synth

    buf = io.BytesIO()
    synth.render("photo", synth.CLASSES[i % 8], 11, i, size=56).save(buf, format="PNG")
    return buf.getvalue()


def _labelled_folder(root: Path, model: Path) -> Path:
    clf = open_classifier(model)
    images = [_png(i) for i in range(4)]
    labels = [p.label for p in clf.classify(images)]
    data = root / "data"
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        if i == 3:  # filed under another class: a wrong answer by construction
            label = next(c for c in clf.classes if c != label)
        (data / label).mkdir(parents=True, exist_ok=True)
        (data / label / f"img{i}.png").write_bytes(img)
    (data / labels[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 30)
    (data / labels[0] / "README").write_text("not an image suffix: not walked")
    return data


@pytest.mark.parametrize("which", ["store", "fused"])
def test_classify_a_labelled_folder(tmp_path: Path, models, capsys, which: str) -> None:
    model = models[0] if which == "store" else models[1]
    data = _labelled_folder(tmp_path, model)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    rc = main(["classify", "--model", str(model), str(data), str(notes)])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = out.splitlines()
    assert f"{data}: accuracy 75.0% (3/4 labelled images), 1 not classified" in lines
    assert sum(" ok " in ln for ln in lines) == 3
    assert any("broken.jpg" in ln and " error " in ln for ln in lines)
    assert any("notes.txt" in ln and "not an image" in ln for ln in lines)
    assert "README" not in out


def test_classify_json(tmp_path: Path, models, capsys) -> None:
    data = _labelled_folder(tmp_path, models[1])
    rc = main(["classify", "--model", str(models[1]), "--json", "--top-k", "2", str(data)])
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert rc == 0
    images, folder = rows[:-1], rows[-1]
    assert len(images) == 5
    good = [r for r in images if "label" in r]
    assert len(good) == 4
    for r in good:
        assert set(r) >= {"path", "label", "score", "topk", "model_version"}
        assert r["model_version"] == "v0001-global" and len(r["topk"]) == 2
        assert r["topk"][0] == [r["label"], r["score"]]
    assert [r for r in images if "error" in r][0]["path"].endswith("broken.jpg")
    assert (folder["correct"], folder["total"], folder["accuracy"]) == (3, 4, 0.75)


def test_nothing_classified_exits_2(tmp_path: Path, models, capsys) -> None:
    bad = tmp_path / "x.png"
    bad.write_bytes(b"garbage")
    assert main(["classify", "--model", str(models[1]), str(bad)]) == 2
    assert "error: no image could be classified" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["classify", "--model", str(models[1]), str(empty)]) == 2
    assert main(["classify", "--model", str(tmp_path / "nope"), str(bad)]) != 0


def test_export_adapter_cli_signed(tmp_path: Path, models, capsys) -> None:
    from fedclip_edge.exporters.signature import verify_signed_artifact
    from fedclip_edge.signing import new_keypair

    key, pub = new_keypair(tmp_path / "keys", "exporter")
    out = tmp_path / "fused"
    rc = main(["export", "--adapter", str(models[0]), "--out", str(out), "--precision", "int8",
               "--classes", "star,circle", "--sign-key", str(key)])
    text = capsys.readouterr().out
    assert rc == 0, text
    m = verify_signed_artifact(out, pub)
    assert (m["kind"], m["precision"], m["classes"]) == ("fused-classifier", "int8",
                                                         ["star", "circle"])
    assert "pooled (bound 99%)" in text
    assert main(["doctor", "--artifacts", str(out)]) == 0
    # a fused export is not an adapter source
    assert main(["export", "--adapter", str(out), "--out", str(tmp_path / "again")]) != 0
    assert "already a fused classifier" in capsys.readouterr().err


def test_text_encoder_takes_a_value_or_none() -> None:
    assert expand_optional_values(["--text-encoder", "--out", "x"]) == [
        "--text-encoder=", "--out", "x"]
    assert expand_optional_values(["--out", "x", "--text-encoder"]) == [
        "--out", "x", "--text-encoder="]
    assert expand_optional_values(["--text-encoder", "art", "--out", "x"]) == [
        "--text-encoder", "art", "--out", "x"]


def test_image_folder_accuracy_counts_unknown_classes(tmp_path: Path, models, capsys) -> None:
    data = tmp_path / "d"
    (data / "zebra").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(data / "zebra" / "a.png")
    assert main(["classify", "--model", str(models[1]), str(data)]) == 0
    out = capsys.readouterr().out
    assert "accuracy 0.0% (0/1 labelled images)" in out and "no class for" in out
