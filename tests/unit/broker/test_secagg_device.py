"""Secure aggregation's messages and the device's refusals, driven by hand (no broker): a
signature covers every field; shares decrypt only for their recipient; a device never reveals
both shares of one device (which would unmask it), nor answers a roster with another threshold."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from support import keys

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import secagg_wire as W
from fedclip_edge.device_agent.secagg_device import SecAggDevice
from fedclip_edge.privacy.secagg import keypair

IDS = ["a", "b", "c"]


def test_a_signature_covers_step_data_and_body() -> None:
    key = keys.key("dev-a")
    reg = keys.registry(["dev-a"])
    m = W.sign(W.SecAggMessage("masked", "j", 2, "dev-a", "x1", {"metrics": {}}, b"\x01" * 8,
                               session="s"), key)
    W.verify(W.decode(m.encode()), reg)
    for bad in (replace(m, body=b"\x02" * 8), replace(m, step="reveal"),
                replace(m, attempt="x2"), replace(m, data={"metrics": {"loss": 1}}),
                replace(m, round=3)):
        with pytest.raises(P.MessageRejected) as e:
            W.verify(W.decode(bad.encode()), reg)
        assert e.value.reason == "bad_signature"
    with pytest.raises(P.MessageRejected) as e:
        W.verify(replace(m, sig=""), reg)
    assert e.value.reason == "unsigned"


def test_shares_decrypt_for_their_recipient_only() -> None:
    (a_sk, a_pk), (b_sk, b_pk), (c_sk, _) = keypair(), keypair(), keypair()
    ctx = W.context("j", 1, "x")
    ct = W.seal(W.share_cipher(a_sk, b_pk, ctx), "a", "b", b"secret", b"\x00" * 12)
    assert W.unseal(W.share_cipher(b_sk, a_pk, ctx), "a", "b", ct) == b"secret"
    for cipher, sender, to in ((W.share_cipher(c_sk, a_pk, ctx), "a", "b"),  # c's key
                               (W.share_cipher(b_sk, a_pk, W.context("j", 2, "x")), "a", "b"),
                               (W.share_cipher(b_sk, a_pk, ctx), "a", "c")):  # relabelled
        with pytest.raises(P.MessageRejected):
            W.unseal(cipher, sender, to, ct)


class Fleet:
    """Three devices (unsigned) and the aggregator's messages, built by hand."""

    def __init__(self) -> None:
        self.out: dict[str, list[W.SecAggMessage]] = {c: [] for c in IDS}
        self.dev = {c: SecAggDevice("j", c, key=None, session="", registry=None,
                                    publish=lambda p, c=c: self.out[c].append(W.decode(p)),
                                    log=lambda line: None) for c in IDS}
        glob = {"w": torch.zeros(4)}
        for i, c in enumerate(IDS):
            self.dev[c].trained(1, glob, {"w": torch.full((4,), 0.1 * (i + 1))}, 10, "uniform",
                                {})

    def last(self, c: str, step: str) -> W.SecAggMessage:
        return next(m for m in reversed(self.out[c]) if m.step == step)

    def send(self, step: str, data: dict[str, Any], body: bytes = b"") -> None:
        m = W.SecAggMessage(step, "j", 1, P.AGGREGATOR_ID, "x1", data, body)
        for d in self.dev.values():
            d.on_message(W.decode(m.encode()))

    def roster(self, t: int | None = None) -> None:
        devices = {c: {k: self.last(c, "keys").data[k] for k in ("c", "s", "w")} for c in IDS}
        self.send("roster", {"devices": devices, "t": W.threshold(3) if t is None else t,
                             "clip": 1.0, "max_weight": 1})

    def deal(self) -> None:
        shares = {c: self.last(c, "shares").body_json() for c in IDS}
        deal = {v: {u: shares[u][v] for u in IDS if u != v} for v in IDS}
        self.send("deal", {"u2": IDS}, W.json_bytes(deal))


def test_the_protocol_by_hand_and_the_never_both_rule() -> None:
    f = Fleet()
    f.roster()
    f.deal()
    masked = {c: W.vector_of(f.last(c, "masked").body, 4) for c in IDS}
    f.send("survivors", {"u3": IDS})
    reveals = {c: f.last(c, "reveal").data for c in IDS}
    assert all(set(r["b"]) == set(IDS) and r["s"] == {} for r in reveals.values())
    # the sum, unmasked by hand from two devices' shares of the self-masks
    from fedclip_edge.privacy.secagg import expand_mask, reconstruct_secret
    fp = W.fixed_point(1.0, 1, 3)
    total = np.zeros(4, dtype=np.uint64)
    for y in masked.values():
        total = fp.add(total, y)
    for v in IDS:
        b = reconstruct_secret([(i + 1, W.unpack_share(reveals[w]["b"][v]))
                                for i, w in enumerate(IDS) if w != "c"])
        total = fp.sub(total, expand_mask(b, 4, W.BITS))
    assert np.allclose(fp.decode(total), [0.6] * 4, atol=1e-12)
    # now asked to treat c as dropped: its mask key's shares would unmask c's input, whose
    # self-mask shares were just revealed: refused
    with pytest.raises(P.MessageRejected, match="could unmask"):
        f.send("survivors", {"u3": ["a", "b"]})


def test_a_roster_with_another_threshold_is_refused() -> None:
    f = Fleet()
    with pytest.raises(P.MessageRejected, match="threshold 1 of 3"):
        f.roster(t=1)  # one share would then reconstruct every secret
    assert all(not [m for m in f.out[c] if m.step == "shares"] for c in IDS)


def test_aggregator_messages_must_be_signed_by_the_aggregator() -> None:
    out: list[bytes] = []
    dev = SecAggDevice("j", "a", key=None, session="", registry=keys.registry([keys.AGGREGATOR]),
                       publish=out.append, log=lambda line: None)
    dev.trained(1, {"w": torch.zeros(2)}, {"w": torch.ones(2)}, 5, "uniform", {})
    forged = W.sign(W.SecAggMessage("roster", "j", 1, P.AGGREGATOR_ID, "x", {}),
                    keys.key("dev-b"))
    with pytest.raises(P.MessageRejected):
        dev.on_message(W.decode(forged.encode()))
    assert len(out) == 1  # its keys only


RUN_1, RUN_2 = "00000000aa-0123456789abcdef", "00000000bb-0123456789abcdef"


def test_a_signature_binds_the_run() -> None:
    """A secure-aggregation message of one run of a job verifies for no other run."""
    reg = keys.registry(["dev-a"])
    m = W.sign(W.SecAggMessage("keys", "j", 1, "dev-a", "", {"w": 1}, run=RUN_1),
               keys.key("dev-a"))
    W.verify(W.decode(m.encode()), reg)
    assert W.decode(m.encode()).run == RUN_1
    with pytest.raises(P.MessageRejected) as e:
        W.verify(W.decode(replace(m, run=RUN_2).encode()), reg)
    assert e.value.reason == "bad_signature"


def test_a_device_refuses_another_runs_roster() -> None:
    """The device signs its round's messages for the run of the global it trained on, and a
    roster replayed from another run of the job is refused (`run`), answered with nothing."""
    out: list[bytes] = []
    dev = SecAggDevice("j", "a", key=None, session="", registry=None, publish=out.append,
                       log=lambda line: None)
    dev.trained(1, {"w": torch.zeros(2)}, {"w": torch.ones(2)}, 5, "uniform", {}, run=RUN_2)
    assert W.decode(out[0]).run == RUN_2
    keys_ = W.decode(out[0]).data
    devices = {c: {k: keys_[k] for k in ("c", "s", "w")} for c in ("a", "b", "c")}
    roster = W.SecAggMessage("roster", "j", 1, P.AGGREGATOR_ID, "x1",
                             {"devices": devices, "t": 2, "clip": 1.0, "max_weight": 1},
                             run=RUN_1)
    with pytest.raises(P.MessageRejected) as e:
        dev.on_message(W.decode(roster.encode()))
    assert e.value.reason == "run"
    assert len(out) == 1  # its keys only
