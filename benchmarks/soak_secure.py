"""`fedclip-edge bench soak --secure-aggregation`: the chaos soak with secure aggregation on the
aggregator and every agent (docs/privacy.md "Secure aggregation over MQTT").

Why its own run: with secure aggregation no plain update crosses the broker (devices send keys,
share ciphertexts, masked vectors and reveals, `secagg` envelopes), so the plain soak's
forgeries, built from recorded plain updates, have nothing to copy, and its reconciliation,
which recomputes each global from the recorded updates, cannot unmask anything. Here:

- the agents run with `--secure-aggregation --secagg-record DIR`: each keeps, on its own side,
  the clipped delta it masked and sent for each attempt (`DIR/sent.jsonl`, one `.npy` each);
  the aggregator runs `--secure-aggregation` (fedavg, min clients >= 3);
- every fault kind runs; `kill_agent`, `restart_broker`, `kill_aggregator`, `garbage` and
  `flood` as in the plain soak, the four forgeries made of the secure messages instead of
  plain updates (a plain update in a secure job is refused as `secagg` before any of the
  checks these faults are about):
  - `replay`: a recorded `secagg` message of a committed round re-sent byte for byte
    (`stale`, or `secagg`/`unknown_client` when it reaches another phase or a resumed
    aggregator first);
  - `foreign_signed`: a `keys` message for the open round in a device's name signed with the
    unregistered key (`bad_signature`): taking a device's place in the roster is refused;
  - `site_claim`: a `keys` message for the open round in a device's name, signed with its own
    key, claiming a weight of 1e15 (`secagg`: the weight must match the job's weighting);
  - `cross_run`: a `keys` message for the open round signed with the device's key for an
    older run of the job (`run`), and that run's `done` signed with the aggregator's key
    (the agents ignore it);
- the reconciliation (benchmarks/soak_secure_reconcile.py) reads what each side wrote: the
  devices' records and logs, the aggregator's logs (every attempt it started, failed or
  summed is named there), metrics.jsonl (the clients of each committed sum and its attempt)
  and the committed globals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedclip_edge.benchmarks.soak import Fault, Soak
from fedclip_edge.benchmarks.soak_crossrun import older_run
from fedclip_edge.benchmarks.soak_mqtt import Injector, Recorder
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import secagg_wire as W
from fedclip_edge.signing import load_private_key

FORGED = ("replay", "foreign_signed", "site_claim", "cross_run")
# the flood while the aggregator is held: over a sender's burst (500), under mosquitto's queue
# of a subscriber that does not read (1000 by default; more would be dropped by the broker,
# with the batch's other messages behind them)
FLOOD_MESSAGES = 800


def recorded_secagg(recorded: list[tuple[float, str, bytes]]
                    ) -> list[tuple[str, bytes, W.SecAggMessage]]:
    """(topic, payload, message) of every recorded `secagg` envelope."""
    out = []
    for _, topic, payload in recorded:
        try:
            out.append((topic, payload, W.decode(payload)))
        except (P.MessageRejected, ValueError):
            continue
    return out


class SecureSoak(Soak):
    """The soak with `--secure-aggregation` everywhere; faults and reconciliation to fit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.job = f"ssoak{self.cfg.seed}"
        self._stopped: Any = None  # the aggregator held while a batch of faults fires
        self._replayed: dict[str, Any] = {}  # what the last replay re-sent
        # a flood last in its batch: what the others inject is queued before it
        self.faults.sort(key=lambda f: (f.after_round, f.kind == "flood"))

    def record_dir(self, client: str) -> Path:
        """Where the device keeps what it masked (its own data: the soak reads it after)."""
        return self.out / "devices" / client / "secagg"

    def _agent_cmd(self, client: str) -> list[str]:
        return [*super()._agent_cmd(client), "--secure-aggregation", "--secagg-record",
                str(self.record_dir(client))]

    def _agg_cmd(self, resume: bool) -> list[str]:
        return [*super()._agg_cmd(resume), "--secure-aggregation"]

    @contextlib.contextmanager
    def _held(self, due: bool) -> Iterator[None]:
        """While the faults due after a commit fire, the aggregator is stopped (SIGSTOP; its
        messages wait in the broker): each lands before the next round commits, however fast
        secure rounds go (a flood's acknowledgements alone take longer than a round). A
        `kill_aggregator` among them kills the stopped process; its successor runs."""
        self._stopped = None
        if due:
            self._stop_aggregator()
        try:
            yield
        finally:
            agg, self._stopped = self._stopped, None
            if agg is not None and agg.poll() is None:
                os.kill(agg.pid, signal.SIGCONT)

    def _stop_aggregator(self) -> None:
        agg = self.procs.running.get("aggregator")
        if agg is not None and agg.poll() is None:
            os.kill(agg.pid, signal.SIGSTOP)
            self._stopped = agg

    def _await_successor(self, timeout_s: float = 180.0) -> None:
        """After `kill_aggregator`: until the resumed aggregator says its devices are online
        (connected, subscribed, roster read), then held like its predecessor, so the batch's
        later messages reach an aggregator and not a session still being set up."""
        log = self.procs.logs["aggregator"][-1]
        proc = self.procs.running["aggregator"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                if " device(s) online " in log.read_text(errors="replace"):
                    break
            time.sleep(0.05)
        self._stop_aggregator()

    def _fire(self, f: Fault, rng: random.Random, recorder: Recorder,
              injector: Injector) -> None:
        if f.kind == "flood":
            f.fired_at_round = self._completed()
            f.at_s = round(time.monotonic() - self.t0, 2)
            f.target = "dev-flood"
            topic = P.update_topic(self.job, f.target)
            sent = injector.flood(topic, FLOOD_MESSAGES, rng)
            self.injected.append({"kind": "flood", "topic": topic, "messages": sent})
            f.outcome = "injected" if sent else "not acknowledged by the broker"
            self.log(f"fault after round {f.fired_at_round}: flood {f.target} -> {f.outcome}")
            return
        if f.kind not in FORGED:
            super()._fire(f, rng, recorder, injector)
            if f.kind == "kill_aggregator":
                self._await_successor()
            return
        f.fired_at_round = self._completed()
        f.at_s = round(time.monotonic() - self.t0, 2)
        msgs = recorded_secagg(self.from_devices(recorder))
        made = self._forge(f, rng, msgs)
        if made is None:
            f.outcome = "skipped: no secure-aggregation message recorded yet to start from"
        else:
            topic, payload, extra = made
            ok = injector.publish(topic, payload)
            if extra is not None:
                ok = ok and injector.publish(P.control_topic(self.job), extra)
            self.injected.append({"kind": f.kind, "topic": topic, "round": f.fired_at_round + 1,
                                  "client": topic.rsplit("/", 1)[-1], **self._replayed,
                                  "sha256": hashlib.sha256(payload).hexdigest()})
            f.outcome = "injected" if ok else "not acknowledged by the broker"
        self.log(f"fault after round {f.fired_at_round}: {f.kind} {f.target} -> {f.outcome}")

    def _forge(self, f: Fault, rng: random.Random, msgs: list[tuple[str, bytes, Any]]
               ) -> tuple[str, bytes, bytes | None] | None:
        """(topic, payload, a control message or None) of a forgery fault."""
        done = f.fired_at_round or 0
        self._replayed = {}
        if f.kind == "replay":
            old = [(t, p, m) for t, p, m in msgs if 1 <= m.round <= done]
            if not old:
                return None
            topic, payload, m = rng.choice(old)
            f.target = f"{m.client} {m.step} r{m.round}"
            self._replayed = {"step": m.step, "of_round": m.round}
            return topic, payload, None
        keys = [m for _, _, m in msgs if m.step == "keys" and m.run]
        if not keys:
            return None
        last = keys[-1]
        f.target = last.client
        data = {"c": W.b64(secrets.token_bytes(32)), "s": W.b64(secrets.token_bytes(32)),
                "w": 1, "samples": last.data.get("samples", 1)}
        m = W.SecAggMessage("keys", self.job, done + 1, last.client, "", data,
                            session=last.session, run=last.run)
        keys_dir = self.out / "keys"
        signer = f"{last.client}.key"
        extra = None
        if f.kind == "foreign_signed":
            signer = "foreign.key"
        elif f.kind == "site_claim":
            m = dataclasses.replace(m, data={**data, "w": 10**15, "samples": 10**15})
        else:  # cross_run: the device's keys and the aggregator's done, for an older run
            old = older_run(last.run)
            m = dataclasses.replace(m, run=old)
            ctl = P.Control(self.job, "done", done, self.cfg.rounds, session="soak-replay",
                            run=old)
            extra = authn.sign(ctl, load_private_key(keys_dir / "aggregator.key")).encode()
        payload = W.sign(m, load_private_key(keys_dir / signer)).encode()
        return P.update_topic(self.job, last.client), payload, extra

    def _reconcile(self, recorded: list[tuple[float, str, bytes]], finished: bool, error: str,
                   wall: float) -> dict[str, Any]:
        from fedclip_edge.benchmarks.soak_secure_reconcile import reconcile_secure

        return reconcile_secure(self, recorded, finished, error, wall)


def run_secure_soak(cfg: Any, log: Any = print) -> dict[str, Any]:
    """The secure soak (`cfg.secure_aggregation` set); the report is also OUT/soak.json."""
    if not cfg.secure_aggregation:
        cfg = dataclasses.replace(cfg, secure_aggregation=True)
    return SecureSoak(cfg, log).run()
