"""Roles are credentials, and signatures come before decoding (issue 22, items 1 and 6).

Red team: a registered device said hello with backend "site" and claimed `site_weight` 1e15
in each update: FedAvg followed it (held-out accuracy 55.6% -> 15.6%). And the aggregator decoded
frames (57 MiB ones too) before checking their signature.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from support import keys
from support.fleet import JOB

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.hierarchy import SITE_BACKEND, SiteRegistry, site_metrics
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport, Received
from fedclip_edge.errors import ConfigError
from fedclip_edge.wire import decode_update, encode_frame

DIM = 2


def _state(v: float) -> dict[str, torch.Tensor]:
    return {k: torch.full(t.shape, v) for k, t in AttentionAdapter(DIM).state_dict().items()}


def _cfg(out: Path, **kw) -> AggregatorConfig:  # noqa: ANN003
    return AggregatorConfig(
        job=JOB, rounds=1, out=out, min_clients=kw.pop("min_clients", 2), round_timeout_s=5.0,
        dim=DIM, wait_clients_s=3.0, upload_grace_s=0.0, strategy="fedavg",
        registry=keys.registry(["honest", "liar"]), signing_key=keys.key(keys.AGGREGATOR),
        run=keys.RUN, **kw)


class _Device(threading.Thread):
    """Says hello with `backend`, answers round 1 with value `v` and `metrics`."""

    def __init__(self, broker: MemoryBroker, client: str, backend: str, v: float,
                 metrics: dict) -> None:
        super().__init__(daemon=True)
        self.client, self.v, self.metrics = client, v, metrics
        self.t = MemoryTransport(broker, client)
        self.t.subscribe(P.global_topic(JOB))
        self.t.connect()
        st = P.Status(client, "online", {"train": 5}, backend, DIM, hello=True, session="s",
                      run=keys.RUN)
        self.t.publish(P.status_topic(JOB, client),
                       authn.sign(st, keys.key(client), job=JOB).encode(), retain=True)

    def run(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = self.t.recv(0.1)
            if m is None:
                continue
            g = P.decode_message(m.payload)
            if isinstance(g, P.GlobalModel) and g.round == 1:
                frame = encode_frame(_state(self.v), job=JOB, round=1, client=self.client)
                up = P.Update(JOB, 1, self.client, 5, dict(self.metrics), frame, session="s",
                              run=keys.RUN)
                self.t.publish(P.update_topic(JOB, self.client),
                               authn.sign(up, keys.key(self.client)).encode())
                return


def _run(tmp_path: Path, liar_backend: str, liar_metrics: dict, **kw) -> tuple[dict, list, dict]:  # noqa: ANN003
    broker = MemoryBroker()
    lines: list[str] = []
    agg = Aggregator(MemoryTransport(broker, "aggregator"), _cfg(tmp_path, **kw),
                     log=lines.append)
    devs = [_Device(broker, "honest", "test", 1.0, {}),
            _Device(broker, "liar", liar_backend, 1000.0, liar_metrics)]
    for d in devs:
        d.start()
    try:
        final = agg.run()
    except ConfigError:
        final = {}
    return final, lines, dict(agg.counters)


def test_a_device_saying_it_is_a_site_is_refused(tmp_path: Path) -> None:
    """Before: accepted as a site, its update weighed 1e15 and the global became ~1000."""
    claim = {**site_metrics(1, 5, "uniform"), "site_weight": 1e15, "site_devices": 10**15}
    final, lines, counters = _run(tmp_path, SITE_BACKEND, claim, min_clients=1)
    assert counters.get("rejected_site_claim", 0) >= 1, (counters, lines)
    assert any("liar says it is a site, but it is not registered as one" in x for x in lines)
    assert float(final["fea_attn.0.bias"][0]) == pytest.approx(1.0)


def test_a_devices_site_weight_claim_is_refused(tmp_path: Path) -> None:
    """A device (ordinary hello) whose update carries a site weight: refused, counted."""
    final, lines, counters = _run(tmp_path, "test", {"site_weight": 1e15}, min_clients=1)
    assert counters.get("rejected_site_claim") == 1, (counters, lines)
    assert float(final["fea_attn.0.bias"][0]) == pytest.approx(1.0)


def test_a_registered_sites_weight_is_bounded_by_its_registration(tmp_path: Path) -> None:
    sites = SiteRegistry(keys.registry(["site-a"]), {"site-a": 50.0})
    broker = MemoryBroker()
    lines: list[str] = []
    cfg = AggregatorConfig(
        job=JOB, rounds=1, out=tmp_path, min_clients=1, round_timeout_s=5.0, dim=DIM,
        wait_clients_s=3.0, upload_grace_s=0.0, strategy="fedavg",
        registry=keys.registry(["honest"]), sites=sites, signing_key=keys.key(keys.AGGREGATOR),
        run=keys.RUN)
    agg = Aggregator(MemoryTransport(broker, "aggregator"), cfg, log=lines.append)
    honest = _Device(broker, "honest", "test", 1.0, {})
    big = _Device(broker, "site-a", SITE_BACKEND, 3.0, site_metrics(51, 5 * 51, "uniform"))
    for d in (honest, big):
        d.start()
    final = agg.run()
    assert agg.counters.get("rejected_site_claim") == 1, (dict(agg.counters), lines)
    assert any("site-a claims weight 51, above the 50 it is registered for" in x for x in lines)
    assert float(final["fea_attn.0.bias"][0]) == pytest.approx(1.0)


def test_a_registered_site_within_its_bound_weighs_what_it_claims(tmp_path: Path) -> None:
    sites = SiteRegistry(keys.registry(["site-a"]), {"site-a": 50.0})
    broker = MemoryBroker()
    cfg = AggregatorConfig(
        job=JOB, rounds=1, out=tmp_path, min_clients=2, round_timeout_s=5.0, dim=DIM,
        wait_clients_s=3.0, upload_grace_s=0.0, strategy="fedavg",
        registry=keys.registry(["honest"]), sites=sites, signing_key=keys.key(keys.AGGREGATOR),
        run=keys.RUN)
    agg = Aggregator(MemoryTransport(broker, "aggregator"), cfg, log=lambda s: None)
    for d in (_Device(broker, "honest", "test", 1.0, {}),
              _Device(broker, "site-a", SITE_BACKEND, 3.0, site_metrics(3, 15, "uniform"))):
        d.start()
    final = agg.run()
    # (1 x 1.0 + 3 x 3.0) / 4
    assert float(final["fea_attn.0.bias"][0]) == pytest.approx(2.5)


def test_an_id_in_both_registries_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="liar: in both --device-keys and --site-keys"):
        _cfg(tmp_path, sites=SiteRegistry(keys.registry(["liar"])))


def test_a_badly_signed_update_is_not_decoded(tmp_path: Path) -> None:
    """The validation thread checks the envelope's signature first: a forged update for the
    open round (signed by an unregistered key) never reaches `decode_update`."""
    agg = Aggregator(MemoryTransport(MemoryBroker(), "aggregator"), _cfg(tmp_path),
                     log=lambda s: None)
    calls: list[str] = []

    class _Round:  # the round engine's open round, counting its decodes
        number = 1

        def decode(self, frame: bytes, **kw: object) -> object:
            calls.append("x")
            return decode_update(frame, _state(0.0), **kw)

    agg._decode_ctx = _Round()  # type: ignore[assignment]
    frame = encode_frame(_state(5.0), job=JOB, round=1, client="honest")
    forged = authn.sign(P.Update(JOB, 1, "honest", 5, {}, frame, session="s", run=keys.RUN),
                        keys.key("foreign")).encode()
    up, pre = agg._predecode(Received(P.update_topic(JOB, "honest"), forged))
    assert isinstance(up, P.Update) and pre is None and calls == []
    good = authn.sign(P.Update(JOB, 1, "honest", 5, {}, frame, session="s", run=keys.RUN),
                      keys.key("honest")).encode()
    up, pre = agg._predecode(Received(P.update_topic(JOB, "honest"), good))
    assert pre is not None and pre[0] == 1 and calls == ["x"]
