"""`fedclip-edge serve` end to end: a real uvicorn on a free loopback port, a real HTTP client
(httpx), the real classifier over a model store of the tiny artifact.

Every moment a test depends on is made certain: the model worker is held by a hook (a
threading.Event) while the queue fills, and a swap is waited for by its effect (an answer
naming the new version), never by a sleep. Each answer is checked against the bare classifier
of the version it names, so "each answer names the version that produced it" is tested, not
assumed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from support import tiny_artifact
from support.serving import add_version, jpeg_images, random_jpeg, running

from fedclip_edge.serving.classifier import open_classifier
from fedclip_edge.serving.service import create_app
from fedclip_edge.serving.store import ModelStore

pytestmark = pytest.mark.integration

N_IMAGES = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data, artifact = tiny_artifact.shared_artifact(tmp_path_factory)
    classes = json.loads((artifact / "manifest.json").read_text())["class_features"]["classes"]
    root = tmp_path_factory.mktemp("serve") / "models"
    v1 = add_version(root, artifact, classes, seed=0)
    v2 = add_version(root, artifact, classes, seed=1, kind="personal")
    ModelStore(root).promote(v1, "test")
    images = jpeg_images(data, N_IMAGES)
    expected = {}  # version -> [probs row per image], from the bare classifier
    for v in (v1, v2):
        clf = open_classifier(root / "versions" / v)
        assert clf.version == v
        expected[v] = [clf.predict(clf.decode(img)[None])[0] for img in images]
    # the two versions answer differently, or a swap could not be seen in the answers
    assert any(not np.allclose(a, b, atol=1e-3) for a, b in zip(expected[v1], expected[v2],
                                                                 strict=True))
    return {"root": root, "artifact": artifact, "classes": classes, "v1": v1, "v2": v2,
            "images": images, "expected": expected}


def _check_answer(setup: dict, r: httpx.Response, i: int) -> str:
    assert r.status_code == 200, r.text
    body = r.json()
    v = body["model_version"]
    probs = setup["expected"][v][i]
    best = int(np.argmax(probs))
    assert body["label"] == setup["classes"][best]
    assert abs(body["score"] - float(probs[best])) < 1e-3, (body, probs)
    assert body["topk"][0] == [body["label"], body["score"]] and len(body["topk"]) == 3
    return v


def _metrics(client: httpx.Client) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(client.get("/metrics").text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _wait(pred, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Gate:
    """before_batch hook: holds the model worker until released, when armed."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sizes: list[int] = []

    def __call__(self, n: int) -> None:
        self.sizes.append(n)
        if self.armed.is_set():
            self.armed.clear()
            self.entered.set()
            assert self.release.wait(60)


def test_concurrent_requests_are_batched_and_each_answer_is_the_models(setup: dict) -> None:
    gate = Gate()
    app = create_app(setup["root"], max_batch=8, max_wait_ms=5, queue_size=16,
                     before_batch=gate)
    imgs = setup["images"]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/healthz").json()["model_version"] == setup["v1"]
        gate.armed.set()

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
                first = asyncio.ensure_future(ac.post("/classify", content=imgs[0]))
                await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 60)
                rest = [asyncio.ensure_future(ac.post("/classify", content=imgs[i]))
                        for i in range(N_IMAGES)]
                await asyncio.get_running_loop().run_in_executor(
                    None, _wait, lambda: c.get("/healthz").json()["queue"] == N_IMAGES,
                    "8 waiting")
                gate.release.set()
                return [await first, *[await r for r in rest]]

        answers = asyncio.run(burst())
        versions = {_check_answer(setup, r, i) for r, i in zip(answers, [0, *range(N_IMAGES)],
                                                               strict=True)}
        assert versions == {setup["v1"]}
        # the held one alone, then the 8 that waited as one batch
        assert gate.sizes[-2:] == [1, 8]
        m = _metrics(c)
        assert m['fedclip_serve_requests_total{status=200}'] == 1 + N_IMAGES
        assert m["fedclip_serve_batch_size_sum"] == 1 + N_IMAGES
        assert m["fedclip_serve_batch_size_count"] == 2
        assert m["fedclip_serve_request_seconds_count"] == 1 + N_IMAGES
        assert m[f"fedclip_serve_model_info{{source={setup['root']},version={setup['v1']}}}"] == 1
        # the same image through top_k=1
        one = c.post("/classify?top_k=1", content=imgs[0]).json()
        assert len(one["topk"]) == 1


def _png_bomb(side: int = 60_000) -> bytes:
    """A valid PNG header claiming side x side RGB pixels (3.6 G pixels) over a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))


BAD_INPUTS = {
    "empty body": (b"", 400, "empty_body"),
    "truncated JPEG": (None, 422, "bad_image"),
    "PNG header then garbage": (b"\x89PNG\r\n\x1a\n" + os.urandom(2000), 422, "bad_image"),
    "decompression bomb": (_png_bomb(), 422, "bad_image"),
    "20 kB of random bytes": (np.random.default_rng(7).bytes(20_000), 422, "bad_image"),
    "text": (b"hello, this is not an image", 422, "bad_image"),
}


@pytest.fixture(scope="module")
def server(setup: dict):
    # one version folder, not the store: no watcher here to swap while other tests move current
    app = create_app(setup["root"] / "versions" / setup["v1"], max_batch=8, queue_size=32,
                     max_body_bytes=256 * 1024)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_with_one_line_and_the_service_stays_up(
    setup: dict, server: httpx.Client, what: str
) -> None:
    body, status, reason = BAD_INPUTS[what]
    if body is None:
        body = setup["images"][0][: len(setup["images"][0]) // 2]
    r = server.post("/classify", content=body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["reason"] == reason and err["error"] and "\n" not in err["error"], err
    assert "Traceback" not in r.text
    assert server.get("/healthz").status_code == 200
    _check_answer(setup, server.post("/classify", content=setup["images"][1]), 1)


def test_oversize_bodies_get_413_declared_or_streamed(setup: dict, server: httpx.Client) -> None:
    big = random_jpeg(0, size=1200)
    assert len(big) > 256 * 1024
    r = server.post("/classify", content=big)
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"

    def stream():  # chunked: no Content-Length, the limit is counted while reading
        for i in range(0, len(big), 16384):
            yield big[i : i + 16384]

    r = server.post("/classify", content=stream())
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    m = _metrics(server)
    assert m["fedclip_serve_errors_total{reason=body_too_large}"] >= 2
    _check_answer(setup, server.post("/classify", content=setup["images"][2]), 2)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=3000),
        st.tuples(st.integers(0, N_IMAGES - 1), st.lists(st.tuples(st.integers(0, 10**6),
                                                                   st.integers(0, 255)),
                                                         min_size=1, max_size=20)),
        st.tuples(st.integers(0, N_IMAGES - 1), st.integers(1, 5000)),
    )
)
def test_fuzzed_bodies_never_take_the_service_down(setup: dict, server: httpx.Client,
                                                   data) -> None:
    """Random bytes, real JPEGs with bytes overwritten, real JPEGs cut short: a 200 or a 4xx
    with one line; never a 5xx, and the service answers the next request."""
    if isinstance(data, tuple) and isinstance(data[1], list):
        body = bytearray(setup["images"][data[0]])
        for pos, val in data[1]:
            body[pos % len(body)] = val
        body = bytes(body)
    elif isinstance(data, tuple):
        img = setup["images"][data[0]]
        body = img[: data[1] % len(img)]
    else:
        body = data
    r = server.post("/classify", content=body)
    assert r.status_code in (200, 400, 413, 422), r.text
    if r.status_code != 200:
        assert "\n" not in r.json()["error"]
    assert server.get("/healthz").status_code == 200


def test_a_full_queue_answers_503_with_retry_after_then_drains(setup: dict) -> None:
    gate = Gate()
    app = create_app(setup["root"], max_batch=1, max_wait_ms=0, queue_size=2, before_batch=gate)
    imgs = setup["images"]
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        gate.armed.set()

        async def fill() -> tuple[list[httpx.Response], httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
                held = asyncio.ensure_future(ac.post("/classify", content=imgs[0]))
                await asyncio.get_running_loop().run_in_executor(None, gate.entered.wait, 60)
                waiting = [asyncio.ensure_future(ac.post("/classify", content=imgs[i]))
                           for i in (1, 2)]
                await asyncio.get_running_loop().run_in_executor(
                    None, _wait, lambda: c.get("/healthz").json()["queue"] == 2, "a full queue")
                refused = await ac.post("/classify", content=imgs[3])  # the queue is full now
                gate.release.set()
                return [await held, *[await w for w in waiting]], refused

        done, refused = asyncio.run(fill())
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert refused.json()["reason"] == "queue_full"
        for r, i in zip(done, (0, 1, 2), strict=True):
            _check_answer(setup, r, i)
        assert _metrics(c)["fedclip_serve_errors_total{reason=queue_full}"] == 1
        _check_answer(setup, c.post("/classify", content=imgs[3]), 3)  # room again


def test_hot_swap_under_load_drops_nothing_and_each_answer_names_its_version(
    setup: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """4 clients send without pause while `current` moves v1 -> v2 -> v1 -> v2, then to a
    version whose encoder artifact is gone (it fails to open: logged, the old one serves on)."""
    root, v1, v2 = setup["root"], setup["v1"], setup["v2"]
    store = ModelStore(root)
    store.promote(v1, "test start")
    app = create_app(root, max_batch=4, max_wait_ms=2, queue_size=64, poll_s=0.05)
    imgs = setup["images"]
    answers: list[tuple[int, httpx.Response | BaseException]] = []
    seen: list[str] = []
    caplog.set_level(logging.INFO, logger="fedclip_edge.serving")
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:

        async def load(stop: asyncio.Event, k: int) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
                i = k
                while not stop.is_set():
                    try:
                        r = await ac.post("/classify", content=imgs[i % N_IMAGES])
                        if r.status_code == 200:
                            seen.append(r.json()["model_version"])
                    except Exception as exc:  # a dropped connection counts as a failure
                        r = exc
                    answers.append((i % N_IMAGES, r))
                    i += 1

        async def until_answered_by(version: str) -> None:
            n = len(seen)
            for _ in range(6000):
                if version in seen[n:]:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"no answer named {version}")

        async def main() -> None:
            stop = asyncio.Event()
            clients = [asyncio.ensure_future(load(stop, k)) for k in range(4)]
            await until_answered_by(v1)
            for target in (v2, v1, v2):
                await asyncio.get_running_loop().run_in_executor(
                    None, store.promote, target, "test swap")
                await until_answered_by(target)
            stop.set()
            await asyncio.gather(*clients)

        asyncio.run(main())
        failures = [(i, r) for i, r in answers
                    if isinstance(r, BaseException) or r.status_code != 200]
        assert not failures, failures[:3]
        assert len(answers) >= 8
        versions = {_check_answer(setup, r, i) for i, r in answers}
        assert versions == {v1, v2}
        m = _metrics(c)
        assert m["fedclip_serve_model_swaps_total{result=ok}"] == 3
        assert m["fedclip_serve_errors_total{reason=internal}"] == 0

        # a version that cannot be opened: one log line, the old version keeps answering
        broken = add_version(root, setup["artifact"], setup["classes"], seed=5,
                             artifact_path=tmp_path / "gone")
        store.promote(broken, "test broken")
        r = c.post("/reload").json()
        assert r["swapped"] is False and r["model_version"] == v2  # the watcher may be first
        _wait(lambda: c.get("/healthz").json()["failed_version"] == broken, "the failed swap")
        assert _check_answer(setup, c.post("/classify", content=imgs[0]), 0) == v2
        lines = [rec.getMessage() for rec in caplog.records
                 if f"hot swap to {broken} failed" in rec.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0] and f"still serving {v2}" in lines[0]
        assert _metrics(c)["fedclip_serve_model_swaps_total{result=failed}"] == 1
        # and a good version after it is picked up again
        store.promote(v1, "test recover")
        assert c.post("/reload").json()["model_version"] == v1
        assert _check_answer(setup, c.post("/classify", content=imgs[1]), 1) == v1


def test_a_store_without_a_current_version_answers_503_until_one_is_promoted(
    setup: dict, tmp_path: Path
) -> None:
    root = tmp_path / "fresh"
    v = add_version(root, setup["artifact"], setup["classes"], seed=0)
    app = create_app(root, poll_s=0.05)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        h = c.get("/healthz")
        assert h.status_code == 503 and h.json()["status"] == "no_model"
        r = c.post("/classify", content=setup["images"][0])
        assert r.status_code == 503 and r.json()["reason"] == "no_model"
        ModelStore(root).promote(v, "first")
        _wait(lambda: c.get("/healthz").status_code == 200, "the first version")
        assert _check_answer(setup, c.post("/classify", content=setup["images"][0]), 0) == v


def test_the_serve_command_starts_answers_and_stops_on_sigterm(setup: dict) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedclip_edge.cli", "serve", "--model", str(setup["root"]),
         "--port", "0", "--log-level", "info"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = None
        lines = []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"running on (http://127\.0\.0\.1:\d+)", line, re.I)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/healthz").json()["status"] == "ok"
            _check_answer(setup, c.post("/classify", content=setup["images"][0]), 0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_serve_command_refuses_a_missing_model_in_one_line(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "fedclip_edge.cli", "serve", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error:"), res.stderr
