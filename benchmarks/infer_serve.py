"""The service half of `bench infer`: `fedclip-edge serve` under concurrent clients, against
the bare classifier, with hot swaps during the load.

Why a child process for the service: it then has its own interpreter (its GIL is not shared
with the clients), as on a device where the callers are other programs. The clients are
asyncio tasks on one httpx connection pool in this process. The bare classifier runs here first,
alone: decode + predict of `max_batch` images per call, in a loop, for the same time. Swaps move
the store's `current` between its two versions at even intervals; the service finds each within
its poll interval, opens the version beside the old one and switches.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedclip_edge.benchmarks.procstats import cpu_snapshot, others_cpu_share
from fedclip_edge.errors import ExportError

POLL_S = 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pcts(lat: Sequence[float]) -> dict[str, float | None]:
    if not lat:
        return {"p50_ms": None, "p99_ms": None}
    return {"p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99))}


def bare_loop(clf: Any, images: Sequence[bytes], batch: int, seconds: float) -> dict[str, Any]:
    """The classifier alone: batches of `batch` images from bytes, back to back."""
    n, lat, i = 0, [], 0
    before = cpu_snapshot()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pick = [images[(i + k) % len(images)] for k in range(batch)]
        i += batch
        t = time.perf_counter()
        clf.predict(np.stack([clf.decode(b) for b in pick]))
        lat.append(time.perf_counter() - t)
        n += batch
    elapsed = time.perf_counter() - t0
    return {"images": n, "seconds": elapsed, "images_per_s": n / elapsed,
            "others_cpu_share": others_cpu_share(before, cpu_snapshot()), **_pcts(lat)}


async def _client_load(url: str, images: Sequence[bytes], clients: int, seconds: float,
                       swap_at: Sequence[float], swap: Callable[[int], str]
                       ) -> dict[str, Any]:
    """Clients post without pause; swap k happens at swap_at[k] (or when swap k-1 has taken
    effect, if later); the run lasts `seconds` and at least until the last swap answered."""
    import httpx

    records: list[tuple[float, float, int, str]] = []  # (end time, latency, status, version)
    errors: list[str] = []
    swaps: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as ac:
        t0 = time.perf_counter()
        stop = asyncio.Event()

        async def client(k: int) -> None:
            i = k
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    r = await ac.post("/classify", content=images[i % len(images)])
                    version = r.json().get("model_version", "") if r.status_code == 200 else ""
                    records.append((time.perf_counter() - t0, time.perf_counter() - t,
                                    r.status_code, version))
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                except Exception as exc:  # a dropped connection is a failed request
                    records.append((time.perf_counter() - t0, time.perf_counter() - t, 0, ""))
                    errors.append(f"{type(exc).__name__}: {exc}")
                i += clients

        async def swapper() -> None:
            loop = asyncio.get_running_loop()
            for k, at in enumerate(swap_at):
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                asked = time.perf_counter()
                target = await loop.run_in_executor(None, swap, k)
                took = None
                while time.perf_counter() - asked < 600:
                    h = (await ac.get("/healthz")).json()
                    if h.get("model_version") == target:
                        took = time.perf_counter() - asked
                        break
                    await asyncio.sleep(0.1)
                swaps.append({"to": target, "at_s": asked - t0, "took_s": took})

        async def timer() -> None:
            await asyncio.sleep(seconds)

        tasks = [asyncio.ensure_future(client(k)) for k in range(clients)]
        await asyncio.gather(swapper(), timer())
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        metrics = (await ac.get("/metrics")).text
    return {"records": records, "errors": errors, "seconds": elapsed, "metrics": metrics,
            "swaps": swaps}


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def load_service(
    prep: dict[str, Any], images: Sequence[bytes], *, seconds: float, clients: int,
    max_batch: int, swaps: int, threads: int | None, say: Callable[[str], None],
    backend: str = "onnxruntime",
) -> dict[str, Any]:
    """Bare classifier for `seconds`, then the service for `seconds` with `swaps` hot swaps."""
    from fedclip_edge.serving.classifier import open_classifier
    from fedclip_edge.serving.store import ModelStore

    store_root: Path = prep["store"]
    store = ModelStore(store_root)
    v1, v2 = prep["versions"][:2]
    store.promote(v1, "bench infer: load run")
    say(f"{prep['model']}: bare classifier ({backend}, batch {max_batch}) for {seconds:g} s")
    clf = open_classifier(store_root / "versions" / v1, backend=backend,
                          max_batch=max_batch, threads=threads)
    for _ in range(2):  # warm-up
        clf.predict(np.stack([clf.decode(b) for b in images[:max_batch]]))
    bare = bare_loop(clf, images, max_batch, seconds)
    clf.close()

    port = _free_port()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "fedclip_edge.cli", "serve", "--model", str(store_root),
           "--port", str(port), "--max-batch", str(max_batch), "--backend", backend,
           "--queue-size", str(max(64, 4 * clients)), "--poll-s", str(POLL_S)]
    log_path = store_root.parent / "serve.log"
    say(f"{prep['model']}: the service, {clients} clients for {seconds:g} s, {swaps} hot swaps "
        f"(log: {log_path})")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise ExportError(f"the service exited ({proc.returncode}): "
                                  + log_path.read_text()[-2000:])
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ExportError("the service did not come up in 600 s")
            time.sleep(0.2)
        for b in images[:max_batch]:  # warm-up, as the bare classifier had
            httpx.post(url + "/classify", content=b, timeout=120)
        targets = [v2 if k % 2 == 0 else v1 for k in range(swaps)]
        swap_at = [seconds * (k + 1) / (swaps + 1) for k in range(swaps)]

        def swap(k: int) -> str:
            store.promote(targets[k], f"bench infer: swap {k + 1}")
            return targets[k]

        # steady state first (the throughput goal), then the same load with the swaps
        before = cpu_snapshot()
        steady = asyncio.run(_client_load(url, images, clients, seconds, [], swap))
        steady["others_cpu_share"] = others_cpu_share(before, cpu_snapshot())
        say(f"{prep['model']}: the same load with {swaps} hot swaps")
        before = cpu_snapshot()
        swapping = asyncio.run(_client_load(url, images, clients, seconds, swap_at, swap))
        swapping["others_cpu_share"] = others_cpu_share(before, cpu_snapshot())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    phases = {"steady": _phase(steady), "swaps": _phase(swapping)}
    recs = swapping["records"]
    ok = [r for r in recs if r[2] == 200]
    by_version: dict[str, int] = {}
    for r in ok:
        by_version[r[3]] = by_version.get(r[3], 0) + 1
    ordered = [r[3] for r in sorted(ok)]
    changes = sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if a != b)
    steady_ips = phases["steady"]["images_per_s"]
    return {
        "model": prep["model"], "backend": backend, "max_batch": max_batch,
        "clients": clients, "seconds": seconds,
        "bare": bare,
        "service": phases["steady"],
        "service_during_swaps": phases["swaps"],
        "ratio": steady_ips / bare["images_per_s"] if bare["images_per_s"] else None,
        "ratio_during_swaps": (phases["swaps"]["images_per_s"] / bare["images_per_s"]
                               if bare["images_per_s"] else None),
        "swaps_done": sum(1 for w in swapping["swaps"] if w["took_s"] is not None),
        "swaps": swapping["swaps"],
        "answers_by_version": by_version, "version_changes_seen": changes,
        "swaps_ok_metric": _metric(swapping["metrics"],
                                   'fedclip_serve_model_swaps_total{result="ok"}'),
        "failed": sum(p["requests"] - p["ok"] for p in phases.values()),
        "errors": (steady["errors"] + swapping["errors"])[:20],
        "note": "clients run in the benchmark's process on the same cores as the service; "
                "steady: --serve-seconds without swaps; swaps: --serve-seconds and at least "
                "until the last swap took effect (opening a version costs CPU beside serving)",
    }


def _phase(res: dict[str, Any]) -> dict[str, Any]:
    recs = res["records"]
    ok = [r for r in recs if r[2] == 200]
    m = res["metrics"]
    bsum = _metric(m, "fedclip_serve_batch_size_sum")
    bcount = _metric(m, "fedclip_serve_batch_size_count")
    return {"requests": len(recs), "ok": len(ok), "seconds": res["seconds"],
            "images_per_s": len(ok) / res["seconds"], **_pcts([r[1] for r in ok]),
            "mean_batch_cumulative": (bsum / bcount) if bsum and bcount else None,
            "others_cpu_share": res.get("others_cpu_share")}
