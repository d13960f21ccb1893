"""The aggregator: rounds over a transport, with validation, atomic round state and resume.

A strategy owns aggregation (`FedAvg`'s streaming `RunningMean`), a transport owns messages;
this module owns the round: publish the global adapter (retained), collect updates until every
active device answered or the deadline passed, validate each one, aggregate when at least
`min_clients` arrived, and commit the round to disk before starting the next.

Commit order, so a crash at any point loses nothing and counts nothing twice:
1. `OUT/rounds/global_rNNNN.safetensors` (atomic), 2. the round's lines appended to
`OUT/metrics.jsonl` (fsync), 3. `OUT/state.json` (atomic; the commit point), then the
convenience copies `OUT/global.safetensors`, `OUT/summary.json` and `OUT/latency.png`.
`--resume` reads state.json, drops metric lines of rounds after it, and redoes the next round:
devices train deterministically from the same global adapter and seeds, so the result is the
one an uninterrupted run gets.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from safetensors.torch import load_file, save_file

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import report as M
from fedclip_edge.broker.transport import Received, Transport
from fedclip_edge.errors import ConfigError, FedClipError, TransportError
from fedclip_edge.strategy import FedAvg
from fedclip_edge.wire import DEFAULT_MAX_FRAME_BYTES, FrameRejected, decode_frame, encode_frame
from fedclip_edge.wire import expected_shapes as frame_shapes

STATE_SCHEMA = "fedclip-edge/aggregator-state/v1"
POLICIES = ("retry", "stop")


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

    def __post_init__(self) -> None:
        P.check_id(self.job, "job")
        if self.rounds < 1 or self.min_clients < 1 or self.round_timeout_s <= 0:
            raise ConfigError("rounds and min-clients must be >= 1 and round-timeout > 0")
        if self.on_short not in POLICIES:
            raise ConfigError(f"on-short must be one of {', '.join(POLICIES)}")
        if (self.eval_features is None) != (self.eval_domain is None):
            raise ConfigError("give --eval-features and --eval-domain together")


@dataclass
class Device:
    client: str
    state: str = "online"
    samples: dict[str, int] = field(default_factory=dict)
    backend: str = ""
    dim: int = 0
    versions: dict[str, str] = field(default_factory=dict)


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_json(path: Path, data: Any) -> None:
    _atomic_bytes(path, (json.dumps(M._clean(data), indent=2, allow_nan=False) + "\n").encode())


def _save_adapter(path: Path, state: dict[str, torch.Tensor], rnd: int) -> str:
    """Atomic safetensors write; returns the file's sha256 (recorded in state.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"round": str(rnd)})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
        digest = hashlib.sha256(fh.read()).hexdigest()
    os.replace(tmp, path)
    return digest


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
    ) -> None:
        self.t = transport
        self.cfg = cfg
        self.log = log
        self.console = console
        self.clock = clock
        self.out = Path(cfg.out)
        self.strategy = FedAvg(cfg.weighting)
        self.devices: dict[str, Device] = {}
        self.counters: Counter[str] = Counter()
        self.completed = 0
        self.global_state: dict[str, torch.Tensor] | None = None
        self.session = uuid.uuid4().hex[:12]
        self._eval: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._global_payload = b""
        self._epoch_seen = 0
        self.history: list[dict[str, Any]] = []
        # per round, reset in _run_round
        self._round = 0
        self._acc: Any = None
        self._answered: dict[str, dict[str, Any]] = {}
        self._uploads: dict[tuple[str, int], float] = {}
        self._published_at = 0.0

    # ------------------------------------------------------------------ setup
    def _load_eval(self) -> None:
        if self.cfg.eval_features is None:
            return
        from fedclip_edge.features import load_feature_cache

        fs = load_feature_cache(Path(self.cfg.eval_features), [str(self.cfg.eval_domain)])
        d = fs.domains[str(self.cfg.eval_domain)]
        self._eval = (d.features, d.labels, fs.text_features)
        if self.cfg.dim is None:
            self.cfg.dim = fs.dim

    def _init_state(self) -> None:
        state_path = self.out / "state.json"
        if self.cfg.resume and state_path.is_file():
            st = json.loads(state_path.read_text())
            if st.get("schema") != STATE_SCHEMA or st.get("job") != self.cfg.job:
                raise ConfigError(f"{state_path} belongs to another job or format; cannot resume")
            if st.get("seed") != self.cfg.seed:
                raise ConfigError(
                    f"{state_path} was made with seed {st.get('seed')}, not "
                    f"{self.cfg.seed}: resuming would not reproduce the run"
                )
            gfile = self.out / st["global_file"]
            data = gfile.read_bytes()
            if hashlib.sha256(data).hexdigest() != st["global_sha256"]:
                raise ConfigError(f"{gfile} does not match its hash in state.json")
            self.global_state = load_file(str(gfile))
            self.completed = int(st["completed_round"])
            self.counters.update(st.get("counters", {}))
            self.devices = {c: Device(**d) for c, d in st.get("devices", {}).items()}
            self.history = list(st.get("history", []))
            self.cfg.dim = int(st["dim"])
            M.truncate_metrics(self.out / "metrics.jsonl", self.completed)
            self.log(
                f"resuming job {self.cfg.job} after round {self.completed} "
                f"(global adapter {gfile.name})"
            )
            return
        if self.cfg.resume:
            self.log(f"no {state_path} yet: starting job {self.cfg.job} from round 1")
        elif state_path.exists():
            raise ConfigError(
                f"{self.out} already holds a run (state.json): pass --resume "
                "to continue it or choose another --out"
            )
        (self.out / "metrics.jsonl").unlink(missing_ok=True)

    def _make_initial(self) -> None:
        if self.global_state is not None:
            return
        if self.cfg.dim is None:
            dims = {d.dim for d in self.devices.values() if d.dim > 0}
            if not dims:
                raise TransportError("no device reported its feature width: pass --dim")
            if len(dims) > 1:
                raise ConfigError(f"devices report different feature widths {sorted(dims)}")
            self.cfg.dim = dims.pop()
        torch.manual_seed(self.cfg.seed)  # as the in-process simulation does
        self.global_state = {
            k: v.detach().clone() for k, v in AttentionAdapter(self.cfg.dim).state_dict().items()
        }

    # ------------------------------------------------------------------ messages
    def _reject(self, reason: str, topic: str, message: str) -> None:
        self.counters[f"rejected_{reason}"] += 1
        self.log(f"rejected ({reason}) on {topic}: {message}")

    @property
    def active(self) -> set[str]:
        return {c for c, d in self.devices.items() if d.state != "offline"}

    def _handle(self, msg: Received) -> None:
        try:
            job, kind, client = P.parse_topic(msg.topic)
            if job != self.cfg.job:
                raise P.MessageRejected("job", f"topic is for job {job!r}")
            if kind == "status":
                self._on_status(client or "", msg)
            elif kind == "update":
                self._on_update(client or "", msg)
        except P.MessageRejected as exc:
            self._reject(exc.reason, msg.topic, exc.message)

    def _on_status(self, client: str, msg: Received) -> None:
        st = P.decode_message(msg.payload)
        if not isinstance(st, P.Status):
            raise P.MessageRejected("type", "a status topic carries only hello/status")
        if st.client != client:
            raise P.MessageRejected("client_mismatch", f"status of {st.client!r} on {client!r}")
        dev = self.devices.get(client)
        if st.state == "offline":
            if dev is not None and dev.state != "offline":
                dev.state = "offline"
                self.log(f"device {client} is offline")
            return
        if dev is None or dev.state == "offline" or st.hello:
            if dev is None or dev.state == "offline":
                self.log(
                    f"device {client} online: {sum(st.samples.values())} samples "
                    f"{st.samples}, {st.backend}"
                )
            self.devices[client] = dev = Device(
                client, st.state, dict(st.samples), st.backend, st.dim, dict(st.versions)
            )
            # a chunked global cannot be retained: send it again to a (re)joining device
            if (
                self._round
                and len(self._global_payload) > self.t.max_payload
                and st.round < self._round
            ):
                self._publish_global()
        dev.state = st.state
        if st.state == "uploaded" and st.upload_s is not None:
            self._uploads[(client, st.round)] = st.upload_s

    def _on_update(self, client: str, msg: Received) -> None:
        up = P.decode_message(msg.payload, self.cfg.max_update_bytes + 1024 * 1024)
        if not isinstance(up, P.Update):
            raise P.MessageRejected("type", "an update topic carries only updates")
        if up.job != self.cfg.job:
            raise P.MessageRejected("job", f"update for job {up.job!r}")
        if up.client != client:
            raise P.MessageRejected("client_mismatch", f"update of {up.client!r} on {client!r}")
        if client not in self.devices:
            raise P.MessageRejected("unknown_client", f"no hello from {client!r}")
        if up.round < self._round:
            raise P.MessageRejected("stale", f"update for round {up.round}, now {self._round}")
        if up.round > self._round:
            raise P.MessageRejected("future", f"update for round {up.round}, now {self._round}")
        if client in self._answered:
            raise P.MessageRejected("duplicate", f"second update of {client} for round {up.round}")
        assert self.global_state is not None
        try:
            frame = decode_frame(
                up.frame,
                expected=frame_shapes(self.global_state),
                max_bytes=self.cfg.max_update_bytes,
            )
        except FrameRejected as exc:
            raise P.MessageRejected(f"frame_{exc.reason}", exc.message) from None
        if (frame.job, frame.round, frame.client) != (up.job, up.round, up.client):
            raise P.MessageRejected("fields", "frame job/round/client differ from the envelope")
        self._acc.add(frame.tensors, up.samples)
        latency = self.clock() - self._published_at
        self.counters["accepted"] += 1
        rec = {k: v for k, v in up.metrics.items() if isinstance(k, str)}
        rec.update(
            {
                "kind": "client",
                "round": up.round,
                "client": client,
                "samples": up.samples,
                "bytes_up": msg.wire_bytes,
                "update_latency_s": latency,
                "update_dtype": frame.dtype,
            }
        )
        rec.setdefault("bytes_down", len(self._global_payload))
        self._answered[client] = rec

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
        )
        self._global_payload = msg.encode()
        self.t.publish(P.global_topic(self.cfg.job), self._global_payload, retain=True)

    def _publish_control(self, state: str) -> None:
        ctl = P.Control(self.cfg.job, state, self.completed, self.cfg.rounds)
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
                self._handle(msg)

    # ------------------------------------------------------------------ rounds
    def _round_done(self) -> bool:
        n = len(self._answered)
        return n >= self.cfg.min_clients and self.active <= set(self._answered)

    def _run_round(self, rnd: int) -> bool:
        self._round = rnd
        self._acc = self.strategy.start_round()
        self._answered = {}
        self._uploads = {}
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
        answered = set(self._answered)
        self._pump(
            self.clock() + self.cfg.upload_grace_s,
            lambda: all((c, rnd) in self._uploads for c in answered),
        )
        wall = self.clock() - t0
        assert self._acc is not None
        new_state = self._acc.result()
        self._commit(rnd, new_state, wall, attempts)
        return True

    def _evaluate(self, state: dict[str, torch.Tensor]) -> float | None:
        if self._eval is None:
            return None
        from fedclip_edge.train import accuracy

        adapter = AttentionAdapter(int(self.cfg.dim or 0))
        adapter.load_state_dict(state)
        return accuracy(adapter, *self._eval)

    def _commit(self, rnd: int, state: dict[str, torch.Tensor], wall: float, retries: int) -> None:
        heldout = self._evaluate(state)
        rows = []
        for c, rec in sorted(self._answered.items()):
            rec = dict(rec)
            rec["upload_s"] = self._uploads.get((c, rnd), rec.get("upload_s"))
            rec["round_wall_s"] = wall
            rows.append(rec)
        losses = [r["loss"] for r in rows if M._num(r.get("loss")) is not None]
        lat = [r["update_latency_s"] for r in rows]
        pers = [r["local_test_acc"] for r in rows if M._num(r.get("local_test_acc")) is not None]
        glob = [r["global_test_acc"] for r in rows if M._num(r.get("global_test_acc")) is not None]
        summary_row = {
            "kind": "round",
            "round": rnd,
            "clients": sorted(self._answered),
            "active": sorted(self.active),
            "round_wall_s": wall,
            "retries": retries,
            "mean_loss": sum(losses) / len(losses) if losses else None,
            "personalization_acc": sum(pers) / len(pers) if pers else None,
            "global_test_acc": sum(glob) / len(glob) if glob else None,
            "heldout_acc": heldout,
            "latency_p50_s": M.percentile(lat, 50),
            "latency_max_s": max(lat) if lat else None,
            "bytes_down": sum(int(r.get("bytes_down") or 0) for r in rows),
            "bytes_up": sum(int(r.get("bytes_up") or 0) for r in rows),
            "rejected": {k: v for k, v in self.counters.items() if k.startswith("rejected_")},
        }
        rel = f"rounds/global_r{rnd:04d}.safetensors"
        digest = _save_adapter(self.out / rel, state, rnd)
        M.append_metrics(self.out / "metrics.jsonl", [*rows, summary_row])
        self.global_state = state
        self.completed = rnd
        self.history.append(
            {
                k: summary_row[k]
                for k in ("round", "clients", "mean_loss", "heldout_acc", "round_wall_s")
            }
        )
        _atomic_json(
            self.out / "state.json",
            {
                "schema": STATE_SCHEMA,
                "job": self.cfg.job,
                "seed": self.cfg.seed,
                "dim": self.cfg.dim,
                "rounds": self.cfg.rounds,
                "completed_round": rnd,
                "global_file": rel,
                "global_sha256": digest,
                "train": self.cfg.train,
                "weighting": self.cfg.weighting,
                "devices": {c: d.__dict__ for c, d in self.devices.items()},
                "counters": dict(self.counters),
                "history": self.history,
            },
        )
        _save_adapter(self.out / "global.safetensors", state, rnd)
        # the plot redraws every client's history: every 5 rounds and at the end, not each round
        self._write_reports(plot=rnd % 5 == 0 or rnd >= self.cfg.rounds)
        self._print_round(summary_row, rows)

    def _write_reports(self, plot: bool = True) -> None:
        records = M.read_metrics(self.out / "metrics.jsonl")
        summary = M.summarize(records)
        summary.update(
            {
                "job": self.cfg.job,
                "completed_round": self.completed,
                "rounds": self.cfg.rounds,
                "counters": dict(self.counters),
            }
        )
        _atomic_json(self.out / "summary.json", summary)
        if not plot:
            return
        try:
            M.plot(records, self.out / "latency.png")
        except Exception as exc:  # a plot must never stop a federated run
            self.log(f"warning: could not draw latency.png: {exc}")

    def _print_round(self, row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
        def pct(v: Any) -> str:
            return "-" if M._num(v) is None else f"{v:.1%}"

        def num(v: Any, spec: str) -> str:
            return "-" if M._num(v) is None else format(v, spec)

        rej = sum(row["rejected"].values())
        self.log(
            f"round {row['round']}/{self.cfg.rounds} | clients {len(row['clients'])}/"
            f"{len(row['active']) or len(row['clients'])} | loss {num(row['mean_loss'], '.4f')}"
            f" | pers {pct(row['personalization_acc'])} | global {pct(row['global_test_acc'])}"
            f" | held-out {pct(row['heldout_acc'])} | latency p50 "
            f"{num(row['latency_p50_s'], '.3f')}s max {num(row['latency_max_s'], '.3f')}s"
            f" | down {M._fmt_bytes(row['bytes_down'])} up {M._fmt_bytes(row['bytes_up'])}"
            f" | wall {row['round_wall_s']:.2f}s | rejected {rej}"
        )
        if self.console is not None:
            self.console.print(M.round_table(row["round"], rows))

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, torch.Tensor]:
        """The whole job; raises FedClipError when it stops short (policy `stop` or retries)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._load_eval()
        self._init_state()
        self.t.subscribe(P.update_filter(self.cfg.job), P.status_filter(self.cfg.job))
        self.t.connect(self.cfg.connect_timeout_s)
        self._epoch_seen = self.t.epoch
        if self.completed < self.cfg.rounds:
            self._publish_control("running")
        # devices' retained statuses arrive first; then wait for enough of them (bounded)
        self._pump(self.clock() + 0.3, lambda: False)
        self._pump(
            self.clock() + self.cfg.wait_clients_s,
            lambda: len(self.active) >= self.cfg.min_clients,
        )
        self._make_initial()
        self.log(
            f"job {self.cfg.job}: {len(self.active)} device(s) online "
            f"({', '.join(sorted(self.active)) or 'none'}), rounds "
            f"{self.completed + 1}..{self.cfg.rounds}, min clients {self.cfg.min_clients}"
        )
        for rnd in range(self.completed + 1, self.cfg.rounds + 1):
            if not self._run_round(rnd):
                self._round = 0
                self._publish_control("done")
                raise FedClipError(
                    f"stopped at round {rnd}: fewer than {self.cfg.min_clients} updates "
                    f"(policy {self.cfg.on_short}); state kept, re-run with --resume"
                )
        # the final adapter stays retained (round rounds+1: nothing left to train)
        self._round = self.cfg.rounds + 1
        self._answered = {}
        self._publish_global(have=())  # before "done": devices keep the final adapter
        self._publish_control("done")
        self._round = 0
        assert self.global_state is not None
        self.log(
            f"job {self.cfg.job} done: {self.completed} rounds; accepted "
            f"{self.counters['accepted']} updates, rejected "
            f"{sum(v for k, v in self.counters.items() if k.startswith('rejected_'))}; "
            f"global adapter {self.out / 'global.safetensors'}"
        )
        return self.global_state


def state_sha(out: Path) -> str:
    """sha256 of the final global adapter file named in OUT/state.json (for tests/tools)."""
    st = json.loads((Path(out) / "state.json").read_text())
    return str(st["global_sha256"])


# ---------------------------------------------------------------------- CLI

import typer  # noqa: E402  (kept after the library code: the module works without the CLI)

from fedclip_edge.broker import cli_options as opt  # noqa: E402


def aggregate(
    broker: Annotated[str, typer.Option(help="Broker URL: mqtt://host:port or mqtts://host:port")],
    job: Annotated[str, typer.Option(help="Job id (a topic level: A-Z a-z 0-9 _ . -).")],
    rounds: Annotated[int, typer.Option(help="Federated rounds to run.")],
    out: Annotated[Path, typer.Option(help="Output folder: state, adapters, metrics, plot.")],
    min_clients: Annotated[int, typer.Option(help="Updates needed to aggregate a round.")] = 1,
    round_timeout: Annotated[float, typer.Option(help="Seconds to wait for updates.")] = 60.0,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/state.json.")] = False,
    seed: Annotated[int, typer.Option(help="Seed: initial adapter and devices' training.")] = 0,
    preset: Annotated[str, typer.Option(help="Local training preset: reference | learning.")] = (
        "reference"
    ),
    lr: Annotated[float | None, typer.Option(help="Override the preset's learning rate.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override local epochs per round.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the local batch size.")] = None,
    weighting: Annotated[str, typer.Option(help="FedAvg weights: uniform | samples.")] = (
        "uniform"
    ),
    on_short: Annotated[str, typer.Option(help="Too few updates: retry | stop.")] = "retry",
    max_retries: Annotated[int, typer.Option(help="Retries of a short round.")] = 2,
    wait_clients: Annotated[float, typer.Option(help="Seconds to wait for devices first.")] = 60.0,
    dim: Annotated[int | None, typer.Option(help="Feature width (default: from devices).")] = None,
    eval_features: Annotated[
        Path | None,
        typer.Option(help="Feature cache for held-out accuracy of each global adapter."),
    ] = None,
    eval_domain: Annotated[str | None, typer.Option(help="Domain of --eval-features.")] = None,
    max_payload: Annotated[
        int, typer.Option(help="MQTT payload bytes above which messages are chunked.")
    ] = P.DEFAULT_MAX_PAYLOAD,
    username: Annotated[str | None, typer.Option(help="MQTT username.")] = P.AGGREGATOR_ID,
    password: opt.Password = None,
    ca_certs: opt.CaCerts = None,
    certfile: opt.Certfile = None,
    keyfile: opt.Keyfile = None,
    tls_insecure: opt.TlsInsecure = False,
    connect_timeout: opt.ConnectTimeout = 30.0,
) -> None:
    """Run the aggregator of a federated job over MQTT."""
    import signal
    import sys

    from rich.console import Console

    from fedclip_edge.broker.transport import MqttTransport, TlsOptions
    from fedclip_edge.runs import train_config

    train = train_config(preset, {"lr": lr, "epochs": epochs, "batch_size": batch_size}).to_dict()
    cfg = AggregatorConfig(
        job=job,
        rounds=rounds,
        out=out,
        min_clients=min_clients,
        round_timeout_s=round_timeout,
        seed=seed,
        weighting=weighting,
        train=train,
        dim=dim,
        on_short=on_short,
        max_retries=max_retries,
        wait_clients_s=wait_clients,
        eval_features=eval_features,
        eval_domain=eval_domain,
        resume=resume,
        connect_timeout_s=connect_timeout,
    )
    tls = TlsOptions.from_options(ca_certs, certfile, keyfile, tls_insecure)
    transport = MqttTransport(
        broker,
        f"{P.AGGREGATOR_ID}-{job}",
        username=username,
        password=password,
        tls=tls,
        max_payload=max_payload,
    )
    console = Console(width=None if sys.stdout.isatty() else 160)

    def log(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    agg = Aggregator(transport, cfg, log=log, console=console)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # state.json holds the last committed round: --resume goes on

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        agg.run()
    finally:
        transport.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m fedclip_edge.broker.aggregator ...` (subprocess tests), errors as one line."""
    from fedclip_edge.cli_runner import run_command

    return run_command(
        aggregate,
        argv,
        "fedclip-edge aggregate",
        interrupted="interrupted: state of the last completed round is kept; re-run with --resume",
    )


if __name__ == "__main__":
    import sys

    sys.exit(main())
