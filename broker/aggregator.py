"""The aggregator: rounds over a transport, with validation, atomic round state and resume.

A strategy owns aggregation (`FedAvg`'s streaming `RunningMean`), a transport owns messages;
this module owns the round: publish the global adapter (retained), collect updates until every
active device answered or the deadline passed, validate each one, aggregate when at least
`min_clients` arrived, and commit the round to disk before starting the next.

Who takes part lives in `roster.py`, the run folder (commit order, resume) in `store.py`, the
reports in `report.py`, the command in `cli.py`. `--resume` redoes the round after the last
committed one: devices train deterministically from the same global adapter and seeds, so the
result is the one an uninterrupted run gets. Instrumentation (benchmarks, tests) subclasses
`AggregatorHooks` instead of overriding private methods.
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
from fedclip_edge.broker.hierarchy import SITE_BACKEND, read_site_weight
from fedclip_edge.broker.roster import Device, Roster
from fedclip_edge.broker.store import RunStore, state_sha  # noqa: F401  (re-exported)
from fedclip_edge.broker.transport import Received, Transport
from fedclip_edge.errors import ConfigError, FedClipError, TransportError
from fedclip_edge.features import load_feature_cache
from fedclip_edge.signing import KeyRegistry
from fedclip_edge.strategy import Strategy, make_strategy, over_sites_note
from fedclip_edge.train import accuracy
from fedclip_edge.wire import DEFAULT_MAX_FRAME_BYTES, FrameRejected, decode_update, encode_frame

POLICIES = ("retry", "stop")
# A device's sample count weighs its update (samples weighting): bounded so that one claim
# cannot outweigh a fleet by orders of magnitude beyond any real dataset, nor overflow a float.
MAX_SAMPLES = 10**9
# What a device's metrics may carry into metrics.jsonl: finite numbers within this bound, short
# strings; everything else is dropped, so no device value can break a commit or a report.
_MAX_METRIC = 1e15
_TEXT_METRICS = frozenset({"backend", "update_codec", "update_dtype", "site_weighting"})


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


# Widest feature a device may report (CLIP ViT-bigG is 1280): bounds the adapter the aggregator
# allocates from a hello, 2*(d*d+d) floats.
MAX_DIM = 8192


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
    signing_key: Ed25519PrivateKey | None = None
    insecure_unsigned: bool = False
    # how updates are combined: a name from fedclip_edge.strategy.STRATEGIES and its options
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)

    def make_strategy(self) -> Strategy:
        return make_strategy(self.strategy, weighting=self.weighting, **self.strategy_options)

    def __post_init__(self) -> None:
        self.make_strategy()  # a typo in a name or option fails before anything starts
        P.check_id(self.job, "job")
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


class Aggregator:
    """One federated job over a transport. `run()` returns the final global adapter."""

    def __init__(
        self,
        transport: Transport,
        cfg: AggregatorConfig,
        *,
        log: Callable[[str], None] = print,
        console: Any = None,
        clock: Callable[[], float] = time.monotonic,
        hooks: AggregatorHooks | None = None,
    ) -> None:
        self.t = transport
        self.cfg = cfg
        self.log = log
        self.console = console
        self.clock = clock
        self.hooks = hooks or AggregatorHooks()
        self.store = RunStore(cfg.out)
        self.out = self.store.out
        self.strategy = cfg.make_strategy()
        self.roster = Roster()
        self.counters: Counter[str] = Counter()
        self.completed = 0
        self.global_state: dict[str, torch.Tensor] | None = None
        self.session = uuid.uuid4().hex[:12]
        self._eval: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.heldout_zero_shot: float | None = None  # CLIP without adapter, held-out domain
        self._global_payload = b""
        self._epoch_seen = 0
        self.history: list[dict[str, Any]] = []
        # per round, reset in _run_round
        self._round = 0
        self._acc: Any = None
        self._answered: dict[str, dict[str, Any]] = {}
        self._uploads: dict[tuple[str, int], float] = {}
        self._published_at = 0.0
        self._warned_over_sites = False
        # client -> (reason, message) of its refused hello/status: the job's error names them
        self.refused: dict[str, tuple[str, str]] = {}
        self.resumed = False  # state.json was loaded: devices' resends are then expected
        # (round, its global): what the validation thread may decode delta frames against.
        # Replaced as one tuple (never mutated), so the worker reads a consistent pair.
        self._decode_ctx: tuple[int, dict[str, torch.Tensor]] | None = None

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
        self.log(
            f"resuming job {self.cfg.job} after round {self.completed} "
            f"(global adapter {Path(resumed.global_file).name})"
        )

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

    # ------------------------------------------------------------------ messages
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
            assert self.cfg.registry is not None
            authn.verify(st, self.cfg.registry, job=self.cfg.job)  # admitted only if registered
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
            # a chunked global cannot be retained: send it again to a (re)joining device
            if (
                self._round
                and len(self._global_payload) > self.t.max_payload
                and st.round < self._round
            ):
                self._publish_global()
        self.roster.set_state(client, st.state)
        if st.state == "uploaded" and st.upload_s is not None:
            self._uploads[(client, st.round)] = st.upload_s

    def _predecode(self, msg: Received) -> tuple[Any, Any] | None:
        """On the transport's validation thread (`prevalidate.py`): the pure part of
        `_on_update`, (update or its exception, frame or its exception or None).

        A frame is decoded here only against the global of the round it names (delta codecs
        add to it); an update for another round gets frame None and is decided, and decoded
        if need be, on the main loop."""
        if "/update/" not in msg.topic:
            return None
        try:
            up: Any = P.decode_message(msg.payload, self.cfg.max_update_bytes + 1024 * 1024)
        except P.MessageRejected as exc:
            return exc, None
        if not isinstance(up, P.Update):
            return up, None
        ctx = self._decode_ctx  # one read: the round and its global belong together
        if ctx is None or up.round != ctx[0]:
            return up, None
        try:
            frame: Any = decode_update(up.frame, ctx[1], max_bytes=self.cfg.max_update_bytes)
        except FrameRejected as exc:
            frame = exc
        return up, (ctx[0], frame)

    def _on_update(self, client: str, msg: Received) -> None:
        pre = getattr(msg, "decoded", None)  # set by a prevalidating transport
        if pre is not None and isinstance(pre[0], Exception):
            raise pre[0]
        up = pre[0] if pre is not None else P.decode_message(
            msg.payload, self.cfg.max_update_bytes + 1024 * 1024
        )
        if not isinstance(up, P.Update):
            raise P.MessageRejected("type", "an update topic carries only updates")
        if up.job != self.cfg.job:
            raise P.MessageRejected("job", f"update for job {up.job!r}")
        if up.client != client:
            raise P.MessageRejected("client_mismatch", f"update of {up.client!r} on {client!r}")
        if client not in self.roster:
            raise P.MessageRejected("unknown_client", f"no hello from {client!r}")
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
            assert self.cfg.registry is not None
            authn.verify(up, self.cfg.registry)
        assert self.global_state is not None
        try:
            # the worker's result only when it decoded against this round's global
            if pre is not None and pre[1] is not None and pre[1][0] == self._round:
                if isinstance(pre[1][1], Exception):
                    raise pre[1][1]
                frame = pre[1][1]
            else:
                frame = decode_update(
                    up.frame, self.global_state, max_bytes=self.cfg.max_update_bytes
                )
        except FrameRejected as exc:
            raise P.MessageRejected(f"frame_{exc.reason}", exc.message) from None
        if (frame.job, frame.round, frame.client) != (up.job, up.round, up.client):
            raise P.MessageRejected("fields", "frame job/round/client differ from the envelope")
        if not 0 <= up.samples <= MAX_SAMPLES:
            raise P.MessageRejected("fields", f"update claims {up.samples} samples")
        rec = device_metrics(up.metrics)
        dev = self.roster.get(client)
        # a site's update is the mean of its devices: it weighs what they would together
        weight = (
            read_site_weight(up.metrics, up.samples, self.cfg.weighting)
            if dev is not None and dev.backend == SITE_BACKEND
            else None
        )
        if weight is None:
            self._acc.add(frame.tensors, up.samples, self.global_state)
        else:
            self._acc.add(frame.tensors, up.samples, self.global_state, weight=weight)
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
        self._answered[client] = rec
        self.roster.answered(client)

    # ------------------------------------------------------------------ publishing
    def _publish_global(self, have: tuple[str, ...] | None = None) -> None:
        assert self.global_state is not None
        rnd = self._round
        frame = encode_frame(self.global_state, job=self.cfg.job, round=rnd, client=P.AGGREGATOR_ID)
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
        )
        if self.cfg.signing_key is not None:
            msg = authn.sign(msg, self.cfg.signing_key)
        self._global_payload = msg.encode()
        self.t.publish(P.global_topic(self.cfg.job), self._global_payload, retain=True)

    def _publish_control(self, state: str) -> None:
        ctl = P.Control(self.cfg.job, state, self.completed, self.cfg.rounds, self.session)
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
            if self.t.epoch != self._epoch_seen:  # reconnected: the broker may have lost all
                self._epoch_seen = self.t.epoch
                self.log(f"connected to the broker (connection {self.t.epoch})")
                if self._round:
                    self._publish_control("running")
                    self._publish_global()
            if msg is not None:
                try:
                    self._handle(msg)
                finally:
                    self.t.ack(msg)  # validated and added (or counted as rejected): PUBACK now

    # ------------------------------------------------------------------ rounds
    def _round_done(self) -> bool:
        return len(self._answered) >= self.cfg.min_clients and self.roster.all_active_answered

    def _run_round(self, rnd: int) -> bool:
        self._round = rnd
        assert self.global_state is not None
        self._decode_ctx = (rnd, self.global_state)
        self._acc = self.strategy.start_round()
        self._answered = {}
        self.roster.start_round()
        self._uploads = {}
        self.hooks.round_started(self, rnd)
        t0 = self._published_at = self.clock()
        self._publish_global(have=())
        attempts = 0
        while True:
            self._pump(self.clock() + self.cfg.round_timeout_s, self._round_done)
            if len(self._answered) >= self.cfg.min_clients:
                break
            attempts += 1
            self.log(
                f"round {rnd}: {len(self._answered)} of the {self.cfg.min_clients} updates "
                f"needed arrived within {self.cfg.round_timeout_s:g}s"
            )
            if self.cfg.on_short == "stop" or attempts > self.cfg.max_retries:
                return False
            self.log(f"round {rnd}: retry {attempts}/{self.cfg.max_retries}, same global adapter")
            self._publish_global()
        self.hooks.round_closed(self, rnd)
        answered = set(self._answered)
        self._pump(
            self.clock() + self.cfg.upload_grace_s,
            lambda: all((c, rnd) in self._uploads for c in answered),
        )
        wall = self.clock() - t0
        assert self._acc is not None
        new_state = self._acc.result()
        self.hooks.before_commit(self, rnd, wall)
        t1 = time.perf_counter()
        self._commit(rnd, new_state, wall, attempts)
        commit_s = time.perf_counter() - t1
        # the plot redraws every client's history: every 5 rounds and at the end, not each round
        self._write_reports(plot=rnd % 5 == 0 or rnd >= self.cfg.rounds)
        self.hooks.after_commit(self, rnd, commit_s, time.perf_counter() - t1 - commit_s)
        return True

    def _evaluate(self, state: dict[str, torch.Tensor]) -> float | None:
        if self._eval is None:
            return None
        adapter = AttentionAdapter(int(self.cfg.dim or 0))
        adapter.load_state_dict(state)
        return accuracy(adapter, *self._eval)

    def _commit(self, rnd: int, state: dict[str, torch.Tensor], wall: float, retries: int) -> None:
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
            heldout=self._evaluate(state),
            counters=self.counters,
        )
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
                "seed": self.cfg.seed,
                "dim": self.cfg.dim,
                "rounds": self.cfg.rounds,
                "train": self.cfg.train,
                "weighting": self.cfg.weighting,
                "strategy": self.strategy.describe(),
                "devices": self.roster.to_dict(),
                "counters": dict(self.counters),
                "history": self.history,
            },
        )
        self.global_state = state
        self.completed = rnd
        self.log(M.round_line(summary_row, self.cfg.rounds))
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
            },
            draw=plot,
            log=self.log,
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
        self.t.subscribe(P.update_filter(self.cfg.job), P.status_filter(self.cfg.job))
        self.t.connect(self.cfg.connect_timeout_s)
        self._epoch_seen = self.t.epoch
        if self.completed < self.cfg.rounds:
            self._publish_control("running")
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
        self._make_initial()
        self._start_prevalidation()
        self.log(
            f"job {self.cfg.job}: {self.roster.active_count} device(s) online "
            f"({', '.join(sorted(self.active)) or 'none'}), rounds "
            f"{self.completed + 1}..{self.cfg.rounds}, min clients {self.cfg.min_clients}"
        )
        for rnd in range(self.completed + 1, self.cfg.rounds + 1):
            if not self._run_round(rnd):
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
        self._answered = {}
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
