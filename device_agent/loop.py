"""The message loop: wait for the global adapter, train locally, publish the update, until the
job ends.

Pure-ish core over a `Transport` and in-memory features, so unit tests drive it with the
in-memory broker. The global adapter is retained; a global re-published for a round already
answered, whose `have` list lacks this device, makes it resend its cached update (the aggregator
restarted or lost it); the aggregator drops duplicates. The round work is `round_work.py`, the
outbox and statuses `outbox.py`.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.runbind import NEWER, OLDER
from fedclip_edge.broker.runbind import compare as run_compare
from fedclip_edge.broker.transport import Received, Transport
from fedclip_edge.data.split import split_indices
from fedclip_edge.device_agent.agent_config import AgentConfig, LocalData
from fedclip_edge.device_agent.codec_state import CodecState
from fedclip_edge.device_agent.global_in import GlobalIn
from fedclip_edge.device_agent.keep import keep_final_models
from fedclip_edge.device_agent.outbox import _Outbox
from fedclip_edge.device_agent.round_work import RoundWork
from fedclip_edge.device_agent.run_guard import RunGuard
from fedclip_edge.device_agent.secagg_device import secagg_for
from fedclip_edge.errors import TransportError
from fedclip_edge.global_codec import state_digest
from fedclip_edge.global_fields import DERIVED
from fedclip_edge.serving.keep import KeptModels
from fedclip_edge.wire import expected_shapes

MAX_PENDING = 64  # messages looked ahead at most (globals are retained: older ones are moot)


class Agent(RunGuard, RoundWork):
    """Wait for the global adapter, train locally, publish the update, until the job ends."""

    def __init__(
        self,
        transport: Transport,
        cfg: AgentConfig,
        data: LocalData,
        *,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.t = transport
        self.cfg = cfg
        self.data = data
        self.log = log
        self.clock = clock
        self.stop = threading.Event()
        self.done = False
        self.rejected: Counter[str] = Counter()  # messages refused, by reason
        self._registry = cfg.aggregator_registry
        self.job_run = ""  # the job run of the newest global/control held (broker/runbind.py)
        self._done_heard = False  # a `done` was this run's first word: its global confirms it
        self.current_round = -1
        self.last_trained = -1
        self.rounds_trained = 0
        self.last_upload_s: float | None = None
        self.final_state: dict[str, torch.Tensor] | None = None
        self.final_global: P.GlobalModel | None = None  # the message final_state came in
        self.kept: KeptModels | None = None  # what the model store got at the job's end
        self._cached: tuple[int, bytes] | None = None  # last update sent (round, payload)
        self._outbox: _Outbox | None = None
        self._last_wire = 0
        self._last_global_key: tuple[str, int, tuple[str, ...], bool] | None = None
        # the global held (a compressed global's base); a dense copy is asked with a hello
        self.globals_in = GlobalIn(
            expected_shapes(AttentionAdapter(data.dim).state_dict()), log=log,
            ask_dense=lambda: self._status("online", hello=True))
        self._epoch_seen = 0
        self._ready_at = clock()
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._split_seed: int | None = None
        self._extract_reported = False
        # accepted messages taken from the transport early, to see what supersedes a round
        self._pending: deque[tuple[P.Control | P.GlobalModel, Received]] = deque()
        self._codec_state: CodecState | None = None  # delta codecs: loaded on first use
        # local DP (round_work._local_dp): noise from an OS-seeded generator made on first use
        self._dp_generator: torch.Generator | None = None
        self.dp_rounds = 0
        self.dp_epsilon: float | None = None
        self.wait_log_s = 30.0  # while nothing arrives: say what this device waits for
        self._secagg = secagg_for(self)  # None unless --secure-aggregation
        n = int(data.labels.shape[0])
        self._sizes = {k: len(v) for k, v in zip(("train", "val", "test"), split_indices(n, 0),
                                                 strict=True)}

    # ------------------------------------------------------------------ messages in
    def _accept(self, msg: Received) -> P.Control | P.GlobalModel | None:
        """Decoded and, when signing is on, verified; None (counted, one line) otherwise."""
        try:
            if self._secagg is not None and self._secagg.takes(msg):
                return None  # a secure-aggregation step, handled on arrival
            m = P.decode_message(msg.payload)
        except P.MessageRejected as exc:
            self.rejected[exc.reason] += 1
            self.log(f"warning: ignored a bad message on {msg.topic}: {exc.message}")
            return None
        if isinstance(m, (P.Control, P.GlobalModel)) and self._registry is not None:
            try:
                authn.verify(m, self._registry, key_id=P.AGGREGATOR_ID)
            except P.MessageRejected as exc:
                self.rejected[exc.reason] += 1
                self.log(f"warning: ignored a {type(m).__name__} on {msg.topic} "
                         f"({exc.reason}): {exc.message}")
                return None
        if isinstance(m, (P.Control, P.GlobalModel)) and m.job == self.cfg.job:
            return m
        return None

    def _on_message(self, msg: Received) -> None:
        m = self._accept(msg)
        if m is not None:
            self._dispatch(m, msg)

    def _dispatch(self, m: P.Control | P.GlobalModel, msg: Received) -> None:
        where = self._in_run(m)
        if where is None:
            return
        if isinstance(m, P.Control):
            if m.state == "done" and self._done_confirmed(m, where):
                self.log(f"job {self.cfg.job} is done (round {m.round}/{m.rounds})")
                self.done = True
        else:
            if not self._done_heard or m.round > m.rounds:  # a done job's round: no work
                self._on_global(m, msg)
            self._confirm_done(m)

    def _pull(self) -> None:
        """Move what has already arrived into `_pending` (bounded), accepted messages only."""
        while len(self._pending) < MAX_PENDING:
            msg = self.t.recv(0)
            if msg is None:
                return
            m = self._accept(msg)
            if m is not None:
                self._pending.append((m, msg))

    def _superseded(self, rnd: int) -> str | None:
        """What already arrived that makes work on round `rnd` pointless, if anything.

        A device that was offline (killed, rebooted, out of coverage) gets its persistent
        session's queue in one burst: the globals of every round it missed, maybe the final
        one and `done`. Training on each in turn would send updates for closed rounds (the
        aggregator refuses them as stale, or has ended and nobody counts them) and spend the
        device's compute and uplink for nothing: only the newest global is worth answering.
        """
        self._pull()
        for m, _ in self._pending:
            where = run_compare(self.job_run, m.run)
            if where == OLDER:
                continue  # ignored when its turn comes
            if where == NEWER:
                return f"run {m.run}'s {type(m).__name__}"
            if isinstance(m, P.Control) and m.state == "done":
                return "the job's done message"
            if isinstance(m, P.GlobalModel) and m.round > rnd:
                return (f"round {m.round}'s global" if m.round <= m.rounds
                        else "the final global")
        return None

    def _on_global(self, g: P.GlobalModel, msg: Received) -> None:
        key = (g.session, g.round, tuple(sorted(g.have)), bool(g.delta))
        repeated = key == self._last_global_key
        self._last_global_key = key
        if self._secagg is not None:
            self._secagg.new_round(g.round)
            if g.round <= g.rounds and g.round == self.last_trained:
                self.current_round = g.round
                self._secagg.again(g)
                return
        if g.round <= g.rounds and g.round == self.last_trained:
            # Already trained this round. Every publication that does not list us means the
            # aggregator lacks our update (lost while the broker restarted, say): send it again,
            # also when the publication repeats an earlier one (the aggregator's retry of a
            # short round is the same publication). The aggregator counts duplicates once.
            self.current_round = g.round
            self._check_outbox()
            if self.cfg.client_id not in g.have and self._cached and self._outbox is None:
                self.log(f"round {g.round}: aggregator lacks my update, sending it again")
                self._send(g.round, self._cached[1])
            return
        if repeated:
            return  # the same publication again (retained redelivery after a reconnect)
        tensors = self.globals_in.rebuild(g)  # dense, or a delta on the global held
        if tensors is None:
            return
        # the exact global held (`state_digest`, as the aggregator's): a log can be checked
        # against the server's committed globals (`bench soak` does)
        how = ("dense" if not g.delta else f"derived from seed {g.seed}"
               if g.delta["codec"] == DERIVED else f"delta on round {g.delta['base_round']}'s")
        self.log(f"round {g.round}: global {state_digest(tensors)} ({how})")
        if g.round > g.rounds:
            self.final_state, self.final_global = tensors, g
            self.log(f"final global adapter received (after round {g.rounds})")
            return
        self.current_round = g.round
        self._check_outbox()
        if g.round < self.last_trained:
            return
        why = self._superseded(g.round)
        if why is not None:
            self.log(f"round {g.round}: skipped, {why} already arrived")
            return
        self._train_and_send(g, tensors, msg)

    def _waiting_for(self) -> str:
        """What this device waits for, and the likely cause when it never comes."""
        refused = ", ".join(f"{r} {n}" for r, n in sorted(self.rejected.items()))
        here = (f"; messages refused here: {refused} (a global that does not verify: is "
                "--aggregator-key the aggregator's public key?)") if refused else ""
        if self.last_trained < 1 and self.current_round < 1:
            return (f"no global of job {self.cfg.job} yet: is the aggregator running this job "
                    "on this broker? It refuses this device (and logs 'rejected (unknown_key)' "
                    f"or 'rejected (bad_signature)') unless {self.cfg.client_id}.pub is in its "
                    f"--device-keys and this device signs with {self.cfg.client_id}.key" + here)
        return (f"the global after round {max(self.last_trained, self.current_round)} of job "
                f"{self.cfg.job} (the aggregator waits for the other devices or its round "
                "deadline; or it stopped: restart it with --resume)" + here)

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Returns the number of rounds trained. Ends on job done, `stop` or idle timeout."""
        self.t.subscribe(P.global_topic(self.cfg.job), P.control_topic(self.cfg.job))
        self.t.connect(self.cfg.connect_timeout_s)
        self.log(f"connected to the broker; waiting for the aggregator's global of job "
                 f"{self.cfg.job}")
        last_heard = last_note = self.clock()
        try:
            while not self.stop.is_set() and not self.done:
                if self.t.epoch != self._epoch_seen:
                    self._epoch_seen = self.t.epoch
                    self._status("online", hello=True)
                    if self._secagg is not None:
                        self._secagg.resend()
                    ob = self._outbox
                    if ob is not None and not ob.delivery.wait(0):
                        self.log(f"round {ob.round}: reconnected, sending the queued update again")
                        self._send(ob.round, ob.payload)
                if self._pending:
                    last_heard = self.clock()
                    self._dispatch(*self._pending.popleft())
                else:
                    msg = self.t.recv(self.cfg.poll_s)
                    if msg is not None:
                        last_heard = self.clock()
                        self._on_message(msg)
                self._check_outbox()
                quiet = self.clock() - last_heard
                if quiet > self.cfg.idle_timeout_s and self._done_heard:
                    self.done = True  # a done nothing contradicted (its global was chunked)
                elif quiet > self.cfg.idle_timeout_s:
                    raise TransportError(
                        f"nothing from the aggregator of job {self.cfg.job} for "
                        f"{self.cfg.idle_timeout_s:g}s; giving up: {self._waiting_for()}"
                    )
                if self.clock() - max(last_heard, last_note) >= self.wait_log_s:
                    last_note = self.clock()
                    self.log(f"waiting (nothing for {quiet:.0f}s): {self._waiting_for()}")
            if self._outbox is not None and not self.done:  # SIGTERM: give the upload a moment
                self._outbox.delivery.wait(2.0)
        finally:
            if self.t.connected:
                try:
                    self._status("offline")
                    time.sleep(0.05)
                except Exception:  # shutting down: best effort
                    pass
            self.t.close()
        if self.done and self.cfg.models is not None:
            self.kept = keep_final_models(self)
        return self.rounds_trained
