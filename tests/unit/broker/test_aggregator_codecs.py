"""The aggregator with compressed updates (issue 11): a fleet that mixes codecs in one round.

Why apart from test_aggregator.py: these devices encode against the global they received
(delta codecs), so the expected global is FedAvg of what the server decodes, worked out here
with the same `decode_update`, and the report must say what each codec cost.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import keys
from support.fleet import JOB

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.prevalidate import PrevalidateMixin
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.wire import decode_frame, decode_update, encode_frame, encode_update

DIM = 8
CODECS = {"a": "fp32-v1", "b": "delta-fp16", "c": "int8", "d": "topk-int8", "e": "topk"}


class PrevalidatingMemory(PrevalidateMixin, MemoryTransport):
    """Updates decoded on the validation worker thread, as `aggregate` runs."""


def _hello(broker: MemoryBroker, client: str, dim: int = DIM) -> MemoryTransport:
    t = MemoryTransport(broker, client)
    t.subscribe(P.global_topic(JOB), P.control_topic(JOB))
    t.connect()
    st = P.Status(client, "online", {"train": 6, "val": 2, "test": 2}, "test", dim, hello=True,
                  session="s", run=keys.RUN)
    t.publish(P.status_topic(JOB, client), authn.sign(st, keys.key(client), job=JOB).encode(),
              retain=True)
    return t


def _signed_update(client: str, rnd: int, frame: bytes) -> bytes:
    up = P.Update(JOB, rnd, client, 1, {"loss": 0.5}, frame, session="s", run=keys.RUN)
    return authn.sign(up, keys.key(client)).encode()


class CodecDevice(threading.Thread):
    """Answers each global with global + a client-and-round pattern, in its own codec; keeps
    every frame it sent with the global it was encoded against."""

    def __init__(self, broker: MemoryBroker, client: str, codec: str,
                 extra: Callable[[CodecDevice, int, dict], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.t = _hello(broker, client)
        self.client, self.codec, self.extra = client, codec, extra
        self.sent: dict[int, tuple[bytes, dict[str, torch.Tensor]]] = {}

    def _state(self, glob: dict[str, torch.Tensor], rnd: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(rnd * 100 + ord(self.client))
        return {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in glob.items()}

    def run(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = self.t.recv(0.05)
            if msg is None:
                continue
            m = P.decode_message(msg.payload)
            if isinstance(m, P.Control) and m.state == "done":
                return
            if not isinstance(m, P.GlobalModel) or m.round > m.rounds or m.round in self.sent:
                continue
            glob = decode_frame(m.frame).tensors
            state = self._state(glob, m.round)
            if self.codec == "fp32-v1":
                frame = encode_frame(state, job=JOB, round=m.round, client=self.client)
            else:
                frame = encode_update(state, glob, codec=self.codec, job=JOB, round=m.round,
                                      client=self.client, topk_fraction=0.1)
            if self.extra:  # before our own update: it would make later ones duplicates
                self.extra(self, m.round, glob)
            self.sent[m.round] = (frame, glob)
            self.t.publish(P.update_topic(JOB, self.client),
                           _signed_update(self.client, m.round, frame))


def _agg(broker: MemoryBroker, out: Path, transport_cls: type, **kw) -> Aggregator:
    cfg = AggregatorConfig(
        job=JOB, rounds=kw.pop("rounds", 2), out=out, min_clients=kw.pop("min_clients", 5),
        round_timeout_s=5.0, dim=DIM, wait_clients_s=5.0, upload_grace_s=0.0,
        registry=keys.registry(tuple(CODECS) + ("evil",)),
        signing_key=keys.key(keys.AGGREGATOR), run=keys.RUN, **kw,
    )
    lines: list[str] = []
    agg = Aggregator(transport_cls(broker, "aggregator"), cfg, log=lines.append)
    agg.lines = lines  # type: ignore[attr-defined]
    return agg


@pytest.mark.parametrize("transport_cls", [MemoryTransport, PrevalidatingMemory])
def test_a_fleet_mixing_every_codec_aggregates_to_fedavg_of_the_decoded_updates(
    tmp_path: Path, transport_cls: type
) -> None:
    broker = MemoryBroker()
    devs = [CodecDevice(broker, c, codec) for c, codec in CODECS.items()]
    for d in devs:
        d.start()
    agg = _agg(broker, tmp_path, transport_cls)
    final = agg.run()
    assert agg.counters["accepted"] == 10, agg.lines  # type: ignore[attr-defined]
    # round 2's global is FedAvg (uniform) of the full adapters the server rebuilt
    decoded = [decode_update(*d.sent[2]).tensors for d in devs]
    for k, v in final.items():
        want = torch.stack([u[k] for u in decoded]).mean(0)
        assert torch.allclose(v, want, atol=1e-6), k
    # and differs from a mean of the devices' own (unsent) states: compression is visible
    assert not all(
        torch.allclose(final[k], torch.stack([d._state(d.sent[2][1], 2)[k] for d in devs]).mean(0),
                       atol=1e-6)
        for k in final
    )
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    clients = [r for r in rows if r["kind"] == "client"]
    want_codec = {c: ("fp32" if codec == "fp32-v1" else codec) for c, codec in CODECS.items()}
    assert {r["client"]: r["update_codec"] for r in clients} == want_codec
    by_codec: dict[str, int] = {}
    for r in clients:
        by_codec[r["update_codec"]] = by_codec.get(r["update_codec"], 0) + r["bytes_up"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["totals"]["bytes_up_by_codec"] == dict(sorted(by_codec.items()))
    assert summary["totals"]["updates_by_codec"] == dict.fromkeys(sorted(by_codec), 2)
    round2 = [r for r in rows if r["kind"] == "round" and r["round"] == 2][0]
    assert sum(round2["bytes_up_by_codec"].values()) == round2["bytes_up"]
    # at d = 8 framing dominates (scales, safetensors entries), but dense fp32 is the largest
    assert max(by_codec, key=lambda k: by_codec[k]) == "fp32"


@pytest.mark.parametrize("transport_cls", [MemoryTransport, PrevalidatingMemory])
def test_delta_frames_against_another_global_are_counted_rejections(
    tmp_path: Path, transport_cls: type
) -> None:
    """A delta names its round, and the server adds it to that round's global only: a delta
    built on another round's global is stale (or future), one built on another model's global
    fails the shape check; each is one counted rejection and the round commits unchanged."""
    broker = MemoryBroker()
    evil = MemoryTransport(broker, "evil")
    evil.connect()

    def attack(dev: CodecDevice, rnd: int, glob: dict[str, torch.Tensor]) -> None:
        if rnd != 2:
            return
        topic = P.update_topic(JOB, "a")
        old_frame, old_glob = dev.sent[1]
        # round 1's delta again, relabelled nowhere: stale
        evil.publish(topic, _signed_update("a", 1, old_frame))
        # a delta on round 1's global naming round 3: future
        f3 = encode_update(dev._state(old_glob, 3), old_glob, codec="topk-int8", job=JOB,
                           round=3, client="a")
        evil.publish(topic, _signed_update("a", 3, f3))
        # a delta on a global of another width, naming this round: shape
        other = {k: v.clone() for k, v in AttentionAdapter(4).state_dict().items()}
        f2 = encode_update(other, other, codec="int8", job=JOB, round=2, client="a")
        evil.publish(topic, _signed_update("a", 2, f2))
        # a truncated delta frame: hash
        good = encode_update(dev._state(glob, 2), glob, codec="topk", job=JOB, round=2,
                             client="a")
        evil.publish(topic, _signed_update("a", 2, good[:-7]))

    attacked = threading.Event()

    def attack_then_let_b_answer(dev: CodecDevice, rnd: int, glob: dict) -> None:
        attack(dev, rnd, glob)
        if rnd == 2:
            attacked.set()

    a = CodecDevice(broker, "a", "topk-int8")
    b = CodecDevice(broker, "b", "int8")
    a.extra = attack_then_let_b_answer
    # b publishes its round-2 update only once the attacks are in the aggregator's inbox, so the
    # round is certainly open for them (was a 0.5 s sleep: a race under load)
    publish = b.t.publish

    def after_the_attack(topic: str, payload: bytes, **kw: object):  # type: ignore[no-untyped-def]
        if topic == P.update_topic(JOB, "b") and P.decode_message(payload).round == 2:
            assert attacked.wait(30), "the attack never ran"
        return publish(topic, payload, **kw)

    b.t.publish = after_the_attack  # type: ignore[method-assign]
    a.start()
    b.start()
    agg = _agg(broker, tmp_path, transport_cls, min_clients=2)
    final = agg.run()
    c = agg.counters
    assert c["accepted"] == 4, agg.lines  # type: ignore[attr-defined]
    assert c["rejected_stale"] == 1
    assert c["rejected_future"] == 1
    assert c["rejected_frame_shape"] + c["rejected_frame_names"] == 1
    assert c["rejected_frame_hash"] + c["rejected_frame_truncated"] == 1
    assert c["rejected_internal"] == 0
    decoded = [decode_update(*d.sent[2]).tensors for d in (a, b)]
    for k, v in final.items():
        assert torch.allclose(v, (decoded[0][k] + decoded[1][k]) / 2, atol=1e-6), k


def _agents_run(tmp: Path, crash_at: int | None = None) -> dict[str, torch.Tensor]:
    """Real agents (dev-a fp32, dev-b int8, dev-c topk-int8, in-memory error feedback) for 4
    rounds; with crash_at, the aggregator dies before committing that round and resumes."""
    from support.fleet import TRAIN, start_agents

    broker = MemoryBroker()
    agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"])
    for (a, _), codec in zip(agents, ("fp32", "int8", "topk-int8"), strict=True):
        a.cfg.update_codec = codec
    reg = keys.registry(("dev-a", "dev-b", "dev-c"))

    def make(resume: bool = False) -> Aggregator:
        cfg = AggregatorConfig(
            job=JOB, rounds=4, out=tmp, min_clients=3, round_timeout_s=20.0, dim=8,
            wait_clients_s=10.0, upload_grace_s=0.0, registry=reg, train=TRAIN, seed=3,
            signing_key=keys.key(keys.AGGREGATOR), run=keys.RUN, resume=resume,
        )
        return Aggregator(PrevalidatingMemory(broker, "aggregator"), cfg, log=lambda s: None)

    agg = make()
    if crash_at is not None:
        real_commit = agg._commit

        def crash(rnd, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            if rnd == crash_at:
                raise RuntimeError("simulated crash before committing")
            return real_commit(rnd, *args, **kw)

        agg._commit = crash  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="simulated crash"):
            agg.run()
        agg.t.close()
        agg = make(resume=True)
    final = agg.run()
    for _, th in agents:
        th.join(10)
    assert all(a.rounds_trained == 4 for a, _ in agents)  # nobody trained a round twice
    return final


def test_resume_with_delta_codecs_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    """The resumed aggregator gets the cached updates again (the same bytes: a delta codec's
    residual has already moved on, so the agents must not encode again) and ends where an
    uninterrupted run ends."""
    full = _agents_run(tmp_path / "full")
    resumed = _agents_run(tmp_path / "crashed", crash_at=3)
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k
    metrics = (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in metrics]
    codecs = {(r["client"], r["update_codec"]) for r in rows if r["kind"] == "client"}
    assert codecs == {("dev-a", "fp32"), ("dev-b", "int8"), ("dev-c", "topk-int8")}


def test_a_site_aggregator_takes_delta_codecs_and_sends_a_dense_partial(tmp_path: Path) -> None:
    """A site's devices send deltas against the site's global (the central's); the site
    rebuilds them on that global and its upstream update stays a dense frame."""
    from fedclip_edge.broker.site import SiteAggregator

    central_broker, site_broker = MemoryBroker(), MemoryBroker()

    def cfg(out: Path, min_clients: int, rounds: int = 2) -> AggregatorConfig:
        return AggregatorConfig(job=JOB, rounds=rounds, out=out, min_clients=min_clients,
                                round_timeout_s=10.0, dim=DIM, wait_clients_s=5.0,
                                upload_grace_s=0.0, insecure_unsigned=True, run=keys.RUN)

    central = Aggregator(MemoryTransport(central_broker, "aggregator"),
                         cfg(tmp_path / "central", 1), log=lambda s: None)
    devs = [CodecDevice(site_broker, "b", "int8"), CodecDevice(site_broker, "d", "topk-int8")]
    will = (P.status_topic(JOB, "siteA"), P.offline_status("siteA"), True)
    site = SiteAggregator(PrevalidatingMemory(site_broker, "aggregator"),
                          MemoryTransport(central_broker, "siteA", will=will),
                          cfg(tmp_path / "siteA", 2, rounds=1), site="siteA", log=lambda s: None)
    errors: list[BaseException] = []

    def run_site() -> None:
        try:
            site.run()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    for d in devs:
        d.start()
    th = threading.Thread(target=run_site, daemon=True)
    th.start()
    final = central.run()
    th.join(30)
    assert not errors, errors
    decoded = [decode_update(*d.sent[2]).tensors for d in devs]
    for k, v in final.items():
        assert torch.allclose(v, (decoded[0][k] + decoded[1][k]) / 2, atol=1e-6), k
    rows = [json.loads(x) for x in (tmp_path / "central" / "metrics.jsonl").read_text().splitlines()
            if '"client"' in x]
    assert {r["update_codec"] for r in rows if r["kind"] == "client"} == {"fp32"}
    srows = [json.loads(x) for x in (tmp_path / "siteA" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["client"], r["update_codec"]) for r in srows if r["kind"] == "client"} == {
        ("b", "int8"), ("d", "topk-int8")}
