"""A site aggregator running secure aggregation over its own devices, under a central one,
through the in-memory broker: the central's global equals the plain hierarchy's (the same
devices, the same central) within the fixed-point error, and the site never sees one of its
devices' updates in plain form (only secure-aggregation steps reach its intake from them).
A central over sites refuses --secure-aggregation itself, in one line."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from support import keys
from support.fleet import JOB, TRAIN, start_agents

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import secagg_wire as W
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.hierarchy import SiteRegistry
from fedclip_edge.broker.prevalidate import PrevalidateMixin
from fedclip_edge.broker.site import SiteAggregator
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport, Received
from fedclip_edge.errors import ConfigError
from fedclip_edge.signing import KeyRegistry

CENTRAL = "central"
SITES = {"site-s": ["dev-a", "dev-b", "dev-c"], "site-p": ["dev-d", "dev-e"]}


class PrevalidatingMemory(PrevalidateMixin, MemoryTransport):
    """The in-memory transport with the validation worker thread (as `aggregate` runs)."""


def site_registry() -> SiteRegistry:
    # each site signs with its own key: upstream, and its globals to its devices
    return SiteRegistry(KeyRegistry({s: keys.key(s).public_key() for s in SITES}),
                        {s: 1000.0 for s in SITES})


class SignedHierarchy:
    """A signed central over two signed sites of real agents (tests/support/fleet.py);
    `secure`: the sites whose aggregator and devices run secure aggregation."""

    def __init__(self, tmp: Path, secure: set[str], rounds: int = 2) -> None:
        self.central_broker = MemoryBroker()
        self.lines: list[str] = []  # what the aggregators logged (shown when a run fails)
        self.central = Aggregator(
            MemoryTransport(self.central_broker, "aggregator"),
            AggregatorConfig(job=JOB, rounds=rounds, out=tmp / CENTRAL, min_clients=len(SITES),
                             dim=8, wait_clients_s=10.0, round_timeout_s=20.0,
                             upload_grace_s=0.0, train=TRAIN, seed=3, weighting="samples",
                             registry=keys.registry([]), signing_key=keys.key(CENTRAL),
                             sites=site_registry()),
            log=lambda line: self.lines.append(f"central: {line}"),
        )
        self.sites: list[SiteAggregator] = []
        self.agent_threads: list[threading.Thread] = []
        self.intake: dict[str, list[bytes]] = {}  # site -> payloads on its update topics
        self.errors: list[BaseException] = []
        for name, clients in SITES.items():
            b, on = MemoryBroker(), name in secure
            self.agent_threads += [th for _, th in start_agents(
                b, clients, secure_aggregation=on, aggregator_key=keys.key(name).public_key())]
            site = SiteAggregator(
                PrevalidatingMemory(b, "aggregator"),
                MemoryTransport(self.central_broker, name,
                                will=(P.status_topic(JOB, name), P.offline_status(name), True)),
                AggregatorConfig(job=JOB, rounds=1, out=tmp / name, min_clients=len(clients),
                                 dim=8, wait_clients_s=10.0, round_timeout_s=20.0,
                                 upload_grace_s=0.0, registry=keys.registry(clients),
                                 signing_key=keys.key(name), secure_aggregation=on),
                site=name, upstream_key=keys.key(CENTRAL).public_key(),
                log=lambda line, n=name: self.lines.append(f"{n}: {line}"),
            )
            self.intake[name] = seen = []
            inner = site._handle

            def handle(msg: Received, inner: Any = inner, seen: list[bytes] = seen) -> None:
                if msg.topic.startswith(f"fedclip/{JOB}/update/"):
                    seen.append(msg.payload)
                inner(msg)

            site._handle = handle  # type: ignore[method-assign]
            self.sites.append(site)

    def run(self) -> dict[str, torch.Tensor]:
        threads = [threading.Thread(target=self._site, args=(s,), daemon=True)
                   for s in self.sites]
        for th in threads:
            th.start()
        try:
            final = self.central.run()
        finally:
            for th in threads + self.agent_threads:
                th.join(30)
        assert not self.errors, (self.errors, self.lines)
        return final

    def _site(self, site: SiteAggregator) -> None:
        try:
            site.run()
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self.errors.append(exc)


def test_a_secure_site_gives_the_plain_hierarchys_global(tmp_path: Path) -> None:
    plain = SignedHierarchy(tmp_path / "plain", set()).run()
    h = SignedHierarchy(tmp_path / "secure", {"site-s"})
    secure = h.run()
    # 62-bit fixed point: the site's sum is exact to ~1e-15; float32 rounding of the two paths
    # differs by a few ulps, which a second round of training carries on (as in flat jobs)
    worst = max(float((secure[k] - plain[k]).abs().max()) for k in plain)
    assert worst <= 1e-5, worst
    torch.manual_seed(3)  # the central's seed: its round-1 global
    initial = AttentionAdapter(8).state_dict()
    assert max(float((plain[k] - initial[k]).abs().max()) for k in plain) > 1e-3  # trained
    site_s, site_p = h.sites
    assert site_s.central_rounds == site_p.central_rounds == [1, 2]
    assert [r["clients"] for r in h.central.history] == [sorted(SITES)] * 2
    # the secure site's intake: its devices' secure-aggregation steps, never a plain update
    assert h.intake["site-s"] and all(W.is_secagg(p) for p in h.intake["site-s"])
    steps = {W.decode(p).step for p in h.intake["site-s"]}
    assert steps == {"keys", "shares", "masked", "reveal"}
    assert site_s.counters["accepted"] == 6 and not any(
        k.startswith("rejected") and v for k, v in site_s.counters.items())
    assert [r["clients"] for r in site_s.history] == [SITES["site-s"]] * 2
    # the plain site took plain updates (the check above can fail)
    assert h.intake["site-p"] and not any(W.is_secagg(p) for p in h.intake["site-p"])
    # upstream, the secure site is weighed as the plain one: its devices' samples
    def site_rows(run: str) -> list[dict[str, Any]]:
        rows = (tmp_path / run / CENTRAL / "metrics.jsonl").read_text().splitlines()
        return [{k: r.get(k) for k in ("round", "samples", "site_devices", "site_weight")}
                for r in map(json.loads, rows)
                if r.get("kind") == "client" and r["client"] == "site-s"]

    assert site_rows("secure") == site_rows("plain")
    assert site_rows("secure")[-1] == {"round": 2, "samples": 54, "site_devices": 3,
                                       "site_weight": 54.0}  # 18 training samples each
    assert any("site-s: round 2/2 sent upstream: the secure sum of 3 update(s), 54 samples"
               in line for line in h.lines)


def test_a_central_over_sites_refuses_secure_aggregation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        AggregatorConfig(job=JOB, rounds=1, out=tmp_path, min_clients=3,
                         registry=keys.registry([]), signing_key=keys.key(CENTRAL),
                         sites=site_registry(), secure_aggregation=True)
    assert "\n" not in str(e.value) and "--site-keys" in str(e.value)
