"""A site aggregator: one round per central round for the devices of its own broker.

Why: one aggregator process validates a bounded number of updates per second, and edge
deployments already run a broker per site (factory, store, vehicle depot) bridged to a central
one. A site aggregator takes its devices' updates on its own broker and sends the central ONE
update per round, so the central sees tens of sites instead of thousands of devices.

Upstream, the site is a client of the central job like a device: a retained hello on
`fedclip/J/status/SITE` (backend "site", the adapter width), its last will "offline", and its
update on `fedclip/J/update/SITE`. When the central's global of round r arrives (retained), the
site runs round r on its own broker with that global, seed, train settings and weighting (it is
an `Aggregator` on the local transport: deadline, quorum, retries, resume, metrics and the run
folder are that class's), then publishes upstream its devices' aggregate (the weighted mean, or
what its --strategy makes of them: robust to bad devices within the site) and the weight flat
FedAvg would give those devices together (`hierarchy.py`). A central global that
repeats round r without listing the site makes it send its partial again (as agents do); a late
site is a late device for the central (its update is refused as stale, the next round goes on).
When the central publishes its final adapter (round > rounds) the site publishes it to its
devices with `control: done` and ends.

`--secure-aggregation`: the site runs the secure protocol with its own devices
(`secagg_round.py`): it learns only their sum, and sends upstream the mean that sum gives with
the same weight, as above (the central needs nothing new; a central over sites refuses
`--secure-aggregation` itself: a site's answer is one signed update, not masked steps).

`--dp-*` (central DP at the site, privacy/central.py): the site's round engine clips each of its
devices' deltas, noises their sum and divides it by the expected count, as a flat job's
aggregator does, and accounts the site's own population and sampling rate; what it sends
upstream is that noised mean with a weight that does not depend on who answered (the expected
count; no sample total, no loss): the central, the other sites and every device downstream see
only the DP release (docs/privacy.md). Such a site needs the central's uniform weighting.

`--resume`: the site's run folder says which round it committed; if the central still waits for
that round, the site re-sends that round's partial from its files instead of running it again.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors.torch import load_file

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig, AggregatorHooks
from fedclip_edge.broker.hierarchy import DEVICES_KEY, SITE_BACKEND, STRATEGY_KEY, site_metrics
from fedclip_edge.broker.runbind import NEWER, OLDER
from fedclip_edge.broker.runbind import compare as run_compare
from fedclip_edge.broker.site_down import RelayDownlink
from fedclip_edge.broker.transport import Received, Transport
from fedclip_edge.errors import ConfigError, FedClipError, TransportError
from fedclip_edge.global_codec import GlobalMismatch
from fedclip_edge.global_fields import DERIVE_KEY, DERIVE_VERSION
from fedclip_edge.privacy.central import CentralDP, PrivacyBudgetSpent
from fedclip_edge.rounds import RoundPlugin
from fedclip_edge.signing import KeyRegistry
from fedclip_edge.strategy import WEIGHTINGS, site_strategy
from fedclip_edge.wire import FrameRejected, encode_frame
from fedclip_edge.wire import expected_shapes as frame_shapes


class SiteAggregator(Aggregator):
    """An `Aggregator` for the local devices whose rounds are driven by a central job.

    `upstream` is a transport to the central job's topics: a client of the central broker, or
    of the site's own broker with a topic prefix a bridge maps to the central (`remap.py`).
    `run()` returns the central's final adapter.
    """

    def __init__(
        self,
        transport: Transport,
        upstream: Transport,
        cfg: AggregatorConfig,
        *,
        site: str,
        log: Callable[[str], None] = print,
        console: Any = None,
        clock: Callable[[], float] = time.monotonic,
        hooks: AggregatorHooks | None = None,
        idle_timeout_s: float = 0.0,
        upstream_key: Ed25519PublicKey | None = None,
        session: str | None = None,
        plugins: tuple[RoundPlugin, ...] = (),
    ) -> None:
        try:
            P.check_id(site, "site id")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if cfg.global_codec != "fp32":
            raise ConfigError("a site forwards the central's global codec (the central's "
                              "--global-codec): give --global-codec to the central only")
        super().__init__(transport, cfg, log=log, console=console, clock=clock, hooks=hooks,
                         plugins=plugins)
        # central DP over this site's devices (--dp-*), None without
        self.dp = next((p for p in plugins if isinstance(p, CentralDP)), None)
        # the central's globals, rebuilt here and passed on (compressed when they came so)
        self.downlink = RelayDownlink(self.out)
        self.up = upstream
        self.site = site
        # upstream, the site is a signed client: its key is cfg.signing_key (which also signs
        # the globals it passes down), the central's public key checks what comes from above
        if session is not None:
            self.session = session
        self._up_registry = (
            KeyRegistry({P.AGGREGATOR_ID: upstream_key}) if upstream_key is not None else None
        )
        if cfg.signed and self._up_registry is None:
            raise ConfigError(f"site {site}: give the central aggregator's public key")
        self.idle_timeout_s = idle_timeout_s  # 0: wait for the central as long as it takes
        self.wait_log_s = 30.0  # while waiting (devices, the central): say for what this often
        self.up_counters: Counter[str] = Counter()
        self._up_epoch = 0
        self._partial: tuple[int, bytes] | None = None  # (round, update payload) last sent
        self._closed = True  # between rounds: devices' late updates are stale
        self._template_state: dict[str, torch.Tensor] | None = None
        self.final_state: dict[str, torch.Tensor] | None = None
        self.central_rounds: list[int] = []  # central rounds this site answered (tests, bench)
        self.up_run = ""  # the central's job run, from its control or global (runbind.py)

    # ------------------------------------------------------------------ local side
    def _on_update(self, client: str, msg: Received) -> None:
        if self._closed:
            raise P.MessageRejected("stale", f"round {self._round} is closed at this site")
        super()._on_update(client, msg)

    def _run_round(self, rnd: int) -> bool:
        self._closed = False
        try:
            return super()._run_round(rnd)
        finally:
            self._closed = True

    def _publish_global(self, have: tuple[str, ...] | None = None, dense: bool = False) -> None:
        # between rounds `global_state` is this site's committed partial, not a global: a
        # device behind (or a reconnect) gets the central's next global when it comes
        if self._closed and self._round <= self.cfg.rounds:
            return
        super()._publish_global(have, dense)

    def _write_reports(self, plot: bool = True) -> None:
        # drawing the plot takes seconds: never between a round and its upstream send
        super()._write_reports(plot=False)

    def _site_dim(self) -> int:
        if self.cfg.dim is not None:
            return int(self.cfg.dim)
        dims = Counter(d.dim for d in self.devices.values() if d.active and d.dim > 0)
        if not dims:
            raise TransportError(f"site {self.site}: no device reported its width: "
                                 + (self._refused_note() or "pass --dim"))
        self.cfg.dim = max(dims, key=lambda d: (dims[d], -d))
        return int(self.cfg.dim)

    def _signed(self, msg: Any) -> Any:
        if self.cfg.signing_key is None:
            return msg
        return authn.sign(msg, self.cfg.signing_key, job=self.cfg.job)

    # ------------------------------------------------------------------ upstream side
    def _hello_up(self) -> None:
        samples = sum(d.samples.get("train", 0) for d in self.devices.values() if d.active)
        if self.dp is not None:
            samples = 0  # the devices' data sizes are not released with DP at the site
        st = P.Status(
            self.site, "online", {"train": int(samples)}, SITE_BACKEND, self._site_dim(),
            {"site_devices": str(self.roster.active_count), STRATEGY_KEY: self.strategy.name,
             DERIVE_KEY: DERIVE_VERSION},  # it derives a derived round 1 itself (site_down)
            hello=True, session=self.session, run=self.up_run,
            # the central global this site holds: a compressed central resends a dense copy
            # to a site behind its round
            round=self.downlink.held_round,
        )
        self.up.publish(P.status_topic(self.cfg.job, self.site), self._signed(st).encode(),
                        retain=True)

    def _send_up(self, rnd: int, payload: bytes) -> None:
        t0 = self.clock()
        delivery = self.up.publish(P.update_topic(self.cfg.job, self.site), payload)
        self._partial = (rnd, payload)
        self.up_counters["updates_sent"] += 1
        if delivery.wait(30.0):
            st = P.Status(
                self.site, "uploaded", {}, SITE_BACKEND, int(self.cfg.dim or 0),
                round=rnd, upload_s=self.clock() - t0, session=self.session, run=self.up_run,
            )
            self.up.publish(P.status_topic(self.cfg.job, self.site), self._signed(st).encode(),
                        retain=True)
        else:
            self.log(f"site {self.site}: round {rnd} update not acknowledged upstream within 30s")

    def _partial_payload(self, rnd: int, state: dict[str, torch.Tensor], devices: int,
                         samples: int, loss: float | None) -> bytes:
        frame = encode_frame(state, job=self.cfg.job, round=rnd, client=self.site)
        if self.dp is not None:
            # the DP release is the noised mean alone: its weight is the expected count (the
            # divisor), not who answered; no sample total, no loss (not noised)
            devices, samples, loss = self.dp.expected, 0, None
        metrics = site_metrics(devices, samples, self.cfg.weighting)
        if loss is not None:
            metrics["loss"] = loss
        up = P.Update(self.cfg.job, rnd, self.site, samples, metrics, frame, session=self.session,
                      run=self.up_run)
        return self._signed(up).encode()

    def _partial_from_disk(self, rnd: int) -> bytes | None:
        """The committed round's partial, rebuilt from the run folder (after --resume)."""
        gfile = self.out / "rounds" / f"global_r{rnd:04d}.safetensors"
        if not gfile.is_file() or not self.store.metrics_path.is_file():
            return None
        rows = [json.loads(x) for x in self.store.metrics_path.read_text().splitlines() if x]
        mine = [r for r in rows if r.get("kind") == "client" and r.get("round") == rnd]
        if not mine:
            return None
        losses = [r["loss"] for r in mine if isinstance(r.get("loss"), (int, float))]
        return self._partial_payload(
            rnd, load_file(str(gfile)), self._devices_behind({r["client"]: r for r in mine}),
            sum(int(r.get("samples") or 0) for r in mine),
            sum(losses) / len(losses) if losses else None,
        )

    def _adopt(self, g: P.GlobalModel) -> bool:
        """The central's job settings (weighting, seed, training, rounds) become this site's;
        False when its weighting is one this build does not know."""
        if g.weighting:
            if self.dp is not None and g.weighting != "uniform":
                raise ConfigError(f"site {self.site}: central DP at this site weighs every "
                                  f"device equally; the central's job weighs by {g.weighting} "
                                  "(run the central with --weighting uniform)")
            if g.weighting not in WEIGHTINGS:
                self.log(f"site {self.site}: central weighting {g.weighting!r} unknown; ignored")
                return False
            if g.weighting != self.cfg.weighting:
                self.log(f"site {self.site}: weighting {g.weighting} (the central's)")
                self.cfg.weighting = g.weighting
                # the site's own --strategy under the job's weighting (median and trimmed
                # mean stay unweighted: the weighting then sets only the site's weight)
                self.strategy = site_strategy(self.cfg.strategy, g.weighting,
                                              self.cfg.strategy_options)
        self.cfg.seed, self.cfg.train, self.cfg.rounds = g.seed, dict(g.train), g.rounds
        return True

    def _devices_behind(self, rows: dict[str, dict[str, Any]]) -> int:
        """Devices behind this round's answers: 1 per device, a site's own count for a site
        (a regional aggregator over sites weighs all their devices under `uniform`)."""
        n = 0
        for client, rec in rows.items():
            dev = self.roster.get(client)
            behind = rec.get(DEVICES_KEY)
            is_site = dev is not None and dev.backend == SITE_BACKEND
            n += int(behind) if is_site and isinstance(behind, int) and behind > 0 else 1
        return n

    def _answer(self, g: P.GlobalModel, state: dict[str, torch.Tensor]) -> None:
        """Run central round g.round on this site's devices and send the partial upstream."""
        self.global_state = state
        try:
            ran = self._run_round(g.round)
        except PrivacyBudgetSpent:  # this site's budget: its devices are done, it answers no more
            self._round = 0
            self._publish_control("done")
            raise
        if not ran:
            self.log(
                f"site {self.site}: round {g.round}: too few devices answered; nothing sent "
                "upstream (the central counts this site as late)"
            )
            return
        acc = self._open
        assert acc is not None
        losses = [r["loss"] for r in self._answered.values()
                  if isinstance(r.get("loss"), (int, float))]
        payload = self._partial_payload(
            g.round, self.global_state, self._devices_behind(self._answered), acc.samples,
            sum(losses) / len(losses) if losses else None,
        )
        self._send_up(g.round, payload)
        self.central_rounds.append(g.round)
        # with secure aggregation the accumulator held one input, the unmasked sum's mean
        what = ("the secure sum" if self._secagg is not None else
                "the DP-noised mean" if self.dp is not None else "mean") + " of"
        self.log(
            f"site {self.site}: round {g.round}/{g.rounds} sent upstream: {what} "
            f"{len(self._answered)} update(s), {acc.samples} samples"
        )

    def _on_central(self, msg: Received) -> bool:
        """One message from the central; True when the job is over for this site."""
        try:
            m = P.decode_message(msg.payload)
        except P.MessageRejected as exc:
            self.up_counters[f"rejected_{exc.reason}"] += 1
            self.log(f"site {self.site}: ignored a bad message on {msg.topic}: {exc.message}")
            return False
        if isinstance(m, (P.Control, P.GlobalModel)) and self._up_registry is not None:
            try:
                authn.verify(m, self._up_registry, key_id=P.AGGREGATOR_ID)
            except P.MessageRejected as exc:
                self.up_counters[f"rejected_{exc.reason}"] += 1
                self.log(f"site {self.site}: ignored an unsigned or forged {type(m).__name__} "
                         f"({exc.reason})")
                return False
        if isinstance(m, (P.Control, P.GlobalModel)) and not self._in_central_run(m):
            return False
        if isinstance(m, P.Control) and m.job == self.cfg.job and m.state == "done":
            self.log(f"site {self.site}: the central says job {self.cfg.job} is done")
            return True
        if not isinstance(m, P.GlobalModel) or m.job != self.cfg.job:
            return False
        self.downlink.heard(m.round, len(msg.payload))
        if m.round <= m.rounds and not self._adopt(m):
            return False
        if 0 < m.round <= m.rounds and m.round == self.completed:
            # this site committed that round: the central may lack it (lost, or the central
            # was restarted): send it again unless the central lists this site
            if self._partial is None or self._partial[0] != m.round:
                payload = self._partial_from_disk(m.round)
                self._partial = (m.round, payload) if payload else None
            if self._partial is not None:
                if self.site not in m.have:
                    self.log(f"site {self.site}: the central lacks round {m.round}: sending it")
                    self.up_counters["updates_resent"] += 1
                    self._send_up(m.round, self._partial[1])
                return False
        if m.round > m.rounds and self.final_state is not None:
            return True
        try:
            state = self.downlink.receive(m, frame_shapes(self._template()))
        except GlobalMismatch as exc:
            self.up_counters["dense_asked"] += 1
            self.log(f"site {self.site}: compressed central global of round {m.round} not "
                     f"usable here ({exc}); asking the central for a dense copy")
            self._hello_up()
            return False
        except FrameRejected as exc:
            self.up_counters[f"rejected_frame_{exc.reason}"] += 1
            self.log(f"site {self.site}: central global of round {m.round} refused: {exc.message}")
            return False
        if m.round > m.rounds:
            self.final_state = state
            self.cfg.rounds = m.rounds
            self.global_state = state
            self.log(f"site {self.site}: final adapter received (after round {m.rounds})")
            return True
        self._answer(m, state)
        return False

    def _in_central_run(self, m: P.Control | P.GlobalModel) -> bool:
        """As an agent does: an older run of the central job is a replay (ignored, counted);
        a newer one is joined (hello for it; what this site sent before is not resent)."""
        where = run_compare(self.up_run, m.run)
        if where == OLDER:
            self.up_counters["rejected_run"] += 1
            self.log(f"site {self.site}: ignored a {type(m).__name__} of the central's run "
                     f"{m.run or '(none)'}: the central's run is {self.up_run} (a replay)")
            return False
        if where == NEWER:
            self.up_run, self._partial = m.run, None
            self._hello_up()
        return True

    def _template(self) -> dict[str, torch.Tensor]:
        from fedclip_edge.adapter import AttentionAdapter

        if self._template_state is None:
            self._template_state = AttentionAdapter(self._site_dim()).state_dict()
        return self._template_state

    def _finish(self) -> None:
        """Hand the central's final adapter (if any) and `done` to this site's devices."""
        if self.final_state is not None:
            self._round = self.cfg.rounds + 1
            self._open = None
            self._publish_global(have=())
        self._round = 0
        self._publish_control("done")
        if self.completed:
            super()._write_reports(plot=True)

    def _init_state(self) -> None:
        # the seed is the central's (it came with the global): resume with the one on disk
        if self.cfg.resume and self.store.state_path.is_file():
            try:
                self.cfg.seed = int(json.loads(self.store.state_path.read_text())["seed"])
            except (OSError, ValueError, KeyError, TypeError):
                pass  # the store says what is wrong with the file
        super()._init_state()
        if self.cfg.resume:
            self.downlink.load(self.completed)

    def _wait_for_devices(self) -> None:
        """--wait-clients for this site's own devices, saying every `wait_log_s` how many."""
        deadline = self.clock() + self.cfg.wait_clients_s

        def enough() -> bool:
            return self.roster.active_count >= self.cfg.min_clients

        while not enough() and self.clock() < deadline:
            self._pump(min(deadline, self.clock() + self.wait_log_s), enough)
            if not enough() and self.clock() < deadline:
                note = self._refused_note()
                self.log(
                    f"site {self.site}: waiting for its devices: {self.roster.active_count} of "
                    f"{self.cfg.min_clients} online on this site's broker (job {self.cfg.job}), "
                    f"{deadline - self.clock():.0f}s left of --wait-clients"
                    + (f"; {note}" if note else "")
                )

    def _waiting_for_central(self, quiet_s: float) -> str:
        """What the site waits for upstream, and the usual reason when it never comes."""
        if not self.central_rounds and not self.completed:
            return (
                f"site {self.site}: waiting for the central's global of job {self.cfg.job} "
                f"(nothing for {quiet_s:.0f}s): is the central aggregator running this job, "
                f"and is this site's public key ({self.site}.pub) in the central's "
                "--site-keys? (the central logs 'rejected (unknown_key)' or "
                "'rejected (site_claim)' for it otherwise)"
            )
        return (
            f"site {self.site}: waiting for the central's next global of job {self.cfg.job} "
            f"(round {self.completed} sent; nothing for {quiet_s:.0f}s: the central waits for "
            "its other sites or devices, or its round deadline)"
        )

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, torch.Tensor]:
        """Serve the central job's rounds until it is done; returns its final adapter."""
        self._load_eval()
        self._init_state()
        self.t.subscribe(*self._subscriptions())
        self.t.connect(self.cfg.connect_timeout_s)
        self._epoch_seen = self.t.epoch
        self._publish_control("running")
        self._pump(self.clock() + 0.3, lambda: False)
        self._wait_for_devices()
        self._await_binding()
        self._narrow()
        dim = self._site_dim()
        if self.global_state is None:
            self.global_state = self._template()
        self._start_prevalidation()
        self.up.subscribe(P.global_topic(self.cfg.job), P.control_topic(self.cfg.job))
        self.up.connect(self.cfg.connect_timeout_s)
        self._up_epoch = self.up.epoch
        self._hello_up()
        self.log(
            f"site {self.site}: job {self.cfg.job}, {self.roster.active_count} device(s) online, "
            f"width {dim}; waiting for the central's global"
        )
        last_heard = last_note = self.clock()
        while True:
            msg = self.up.recv(0.05)
            if self.clock() - max(last_heard, last_note) >= self.wait_log_s:
                last_note = self.clock()
                self.log(self._waiting_for_central(last_note - last_heard))
            if self.up.epoch != self._up_epoch:  # reconnected upstream: say hello again
                self._up_epoch = self.up.epoch
                self._hello_up()
            if msg is not None:
                last_heard = self.clock()
                try:
                    over = self._on_central(msg)
                finally:
                    self.up.ack(msg)
                if over:
                    break
            elif self.idle_timeout_s and self.clock() - last_heard > self.idle_timeout_s:
                self._finish()
                raise FedClipError(
                    f"site {self.site}: nothing from the central for {self.idle_timeout_s:g}s"
                )
            # devices' statuses between rounds (joins, leaves)
            self._pump(self.clock() + 0.05, lambda: False)
        self._finish()
        self.up.publish(
            P.status_topic(self.cfg.job, self.site),
            authn.signed_will(self.site, self.cfg.job, self.session, self.cfg.signing_key),
            retain=True,
        ).wait(5)
        if self.final_state is None:
            raise FedClipError(
                f"site {self.site}: the central ended job {self.cfg.job} without a final adapter"
            )
        self.log(
            f"site {self.site}: job {self.cfg.job} done: answered central rounds "
            f"{self.central_rounds}; accepted {self.counters['accepted']} device updates"
        )
        return self.final_state
