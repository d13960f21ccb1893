"""The aggregator's side of secure aggregation (`aggregate --secure-aggregation`): the round
engine's collect for a round whose updates the aggregator must not see one by one.

Why a separate collect: without secure aggregation each update is decoded and handed to the
strategy as it arrives (`ingest.py`); here nothing decodable arrives until the round's sum is
unmasked, so the round is a sequence of phases (keys, roster, shares, deal, masked, survivors,
reveal; docs/privacy.md "Secure aggregation over MQTT") and the strategy's accumulator gets one
input at the end: the unmasked FedAvg state. Masked state is never saved: a retried or resumed
round starts a new attempt with fresh keys.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import secagg_wire as W
from fedclip_edge.broker.ingest import MAX_SAMPLES, device_metrics
from fedclip_edge.broker.runbind import check_run
from fedclip_edge.broker.transport import Received
from fedclip_edge.errors import ConfigError
from fedclip_edge.privacy.secagg import expand_mask, reconstruct_secret
from fedclip_edge.rounds import OpenRound

flatten, unflatten = W.flatten, W.unflatten

DEFAULT_CLIP = 1.0
MIN_DEVICES = 3  # the sum of two updates tells each of them the other's
UNSUMMABLE = {
    "median": "a coordinate-wise median needs every update",
    "trimmed-mean": "a trimmed mean ranks every update's coordinates",
    "clip": "clip scales each update by its own norm",
    "fedavg-clip": "fedavg-clip scales each update by its own norm",
}


def check_config(strategy: str, min_clients: int, clip: float, sites: bool = False) -> None:
    """--secure-aggregation's refusals, one line each (docs/privacy.md). `sites`: the
    aggregator accepts sites (--site-keys), whose answer is one plain signed update each."""
    if sites:
        raise ConfigError("--secure-aggregation with --site-keys is refused: a site answers "
                          "with one signed update (its devices' aggregate), not masked steps; "
                          "run --secure-aggregation at each site over its devices "
                          "(docs/privacy.md, 'Placement with sites')")
    if strategy in UNSUMMABLE:
        raise ConfigError(f"--secure-aggregation: strategy {strategy} is refused, "
                          f"{UNSUMMABLE[strategy]} and the aggregator only learns their sum "
                          "(use fedavg; clipping moves to the devices: --secagg-clip)")
    if min_clients < MIN_DEVICES:
        raise ConfigError(f"--secure-aggregation needs --min-clients >= {MIN_DEVICES} (the "
                          "sum of two updates tells each device the other's)")
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"--secagg-clip must be a positive number, got {clip}")


class SecAggCollect:
    """One aggregator's secure rounds; `collect` replaces the plain collect, `on_message`
    takes every `secagg` envelope on an update topic (from `ingest.MessageIntake._handle`)."""

    def __init__(self, agg: Any, clip: float = DEFAULT_CLIP) -> None:
        self.agg = agg
        self.clip = float(clip)
        self.phase = ""  # "" between rounds
        self.attempt = ""
        self.round = 0
        self.keys: dict[str, dict[str, Any]] = {}  # U1: c, s public keys, weight, samples
        self.order: list[str] = []
        self.t = 0
        self.max_weight = 1.0
        self.shares: dict[str, dict[str, str]] = {}  # sender -> recipient -> ciphertext
        self.masked: dict[str, np.ndarray] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.reveals: dict[str, dict[str, dict[str, int]]] = {}  # sender -> b/s -> v -> y
        self.u2: list[str] = []
        self.u3: list[str] = []
        self.failed = ""  # why the last attempt failed
        self._last = b""  # the phase's message: sent again after a reconnect

    # ---------------------------------------------------------------- messages in
    def on_message(self, client: str, msg: Received) -> None:
        """One device message; MessageRejected (counted by the intake) when out of step."""
        m = W.decode(msg.payload)
        agg = self.agg
        agg.check_sender(f"secure-aggregation {m.step}", m.job, m.client, client)
        if agg.cfg.signed:
            W.verify(m, agg.cfg.keys_of(client))
        check_run(f"secure-aggregation {m.step}", m.run, agg.run_id, agg.cfg.signed)
        if m.round != self.round or not self.phase:
            raise P.MessageRejected("stale" if m.round <= agg.completed else "secagg",
                                    f"{m.step} for round {m.round}, now {self.round}")
        if m.step == "keys":
            self._on_keys(client, m)
        elif m.attempt != self.attempt:
            raise P.MessageRejected("secagg", f"{m.step} of another attempt of round {m.round}")
        elif m.step == "shares" and self.phase == "shares" and client in self.keys:
            body = m.body_json()
            if not isinstance(body, dict) or set(body) != set(self.order) - {client}:
                raise P.MessageRejected("secagg", f"{client}'s shares are not one per peer")
            self.shares[client] = {str(v): str(ct) for v, ct in body.items()}
        elif m.step == "masked" and self.phase == "masked" and client in self.u2:
            self._on_masked(client, m, msg)
        elif m.step == "reveal" and self.phase == "reveal" and client in self.u3:
            self._on_reveal(client, m)
        else:
            raise P.MessageRejected("secagg", f"{m.step} from {client} during the "
                                    f"{self.phase} phase of round {m.round}")
        agg.counters[f"secagg_{m.step}"] += 1

    def _on_keys(self, client: str, m: W.SecAggMessage) -> None:
        if self.phase != "keys":
            raise P.MessageRejected("secagg", f"keys from {client} after round {m.round}'s "
                                    "roster (it joins the next attempt or round)")
        d = m.data
        weight, samples = d.get("w"), d.get("samples")
        uniform = self.agg.cfg.weighting == "uniform"
        if (not isinstance(samples, int) or not 0 <= samples <= MAX_SAMPLES
                or not isinstance(weight, int) or not 0 < weight <= MAX_SAMPLES
                or (uniform and weight != 1) or (not uniform and weight != samples)):
            raise P.MessageRejected("secagg", f"keys of {client}: weight {weight!r} does not "
                                    f"match the job's weighting {self.agg.cfg.weighting}")
        self.keys[client] = {"c": W.b64(W.unb64(d.get("c"), 32)),
                             "s": W.b64(W.unb64(d.get("s"), 32)), "w": weight,
                             "samples": samples}
        self.agg._open.answered[client] = {}  # the global's `have`: no fresh keys from it

    def _on_masked(self, client: str, m: W.SecAggMessage, msg: Received) -> None:
        size = sum(v.numel() for v in self.agg._open.global_state.values())
        self.masked[client] = W.vector_of(m.body, size)
        metrics = m.data.get("metrics", {})
        rec = device_metrics(metrics if isinstance(metrics, dict) else {})
        rec.update({"kind": "client", "round": m.round, "client": client,
                    "samples": self.keys[client]["samples"], "bytes_up": msg.wire_bytes,
                    "update_latency_s": self.agg.clock() - self.agg._published_at,
                    "update_dtype": f"int{W.BITS}", "update_codec": "secagg",
                    "secagg_attempt": self.attempt,
                    "bytes_down": len(self.agg._global_payload)})
        self.records[client] = rec

    def _on_reveal(self, client: str, m: W.SecAggMessage) -> None:
        out: dict[str, dict[str, int]] = {}
        for kind, want in (("b", set(self.u3)), ("s", set(self.u2) - set(self.u3))):
            got = m.data.get(kind)
            if not isinstance(got, dict) or set(got) != want:
                raise P.MessageRejected("secagg", f"{client}'s reveal of {kind} shares is not "
                                        "for the devices asked")
            out[kind] = {v: W.unpack_share(y) for v, y in got.items()}
        self.reveals[client] = out

    # ---------------------------------------------------------------- phases
    def _send(self, step: str, data: dict[str, Any], body: bytes = b"") -> None:
        agg = self.agg
        m = W.SecAggMessage(step, agg.cfg.job, self.round, P.AGGREGATOR_ID, self.attempt,
                            data, body, session=agg.session, run=agg.run_id)
        self._last = W.sign(m, agg.cfg.signing_key).encode()
        agg.t.publish(P.control_topic(agg.cfg.job), self._last)

    def republish(self) -> None:
        """After a reconnect (the broker may have restarted and lost it): the phase's message
        again; devices answer a repeated one as they did (every step is idempotent)."""
        if self.phase and self._last:
            self.agg.t.publish(P.control_topic(self.agg.cfg.job), self._last)

    def _wait(self, done: Callable[[], bool]) -> None:
        self.agg._pump(self.agg.clock() + self.agg.cfg.round_timeout_s, done)

    def _fail(self, why: str) -> bool:
        self.failed = why
        return False

    def _try(self, rnd: OpenRound) -> bool:
        """One attempt of the round: True with the unmasked state in the accumulator."""
        agg = self.agg
        self.attempt = secrets.token_hex(8)
        self._last = b""
        self.keys, self.shares, self.masked, self.records, self.reveals = {}, {}, {}, {}, {}
        self.u2, self.u3 = [], []
        need = max(MIN_DEVICES, agg.cfg.min_clients)
        self.phase = "keys"
        self._wait(lambda: len(self.keys) >= need and set(self.keys) >= agg.active)
        self.order = sorted(self.keys)
        n = len(self.order)
        if n < need:
            return self._fail(f"{n} of the {need} devices needed sent keys")
        self.t = W.threshold(n)
        self.max_weight = float(max(k["w"] for k in self.keys.values()))
        agg.log(f"round {rnd.number}: secure aggregation attempt {self.attempt}: roster of {n} "
                f"device(s), threshold {self.t}")
        self.phase = "shares"
        self._send("roster", {"devices": {u: {"c": k["c"], "s": k["s"], "w": k["w"]}
                                          for u, k in self.keys.items()},
                              "t": self.t, "clip": self.clip, "max_weight": self.max_weight})
        self._wait(lambda: set(self.shares) >= set(self.order) & agg.active)
        self.u2 = sorted(self.shares)
        if len(self.u2) < self.t:
            return self._fail(f"{len(self.u2)} devices sent shares, the threshold is {self.t}")
        deal = {v: {u: self.shares[u][v] for u in self.u2 if u != v} for v in self.u2}
        self.phase = "masked"
        self._send("deal", {"u2": self.u2}, W.json_bytes(deal))
        self._wait(lambda: set(self.masked) >= set(self.u2) & agg.active)
        self.u3 = sorted(self.masked)
        if len(self.u3) < self.t:
            return self._fail(f"{len(self.u3)} masked updates, the threshold is {self.t}")
        self.phase = "reveal"
        self._send("survivors", {"u3": self.u3})
        self._wait(lambda: len(self.reveals) >= self.t
                   and set(self.reveals) >= set(self.u3) & agg.active)
        if len(self.reveals) < self.t:
            return self._fail(f"{len(self.reveals)} devices revealed shares, the threshold "
                              f"is {self.t}")
        state = self._unmask(rnd)
        if state is None:
            return False
        samples = sum(self.keys[u]["samples"] for u in self.u3)
        rnd.accumulator.add(state, samples, rnd.global_state, weight=1.0)
        rnd.answered.clear()
        rnd.answered.update({u: self.records[u] for u in self.u3})
        for u in self.u3:
            agg.roster.answered(u)
        agg.counters["accepted"] += len(self.u3)
        return True

    def _unmask(self, rnd: OpenRound) -> dict[str, torch.Tensor] | None:
        """The masks off the sum, from t revealers' shares; None when they do not add up."""
        x_of = {u: i + 1 for i, u in enumerate(self.order)}
        revealers = sorted(self.reveals)[: self.t]
        ctx = W.context(self.agg.cfg.job, self.round, self.attempt)
        fp = W.fixed_point(self.clip, self.max_weight, len(self.order))
        size = next(iter(self.masked.values())).size
        total = np.zeros(size, dtype=np.uint64)
        for y in self.masked.values():
            total = fp.add(total, y)
        try:
            for v in self.u3:
                b = reconstruct_secret([(x_of[w], self.reveals[w]["b"][v]) for w in revealers])
                total = fp.sub(total, expand_mask(b, size, W.BITS))
            for u in sorted(set(self.u2) - set(self.u3)):
                raw = reconstruct_secret([(x_of[w], self.reveals[w]["s"][u]) for w in revealers])
                sk = X25519PrivateKey.from_private_bytes(raw)
                if W.b64(sk.public_key().public_bytes_raw()) != self.keys[u]["s"]:
                    raise ValueError(f"the shares of {u}'s mask key do not give its key")
                for v in self.u3:
                    m = expand_mask(W.agreed(sk, W.unb64(self.keys[v]["s"]), u, v, ctx), size,
                                    W.BITS)
                    total = fp.sub(total, m) if u > v else fp.add(total, m)
        except ValueError as exc:
            self._fail(f"unmasking failed: {exc}")
            return None
        weight = sum(self.keys[u]["w"] for u in self.u3)
        mean = fp.decode(total) / weight
        glob = rnd.global_state
        return unflatten(flatten(dict(glob)) + mean, dict(glob))

    def collect(self, rnd: OpenRound) -> bool:
        """The round engine's collect, secure: attempts (each with fresh keys) until one
        unmasks the sum, retried like a short round; False when retries are spent."""
        agg = self.agg
        self.round = rnd.number
        attempts = agg._attempts = 0
        try:
            while not self._try(rnd):
                attempts = agg._attempts = attempts + 1
                agg.log(f"round {rnd.number}: secure aggregation attempt failed: {self.failed} "
                        f"(attempt {self.attempt})")
                if agg.cfg.on_short == "stop" or attempts > agg.cfg.max_retries:
                    return False
                agg.log(f"round {rnd.number}: retry {attempts}/{agg.cfg.max_retries}, same "
                        "global adapter, fresh keys")
                rnd.answered.clear()
                agg.roster.start_round()
                self.phase = "keys"  # keys sent in answer to the re-published global count
                self.attempt = ""
                agg._publish_global()
        finally:
            self.phase = ""
        agg.hooks.round_closed(agg, rnd.number)
        agg._wall = agg.clock() - agg._published_at
        lost = len(self.order) - len(self.u3)
        agg.log(f"round {rnd.number}: secure aggregation: the sum of {len(self.u3)} masked "
                f"updates unmasked by {len(self.reveals)} device(s) (threshold {self.t} of "
                f"{len(self.order)}; {lost} dropped before masking; attempt {self.attempt})")
        return True
