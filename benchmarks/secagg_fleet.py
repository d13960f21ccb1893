"""The simulated fleet of `bench secagg`: N devices over the in-memory broker, every message
counted, the real protocol code on both sides.

Why a fleet of its own: secure aggregation's cost is in its messages (keys, shares, the deal,
masked vectors, reveals) and in the masking, not in training. Each simulated device skips
training (its update is the round's global plus a fixed random delta of its own) but runs what a
real agent runs from there: plain, a signed `Update` and its `uploaded` status; secure, the
real `SecAggDevice` (device_agent/secagg_device.py) against the real aggregator's
`SecAggCollect`. One driver thread speaks for all devices (each has its own transport, so the
broker delivers to and counts each one), so devices' work is serial here: the round's wall time
holds the sum of all devices' work, not the slowest device's.

Dropouts are certain, not timed: a device chosen for a round stops right after it publishes the
chosen step (its will, an offline status, goes out as the broker would send it) and comes back
(reconnect, hello) as the next round starts.
"""

from __future__ import annotations

import json
import queue
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import secagg_wire as W
from fedclip_edge.broker.aggregator import Aggregator, AggregatorHooks
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.device_agent.secagg_device import SecAggDevice
from fedclip_edge.signing import KeyRegistry
from fedclip_edge.wire import decode_frame, encode_frame

SAMPLES = 24  # train samples each simulated device reports
DELTA_SCALE = 0.01  # far inside the default clip (1.0): no coordinate is clipped
_PREFIX = struct.Struct("<4sBI")  # the envelope's prefix: magic, version, header length


def kind_of(payload: bytes) -> str:
    """What a payload is, for the byte counts: its envelope type, a status's state, a secure
    aggregation message's step ("secagg:deal")."""
    if not payload:
        return "cleared"
    try:
        _, _, hlen = _PREFIX.unpack_from(payload)
        h = json.loads(bytes(payload[_PREFIX.size:_PREFIX.size + hlen]))
    except (struct.error, ValueError, UnicodeDecodeError):
        return "other"
    kind = str(h.get("type", "other"))
    if kind == "secagg":
        return f"secagg:{h.get('step')}"
    if kind in ("status", "hello"):
        return f"status:{h.get('state')}" + (":hello" if kind == "hello" else "")
    return kind


class _Discard(list):  # type: ignore[type-arg]
    """MemoryBroker's log, kept empty: it would hold every masked vector of the run."""

    def append(self, item: Any) -> None:
        pass


class CountedTransport(MemoryTransport):
    """A device's connection: bytes up and down by message kind; every message in wakes the
    fleet's driver."""

    def __init__(self, broker: MemoryBroker, client_id: str, wake: Callable[[Any], None],
                 **kw: Any) -> None:
        super().__init__(broker, client_id, **kw)
        self.up: Counter[str] = Counter()
        self.down: Counter[str] = Counter()
        self.n_up: Counter[str] = Counter()
        self.n_down: Counter[str] = Counter()
        self._wake = wake
        self._count = threading.Lock()

    def _send(self, topic: str, payload: bytes, retain: bool) -> Callable[[float], bool]:
        if self.connected:
            kind = kind_of(payload)
            with self._count:
                self.up[kind] += len(payload)
                self.n_up[kind] += 1
        return super()._send(topic, payload, retain)

    def _on_raw(self, topic: str, payload: bytes, retained: bool, token: Any = None) -> None:
        kind = kind_of(payload)
        with self._count:
            self.down[kind] += len(payload)
            self.n_down[kind] += 1
        super()._on_raw(topic, payload, retained, token)
        if payload:
            self._wake(self)

    def snapshot(self) -> tuple[Counter[str], Counter[str], Counter[str], Counter[str]]:
        with self._count:
            return (Counter(self.up), Counter(self.down), Counter(self.n_up),
                    Counter(self.n_down))


class SimDevice:
    """One simulated device; `handle` runs on the fleet's driver thread."""

    def __init__(self, fleet: Fleet, i: int, delta: dict[str, torch.Tensor]) -> None:
        self.fleet = fleet
        self.cid = f"sa{i:04d}"
        self.key = Ed25519PrivateKey.generate()
        self.session = f"s{i:04d}"
        self.delta = delta
        job = fleet.job
        will = (P.status_topic(job, self.cid),
                authn.signed_will(self.cid, job, self.session, self.key), True)
        self.t = CountedTransport(fleet.broker, self.cid, fleet.wake, will=will)
        self.t.subscribe(P.global_topic(job), P.control_topic(job))
        self.last_round = 0
        self.cached = b""  # the plain update of the last round (resent when `have` lacks it)
        self.dropped = False
        self.drop_step = ""  # this round: stop right after publishing this step
        self._drop_now = False
        self.cpu_ms: Counter[str] = Counter()  # handler thread time by step, this device
        self.calls: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.sec: SecAggDevice | None = None
        if fleet.secure:
            topic = P.update_topic(job, self.cid)
            self.sec = SecAggDevice(job, self.cid, key=self.key, session=self.session,
                                    registry=fleet.agg_registry,
                                    publish=lambda payload: self._publish(topic, payload),
                                    log=lambda line: None)

    def _publish(self, topic: str, payload: bytes) -> Any:
        d = self.t.publish(topic, payload)
        if self.drop_step and W.decode(payload).step == self.drop_step:
            self._drop_now = True  # after the handler: it may still be inside `sec`
        return d

    def hello(self, run: str) -> None:
        self.status("online", run, hello=True)

    def status(self, state: str, run: str, hello: bool = False,
               upload_s: float | None = None) -> None:
        st = P.Status(self.cid, state, {"train": SAMPLES, "val": 8, "test": 8}, "simulated",
                      self.fleet.dim, round=self.last_round, upload_s=upload_s, hello=hello,
                      session=self.session, run=run)
        st = authn.sign(st, self.key, job=self.fleet.job)
        self.t.publish(P.status_topic(self.fleet.job, self.cid), st.encode(), retain=True)

    def handle(self, payload: bytes) -> None:
        if self.dropped:
            return
        kind = kind_of(payload)
        t0 = time.thread_time()
        try:
            if kind == "global":
                step = self._on_global(payload)
            elif kind.startswith("secagg:") and self.sec is not None:
                step = kind.split(":", 1)[1]
                self.sec.on_message(W.decode(payload))
            else:
                return
        except P.MessageRejected as exc:
            self.rejected[exc.reason] += 1
            return
        finally:
            if self._drop_now:
                self._drop()
        if step:
            self.cpu_ms[step] += 1000 * (time.thread_time() - t0)
            self.calls[step] += 1

    def _drop(self) -> None:
        """Stop here: the broker sends the will (offline); the round's secrets are let go."""
        self._drop_now, self.drop_step, self.dropped = False, "", True
        self.fleet.broker.drop(self.cid)
        if self.sec is not None:
            self.sec.new_round(self.last_round + 1)

    def rejoin(self, run: str) -> None:
        self.dropped = False
        self.t.connect()  # the retained control and the last global: an answered round's
        self.hello(run)

    def _on_global(self, payload: bytes) -> str:
        g = P.decode_message(payload)
        assert isinstance(g, P.GlobalModel)
        authn.verify(g, self.fleet.agg_registry, key_id=P.AGGREGATOR_ID)
        if g.round > self.fleet.rounds or g.round < self.last_round:
            return ""  # the final adapter, or an old one
        if g.round == self.last_round:  # the round's global again
            if self.cid in g.have:
                return ""
            if self.sec is not None:
                self.sec.again(g)
            elif self.cached:
                self._send_update(self.cached)
            return "again"
        self.last_round = g.round
        self.drop_step = self.fleet.drops.get((g.round, self.cid), "")
        glob = decode_frame(g.frame).tensors
        local = {k: glob[k] + self.delta[k] for k in glob}
        metrics = {"loss": 0.0, "train_s": 0.0, "backend": "simulated"}
        if self.sec is not None:
            self.sec.new_round(g.round)
            self.sec.trained(g.round, glob, local, SAMPLES, g.weighting, metrics, run=g.run)
            return "keys"
        frame = encode_frame(local, job=self.fleet.job, round=g.round, client=self.cid)
        up = P.Update(self.fleet.job, g.round, self.cid, SAMPLES, metrics, frame,
                      session=self.session, run=g.run)
        self.cached = authn.sign(up, self.key, job=self.fleet.job).encode()
        self._send_update(self.cached)
        return "update"

    def _send_update(self, payload: bytes) -> None:
        """As the agent's outbox: publish, then the `uploaded` status with publish -> ack."""
        t0 = time.monotonic()
        self.t.publish(P.update_topic(self.fleet.job, self.cid), payload).wait(5.0)
        self.status("uploaded", self.fleet.run, upload_s=time.monotonic() - t0)


class Fleet:
    """N simulated devices and the one thread that drives them."""

    def __init__(self, *, n: int, dim: int, job: str, run: str, rounds: int, secure: bool,
                 deltas: list[dict[str, torch.Tensor]], agg_key: Ed25519PrivateKey,
                 drops: dict[tuple[int, str], str] | None = None) -> None:
        self.broker = MemoryBroker()
        self.broker.log = _Discard()
        self.dim, self.job, self.run, self.rounds, self.secure = dim, job, run, rounds, secure
        self.agg_registry = KeyRegistry({P.AGGREGATOR_ID: agg_key.public_key()})
        self.drops = dict(drops or {})
        self._q: queue.Queue[Any] = queue.Queue()
        self.devices = [SimDevice(self, i, deltas[i]) for i in range(n)]
        self.by_id = {d.cid: d for d in self.devices}
        self.errors: list[str] = []
        for d in self.devices:
            d.t.connect()
            d.hello(run)
        self._thread = threading.Thread(target=self._drive, name="bench-secagg-fleet",
                                        daemon=True)
        self._thread.start()

    @property
    def registry(self) -> KeyRegistry:
        return KeyRegistry({d.cid: d.key.public_key() for d in self.devices})

    def wake(self, t: CountedTransport) -> None:
        self._q.put(t)

    def call(self, fn: Callable[[], None], timeout: float = 60.0) -> None:
        """Run `fn` on the driver thread, between messages; return when it has."""
        done = threading.Event()
        self._q.put(lambda: (fn(), done.set()))
        if not done.wait(timeout):
            raise TimeoutError("the simulated fleet did not answer")

    def _drive(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                if callable(item):
                    item()
                    continue
                msg = item.recv(0)
                if msg is not None:
                    self.by_id[item.client_id].handle(msg.payload)
            except Exception as exc:  # noqa: BLE001 - reported by the benchmark, not lost
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(30)

    def counts(self) -> dict[str, tuple[Counter[str], ...]]:
        return {d.cid: d.t.snapshot() for d in self.devices}


class Probe(AggregatorHooks):
    """Per round, on the aggregator's thread: its CPU time (thread_time) and wall time from
    `round_started` to `before_commit` (publishing the global, every message handled, the
    unmasking and the mean; not the commit to disk), the devices' byte counts at both ends,
    the global before and after (the check), and dropped devices brought back first."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.rows: list[dict[str, Any]] = []
        self._start: dict[str, Any] = {}

    def round_started(self, agg: Aggregator, rnd: int) -> None:
        back = [d for d in self.fleet.devices if d.dropped]
        counts = self.fleet.counts()
        if back:
            self.fleet.call(lambda: [d.rejoin(agg.run_id) for d in back])
        self._start = {"round": rnd, "counts": counts, "glob": agg.global_state,
                       "cpu": time.thread_time(), "wall": time.perf_counter(),
                       "rejoined": len(back)}

    def before_commit(self, agg: Aggregator, rnd: int, wall_s: float) -> None:
        cpu, wall = time.thread_time(), time.perf_counter()
        s = self._start
        sa = agg._secagg
        who = list(sa.u3) if sa is not None else sorted(agg._answered)
        self.rows.append({
            "round": rnd, "agg_cpu_s": cpu - s["cpu"], "wall_s": wall - s["wall"],
            "counts0": s["counts"], "counts1": self.fleet.counts(), "glob": s["glob"],
            "contributors": who, "rejoined": s["rejoined"],
            "roster": len(sa.order) if sa is not None else len(who),
            "u2": len(sa.u2) if sa is not None else len(who),
            "reveals": len(sa.reveals) if sa is not None else None,
            "threshold": sa.t if sa is not None else None,
        })

    def after_commit(self, agg: Aggregator, rnd: int, commit_s: float, reports_s: float) -> None:
        self.rows[-1]["new"] = agg.global_state
        self.rows[-1]["commit_s"] = commit_s + reports_s


def flat(state: dict[str, torch.Tensor]) -> np.ndarray:
    return W.flatten(state)
