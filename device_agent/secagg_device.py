"""The device's side of secure aggregation (`agent --secure-aggregation`): after training, the
update stays here and only a masked vector leaves (docs/privacy.md, "Secure aggregation over
MQTT").

Why a state machine apart from the agent's round work: the update goes out in four steps, each
answering a message of the aggregator (roster, deal, survivors), and the device must keep the
secrets of the attempt in between and refuse what would unmask it (revealing both shares of one
device). Fresh keys for every attempt: keys are never used in two rosters, so shares revealed
for a failed attempt say nothing about a later one.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import secagg_wire as W
from fedclip_edge.privacy.secagg import expand_mask, keypair, share_secret
from fedclip_edge.signing import KeyRegistry

MAX_KEYSETS = 4  # advertised, not yet in a roster: the latest few


@dataclass
class _Keys:
    c_sk: X25519PrivateKey
    c_pk: bytes
    s_sk: X25519PrivateKey
    s_pk: bytes


@dataclass
class _Attempt:
    attempt: str
    keys: _Keys
    pks: dict[str, tuple[bytes, bytes]]  # device -> (c, s) public keys
    order: list[str]
    t: int
    clip: float
    max_weight: float
    b: bytes
    held_s: dict[str, int] = field(default_factory=dict)  # device -> my share's y
    held_b: dict[str, int] = field(default_factory=dict)
    u2: list[str] = field(default_factory=list)
    revealed_b: set[str] = field(default_factory=set)
    revealed_s: set[str] = field(default_factory=set)


class SecAggDevice:
    """One device's secure rounds; the agent calls `trained` instead of sending its update,
    `again` on a re-published global that lacks its keys, `on_message` for every `secagg`
    envelope from the aggregator."""

    def __init__(self, job: str, client: str, *, key: Ed25519PrivateKey | None,
                 session: str, registry: KeyRegistry | None,
                 publish: Callable[[bytes], Any], log: Callable[[str], None],
                 record: Path | None = None) -> None:
        self.job, self.client, self.key, self.session = job, client, key, session
        self.record = record  # where the device keeps what it masked (None: nowhere)
        self.registry = registry
        self.publish = publish
        self.log = log
        self.round = -1
        self.run = ""  # the run of the round's global: every message of the round names it
        self.delta: np.ndarray | None = None  # w x (local - global), flat, unclipped
        self.weight = 1
        self.samples = 0
        self.metrics: dict[str, Any] = {}
        self.advertised: list[_Keys] = []
        self.current: _Attempt | None = None
        self.sent = 0  # masked vectors sent (tests read it)
        self._last = b""  # the last message sent: again after a reconnect

    # ---------------------------------------------------------------- from the agent
    def trained(self, rnd: int, glob: dict[str, torch.Tensor], local: dict[str, torch.Tensor],
                samples: int, weighting: str, metrics: dict[str, Any], run: str = "") -> None:
        """Round `rnd`'s update is ready: keep it, advertise keys."""
        self.round, self.samples, self.metrics = rnd, samples, dict(metrics)
        self.run = run
        self.weight = samples if weighting == "samples" else 1
        self.delta = W.flatten(local) - W.flatten(glob)
        self.advertised, self.current = [], None
        self._advertise()

    def again(self, g: P.GlobalModel) -> None:
        """The round's global again without this device in `have`: a new attempt needs
        fresh keys (or the aggregator restarted)."""
        if g.round == self.round and self.delta is not None and self.client not in g.have:
            self._advertise()

    def new_round(self, rnd: int) -> None:
        """A global for a later round: this round's update and secrets are no longer needed."""
        if rnd > self.round:
            self.delta, self.current, self.advertised = None, None, []

    def _advertise(self) -> None:
        c_sk, c_pk = keypair()
        s_sk, s_pk = keypair()
        self.advertised = [*self.advertised, _Keys(c_sk, c_pk, s_sk, s_pk)][-MAX_KEYSETS:]
        self._send("keys", "", {"c": W.b64(c_pk), "s": W.b64(s_pk), "w": self.weight,
                                "samples": self.samples})

    def _send(self, step: str, attempt: str, data: dict[str, Any], body: bytes = b"") -> None:
        m = W.SecAggMessage(step, self.job, self.round, self.client, attempt, data, body,
                            session=self.session, run=self.run)
        self._last = W.sign(m, self.key).encode()
        self.publish(self._last)

    def resend(self) -> None:
        """After a reconnect (the broker may have lost it): the last message again; the
        aggregator takes a repeated step as the same one."""
        if self.delta is not None and self._last:
            self.publish(self._last)

    # ---------------------------------------------------------------- from the aggregator
    def on_message(self, m: W.SecAggMessage) -> None:
        """One aggregator message (MessageRejected when it does not verify or is malformed;
        the agent counts it)."""
        W.verify(m, self.registry, key_id=P.AGGREGATOR_ID)
        if m.job != self.job or m.client != P.AGGREGATOR_ID or m.round != self.round \
                or self.delta is None:
            return  # another round's, or nothing held: not for this device now
        if m.run != self.run:  # a replay from another run of the job (signed with it)
            raise P.MessageRejected("run", f"secure-aggregation {m.step} of run {m.run!r}, "
                                    f"this round's run is {self.run!r}")
        if m.step == "roster":
            self._on_roster(m)
        elif self.current is None or m.attempt != self.current.attempt:
            return
        elif m.step == "deal":
            self._on_deal(m)
        elif m.step == "survivors":
            self._on_survivors(m)

    def _on_roster(self, m: W.SecAggMessage) -> None:
        devices = m.data.get("devices")
        if not isinstance(devices, dict) or self.client not in devices:
            return  # not in this attempt (keys too late): the next attempt or round
        mine = devices[self.client]
        keys = next((k for k in self.advertised if W.b64(k.c_pk) == mine.get("c")
                     and W.b64(k.s_pk) == mine.get("s")), None)
        if keys is None:
            return  # a roster with keys this device no longer holds (or never sent)
        order = W.ids(list(devices), "roster")
        t, clip, max_weight = m.data.get("t"), m.data.get("clip"), m.data.get("max_weight")
        if (t != W.threshold(len(order)) or len(order) < 3
                or not isinstance(clip, (int, float)) or not (clip > 0 and math.isfinite(clip))
                or not isinstance(max_weight, (int, float)) or max_weight < self.weight):
            raise P.MessageRejected("secagg", f"roster of round {m.round} refused: threshold "
                                    f"{t!r} of {len(order)}, clip {clip!r}")
        pks = {u: (W.unb64(d.get("c"), 32), W.unb64(d.get("s"), 32))
               for u, d in devices.items()}
        self.advertised.remove(keys)  # never in two rosters
        a = _Attempt(m.attempt, keys, pks, order, t, float(clip), float(max_weight),
                     secrets.token_bytes(32))
        self.current = a
        n = len(order)
        s_shares = share_secret(keys.s_sk.private_bytes_raw(), n, t)
        b_shares = share_secret(a.b, n, t)
        ctx = W.context(self.job, self.round, a.attempt)
        cts = {}
        for i, v in enumerate(order):
            if v == self.client:
                a.held_s[v], a.held_b[v] = s_shares[i][1], b_shares[i][1]
                continue
            plain = (s_shares[i][1].to_bytes(W.SHARE_BYTES, "big")
                     + b_shares[i][1].to_bytes(W.SHARE_BYTES, "big"))
            cipher = W.share_cipher(keys.c_sk, pks[v][0], ctx)
            cts[v] = W.seal(cipher, self.client, v, plain, secrets.token_bytes(12))
        self._send("shares", a.attempt, {}, W.json_bytes(cts))

    def _on_deal(self, m: W.SecAggMessage) -> None:
        a = self.current
        assert a is not None and self.delta is not None
        u2 = W.ids(m.data.get("u2"), "deal's u2")
        if a.u2 == u2:
            return  # the same deal again (re-sent after a reconnect): answered already
        if self.client not in u2 or not set(u2) <= set(a.order) or len(u2) < a.t or a.u2:
            raise P.MessageRejected("secagg", f"deal of round {m.round} refused ({len(u2)} "
                                    f"devices, threshold {a.t})")
        body = m.body_json()
        mine = body.get(self.client) if isinstance(body, dict) else None
        if not isinstance(mine, dict):
            raise P.MessageRejected("secagg", "the deal holds no shares for this device")
        ctx = W.context(self.job, self.round, a.attempt)
        for u in u2:
            if u == self.client:
                continue
            plain = W.unseal(W.share_cipher(a.keys.c_sk, a.pks[u][0], ctx), u, self.client,
                             mine.get(u))
            if len(plain) != 2 * W.SHARE_BYTES:
                raise P.MessageRejected("secagg", f"the shares from {u} are malformed")
            a.held_s[u] = int.from_bytes(plain[: W.SHARE_BYTES], "big")
            a.held_b[u] = int.from_bytes(plain[W.SHARE_BYTES:], "big")
        a.u2 = u2
        clipped = np.clip(self.delta, -a.clip, a.clip)
        n_clipped = int(np.count_nonzero(clipped != self.delta))
        if n_clipped:
            self.log(f"round {self.round}: secure aggregation clipped {n_clipped} update "
                     f"coordinate(s) to [-{a.clip:g}, {a.clip:g}] (the aggregator's "
                     "--secagg-clip)")
        fp = W.fixed_point(a.clip, a.max_weight, len(a.order))
        size = clipped.size
        y = fp.add(fp.encode(self.weight * clipped), expand_mask(a.b, size, W.BITS))
        for v in u2:
            if v == self.client:
                continue
            mask = expand_mask(W.agreed(a.keys.s_sk, a.pks[v][1], self.client, v, ctx), size,
                               W.BITS)
            y = fp.add(y, mask) if v > self.client else fp.sub(y, mask)
        metrics = {**self.metrics, "secagg_clipped": n_clipped}
        if self.record is not None:  # before it leaves: no vector sent without its record
            keep_masked_input(self.record, self.round, a.attempt, self.weight, clipped)
        self._send("masked", a.attempt, {"metrics": metrics}, W.vector_bytes(y))
        self.sent += 1
        self.log(f"round {self.round}: masked update sent (attempt {a.attempt}, {len(u2)} "
                 f"devices)")

    def _on_survivors(self, m: W.SecAggMessage) -> None:
        a = self.current
        assert a is not None
        u3 = W.ids(m.data.get("u3"), "survivors")
        dropped = set(a.u2) - set(u3)
        if self.client not in u3:  # my masked vector came too late: it is not in the sum
            self.log(f"round {m.round}: my masked update is not in this attempt's sum")
            return
        if (not set(u3) <= set(a.u2) or len(u3) < a.t
                or set(u3) & a.revealed_s or dropped & a.revealed_b):
            raise P.MessageRejected("secagg", f"survivors of round {m.round} refused: "
                                    "revealing those shares could unmask a device")
        a.revealed_b |= set(u3)
        a.revealed_s |= dropped
        self._send("reveal", a.attempt, {"b": {v: W.pack_share(a.held_b[v]) for v in u3},
                                         "s": {v: W.pack_share(a.held_s[v]) for v in dropped}})

    # ---------------------------------------------------------------- the agent's seam
    def takes(self, msg: Any) -> bool:
        """Whether `msg` is a secure-aggregation message (then handled here, now)."""
        if not W.is_secagg(msg.payload):
            return False
        try:
            self.on_message(W.decode(msg.payload))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # never a crash
            raise P.MessageRejected("secagg", f"secure-aggregation message refused: "
                                    f"{type(exc).__name__}: {exc}"[:300]) from None
        return True


def keep_masked_input(folder: Path, rnd: int, attempt: str, weight: int,
                      clipped: np.ndarray) -> None:
    """The device's own record of what it masked (`agent --secagg-record`): the clipped delta
    as `rNNNN-ATTEMPT.npy` (float64) and a line of `sent.jsonl`. It never leaves the device; an
    audit (the secure soak) checks each committed global against the records."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"r{rnd:04d}-{attempt}.npy"
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.asarray(clipped, dtype=np.float64))
    os.replace(tmp, folder / name)
    line = json.dumps({"round": rnd, "attempt": attempt, "weight": weight, "file": name,
                       "pid": os.getpid()})
    with open(folder / "sent.jsonl", "a") as f:
        f.write(line + "\n")
        f.flush()


def secagg_for(agent: Any) -> SecAggDevice | None:
    """The agent's secure-aggregation side when its config asks for it."""
    cfg = agent.cfg
    if not cfg.secure_aggregation:
        return None
    topic = P.update_topic(cfg.job, cfg.client_id)
    return SecAggDevice(cfg.job, cfg.client_id, key=cfg.key, session=cfg.session,
                        registry=cfg.aggregator_registry,
                        publish=lambda payload: agent.t.publish(topic, payload), log=agent.log,
                        record=cfg.secagg_record)
