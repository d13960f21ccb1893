"""The aggregator's message handling: statuses and updates in, each accepted or refused (and
counted) with a reason, on the aggregator's own thread in arrival order.

Why apart from the round loop (aggregator.py): what makes a message acceptable (topic, job,
client, signature, round, duplicate, frame, fields) changes with the protocol; what a round does
with an accepted update does not. An accepted update goes to the open round of the round engine
(`fedclip_edge.rounds`) as an `Update`; everything else about the round lives there and in
aggregator.py. `MessageIntake` is a mixin of `Aggregator` (it reads the aggregator's config,
roster, counters and open round); the validation thread's pure half is `prevalidate.py`.
"""

from __future__ import annotations

import time
from typing import Any

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import report as M
from fedclip_edge.broker.hierarchy import (
    SITE_BACKEND,
    SITE_CLAIM,
    check_site_role,
    check_weight_claim,
    read_site_weight,
)
from fedclip_edge.broker.penalty import id_filters
from fedclip_edge.broker.roster import Device
from fedclip_edge.broker.runbind import check_run, status_binds
from fedclip_edge.broker.secagg_wire import is_secagg
from fedclip_edge.broker.transport import Received
from fedclip_edge.privacy.central import OVER_SITES, CentralDP
from fedclip_edge.rounds import Update
from fedclip_edge.strategy import over_sites_note
from fedclip_edge.wire import FrameRejected, decode_update

# A device's sample count weighs its update (samples weighting): bounded so that one claim
# cannot outweigh a fleet by orders of magnitude beyond any real dataset, nor overflow a float.
MAX_SAMPLES = 10**9
# What a device's metrics may carry into metrics.jsonl: finite numbers within this bound, short
# strings; everything else is dropped, so no device value can break a commit or a report.
_MAX_METRIC = 1e15
_TEXT_METRICS = frozenset({"backend", "update_codec", "update_dtype", "site_weighting"})
# Widest feature a device may report (CLIP ViT-bigG is 1280): bounds the adapter the aggregator
# allocates from a hello, 2*(d*d+d) floats.
MAX_DIM = 8192


def device_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """A device's self-reported metrics, keeping only well-formed values (their names are
    bounded by the envelope's header size)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or len(k) > 64:
            continue
        num = M._num(v)
        if num is not None and abs(num) <= _MAX_METRIC:
            out[k] = int(v) if isinstance(v, int) else num
        elif isinstance(v, str) and k in _TEXT_METRICS and len(v) <= 128:
            out[k] = v
    return out


class MessageIntake:
    """Status and update handling of `Aggregator` (a mixin: the attributes it reads are the
    aggregator's, set in its __init__)."""

    cfg: Any
    counters: Any
    hooks: Any
    roster: Any
    strategy: Any
    t: Any
    log: Any
    clock: Any
    completed: int
    global_state: Any
    _round: int
    _open: Any
    _uploads: dict[tuple[str, int], float]
    _global_payload: bytes
    _published_at: float
    _warned_over_sites: bool
    refused: dict[str, tuple[str, str]]
    resumed: bool
    run_id: str
    hellos_unbound: int
    binding: set[str]  # said hello for no run / another run: expected to say it for this one
    _secagg: Any  # broker.secagg_round.SecAggCollect with --secure-aggregation, else None
    downlink: Any
    engine: Any

    def _publish_global(
        self, have: tuple[str, ...] | None = None, dense: bool = False
    ) -> None: ...

    def check_sender(self, what: str, job: str, claimed: str, client: str) -> None:
        """MessageRejected unless a device message on `client`'s topic is of this job, names
        that client and comes from a device that said hello."""
        if job != self.cfg.job:
            raise P.MessageRejected("job", f"{what} for job {job!r}")
        if claimed != client:
            raise P.MessageRejected("client_mismatch", f"{what} of {claimed!r} on {client!r}")
        if client not in self.roster:
            raise P.MessageRejected("unknown_client", f"no hello from {client!r}")

    @property
    def _answered(self) -> dict[str, dict[str, Any]]:
        """Who answered the current (or last) round, with their records."""
        return self._open.answered if self._open is not None else {}

    # ------------------------------------------------------------------ what we subscribe to
    def _subscriptions(self) -> list[str]:
        """Signed: the registered ids' own topics (broker/penalty.py), plus `status/+` until
        the rounds start (a refused hello is named with its fix); unsigned: the wildcards."""
        job = self.cfg.job
        if not self.cfg.signed:
            return [P.update_filter(job), P.status_filter(job)]
        sites = self.cfg.sites.keys.ids() if self.cfg.sites is not None else ()
        return [*id_filters(job, [*self.cfg.registry.ids(), *sites]), P.status_filter(job)]

    def _narrow(self) -> None:
        """The rounds start: an unregistered id's status no longer reaches us either."""
        if self.cfg.signed:
            self.t.unsubscribe(P.status_filter(self.cfg.job))

    def _penalized(self) -> None:
        """A device unsubscribed for flooding (broker/penalty.py) is offline until the broker
        sends its retained status back with the resubscription: rounds do not wait for it.

        The round's global goes out again (listing who answered): before the unsubscribe the
        flood filled the broker's queue for us, and the broker drops what does not fit, an
        honest update too; a device whose update is not listed sends it again (duplicates
        count once). Without this such a round waited for its deadline."""
        box = getattr(self.t, "penalty", None)
        new = box.take_new() if box is not None else []
        for who in new:
            dev = self.roster.get(who)
            if dev is not None and dev.active:
                self.roster.set_state(who, "offline")
                self.log(f"device {who} is offline while it is penalized for flooding")
        if new and self._round and self._secagg is None:
            self._publish_global()

    def _reject(self, reason: str, topic: str, message: str) -> None:
        self.counters[f"rejected_{reason}"] += 1
        self.hooks.message_rejected(self, reason)
        if "/status/" in topic:
            self.refused[topic.rsplit("/", 1)[1]] = (reason, message)
        if self.resumed and reason in M.RESEND_REASONS:
            message = f"{message} ({M.RESEND_NOTE})"
        self.log(f"rejected ({reason}) on {topic}: {message}")

    def _refused_note(self) -> str:
        """Who was turned away and is still not in (empty when nobody)."""
        return M.refused_summary(
            {c: r for c, r in self.refused.items() if c not in self.roster})

    def _handle(self, msg: Received) -> None:
        is_update = False
        t0 = time.perf_counter()
        accepted = False
        try:
            job, kind, client = P.parse_topic(msg.topic)
            if job != self.cfg.job:
                raise P.MessageRejected("job", f"topic is for job {job!r}")
            if kind == "status":
                self._on_status(client or "", msg)
            elif kind == "update":
                is_update = True
                if self._secagg is not None:  # only masked steps: a plain update is refused
                    if not is_secagg(msg.payload):
                        P.decode_envelope(msg.payload)  # garbage is refused as what it is
                        raise P.MessageRejected("secagg", "a plain update in a job with secure "
                                                "aggregation (is the agent run with "
                                                "--secure-aggregation?)")
                    self._secagg.on_message(client or "", msg)
                else:
                    self._on_update(client or "", msg)
                accepted = True
        except P.MessageRejected as exc:
            self._reject(exc.reason, msg.topic, exc.message)
        except Exception as exc:  # a message must never stop the job: count it and go on
            self._reject("internal", msg.topic, f"{type(exc).__name__}: {exc}"[:300])
        if is_update:
            self.hooks.update_handled(self, time.perf_counter() - t0, accepted)

    def _on_status(self, client: str, msg: Received) -> None:
        st = P.decode_message(msg.payload)
        if not isinstance(st, P.Status):
            raise P.MessageRejected("type", "a status topic carries only hello/status")
        if st.client != client:
            raise P.MessageRejected("client_mismatch", f"status of {st.client!r} on {client!r}")
        if self.cfg.signed:
            keys_of = self.cfg.keys_of(client)
            assert keys_of is not None
            authn.verify(st, keys_of, job=self.cfg.job)  # admitted only if registered
        if st.state != "offline":
            check_site_role(client, st.backend, self.cfg.sites, self.cfg.signed)
            if st.backend == SITE_BACKEND and any(  # an unsigned job's site, under central DP
                    isinstance(p, CentralDP) for p in self.engine.plugins):
                raise P.MessageRejected(SITE_CLAIM, f"{client} is a site: {OVER_SITES}")
            # online only for this run: another run's is refused, none (a first hello) waits;
            # either way the device (if live) says hello for this run once it sees its control
            self.binding.add(client)
            if not status_binds(st.run, self.run_id, self.cfg.signed):
                self._unbound(client)
                return
        self.binding.discard(client)
        dev = self.roster.get(client)
        if st.state == "offline":
            if dev is not None and dev.session and st.session and st.session != dev.session:
                # the will of an earlier process of this device, published after its restarted
                # process said hello (a kill -9 and a quick restart): not about the live one
                self.counters["stale_will"] += 1
                return
            if dev is not None and dev.active:
                self.roster.set_state(client, "offline")
                self.log(f"device {client} is offline")
            return
        if dev is None or not dev.active or st.hello:
            if self.cfg.dim is not None and st.dim != self.cfg.dim:
                raise P.MessageRejected(
                    "dim", f"device {client} reports feature width {st.dim}, the job's is "
                    f"{self.cfg.dim}"
                )
            if not 0 < st.dim <= MAX_DIM:
                raise P.MessageRejected("dim", f"device {client} reports feature width {st.dim}")
            if dev is None or not dev.active:
                self.log(
                    f"device {client} online: {sum(st.samples.values())} samples "
                    f"{st.samples}, {st.backend}"
                )
            if st.backend == SITE_BACKEND and not self._warned_over_sites:
                note = over_sites_note(self.strategy)  # a robust rule over sites: say so once
                if note is not None:
                    self._warned_over_sites = True
                    self.log(f"warning: {note}")
            dev = Device(
                client, st.state, dict(st.samples), st.backend, st.dim, dict(st.versions),
                session=st.session,
            )
            self.roster.put(dev)
            # a chunked global cannot be retained, a compressed one needs the round before:
            # send it again (dense) to a (re)joining device
            compressed = self.downlink.active
            if (
                self._round
                and (len(self._global_payload) > self.t.max_payload or compressed)
                and st.round < self._round
            ):
                self._publish_global(dense=compressed)
        self.roster.set_state(client, st.state)
        if st.state == "uploaded" and st.upload_s is not None:
            self._uploads[(client, st.round)] = st.upload_s

    def _unbound(self, client: str) -> None:
        """A hello that names no run: the device has not seen this run's control yet (agents
        say hello again for it at once) or it is a replay; nobody comes online from it."""
        self.hellos_unbound += 1  # not a rejection, nor in the run's counters
        if client not in self.roster and client not in self.refused:
            self.refused[client] = ("run", f"device {client} said hello for no run yet; it comes "
                                    f"online with a hello for run {self.run_id}")

    def _decode_frame(self, frame: bytes) -> Any:
        """The update frame decoded against the open round's global (the one it names)."""
        rnd = self._open
        if rnd is not None and rnd.number == self._round:
            return rnd.decode(frame, max_bytes=self.cfg.max_update_bytes)
        return decode_update(frame, self.global_state, max_bytes=self.cfg.max_update_bytes)

    def _on_update(self, client: str, msg: Received) -> None:
        pre = getattr(msg, "decoded", None)  # set by a prevalidating transport
        if pre is not None and isinstance(pre[0], Exception):
            raise pre[0]
        up = pre[0] if pre is not None else P.decode_message(
            msg.payload, self.cfg.max_update_bytes + 1024 * 1024
        )
        if not isinstance(up, P.Update):
            raise P.MessageRejected("type", "an update topic carries only updates")
        self.check_sender("update", up.job, up.client, client)
        if up.round < self._round or up.round <= self.completed:
            # also between rounds (resumed, not yet open: _round is 0): a committed round's
            # update is stale, not "future"
            raise P.MessageRejected("stale", f"update for round {up.round}, now {self._round}"
                                    f" (round {self.completed} committed)")
        if up.round > self._round:
            raise P.MessageRejected("future", f"update for round {up.round}, now {self._round}")
        if client in self._answered:
            raise P.MessageRejected("duplicate", f"second update of {client} for round {up.round}")
        if self.cfg.signed:
            keys_of = self.cfg.keys_of(client)
            assert keys_of is not None
            authn.verify(up, keys_of)
        check_run("update", up.run, self.run_id, self.cfg.signed)
        assert self.global_state is not None
        try:
            # the worker's result only when it decoded against this round's global
            if pre is not None and pre[1] is not None and pre[1][0] == self._round:
                if isinstance(pre[1][1], Exception):
                    raise pre[1][1]
                frame = pre[1][1]
            else:
                frame = self._decode_frame(up.frame)
        except FrameRejected as exc:
            raise P.MessageRejected(f"frame_{exc.reason}", exc.message) from None
        if (frame.job, frame.round, frame.client) != (up.job, up.round, up.client):
            raise P.MessageRejected("fields", "frame job/round/client differ from the envelope")
        if not 0 <= up.samples <= MAX_SAMPLES:
            raise P.MessageRejected("fields", f"update claims {up.samples} samples")
        rec = device_metrics(up.metrics)
        dev = self.roster.get(client)
        # a site's update is the mean of its devices: it weighs what they would together, up
        # to what the site is registered for; a device may claim no site weight at all
        is_site = dev is not None and dev.backend == SITE_BACKEND
        weight = read_site_weight(up.metrics, up.samples, self.cfg.weighting) if is_site else None
        check_weight_claim(client, is_site, up.metrics, weight, self.cfg.sites, self.cfg.signed)
        # into the round engine: its plug-ins, then the strategy (the record is filled below)
        self._open.add(Update(client, frame.tensors, up.samples, weight, rec))
        latency = self.clock() - self._published_at
        self.counters["accepted"] += 1
        rec.update(
            {
                "kind": "client",
                "round": up.round,
                "client": client,
                "samples": up.samples,
                "bytes_up": msg.wire_bytes,
                "update_latency_s": latency,
                "update_dtype": frame.dtype,
                "update_codec": frame.codec,  # what the frame is, not what the device says
            }
        )
        rec.setdefault("bytes_down", len(self._global_payload))
        self.roster.answered(client)
