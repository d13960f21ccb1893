"""Site aggregators under a central one, through the in-memory transport.

Two sites (2 and 3 fake devices answering constant adapters) under one central aggregator: the
central's final adapter must be the flat FedAvg of all five devices (uniform and by samples),
a site late for the central's deadline is a late device, a lost site update is sent again when
the central's retry does not list the site, and the prefix remap rewrites topics both ways.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig, AggregatorHooks
from fedclip_edge.broker.hierarchy import read_site_weight, site_metrics
from fedclip_edge.broker.prevalidate import PrevalidateMixin
from fedclip_edge.broker.remap import RemappedMemoryTransport, remap_in, remap_out
from fedclip_edge.broker.site import SiteAggregator
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.errors import ConfigError
from fedclip_edge.wire import encode_frame

JOB = "hier"
DIM = 2


def const_state(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full(v.shape, value) for k, v in AttentionAdapter(DIM).state_dict().items()}


class FakeDevice(threading.Thread):
    """Answers each global of round <= rounds with the constant adapter value(round)."""

    def __init__(self, broker: MemoryBroker, client: str, value: Callable[[int], float],
                 samples: int, before_send: Callable[[int], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.client, self.value, self.samples = client, value, samples
        self.before_send = before_send
        self.t = MemoryTransport(
            broker, client, will=(P.status_topic(JOB, client), P.offline_status(client), True)
        )
        self.t.subscribe(P.global_topic(JOB), P.control_topic(JOB))
        self.t.connect()
        st = P.Status(client, "online", {"train": samples}, "test", DIM, hello=True)
        self.t.publish(P.status_topic(JOB, client), st.encode(), retain=True)
        self.seen: set[int] = set()
        self.final: dict[str, torch.Tensor] | None = None

    def run(self) -> None:
        from fedclip_edge.wire import decode_frame

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            msg = self.t.recv(0.05)
            if msg is None:
                continue
            m = P.decode_message(msg.payload)
            if isinstance(m, P.Control) and m.state == "done":
                return
            if isinstance(m, P.GlobalModel) and m.round > m.rounds:
                self.final = decode_frame(m.frame).tensors
            elif isinstance(m, P.GlobalModel) and m.round not in self.seen:
                self.seen.add(m.round)
                if self.before_send is not None:
                    self.before_send(m.round)
                frame = encode_frame(const_state(self.value(m.round)), job=JOB, round=m.round,
                                     client=self.client)
                up = P.Update(JOB, m.round, self.client, self.samples,
                              {"loss": self.value(m.round)}, frame)
                self.t.publish(P.update_topic(JOB, self.client), up.encode())


def agg_cfg(out: Path, **kw: Any) -> AggregatorConfig:
    return AggregatorConfig(
        job=JOB, rounds=kw.pop("rounds", 2), out=out, min_clients=kw.pop("min_clients", 2),
        round_timeout_s=kw.pop("round_timeout_s", 10.0), dim=DIM,
        wait_clients_s=kw.pop("wait_clients_s", 5.0), upload_grace_s=0.0,
        # the hierarchy's arithmetic and faults, not its signatures (tested in test_aggregator)
        insecure_unsigned=True, **kw,
    )


class PrevalidatingMemory(PrevalidateMixin, MemoryTransport):
    """The in-memory transport with the validation worker thread (as `aggregate` runs)."""


class Hierarchy:
    """A central broker and aggregator, and one broker + site aggregator per site."""

    def __init__(self, tmp: Path, sites: dict[str, list[tuple[str, float, int]]], *,
                 weighting: str = "uniform", central_kw: dict[str, Any] | None = None,
                 site_kw: dict[str, Any] | None = None, hooks: AggregatorHooks | None = None,
                 upstream: Callable[[MemoryBroker, str, Any], Any] | None = None,
                 before_send: Callable[[str, int], None] | None = None,
                 local: type[MemoryTransport] = MemoryTransport) -> None:
        self.central_broker = MemoryBroker()
        self.lines: list[str] = []
        self.central = Aggregator(
            local(self.central_broker, "aggregator"),
            agg_cfg(tmp / "central", weighting=weighting,
                    **{"min_clients": len(sites), **(central_kw or {})}),
            log=self.lines.append, hooks=hooks,
        )
        self.devices: list[FakeDevice] = []
        self.sites: list[SiteAggregator] = []
        self.errors: list[BaseException] = []
        for name, devs in sites.items():
            b = MemoryBroker()
            for client, base, samples in devs:
                self.devices.append(FakeDevice(
                    b, client, lambda r, base=base: base + 10 * r, samples,
                    (lambda r, c=client: before_send(c, r)) if before_send else None,
                ))
            will = (P.status_topic(JOB, name), P.offline_status(name), True)
            make_up = upstream or (lambda broker, cid, w: MemoryTransport(broker, cid, will=w))
            self.sites.append(SiteAggregator(
                local(b, "aggregator"),
                make_up(self.central_broker, name, will),
                agg_cfg(tmp / name, rounds=1, min_clients=len(devs), **(site_kw or {})),
                site=name, log=self.lines.append,
            ))

    def run(self) -> dict[str, torch.Tensor]:
        for d in self.devices:
            d.start()
        threads = [threading.Thread(target=self._site, args=(s,), daemon=True)
                   for s in self.sites]
        for th in threads:
            th.start()
        final = self.central.run()
        for th in threads:
            th.join(30)
        for d in self.devices:
            d.join(30)
        assert not self.errors, self.errors
        return final

    def _site(self, site: SiteAggregator) -> None:
        try:
            site.run()
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self.errors.append(exc)


SITES = {
    "siteA": [("a1", 1.0, 3), ("a2", 2.0, 5)],
    "siteB": [("b1", 4.0, 1), ("b2", 8.0, 7), ("b3", 16.0, 2)],
}


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def flat_mean(devs: list[tuple[str, float, int]], rnd: int, weighting: str) -> float:
    w = [1.0 if weighting == "uniform" else float(s) for _, _, s in devs]
    return sum(wi * (b + 10 * rnd) for wi, (_, b, _) in zip(w, devs, strict=True)) / sum(w)


@pytest.mark.parametrize(
    ("weighting", "local"),
    [("uniform", MemoryTransport), ("samples", MemoryTransport),
     ("samples", PrevalidatingMemory)],
)
def test_central_over_two_sites_equals_flat_fedavg(
    tmp_path: Path, weighting: str, local: type[MemoryTransport]
) -> None:
    h = Hierarchy(tmp_path, SITES, weighting=weighting, local=local)
    final = h.run()
    everyone = [d for devs in SITES.values() for d in devs]
    want = flat_mean(everyone, 2, weighting)  # constant adapters: the last round's mean
    # a site's mean per weighting differs from a mean of site means: the test can fail
    naive = sum(flat_mean(devs, 2, weighting) for devs in SITES.values()) / len(SITES)
    assert abs(naive - want) > 1e-3
    for v in final.values():
        assert torch.allclose(v.double(), torch.full(v.shape, want, dtype=torch.float64),
                              atol=1e-6, rtol=0)
    # every site and every device ended with the central's final adapter
    for s in h.sites:
        assert s.final_state is not None and s.central_rounds == [1, 2]
        assert all(torch.equal(s.final_state[k], final[k]) for k in final)
    for d in h.devices:
        assert d.final is not None and all(torch.equal(d.final[k], final[k]) for k in final)
    rows = jsonl(tmp_path / "central" / "metrics.jsonl")
    site_rows = [r for r in rows if r["kind"] == "client" and r["round"] == 2]
    by = {r["client"]: r for r in site_rows}
    assert set(by) == {"siteA", "siteB"}
    assert by["siteB"]["site_devices"] == 3 and by["siteB"]["samples"] == 10
    assert by["siteB"]["site_weight"] == (3.0 if weighting == "uniform" else 10.0)
    # each site's own run folder has its rounds and its devices' rows
    srows = jsonl(tmp_path / "siteB" / "metrics.jsonl")
    assert {r["client"] for r in srows if r["kind"] == "client"} == {"b1", "b2", "b3"}
    assert json.loads((tmp_path / "siteB" / "state.json").read_text())["completed_round"] == 2


class CommitEvents(AggregatorHooks):
    def __init__(self) -> None:
        self.committed: dict[int, threading.Event] = {r: threading.Event() for r in (1, 2, 3)}

    def after_commit(self, agg: Aggregator, rnd: int, commit_s: float, reports_s: float) -> None:
        self.committed[rnd].set()


def test_a_site_late_for_the_central_deadline_is_a_late_device(tmp_path: Path) -> None:
    hooks = CommitEvents()

    def hold_b2(client: str, rnd: int) -> None:
        if client == "b2" and rnd == 1:  # siteB's round 1 ends only after the central's did
            assert hooks.committed[1].wait(30)

    h = Hierarchy(tmp_path, SITES, central_kw={"min_clients": 1, "round_timeout_s": 2.0},
                  hooks=hooks, before_send=hold_b2)
    final = h.run()
    rows = jsonl(tmp_path / "central" / "metrics.jsonl")
    rounds = {r["round"]: r for r in rows if r["kind"] == "round"}
    assert rounds[1]["clients"] == ["siteA"]
    assert rounds[2]["clients"] == ["siteA", "siteB"]
    assert h.central.counters["rejected_stale"] == 1  # siteB's round-1 partial came too late
    want = flat_mean([d for devs in SITES.values() for d in devs], 2, "uniform")
    for v in final.values():
        assert torch.allclose(v.double(), torch.full(v.shape, want, dtype=torch.float64),
                              atol=1e-6, rtol=0)


class LoseFirstUpdate(MemoryTransport):
    """Upstream transport whose first update publish is lost on the way (acknowledged)."""

    lost = 0

    def _send(self, topic: str, payload: bytes, retain: bool) -> Any:
        if "/update/" in topic and not self.lost:
            self.lost += 1
            return lambda _t: True  # the sender believes it went out
        return super()._send(topic, payload, retain)


def test_a_lost_site_update_is_sent_again_on_the_centrals_retry(tmp_path: Path) -> None:
    def upstream(broker: MemoryBroker, cid: str, will: Any) -> MemoryTransport:
        cls = LoseFirstUpdate if cid == "siteB" else MemoryTransport
        return cls(broker, cid, will=will)

    h = Hierarchy(tmp_path, SITES, central_kw={"round_timeout_s": 1.0, "rounds": 1},
                  upstream=upstream)
    final = h.run()
    site_b = h.sites[1]
    assert site_b.up.lost == 1 and site_b.up_counters["updates_resent"] == 1
    assert any("retry 1/2" in line for line in h.lines)
    want = flat_mean([d for devs in SITES.values() for d in devs], 1, "uniform")
    for v in final.values():
        assert torch.allclose(v.double(), torch.full(v.shape, want, dtype=torch.float64),
                              atol=1e-6, rtol=0)


def test_site_updates_through_a_prefixed_upstream(tmp_path: Path) -> None:
    """The site talks to `fedclip-up/...`; a forwarder plays the bridge that maps it."""

    def upstream(broker: MemoryBroker, cid: str, will: Any) -> RemappedMemoryTransport:
        return RemappedMemoryTransport(broker, cid, will=will, topic_prefix="fedclip-up")

    # one broker for both levels: the central's topics are fedclip/..., the sites' fedclip-up/...
    # and a bridge copies between them as mosquitto's `topic ... fedclip-up/ fedclip/` does
    h = Hierarchy(tmp_path, {"siteA": SITES["siteA"]}, central_kw={"rounds": 1},
                  upstream=upstream)
    seen: list[str] = []
    orig = h.central_broker.publish

    def bridge(sender: str, topic: str, payload: bytes, retain: bool) -> None:
        seen.append(topic)
        orig(sender, topic, payload, retain)
        if topic.startswith("fedclip-up/"):
            orig(sender, remap_in(topic, "fedclip-up"), payload, retain)
        elif topic.startswith("fedclip/") and ("/global" in topic or "/control" in topic):
            orig(sender, remap_out(topic, "fedclip-up"), payload, retain)

    h.central_broker.publish = bridge  # type: ignore[method-assign]
    final = h.run()
    assert "fedclip-up/hier/update/siteA" in seen and "fedclip-up/hier/status/siteA" in seen
    want = flat_mean(SITES["siteA"], 1, "uniform")
    for v in final.values():
        assert torch.allclose(v.double(), torch.full(v.shape, want, dtype=torch.float64),
                              atol=1e-6, rtol=0)


def test_remap_rewrites_topics_both_ways() -> None:
    broker = MemoryBroker()
    t = RemappedMemoryTransport(broker, "s", topic_prefix="up/x",
                                will=(P.status_topic(JOB, "s"), P.offline_status("s"), True))
    assert t.will is not None and t.will[0] == "up/x/hier/status/s"
    t.subscribe(P.global_topic(JOB))
    t.connect()
    other = MemoryTransport(broker, "o")
    other.subscribe("#")
    other.connect()
    t.publish(P.update_topic(JOB, "s"), b"x")
    got = other.recv(1)
    assert got is not None and got.topic == "up/x/hier/update/s"
    other.publish("up/x/hier/global", b"g")
    other.publish("fedclip/hier/global", b"not for the remapped client")
    msg = t.recv(1)
    assert msg is not None and (msg.topic, msg.payload) == ("fedclip/hier/global", b"g")
    assert t.recv(0.05) is None
    assert remap_out("other/a", "up") == "other/a" and remap_in("fedclip/a", "up") == "fedclip/a"
    for bad in ("", "a/+", "#", "/a", "a/", "a b"):
        with pytest.raises(ConfigError):
            RemappedMemoryTransport(broker, "z", topic_prefix=bad)


def test_central_checks_a_sites_weight() -> None:
    m = site_metrics(3, 10, "uniform")
    assert read_site_weight(m, 10, "uniform") == 3.0
    assert read_site_weight(site_metrics(3, 10, "samples"), 10, "samples") == 10.0
    for metrics, samples, weighting in (
        ({}, 10, "uniform"),
        ({**m, "site_weight": float("nan")}, 10, "uniform"),
        ({**m, "site_weight": -1.0}, 10, "uniform"),
        (m, 10, "samples"),  # aggregated under another weighting
        ({**site_metrics(3, 10, "samples"), "site_weight": 11.0}, 10, "samples"),
        ({**m, "site_weight": 4.0}, 10, "uniform"),
    ):
        with pytest.raises(P.MessageRejected) as exc:
            read_site_weight(metrics, samples, weighting)
        assert exc.value.reason == "fields"


def test_a_resumed_site_resends_its_committed_partial_without_retraining(tmp_path: Path) -> None:
    """The site crashes after sending round 1; the central (restarted: a new session) still
    waits for round 1; the resumed site rebuilds that partial from its run folder."""
    from fedclip_edge.errors import FedClipError
    from fedclip_edge.wire import decode_frame

    central, site_broker = MemoryBroker(), MemoryBroker()
    devs = [FakeDevice(site_broker, c, lambda r, b=b: b + 10 * r, s) for c, b, s in SITES["siteA"]]
    for d in devs:
        d.start()
    hub = MemoryTransport(central, "aggregator")
    hub.subscribe(P.update_filter(JOB))
    hub.connect()
    frame = encode_frame(const_state(0.5), job=JOB, round=1, client=P.AGGREGATOR_ID)

    def publish_global(session: str) -> None:
        g = P.GlobalModel(JOB, 1, frame, seed=3, rounds=1, session=session, weighting="samples")
        hub.publish(P.global_topic(JOB), g.encode(), retain=True)

    def site(resume: bool) -> SiteAggregator:
        up = MemoryTransport(central, "siteA",
                             will=(P.status_topic(JOB, "siteA"), P.offline_status("siteA"), True))
        return SiteAggregator(
            MemoryTransport(site_broker, "aggregator"), up,
            agg_cfg(tmp_path / "siteA", rounds=1, min_clients=2, resume=resume),
            site="siteA", log=lambda s: None, idle_timeout_s=1.0,
        )

    publish_global("s1")
    first = site(False)
    with pytest.raises(FedClipError, match="nothing from the central"):
        first.run()  # answers round 1, then hears nothing: the "crash"
    got1 = hub.recv(1)
    assert got1 is not None and first.central_rounds == [1]
    trained = [len(d.seen) for d in devs]

    publish_global("s2")  # the central restarted: round 1 again, nobody listed
    second = site(True)
    with pytest.raises(FedClipError, match="nothing from the central"):
        second.run()
    got2 = hub.recv(1)
    assert got2 is not None and second.up_counters["updates_resent"] == 1
    assert second.central_rounds == []  # no local round was run again
    assert [len(d.seen) for d in devs] == trained
    u1, u2 = P.decode_message(got1.payload), P.decode_message(got2.payload)
    assert isinstance(u1, P.Update) and isinstance(u2, P.Update)
    assert (u2.samples, u2.metrics["site_weight"], u2.metrics["site_weighting"]) == (
        8, 8.0, "samples")
    a, b = decode_frame(u1.frame).tensors, decode_frame(u2.frame).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    want = flat_mean(SITES["siteA"], 1, "samples")
    assert all(torch.allclose(v, torch.full(v.shape, want)) for v in b.values())


def test_three_levels_region_over_sites_equals_flat_fedavg(tmp_path: Path) -> None:
    """central <- region <- (siteA, siteB) <- devices: the region weighs each site by the
    devices behind it, so uniform weighting stays flat over all five devices."""
    central_b, region_b = MemoryBroker(), MemoryBroker()
    lines: list[str] = []
    central = Aggregator(MemoryTransport(central_b, "aggregator"),
                         agg_cfg(tmp_path / "central", min_clients=1, rounds=1), log=lines.append)

    def up(broker: MemoryBroker, cid: str) -> MemoryTransport:
        return MemoryTransport(broker, cid,
                               will=(P.status_topic(JOB, cid), P.offline_status(cid), True))

    region = SiteAggregator(MemoryTransport(region_b, "aggregator"), up(central_b, "region"),
                            agg_cfg(tmp_path / "region", rounds=1, min_clients=2),
                            site="region", log=lines.append)
    sites, devices = [], []
    for name, devs in SITES.items():
        b = MemoryBroker()
        devices += [FakeDevice(b, c, lambda r, base=base: base + 10 * r, s) for c, base, s in devs]
        sites.append(SiteAggregator(MemoryTransport(b, "aggregator"), up(region_b, name),
                                    agg_cfg(tmp_path / name, rounds=1, min_clients=len(devs)),
                                    site=name, log=lines.append))
    errors: list[BaseException] = []

    def run(s: SiteAggregator) -> None:
        try:
            s.run()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in (*sites, region)]
    for th in [*devices, *threads]:
        th.start()
    final = central.run()
    for th in threads:
        th.join(30)
    assert not errors, (errors, lines)
    want = flat_mean([d for devs in SITES.values() for d in devs], 1, "uniform")
    for v in final.values():
        assert torch.allclose(v.double(), torch.full(v.shape, want, dtype=torch.float64),
                              atol=1e-6, rtol=0)
    (row,) = [r for r in jsonl(tmp_path / "central" / "metrics.jsonl") if r["kind"] == "client"]
    assert (row["client"], row["site_devices"], row["site_weight"]) == ("region", 5, 5.0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--upstream", "mqtt://127.0.0.1:1"], "give --upstream and --site together"),
        ([], "--rounds is required"),
        (["--upstream", "mqtt://127.0.0.1:1", "--site", "a b"], "--site 'a b' must be"),
        (["--upstream", "mqtt://127.0.0.1:1", "--site", "s", "--upstream-prefix", "a/+"],
         "topic prefix 'a/+' must be"),
    ],
)
def test_site_options_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    from fedclip_edge.broker.cli import main

    rc = main(["aggregate", "--broker", "mqtt://127.0.0.1:1", "--job", "j",
               "--out", str(tmp_path / "o"), "--insecure-unsigned", *extra])
    err = capsys.readouterr().err
    err = "".join(x for x in err.splitlines(True) if not x.startswith("warning: --insecure"))
    assert rc != 0 and err.startswith("error: ") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# a3 is poisoned; in round 2 the devices answer base + 20
POISONED = {
    "siteA": [("a1", 1.0, 10), ("a2", 2.0, 20), ("a3", 1e5, 30)],
    "siteB": [("b1", 4.0, 5), ("b2", 5.0, 5), ("b3", 6.0, 10)],
}


def test_site_median_then_central_fedavg_over_the_wire(tmp_path: Path) -> None:
    """Sites run --strategy median over their devices (unweighted; the central's `samples`
    weighting reaches them with the global and sets only their weight upstream); the central's
    FedAvg weighs each site's median by its devices' samples."""
    h = Hierarchy(tmp_path, POISONED, weighting="samples", site_kw={"strategy": "median"})
    final = h.run()
    want = (60 * 22 + 20 * 25) / 80  # medians 22 (a3 dropped) and 25, samples 60 and 20
    for v in final.values():
        assert torch.allclose(v.double(), torch.full(v.shape, want, dtype=torch.float64),
                              atol=1e-5, rtol=0)
    rows = jsonl(tmp_path / "central" / "metrics.jsonl")
    by = {r["client"]: r for r in rows if r["kind"] == "client" and r["round"] == 2}
    assert by["siteA"]["site_weight"] == 60.0
    assert h.central.devices["siteA"].versions["site_strategy"] == "median"  # its hello
    assert not [x for x in h.lines if x.startswith("warning:")]  # FedAvg at the central


def test_central_median_over_sites_is_unweighted_and_says_so_once(tmp_path: Path) -> None:
    sites = {**POISONED, "siteC": [("c1", 50.0, 1)]}
    h = Hierarchy(tmp_path, sites, site_kw={"strategy": "median"},
                  central_kw={"strategy": "median"})
    final = h.run()
    # site medians 22, 25, 70: the central's median is 25 (FedAvg by devices: 211/7)
    for v in final.values():
        assert torch.allclose(v.double(), torch.full(v.shape, 25.0, dtype=torch.float64),
                              atol=1e-5, rtol=0)
    warned = [x for x in h.lines if x.startswith("warning: strategy median over site")]
    assert len(warned) == 1, h.lines
    assert "unweighted over sites" in warned[0]
