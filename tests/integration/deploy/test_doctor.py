"""`fedclip-edge doctor` on the CPU paths: a real artifact through its golden check, a real
mosquitto (plain and with the production TLS + password configuration), and the red lines a
broken device shows (unreachable or untrusted broker, wrong password, tampered artifact, both
onnxruntime builds, a full disk), each with a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import mqtt as mh
from support import tiny_artifact

from fedclip_edge.device_agent import doctor as D
from fedclip_edge.exporters.manifest import file_records

ROOT = Path(__file__).resolve().parents[3]
PKI_SCRIPT = ROOT / "broker" / "scripts" / "make-dev-pki.sh"


def _doctor(*args: str, cache: Path) -> tuple[int, str, str]:
    """The real command in a child process (stdout is a pipe: plain ✓/✗ lines)."""
    env = {k: v for k, v in os.environ.items() if k != "FEDCLIP_MQTT_PASSWORD"}
    res = subprocess.run(
        [sys.executable, "-m", "fedclip_edge.cli", "doctor", "--cache", str(cache), *args],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )
    return res.returncode, res.stdout, res.stderr


def _rows(stdout: str) -> dict[str, dict[str, str]]:
    data = json.loads(stdout)
    return {r["name"]: r for r in data["checks"]}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_artifact.shared_artifact(tmp_path_factory)[1]


@pytest.mark.integration
@pytest.mark.mosquitto
def test_green_on_cpu_with_artifact_and_broker(artifact: Path, tmp_path: Path) -> None:
    with mh.start_mosquitto(tmp_path / "broker") as (_, port):
        rc, out, err = _doctor("--artifacts", str(artifact), "--broker",
                               f"mqtt://127.0.0.1:{port}", "--json", cache=tmp_path / "cache")
    assert rc == 0, out + err
    rows = _rows(out)
    assert json.loads(out)["ok"] is True
    for name in ("python", "torch", "onnxruntime", "artifact", "golden onnxruntime:cpu",
                 "broker", "broker login", "cache"):
        assert rows[name]["status"] == "ok", rows[name]
    assert "min cosine 1.0" in rows["golden onnxruntime:cpu"]["detail"]
    assert rows["broker tls"]["status"] == "warn"  # plain MQTT is said, not hidden
    assert rows["tensorrt"]["status"] in ("ok", "warn")  # optional on a CPU host


@pytest.mark.integration
def test_unreachable_broker_is_a_red_line_and_exit_1(tmp_path: Path) -> None:
    port = mh.free_port()  # nothing listens there
    rc, out, err = _doctor("--broker", f"mqtt://127.0.0.1:{port}", "--timeout", "2",
                           cache=tmp_path)
    assert rc == 1, out + err
    line = next(ln for ln in out.splitlines() if " broker " in f" {ln} ")
    assert line.startswith("✗") and "not reachable" in line, out
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory):
    """The production mosquitto configuration (TLS, passwords, ACL) on a free loopback port."""
    mh.require_mosquitto("mosquitto_passwd", "openssl")
    base = tmp_path_factory.mktemp("doctor-tls")
    pki = base / "pki"
    made = subprocess.run(["bash", str(PKI_SCRIPT), "--out", str(pki), "dev-a"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    other = base / "other-pki"  # a CA that did not sign the broker's certificate
    made = subprocess.run(["bash", str(PKI_SCRIPT), "--out", str(other), "dev-a"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    port = mh.free_port()
    conf = (pki / "mosquitto.conf").read_text()
    assert conf.count("\nlistener 8883\n") == 1
    conf = conf.replace("\nlistener 8883\n", f"\nlistener {port} 127.0.0.1\n")
    env = dict(ln.split("=", 1) for ln in (pki / "credentials/dev-a.env").read_text().split("\n")
               if "=" in ln)
    with mh.start_mosquitto(base, conf, port=port):
        yield {"url": f"mqtts://localhost:{port}", "ca": pki / "ca.crt",
               "other_ca": other / "ca.crt", "password": env["FEDCLIP_MQTT_PASSWORD"]}


@pytest.mark.integration
@pytest.mark.mosquitto
def test_tls_broker_login_checked_with_the_account(tls_broker, tmp_path: Path) -> None:
    rc, out, err = _doctor("--broker", tls_broker["url"], "--ca-certs", str(tls_broker["ca"]),
                           "--username", "dev-a", "--password", tls_broker["password"],
                           "--json", cache=tmp_path)
    rows = _rows(out)
    assert rc == 0, out + err
    assert rows["broker tls"]["status"] == "ok" and "certificate verified" in (
        rows["broker tls"]["detail"])
    assert rows["broker login"]["status"] == "ok" and "as dev-a" in rows["broker login"]["detail"]


@pytest.mark.integration
@pytest.mark.mosquitto
def test_wrong_password_is_red(tls_broker, tmp_path: Path) -> None:
    rc, out, _ = _doctor("--broker", tls_broker["url"], "--ca-certs", str(tls_broker["ca"]),
                         "--username", "dev-a", "--password", "not-the-password", "--json",
                         cache=tmp_path)
    rows = _rows(out)
    assert rc == 1
    assert rows["broker login"]["status"] == "fail"
    assert "refused" in rows["broker login"]["detail"]


@pytest.mark.integration
@pytest.mark.mosquitto
def test_untrusted_broker_certificate_is_red(tls_broker, tmp_path: Path) -> None:
    rc, out, _ = _doctor("--broker", tls_broker["url"], "--ca-certs",
                         str(tls_broker["other_ca"]), "--json", cache=tmp_path)
    rows = _rows(out)
    assert rc == 1
    assert rows["broker tls"]["status"] == "fail"
    assert "certificate verify failed" in rows["broker tls"]["detail"]
    assert "broker login" not in rows  # no login attempted over an untrusted channel


@pytest.mark.integration
@pytest.mark.mosquitto
def test_anonymous_login_refused_is_a_warning_not_red(tls_broker, tmp_path: Path) -> None:
    """Without credentials the doctor checks reachability and TLS; the refusal is expected."""
    rc, out, _ = _doctor("--broker", tls_broker["url"], "--ca-certs", str(tls_broker["ca"]),
                         "--json", cache=tmp_path)
    rows = _rows(out)
    assert rc == 0, out
    assert rows["broker login"]["status"] == "warn"


@pytest.mark.integration
def test_golden_miss_is_red(artifact: Path, tmp_path: Path) -> None:
    """Reference features that the backend no longer reproduces (hashes rewritten, so only the
    golden check can catch it)."""
    bad = tmp_path / "artifact"
    shutil.copytree(artifact, bad)
    golden = bad / "golden.npz"
    with np.load(golden) as g:
        parts = dict(g)
    parts["features"] = -parts["features"]
    np.savez(golden, **parts)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"] = file_records(bad)
    (bad / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rows = {r.name: r for r in D.check_artifact(bad)}
    assert rows["artifact"].status == "ok"
    assert rows["golden onnxruntime:cpu"].status == "fail"
    assert "misses the golden-set parity bound" in rows["golden onnxruntime:cpu"].detail


def test_tampered_artifact_is_red(artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "artifact"
    shutil.copytree(artifact, bad)
    with open(bad / "image_encoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\0\0\0\0")
    rows = D.check_artifact(bad)
    assert [r.status for r in rows] == ["warn", "fail"] and "sha256" in rows[1].detail.lower()
    assert rows[0].name == "artifact signature" and "NOT verified" in rows[0].detail


# ----------------------------------------------------------------------------- signatures
# issue 22, item 4: each of these passed `doctor --artifacts` before ("files verified"), because
# it checked hashes only and the attacker had rewritten them.


@pytest.fixture(scope="module")
def signed(artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(a signed copy of the artifact, the exporter's public key, an attacker's private key)."""
    from fedclip_edge.exporters.signature import sign_exported_artifact
    from fedclip_edge.signing import new_keypair

    base = tmp_path_factory.mktemp("doctor-signed")
    good = base / "artifact"
    shutil.copytree(artifact, good)
    priv, pub = new_keypair(base / "keys", "exporter")
    evil, _ = new_keypair(base / "keys", "attacker")
    sign_exported_artifact(good, priv)
    return good, pub, evil


def _flip_onnx_byte_and_rehash(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    onnx_file = dst / "image_encoder.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-100] ^= 0x01  # inside the weights (the initializers close the file)
    onnx_file.write_bytes(bytes(data))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"] = file_records(dst)
    manifest["files"].pop("manifest.sig", None)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


def _names(rows: list[D.Check]) -> dict[str, D.Check]:
    return {r.name: r for r in rows}


def test_the_untampered_signed_artifact_verifies(signed: tuple[Path, Path, Path]) -> None:
    good, pub, _ = signed
    rows = _names(D.check_artifact(good, artifact_key=pub))
    assert rows["artifact signature"].status == "ok", rows
    assert rows["artifact"].status == "ok" and rows["golden onnxruntime:cpu"].status == "ok"


def test_a_flipped_onnx_byte_with_the_manifest_rehashed_is_red(
    signed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    good, pub, _ = signed
    bad = _flip_onnx_byte_and_rehash(good, tmp_path / "a")
    rows = D.check_artifact(bad, artifact_key=pub)
    assert [(r.name, r.status) for r in rows] == [("artifact signature", "fail")]
    assert "does not verify" in rows[0].detail
    # without the key the hashes agree, and the report says plainly that nothing was verified
    rows = _names(D.check_artifact(bad))
    assert rows["artifact"].status == "ok"
    assert rows["artifact signature"].status == "warn"
    assert "NOT verified" in rows["artifact signature"].detail


def test_the_same_resigned_with_another_key_is_red(
    signed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from fedclip_edge.exporters.signature import sign_exported_artifact

    good, pub, evil = signed
    bad = _flip_onnx_byte_and_rehash(good, tmp_path / "b")
    sign_exported_artifact(bad, evil)
    rows = D.check_artifact(bad, artifact_key=pub)
    assert [(r.name, r.status) for r in rows] == [("artifact signature", "fail")]
    assert "does not verify with the given key" in rows[0].detail


def test_a_negated_weight_with_its_golden_set_regenerated_and_resigned_is_red(
    signed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The strongest tampering: the model computes something else, and every check that looks
    only inside the folder agrees with it (hashes, golden set). Only the signature can tell."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from fedclip_edge.exporters.signature import sign_exported_artifact

    good, pub, evil = signed
    bad = tmp_path / "c"
    shutil.copytree(good, bad)
    model = onnx.load(str(bad / "image_encoder.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    # the output projection: the weight of the graph's last MatMul/Gemm
    last = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
            and any(i in inits for i in n.input)][-1]
    init = inits[next(i for i in last.input if i in inits)]
    init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, str(bad / "image_encoder.onnx"))
    sess = ort.InferenceSession(str(bad / "image_encoder.onnx"),
                                providers=["CPUExecutionProvider"])
    with np.load(bad / "golden.npz") as g:
        parts = dict(g)
    before = parts["features"].copy()
    parts["features"] = sess.run(None, {sess.get_inputs()[0].name: parts["inputs"]})[0]
    assert not np.allclose(before, parts["features"], atol=1e-3)  # the model really changed
    np.savez(bad / "golden.npz", **parts)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"] = {k: v for k, v in file_records(bad).items() if k != "manifest.sig"}
    (bad / "manifest.json").write_text(json.dumps(manifest, indent=2))
    sign_exported_artifact(bad, evil)
    # what the doctor said before the fix: everything green
    rows = _names(D.check_artifact(bad))
    assert rows["artifact"].status == "ok" and rows["golden onnxruntime:cpu"].status == "ok"
    assert rows["artifact signature"].status == "warn"  # ... but now it says nothing verified
    # with the exporter's key: red, and the artifact is not opened
    rows = D.check_artifact(bad, artifact_key=pub)
    assert [(r.name, r.status) for r in rows] == [("artifact signature", "fail")]


def test_doctor_command_with_artifact_key(signed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    good, pub, evil = signed
    bad = _flip_onnx_byte_and_rehash(good, tmp_path / "d")
    rc, out, err = _doctor("--artifacts", str(bad), "--artifact-key", str(pub),
                           cache=tmp_path / "cache")
    assert rc == 1, out + err
    line = next(ln for ln in out.splitlines() if "artifact signature" in ln)
    assert line.startswith("✗") and "does not verify" in line, out


def test_a_backend_crashing_is_one_red_row(artifact: Path) -> None:
    def opener(root, backend):
        raise RuntimeError("CUDA driver version is insufficient\nmore text")

    rows = {r.name: r for r in D.check_artifact(artifact, opener=opener)}
    row = rows["golden onnxruntime:cpu"]
    assert row.status == "fail" and row.detail == (
        "RuntimeError: CUDA driver version is insufficient")


def test_both_onnxruntime_builds_installed_is_red(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(D, "_installed", lambda dist: "1.20.0")
    (row,) = D.check_onnxruntime()
    assert row.status == "fail" and "same module" in row.detail


def test_cache_without_room_is_red(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    (ok,) = D.check_cache(tmp_path / "not-yet" / "cache", min_free_bytes=1)
    (full,) = D.check_cache(tmp_path, min_free_bytes=free * 4)
    assert ok.status == "ok" and str(tmp_path / "not-yet") in ok.detail
    assert full.status == "fail" and "GiB" in full.detail
