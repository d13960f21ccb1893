"""Round 1's global derived on the devices (issue 19 item 2), real agents on the in-memory
broker: with --global-codec the aggregator sends round 1 as a signed envelope with no frame
when its initial global is the seed's and every client says it can derive it; a device whose
derivation differs asks for (and gets) a dense copy; clients that cannot derive, and a resumed
aggregator, get round 1 dense as before; a site derives it too and forwards it.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from support.fleet import start_agents
from test_global_downlink import finish, make_agg, published, record, server_globals, summaries
from test_site_global_codec import ROUNDS, central, devices, in_thread, site

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.global_down import GlobalDownlink
from fedclip_edge.broker.transport import MemoryBroker
from fedclip_edge.device_agent import outbox
from fedclip_edge.global_codec import derive_initial, state_digest


def test_derive_initial_is_the_seeded_adapter_whatever_other_threads_draw() -> None:
    """Agents in one process derive round 1 at once while others train: the derivation uses a
    private generator, so it is the seeded construction bit for bit and the global RNG is not
    touched (it raced before: a device's derived global failed the digest now and then)."""
    for seed, dim in ((0, 1), (3, 8), (7, 33), (123456, 512)):
        torch.manual_seed(seed)
        want = state_digest(AttentionAdapter(dim).state_dict())
        assert state_digest(derive_initial(seed, dim)) == want
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.manual_seed(99)
            torch.rand(64)

    busy = [threading.Thread(target=draw, daemon=True) for _ in range(2)]
    for th in busy:
        th.start()
    try:
        torch.manual_seed(3)
        want = state_digest(derive_initial(3, 8))
        assert all(state_digest(derive_initial(3, 8)) == want for _ in range(200))
    finally:
        stop.set()
        for th in busy:
            th.join(5)


def test_only_the_seeds_global_of_a_fresh_job_goes_derived() -> None:
    seeds = derive_initial(3, 8)
    down = GlobalDownlink("int8", job="j", rounds=4)
    down.set_initial(seeds, seed=3, dim=8, resumed=False)
    assert down.derived is not None and down.derived.frame == b""
    assert down.delta_for(1, derive=True) is down.derived
    assert down.delta_for(1, derive=False) is None  # a client that cannot: dense
    assert down.delta_for(1, derive=True, dense=True) is None  # a dense copy asked
    for state, seed, resumed in ((seeds, 4, False), (derive_initial(4, 8), 3, False),
                                 (seeds, 3, True)):
        other = GlobalDownlink("int8", job="j", rounds=4)
        other.set_initial(state, seed=seed, dim=8, resumed=resumed)
        assert other.derived is None and other.delta_for(1, derive=True) is None
    fp32 = GlobalDownlink("fp32", job="j", rounds=4)
    fp32.set_initial(seeds, seed=3, dim=8, resumed=False)
    assert fp32.delta_for(1, derive=True) is None


def test_a_device_whose_derivation_differs_gets_a_dense_copy(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"])
    odd = agents[0][0].globals_in
    rebuild = odd.rebuild

    def other_torch(g: P.GlobalModel):  # dev-a's torch initializes otherwise
        if g.delta.get("codec") == "derived":
            g = dataclasses.replace(g, seed=g.seed + 1)
        return rebuild(g)

    odd.rebuild = other_torch  # type: ignore[method-assign]
    seen = [record(a) for a, _ in agents]
    agg = make_agg(broker, tmp_path)
    pubs = published(agg)
    final = agg.run()
    finish(agents)
    want = server_globals(tmp_path, 4)
    assert odd.dense_asked == 1
    assert seen[0][1] == (want[1], "dense") and seen[0][2] == (want[2], "delta")
    for (a, _), s in zip(agents[1:], seen[1:], strict=True):
        assert a.globals_in.dense_asked == 0 and s[1] == (want[1], "derived")
    for a, _ in agents:
        assert a.rounds_trained == 4 and state_digest(a.final_state) == state_digest(final)
    first = [g for r, _, g in pubs if r == 1]
    assert [bool(g.frame) for g in first] == [False, True]  # derived, then the dense answer
    row = summaries(tmp_path)[1]
    assert row["globals_derived"] == 1 and row["globals_dense"] == 1
    assert row["bytes_down_per_client"] == sum(n for r, n, _ in pubs if r == 1)


def test_devices_that_cannot_derive_get_round_1_dense(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "CAPABILITY", {})  # devices from before: their hello says nothing
    broker = MemoryBroker()
    agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"])
    seen = [record(a) for a, _ in agents]
    agg = make_agg(broker, tmp_path, rounds=2)
    agg.run()
    finish(agents)
    want = server_globals(tmp_path, 2)
    for (a, _), s in zip(agents, seen, strict=True):
        assert s == {1: (want[1], "dense"), 2: (want[2], "delta"), 3: (want[3], "dense")}
        assert a.globals_in.dense_asked == 0
    row = summaries(tmp_path)[1]
    assert row["globals_derived"] == 0 and row["globals_dense"] == 1


def test_a_resumed_aggregator_does_not_claim_derived(tmp_path: Path) -> None:
    broker = MemoryBroker()
    agents = start_agents(broker, ["dev-a", "dev-b", "dev-c"])
    agg = make_agg(broker, tmp_path)
    real = agg._commit

    def crash(rnd: int, *args: Any, **kw: Any) -> Any:
        if rnd == 2:
            raise RuntimeError("simulated crash")
        return real(rnd, *args, **kw)

    agg._commit = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="simulated crash"):
        agg.run()
    assert agg.downlink.derived is not None  # the fresh job derived round 1
    agg.t.close()
    again = make_agg(broker, tmp_path, resume=True)
    pubs = published(again)
    final = again.run()
    finish(agents)
    assert again.completed == 4 and again.downlink.derived is None
    assert pubs and all(g.delta.get("codec") != "derived" for _, _, g in pubs)
    assert all(state_digest(a.final_state) == state_digest(final) for a, _ in agents)


@pytest.mark.parametrize("site_devices_derive", [True, False])
def test_a_site_derives_round_1_and_forwards_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, site_devices_derive: bool
) -> None:
    """The site says it can derive (the central sends round 1 derived); it derives it, checks the
    digest and forwards it derived when its devices can, dense when they cannot."""
    if not site_devices_derive:
        monkeypatch.setattr(outbox, "CAPABILITY", {})
    up, local = MemoryBroker(), MemoryBroker()
    agents = devices(local)
    seen = [record(a) for a, _ in agents]
    s = site(up, local, tmp_path / "site")
    th, errors = in_thread(s.run)
    agg = central(up, tmp_path / "central", "int8")
    pubs = published(agg)
    final = agg.run()
    th.join(30)
    finish(agents)
    assert not errors, errors
    want = server_globals(tmp_path / "central", ROUNDS)
    kind = "derived" if site_devices_derive else "dense"
    for (a, _), got in zip(agents, seen, strict=True):
        assert {r: d for r, (d, _) in got.items()} == want, a.cfg.client_id
        assert got[1] == (want[1], kind) and got[2][1] == "delta"
        assert a.globals_in.dense_asked == 0
        assert state_digest(a.final_state) == state_digest(final)
    assert [g.frame for r, _, g in pubs if r == 1] == [b""]  # the central: derived, once
    assert s.up_counters["dense_asked"] == 0
    rows, crows = summaries(tmp_path / "site"), summaries(tmp_path / "central")
    assert crows[1]["globals_derived"] == 1 and crows[1]["globals_dense"] == 0
    assert rows[1]["bytes_from_central"] == crows[1]["bytes_down_per_client"]
    assert rows[1]["globals_derived"] == int(site_devices_derive)
    assert rows[1]["globals_dense"] == int(not site_devices_derive)


def test_a_derived_envelope_is_signed_and_has_no_frame() -> None:
    from support import keys
    from support.fleet import JOB

    from fedclip_edge.broker import authn
    from fedclip_edge.signing import KeyRegistry

    fields = {"codec": "derived", "base_round": 0, "digest": "ab" * 32}
    g = authn.sign(P.GlobalModel(JOB, 1, b"", seed=3, rounds=4, delta=fields),
                   keys.key(keys.AGGREGATOR))
    back = P.decode_message(g.encode())
    assert back.frame == b"" and back.delta == fields and back.seed == 3
    reg = KeyRegistry({P.AGGREGATOR_ID: keys.aggregator_public()})
    assert authn.verify(back, reg, key_id=P.AGGREGATOR_ID) == P.AGGREGATOR_ID
    for forged in (dataclasses.replace(back, seed=4),
                   dataclasses.replace(back, delta={**fields, "digest": "cd" * 32})):
        with pytest.raises(P.MessageRejected):
            authn.verify(P.decode_message(forged.encode()), reg, key_id=P.AGGREGATOR_ID)
    for frame, delta in ((b"frame", fields), (b"", {}), (b"", {**fields, "codec": "int8"}),
                         (b"", {**fields, "base_round": 1})):
        with pytest.raises(P.MessageRejected):
            P.decode_message(P.GlobalModel(JOB, 1, frame, delta=delta).encode())
