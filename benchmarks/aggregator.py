"""`fedclip-edge bench aggregator`: N simulated devices, one round, through a real broker.

Why: the aggregator must take 1000 devices' updates in one round without loss and without
holding N copies of the adapter. This runs the real `Aggregator` (its own process, so its memory
is its own) against a real broker (a private mosquitto on a free loopback port by default) and
simulates N devices with a small pool of paho connections: each connection announces many device
ids through their retained hello statuses and, once the round-1 global arrives, publishes each
device's precomputed, valid `update` envelope on that device's topic. 1000 TCP connections are
not needed to load the aggregator: it sees the same topics, envelopes and frames either way.

Updates come in antithetic pairs (global + d, global - d), so their mean is the global adapter
itself up to float32 rounding: the aggregated result is checked against that and against the
exact float64 mean of the frames sent. Both processes share CLOCK_MONOTONIC (same machine), so
"publish start -> last update received at the aggregator" is a valid cross-process interval.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from fedclip_edge.broker.procs import stop_process
from fedclip_edge.errors import ConfigError, FedClipError
from fedclip_edge.names import unknown_name

SCHEMA = "fedclip-edge/bench-aggregator/v1"
DEFAULT_DEVICES = (10, 100, 1000)
HOST = "127.0.0.1"
PAIR_VARIANTS = 8  # distinct random deltas (each used as +d and -d)
DELTA_SCALE = 0.01
SAMPLES = 24  # train samples each simulated device reports

# What reading fedclip_edge/aggregator.py (and transport.py) for per-update cost in N found.
# Two findings of the first runs were fixed since (see docs/benchmarks.md): the finiteness check
# now uses numpy (torch's thread pool made it ~100x slower on a busy machine), and the latency
# plot is drawn every 5 rounds, as percentiles beyond 12 clients. The rest stand.
FINDINGS = (
    "Aggregator._round_done() runs before every received message and builds `self.active` (a "
    "new set over all N devices) and `set(self._answered)` (up to N): O(N) per message, O(N^2) "
    "per round. The same holds for the wait-for-clients predicate `len(self.active) >= "
    "min_clients`, evaluated per hello while N devices register.",
    "Transport inbox is bounded by count (10,000 messages), not bytes: when updates arrive "
    "faster than the aggregator validates them, the backlog holds whole payloads (2.1 MB each "
    "for ViT-B-32), so peak memory follows the backlog (up to N payloads), although aggregation "
    "itself keeps one float64 running sum; above 10,000 queued messages updates are dropped and "
    "only counted in Transport.rejected['inbox_full'].",
    "Each update payload is copied once more while decoding: decode_envelope slices the body "
    "out with bytes(...) (one transient 2.1 MB copy per update, not retained).",
    "_publish_global() sorts all answered clients for `have` (O(N log N)) and re-encodes the "
    "whole frame on every call; it is called per (re)joining device when the global is chunked "
    "(full-model payloads only), i.e. O(N) re-encodes and re-publishes in that case.",
    "_write_reports() re-reads and re-summarises the whole metrics.jsonl after every round "
    "(O(N x rounds) per round; the plot is now drawn every 5 rounds only). state.json also "
    "lists every device each round (O(N), fine).",
)


# ----------------------------------------------------------------------------- memory helpers


def _proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM etc. from /proc/PID/status, in bytes ({} off Linux)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.startswith("Vm") and val.strip().endswith("kB"):
                out[key] = int(val.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_cpu_s(pid: int) -> float | None:
    """utime + stime of another process (e.g. mosquitto), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ----------------------------------------------------------------------------- brokers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin"):
        cand = Path(folder) / "mosquitto"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


@contextlib.contextmanager
def broker_for_bench(
    url: str | None, workdir: Path, kind: str = "auto"
) -> Iterator[dict[str, Any]]:
    """{'url', 'kind', 'pid'?}: the given broker, or a private one on a free loopback port
    (mosquitto when installed, else the embedded amqtt broker), stopped at exit."""
    if url:
        yield {"url": url, "kind": "external", "pid": None}
        return
    binary = _mosquitto_binary() if kind in ("auto", "mosquitto") else None
    if kind == "mosquitto" and binary is None:
        raise ConfigError("--broker-kind mosquitto: no mosquitto binary found")
    if binary is None:
        from fedclip_edge.broker.embedded import EmbeddedBroker

        with EmbeddedBroker(HOST, 0, start_timeout=10.0) as eb:
            yield {"url": f"mqtt://{HOST}:{eb.port}", "kind": "embedded amqtt", "pid": None}
        return
    port = _free_port()
    conf = f"listener {port} {HOST}\nallow_anonymous true\npersistence false\n"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        conf = "user root\n" + conf
    workdir.mkdir(parents=True, exist_ok=True)
    conf_path, log_path = workdir / "mosquitto.conf", workdir / "mosquitto.log"
    conf_path.write_text(conf)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [binary, "-c", str(conf_path)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 10.0
        while True:
            if proc.poll() is not None:
                raise FedClipError(f"mosquitto exited: {log_path.read_text(errors='replace')}")
            try:
                socket.create_connection((HOST, port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise FedClipError(f"mosquitto did not listen on {port} within 10 s") from None
                time.sleep(0.05)
        version = subprocess.run(
            [binary, "-h"], capture_output=True, text=True, timeout=5
        ).stdout.splitlines()[:1]
        yield {
            "url": f"mqtt://{HOST}:{port}",
            "kind": "private mosquitto (default limits)",
            "version": version[0] if version else "",
            "config": conf.replace("user root\n", ""),
            "pid": proc.pid,
        }
    finally:
        stop_process(proc)


# ----------------------------------------------------------------------------- the aggregator


def _serve(spec_path: Path) -> int:
    """Child process: the real Aggregator for one round, instrumented; writes spec['result']."""
    import tracemalloc

    from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
    from fedclip_edge.broker.transport import MqttTransport

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("torch_threads"):
        import torch

        torch.set_num_threads(int(spec["torch_threads"]))
    log_fh = open(spec["log"], "a", buffering=1)  # noqa: SIM115 - closed below

    class Transport(MqttTransport):
        """Notes when updates reach the transport (paho's thread) and the deepest inbox."""

        first_rx: float | None = None
        last_rx: float | None = None
        updates_rx = 0
        update_bytes_rx = 0
        max_inbox = 0

        def _on_raw(self, topic: str, payload: bytes, retained: bool) -> None:
            if "/update/" in topic:
                now = time.monotonic()
                self.first_rx = self.first_rx or now
                self.last_rx = now
                self.updates_rx += 1
                self.update_bytes_rx += len(payload)
            super()._on_raw(topic, payload, retained)
            self.max_inbox = max(self.max_inbox, self._inbox.qsize())

    class Agg(Aggregator):
        """Times the round's phases and samples memory at its start and close."""

        closed_at: float | None = None
        handle_update_s = 0.0
        mem: dict[str, Any] = {}

        def _run_round(self, rnd: int) -> bool:
            self.registered = len(self.devices)
            tracemalloc.reset_peak()
            self.mem = {
                "rss_round_start": _proc_status().get("VmRSS"),
                "hwm_reset": _reset_peak_rss(),
                "traced_round_start": tracemalloc.get_traced_memory()[0],
            }
            self.round_start = self.clock()
            return super()._run_round(rnd)

        def _round_done(self) -> bool:
            done = super()._round_done()
            if done and self.closed_at is None:
                self.closed_at = self.clock()
            return done

        def _handle(self, msg: Any) -> None:
            if "/update/" not in msg.topic:
                return super()._handle(msg)
            t = time.perf_counter()
            super()._handle(msg)
            self.handle_update_s += time.perf_counter() - t

        def _commit(self, rnd: int, state: Any, wall: float, retries: int) -> None:
            self.round_wall = wall
            st = _proc_status()
            cur, peak = tracemalloc.get_traced_memory()
            self.mem.update(
                {"rss_round_close": st.get("VmRSS"), "hwm_round": st.get("VmHWM"),
                 "traced_round_peak": peak, "traced_round_close": cur}
            )
            t = time.perf_counter()
            super()._commit(rnd, state, wall, retries)
            self.commit_s = time.perf_counter() - t

        def _write_reports(self, plot: bool = True) -> None:
            t = time.perf_counter()
            super()._write_reports(plot=plot)
            self.reports_s = time.perf_counter() - t

    cfg = AggregatorConfig(
        job=spec["job"],
        rounds=1,
        out=Path(spec["out"]),
        min_clients=spec["n"],
        round_timeout_s=spec["round_timeout_s"],
        seed=spec["seed"],
        dim=spec["dim"],
        on_short="stop",
        wait_clients_s=spec["wait_clients_s"],
        upload_grace_s=0.0,
        connect_timeout_s=10.0,
    )
    tracemalloc.start()
    transport = Transport(spec["url"], f"aggregator-{spec['job']}", username="aggregator")
    agg = Agg(transport, cfg, log=lambda s: log_fh.write(s + "\n"))
    result: dict[str, Any] = {"ok": False}
    t0 = time.monotonic()
    try:
        agg.run()
        result["ok"] = True
    except FedClipError as exc:
        result["error"] = str(exc)
    finally:
        transport.close()
        tracemalloc.stop()
    import resource

    result.update(
        {
            "started": t0,
            "registered": getattr(agg, "registered", len(agg.devices)),
            "accepted": agg.counters.get("accepted", 0),
            "rejected": {k: v for k, v in agg.counters.items() if k.startswith("rejected_")},
            "transport_rejected": dict(transport.rejected),
            "round_start": getattr(agg, "round_start", None),
            "round_close": agg.closed_at,
            "round_wall_s": getattr(agg, "round_wall", None),
            "commit_s": getattr(agg, "commit_s", None),
            "reports_s": getattr(agg, "reports_s", None),
            "handle_update_s": agg.handle_update_s,
            "first_update_rx": transport.first_rx,
            "last_update_rx": transport.last_rx,
            "updates_rx": transport.updates_rx,
            "update_bytes_rx": transport.update_bytes_rx,
            "max_inbox": transport.max_inbox,
            "mem": agg.mem,
            "peak_rss": _proc_status().get("VmHWM"),
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
    )
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    log_fh.close()
    return 0 if result["ok"] else 1


# ----------------------------------------------------------------------------- the devices


def _initial_global(dim: int, seed: int) -> dict[str, Any]:
    """The aggregator's round-1 adapter: same seed, same construction (Aggregator._make_initial)."""
    import torch

    from fedclip_edge.adapter import AttentionAdapter

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in AttentionAdapter(dim).state_dict().items()}


def make_updates(
    n: int, dim: int, seed: int, job: str, rnd: int = 1
) -> tuple[list[str], list[bytes], dict[str, Any], dict[str, Any]]:
    """(device ids, update envelopes, global, exact float64 mean of the frames' tensors).

    Device 2k gets global + d_k, device 2k+1 global - d_k (d_k one of PAIR_VARIANTS random
    deltas); an unpaired last device gets the global itself. So the mean is the global up to
    float32 rounding; the exact mean of what was sent is returned too."""
    import torch

    from fedclip_edge.broker import protocol as P
    from fedclip_edge.wire import encode_frame

    g = _initial_global(dim, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    deltas = [
        {k: torch.randn(v.shape, generator=gen) * DELTA_SCALE for k, v in g.items()}
        for _ in range(max(1, min(PAIR_VARIANTS, n // 2)))
    ]
    variants: dict[tuple[int, int], dict[str, Any]] = {}
    counts: dict[tuple[int, int], int] = {}
    ids, payloads = [], []
    for i in range(n):
        k = (i // 2) % len(deltas)
        sign = 0 if (i == n - 1 and n % 2) else (1 if i % 2 == 0 else -1)
        key = (k if sign else -1, sign)
        if key not in variants:
            variants[key] = {
                name: (g[name] + sign * deltas[k][name]).float().contiguous() for name in g
            }
        counts[key] = counts.get(key, 0) + 1
        cid = f"sim{i:05d}"
        frame = encode_frame(variants[key], job=job, round=rnd, client=cid)
        metrics = {"loss": 0.0, "train_s": 0.0, "backend": "simulated"}
        payloads.append(P.Update(job, rnd, cid, SAMPLES, metrics, frame).encode())
        ids.append(cid)
    mean = {
        name: sum(c * variants[key][name].double() for key, c in counts.items()) / n
        for name in g
    }
    return ids, payloads, g, mean


class _Publisher:
    """One paho connection that speaks for many simulated devices."""

    def __init__(self, url: str, name: str, window: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from fedclip_edge.broker.transport import parse_broker_url

        host, port, _, user, password = parse_broker_url(url)
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if user:
            self.client.username_pw_set(user, password)
        self.client.max_inflight_messages_set(window)
        self.window = window
        self.connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: self.connected.set()
        self.client.connect(host, port, keepalive=60)
        self.client.loop_start()
        if not self.connected.wait(10):
            self.close()
            raise FedClipError(f"simulator connection {name} got no CONNACK within 10 s")

    def publish_all(
        self, items: list[tuple[str, bytes]], retain: bool, deadline: float,
        slots: list[float] | None = None,
    ) -> int:
        """QoS 1 publishes with at most `window` unacknowledged; returns how many were acked.
        `slots`: monotonic times before which each item must not start (rate cap)."""
        infos: list[Any] = []
        acked = 0
        for j, (topic, payload) in enumerate(items):
            if slots is not None and (wait := slots[j] - time.monotonic()) > 0:
                time.sleep(wait)
            if len(infos) - acked >= self.window:
                acked += self._wait(infos[acked], deadline)
            infos.append(self.client.publish(topic, payload, qos=1, retain=retain))
        for info in infos[acked:]:
            acked += self._wait(info, deadline)
        return acked

    @staticmethod
    def _wait(info: Any, deadline: float) -> int:
        with contextlib.suppress(RuntimeError, ValueError):
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
        return 1 if info.is_published() else 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


def _global_listener(url: str, topic: str, got: dict[str, Any], event: threading.Event) -> Any:
    """A paho client that keeps the first round-1 global (time received, payload)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fedclip_edge.broker import protocol as P
    from fedclip_edge.broker.transport import parse_broker_url

    host, port, _, user, password = parse_broker_url(url)
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"bench-global-{uuid.uuid4().hex[:6]}",
        protocol=mqtt.MQTTv311, clean_session=True,
    )
    if user:
        c.username_pw_set(user, password)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        if event.is_set() or not msg.payload:
            return
        try:
            g = P.decode_message(msg.payload)
        except P.MessageRejected:
            return
        if isinstance(g, P.GlobalModel) and g.round == 1:
            got.update({"t": time.monotonic(), "global": g, "bytes": len(msg.payload)})
            event.set()

    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
    c.on_message = on_message
    c.connect(host, port, keepalive=60)
    c.loop_start()
    return c


def bench_round(
    n: int,
    *,
    url: str,
    workdir: Path,
    dim: int = 512,
    seed: int = 0,
    publishers: int = 4,
    window: int = 16,
    rate: float = 0.0,
    timeout_s: float = 300.0,
    torch_threads: int = 0,
    broker_pid: int | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """One round with `n` simulated devices against a fresh aggregator process; one row."""
    import torch
    from safetensors.torch import load_file

    from fedclip_edge.benchmarks.extractor import _cpu_snapshot, others_cpu_share
    from fedclip_edge.broker import protocol as P
    from fedclip_edge.wire import decode_frame

    job = f"bench{n}-{uuid.uuid4().hex[:6]}"
    work = Path(workdir) / job
    work.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    t = time.perf_counter()
    ids, payloads, g, mean = make_updates(n, dim, seed, job)
    precompute_s = time.perf_counter() - t
    frame_bytes = len(payloads[0])
    log(f"N={n}: {n} update envelopes of {frame_bytes:,} B precomputed in {precompute_s:.1f}s")

    spec = {
        "url": url, "job": job, "n": n, "dim": dim, "seed": seed, "out": str(work / "agg"),
        "round_timeout_s": max(5.0, timeout_s * 0.8), "wait_clients_s": max(5.0, timeout_s * 0.5),
        "result": str(work / "aggregator_result.json"), "log": str(work / "aggregator.log"),
        "torch_threads": torch_threads,
    }
    (work / "spec.json").write_text(json.dumps(spec))
    cpu0, mosq0 = _cpu_snapshot(), (_proc_cpu_s(broker_pid) if broker_pid else None)
    child = subprocess.Popen(
        [sys.executable, "-m", "fedclip_edge.benchmarks.aggregator", "--serve",
         str(work / "spec.json")],
        stdout=open(work / "aggregator.out", "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    got: dict[str, Any] = {}
    have_global = threading.Event()
    listener = _global_listener(url, P.global_topic(job), got, have_global)
    pubs: list[_Publisher] = []
    sent = acked_updates = 0
    row: dict[str, Any] = {"devices": n, "dim": dim, "job": job}
    try:
        pubs = [_Publisher(url, f"bench-sim-{job}-{k}", window) for k in range(min(publishers, n))]
        shards = [list(range(k, n, len(pubs))) for k in range(len(pubs))]

        def run_all(make_items: Any, retain: bool, slots: Any = None) -> int:
            counts = [0] * len(pubs)

            def work_(k: int) -> None:
                items = make_items(shards[k])
                sl = [slots[i] for i in shards[k]] if slots is not None else None
                counts[k] = pubs[k].publish_all(items, retain, deadline, sl)

            threads = [threading.Thread(target=work_, args=(k,)) for k in range(len(pubs))]
            for th in threads:
                th.start()
            for th in threads:
                th.join(max(0.1, deadline - time.monotonic()))
            return sum(counts)

        def hellos(idx: list[int]) -> list[tuple[str, bytes]]:
            return [
                (P.status_topic(job, ids[i]), P.Status(
                    ids[i], "online", {"train": SAMPLES, "val": 8, "test": 8},
                    "simulated", dim, hello=True).encode())
                for i in idx
            ]

        t_hello = time.monotonic()
        registered = run_all(hellos, retain=True)
        row["hello_s"] = time.monotonic() - t_hello
        if registered != n:
            raise FedClipError(f"only {registered} of {n} hellos were acknowledged")
        while not have_global.wait(0.2):
            if child.poll() is not None or time.monotonic() > deadline:
                raise FedClipError(
                    f"no round-1 global from the aggregator (exit {child.poll()}); see "
                    f"{work / 'aggregator.log'}"
                )
        gm = got["global"]
        received = decode_frame(gm.frame).tensors
        if any(not torch.equal(received[k], g[k]) for k in g):
            raise FedClipError("the aggregator's global differs from the simulator's: seeds?")
        t_pub = time.monotonic()
        slots = [t_pub + i / rate for i in range(n)] if rate > 0 else None
        acked_updates = run_all(
            lambda idx: [(P.update_topic(job, ids[i]), payloads[i]) for i in idx], False, slots
        )
        sent = n
        t_pub_done = time.monotonic()
        try:
            child.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.terminate()
            child.wait(timeout=10)
        cpu1 = _cpu_snapshot()
        mosq1 = _proc_cpu_s(broker_pid) if broker_pid else None
        with contextlib.suppress(Exception):  # leave no retained statuses behind
            run_all(lambda idx: [(P.status_topic(job, ids[i]), b"") for i in idx], True)
    finally:
        for p in pubs:
            p.close()
        with contextlib.suppress(Exception):
            listener.disconnect()
        listener.loop_stop()
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
    res_path = Path(spec["result"])
    if not res_path.is_file():
        raise FedClipError(f"the aggregator wrote no result; see {work / 'aggregator.out'}")
    res = json.loads(res_path.read_text())
    others = others_cpu_share(cpu0, cpu1)
    if others is not None and mosq0 is not None and mosq1 is not None and cpu0 and cpu1:
        others = max(0.0, others - (mosq1 - mosq0) / ((cpu1[2] - cpu0[2]) * (os.cpu_count() or 1)))

    err_mean = err_global = None
    final = Path(spec["out"]) / "rounds" / "global_r0001.safetensors"
    if final.is_file():
        agg = load_file(str(final))
        err_mean = max(float((agg[k].double() - mean[k]).abs().max()) for k in g)
        err_global = max(float((agg[k].double() - g[k].double()).abs().max()) for k in g)
    accepted = int(res.get("accepted", 0))
    mem = res.get("mem", {})
    first, last, close = res.get("first_update_rx"), res.get("last_update_rx"), res.get(
        "round_close")
    rss0, hwm = mem.get("rss_round_start"), mem.get("hwm_round")
    growth = hwm - rss0 if (rss0 and hwm and mem.get("hwm_reset")) else None
    traced = (
        mem["traced_round_peak"] - mem["traced_round_start"]
        if "traced_round_peak" in mem else None
    )
    row.update(
        {
            "ok": bool(res.get("ok")),
            "error": res.get("error"),
            "registered": res.get("registered"),
            "sent": sent,
            "acked_by_broker": acked_updates,
            "received_by_aggregator": res.get("updates_rx"),
            "accepted": accepted,
            "loss": sent - accepted,
            "rejected": res.get("rejected", {}),
            "transport_rejected": res.get("transport_rejected", {}),
            "update_envelope_bytes": frame_bytes,
            "params": sum(v.numel() for v in g.values()),
            "precompute_s": precompute_s,
            "global_delivery_s": got["t"] - res["round_start"] if res.get("round_start") else None,
            "publish_s": t_pub_done - t_pub,
            "transfer_s": last - t_pub if last else None,
            "round_wall_s": res.get("round_wall_s"),
            "overhead_s": (res["round_wall_s"] - (last - t_pub))
            if last and res.get("round_wall_s") is not None else None,
            "tail_after_last_rx_s": close - last if (close and last) else None,
            "updates_per_s": accepted / (close - first) if (close and first and close > first)
            else None,
            "handle_update_s_total": res.get("handle_update_s"),
            "handle_update_ms_mean": 1000 * res["handle_update_s"] / accepted if accepted
            else None,
            "commit_s": res.get("commit_s"),
            "commit_reports_plot_s": res.get("reports_s"),
            "aggregator_peak_rss": res.get("peak_rss"),
            "rss_round_start": rss0,
            "rss_round_peak_growth": growth,
            "traced_round_peak_growth": traced,
            "max_inbox_backlog": res.get("max_inbox"),
            "n_copies_bytes": n * frame_bytes,
            "mean_max_abs_err": err_mean,
            "global_max_abs_err": err_global,
            "others_cpu_share": others,
            "publishers": len(pubs),
            "window": window,
            "rate_cap_per_s": rate or None,
            "aggregator_torch_threads": torch_threads or "default",
        }
    )
    log(
        f"N={n}: accepted {accepted}/{sent}, {row['updates_per_s'] or 0:.1f} updates/s, "
        f"round {row['round_wall_s'] or 0:.2f}s, transfer {row['transfer_s'] or 0:.2f}s, "
        f"peak RSS {(row['aggregator_peak_rss'] or 0) / 2**20:.0f} MiB"
    )
    return row


def run_bench(
    devices: list[int],
    out: Path,
    *,
    broker: str | None = None,
    broker_kind: str = "auto",
    dim: int = 512,
    seed: int = 0,
    publishers: int = 4,
    window: int = 16,
    rate: float = 0.0,
    timeout_s: float = 300.0,
    torch_threads: int = 0,
    keep: bool = False,
    log: Any = print,
) -> dict[str, Any]:
    """Every N in `devices`, one round each, against one broker; writes OUT/bench_aggregator.json
    after every row."""
    from fedclip_edge.benchmarks.extractor import machine_info

    if not devices or any(n < 1 for n in devices):
        raise ConfigError("--devices must be positive counts")
    if dim < 1 or publishers < 1 or window < 1 or timeout_s <= 0:
        raise ConfigError("--dim, --publishers, --window and --timeout must be positive")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-agg-", dir=out))
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "complete": False,
        "command": "fedclip-edge bench aggregator " + " ".join(sys.argv[3:])
        if sys.argv[1:3] == ["bench", "aggregator"] else None,
        "machine": {**machine_info(), "load_average_before": list(os.getloadavg())},
        "config": {
            "devices": list(devices), "dim": dim, "seed": seed, "publishers": publishers,
            "window": window, "rate_cap_per_s": rate or None, "timeout_s": timeout_s,
            "aggregator_torch_threads": torch_threads or "default",
            "python": platform.python_version(),
        },
        "simulation": (
            f"{publishers} paho connections (QoS 1, at most {window} unacknowledged each) speak "
            "for all N devices: each device has its own retained hello on fedclip/<job>/status/"
            "<id> and its own precomputed Update envelope (a valid wire frame near the global) "
            "on fedclip/<job>/update/<id>, published once the round-1 global arrives. The real "
            "Aggregator runs in its own process with min_clients=N, upload_grace_s=0 "
            "(simulated devices send no 'uploaded' status)."
        ),
        "findings": list(FINDINGS),
        "rows": [],
    }
    path = out / "bench_aggregator.json"
    try:
        with broker_for_bench(broker, work, broker_kind) as b:
            report["broker"] = {k: v for k, v in b.items() if k != "pid"}
            log(f"broker: {b['kind']} at {b['url']}")
            for n in devices:
                row = bench_round(
                    n, url=b["url"], workdir=work, dim=dim, seed=seed, publishers=publishers,
                    window=window, rate=rate, timeout_s=timeout_s, torch_threads=torch_threads,
                    broker_pid=b.get("pid"),
                    log=log,
                )
                report["rows"].append(row)
                path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    finally:
        report["machine"]["load_average_after"] = list(os.getloadavg())
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report["workdir"] = str(work)
    report["complete"] = True
    report["zero_loss"] = all(r["loss"] == 0 and r["ok"] for r in report["rows"])
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def _num(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def render_table(report: dict[str, Any]) -> Any:
    """The rows as a rich table."""
    from rich.table import Table

    m = report["machine"]
    table = Table(
        title=f"aggregator: one round, {report['broker']['kind']}, dim {report['config']['dim']}"
        f" ({m['cpu']}, {m['cpu_count']} cores)"
    )
    cols = (
        "N", "accepted", "loss", "upd/s", "round s", "xfer s", "overhead s", "ms/upd",
        "commit s", "peak RSS MiB", "round +RSS MiB", "N x frame MiB", "backlog", "others CPU",
    )
    for c in cols:
        table.add_column(c, justify="right")
    for r in report["rows"]:
        share = r.get("others_cpu_share")
        table.add_row(
            str(r["devices"]),
            f"{r['accepted']}/{r['sent']}",
            str(r["loss"]),
            _num(r["updates_per_s"], ".1f"),
            _num(r["round_wall_s"], ".2f"),
            _num(r["transfer_s"], ".2f"),
            _num(r["overhead_s"], ".2f"),
            _num(r["handle_update_ms_mean"], ".2f"),
            _num(r["commit_s"], ".2f"),
            _mib(r["aggregator_peak_rss"]),
            _mib(r["rss_round_peak_growth"]),
            _mib(r["n_copies_bytes"]),
            str(r["max_inbox_backlog"]),
            "-" if share is None else f"{100 * share:.0f}%",
        )
    return table


def bench_aggregator(
    out: Annotated[Path, typer.Option(help="Folder for bench_aggregator.json.")],
    devices: Annotated[
        list[int] | None,
        typer.Option(help="Simulated device counts, one round each: --devices 10 --devices 100."),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(help="Broker URL (default: a private broker on a free loopback port)."),
    ] = None,
    broker_kind: Annotated[
        str, typer.Option(help="Private broker: auto (mosquitto if installed), mosquitto, amqtt.")
    ] = "auto",
    dim: Annotated[int, typer.Option(help="Adapter width (512: ViT-B-32, 2.1 MB frames).")] = 512,
    publishers: Annotated[
        int, typer.Option(help="MQTT connections that speak for the simulated devices.")
    ] = 4,
    window: Annotated[
        int, typer.Option(help="Unacknowledged QoS 1 publishes per connection.")
    ] = 16,
    rate: Annotated[
        float, typer.Option(help="Cap on updates/s sent (0: as fast as the broker takes them).")
    ] = 0.0,
    timeout: Annotated[float, typer.Option(help="Seconds allowed per device count.")] = 300.0,
    torch_threads: Annotated[
        int,
        typer.Option(help="torch threads in the aggregator (0: torch's default, as `aggregate`)."),
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the global adapter and the updates.")] = 0,
    keep: Annotated[bool, typer.Option(help="Keep the aggregator's folders and logs.")] = False,
) -> None:
    """N simulated devices, one round each, through a real broker: loss, updates/s, memory."""
    from rich.console import Console
    from rich.markup import escape

    if broker_kind not in ("auto", "mosquitto", "amqtt"):
        kinds = ("auto", "mosquitto", "amqtt")
        raise ConfigError(unknown_name("--broker-kind", broker_kind, kinds))
    err = Console(stderr=True)
    start = time.monotonic()
    report = run_bench(
        list(devices or DEFAULT_DEVICES),
        out,
        broker=broker,
        broker_kind=broker_kind,
        dim=dim,
        seed=seed,
        publishers=publishers,
        window=window,
        rate=rate,
        timeout_s=timeout,
        torch_threads=torch_threads,
        keep=keep,
        log=lambda m: err.print(f"[dim]{time.monotonic() - start:6.1f}s[/dim] {escape(m)}"),
    )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(render_table(report))
    for f in report["findings"]:
        console.print(f"- {f}", markup=False)
    console.print(f"JSON: {Path(out) / 'bench_aggregator.json'}")
    if not report["zero_loss"]:
        raise FedClipError("updates were lost or the aggregator failed (see the table)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        sys.exit(_serve(Path(sys.argv[2])))
    sys.exit("usage: python -m fedclip_edge.benchmarks.aggregator --serve SPEC.json")
