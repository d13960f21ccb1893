"""The aggregator: rounds over a transport, with validation, atomic round state and resume.

The round itself is the round engine's (`fedclip_edge.rounds`: the strategy, the plug-ins
between collect and aggregate, evaluation), which `simulate` and `bench fedavg` drive too; this
module is its MQTT fleet: publish the global adapter (retained), collect updates until every
active device answered or the deadline passed (retrying a short round), and commit each round
to disk before starting the next.

Message handling (what makes a status or an update acceptable) lives in `ingest.py`, the
validation thread's decoding in `prevalidate.py`, who takes part in `roster.py`, the run folder
(commit order, resume) in `store.py`, the reports in `report.py`, the command in `cli.py`.
`--resume` redoes the round after the last committed one: devices train deterministically
from the same global adapter and seeds, so the result is the one an uninterrupted run gets.
Instrumentation (benchmarks, tests) subclasses `AggregatorHooks` instead of overriding private
methods.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import report as M
from fedclip_edge.broker.authn import signature_holds
from fedclip_edge.broker.global_down import GlobalDownlink, can_derive
from fedclip_edge.broker.hierarchy import SiteRegistry
from fedclip_edge.broker.ingest import (  # noqa: F401  (re-exported: their old home)
    MAX_DIM,
    MAX_SAMPLES,
    MessageIntake,
    device_metrics,
)
from fedclip_edge.broker.prevalidate import predecode
from fedclip_edge.broker.roster import Device, Roster
from fedclip_edge.broker.runbind import is_run_id, new_run_id
from fedclip_edge.broker.secagg_round import DEFAULT_CLIP, SecAggCollect, check_config
from fedclip_edge.broker.store import RunStore, state_sha  # noqa: F401  (re-exported)
from fedclip_edge.broker.transport import Received, Transport
from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION
from fedclip_edge.errors import ConfigError, FedClipError, TransportError
from fedclip_edge.features import load_feature_cache
from fedclip_edge.privacy.central import PrivacyBudgetSpent
from fedclip_edge.rounds import OpenRound, RoundEngine, RoundPlugin
from fedclip_edge.signing import KeyRegistry
from fedclip_edge.strategy import Strategy, check_round_size, make_strategy
from fedclip_edge.train import accuracy
from fedclip_edge.wire import DEFAULT_MAX_FRAME_BYTES, encode_frame

POLICIES = ("retry", "stop")
BIND_GRACE_S = 10.0  # at most this long for hellos of this run after min-clients are online


@dataclass
class AggregatorConfig:
    job: str
    rounds: int
    out: Path
    min_clients: int = 1
    round_timeout_s: float = 60.0
    seed: int = 0
    weighting: str = "uniform"
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields sent to devices
    dim: int | None = None  # feature width; else from eval features or the first hello
    on_short: str = "retry"  # fewer than min_clients by the deadline: retry the round or stop
    max_retries: int = 2
    wait_clients_s: float = 60.0  # before round 1: wait this long for min_clients devices
    upload_grace_s: float = 1.0  # after the round closes: wait for devices' upload times
    max_update_bytes: int = DEFAULT_MAX_FRAME_BYTES
    eval_features: Path | None = None
    eval_domain: str | None = None
    resume: bool = False
    connect_timeout_s: float = 30.0
    # who may take part (device public keys) and the aggregator's own signing key; running
    # without them must be asked for explicitly (insecure_unsigned)
    registry: KeyRegistry | None = None
    # the sites this central accepts (their keys, each site's largest weight); a hello saying
    # "site" from anyone else is refused (`site_claim`)
    sites: SiteRegistry | None = None
    signing_key: Ed25519PrivateKey | None = None
    insecure_unsigned: bool = False
    # how updates are combined: a name from fedclip_edge.strategy.STRATEGIES and its options
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    # the job run (broker/runbind.py); None: a fresh one at job start (--resume: the stored
    # one). Given by tests and benchmarks whose simulated devices sign for it in advance.
    run: str | None = None
    # the aggregator learns only each round's sum (broker/secagg_round.py, docs/privacy.md)
    secure_aggregation: bool = False
    secagg_clip: float = DEFAULT_CLIP
    # the global down (broker/global_down.py): fp32 dense; a codec sends the change since the
    # last round, with a dense keyframe every `keyframe_every` rounds (0: round 1 only)
    global_codec: str = "fp32"
    keyframe_every: int = 0
    global_topk_fraction: float = DEFAULT_TOPK_FRACTION

    def make_strategy(self) -> Strategy:
        return make_strategy(self.strategy, weighting=self.weighting, **self.strategy_options)

    def __post_init__(self) -> None:
        # a typo in a name or option, or a trim that drops nothing, fails before anything starts
        if self.secure_aggregation:  # first: its refusal says why the strategy cannot run
            check_config(self.strategy, self.min_clients, self.secagg_clip, self.sites is not None)
        check_round_size(self.make_strategy(), self.min_clients)
        if self.sites is not None and self.registry is not None:
            both = sorted(set(self.sites.keys.ids()) & set(self.registry.ids()))
            if both:
                raise ConfigError(f"{', '.join(both)}: in both --device-keys and --site-keys (a "
                                  "key speaks as a device or as a site, not both)")
        P.check_id(self.job, "job")
        if self.run is not None and not is_run_id(self.run):
            raise ConfigError(f"run id {self.run!r} is not one (runbind.new_run_id makes them)")
        if self.rounds < 1 or self.min_clients < 1 or self.round_timeout_s <= 0:
            raise ConfigError("rounds and min-clients must be >= 1 and round-timeout > 0")
        if self.on_short not in POLICIES:
            raise ConfigError(f"on-short must be one of {', '.join(POLICIES)}")
        if (self.eval_features is None) != (self.eval_domain is None):
            raise ConfigError("give --eval-features and --eval-domain together")
        if not self.insecure_unsigned and (self.registry is None or self.signing_key is None):
            raise ConfigError(
                "updates and globals are signed: give --device-keys (who may take part) and "
                "--signing-key (the aggregator's key; `fedclip-edge keys new`), or run with "
                "--insecure-unsigned"
            )

    @property
    def signed(self) -> bool:
        return not self.insecure_unsigned

    def keys_of(self, client: str) -> KeyRegistry | None:
        """The registry `client` signs under: the sites' for a registered site."""
        if self.sites is not None and client in self.sites:
            return self.sites.keys
        return self.registry


class AggregatorHooks:
    """Points where a benchmark or a test observes a run; every method is a no-op here.

    Called on the aggregator's own thread, so a hook must be quick.
    """

    def round_started(self, agg: Aggregator, rnd: int) -> None:
        """Before the round's global is published."""

    def round_closed(self, agg: Aggregator, rnd: int) -> None:
        """Every active device answered (or enough did by the deadline)."""

    def update_handled(self, agg: Aggregator, seconds: float, accepted: bool) -> None:
        """One update message validated (and added when accepted)."""

    def message_rejected(self, agg: Aggregator, reason: str) -> None:
        """A message refused (and counted) for `reason`; update_handled follows for updates."""

    def before_commit(self, agg: Aggregator, rnd: int, wall_s: float) -> None:
        """The round's aggregate is computed; nothing of it is on disk yet."""

    def after_commit(self, agg: Aggregator, rnd: int, commit_s: float, reports_s: float) -> None:
        """state.json names this round; reports are written."""


class Aggregator(MessageIntake):
    """One federated job over a transport. `run()` returns the final global adapter.

    It is the round engine's fleet over MQTT (`publish`, `collect`); `plugins` are the round
    engine's (between collect and aggregate, every update passes them)."""

    def __init__(
        self,
        transport: Transport,
        cfg: AggregatorConfig,
        *,
        log: Callable[[str], None] = print,
        console: Any = None,
        clock: Callable[[], float] = time.monotonic,
        hooks: AggregatorHooks | None = None,
        plugins: tuple[RoundPlugin, ...] = (),
    ) -> None:
        self.t = transport
        self.cfg = cfg
        self.log = log
        self.console = console
        self.clock = clock
        self.hooks = hooks or AggregatorHooks()
        self.store = RunStore(cfg.out)
        self.out = self.store.out
        self.downlink = GlobalDownlink(cfg.global_codec, job=cfg.job, rounds=cfg.rounds,
                                       keyframe_every=cfg.keyframe_every,
                                       topk_fraction=cfg.global_topk_fraction)
        if self.downlink.active:  # last: the global it makes is the one devices rebuild
            plugins = (*plugins, self.downlink.plugin)
        self.engine = RoundEngine(cfg.make_strategy(), evaluate=self._evaluate, plugins=plugins)
        self.roster = Roster()
        self.counters: Counter[str] = Counter()
        self.completed = 0
        self.global_state: dict[str, torch.Tensor] | None = None
        self.session = uuid.uuid4().hex[:12]
        # the job run every signed message binds (broker/runbind.py): --resume keeps it
        self.run_id = ((self.store.stored_run() if cfg.resume else "") or cfg.run
                       or new_run_id())
        self.hellos_unbound = 0  # hellos naming no run yet (a device's first): nobody online
        self.binding: set[str] = set()  # devices whose hello for this run should follow
        self._eval: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.heldout_zero_shot: float | None = None  # CLIP without adapter, held-out domain
        self._global_payload = b""
        self._epoch_seen = 0
        self.history: list[dict[str, Any]] = []
        # per round, set in publish()
        self._round = 0
        self._open: OpenRound | None = None  # the round engine's open (or last) round
        self._uploads: dict[tuple[str, int], float] = {}
        self._published_at = 0.0
        self._attempts = 0  # retries of the round
        self._wall = 0.0  # the round's wall time, publish to the end of collect
        self._warned_over_sites = False
        # client -> (reason, message) of its refused hello/status: the job's error names them
        self.refused: dict[str, tuple[str, str]] = {}
        self.resumed = False  # state.json was loaded: devices' resends are then expected
        # the round (its number and global) the validation thread may decode delta frames
        # against: replaced as one object (never mutated), so the worker reads a consistent pair
        self._decode_ctx: OpenRound | None = None
        self._secagg = SecAggCollect(self, cfg.secagg_clip) if cfg.secure_aggregation else None

    @property
    def strategy(self) -> Strategy:
        """The round engine's strategy (a site adopts the central's weighting by setting it)."""
        return self.engine.strategy

    @strategy.setter
    def strategy(self, strategy: Strategy) -> None:
        self.engine.strategy = strategy

    @property
    def devices(self) -> dict[str, Device]:
        return self.roster.devices

    @property
    def active(self) -> frozenset[str]:
        return self.roster.active

    # ------------------------------------------------------------------ setup
    def _load_eval(self) -> None:
        if self.cfg.eval_features is None:
            return
        fs = load_feature_cache(Path(self.cfg.eval_features), [str(self.cfg.eval_domain)])
        d = fs.domains[str(self.cfg.eval_domain)]
        self._eval = (d.features, d.labels, fs.text_features)
        self.heldout_zero_shot = accuracy(None, *self._eval)
        if self.cfg.dim is None:
            self.cfg.dim = fs.dim

    def _init_state(self) -> None:
        resumed = self.store.open(job=self.cfg.job, seed=self.cfg.seed, resume=self.cfg.resume)
        if resumed is None:
            if self.cfg.resume:
                self.log(f"no {self.store.state_path} yet: job {self.cfg.job} starts at round 1")
            return
        self.resumed = True
        self.global_state = resumed.global_state
        self.completed = resumed.completed
        self.counters.update(resumed.counters)
        self.roster = Roster.from_dict(resumed.devices)
        self.history = resumed.history
        self.cfg.dim = resumed.dim
        self.engine.load_plugin_state(resumed.plugins)
        if not resumed.run:  # a state.json from before runs: this run goes on under a new id
            self.log(f"{self.store.state_path} names no run: job {self.cfg.job} goes on as run "
                     f"{self.run_id} (devices sign for it after its first control)")
        self.log(
            f"resuming job {self.cfg.job} after round {self.completed} "
            f"(global adapter {Path(resumed.global_file).name})"
        )

    def _await_binding(self) -> None:
        """Devices whose retained hello predates this run say hello again for it once they see
        its control (one round trip): wait for them briefly, so round 1 has them as before
        runs; bounded (BIND_GRACE_S), a device that never does joins a later round."""
        self._pump(self.clock() + min(BIND_GRACE_S, self.cfg.wait_clients_s),
                   lambda: not self.binding)

    def _make_initial(self) -> None:
        if self.global_state is not None:
            return
        if self.cfg.dim is None:
            dims = Counter(d.dim for d in self.devices.values() if d.active and d.dim > 0)
            if not dims:
                raise TransportError(self._refused_note() or (
                    f"no device said hello within --wait-clients {self.cfg.wait_clients_s:g}s "
                    f"(is an agent running for job {self.cfg.job} on this broker?); --dim "
                    "starts the job without one"))
            # the width most devices report; a device with another one cannot take part (one
            # odd hello must not stop the job from starting)
            self.cfg.dim = max(dims, key=lambda d: (dims[d], -d))
            for dev in list(self.devices.values()):
                if dev.active and dev.dim != self.cfg.dim:
                    self.roster.set_state(dev.client, "offline")
                    self._reject("dim", P.status_topic(self.cfg.job, dev.client),
                                 f"device {dev.client} reports feature width {dev.dim}, the "
                                 f"job's is {self.cfg.dim} (most devices')")
        torch.manual_seed(self.cfg.seed)  # as the in-process simulation does
        self.global_state = {
            k: v.detach().clone() for k, v in AttentionAdapter(self.cfg.dim).state_dict().items()
        }

    # ------------------------------------------------------------------ publishing
    def _publish_global(self, have: tuple[str, ...] | None = None, dense: bool = False) -> None:
        assert self.global_state is not None
        rnd = self._round
        delta = self.downlink.delta_for(rnd, dense=dense, derive=can_derive(self.devices.values()))
        frame = delta.frame if delta is not None else encode_frame(
            self.global_state, job=self.cfg.job, round=rnd, client=P.AGGREGATOR_ID)
        msg = P.GlobalModel(
            self.cfg.job,
            rnd,
            frame,
            seed=self.cfg.seed,
            train=self.cfg.train,
            have=tuple(sorted(self._answered)) if have is None else have,
            session=self.session,
            rounds=self.cfg.rounds,
            weighting=self.cfg.weighting,
            run=self.run_id,
            delta=delta.fields() if delta is not None else {},
        )
        if self.cfg.signing_key is not None:
            msg = authn.sign(msg, self.cfg.signing_key)
        self._global_payload = msg.encode()
        self.t.publish(P.global_topic(self.cfg.job), self._global_payload, retain=True)
        self.downlink.count(rnd, len(self._global_payload), delta=delta)

    def _publish_control(self, state: str) -> None:
        ctl = P.Control(self.cfg.job, state, self.completed, self.cfg.rounds, self.session,
                        run=self.run_id)
        if self.cfg.signing_key is not None:
            ctl = authn.sign(ctl, self.cfg.signing_key)
        self.t.publish(P.control_topic(self.cfg.job), ctl.encode(), retain=True).wait(5)

    def _pump(self, until: float, done: Callable[[], bool]) -> None:
        """Handle messages until `done()` or the monotonic deadline `until` (bounded)."""
        while not done():
            left = until - self.clock()
            if left <= 0:
                return
            msg = self.t.recv(min(left, 0.25))
            self._penalized()
            if self.t.epoch != self._epoch_seen:  # reconnected: the broker may have lost all
                self._epoch_seen = self.t.epoch
                self.log(f"connected to the broker (connection {self.t.epoch})")
                if self._round:
                    self._publish_control("running")
                    self._publish_global()
                    if self._secagg is not None:
                        self._secagg.republish()
            if msg is not None:
                try:
                    self._handle(msg)
                finally:
                    self.t.ack(msg)  # validated and added (or counted as rejected): PUBACK now

    # ------------------------------------------------------------------ rounds (the fleet)
    def _round_done(self) -> bool:
        return len(self._answered) >= self.cfg.min_clients and self.roster.all_active_answered

    def publish(self, rnd: OpenRound) -> None:
        """The round engine's publish: the round's global goes out, retained."""
        self._round = rnd.number
        self._open = self._decode_ctx = rnd
        self.roster.start_round()
        self._uploads = {}
        self.hooks.round_started(self, rnd.number)
        self._published_at = self.clock()
        self._publish_global(have=())

    def collect(self, rnd: OpenRound) -> bool:
        """The round engine's collect: handle messages (accepted updates go to `rnd`) until
        every active device answered or the deadline, retrying a short round; then wait the
        upload grace. False when too few updates came (policy `stop` or retries spent)."""
        if self._secagg is not None:
            return self._secagg.collect(rnd)
        attempts = self._attempts = 0
        while True:
            self._pump(self.clock() + self.cfg.round_timeout_s, self._round_done)
            if len(self._answered) >= self.cfg.min_clients:
                break
            attempts = self._attempts = attempts + 1
            self.log(
                f"round {rnd.number}: {len(self._answered)} of the {self.cfg.min_clients} "
                f"updates needed arrived within {self.cfg.round_timeout_s:g}s"
            )
            if self.cfg.on_short == "stop" or attempts > self.cfg.max_retries:
                return False
            self.log(
                f"round {rnd.number}: retry {attempts}/{self.cfg.max_retries}, same global adapter"
            )
            self._publish_global()
        self.hooks.round_closed(self, rnd.number)
        answered = set(self._answered)
        self._pump(
            self.clock() + self.cfg.upload_grace_s,
            lambda: all((c, rnd.number) in self._uploads for c in answered),
        )
        self._wall = self.clock() - self._published_at
        return True

    def _run_round(self, rnd: int) -> bool:
        assert self.global_state is not None
        result = self.engine.run_round(rnd, self.global_state, self)
        if result is None:
            return False
        self.hooks.before_commit(self, rnd, self._wall)
        t1 = time.perf_counter()
        self._commit(rnd, result.state, self._wall, self._attempts,
                     heldout=result.evaluation.get("heldout_acc"))
        commit_s = time.perf_counter() - t1
        # the plot redraws every client's history: every 5 rounds and at the end, not each round
        self._write_reports(plot=rnd % 5 == 0 or rnd >= self.cfg.rounds)
        self.hooks.after_commit(self, rnd, commit_s, time.perf_counter() - t1 - commit_s)
        return True

    def _evaluate(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The round engine's evaluation: the held-out accuracy when --eval-features is given."""
        if self._eval is None:
            return {"heldout_acc": None}
        adapter = AttentionAdapter(int(self.cfg.dim or 0))
        adapter.load_state_dict(state)
        return {"heldout_acc": accuracy(adapter, *self._eval)}

    def _commit(
        self,
        rnd: int,
        state: dict[str, torch.Tensor],
        wall: float,
        retries: int,
        heldout: float | None = None,
    ) -> None:
        rows = []
        for c, rec in sorted(self._answered.items()):
            rec = dict(rec)
            rec["upload_s"] = self._uploads.get((c, rnd), rec.get("upload_s"))
            rec["round_wall_s"] = wall
            rows.append(rec)
        summary_row = M.round_record(
            rnd,
            rows,
            active=sorted(self.active),
            wall=wall,
            retries=retries,
            heldout=heldout,
            counters=self.counters,
        )
        if self.downlink.active:
            summary_row.update(self.downlink.round_fields(rnd))
        self.history.append(
            {
                k: summary_row[k]
                for k in ("round", "clients", "mean_loss", "heldout_acc", "round_wall_s")
            }
        )
        self.store.commit(
            rnd,
            state,
            [*rows, summary_row],
            {
                "job": self.cfg.job,
                "run": self.run_id,
                "seed": self.cfg.seed,
                "dim": self.cfg.dim,
                "rounds": self.cfg.rounds,
                "train": self.cfg.train,
                "weighting": self.cfg.weighting,
                "strategy": self.strategy.describe(),
                "devices": self.roster.to_dict(),
                "counters": dict(self.counters),
                "history": self.history,
                # the round engine's plug-ins (an accountant, a residual): --resume continues them
                **({"plugins": self.engine.plugin_state()} if self.engine.plugins else {}),
            },
        )
        self.global_state = state
        self.completed = rnd
        # plug-ins' words on the round (central DP's epsilon) end its line
        notes = [n() for p in self.engine.plugins if (n := getattr(p, "note", None))]
        self.log(" | ".join([M.round_line(summary_row, self.cfg.rounds), *notes]))
        if self.console is not None:
            self.console.print(M.round_table(rnd, rows))

    def _write_reports(self, plot: bool = True) -> None:
        M.write_reports(
            self.out,
            {
                "job": self.cfg.job,
                "completed_round": self.completed,
                "rounds": self.cfg.rounds,
                "counters": dict(self.counters),
                "eval_domain": self.cfg.eval_domain,
                "heldout_zero_shot": self.heldout_zero_shot,
                # plug-ins' blocks (central DP's `privacy`)
                **{k: v for p in self.engine.plugins if (r := getattr(p, "report", None))
                   for k, v in r().items()},
            },
            draw=plot,
            log=self.log,
        )

    def _predecode(self, msg: Received) -> tuple[Any, Any] | None:
        """On the validation thread: `prevalidate.predecode` against the open round."""
        return predecode(
            msg, self._decode_ctx, self.cfg.max_update_bytes,
            lambda up: (up.run == self.run_id or not self.cfg.signed)
            and signature_holds(up, self.cfg.keys_of(up.client), self.cfg.signed),
        )

    def _start_prevalidation(self) -> None:
        """With a prevalidating transport, updates are decoded on its worker thread."""
        set_decoder = getattr(self.t, "set_decoder", None)
        if set_decoder is not None:
            set_decoder(self._predecode)

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, torch.Tensor]:
        """The whole job; raises FedClipError when it stops short (policy `stop` or retries)."""
        self._load_eval()
        self._init_state()
        self.t.subscribe(*self._subscriptions())
        self.t.connect(self.cfg.connect_timeout_s)
        self._epoch_seen = self.t.epoch
        if self.completed < self.cfg.rounds:
            self._publish_control("running")
            self.log(f"job {self.cfg.job}: run {self.run_id} (devices sign for it; --resume "
                     "keeps it)")
            self.log(
                f"connected to the broker; job {self.cfg.job}: waiting up to "
                f"{self.cfg.wait_clients_s:g}s for {self.cfg.min_clients} device(s)"
            )
        # devices' retained statuses arrive first; then wait for enough of them (bounded)
        self._pump(self.clock() + 0.3, lambda: False)
        self._pump(
            self.clock() + self.cfg.wait_clients_s,
            lambda: self.roster.active_count >= self.cfg.min_clients,
        )
        self._await_binding()
        self._narrow()
        self._make_initial()
        self.downlink.set_initial(self.global_state, seed=self.cfg.seed, dim=self.cfg.dim,
                                  resumed=self.resumed)
        self._start_prevalidation()
        self.log(
            f"job {self.cfg.job}: {self.roster.active_count} device(s) online "
            f"({', '.join(sorted(self.active)) or 'none'}), rounds "
            f"{self.completed + 1}..{self.cfg.rounds}, min clients {self.cfg.min_clients}"
        )
        for rnd in range(self.completed + 1, self.cfg.rounds + 1):
            try:
                ran = self._run_round(rnd)
            except PrivacyBudgetSpent:  # central DP: the job is over, every round committed
                self._round = 0
                self._publish_control("done")
                raise
            if not ran:
                self._round = 0
                self._publish_control("done")
                note = self._refused_note()
                raise FedClipError(
                    f"stopped at round {rnd}: fewer than {self.cfg.min_clients} updates "
                    f"(policy {self.cfg.on_short}); state kept, re-run with --resume"
                    + (f"; {note}" if note else "")
                )
        # the final adapter stays retained (round rounds+1: nothing left to train)
        self._round = self.cfg.rounds + 1
        self._open = None
        self._publish_global(have=())  # before "done": devices keep the final adapter
        self._publish_control("done")
        self._round = 0
        assert self.global_state is not None
        for line in M.final_table(
            M.read_metrics(self.out / "metrics.jsonl"),
            heldout_name=self.cfg.eval_domain,
            heldout_zero_shot=self.heldout_zero_shot,
        ):
            self.log(line)
        self.log(
            f"job {self.cfg.job} done: {self.completed} rounds; accepted "
            f"{self.counters['accepted']} updates, rejected "
            f"{sum(v for k, v in self.counters.items() if k.startswith('rejected_'))}; "
            f"global adapter {self.out / 'global.safetensors'}"
        )
        return self.global_state
