"""`fedclip-edge doctor`: is this device ready to run the agent? One row per check.

Why: a fleet of Jetsons fails in dull ways (a venv without --system-site-packages cannot see
TensorRT, `onnxruntime` installed over `onnxruntime-gpu`, an fp16 engine that misses its
golden-set bound on this GPU, a broker certificate without the name devices use, a full disk).
Each check here is pure: it returns rows and never raises for what it finds, so the command
prints every problem at once and exits non-zero when any row failed.

Statuses: `ok`; `warn` (missing but optional here, such as TensorRT on a CPU host); `fail` (the
agent would not run, or would run wrong).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_PYTHON = (3, 10)


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def failed(rows: list[Check]) -> bool:
    """True when any row is red: the command's exit status."""
    return any(r.status == FAIL for r in rows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- environment


def check_python() -> list[Check]:
    v = sys.version_info
    ok = (v.major, v.minor) >= MIN_PYTHON
    return [Check("python", OK if ok else FAIL,
                  f"{platform.python_version()} ({sys.executable}, {platform.machine()})"
                  + ("" if ok else f": fedclip-edge needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+"))]


def check_torch() -> list[Check]:
    """torch trains the adapter; CUDA is optional (the adapter step is small)."""
    try:
        import torch
    except Exception as exc:  # ImportError, or a Jetson wheel missing its libraries (OSError)
        return [Check("torch", FAIL, f"not importable ({_first_line(exc)}): the agent's adapter "
                      "training needs it (Jetson: NVIDIA's wheel, see docs/deploy.md)")]
    rows = [Check("torch", OK, f"{torch.__version__}")]
    try:
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            cc = ".".join(map(str, torch.cuda.get_device_capability(0)))
            rows.append(Check("cuda", OK, f"{name} (compute capability {cc}), CUDA "
                              f"{torch.version.cuda}, {torch.cuda.device_count()} device(s)"))
        else:
            built = torch.version.cuda
            rows.append(Check("cuda", WARN, "no CUDA device visible to torch"
                              + (f" (torch built for CUDA {built})" if built else
                                 " (a CPU-only torch build)")))
    except Exception as exc:
        rows.append(Check("cuda", FAIL, f"CUDA is broken here: {_first_line(exc)}"))
    return rows


def _installed(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def check_onnxruntime() -> list[Check]:
    """The extractor's usual runtime; both builds in one environment shadow each other."""
    both = [d for d in ("onnxruntime", "onnxruntime-gpu") if _installed(d)]
    if len(both) == 2:
        return [Check("onnxruntime", FAIL, "both onnxruntime and onnxruntime-gpu are installed: "
                      "they install the same module; pip uninstall both, then install one")]
    try:
        import onnxruntime as ort
    except Exception as exc:
        return [Check("onnxruntime", FAIL, f"not importable ({_first_line(exc)})")]
    providers = ort.get_available_providers()
    short = ", ".join(p.replace("ExecutionProvider", "") for p in providers)
    return [Check("onnxruntime", OK, f"{ort.__version__} ({both[0] if both else '?'}): {short}")]


def check_tensorrt() -> list[Check]:
    from fedclip_edge.exporters.tensorrt_build import import_tensorrt

    trt, why = import_tensorrt()
    if trt is None:
        hint = ("; on JetPack create the venv with --system-site-packages"
                if os.path.exists("/etc/nv_tegra_release") else "")
        return [Check("tensorrt", WARN, f"not importable ({why}){hint}")]
    return [Check("tensorrt", OK, f"{trt.__version__} ({Path(trt.__file__).parent})")]


# ----------------------------------------------------------------------------- artifact


def _backends_here(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """The backends worth opening on this machine, with why the others are left out."""
    out: list[tuple[str, str]] = []
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception:
        providers = []
    int8 = manifest.get("precision") == "int8"
    for device, provider in (("cpu", "CPUExecutionProvider"), ("cuda", "CUDAExecutionProvider"),
                             ("tensorrt", "TensorrtExecutionProvider")):
        if provider in providers and (device == "cpu" or not int8):
            out.append(("onnxruntime", device))
    if (manifest.get("tensorrt") or {}).get("file"):
        out.append(("tensorrt", "cuda"))
    return out


def check_artifact(artifacts: Path, opener: Callable[..., Any] | None = None) -> list[Check]:
    """Hashes, then the golden set through every backend that can run here.

    The torch backend is left out: it rebuilds the model from open_clip weights, which a slim
    device does not have (`fedclip-edge bench extractor` compares it where it does)."""
    from fedclip_edge.errors import FedClipError
    from fedclip_edge.exporters.manifest import read_manifest, verify_artifact
    from fedclip_edge.exporters.runtimes import open_extractor

    opener = opener or open_extractor
    root = Path(artifacts)
    try:
        manifest = verify_artifact(root, read_manifest(root))
    except FedClipError as exc:
        return [Check("artifact", FAIL, f"{root}: {exc}")]
    m = manifest["model"]
    if manifest.get("kind") == "fused-classifier":
        return _check_fused(root, manifest, None if opener is open_extractor else opener)
    rows = [Check("artifact", OK, f"{root}: {m.get('name')} {manifest['precision']}, "
                  f"{len(manifest.get('files', {}))} files verified")]
    if not manifest.get("class_features"):
        rows.append(Check("artifact classes", FAIL, "no class prompts' features: the agent "
                          "needs them; re-export with --classes"))
    backends = _backends_here(manifest)
    if not backends:
        rows.append(Check("golden", FAIL, "no backend can open this artifact here"))
    for backend, device in backends:
        spec = f"{backend}:{device}"
        try:
            ext = opener(root, backend=spec)
        except FedClipError as exc:
            rows.append(Check(f"golden {spec}", FAIL, str(exc)))
            continue
        except Exception as exc:  # a runtime's own error (driver, library): still one row
            rows.append(Check(f"golden {spec}", FAIL, _first_line(exc)))
            continue
        p = ext.parity or {}
        rows.append(Check(f"golden {spec}", OK, f"{ext.name}: min cosine "
                          f"{p.get('min_cosine', float('nan')):.6f} ({p.get('status')})"))
        ext.close()
    return rows


def _check_fused(root: Path, manifest: dict[str, Any],
                 opener: Callable[..., Any] | None) -> list[Check]:
    """A fused classifier (export --adapter): its golden set through every backend here."""
    from fedclip_edge.errors import FedClipError
    from fedclip_edge.exporters.fused_runtime import describe_backends, open_fused

    opener = opener or open_fused
    mv = manifest.get("model_version") or {}
    rows = [Check("artifact", OK, f"{root}: fused classifier of {mv.get('name')} "
                  f"({manifest['model'].get('name')}, {len(manifest['classes'])} classes) "
                  f"{manifest['precision']}, {len(manifest.get('files', {}))} files verified")]
    specs = describe_backends(manifest)
    if not specs:
        rows.append(Check("golden", FAIL, "no backend can open this fused classifier here"))
    for spec in specs:
        try:
            model = opener(root, backend=spec)
        except FedClipError as exc:
            rows.append(Check(f"golden {spec}", FAIL, str(exc)))
            continue
        except Exception as exc:  # a runtime's own error (driver, library): still one row
            rows.append(Check(f"golden {spec}", FAIL, _first_line(exc)))
            continue
        p = model.parity or {}
        rows.append(Check(f"golden {spec}", OK, f"{model.name}: top-1 agreement "
                          f"{100 * p.get('top1_agreement', 0):.0f}%, max probability difference "
                          f"{p.get('max_abs_prob_diff', float('nan')):.2e} ({p.get('status')})"))
        model.close()
    return rows


# ----------------------------------------------------------------------------- broker


@dataclass(frozen=True)
class BrokerOptions:
    url: str
    username: str | None = None
    password: str | None = None
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False
    timeout_s: float = 5.0


def _tls_context(o: BrokerOptions) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=o.ca_certs)
    if o.certfile:
        ctx.load_cert_chain(o.certfile, o.keyfile)
    if o.insecure:
        ctx.check_hostname = False
    return ctx


def check_broker(o: BrokerOptions) -> list[Check]:
    """TCP, then TLS (certificate and host name), then an MQTT CONNECT with a throw-away client
    id and a clean session: it never takes over a device's session or sends a will."""
    from fedclip_edge.broker.transport import parse_broker_url
    from fedclip_edge.errors import TransportError

    try:
        host, port, url_tls, url_user, url_password = parse_broker_url(o.url)
    except TransportError as exc:
        return [Check("broker", FAIL, str(exc))]
    tls = url_tls or bool(o.ca_certs or o.certfile or o.insecure)
    try:
        sock = socket.create_connection((host, port), timeout=o.timeout_s)
    except OSError as exc:
        return [Check("broker", FAIL, f"{host}:{port} not reachable within {o.timeout_s:g}s: "
                      f"{_first_line(exc)}")]
    rows = [Check("broker", OK, f"{host}:{port} accepts TCP connections")]
    if tls:
        try:
            with _tls_context(o).wrap_socket(sock, server_hostname=host) as tsock:
                cert = tsock.getpeercert() or {}
                version = tsock.version()
            expires = cert.get("notAfter", "?")
            left = (ssl.cert_time_to_seconds(expires) - time.time()) / 86400 \
                if "notAfter" in cert else float("inf")
            status = OK if left >= 14 else (WARN if left > 0 else FAIL)
            rows.append(Check("broker tls", status, f"{version}, certificate verified for {host}"
                              f", expires {expires} ({left:.0f} days left)"
                              + (" [host name NOT checked: --tls-insecure]" if o.insecure else "")))
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            rows.append(Check("broker tls", FAIL, f"TLS to {host}:{port} failed: "
                              f"{_first_line(exc)}"))
            return rows
    else:
        sock.close()
        rows.append(Check("broker tls", WARN, "plain MQTT (no TLS): only for a loopback or "
                          "trusted network"))
    rows.append(_mqtt_connect(o, host, port, tls, o.username or url_user,
                              o.password if o.password is not None else url_password))
    return rows


def _mqtt_connect(o: BrokerOptions, host: str, port: int, tls: bool, user: str | None,
                  password: str | None) -> Check:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    done = threading.Event()
    result: dict[str, Any] = {}
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fedclip-doctor-{os.getpid()}",
                         clean_session=True, protocol=mqtt.MQTTv311)
    if user is not None:
        client.username_pw_set(user, password)
    if tls:
        client.tls_set_context(_tls_context(o))

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result["failure"] = bool(reason.is_failure)
        result["reason"] = str(reason)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect_async(host, port, keepalive=10)
        client.loop_start()
        if not done.wait(o.timeout_s):
            return Check("broker login", FAIL, f"no CONNACK within {o.timeout_s:g}s")
    except (OSError, ValueError) as exc:
        return Check("broker login", FAIL, _first_line(exc))
    finally:
        try:
            client.disconnect()
        finally:
            client.loop_stop()
    who = f"as {user}" if user else "anonymously"
    if not result["failure"]:
        return Check("broker login", OK, f"MQTT CONNECT {who} accepted")
    if user is None or password is None:
        return Check("broker login", WARN, f"MQTT CONNECT {who} refused ({result['reason']}): "
                     "pass --username and --password (or $FEDCLIP_MQTT_PASSWORD) to test an "
                     "account")
    return Check("broker login", FAIL, f"MQTT CONNECT {who} refused: {result['reason']}")


# ----------------------------------------------------------------------------- disk


def check_cache(cache: Path | None = None, min_free_bytes: int = 1 << 30) -> list[Check]:
    """Feature and engine caches grow with the data: the folder must be writable with room."""
    from fedclip_edge.models import cache_dir

    folder = Path(cache) if cache else cache_dir()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free_gb = usage.free / 2**30
    if not os.access(probe, os.W_OK):
        return [Check("cache", FAIL, f"{folder}: {probe} is not writable by this user")]
    status = OK if usage.free >= min_free_bytes else FAIL
    return [Check("cache", status, f"{folder}: {free_gb:.1f} GiB free of "
                  f"{usage.total / 2**30:.1f} GiB"
                  + ("" if status == OK else f" (under {min_free_bytes / 2**30:.1f} GiB)"))]


# ----------------------------------------------------------------------------- all


def run_checks(
    *,
    artifacts: Path | None = None,
    broker: BrokerOptions | None = None,
    cache: Path | None = None,
    min_free_bytes: int = 1 << 30,
) -> list[Check]:
    """Every check, in the order a person would fix them."""
    rows = [*check_python(), *check_torch(), *check_onnxruntime(), *check_tensorrt()]
    if artifacts is not None:
        rows += check_artifact(artifacts)
    if broker is not None:
        rows += check_broker(broker)
    rows += check_cache(cache, min_free_bytes)
    return rows
