"""`fedclip-edge bench aggregator --sites S`: N devices through S bridged site brokers.

Why: the claim "site aggregators scale the fleet past one aggregator" needs the whole path run
on real brokers: a central mosquitto, S site mosquittos each bridged to it (`broker/bridge.py`,
topics remapped under `fedclip-up`), S site aggregators (own processes, `site_child.py`) and
the central aggregator (own process, `agg_child.py` with min_clients = S). Simulated devices
(`fleet.py`: a few paho connections per site speaking for many device ids) say hello on their
site broker and publish their update once their site's round-1 global arrives. The central's
aggregate is checked against the exact float64 mean of all N frames sent (flat FedAvg).

Figures per level: round time, updates/s, peak RSS per process (aggregators and brokers), and
bytes on each link (devices -> site broker, site broker -> site aggregator, site -> central over
the bridge, central -> sites).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fedclip_edge.benchmarks.fleet import SAMPLES, FleetUpdates, Publisher, global_listener
from fedclip_edge.benchmarks.procstats import proc_cpu_s, proc_status
from fedclip_edge.broker.bridge import DEFAULT_UP_PREFIX, bridge_config
from fedclip_edge.broker.mosquitto import run_mosquitto
from fedclip_edge.errors import ConfigError, FedClipError


def _spawn(module: str, spec: dict[str, Any], path: Path) -> subprocess.Popen[bytes]:
    path.write_text(json.dumps(spec))
    return subprocess.Popen(
        [sys.executable, "-m", module, str(path)],
        stdout=open(path.with_suffix(".out"), "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )


def _broker_stats(pid: int) -> dict[str, Any]:
    st = proc_status(pid)
    return {"peak_rss": st.get("VmHWM"), "cpu_s": proc_cpu_s(pid)}


def hierarchy_round(
    n: int,
    sites: int,
    *,
    workdir: Path,
    dim: int = 512,
    seed: int = 0,
    publishers_per_site: int = 2,
    window: int = 16,
    timeout_s: float = 600.0,
    log: Any = print,
) -> dict[str, Any]:
    """One round of `n` devices spread over `sites` bridged site brokers; one report row."""
    from safetensors.torch import load_file

    from fedclip_edge.broker import protocol as P

    if sites < 1 or n < sites:
        raise ConfigError("--sites must be >= 1 and at most --devices")
    job = f"hier{n}-{uuid.uuid4().hex[:6]}"
    work = Path(workdir) / job
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    t = time.perf_counter()
    # envelopes are built as they are published (N x 2.1 MB would not fit at N = 10,000)
    fleet = FleetUpdates(n, dim, seed, job)
    ids, g, mean = fleet.ids, fleet.global_state, fleet.mean
    envelope_bytes = len(fleet[0])
    precompute_s = time.perf_counter() - t
    log(f"N={n}, {sites} sites: updates of {envelope_bytes:,} B built while publishing "
        f"({len(g)} tensors, {fleet.distinct} distinct adapters; set up in {precompute_s:.1f}s)")
    members = [list(range(k, n, sites)) for k in range(sites)]  # device i -> site i % sites
    names = [f"site{k:03d}" for k in range(sites)]
    row: dict[str, Any] = {"devices": n, "sites": sites, "dim": dim, "job": job,
                           "update_envelope_bytes": envelope_bytes,
                           "precompute_s": precompute_s, "envelopes": "built while publishing"}
    children: list[subprocess.Popen[bytes]] = []
    pubs: list[Publisher] = []
    listeners: list[Any] = []
    with contextlib.ExitStack() as stack:
        central = stack.enter_context(run_mosquitto(work / "central"))
        address = f"{central.host}:{central.port}"
        brokers = [
            stack.enter_context(run_mosquitto(
                work / name, extra=bridge_config(site=name, address=address, job=job)))
            for name in names
        ]
        try:
            common = {"job": job, "dim": dim, "seed": seed,
                      "round_timeout_s": max(5.0, timeout_s * 0.8),
                      "wait_clients_s": max(5.0, timeout_s * 0.5)}
            cspec = {**common, "url": central.url, "n": sites, "out": str(work / "central-agg"),
                     "result": str(work / "central_result.json"),
                     "log": str(work / "central.log"), "torch_threads": 0}
            children.append(_spawn("fedclip_edge.benchmarks.agg_child", cspec,
                                   work / "central_spec.json"))
            sspecs = []
            for k, name in enumerate(names):
                sspec = {**common, "url": brokers[k].url, "site": name, "n": len(members[k]),
                         "prefix": DEFAULT_UP_PREFIX, "out": str(work / f"{name}-agg"),
                         "result": str(work / f"{name}_result.json"),
                         "log": str(work / f"{name}.log")}
                sspecs.append(sspec)
                children.append(_spawn("fedclip_edge.benchmarks.site_child", sspec,
                                       work / f"{name}_spec.json"))
            got = [dict() for _ in names]  # type: list[dict[str, Any]]
            events = [threading.Event() for _ in names]
            for k in range(sites):
                listeners.append(global_listener(brokers[k].url, P.global_topic(job), got[k],
                                                 events[k]))
            for k in range(sites):
                for j in range(publishers_per_site):
                    pubs.append(Publisher(brokers[k].url, f"sim-{job}-{k}-{j}", window))
            per_site_pubs = [pubs[k * publishers_per_site:(k + 1) * publishers_per_site]
                             for k in range(sites)]

            sent_bytes: list[int] = []

            def run_all(make: Any, retain: bool) -> int:
                counts: list[int] = []
                lock = threading.Lock()

                def work_(k: int, j: int) -> None:
                    nbytes = [0]

                    def counted() -> Any:
                        for topic, payload in make(members[k][j::publishers_per_site]):
                            nbytes[0] += len(payload)
                            yield topic, payload

                    c = per_site_pubs[k][j].publish_all(counted(), retain, deadline)
                    with lock:
                        counts.append(c)
                        sent_bytes.append(nbytes[0])

                ths = [threading.Thread(target=work_, args=(k, j)) for k in range(sites)
                       for j in range(publishers_per_site)]
                for th in ths:
                    th.start()
                for th in ths:
                    th.join(max(0.1, deadline - time.monotonic()))
                return sum(counts)

            hello = run_all(lambda idx: [(P.status_topic(job, ids[i]), P.Status(
                ids[i], "online", {"train": SAMPLES}, "simulated", dim, hello=True).encode())
                for i in idx], True)
            if hello != n:
                raise FedClipError(f"only {hello} of {n} hellos were acknowledged")
            for k in range(sites):
                while not events[k].wait(0.2):
                    if any(c.poll() not in (None, 0) for c in children):
                        raise FedClipError(f"an aggregator exited early; see {work}")
                    if time.monotonic() > deadline:
                        raise FedClipError(f"no round-1 global on {names[k]}'s broker")
            t_pub = time.monotonic()
            sent_bytes.clear()
            sent = run_all(lambda idx: ((P.update_topic(job, ids[i]), fleet[i])
                                        for i in idx), False)
            row["publish_s"] = time.monotonic() - t_pub
            for c in children:
                try:
                    c.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.terminate()
                    c.wait(timeout=10)
            row["brokers"] = {"central": _broker_stats(central.pid),
                              **{names[k]: _broker_stats(b.pid) for k, b in enumerate(brokers)}}
        finally:
            for p in pubs:
                p.close()
            for lst in listeners:
                with contextlib.suppress(Exception):
                    lst.disconnect()
                lst.loop_stop()
            for c in children:
                if c.poll() is None:
                    c.kill()
                    c.wait(timeout=10)

    def read(path: str) -> dict[str, Any]:
        p = Path(path)
        return json.loads(p.read_text()) if p.is_file() else {}

    cres = read(cspec["result"])
    sres = [read(s["result"]) for s in sspecs]
    accepted_dev = sum(int(r.get("accepted", 0)) for r in sres)
    err = None
    final = Path(cspec["out"]) / "rounds" / "global_r0001.safetensors"
    if final.is_file():
        agg = load_file(str(final))
        err = max(float((agg[k].double() - mean[k]).abs().max()) for k in g)
    site_rates = [
        r["accepted"] / (r["round_close"] - r["first_update_rx"])
        for r in sres if r.get("round_close") and r.get("first_update_rx")
        and r["round_close"] > r["first_update_rx"]
    ]
    last_site_close = max((r.get("round_close") or 0.0) for r in sres) if sres else 0.0
    row.update({
        "ok": bool(cres.get("ok")) and all(r.get("ok") for r in sres),
        "sent": sent,
        "accepted_by_sites": accepted_dev,
        "accepted_by_central": cres.get("accepted"),
        "loss": n - accepted_dev,
        "mean_max_abs_err": err,
        "torch_equal_tolerance": 1e-5,
        "end_to_end_s": (cres["round_close"] - t_pub) if cres.get("round_close") else None,
        "devices_per_s_end_to_end": n / (cres["round_close"] - t_pub)
        if cres.get("round_close") else None,
        "central": {
            "round_wall_s": cres.get("round_wall_s"),
            "peak_rss": cres.get("peak_rss"),
            "updates": cres.get("accepted"),
            "update_bytes_rx": cres.get("update_bytes_rx"),
            "after_last_site_s": (cres["round_close"] - last_site_close)
            if cres.get("round_close") else None,
            "rejected": cres.get("rejected"),
        },
        "sites": [{
            "site": r.get("site"), "devices": len(members[k]), "accepted": r.get("accepted"),
            "round_wall_s": r.get("round_wall_s"),
            "updates_per_s": site_rates[k] if k < len(site_rates) else None,
            "handle_update_ms_mean": 1000 * r["handle_update_s"] / r["accepted"]
            if r.get("accepted") else None,
            "peak_rss": r.get("peak_rss"),
            "bytes_site_broker_to_site_aggregator": (r.get("local_link") or {}).get("bytes_down"),
            "bytes_site_to_central_bridge": (r.get("upstream_link") or {}).get("bytes_up"),
            "bytes_central_to_site": (r.get("upstream_link") or {}).get("bytes_down"),
            "rejected": r.get("rejected"),
        } for k, r in enumerate(sres)],
        "bytes_devices_to_site_brokers": sum(sent_bytes),
    })
    rates = [s["updates_per_s"] for s in row["sites"] if s["updates_per_s"]]
    row["site_updates_per_s_sum"] = sum(rates) if rates else None
    log(
        f"N={n}, {sites} sites: sites accepted {accepted_dev}/{n}, central {cres.get('accepted')}"
        f"/{sites}; end to end {row['end_to_end_s'] or 0:.1f}s "
        f"({row['devices_per_s_end_to_end'] or 0:.1f} devices/s); max error {err}"
    )
    return row


def run_hierarchy_bench(
    devices: list[int], sites: int, out: Path, *, dim: int = 512, seed: int = 0,
    publishers_per_site: int = 2, window: int = 16, timeout_s: float = 600.0,
    keep: bool = False, log: Any = print,
) -> dict[str, Any]:
    """Every N in `devices` through `sites` bridged sites; writes OUT/bench_aggregator.json."""
    import platform
    import shutil
    import tempfile

    from fedclip_edge.benchmarks.procstats import machine_info

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-hier-", dir=out))
    report: dict[str, Any] = {
        "schema": "fedclip-edge/bench-aggregator-hierarchy/v1",
        "complete": False,
        "command": "fedclip-edge bench aggregator " + " ".join(sys.argv[3:])
        if sys.argv[1:3] == ["bench", "aggregator"] else None,
        "machine": {**machine_info(), "load_average_before": list(os.getloadavg())},
        "config": {"devices": devices, "sites": sites, "dim": dim, "seed": seed,
                   "publishers_per_site": publishers_per_site, "window": window,
                   "timeout_s": timeout_s, "python": platform.python_version()},
        "topology": (
            "one central mosquitto; one mosquitto per site bridged to it (broker/bridge.py: "
            "fedclip-up/ <-> fedclip/, QoS 1, cleansession false); a SiteAggregator process per "
            "site (devices' topics and its upstream on the site broker); the central Aggregator "
            "process on the central broker with min_clients = sites; simulated devices: "
            f"{publishers_per_site} paho connections per site broker"
        ),
        "rows": [],
    }
    path = out / "bench_aggregator.json"
    try:
        for n in devices:
            report["rows"].append(hierarchy_round(
                n, sites, workdir=work, dim=dim, seed=seed,
                publishers_per_site=publishers_per_site, window=window, timeout_s=timeout_s,
                log=log))
            path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    finally:
        report["machine"]["load_average_after"] = list(os.getloadavg())
        if keep:
            report["workdir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["complete"] = True
    report["zero_loss"] = all(r["loss"] == 0 and r["ok"] for r in report["rows"])
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report
