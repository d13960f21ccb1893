"""Hierarchical aggregation over real, bridged mosquitto brokers on loopback.

A central mosquitto and two site mosquittos, each site broker bridged to the central with the
bridge config `broker/bridge.py` writes (topics remapped under `fedclip-up`). Fake devices (paho
clients publishing constant frames) sit on the site brokers only; each site aggregator talks to
the central job through its OWN broker (`--upstream-prefix fedclip-up`); the central aggregator
is on the central broker. The central's final adapter must be the flat mean over all devices.

Signed too: with keys, the central takes the sites from its site registry (`--site-keys`) and
subscribes to each registered id's own topics (broker/penalty.py), which the bridge must still
reach through its remapped topics; devices sign for their site, sites for the central.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from support import keys
from support.mqtt import require_mosquitto

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.bridge import bridge_config
from fedclip_edge.broker.hierarchy import SiteRegistry
from fedclip_edge.broker.mosquitto import run_mosquitto
from fedclip_edge.broker.remap import RemappedMqttTransport
from fedclip_edge.broker.site import SiteAggregator
from fedclip_edge.broker.transport import MqttTransport
from fedclip_edge.wire import decode_frame, encode_frame

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

JOB = "hierm"
DIM = 4
SITES = {"siteA": [("a1", 1.0, 3), ("a2", 2.0, 5)],
         "siteB": [("b1", 4.0, 1), ("b2", 8.0, 7), ("b3", 16.0, 2)]}


class MqttDevice(threading.Thread):
    """A paho device: retained hello, a constant adapter base + 10*round for each round."""

    def __init__(self, url: str, client: str, base: float, samples: int,
                 signed: bool = False) -> None:
        super().__init__(daemon=True)
        self.client, self.base, self.samples, self.signed = client, base, samples, signed
        self.session = uuid.uuid4().hex[:12]
        self.final: dict[str, torch.Tensor] | None = None
        self.seen: set[int] = set()
        will = (authn.signed_will(client, JOB, self.session, keys.key(client)) if signed
                else P.offline_status(client))
        self.t = MqttTransport(url, client, clean_session=True,
                               will=(P.status_topic(JOB, client), will, True))
        self.t.subscribe(P.global_topic(JOB), P.control_topic(JOB))
        self.t.connect(10)
        st = P.Status(client, "online", {"train": samples}, "test", DIM, hello=True,
                      session=self.session, run=keys.RUN if signed else "")
        assert self.t.publish(P.status_topic(JOB, client), self._sign(st), retain=True).wait(10)

    def _sign(self, msg: P.Status | P.Update) -> bytes:
        if not self.signed:
            return msg.encode()
        return authn.sign(msg, keys.key(self.client), job=JOB).encode()

    def run(self) -> None:
        deadline = time.monotonic() + 90
        try:
            while time.monotonic() < deadline:
                msg = self.t.recv(0.1)
                if msg is None:
                    continue
                m = P.decode_message(msg.payload)
                if isinstance(m, P.Control) and m.state == "done":
                    return
                if isinstance(m, P.GlobalModel) and m.round > m.rounds:
                    self.final = decode_frame(m.frame).tensors
                elif isinstance(m, P.GlobalModel) and m.round not in self.seen:
                    self.seen.add(m.round)
                    value = self.base + 10 * m.round
                    state = {k: torch.full(v.shape, value)
                             for k, v in AttentionAdapter(DIM).state_dict().items()}
                    frame = encode_frame(state, job=JOB, round=m.round, client=self.client)
                    up = P.Update(JOB, m.round, self.client, self.samples, {"loss": value}, frame,
                                  session=self.session, run=keys.RUN if self.signed else "")
                    self.t.publish(P.update_topic(JOB, self.client), self._sign(up))
        finally:
            self.t.close()


def cfg(out: Path, rounds: int, min_clients: int, weighting: str, **signed: Any
        ) -> AggregatorConfig:
    """Unsigned unless `signed` gives the keys (registry, sites, signing_key, run)."""
    return AggregatorConfig(job=JOB, rounds=rounds, out=out, min_clients=min_clients,
                            round_timeout_s=30.0, dim=DIM, wait_clients_s=20.0,
                            upload_grace_s=0.2, weighting=weighting, connect_timeout_s=10.0,
                            insecure_unsigned=not signed, **signed)


@pytest.mark.parametrize("weighting,signed", [("samples", False), ("samples", True)])
def test_sites_behind_bridged_mosquittos_give_the_flat_mean(tmp_path: Path, weighting: str,
                                                            signed: bool) -> None:
    require_mosquitto()
    with run_mosquitto(tmp_path / "central") as central:
        address = f"{central.host}:{central.port}"
        with run_mosquitto(tmp_path / "siteA", extra=bridge_config(site="siteA", address=address,
                                                                    job=JOB)) as sa, \
             run_mosquitto(tmp_path / "siteB", extra=bridge_config(site="siteB", address=address,
                                                                    job=JOB)) as sb:
            urls = {"siteA": sa.url, "siteB": sb.url}
            devices = [MqttDevice(urls[s], c, b, n, signed) for s, devs in SITES.items()
                       for c, b, n in devs]
            lines: list[str] = []
            sites: list[SiteAggregator] = []
            transports: list[Any] = []
            for name, devs in SITES.items():
                local = MqttTransport(urls[name], f"aggregator-{name}", manual_ack=True)
                session = uuid.uuid4().hex[:12]
                will = (authn.signed_will(name, JOB, session, keys.key(name)) if signed
                        else P.offline_status(name))
                up = RemappedMqttTransport(urls[name], name, topic_prefix="fedclip-up",
                                           will=(P.status_topic(JOB, name), will, True))
                transports += [local, up]
                keyed = ({"registry": keys.registry([c for c, _, _ in devs]),
                          "signing_key": keys.key(name), "run": keys.RUN} if signed else {})
                sites.append(SiteAggregator(
                    local, up, cfg(tmp_path / f"agg-{name}", 1, len(devs), weighting, **keyed),
                    site=name, log=lines.append, session=session,
                    upstream_key=keys.aggregator_public() if signed else None))
            errors: list[BaseException] = []

            def run_site(s: SiteAggregator) -> None:
                try:
                    s.run()
                except BaseException as exc:  # noqa: BLE001 - asserted below
                    errors.append(exc)

            threads = [threading.Thread(target=run_site, args=(s,), daemon=True) for s in sites]
            for th in [*devices, *threads]:
                th.start()
            ct = MqttTransport(central.url, "aggregator-central", manual_ack=True)
            keyed = ({"registry": keys.registry(()), "signing_key": keys.key(keys.AGGREGATOR),
                      "sites": SiteRegistry(keys.registry(list(SITES)), {})} if signed else {})
            central_agg = Aggregator(ct, cfg(tmp_path / "central-run", 2, 2, weighting, **keyed),
                                     log=lines.append)
            try:
                final = central_agg.run()
            finally:
                ct.close()
                for th in [*threads, *devices]:
                    th.join(30)
                for t in transports:
                    t.close()
            assert not errors, errors
            assert central_agg.counters["accepted"] == 4, (lines, sa.log(), sb.log())
            everyone = [d for devs in SITES.values() for d in devs]
            want = sum(n * (b + 20) for _, b, n in everyone) / sum(n for _, _, n in everyone)
            for v in final.values():
                assert torch.allclose(v.double(), torch.full(v.shape, want, dtype=torch.float64),
                                      atol=1e-5, rtol=0)
            assert {d.client for d in devices if d.final is not None} == {
                c for devs in SITES.values() for c, _, _ in devs}
            for s in sites:
                assert s.central_rounds == [1, 2]
            assert "fedclip-siteA" in sa.log()  # the bridge (connection name) really ran
    if signed:  # nothing was refused on the way: every message verified where it arrived
        assert not [x for x in lines if x.startswith("rejected (") or ": ignored " in x], lines
        assert central_agg.counters["accepted"] == 4 and not any(
            k.startswith("rejected_") and v for k, v in central_agg.counters.items())
