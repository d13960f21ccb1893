"""The device agent: cached features in, adapter updates out, one round at a time.

Pure-ish core (`Agent`) over a `Transport` and in-memory features, so unit tests drive it with
the in-memory broker; the I/O shell (`load_local_features`, `run_agent`) opens the exported
artifact (its golden set is checked on load), extracts features once into the feature cache
(a restart re-uses them) and connects to MQTT.

Robustness rests on the agent, not on broker queues (amqtt drops QoS 1 messages for offline
persistent sessions): the global adapter is retained, and an update not yet acknowledged stays
in the agent's outbox and is sent again after a reconnect while its round is still open; it is
dropped once a later round's global adapter arrives. A global adapter re-published for a round
already answered, whose `have` list lacks this device, makes it resend its cached update
(the aggregator restarted or lost it); the aggregator drops duplicates.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedclip_edge import __version__
from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import Delivery, Received, Transport
from fedclip_edge.codecs import (
    CODECS,
    DEFAULT_TOPK_FRACTION,
    DELTA_CODECS,
    ErrorFeedback,
    check_topk_fraction,
)
from fedclip_edge.config import TrainConfig
from fedclip_edge.data.split import split_indices
from fedclip_edge.device_agent.codec_state import CodecState, global_digest
from fedclip_edge.errors import (
    ConfigError,
    DataError,
    FrameError,
    Interrupted,
    TransportError,
)
from fedclip_edge.signing import (
    KeyRegistry,
    load_private_key,
    load_public_key,
    verify_artifact_signature,
)
from fedclip_edge.train import accuracy, train_local
from fedclip_edge.wire import (
    FrameRejected,
    decode_frame,
    encode_frame,
    encode_update,
    expected_shapes,
)


def client_index(client_id: str) -> int:
    """A stable integer per client id (not Python's salted hash): seeds its local training."""
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:6], "big")


def round_generator(seed: int, rnd: int, client_id: str) -> torch.Generator:
    """The local training generator: a function of (seed, round, client) only, so a resumed
    run and an uninterrupted one train identically."""
    s = 0
    for part in (seed, rnd, client_index(client_id)):
        s = (s * 1_000_003 + part) % (2**63)
    return torch.Generator().manual_seed(s)


@dataclass
class LocalData:
    """One device's features (raw, [N, D]), labels, the class prompts' text features."""

    features: torch.Tensor
    labels: torch.Tensor
    text_features: torch.Tensor
    logit_scale: float
    backend: str = "memory"
    extract_s: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def split(self, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The reference protocol's 60/20/20 split of this device's data."""
        parts = split_indices(int(self.labels.shape[0]), seed)
        out = {}
        for name, ix in zip(("train", "val", "test"), parts, strict=True):
            idx = torch.from_numpy(ix).long()
            out[name] = (self.features[idx], self.labels[idx])
        return out


MAX_PENDING = 64  # messages looked ahead at most (globals are retained: older ones are moot)


@dataclass
class AgentConfig:
    job: str
    client_id: str
    update_dtype: str = "float32"
    idle_timeout_s: float = 600.0  # no message from the aggregator for this long: give up
    connect_timeout_s: float = 30.0
    poll_s: float = 0.2
    ack_timeout_s: float = 10.0  # wait this long for a PUBACK before leaving it to the outbox
    # this device's signing key and the aggregator's public key; without them only when asked
    key: Ed25519PrivateKey | None = None
    aggregator_key: Ed25519PublicKey | None = None
    insecure_unsigned: bool = False
    session: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # how updates travel (fedclip_edge.codecs); None: fp32 or fp16 after update_dtype
    update_codec: str | None = None
    topk_fraction: float = DEFAULT_TOPK_FRACTION
    # delta codecs' error-feedback state (residual + last encoded update); None: kept in memory
    # only (tests), run_agent always gives one
    state_file: Path | None = None

    def __post_init__(self) -> None:
        P.check_id(self.job, "job")
        P.check_id(self.client_id, "client id")
        if self.update_dtype not in ("float32", "float16"):
            raise ConfigError("update dtype must be float32 or float16")
        if self.update_codec is not None:
            if self.update_codec not in CODECS:
                raise ConfigError(f"unknown update codec {self.update_codec!r}; choose one of "
                                  f"{', '.join(CODECS)}")
            if self.update_dtype == "float16" and self.update_codec != "fp16":
                raise ConfigError("give --update-codec or --update-dtype float16, not both")
        try:
            check_topk_fraction(self.topk_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not self.insecure_unsigned and (self.key is None or self.aggregator_key is None):
            raise ConfigError(
                "updates and globals are signed: give --key (this device's private key) and "
                "--aggregator-key (the aggregator's public key), or run with --insecure-unsigned"
            )

    @property
    def codec(self) -> str:
        """The update codec in effect (--update-dtype float16 is the fp16 codec)."""
        if self.update_codec is not None:
            return self.update_codec
        return "fp16" if self.update_dtype == "float16" else "fp32"

    @property
    def aggregator_registry(self) -> KeyRegistry | None:
        if self.aggregator_key is None or self.insecure_unsigned:
            return None
        return KeyRegistry({P.AGGREGATOR_ID: self.aggregator_key})


@dataclass
class _Outbox:
    round: int
    payload: bytes
    delivery: Delivery
    started: float


class Agent:
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
        self.current_round = -1
        self.last_trained = -1
        self.rounds_trained = 0
        self.last_upload_s: float | None = None
        self.final_state: dict[str, torch.Tensor] | None = None
        self._cached: tuple[int, bytes] | None = None  # last update sent (round, payload)
        self._outbox: _Outbox | None = None
        self._last_wire = 0
        self._last_global_key: tuple[str, int, tuple[str, ...]] | None = None
        self._epoch_seen = 0
        self._ready_at = clock()
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._split_seed: int | None = None
        self._extract_reported = False
        # accepted messages taken from the transport early, to see what supersedes a round
        self._pending: deque[tuple[P.Control | P.GlobalModel, Received]] = deque()
        self._codec_state: CodecState | None = None  # delta codecs: loaded on first use
        n = int(data.labels.shape[0])
        self._sizes = {k: len(v) for k, v in zip(("train", "val", "test"), split_indices(n, 0),
                                                 strict=True)}

    # ------------------------------------------------------------------ messages out
    def _status(self, state: str, *, hello: bool = False, upload_s: float | None = None) -> None:
        st = P.Status(
            self.cfg.client_id, state, self._sizes, self.data.backend, self.data.dim,
            self.data.versions, round=self.last_trained, upload_s=upload_s, hello=hello,
            session=self.cfg.session,
        )
        if self.cfg.key is not None:
            st = authn.sign(st, self.cfg.key, job=self.cfg.job)
        self.t.publish(P.status_topic(self.cfg.job, self.cfg.client_id), st.encode(), retain=True)

    def _send(self, rnd: int, payload: bytes) -> None:
        """Publish and wait (bounded) for the PUBACK: the upload time is publish -> PUBACK.
        Unacknowledged, the update stays in the outbox and goes again after a reconnect."""
        start = self.clock()
        d = self.t.publish(P.update_topic(self.cfg.job, self.cfg.client_id), payload)
        self._outbox = _Outbox(rnd, payload, d, start)
        self._last_wire = d.wire_bytes
        if d.wait(self.cfg.ack_timeout_s):
            self._outbox = None
            self.last_upload_s = self.clock() - start
            self._status("uploaded", upload_s=self.last_upload_s)

    def _check_outbox(self) -> None:
        ob = self._outbox
        if ob is None:
            return
        if ob.round < self.current_round or self.done:
            self.log(f"round {ob.round}: unsent update dropped, its round is over")
            self._outbox = None
        elif ob.delivery.wait(0):
            upload_s = self.clock() - ob.started
            self._outbox = None
            self._status("uploaded", upload_s=upload_s)

    # ------------------------------------------------------------------ messages in
    def _accept(self, msg: Received) -> P.Control | P.GlobalModel | None:
        """Decoded and, when signing is on, verified; None (counted, one line) otherwise."""
        try:
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
        if isinstance(m, P.Control):
            if m.state == "done":
                self.log(f"job {self.cfg.job} is done (round {m.round}/{m.rounds})")
                self.done = True
        else:
            self._on_global(m, msg)

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
            if isinstance(m, P.Control) and m.state == "done":
                return "the job's done message"
            if isinstance(m, P.GlobalModel) and m.round > rnd:
                return (f"round {m.round}'s global" if m.round <= m.rounds
                        else "the final global")
        return None

    def _on_global(self, g: P.GlobalModel, msg: Received) -> None:
        key = (g.session, g.round, tuple(sorted(g.have)))
        repeated = key == self._last_global_key
        self._last_global_key = key
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
        adapter = AttentionAdapter(self.data.dim)
        try:
            frame = decode_frame(g.frame, expected=expected_shapes(adapter.state_dict()))
        except FrameRejected as exc:
            self.log(f"warning: global adapter for round {g.round} rejected: {exc.message}")
            return
        if g.round > g.rounds:
            self.final_state = frame.tensors
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
        self._train_and_send(g, frame.tensors, msg)

    def _train_and_send(self, g: P.GlobalModel, state: dict[str, torch.Tensor],
                        msg: Received) -> None:
        wait_s = self.clock() - self._ready_at
        if self.cfg.codec in DELTA_CODECS and self._resend_saved(g, state):
            self._ready_at = self.clock()
            return
        if self._splits is None or self._split_seed != g.seed:
            self._splits, self._split_seed = self.data.split(g.seed), g.seed
        splits = self._splits
        try:
            tcfg = TrainConfig.from_untrusted(g.train) if g.train else TrainConfig()
        except ConfigError as exc:
            # refuse, do not guess: training with other settings than the job's would mix
            # incomparable updates; the aggregator's operator sees the line and fixes the job
            self.log(f"error: round {g.round}: global adapter refused, bad training settings "
                     f"from the aggregator: {exc}")
            self.rejected["bad_train_settings"] += 1
            return
        text = self.data.text_features
        adapter = AttentionAdapter(self.data.dim)
        adapter.load_state_dict(state)
        metrics: dict[str, Any] = {
            "global_val_acc": accuracy(adapter, *splits["val"], text),
            "global_test_acc": accuracy(adapter, *splits["test"], text),
        }
        t0 = self.clock()
        res = train_local(
            adapter, *splits["train"], text, tcfg, logit_scale=self.data.logit_scale,
            generator=round_generator(g.seed, g.round, self.cfg.client_id),
        )
        train_s = self.clock() - t0
        metrics.update(
            {
                "local_val_acc": accuracy(adapter, *splits["val"], text),
                "local_test_acc": accuracy(adapter, *splits["test"], text),
                "loss": res.loss,
                "steps": res.steps,
                "train_s": train_s,
                "global_wait_s": wait_s,
                "global_transfer_s": msg.transfer_s,
                "bytes_down": msg.wire_bytes,
                "backend": self.data.backend,
                "update_codec": self.cfg.codec,
            }
        )
        if not self._extract_reported:  # once per agent process, with its first update
            metrics["extract_s"] = self.data.extract_s
            metrics["zero_shot_acc"] = accuracy(None, *splits["test"], text)
            self._extract_reported = True
        samples = res.samples if res.samples else int(splits["train"][1].shape[0])
        why = self._superseded(g.round)  # arrived while training: the round is over
        if why is not None:  # before encoding: encoding moves the error-feedback residual on
            self.log(f"round {g.round}: trained but not sent, {why} arrived meanwhile")
            return
        payload = self._encode_update(g, state, adapter.state_dict(), samples, metrics)
        self.last_trained = g.round
        self.rounds_trained += 1
        self._cached = (g.round, payload)
        self._send(g.round, payload)
        upload = "queued" if self._outbox is not None else f"{self.last_upload_s:.3f}s"
        self.log(
            f"round {g.round} | samples {samples} | loss {res.loss:.4f} | compute {train_s:.3f}s"
            f" | wait {wait_s:.3f}s | down {msg.wire_bytes} B | up {self._last_wire} B"
            f" ({self.cfg.codec}) | upload {upload}"
        )
        self._ready_at = self.clock()

    def _encode_update(self, g: P.GlobalModel, glob: dict[str, torch.Tensor],
                       local: dict[str, torch.Tensor], samples: int,
                       metrics: dict[str, Any]) -> bytes:
        """The signed update envelope. fp32/fp16 travel as version-1 frames (older aggregators
        read them); delta codecs as version-2 frames against `glob` (the round's global), with
        the error-feedback state saved BEFORE the update leaves the device."""
        codec = self.cfg.codec
        st = self._load_codec_state(local) if codec in DELTA_CODECS else None
        if st is None:
            frame = encode_frame(local, job=self.cfg.job, round=g.round,
                                 client=self.cfg.client_id,
                                 dtype="float16" if codec == "fp16" else "float32")
        else:
            feedback = ErrorFeedback(st.residual)
            frame = encode_update(local, glob, codec=codec, job=self.cfg.job, round=g.round,
                                  client=self.cfg.client_id, feedback=feedback,
                                  topk_fraction=self.cfg.topk_fraction)
            metrics["residual_norm"] = feedback.norm()
        update = P.Update(self.cfg.job, g.round, self.cfg.client_id, samples, metrics, frame,
                          session=self.cfg.session)
        if self.cfg.key is not None:
            update = authn.sign(update, self.cfg.key)
        payload = update.encode()
        if st is not None:
            st.residual, st.round, st.update = feedback.residual, g.round, payload
            st.global_sha256 = global_digest(g.frame)
            if self.cfg.state_file is not None:
                st.save(self.cfg.state_file)  # before publishing: see codec_state.py
        return payload

    def _load_codec_state(self, shapes_of: dict[str, torch.Tensor]) -> CodecState:
        """The error-feedback state, read from the state file once per process."""
        if self._codec_state is None:
            shapes = expected_shapes(shapes_of)
            if self.cfg.state_file is None:
                self._codec_state = CodecState(self.cfg.job, self.cfg.client_id, self.cfg.codec,
                                               self.data.dim)
            else:
                self._codec_state = CodecState.load(
                    self.cfg.state_file, job=self.cfg.job, client=self.cfg.client_id,
                    codec=self.cfg.codec, shapes=shapes, log=self.log,
                )
                if self._codec_state.round >= 0:
                    self.log(f"error-feedback state {self.cfg.state_file}: residual after round "
                             f"{self._codec_state.round}")
        return self._codec_state

    def _resend_saved(self, g: P.GlobalModel, glob: dict[str, torch.Tensor]) -> bool:
        """After a restart within round g.round: the update saved for it goes again byte for
        byte (its residual is already in the state; encoding again would apply it twice).
        True when nothing is left to train for this round."""
        st = self._load_codec_state(glob)
        if st.round < 0 or st.round < g.round:
            return False
        if st.round > g.round or st.global_sha256 != global_digest(g.frame):
            # the job went back, or this round's global is another one (a new run of the job):
            # that residual belongs to updates this aggregator never had
            self.log(f"warning: error-feedback state of round {st.round} does not match the "
                     f"global of round {g.round}; starting from a zero residual")
            st.residual, st.round, st.update, st.global_sha256 = {}, -1, b"", ""
            return False
        self.last_trained = g.round
        self._cached = (g.round, st.update)
        if self.cfg.client_id in g.have:
            self.log(f"round {g.round}: update saved before a restart; the aggregator has it")
            return True
        self.log(f"round {g.round}: re-sending the update saved before a restart "
                 f"({len(st.update)} B, not encoded again)")
        self._send(g.round, st.update)
        return True

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Returns the number of rounds trained. Ends on job done, `stop` or idle timeout."""
        self.t.subscribe(P.global_topic(self.cfg.job), P.control_topic(self.cfg.job))
        self.t.connect(self.cfg.connect_timeout_s)
        last_heard = self.clock()
        try:
            while not self.stop.is_set() and not self.done:
                if self.t.epoch != self._epoch_seen:
                    self._epoch_seen = self.t.epoch
                    self._status("online", hello=True)
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
                if self.clock() - last_heard > self.cfg.idle_timeout_s:
                    raise TransportError(
                        f"nothing from the aggregator of job {self.cfg.job} for "
                        f"{self.cfg.idle_timeout_s:g}s; giving up"
                    )
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
        return self.rounds_trained


# ---------------------------------------------------------------------- I/O shell


class ExtractorEncoder:
    """The exporters' extractor as the feature cache's `ImageEncoder`."""

    def __init__(self, extractor: Any) -> None:
        from fedclip_edge.exporters.preprocess import preprocess_images

        self.ext = extractor
        model = extractor.manifest["model"]
        self.identity = {
            "model": model.get("name"),
            "pretrained": model.get("pretrained"),
            "weights_sha256": model.get("weights_sha256"),
            "precision": extractor.precision,
        }
        self.preprocess_cfg = dict(extractor.manifest["preprocess"])
        self._pre = preprocess_images

    def preprocess(self, image: Any) -> Any:
        return torch.from_numpy(self._pre([image], self.ext.preprocess)[0])

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.ext.extract(batch.numpy()))


def load_local_features(
    data: Path,
    artifacts: Path,
    *,
    backend: str = "auto",
    domain: str | None = None,
    cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> LocalData:
    """Open the artifact (hashes and golden-set parity checked), extract features once."""
    from fedclip_edge.data.folder import scan_dataset
    from fedclip_edge.exporters.runtimes import open_extractor
    from fedclip_edge.features import extract_features

    ext = open_extractor(artifacts, backend=backend)
    parity = ext.parity or {}
    log(f"extractor {ext.name}: golden set min cosine {parity.get('min_cosine', float('nan')):.6f}"
        f" ({parity.get('status', 'unchecked')})")
    ds = scan_dataset(Path(data), [domain] if domain else None)
    if len(ds.domains) != 1:
        raise DataError(f"{data} holds domains {', '.join(ds.domains)}: pick one with --domain")
    cf = ext.class_features()
    if cf is None:
        raise DataError(f"artifact {artifacts} carries no class prompts' features: re-export "
                        "it with --classes")
    names, text = cf
    if list(names) != list(ds.classes):
        raise DataError(f"the artifact's classes {names} differ from the data's {ds.classes}")
    identity = ExtractorEncoder(ext)
    if cache is None:  # the project's cache folder, so FEDCLIP_EDGE_CACHE/XDG_CACHE_HOME apply
        from fedclip_edge.models.registry import cache_dir

        cache = cache_dir() / "agent-features" / (
            f"{identity.identity['weights_sha256'][:12]}-{ext.precision}"
        )
    cache = Path(cache)
    t0 = time.monotonic()
    fs, report = extract_features(
        ds, identity, torch.from_numpy(text), float(ext.manifest["model"]["logit_scale"]), cache,
        progress=False, log=log,
    )
    extract_s = time.monotonic() - t0
    d = fs.domains[ds.domains[0]]
    log(f"features of {ds.domains[0]}: {report.encoded} encoded, {report.reused} reused from "
        f"{cache} in {extract_s:.2f}s")
    if len(d) < 3:
        raise DataError(f"{data} has {len(d)} usable images: too few to split 60/20/20")
    import onnxruntime

    versions = {"fedclip_edge": __version__, "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__,
                "artifact": str(ext.manifest.get("created", ""))}
    return LocalData(d.features, d.labels, fs.text_features, fs.logit_scale, ext.name,
                     extract_s, versions)


def run_agent(
    *,
    broker: str,
    job: str,
    client_id: str,
    data: Path,
    artifacts: Path,
    backend: str = "auto",
    domain: str | None = None,
    cache: Path | None = None,
    username: str | None = None,
    password: str | None = None,
    tls: Any = None,
    update_dtype: str = "float32",
    max_payload: int = P.DEFAULT_MAX_PAYLOAD,
    idle_timeout_s: float = 600.0,
    connect_timeout_s: float = 30.0,
    keepalive_s: int = 15,
    key_file: Path | None = None,
    aggregator_key_file: Path | None = None,
    artifact_key_file: Path | None = None,
    insecure_unsigned: bool = False,
    update_codec: str | None = None,
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
    state_file: Path | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Features, then the MQTT loop. SIGTERM/SIGINT end it cleanly (offline status, close)."""
    from fedclip_edge.broker.transport import MqttTransport
    from fedclip_edge.device_agent.codec_state import default_state_path

    cfg = AgentConfig(
        job, client_id, update_dtype, idle_timeout_s, connect_timeout_s,
        key=load_private_key(key_file) if key_file else None,
        aggregator_key=load_public_key(aggregator_key_file) if aggregator_key_file else None,
        insecure_unsigned=insecure_unsigned,
        update_codec=update_codec,
        topk_fraction=topk_fraction,
        state_file=state_file or default_state_path(cache, job, client_id),
    )
    if cfg.codec in DELTA_CODECS:
        log(f"update codec {cfg.codec}: error-feedback state in {cfg.state_file}")
    if artifact_key_file is not None:
        verify_artifact_signature(artifacts, load_public_key(artifact_key_file))
        log(f"artifact {artifacts}: signature verified")
    elif not insecure_unsigned:
        raise ConfigError(
            "the exported artifact is authenticated by its signature: give --artifact-key (the "
            "exporting key's public half), or run with --insecure-unsigned"
        )
    local = load_local_features(data, artifacts, backend=backend, domain=domain, cache=cache,
                                log=log)
    transport = MqttTransport(
        broker, client_id, username=username if username is not None else client_id,
        password=password, tls=tls, max_payload=max_payload, keepalive=keepalive_s,
        will=(P.status_topic(job, client_id),
              authn.signed_will(client_id, job, cfg.session, cfg.key), True),
    )
    agent = Agent(transport, cfg, local, log=log)

    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        log(f"signal {signum}: finishing cleanly")
        received.append(signum)
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        n = agent.run()
    except FrameError as exc:
        raise TransportError(f"protocol error: {exc}") from None
    log(f"agent {client_id}: {n} round(s) trained; "
        f"{transport.counters.bytes_down} B down, {transport.counters.bytes_up} B up")
    if signal.SIGINT in received:  # Ctrl-C (SIGTERM is an orderly stop: exit 0)
        raise Interrupted("the feature cache is kept; the agent rejoins the job when re-run")
    return n
