"""`fedclip-edge bench soak`: a federation under a seeded chaos schedule, then a reconciliation.

Why: the fault tests each catch one fault at one moment; a fleet meets them all, in any order,
for hours. This runs N device agents as processes over a private mosquitto (persistence on, as
in production) with the aggregator as a process (`fedclip_edge.cli aggregate`), and while the
rounds go on a schedule drawn from `--seed` kills agents with -9 and restarts them, restarts
mosquitto, kills the aggregator with -9 and resumes it (`--resume`), and injects garbage and
replays (an earlier update re-sent by a plain paho client) on the devices' update topics.
Foreign-signed updates (`foreign_signed`: an update for the open round in a device's name,
signed with a key the aggregator does not know) are injected once the aggregator verifies
signatures, and skipped with the reason printed otherwise. Everything is signed as in a
deployment (artifact, device messages, globals; keys under OUT/keys).

A recorder (a paho client with a persistent session) keeps every payload the broker carried on
the job's update topics. At the end the run is reconciled from what each side wrote:
- every update a device reports as sent (its `round N | ...` line) is accepted once (a client
  row of metrics.jsonl) or rejected with a counted reason (the aggregator's `rejected (...)`
  lines, whose counts the final state.json's counters must match); none is lost;
- every committed round's global equals the uniform mean of the recorded updates of the
  clients metrics.jsonl lists for it, recomputed here in float64;
- the final global equals the last committed round's, no child process is left running and no
  process of the run's folder (agents, aggregator, mosquitto) survives.
The report is `OUT/soak.json` and one line of figures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclip_edge.benchmarks.soak_crossrun import cross_run_payloads
from fedclip_edge.benchmarks.soak_globals import check_codec_config, codec_args, snapshot_state
from fedclip_edge.benchmarks.soak_mqtt import Injector, Recorder
from fedclip_edge.benchmarks.soak_reconcile import (
    FAULT_KINDS,
    _update_round,
    made_by_chaos,
    reconcile,
)
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.mosquitto import Mosquitto, free_port, run_mosquitto
from fedclip_edge.broker.procs import stop_process
from fedclip_edge.errors import ConfigError, FedClipError

FLOOD_MESSAGES = 3000  # per flood fault: well over a sender's burst (500)
FLOOD_ID = "dev-flood"
# faults per committed round, by kind (at least one of each whatever the length of the run)
FAULT_RATES = {
    "kill_agent": 0.06, "restart_broker": 0.03, "kill_aggregator": 0.03, "garbage": 0.06,
    "replay": 0.06, "foreign_signed": 0.03, "site_claim": 0.03, "flood": 0.02, "cross_run": 0.03,
}
# the domains of the synthetic data, shared round-robin by the agents
DOMAINS = ("art_painting", "cartoon", "photo", "sketch")
PY = sys.executable


@dataclass
class SoakConfig:
    """One soak run. `rounds` and `agents` are the federation; `seed` draws the schedule."""

    out: Path
    agents: int = 8
    rounds: int = 100
    seed: int = 0
    per_class: int = 10
    min_clients: int | None = None  # default: half the agents
    round_timeout_s: float = 60.0
    broker_down_s: float = 1.0
    kinds: tuple[str, ...] = FAULT_KINDS
    timeout_s: float = 3600.0  # the whole run
    global_codec: str = "fp32"  # the aggregator's --global-codec (soak_globals.py checks it)
    keyframe_every: int = 0
    global_topk_fraction: float | None = None
    update_codec: str = "fp32"  # the agents' --update-codec
    secure_aggregation: bool = False  # benchmarks/soak_secure.py: its faults and reconciliation

    def __post_init__(self) -> None:
        check_codec_config(self)
        if self.agents < 2 or self.rounds < 2:
            raise ConfigError("a soak needs at least 2 agents and 2 rounds")
        if self.secure_aggregation and (self.agents < 3 or (self.min_clients or 3) < 3
                                        or {self.global_codec, self.update_codec} != {"fp32"}):
            raise ConfigError("a secure soak needs 3 agents, --min-clients >= 3 (the sum of two "
                              "updates tells each device the other's) and fp32 codecs")
        unknown = sorted(set(self.kinds) - set(FAULT_KINDS))
        if unknown:
            raise ConfigError(f"unknown fault kind(s) {', '.join(unknown)}; known: "
                              f"{', '.join(FAULT_KINDS)}")
        if self.min_clients is None:
            self.min_clients = max(3 if self.secure_aggregation else 1, self.agents // 2)
        if not 1 <= self.min_clients <= self.agents:
            raise ConfigError("--min-clients must be between 1 and the number of agents")


@dataclass
class Fault:
    """One planned fault: fired once round `after_round` is committed."""

    after_round: int
    kind: str
    target: str = ""
    fired_at_round: int | None = None  # completed round seen when it was injected
    at_s: float | None = None
    outcome: str = ""  # "injected", or why not


def plan_faults(cfg: SoakConfig) -> list[Fault]:
    """The seeded schedule: per kind, round(rate * rounds) faults (at least one), each after a
    round drawn uniformly from 1..rounds-1; agents to kill drawn the same way."""
    rng = random.Random(cfg.seed)
    faults = []
    for kind in cfg.kinds:
        n = max(1, round(FAULT_RATES[kind] * cfg.rounds))
        for _ in range(n):
            target = f"dev-{rng.randrange(cfg.agents)}" if kind in ("kill_agent", "garbage") else ""
            faults.append(Fault(rng.randint(1, cfg.rounds - 1), kind, target))
    faults.sort(key=lambda f: (f.after_round, FAULT_KINDS.index(f.kind)))
    return faults


def signing_hook_reason() -> str | None:
    """Why `foreign_signed` cannot run yet (None when it can): the aggregator must verify
    signatures on updates. Checked by name so the soak follows the library without an edit."""
    import fedclip_edge.broker.aggregator as agg_mod

    src = Path(agg_mod.__file__).read_text()
    if not re.search(r"\b(signing|signature|verify_message)", src):
        return "the aggregator does not verify update signatures yet (no signing in " \
               "broker/aggregator.py)"
    if not any("sig" in name for name in getattr(P.Update, "__dataclass_fields__", {})):
        return "protocol.Update carries no signature field yet"
    return None


# ---------------------------------------------------------------------------------- processes


class Children:
    """The run's child processes, each with a log file per start; all reaped at exit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.all: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logs: dict[str, list[Path]] = defaultdict(list)
        self.killed: set[Path] = set()  # logs of incarnations this run killed with -9
        self.committed_at_kill: dict[Path, int] = {}  # their last committed round

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        n = len(self.logs[name]) + 1
        path = self.folder / f"{name}.{n}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL)
        self.logs[name].append(path)
        self.running[name] = proc
        self.all.append((name, proc))
        return proc

    def kill(self, name: str) -> None:
        """kill -9, then reap (the log of this incarnation is marked as killed)."""
        proc = self.running.pop(name)
        proc.kill()
        proc.wait(30)
        self.killed.add(self.logs[name][-1])

    def note_committed(self, name: str, completed: int) -> None:
        """The round the killed incarnation of `name` had committed (state.json read after its
        death, before its successor starts): its log may lack that round's line."""
        self.committed_at_kill[self.logs[name][-1]] = completed

    def stop_all(self) -> None:
        for _, proc in self.all:
            stop_process(proc, timeout=10)

    def unreaped(self) -> list[str]:
        return [f"{n} (pid {p.pid})" for n, p in self.all if p.returncode is None]


# ---------------------------------------------------------------------------------- the run


class Soak:
    """Prepare, run under chaos, reconcile. `run()` returns the report (also OUT/soak.json)."""

    def __init__(self, cfg: SoakConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.out).resolve()
        self.job = f"soak{cfg.seed}"
        self.agg_out = self.out / "aggregator"
        self.clients = [f"dev-{i}" for i in range(cfg.agents)]
        self.procs = Children(self.out / "logs")
        self.broker: Mosquitto | None = None
        self._broker_stack: contextlib.ExitStack | None = None
        self.port = 0
        self.brokers_started = 0
        self.faults = plan_faults(cfg)
        self.t0 = time.monotonic()
        self.injected: list[dict[str, Any]] = []  # what the injector published

    # ----------------------------------------------------------- preparation
    def _prepare(self) -> None:
        """Synthetic data, the exported artifact and every domain's feature cache, once."""
        from fedclip_edge.device_agent.agent import load_local_features
        from fedclip_edge.signing import new_keypair

        data, art, keys = self.out / "data", self.out / "artifact", self.out / "keys"
        # signed as a deployment is: the exporter signs the artifact, each device its messages,
        # the aggregator its globals; `devices/` is the registry of who may take part
        for key_id in ["aggregator", "exporter", "foreign", FLOOD_ID, *self.clients]:
            if not (keys / f"{key_id}.key").is_file():
                new_keypair(keys, key_id, overwrite=True)
        (keys / "devices").mkdir(exist_ok=True)
        # the flood's id is registered (a key, no agent runs for it): an unregistered id's flood
        # is not even routed to the aggregator (issue 22); a registered one's meets its rate
        # limit and then its penalty (unsubscribed a while: broker/penalty.py)
        for c in [*self.clients, FLOOD_ID]:
            (keys / "devices" / f"{c}.pub").write_bytes((keys / f"{c}.pub").read_bytes())
        if not (data / ".done").is_file():
            _run_step(["data", "synth", "--out", str(data), "--per-class",
                       str(self.cfg.per_class)])
            (data / ".done").write_text("")
        if not (art / "manifest.json").is_file():
            # random weights: the soak tests delivery and bookkeeping, not accuracy, and needs
            # no pretrained checkpoint (building one costs minutes of CPU)
            _run_step(["export", "--out", str(art), "--classes", str(data), "--pretrained",
                       "none", "--sign-key", str(keys / "exporter.key")])
        for d in sorted({self._domain(c) for c in self.clients}):
            load_local_features(data, art, backend="onnxruntime", domain=d,
                                cache=self.out / "cache" / d, log=lambda line: None)

    def _domain(self, client: str) -> str:
        return DOMAINS[int(client.split("-")[1]) % len(DOMAINS)]

    def _agent_cmd(self, client: str) -> list[str]:
        d = self._domain(client)
        return [PY, "-m", "fedclip_edge.device_agent.cli", "--broker", self.url, "--job",
                self.job, "--client-id", client, "--data", str(self.out / "data"), "--domain",
                d, "--artifacts", str(self.out / "artifact"), "--backend", "onnxruntime",
                "--cache", str(self.out / "cache" / d), "--idle-timeout", "300",
                "--connect-timeout", "60", "--key", str(self.out / "keys" / f"{client}.key"),
                "--aggregator-key", str(self.out / "keys" / "aggregator.pub"),
                "--artifact-key", str(self.out / "keys" / "exporter.pub"),
                *codec_args(self.cfg)[1]]

    def _agg_cmd(self, resume: bool) -> list[str]:
        return [PY, "-m", "fedclip_edge.cli", "aggregate", "--broker", self.url, "--job",
                self.job, "--rounds", str(self.cfg.rounds), "--min-clients",
                str(self.cfg.min_clients), "--round-timeout", str(self.cfg.round_timeout_s),
                "--out", str(self.agg_out), "--preset", "learning", "--seed",
                str(self.cfg.seed), "--wait-clients", "120", "--connect-timeout", "60",
                "--max-retries", "5", "--device-keys", str(self.out / "keys" / "devices"),
                "--signing-key", str(self.out / "keys" / "aggregator.key"),
                # plain FedAvg: the reconciliation recomputes each global as the exact mean
                "--strategy", "fedavg", *codec_args(self.cfg)[0],
                *(("--resume",) if resume else ())]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    # ----------------------------------------------------------- broker
    def _start_broker(self) -> None:
        stack = contextlib.ExitStack()
        self.broker = stack.enter_context(run_mosquitto(
            self.out / "broker" / f"run{self.brokers_started + 1}", port=self.port,
            persistence_dir=self.out / "broker" / "db", timeout=30,
        ))
        self._broker_stack = stack
        self.brokers_started += 1

    def _stop_broker(self) -> None:
        if self._broker_stack is not None:
            self._broker_stack.close()  # SIGTERM: mosquitto saves its database, then exits
            self._broker_stack = None

    # ----------------------------------------------------------- faults
    def _completed(self) -> int:
        try:
            return int(json.loads((self.agg_out / "state.json").read_text())["completed_round"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def from_devices(self, recorder: Recorder) -> list[tuple[float, str, bytes]]:
        """What the recorder saw, less what the chaos client made: a fault built on an earlier
        forgery (a replay of the cross-run update) would be refused for that forgery's reason,
        not its own."""
        made = made_by_chaos(self.injected)
        return [m for m in recorder.snapshot() if hashlib.sha256(m[2]).hexdigest() not in made]

    def _fire(self, f: Fault, rng: random.Random, recorder: Recorder,
              injector: Injector) -> None:
        f.fired_at_round = self._completed()
        f.at_s = round(time.monotonic() - self.t0, 2)
        if f.kind == "kill_agent":
            target = f.target if f.target in self.procs.running else rng.choice(
                sorted(c for c in self.clients if c in self.procs.running))
            f.target = target
            self.procs.kill(target)
            self.procs.start(target, self._agent_cmd(target))
            f.outcome = "injected"
        elif f.kind == "kill_aggregator":
            self.procs.kill("aggregator")
            self.procs.note_committed("aggregator", self._completed())
            snapshot_state(self.agg_out, self.procs.logs["aggregator"][-1])
            self.procs.start("aggregator", self._agg_cmd(resume=True))
            f.outcome = "injected"
        elif f.kind == "restart_broker":
            self._stop_broker()
            time.sleep(self.cfg.broker_down_s)  # the outage itself, not a wait for an event
            self._start_broker()
            f.outcome = "injected"
        elif f.kind == "garbage":
            topic = P.update_topic(self.job, f.target)
            payload = rng.choice([b"FCMQ\x01", b"", b"{"]) + rng.randbytes(rng.randint(1, 4096))
            ok = injector.publish(topic, payload)
            self.injected.append({"kind": "garbage", "topic": topic,
                                  "sha256": hashlib.sha256(payload).hexdigest()})
            f.outcome = "injected" if ok else "not acknowledged by the broker"
        elif f.kind == "replay":
            old = [m for m in self.from_devices(recorder) if _update_round(m[2]) not in (None, 0)
                   and _update_round(m[2]) < f.fired_at_round]  # type: ignore[operator]
            if not old:
                f.outcome = "skipped: no update of a committed round recorded yet"
                return
            _, topic, payload = rng.choice(old)
            f.target = topic.rsplit("/", 1)[-1]
            ok = injector.publish(topic, payload)
            self.injected.append({"kind": "replay", "topic": topic,
                                  "round": _update_round(payload)})
            f.outcome = "injected" if ok else "not acknowledged by the broker"
        elif f.kind == "site_claim":
            payload = self._site_claim(f, recorder)
            if payload is None:
                f.outcome = "skipped: no update recorded yet to claim a site weight with"
            else:
                topic = P.update_topic(self.job, f.target)
                ok = injector.publish(topic, payload)
                self.injected.append({"kind": "site_claim", "topic": topic,
                                      "round": f.fired_at_round + 1,
                                      "sha256": hashlib.sha256(payload).hexdigest()})
                f.outcome = "injected" if ok else "not acknowledged by the broker"
        elif f.kind == "cross_run":  # soak_crossrun.py: another run's signed update and done
            made = cross_run_payloads(self.out / "keys", self.job, f.fired_at_round + 1,
                                      [m[2] for m in self.from_devices(recorder)])
            if made is None:
                f.outcome = "skipped: no update recorded yet to take a run from"
                return
            f.target, payload, done = made
            topic = P.update_topic(self.job, f.target)
            ok = injector.publish(topic, payload) and injector.publish(
                P.control_topic(self.job), done)
            self.injected.append({"kind": "cross_run", "topic": topic,
                                  "round": f.fired_at_round + 1,
                                  "sha256": hashlib.sha256(payload).hexdigest()})
            f.outcome = "injected" if ok else "not acknowledged by the broker"
        elif f.kind == "flood":
            # garbage as fast as the chaos client can publish, on the topic of a registered id
            # that runs no agent: it must cost that id (rate limit, penalty), not the rounds
            f.target = FLOOD_ID
            topic = P.update_topic(self.job, f.target)
            sent = injector.flood(topic, FLOOD_MESSAGES, rng)
            self.injected.append({"kind": "flood", "topic": topic, "messages": sent})
            f.outcome = "injected" if sent else "not acknowledged by the broker"
        elif f.kind == "foreign_signed":
            reason = signing_hook_reason()
            if reason is not None:
                f.outcome = "skipped: " + reason
            else:
                payload = self._foreign_signed(f, rng, recorder)
                if payload is None:
                    f.outcome = "skipped: no update recorded yet to forge from"
                else:
                    topic = P.update_topic(self.job, f.target)
                    ok = injector.publish(topic, payload)
                    self.injected.append({"kind": "foreign_signed", "topic": topic,
                                          "round": f.fired_at_round + 1,
                                          "sha256": hashlib.sha256(payload).hexdigest()})
                    f.outcome = "injected" if ok else "not acknowledged by the broker"
        self.log(f"fault after round {f.fired_at_round}: {f.kind} {f.target} -> {f.outcome}")

    def _site_claim(self, f: Fault, recorder: Recorder) -> bytes | None:
        """An update for the open round in a device's name, signed with that device's own key,
        claiming a site weight of 1e15 (the red team's takeover): refused as `site_claim` (or
        duplicate/stale if the device or the round got there first)."""
        import dataclasses

        from fedclip_edge.broker import authn
        from fedclip_edge.signing import load_private_key

        old = [m for m in self.from_devices(recorder) if _update_round(m[2])]
        if not old:
            return None
        _, _, payload = old[-1]
        up = P.decode_message(payload)
        assert isinstance(up, P.Update)
        f.target = up.client
        claim = dataclasses.replace(
            up, round=(f.fired_at_round or 0) + 1, sig="",
            metrics={**up.metrics, "site_weight": 1e15, "site_devices": 10**15,
                     "site_weighting": "uniform"})
        key = load_private_key(self.out / "keys" / f"{up.client}.key")
        return authn.sign(claim, key).encode()

    def _foreign_signed(self, f: Fault, rng: random.Random, recorder: Recorder) -> bytes | None:
        """An update for the open round in a device's name, carrying a recorded (older) frame
        and signed with a key the aggregator does not know: it must be refused (as
        bad_signature, or duplicate/stale if the device or the round got there first)."""
        import dataclasses

        from fedclip_edge.broker import authn
        from fedclip_edge.signing import load_private_key

        old = [m for m in self.from_devices(recorder) if _update_round(m[2])]
        if not old:
            return None
        _, topic, payload = rng.choice(old)
        up = P.decode_message(payload)
        assert isinstance(up, P.Update)
        f.target = up.client
        forged = dataclasses.replace(up, round=(f.fired_at_round or 0) + 1, sig="")
        return authn.sign(forged, load_private_key(self.out / "keys" / "foreign.key")).encode()

    # ----------------------------------------------------------- main
    def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        if (self.agg_out / "state.json").exists():
            raise ConfigError(f"{self.out} already holds a soak run: choose another --out")
        self.log(f"preparing data, artifact and features in {self.out}")
        self._prepare()
        self.port = free_port()
        recorder: Recorder | None = None
        injector: Injector | None = None
        finished = False
        error = ""
        rng = random.Random(self.cfg.seed + 1)
        try:
            self._start_broker()
            recorder = Recorder(self.port, self.job)
            injector = Injector(self.port)
            for c in self.clients:
                self.procs.start(c, self._agent_cmd(c))
            self.procs.start("aggregator", self._agg_cmd(resume=False))
            self.log(f"{self.cfg.agents} agents and the aggregator started on {self.url}; "
                     f"{self.cfg.rounds} rounds, {len(self.faults)} faults planned")
            pending = list(self.faults)
            deadline = self.t0 + self.cfg.timeout_s
            while True:
                agg = self.procs.running["aggregator"]
                if agg.poll() is not None:
                    if agg.returncode == 0:
                        finished = True
                    else:
                        error = f"the aggregator exited with {agg.returncode}"
                    break
                if time.monotonic() > deadline:
                    error = f"the run did not finish within {self.cfg.timeout_s:g}s"
                    break
                for c in self.clients:  # an agent that died on its own is a finding
                    p = self.procs.running.get(c)
                    if p is not None and p.poll() is not None and p.returncode != 0:
                        error = f"agent {c} exited with {p.returncode}"
                if error:
                    break
                done = self._completed()
                with self._held(bool(pending) and pending[0].after_round <= done < self.cfg.rounds):
                    while pending and pending[0].after_round <= done and done < self.cfg.rounds:
                        self._fire(pending.pop(0), rng, recorder, injector)
                time.sleep(0.05)
            for f in pending:
                f.outcome = "not injected: the run ended first"
            if finished:
                end = time.monotonic() + 120
                for c in self.clients:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.procs.running[c].wait(max(0.1, end - time.monotonic()))
                slow = [c for c in self.clients if self.procs.running[c].poll() is None]
                if slow:
                    error = f"agents still running 120 s after the job ended: {slow}"
        finally:
            self.procs.stop_all()
            if injector is not None:
                injector.close()
            # the recorder last: what the broker still queued for it has been delivered
            if recorder is not None:
                time.sleep(0.5)
                recorder.close()
            self._stop_broker()
        wall = time.monotonic() - self.t0
        report = self._reconcile(recorder.snapshot() if recorder else [], finished, error, wall)
        (self.out / "soak.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return report

    def _held(self, due: bool) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the secure soak holds the aggregator meanwhile

    def _reconcile(self, recorded: list[tuple[float, str, bytes]], finished: bool, error: str,
                   wall: float) -> dict[str, Any]:
        return reconcile(self, recorded, finished, error, wall)


def _run_step(args: list[str], timeout: float = 1800) -> None:
    """One `fedclip-edge` step of the preparation; its failure as one error line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        res = subprocess.run([PY, "-m", "fedclip_edge.cli", *args], env=env, timeout=timeout,
                             capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise FedClipError(f"soak preparation `{args[0]}` took over {timeout:g}s") from None
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise FedClipError(f"soak preparation `{' '.join(args[:2])}` failed: {tail}")


def run_soak(cfg: SoakConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole soak; the report is also written to OUT/soak.json (secure: soak_secure.py)."""
    if cfg.secure_aggregation:
        raise ConfigError("a secure soak runs with benchmarks/soak_secure.py run_secure_soak")
    return Soak(cfg, log).run()
