"""A compressed central global through a site (issue 19 item 5), signed, in memory: a central
with --global-codec, one site aggregator, 3 real agents behind it. The site rebuilds the
central's delta global, checks its digest and forwards the same frame (re-signed) to its
devices; every device holds the central's global bit for bit; a device that missed a round gets
a dense copy from the site; a resumed site keeps its base.
"""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from support import keys
from support.fleet import JOB, TRAIN, start_agents
from test_global_downlink import finish, record, server_globals, summaries

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig, AggregatorHooks
from fedclip_edge.broker.hierarchy import SiteRegistry
from fedclip_edge.broker.site import SiteAggregator
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.errors import ConfigError
from fedclip_edge.global_codec import state_digest

SITE = "site-1"
DEVICES = ["dev-a", "dev-b", "dev-c"]
ROUNDS = 4


def central(broker: MemoryBroker, out: Path, codec: str) -> Aggregator:
    cfg = AggregatorConfig(
        job=JOB, rounds=ROUNDS, out=out, min_clients=1, round_timeout_s=20.0, dim=8,
        wait_clients_s=10.0, upload_grace_s=0.0, train=TRAIN, seed=3,
        registry=keys.registry(()), sites=SiteRegistry(keys.registry((SITE,)), {}),
        signing_key=keys.key(keys.AGGREGATOR), global_codec=codec,
    )
    return Aggregator(MemoryTransport(broker, "aggregator"), cfg, log=lambda s: None)


def site(up: MemoryBroker, local: MemoryBroker, out: Path, hooks: AggregatorHooks | None = None,
         resume: bool = False) -> SiteAggregator:
    cfg = AggregatorConfig(
        job=JOB, rounds=1, out=out, min_clients=3, round_timeout_s=10.0, dim=8,
        wait_clients_s=10.0, upload_grace_s=0.0, registry=keys.registry(DEVICES),
        signing_key=keys.key(SITE), resume=resume,
    )
    session = uuid.uuid4().hex[:12]
    will = (P.status_topic(JOB, SITE), authn.signed_will(SITE, JOB, session, keys.key(SITE)),
            True)
    lines: list[str] = []
    s = SiteAggregator(MemoryTransport(local, "aggregator"), MemoryTransport(up, SITE, will=will),
                       cfg, site=SITE, log=lines.append, hooks=hooks,
                       upstream_key=keys.aggregator_public(), session=session)
    s.lines = lines  # type: ignore[attr-defined]
    return s


def in_thread(fn: Any) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def go() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            errors.append(exc)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    return th, errors


def devices(local: MemoryBroker) -> list:
    return start_agents(local, DEVICES, aggregator_key=keys.key(SITE).public_key())


@pytest.mark.parametrize("codec", ["topk-int8", "int8"])
def test_a_site_forwards_the_centrals_delta_and_devices_hold_its_global(
    tmp_path: Path, codec: str
) -> None:
    up, local = MemoryBroker(), MemoryBroker()
    agents = devices(local)
    seen = [record(a) for a, _ in agents]
    kept: dict[int, tuple[int, dict]] = {}

    class MissRound(AggregatorHooks):
        def after_commit(self, agg, rnd, commit_s, reports_s) -> None:
            gi = agents[2][0].globals_in
            kept[rnd] = (gi.round, dict(gi.state))
            if rnd == 2:  # dev-c "missed" round 2's global: it holds round 1's again
                gi.round, gi.state = kept[1]

    s = site(up, local, tmp_path / "site", hooks=MissRound())
    th, errors = in_thread(s.run)
    final = central(up, tmp_path / "central", codec).run()
    th.join(30)
    finish(agents)
    assert not errors, errors
    want = server_globals(tmp_path / "central", ROUNDS)
    for (a, _), got in zip(agents, seen, strict=True):
        assert {r: d for r, (d, _) in got.items()} == want, a.cfg.client_id
        assert state_digest(a.final_state) == state_digest(final) == want[ROUNDS + 1]
        assert a.rounds_trained == ROUNDS
    # the site forwarded deltas after round 1; dev-c asked for (and got) a dense round 3
    for (a, _), got in zip(agents[:2], seen[:2], strict=True):
        # (round 3's dense copy for dev-c reached them too: it may be the last they recorded)
        assert [got[r][1] for r in (1, 2, 4, 5)] == ["derived", "delta", "delta", "dense"]
        assert a.globals_in.dense_asked == 0
    assert agents[2][0].globals_in.dense_asked == 1 and seen[2][3] == (want[3], "dense")
    rows = summaries(tmp_path / "site")
    assert [rows[r]["globals_delta"] for r in range(2, ROUNDS + 1)] == [1, 1, 1]
    assert [rows[r]["globals_dense"] for r in range(2, ROUNDS + 1)] == [0, 1, 0]
    crows = summaries(tmp_path / "central")
    for r in range(2, ROUNDS + 1):  # both hops counted: the site heard what the central sent
        assert 0 < rows[r]["bytes_from_central"] == crows[r]["bytes_down_per_client"]
        assert rows[r]["global_codec"] == codec
    assert s.up_counters["dense_asked"] == 0
    # docs/hierarchy.md quotes these (round 1: derived, no frame on either hop)
    print(json.dumps({r: [crows[r]["bytes_down_per_client"],
                          rows[r]["bytes_down_per_client"] if r in rows else None]
                      for r in range(1, ROUNDS + 1)}))


def test_a_resumed_site_keeps_its_base_and_its_devices_the_centrals_global(
    tmp_path: Path
) -> None:
    """The site crashes before committing round 3; resumed, it holds round 3's central global
    (its run folder) and carries on; every device ends with the central's final adapter."""
    up, local = MemoryBroker(), MemoryBroker()
    agents = devices(local)
    seen = [record(a) for a, _ in agents]
    first = site(up, local, tmp_path / "site")
    real = first._commit

    def crash(rnd: int, *args: Any, **kw: Any) -> None:
        if rnd == 3:
            raise RuntimeError("simulated crash")
        real(rnd, *args, **kw)

    first._commit = crash  # type: ignore[method-assign]
    th, errors = in_thread(first.run)
    agg = central(up, tmp_path / "central", "topk-int8")
    cth, cerr = in_thread(agg.run)
    th.join(60)
    assert errors and "simulated crash" in str(errors[0])
    first.t.close()
    first.up.close()
    second = site(up, local, tmp_path / "site", resume=True)
    th2, errors2 = in_thread(second.run)
    cth.join(60)
    th2.join(30)
    finish(agents)
    assert not cerr and not errors2, (cerr, errors2)
    assert second.completed == ROUNDS and second.up_counters["dense_asked"] == 0
    assert second.downlink.held_round == ROUNDS
    want = server_globals(tmp_path / "central", ROUNDS)
    for (a, _), got in zip(agents, seen, strict=True):
        assert all(want[r] == d for r, (d, _) in got.items()), a.cfg.client_id
        assert state_digest(a.final_state) == want[ROUNDS + 1]
    assert seen[0][4][1] == "delta"  # round 4 went down as the central's delta again


def test_a_site_refuses_a_global_codec_of_its_own_and_a_central_takes_sites(
    tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="forwards the central's global codec"):
        SiteAggregator(
            MemoryTransport(MemoryBroker(), "aggregator"), MemoryTransport(MemoryBroker(), SITE),
            AggregatorConfig(job=JOB, rounds=1, out=tmp_path / "s", insecure_unsigned=True,
                             global_codec="int8"), site=SITE)
    # a central with sites may compress its global (it was refused before sites forwarded it)
    AggregatorConfig(job=JOB, rounds=2, out=tmp_path / "c", registry=keys.registry(()),
                     signing_key=keys.key(keys.AGGREGATOR), global_codec="int8",
                     sites=SiteRegistry(keys.registry((SITE,)), {}))
