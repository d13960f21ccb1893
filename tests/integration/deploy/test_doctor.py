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
    assert [r.status for r in rows] == ["fail"] and "sha256" in rows[0].detail.lower()


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
