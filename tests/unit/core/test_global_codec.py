"""The compressed global (issue 19): the device rebuilds exactly the server's global from a delta
frame, the server's residual holds what was not sent, and a wrong base is caught by the digest."""

from __future__ import annotations

import json

import pytest
import torch

from fedclip_edge.global_codec import (
    GlobalCodecPlugin,
    GlobalDelta,
    GlobalEncoder,
    GlobalMismatch,
    apply_delta,
    state_digest,
)
from fedclip_edge.rounds import InProcessFleet, RoundEngine, Update
from fedclip_edge.strategy import FedAvg

CODECS = ("fp16", "delta-fp16", "int8", "topk", "topk-int8")


def adapter(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 16, generator=g), "b": torch.randn(16, generator=g)}


def add(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], s: float = 1.0):
    return {k: a[k] + s * b[k] for k in a}


def test_digest_is_of_the_exact_bits() -> None:
    a = adapter(0)
    assert state_digest(a) == state_digest({k: v.clone() for k, v in a.items()})
    b = {k: v.clone() for k, v in a.items()}
    b["w"][3, 4] = torch.nextafter(b["w"][3, 4], torch.tensor(10.0))  # one ulp
    assert state_digest(a) != state_digest(b)


@pytest.mark.parametrize("codec", CODECS)
def test_many_rounds_device_and_server_globals_are_bit_identical(codec: str) -> None:
    enc = GlobalEncoder(codec, job="j", topk_fraction=0.05)
    server = adapter(0)
    device = {k: v.clone() for k, v in server.items()}  # round 1's global, dense
    for r in range(1, 31):
        aggregate = add(server, adapter(100 + r), 0.01)  # a round's progress
        delta, server = enc.encode(aggregate, server, round=r + 1, base_round=r)
        device = apply_delta(delta.frame, device, delta.digest)
        for k in server:
            assert torch.equal(device[k], server[k]), (codec, r, k)
        assert delta.digest == state_digest(device)


@pytest.mark.parametrize("codec", ["int8", "topk", "topk-int8"])
def test_the_residual_is_exactly_what_was_not_sent(codec: str) -> None:
    """aggregates' total change = globals' total change + residual (to float rounding)."""
    enc = GlobalEncoder(codec, job="j", topk_fraction=0.05)
    start = adapter(0)
    server = start
    total = {k: torch.zeros_like(v) for k, v in start.items()}
    for r in range(1, 11):
        step = {k: 0.01 * v for k, v in adapter(200 + r).items()}
        aggregate = add(server, step)
        total = add(total, step)
        _, server = enc.encode(aggregate, server, round=r + 1, base_round=r)
        residual = enc.feedback.residual
        for k in start:
            sent = server[k] - start[k]
            assert torch.allclose(sent + residual[k], total[k], atol=1e-5), (codec, r, k)
    # top-k sends 5% a round: the residual holds most of the rest, and is not zero
    assert enc.residual_norm() > 0


def test_topk_sends_few_bytes_and_the_residual_catches_up() -> None:
    """A one-off change is sent over the next rounds, not dropped: with no new progress the
    residual empties into the globals."""
    enc = GlobalEncoder("topk-int8", job="j", topk_fraction=0.25)
    base = adapter(0)
    target = add(base, adapter(1), 0.01)
    delta, server = enc.encode(target, base, round=2, base_round=1)
    assert len(delta.frame) < 4 * (16 * 16 + 16)  # below the fp32 values alone, header included
    first_gap = max(float((target[k] - server[k]).abs().max()) for k in target)
    for r in range(2, 30):
        _, server = enc.encode(server, server, round=r + 1, base_round=r)  # no new progress...
        # ...but feedback of the residual keeps moving the global toward the target
    gap = max(float((target[k] - server[k]).abs().max()) for k in target)
    assert gap < first_gap / 10


def test_a_wrong_base_fails_the_digest() -> None:
    enc = GlobalEncoder("int8", job="j")
    base = adapter(0)
    delta, _ = enc.encode(add(base, adapter(1), 0.01), base, round=2, base_round=1)
    stale = add(base, adapter(2), 0.001)  # a device that missed a round
    with pytest.raises(GlobalMismatch, match="differs from the server"):
        apply_delta(delta.frame, stale, delta.digest)
    with pytest.raises(GlobalMismatch, match="unusable"):
        apply_delta(delta.frame[:-1] + bytes([delta.frame[-1] ^ 1]), base, delta.digest)


def test_state_round_trips_through_json() -> None:
    enc = GlobalEncoder("topk", job="j", topk_fraction=0.1)
    base = adapter(0)
    enc.encode(add(base, adapter(1), 0.1), base, round=2, base_round=1)
    plugin = GlobalCodecPlugin(enc)
    saved = json.loads(json.dumps(plugin.state_dict()))
    again = GlobalCodecPlugin(GlobalEncoder("topk", job="j", topk_fraction=0.1))
    again.load_state_dict(saved)
    for k, v in enc.feedback.residual.items():
        assert torch.equal(again.encoder.feedback.residual[k], v)
    with pytest.raises(ValueError, match="same codec"):
        GlobalCodecPlugin(GlobalEncoder("int8", job="j")).load_state_dict(saved)
    d = GlobalDelta("int8", 3, 2, b"\x00\x01", "ab")
    assert GlobalDelta.from_dict(json.loads(json.dumps(d.to_dict()))) == d


def test_the_engine_commits_the_global_devices_rebuild() -> None:
    """Through the round engine: each round's global is base + decoded delta, never the raw
    aggregate, and a device following the frames holds it bit for bit."""
    plugin = GlobalCodecPlugin(GlobalEncoder("topk-int8", job="j", topk_fraction=0.1))
    engine = RoundEngine(FedAvg(), plugins=[plugin])
    server = adapter(0)
    device = {k: v.clone() for k, v in server.items()}
    for r in range(1, 6):
        fleet = InProcessFleet(
            ["a", "b"],
            lambda rnd, i, c: Update(
                c, add(rnd.global_state, adapter(10 * rnd.number + i), 0.05), 1
            ),
        )
        rnd = engine.open(r, server)
        fleet.collect(rnd)
        result = engine.close(rnd)
        delta = rnd.extras["global_delta"]
        assert (delta.round, delta.base_round) == (r + 1, r)
        device = apply_delta(delta.frame, device, delta.digest)
        raw = rnd.accumulator.result()
        assert any(not torch.equal(raw[k], result.state[k]) for k in raw)
        server = result.state
        assert state_digest(device) == state_digest(server)


def test_fp32_is_a_no_op() -> None:
    plugin = GlobalCodecPlugin(GlobalEncoder("fp32", job="j"))
    engine = RoundEngine(FedAvg(), plugins=[plugin])
    g = adapter(0)
    rnd = engine.open(1, g)
    rnd.add(Update("a", adapter(1), 1))
    result = engine.close(rnd)
    assert "global_delta" not in rnd.extras
    assert all(torch.equal(result.state[k], adapter(1)[k]) for k in g)
