"""The aggregator driven through the in-memory transport (fake devices and real agents).

Tiny adapters (d = 2 or 8), means worked out by hand, every rejection reason, and the resume
guarantee: a crashed-and-resumed run ends with the adapter of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from support import keys
from support.fleet import JOB, TRAIN, start_agents

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig, AggregatorHooks
from fedclip_edge.broker.prevalidate import PrevalidateMixin
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.errors import FedClipError
from fedclip_edge.wire import encode_frame

# every device id these tests use is registered (its key may take part)
DEVICES = ("a", "b", "c", "d", "e", "odd", "huge", "evil", "dev-a", "dev-b", "dev-c", "late")
NAMES = {k: tuple(v.shape) for k, v in AttentionAdapter(2).state_dict().items()}


def const_state(value: float, dim: int = 2) -> dict[str, torch.Tensor]:
    return {k: torch.full(v.shape, value) for k, v in AttentionAdapter(dim).state_dict().items()}


def hello(broker: MemoryBroker, client: str, dim: int = 2) -> MemoryTransport:
    """A signed hello (and a signed will), as a registered device sends them."""
    t = MemoryTransport(
        broker,
        client,
        will=(P.status_topic(JOB, client), authn.signed_will(client, JOB, "s", keys.key(client)),
              True),
    )
    t.subscribe(P.global_topic(JOB), P.control_topic(JOB))
    t.connect()
    st = P.Status(client, "online", {"train": 6, "val": 2, "test": 2}, "test", dim, hello=True,
                  session="s", run=keys.RUN)
    t.publish(P.status_topic(JOB, client), authn.sign(st, keys.key(client), job=JOB).encode(),
              retain=True)
    return t


def update_payload(
    client: str,
    rnd: int,
    value: float,
    samples: int = 1,
    job: str = JOB,
    frame_client: str | None = None,
) -> bytes:
    frame = encode_frame(const_state(value), job=job, round=rnd, client=frame_client or client)
    up = P.Update(job, rnd, client, samples, {"loss": value}, frame, session="s", run=keys.RUN)
    return authn.sign(up, keys.key(client)).encode()


class FakeDevice(threading.Thread):
    """Answers each global with a constant adapter value(round, client)."""

    def __init__(
        self, broker: MemoryBroker, client: str, value, samples: int = 1, extra=None
    ) -> None:
        super().__init__(daemon=True)
        self.t = hello(broker, client)
        self.client, self.value, self.samples, self.extra = client, value, samples, extra
        self.seen: set[int] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 30
        while not self.halt.is_set() and time.monotonic() < deadline:
            msg = self.t.recv(0.05)
            if msg is None:
                continue
            m = P.decode_message(msg.payload)
            if isinstance(m, P.Control) and m.state == "done":
                return
            if isinstance(m, P.GlobalModel) and m.round <= m.rounds and m.round not in self.seen:
                self.seen.add(m.round)
                topic = P.update_topic(JOB, self.client)
                payload = update_payload(
                    self.client, m.round, self.value(m.round, self.client), self.samples
                )
                self.t.publish(topic, payload)
                if self.extra:
                    self.extra(self, m.round, payload)


class PrevalidatingMemory(PrevalidateMixin, MemoryTransport):
    """Updates decoded on the validation worker thread, as `aggregate` runs."""


def make_agg(
    broker: MemoryBroker, out: Path, transport_cls: type = MemoryTransport, **kw
) -> Aggregator:
    cfg = AggregatorConfig(
        job=JOB,
        rounds=kw.pop("rounds", 2),
        out=out,
        min_clients=kw.pop("min_clients", 2),
        round_timeout_s=kw.pop("round_timeout_s", 5.0),
        dim=kw.pop("dim", 2),
        wait_clients_s=kw.pop("wait_clients_s", 2.0),
        upload_grace_s=0.0,
        registry=kw.pop("registry", keys.registry(DEVICES)),
        signing_key=keys.key(keys.AGGREGATOR), run=keys.RUN,
        **kw,
    )
    lines: list[str] = []
    agg = Aggregator(transport_cls(broker, "aggregator"), cfg, log=lines.append)
    agg.lines = lines  # type: ignore[attr-defined]
    return agg


def test_uniform_and_sample_weighted_means_by_hand(tmp_path: Path) -> None:
    for weighting, samples, want in (("uniform", (1, 1), 2.0), ("samples", (1, 3), 2.5)):
        broker = MemoryBroker()
        devs = [
            FakeDevice(broker, "a", lambda r, c: 1.0, samples[0]),
            FakeDevice(broker, "b", lambda r, c: 3.0, samples[1]),
        ]
        for d in devs:
            d.start()
        agg = make_agg(broker, tmp_path / weighting, rounds=1, weighting=weighting)
        final = agg.run()
        for v in final.values():  # (1*1 + 3*3) / 4 = 2.5 by samples; (1 + 3) / 2 uniform
            assert torch.allclose(v, torch.full(v.shape, want))
        rows = [
            json.loads(x) for x in (tmp_path / weighting / "metrics.jsonl").read_text().splitlines()
        ]
        assert {r["client"] for r in rows if r["kind"] == "client"} == {"a", "b"}
        assert all(
            r["bytes_up"] > 0 and r["update_latency_s"] >= 0 for r in rows if r["kind"] == "client"
        )
        summary = json.loads((tmp_path / weighting / "summary.json").read_text())
        assert summary["rounds"] == 1 and summary["totals"]["bytes_up"] > 0
        assert (tmp_path / weighting / "latency.png").stat().st_size > 1000


def _nan_frame(client: str, rnd: int) -> bytes:
    """A frame whose hash is valid but which carries a NaN (only a hostile sender makes one)."""
    good = encode_frame(const_state(1.0), job=JOB, round=rnd, client=client)
    body = bytearray(good[:-32])
    one = torch.tensor([1.0]).numpy().tobytes()
    pos = bytes(body).rfind(one)
    body[pos : pos + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    return bytes(body) + hashlib.sha256(bytes(body)).digest()


@pytest.mark.parametrize("transport_cls", [MemoryTransport, PrevalidatingMemory])
def test_every_bad_update_is_rejected_counted_and_the_run_goes_on(
    tmp_path: Path, transport_cls: type
) -> None:
    broker = MemoryBroker()
    evil = MemoryTransport(broker, "evil")
    evil.connect()

    def attack(dev: FakeDevice, rnd: int, payload: bytes) -> None:
        if dev.client != "a" or rnd != 2:
            return
        up = P.update_topic(JOB, "a")
        evil.publish(up, payload)  # QoS 1 redelivery of the same update
        evil.publish(up, update_payload("a", 1, 9.0))  # stale round
        evil.publish(up, b"\x00garbage")  # malformed
        evil.publish(up, update_payload("b", 2, 9.0))  # b's update on a's topic
        # unregistered: a signed job subscribes to registered ids' topics only (issue 22)
        evil.publish(P.update_topic(JOB, "zed"), update_payload("zed", 2, 9.0))
        evil.publish(up, update_payload("a", 5, 9.0))  # future round
        evil.publish(up, update_payload("a", 2, 9.0, job="other"))  # other job
        # b itself (registered, signing) sends frames that fail validation
        nan = authn.sign(P.Update(JOB, 2, "b", 1, {}, _nan_frame("b", 2), run=keys.RUN),
                         keys.key("b"))
        evil.publish(P.update_topic(JOB, "b"), nan.encode())  # non-finite
        wrong = encode_frame({"x": torch.ones(3)}, job=JOB, round=2, client="b")
        bad = authn.sign(P.Update(JOB, 2, "b", 1, {}, wrong, run=keys.RUN), keys.key("b"))
        evil.publish(P.update_topic(JOB, "b"), bad.encode())
        attacked.set()

    attacked = threading.Event()
    a = FakeDevice(broker, "a", lambda r, c: 1.0, extra=attack)
    a.start()
    # b publishes its round-2 update only once the attack is in the aggregator's inbox, so the
    # round is certainly open for every attack message (was a 0.2 s sleep: under load a's
    # thread could take longer and the round closed first)
    b = FakeDevice(broker, "b", lambda r, c: 3.0)
    publish = b.t.publish

    def after_the_attack(topic: str, payload: bytes, **kw: object):  # type: ignore[no-untyped-def]
        if topic == P.update_topic(JOB, "b") and P.decode_message(payload).round == 2:
            assert attacked.wait(30), "the attack never ran"
        return publish(topic, payload, **kw)

    b.t.publish = after_the_attack  # type: ignore[method-assign]
    b.start()
    agg = make_agg(broker, tmp_path, transport_cls, rounds=2)
    final = agg.run()
    for v in final.values():
        assert torch.allclose(v, torch.full(v.shape, 2.0))  # the attacks changed nothing
    c = agg.counters
    assert c["accepted"] == 4
    assert c["rejected_duplicate"] == 1
    assert c["rejected_stale"] == 1
    assert c["rejected_envelope"] == 1
    assert c["rejected_client_mismatch"] == 1
    assert c["rejected_unknown_client"] == 0  # zed's update never reached the aggregator
    assert not any("/zed" in line for line in agg.lines)  # type: ignore[attr-defined]
    assert c["rejected_future"] == 1
    assert c["rejected_job"] == 1
    assert c["rejected_frame_nonfinite"] == 1
    assert c["rejected_frame_names"] == 1
    assert any("rejected (duplicate)" in line for line in agg.lines)  # type: ignore[attr-defined]
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["completed_round"] == 2 and state["counters"]["rejected_stale"] == 1


def test_a_dropped_device_leaves_the_round_without_waiting_for_the_deadline(
    tmp_path: Path,
) -> None:
    broker = MemoryBroker()
    a = FakeDevice(broker, "a", lambda r, c: 1.0)
    b = FakeDevice(broker, "b", lambda r, c: 5.0)
    c = FakeDevice(broker, "c", lambda r, c: 3.0)

    orig = b.t._on_raw

    def drop_at_round_2(topic: str, payload: bytes, retained: bool) -> None:
        if topic.endswith("/global") and P.decode_message(payload).round == 2:  # type: ignore
            b.halt.set()
            threading.Thread(target=broker.drop, args=("b",)).start()  # the will goes out
            return
        orig(topic, payload, retained)

    b.t._on_raw = drop_at_round_2  # type: ignore[method-assign]
    for d in (a, b, c):
        d.start()
    agg = make_agg(broker, tmp_path, rounds=2, round_timeout_s=20.0)
    t0 = time.monotonic()
    final = agg.run()
    assert time.monotonic() - t0 < 10  # did not wait for the 20 s deadline
    for v in final.values():
        assert torch.allclose(v, torch.full(v.shape, 2.0))  # round 2: mean of a and c


def test_too_few_updates_retries_then_stops_keeping_state(tmp_path: Path) -> None:
    broker = MemoryBroker()
    a = FakeDevice(broker, "a", lambda r, c: 1.0)
    a.start()
    agg = make_agg(
        broker,
        tmp_path,
        rounds=1,
        min_clients=2,
        round_timeout_s=0.3,
        max_retries=1,
        wait_clients_s=0.2,
    )
    with pytest.raises(FedClipError, match="fewer than 2"):
        agg.run()
    assert any("retry 1/1" in line for line in agg.lines)  # type: ignore[attr-defined]
    ctl = P.decode_message(broker.retained[P.control_topic(JOB)])
    assert isinstance(ctl, P.Control) and ctl.state == "done"


# ----------------------------------------------------------------------------- real agents


def _run(
    tmp: Path,
    crash_at: int | None = None,
    dtype: str = "float32",
    max_payload: int = P.DEFAULT_MAX_PAYLOAD,
) -> dict:
    broker = MemoryBroker()
    agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"], max_payload)
    for a, _ in agents:
        a.cfg.update_dtype = dtype
    agg = make_agg(broker, tmp, rounds=4, min_clients=3, dim=8, train=TRAIN, seed=3)
    agg.t.max_payload = max_payload
    if crash_at is not None:
        real_commit = agg._commit

        def crash(rnd, *args, **kw):
            if rnd == crash_at:
                raise RuntimeError("simulated crash after collecting, before committing")
            return real_commit(rnd, *args, **kw)

        agg._commit = crash  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="simulated crash"):
            agg.run()
        agg.t.close()
        assert json.loads((tmp / "state.json").read_text())["completed_round"] == crash_at - 1
        agg = make_agg(
            broker, tmp, rounds=4, min_clients=3, dim=8, train=TRAIN, seed=3, resume=True
        )
    final = agg.run()
    for _, th in agents:
        th.join(10)
    assert all(not th.is_alive() for _, th in agents)  # agents end when the job is done
    assert all(a.final_state is not None for a, _ in agents)
    return final


def test_agents_learn_and_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    full = _run(tmp_path / "full")
    resumed = _run(tmp_path / "crashed", crash_at=3)
    start = const_state(0.0, 8)
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k
        assert full[k].shape == start[k].shape
    torch.manual_seed(3)
    init = AttentionAdapter(8).state_dict()
    assert any(not torch.allclose(full[k], init[k]) for k in full)  # it did train
    rows = [
        json.loads(x) for x in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    ]
    client_rows = [(r["round"], r["client"]) for r in rows if r["kind"] == "client"]
    assert sorted(client_rows) == sorted(set(client_rows))  # nothing counted twice
    assert len(client_rows) == 12
    assert {r["round"] for r in rows if r["kind"] == "round"} == {1, 2, 3, 4}
    first = [r for r in rows if r["kind"] == "client" and r["round"] == 1]
    assert all("extract_s" in r and r["local_test_acc"] is not None for r in first)


def test_fp16_updates_aggregate_close_to_fp32(tmp_path: Path) -> None:
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", dtype="float16")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=5e-3), k


def test_chunked_globals_and_updates_give_the_same_result(tmp_path: Path) -> None:
    whole = _run(tmp_path / "whole")
    chunked = _run(tmp_path / "chunked", max_payload=1024)  # every message in 2+ chunks
    for k in whole:
        assert torch.equal(whole[k], chunked[k]), k
    rows = [
        json.loads(x)
        for x in (tmp_path / "chunked" / "metrics.jsonl").read_text().splitlines()
        if '"client"' in x
    ]
    assert all(r["bytes_up"] > 1024 for r in rows if r["kind"] == "client")  # >1 chunk


def test_a_chunked_global_is_sent_again_to_a_device_that_joins_late(tmp_path: Path) -> None:
    """A chunked global cannot be retained, so a hello with an older round triggers a resend."""
    broker = MemoryBroker()
    agg = make_agg(broker, tmp_path, rounds=2, min_clients=1, dim=16)
    agg.t.max_payload = 1024
    agg.t.connect()
    agg.global_state = const_state(1.0, 16)  # about 2.5 KB: 3+ chunks
    agg._round = 1
    agg._publish_global(have=())
    assert P.global_topic(JOB) not in broker.retained  # chunked: nothing retained
    sent = sum(1 for _, topic, _, _ in broker.log if topic == P.global_topic(JOB))
    late = hello(broker, "late")
    agg._pump(agg.clock() + 0.5, lambda: "late" in agg.devices)
    again = sum(1 for _, topic, _, _ in broker.log if topic == P.global_topic(JOB))
    assert again > sent
    got = None
    deadline = time.monotonic() + 2
    while got is None and time.monotonic() < deadline:
        m = late.recv(0.1)
        if m is not None and m.topic == P.global_topic(JOB):
            got = P.decode_message(m.payload)
    assert isinstance(got, P.GlobalModel) and got.round == 1


def test_hellos_with_another_or_a_huge_width_are_refused_and_the_job_runs(tmp_path: Path) -> None:
    """One odd hello must neither stop the job from starting nor make the aggregator allocate an
    adapter for a width nobody has (dim 1,000,000 would be 8 TB of float32)."""
    for dim_known in (True, False):
        broker = MemoryBroker()
        devs = [FakeDevice(broker, c, lambda r, c: 1.0) for c in ("a", "b")]
        odd = hello(broker, "odd", dim=3)
        huge = hello(broker, "huge", dim=1_000_000)
        for d in devs:
            d.start()
        out = tmp_path / str(dim_known)
        kw = {} if dim_known else {"dim": None}
        agg = make_agg(broker, out, rounds=1, **kw)
        final = agg.run()
        assert all(torch.allclose(v, torch.ones_like(v)) for v in final.values())
        assert agg.cfg.dim == 2
        # width 3 refused by the aggregator, 1,000,000 already by the decoder (fields)
        assert agg.counters["rejected_dim"] >= 1 and agg.counters["rejected_fields"] >= 1
        assert not agg.roster.get("huge") or not agg.roster.get("huge").active
        assert not agg.roster.get("odd") or not agg.roster.get("odd").active
        odd.close()
        huge.close()


def test_hostile_update_fields_are_refused_and_the_round_commits(tmp_path: Path) -> None:
    """Found by probing: metrics {"bytes_down": "x"}, {"loss": 10**400} and samples 10**400
    crashed the commit; a status with upload_s 10**400 crashed the aggregator. Now the decoder
    refuses each message (counted 'fields'), and the round commits with the honest update."""
    broker = MemoryBroker()
    honest = FakeDevice(broker, "a", lambda r, c: 1.0)
    honest.start()
    evil = hello(broker, "evil")
    agg = make_agg(broker, tmp_path, rounds=1, min_clients=1, weighting="samples",
                   round_timeout_s=3.0, max_retries=0, on_short="stop")
    result: dict = {}
    th = threading.Thread(target=lambda: result.setdefault("final", agg.run()), daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and agg._round != 1:
        time.sleep(0.01)
    frame = encode_frame(const_state(5.0), job=JOB, round=1, client="evil")
    topic = P.update_topic(JOB, "evil")
    for samples, metrics in ((10**400, {}), (1, {"bytes_down": "x"}), (1, {"loss": 10**400})):
        up = P.Update(JOB, 1, "evil", 1, metrics, frame, session="s", run=keys.RUN)
        body = authn.sign(up, keys.key("evil")).encode()
        if samples != 1:  # the field as a hostile sender writes it, past our encoder
            header, frame_bytes = P.decode_envelope(body)
            body = P.encode_envelope({**header, "samples": samples}, frame_bytes)
        evil.publish(topic, body)
    status = P.encode_envelope({"type": "status", "client": "evil", "state": "uploaded",
                                "samples": {}, "round": 1, "upload_s": 10**400})
    evil.publish(P.status_topic(JOB, "evil"), status)
    th.join(60)
    assert not th.is_alive() and "final" in result
    assert agg.counters["rejected_fields"] == 4 and agg.counters["accepted"] == 1
    assert agg.counters["rejected_internal"] == 0
    for v in result["final"].values():
        assert torch.allclose(v, torch.ones_like(v))
    evil.close()


def test_replayed_relabelled_forged_and_unsigned_updates_are_refused(tmp_path: Path) -> None:
    """The attack found on the demo's broker: a client replays a device's previous update
    relabelled for the new round (envelope and frame header rewritten, the frame's unkeyed
    sha256 recomputed) before the device answers. Signed updates make it fail, as do an update
    signed with another key and an unsigned one (one from an unregistered id is not even routed
    to the aggregator: issue 22); the device's own
    update is then accepted, not discarded as a duplicate."""
    broker = MemoryBroker()
    evil = MemoryTransport(broker, "evil-client")
    evil.connect()
    stranger = Ed25519PrivateKey.generate()
    captured: dict[int, bytes] = {}

    def attack(dev: FakeDevice, rnd: int, payload: bytes) -> None:
        captured[rnd] = payload
        if rnd != 1:
            return
        old = P.decode_message(payload)
        assert isinstance(old, P.Update)
        relabelled_frame = encode_frame(const_state(100.0), job=JOB, round=2, client="a")
        forged = P.Update(JOB, 2, "a", 1, {}, relabelled_frame, session=old.session, sig=old.sig)
        pending.append((P.update_topic(JOB, "a"), forged.encode()))
        other = authn.sign(P.Update(JOB, 2, "a", 1, {}, relabelled_frame), stranger)
        pending.append((P.update_topic(JOB, "a"), other.encode()))
        pending.append((P.update_topic(JOB, "a"), P.Update(JOB, 2, "a", 1, {},
                                                           relabelled_frame).encode()))
        zed_frame = encode_frame(const_state(100.0), job=JOB, round=2, client="zed")
        zed = authn.sign(P.Update(JOB, 2, "zed", 1, {}, zed_frame), stranger)
        pending.append((P.update_topic(JOB, "zed"), zed.encode()))

    pending: list[tuple[str, bytes]] = []
    a = FakeDevice(broker, "a", lambda r, c: 1.0, extra=attack)
    orig = a.t._on_raw

    def forge_first(topic: str, payload: bytes, retained: bool, *rest: object) -> None:
        if topic.endswith("/global") and pending:  # the forgeries go in before a answers
            for t, p in pending:
                evil.publish(t, p)
            pending.clear()
        orig(topic, payload, retained, *rest)

    a.t._on_raw = forge_first  # type: ignore[method-assign]
    a.start()
    b = FakeDevice(broker, "b", lambda r, c: 3.0)
    b.start()
    agg = make_agg(broker, tmp_path, rounds=2)
    final = agg.run()
    for v in final.values():
        assert torch.allclose(v, torch.full(v.shape, 2.0))  # the honest mean, both rounds
    c = agg.counters
    assert c["accepted"] == 4
    assert c["rejected_bad_signature"] == 2  # the replay and the stranger's signature
    assert c["rejected_unsigned"] == 1
    # zed (unregistered) is not routed to a signed job's aggregator at all (issue 22)
    assert c["rejected_unknown_client"] + c["rejected_unknown_key"] == 0
    assert c["rejected_duplicate"] == 0


@pytest.mark.parametrize("strategy", ["fedavg", "clip", "trimmed-mean", "median"])
def test_aggregate_strategy_bounds_a_poisoned_update(tmp_path: Path, strategy: str) -> None:
    """Four honest devices send 1.0, one sends 1e6: FedAvg's global follows the poison, every
    robust strategy stays near the honest value (clip: each delta to the global clipped to
    the median norm; trimmed-mean with trim 0.2 drops one value at each end; median)."""
    broker = MemoryBroker()
    devs = [FakeDevice(broker, c, lambda r, c: 1e6 if c == "e" else 1.0)
            for c in ("a", "b", "c", "d", "e")]
    for d in devs:
        d.start()
    opts = {"clip": {"bound": "auto"}, "trimmed-mean": {"trim": 0.2}}.get(strategy, {})
    agg = make_agg(broker, tmp_path, rounds=1, min_clients=5, strategy=strategy,
                   strategy_options=opts)
    final = agg.run()
    biggest = max(float(v.abs().max()) for v in final.values())
    if strategy == "fedavg":
        assert biggest > 1e5
    else:
        assert biggest < 2.0, (strategy, biggest)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["strategy"]["name"] == strategy


def test_a_restarted_devices_late_will_does_not_take_it_offline(tmp_path: Path) -> None:
    """kill -9 and a quick restart: the old process's will can reach the aggregator after the
    new process's hello. It names the old session, so the live device stays active."""
    broker = MemoryBroker()
    a = FakeDevice(broker, "a", lambda r, c: 1.0)
    b = FakeDevice(broker, "b", lambda r, c: 3.0)
    old_will = authn.signed_will("b", JOB, "old-session", keys.key("b"))

    class LateWill(AggregatorHooks):
        def round_started(self, agg: Aggregator, rnd: int) -> None:  # after b's hello, certain
            broker.publish("x", P.status_topic(JOB, "b"), old_will, False)

    for d in (a, b):
        d.start()
    agg = make_agg(broker, tmp_path, rounds=1)
    agg.hooks = LateWill()
    final = agg.run()
    assert agg.counters["stale_will"] == 1 and agg.roster.get("b").active
    for v in final.values():
        assert torch.allclose(v, torch.full(v.shape, 2.0))


def test_a_committed_rounds_update_is_stale_also_between_rounds(tmp_path: Path) -> None:
    """Found by the fault tests under load: a replay that reached an aggregator resumed after
    round 3, before it opened round 4, was refused as `future` ("update for round 2, now 0").
    Refused it was, but under the wrong reason: a committed round's update is `stale`."""
    from fedclip_edge.broker.roster import Device
    from fedclip_edge.broker.transport import Received

    agg = make_agg(MemoryBroker(), tmp_path)
    agg._init_state()
    agg.completed = 3  # as after `--resume`: round 4 is not open yet, `_round` is 0
    agg.roster.put(Device("a", session="s"))
    frame = encode_frame(const_state(1.0), job=JOB, round=2, client="a")
    up = authn.sign(P.Update(JOB, 2, "a", 1, {}, frame, session="s", run=keys.RUN), keys.key("a"))
    payload = up.encode()
    agg._handle(Received(P.update_topic(JOB, "a"), payload, False, len(payload)))
    assert agg.counters["rejected_stale"] == 1 and agg.counters["rejected_future"] == 0
    assert any("rejected (stale)" in line and "round 3 committed" in line for line in agg.lines)
