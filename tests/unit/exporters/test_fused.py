"""The fused classifier export (`export --adapter`): parity with the torch composition at every
precision, classes changed without retraining, signing, and failures that leave nothing.

The model version pairs a seeded AttentionAdapter with the shared fedclip-tiny random-init
artifact (tests/support/export.py); the torch composition is computed here independently of the
exporter's own parity code (PyTorch adapter on PyTorch encoder features).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from support.export import CLASSES, rehash
from support.fused import add_version, fused_export

from fedclip_edge.errors import ExportError, SigningError
from fedclip_edge.exporters import fused_parity
from fedclip_edge.exporters.fused import FusedSource, export_fused
from fedclip_edge.exporters.fused_runtime import open_fused
from fedclip_edge.exporters.manifest import verify_artifact
from fedclip_edge.exporters.signature import sign_exported_artifact, verify_signed_artifact
from fedclip_edge.serving.store import ModelStore
from fedclip_edge.signing import new_keypair


@pytest.fixture(scope="module")
def fp32_art(exported_artifact) -> Path:
    return exported_artifact("fp32")


def _torch_logits(tiny, version, images: np.ndarray) -> np.ndarray:
    """Encoder (PyTorch), adapter (PyTorch), normalized classes x logit scale: by hand."""
    from fedclip_edge.adapter import AttentionAdapter

    state, text, scale = version.load()
    adapter = AttentionAdapter(text.shape[1]).eval()
    adapter.load_state_dict(state)
    with torch.no_grad():
        feats = tiny.model.encode_image(torch.from_numpy(images)).float()
        g = adapter(feats)
        t = torch.nn.functional.normalize(text, dim=-1)
        return (scale * g @ t.T).numpy()


def _images(n: int = 12) -> np.ndarray:
    from fedclip_edge.data import synth
    from fedclip_edge.exporters.preprocess import preprocess_images

    ims = [synth.render(synth.DOMAINS[i % 4], synth.CLASSES[i % 8], 7, i, size=48)
           for i in range(n)]
    return preprocess_images(ims, _cfg())


def _cfg() -> dict:
    from fedclip_edge.models import load_model

    return load_model("fedclip-tiny", "none").preprocess_cfg


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_fused_export_meets_parity_and_describes_itself(
    tmp_path_factory, fp32_art: Path, precision: str
) -> None:
    store, out = fused_export(tmp_path_factory, fp32_art, precision)
    m = verify_artifact(out)
    assert m["kind"] == "fused-classifier" and m["precision"] == precision
    assert m["classes"] == CLASSES
    v = ModelStore(store).current()
    assert m["model_version"]["name"] == v.name
    assert m["model_version"]["adapter_sha256"] == v.manifest["files"]["adapter.safetensors"][
        "sha256"]
    assert (m["model_version"]["job"], m["model_version"]["round"]) == ("test-job", 3)
    io = m["classifier"]
    assert [i["name"] for i in io["inputs"]] == ["image"]
    assert [(o["name"], o["shape"][1]) for o in io["outputs"]] == [("logits", 4), ("probs", 4)]
    p = m["parity"]
    assert p["status"] == "passed"
    assert p["top1_agreement"] >= (1.0 if precision == "fp32" else 0.99)
    assert set(p["sets"]) >= {"golden", "real", "random", "batch_1", "batch_5"}
    if precision == "fp32":
        assert all(s["top1_agreement"] == 1.0 for s in p["sets"].values())
        assert p["max_abs_prob_diff"] < 1e-4
    model = onnx.load(str(out / "classifier.onnx"))
    assert [i.domain for i in model.opset_import].count("") == 1
    if precision == "int8":  # the encoder is quantized, the head stays fp32
        quantized = [n.name for n in model.graph.node if n.op_type.endswith("Integer")
                     or n.op_type.startswith("DynamicQuantize")]
        assert quantized and not [n for n in quantized if n.startswith("head/")]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_fused_graph_equals_torch_composition_computed_by_hand(
    tmp_path_factory, fp32_art: Path, tiny, precision: str
) -> None:
    store, out = fused_export(tmp_path_factory, fp32_art, precision)
    version = ModelStore(store).current()
    x = _images(12)
    ref = _torch_logits(tiny, version, x)
    logits, probs = open_fused(out).run(x)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    agree = np.mean(ref.argmax(1) == logits.argmax(1))
    if precision == "fp32":
        assert np.abs(ref - logits).max() < 1e-3
        assert agree == 1.0
    else:
        assert agree >= 11 / 12


def test_fused_accuracy_equals_torch_composition_on_cached_features(
    tmp_path_factory, fp32_art: Path
) -> None:
    """Accuracy over a labelled set: the adapter in PyTorch on the artifact's (cached) features
    vs the fused graph on the images; the same predictions, so the same accuracy."""
    from fedclip_edge.exporters.runtimes import open_extractor

    store, out = fused_export(tmp_path_factory, fp32_art, "fp32")
    version = ModelStore(store).current()
    x = _images(24)
    labels = np.arange(24) % 4  # any labels: what matters is that both sides agree
    cached = open_extractor(fp32_art, backend="onnxruntime").extract(x)  # what the agent caches
    src = FusedSource.from_version(version)
    from fedclip_edge.exporters.fused_graph import class_matrix

    torch_pred = fused_parity.torch_composition(
        src.state, class_matrix(src.text_features, src.logit_scale), cached
    ).argmax(1)
    fused_pred = open_fused(out).run(x)[1].argmax(1)
    assert (torch_pred == fused_pred).all()
    assert np.mean(torch_pred == labels) == np.mean(fused_pred == labels)


def test_classes_change_without_retraining(tmp_path: Path, fp32_art: Path, tiny) -> None:
    from fedclip_edge.models import encode_prompts

    v = add_version(tmp_path / "store", fp32_art)
    src = FusedSource.from_version(v)
    # a subset, reordered: the version's own rows; plus a new class from the text encoder
    r = export_fused(src, tmp_path / "f", classes=["star", "circle", "hexagon"],
                     text_encoder=fp32_art, parity_per_domain=2, parity_random=2)
    m = r.manifest
    assert m["classes"] == ["star", "circle", "hexagon"]
    assert m["class_source"]["from_version"] == ["star", "circle"]
    assert list(m["class_source"]["encoded"]) == ["hexagon"]
    head = {i.name: onnx.numpy_helper.to_array(i)
            for i in onnx.load(str(tmp_path / "f" / "classifier.onnx")).graph.initializer}
    cls = head["head/classes"].T / src.logit_scale  # [C, D] normalized rows
    want = torch.nn.functional.normalize(encode_prompts(tiny, ["hexagon"]), dim=-1).numpy()[0]
    assert np.abs(cls[2] - want).max() < 1e-4
    assert np.abs(cls[0] - src.text_features[CLASSES.index("star")]).max() < 1e-6
    # a prompts file: its classes and prompts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# new vocabulary\ncircle\nblob: a photo of a blob\n")
    r2 = export_fused(src, tmp_path / "g", text_encoder=prompts, parity_per_domain=2,
                      parity_random=2)
    assert r2.manifest["classes"] == ["circle", "blob"]
    assert r2.manifest["class_source"]["encoded"] == {"blob": "a photo of a blob"}


def test_a_class_without_text_features_fails_with_one_line(
    tmp_path: Path, exported_artifact, monkeypatch
) -> None:
    from fedclip_edge.errors import ModelError
    from fedclip_edge.exporters import fused_text

    art = exported_artifact("int8")  # exported without a text encoder
    v = add_version(tmp_path / "store", art)

    def no_torch(model):
        raise ModelError("no fedclip-tiny weights here")

    monkeypatch.setattr(fused_text, "_torch_text_encoder", no_torch)
    with pytest.raises(ExportError) as err:
        export_fused(FusedSource.from_version(v), tmp_path / "f", classes=["circle", "hexagon"])
    msg = str(err.value)
    assert "\n" not in msg and "'hexagon'" in msg and "--text-encoder" in msg
    assert not (tmp_path / "f").exists()


def test_failed_parity_leaves_nothing(tmp_path: Path, fp32_art: Path, monkeypatch) -> None:
    v = add_version(tmp_path / "store", fp32_art)
    monkeypatch.setitem(fused_parity.FUSED_AGREEMENT, "fp32", 1.01)  # unreachable
    with pytest.raises(ExportError, match="misses its parity bound"):
        export_fused(FusedSource.from_version(v), tmp_path / "out", parity_per_domain=2,
                     parity_random=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_precision_follows_the_artifact(tmp_path: Path, exported_artifact) -> None:
    v = add_version(tmp_path / "store", exported_artifact("int8"))
    with pytest.raises(ExportError, match="needs an fp32 artifact"):
        export_fused(FusedSource.from_version(v), tmp_path / "f", precision="fp16")


def test_a_changed_artifact_is_refused(tmp_path: Path, fp32_art: Path) -> None:
    art = tmp_path / "art"
    shutil.copytree(fp32_art, art)
    v = add_version(tmp_path / "store", art)
    m = json.loads((art / "manifest.json").read_text())
    m["created"] = "2000-01-01T00:00:00+00:00"  # a different artifact, files intact
    (art / "manifest.json").write_text(json.dumps(m, indent=2))
    with pytest.raises(ExportError, match="changed since"):
        export_fused(FusedSource.from_version(v), tmp_path / "f")


def test_signed_fused_export_verifies_and_a_tampered_one_is_refused(
    tmp_path: Path, tmp_path_factory, fp32_art: Path
) -> None:
    _, out = fused_export(tmp_path_factory, fp32_art, "fp32")
    mine = tmp_path / "fused"
    shutil.copytree(out, mine)
    keys = {k: new_keypair(tmp_path / "keys", k) for k in ("exporter", "other")}
    sign_exported_artifact(mine, keys["exporter"][0])
    assert verify_signed_artifact(mine, keys["exporter"][1])["kind"] == "fused-classifier"
    with pytest.raises(SigningError):
        verify_signed_artifact(mine, keys["other"][1])
    model = mine / "classifier.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1
    model.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="classifier.onnx"):
        verify_signed_artifact(mine, keys["exporter"][1])
    rehash(mine)  # the manifest made to agree: now the signature no longer does
    with pytest.raises(SigningError):
        verify_signed_artifact(mine, keys["exporter"][1])


def test_open_extractor_refuses_a_fused_classifier(tmp_path_factory, fp32_art: Path) -> None:
    from fedclip_edge.exporters.runtimes import open_extractor

    _, out = fused_export(tmp_path_factory, fp32_art, "fp32")
    with pytest.raises(ExportError, match="fused classifier"):
        open_extractor(out)


def test_golden_check_refuses_a_drifted_classifier(tmp_path: Path, tmp_path_factory,
                                                   fp32_art: Path) -> None:
    _, out = fused_export(tmp_path_factory, fp32_art, "fp32")
    mine = tmp_path / "fused"
    shutil.copytree(out, mine)
    with np.load(mine / "golden.npz") as g:
        data = dict(g)
    data["probs"] = data["probs"][:, ::-1].copy()  # another top-1 for every golden input
    np.savez(mine / "golden.npz", **data)
    rehash(mine)
    with pytest.raises(ExportError, match="golden-set check"):
        open_fused(mine)


def test_doctor_checks_a_fused_classifier(tmp_path: Path, tmp_path_factory,
                                          fp32_art: Path) -> None:
    from fedclip_edge.device_agent.doctor import FAIL, OK, check_artifact

    _, out = fused_export(tmp_path_factory, fp32_art, "int8")
    sig, *rows = check_artifact(out)
    # no --artifact-key: doctor says plainly that the signature was not verified
    assert sig.name == "artifact signature" and "NOT verified" in sig.detail
    assert [r.status for r in rows] == [OK, OK], rows
    assert "fused classifier" in rows[0].detail and "top-1 agreement 100%" in rows[1].detail
    mine = tmp_path / "fused"
    shutil.copytree(out, mine)
    (mine / "golden.npz").write_bytes(b"x")
    _, *rows = check_artifact(mine)
    assert rows[0].status == FAIL and "golden.npz" in rows[0].detail


def test_trt_without_tensorrt_records_trtexec_for_the_fused_graph(
    tmp_path: Path, fp32_art: Path
) -> None:
    v = add_version(tmp_path / "store", fp32_art)
    r = export_fused(FusedSource.from_version(v), tmp_path / "f", precision="fp16", trt=True,
                     parity_per_domain=2, parity_random=2)
    trt = r.manifest["tensorrt"]
    assert trt["status"] == "not built"
    assert "--onnx=" + str(tmp_path / "f" / "classifier.onnx") in trt["trtexec"]["tensorrt10"]
    assert "--minShapes=image:1x3x" in trt["trtexec"]["tensorrt11"]


def test_fused_parity_numbers_by_hand() -> None:
    ref = {"real": np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]]),
           "batch_1": np.array([[2.0, 0.0]])}
    same = {k: v.copy() for k, v in ref.items()}
    rep = fused_parity.fused_parity(ref, same, "fp32", "here", pooled_sets=["real"])
    assert (rep["status"], rep["top1_agreement"], rep["max_abs_prob_diff"]) == ("passed", 1.0, 0)
    flipped = {**same, "real": same["real"].copy()}
    flipped["real"][3] = [2.0, 0.0]  # one of four changes class: 75% agreement
    rep = fused_parity.fused_parity(ref, flipped, "int8", "here", pooled_sets=["real"])
    assert rep["status"] == "failed" and rep["top1_agreement"] == 0.75
    # softmax([0, 2]) = [0.1192, 0.8808]; flipped to [0.8808, 0.1192]: a difference of 0.7616
    assert rep["sets"]["real"]["max_abs_prob_diff"] == pytest.approx(0.76159, abs=1e-4)
    # fp32: a miss in a set outside the pooled ones (the batch-1 run) fails it too
    odd = {**same, "batch_1": np.array([[0.0, 2.0]])}
    rep = fused_parity.fused_parity(ref, odd, "fp32", "here", pooled_sets=["real"])
    assert rep["top1_agreement"] == 1.0 and rep["status"] == "failed"
    nan = {**same, "real": np.full((4, 2), np.nan)}
    assert fused_parity.fused_parity(ref, nan, "int8", "here")["status"] == "failed"
