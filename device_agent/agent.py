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

The agent is built in layers: `agent_config.py` (settings, data, seeds), `outbox.py` (messages
out), `round_work.py` (local training and the update), `loop.py` (messages in, the main loop);
this module is the I/O shell and re-exports what callers use.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedclip_edge import __version__
from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION, DELTA_CODECS
from fedclip_edge.device_agent.agent_config import (
    DEFAULT_LOCAL_DP_DELTA,
    AgentConfig,
    LocalData,
    client_index,
    round_generator,
)
from fedclip_edge.device_agent.loop import MAX_PENDING, Agent
from fedclip_edge.errors import ConfigError, DataError, FrameError, Interrupted, TransportError
from fedclip_edge.serving.gate import DEFAULT_PERSONALIZE_EPOCHS, DEFAULT_PROMOTE_MARGIN
from fedclip_edge.signing import load_private_key, load_public_key, verify_artifact_signature

__all__ = [
    "MAX_PENDING",
    "Agent",
    "AgentConfig",
    "ExtractorEncoder",
    "LocalData",
    "client_index",
    "load_local_features",
    "round_generator",
    "run_agent",
]


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
    from fedclip_edge.serving.keep import artifact_record

    return LocalData(d.features, d.labels, fs.text_features, fs.logit_scale, ext.name,
                     extract_s, versions, classes=list(fs.class_names),
                     artifact=artifact_record(artifacts))


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
    models: Path | None = None,
    personalize_epochs: int = DEFAULT_PERSONALIZE_EPOCHS,
    promote_margin: float = DEFAULT_PROMOTE_MARGIN,
    dp_clip: float | None = None,
    dp_noise_multiplier: float = 0.0,
    dp_delta: float = DEFAULT_LOCAL_DP_DELTA,
    secure_aggregation: bool = False,
    secagg_record: Path | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Features, then the MQTT loop, then (job done) the models kept in `models` (default:
    beside the feature cache). SIGTERM/SIGINT end it cleanly (offline status, close)."""
    from fedclip_edge.broker.transport import MqttTransport
    from fedclip_edge.device_agent.codec_state import default_state_path
    from fedclip_edge.device_agent.keep import default_models_path

    cfg = AgentConfig(
        job, client_id, update_dtype, idle_timeout_s, connect_timeout_s,
        key=load_private_key(key_file) if key_file else None,
        aggregator_key=load_public_key(aggregator_key_file) if aggregator_key_file else None,
        insecure_unsigned=insecure_unsigned,
        update_codec=update_codec,
        topk_fraction=topk_fraction,
        state_file=state_file or default_state_path(cache, job, client_id),
        models=models or default_models_path(cache, client_id),
        personalize_epochs=personalize_epochs,
        promote_margin=promote_margin,
        dp_clip=dp_clip,
        dp_noise_multiplier=dp_noise_multiplier,
        dp_delta=dp_delta,
        secure_aggregation=secure_aggregation,
        secagg_record=secagg_record,
    )
    if cfg.dp_clip is not None:
        log(f"local DP: update delta clipped to L2 norm {cfg.dp_clip:g}, Gaussian noise std "
            f"{cfg.dp_noise_multiplier * cfg.dp_clip:g} (docs/privacy.md)")
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
