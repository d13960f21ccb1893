"""`fedclip-edge demo`: the whole federation on one machine over real MQTT, no downloads.

An embedded broker (or --broker URL), the offline default model exported to ONNX, the synthetic
data, one device agent per training domain as a separate process, and the aggregator in this
process. Everything lands in one folder: data, artifact, agents' logs and caches, the
aggregator's state, metrics.jsonl, summary.json and the latency/bytes plot.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.demo_models import device_models_table, measure_devices, models_dir
from fedclip_edge.broker.embedded import EmbeddedBroker, broker_class
from fedclip_edge.broker.transport import MqttTransport
from fedclip_edge.codecs import (
    DEFAULT_TOPK_FRACTION,
    SPARSE_CODECS,
    check_codec,
    check_topk_fraction,
)
from fedclip_edge.data.synth import DOMAINS, write_dataset
from fedclip_edge.errors import ConfigError, Interrupted, TransportError
from fedclip_edge.exporters.export import export_artifact
from fedclip_edge.exporters.manifest import verify_artifact
from fedclip_edge.io import atomic_write_json
from fedclip_edge.models.tiny import ensure_pretrained
from fedclip_edge.names import unknown_name
from fedclip_edge.runs import build_features, train_config
from fedclip_edge.signing import KeyRegistry, load_private_key, new_keypair, sign_artifact


def _export(data: Path, out: Path, log) -> Path:
    """The artifact the agents run; re-used when it is already there and verifies."""

    if (out / "manifest.json").is_file():
        try:
            verify_artifact(out)
            log(f"    artifact {out} (re-used)")
            return out
        except Exception as exc:  # a stale or damaged artifact is rebuilt, never used
            log(f"    artifact {out} does not verify ({exc}); exporting again")
    export_artifact(
        out,
        model="fedclip-tiny",
        pretrained=None,
        precision="fp32",
        classes=str(data),
        overwrite=True,
    )
    log(f"    exported fedclip-tiny to ONNX at {out}")
    return out


def demo_keys(folder: Path, clients: list[str]) -> Path:
    """The demo signs like a deployment: a key per device, one for the aggregator and one for
    the exporter, made once under `folder` (re-used on a re-run). Device public keys are also
    gathered in `folder/devices/`, the registry the aggregator loads."""
    for key_id in ["aggregator", "exporter", *clients]:
        if not (folder / f"{key_id}.key").is_file():
            new_keypair(folder, key_id, overwrite=True)
    registry = folder / "devices"
    registry.mkdir(parents=True, exist_ok=True)
    for c in clients:
        shutil.copyfile(folder / f"{c}.pub", registry / f"{c}.pub")
    return folder


def _spawn_agent(
    url: str,
    job: str,
    client: str,
    domain: str,
    data: Path,
    artifact: Path,
    folder: Path,
    keys: Path,
    update_codec: str = "fp32",
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
    secure_aggregation: bool = False,
) -> tuple[subprocess.Popen, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    logf = open(folder / f"{client}.log", "w")  # noqa: SIM115 - closed by the caller
    cmd = [
        sys.executable,
        "-m",
        "fedclip_edge.device_agent.cli",
        "--broker",
        url,
        "--job",
        job,
        "--client-id",
        client,
        "--data",
        str(data),
        "--artifacts",
        str(artifact),
        "--domain",
        domain,
        "--cache",
        str(folder / f"{client}-cache"),
        "--backend",
        "onnxruntime",
        "--idle-timeout",
        "120",
        "--key",
        str(keys / f"{client}.key"),
        "--aggregator-key",
        str(keys / "aggregator.pub"),
        "--artifact-key",
        str(keys / "exporter.pub"),
        "--update-codec",
        update_codec,
        "--topk-fraction",
        repr(float(topk_fraction)),
        "--state-file",
        str(folder / f"{client}-state.safetensors"),
        "--models",
        str(models_dir(folder, client)),
        *(["--secure-aggregation"] if secure_aggregation else []),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    return proc, logf


def run_mqtt_demo(
    out: Path,
    *,
    rounds: int = 10,
    per_class: int = 100,
    test_domain: str = "photo",
    broker: str | None = None,
    preset: str = "learning",
    round_timeout: float = 60.0,
    seed: int = 0,
    job: str | None = None,
    resume: bool = False,
    train_overrides: dict[str, Any] | None = None,
    strategy: str = "fedavg",
    strategy_options: dict[str, Any] | None = None,
    update_codec: str = "fp32",
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
    secure_aggregation: bool = False,
    global_codec: str = "fp32",
    global_topk_fraction: float | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the federation end to end and return the aggregator's summary.

    Re-runnable: data, artifact and feature caches are re-used; an earlier run's aggregator
    folder and agent logs move to OUT/runs/<time> and a fresh job starts, or `resume`
    continues the earlier job from its last committed round.
    """

    if test_domain not in DOMAINS:
        raise ConfigError(unknown_name("--test-domain", test_domain, DOMAINS))
    try:  # before anything starts: a bad value would only fail in the agents' logs
        check_codec(update_codec)
        check_topk_fraction(topk_fraction)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if broker is None:
        broker_class()  # the 'embedded' extra: say so now, not after building the model
    out = Path(out)
    t0 = time.perf_counter()
    log("1/5 offline default model (fedclip-tiny, pretrained here on synthetic data)")
    _, meta = ensure_pretrained()
    log(
        "    zero-shot accuracy recorded at pretraining: "
        + ", ".join(f"{d} {a:.0%}" for d, a in meta["zero_shot"].items())
    )
    log(f"2/5 synthetic data: {per_class} images per domain and class")
    data = out / "data"
    write_dataset(data, per_class=per_class, seed=0)
    log("3/5 export for the devices, and the held-out domain's features for the aggregator")
    artifact = _export(data, out / "artifact", log)
    clients = [d for d in DOMAINS if d != test_domain]
    keys = demo_keys(out / "keys", [f"dev-{d}" for d in clients])
    sign_artifact(artifact, load_private_key(keys / "exporter.key"))
    log(f"    signing keys in {keys}; artifact signed by the exporter key")
    eval_dir = out / "eval-features"
    build_features(data, eval_dir, domains=[test_domain], progress=False)
    job, resume = _earlier_run(out, job, resume, seed, log)
    with contextlib.ExitStack() as stack:
        if broker is None:

            url = stack.enter_context(EmbeddedBroker()).url
            log(f"4/5 embedded MQTT broker at {url}")
        else:
            url = broker
            log(f"4/5 MQTT broker at {url}")
        agents = []
        for d in clients:
            proc, logf = _spawn_agent(
                url, job, f"dev-{d}", d, data, artifact, out / "agents", keys,
                update_codec, topk_fraction, secure_aggregation,
            )
            stack.callback(logf.close)
            stack.callback(_stop, proc)
            agents.append(proc)
        log(
            f"    {len(agents)} device agents started (one per domain: {', '.join(clients)}); "
            f"logs in {out / 'agents'}; updates {update_codec}"
            + (f" (top-k fraction {topk_fraction:g})" if update_codec in SPARSE_CODECS else "")
        )
        log(f"5/5 aggregator: {rounds} rounds, {preset} setting, held-out domain {test_domain}")
        cfg = AggregatorConfig(
            job=job,
            rounds=rounds,
            out=out / "aggregator",
            min_clients=len(clients),
            round_timeout_s=round_timeout,
            seed=seed,
            train=train_config(preset, train_overrides).to_dict(),
            wait_clients_s=300.0,
            eval_features=eval_dir,
            eval_domain=test_domain,
            resume=resume,
            strategy=strategy,
            strategy_options=strategy_options or {},
            secure_aggregation=secure_aggregation,
            global_codec=global_codec,
            global_topk_fraction=global_topk_fraction or DEFAULT_TOPK_FRACTION,
            registry=KeyRegistry.load(keys / "devices"),
            signing_key=load_private_key(keys / "aggregator.key"),
        )
        transport = MqttTransport(
            url, f"aggregator-{job}", username="aggregator", manual_ack=True
        )
        stack.callback(transport.close)
        agg = Aggregator(transport, cfg, log=log)
        try:
            agg.run()
        except KeyboardInterrupt:
            raise Interrupted(
                f"the last completed round is kept in {cfg.out}; `demo --resume` continues it"
            ) from None
        deadline = time.monotonic() + 30
        for proc in agents:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        failed = [
            p.args[p.args.index("--client-id") + 1] for p in agents if p.returncode not in (0, None)
        ]
        if failed:
            raise TransportError(
                f"device agent(s) {', '.join(failed)} failed; see their logs in {out / 'agents'}"
            )
    log("each device's model (its agent kept and gated it at the job's end), served through the "
        "fused ONNX graph on the device's test split, beside the same adapter in torch:")
    devices = measure_devices(
        out / "agents", {f"dev-{d}": d for d in clients}, data, seed, log=log
    )
    for line in device_models_table(devices):
        log(line)
    atomic_write_json(cfg.out / "devices.json", devices)
    log(
        f"done in {time.perf_counter() - t0:.0f}s (the tables above are the result); "
        f"summary.json, devices.json, metrics.jsonl, accuracy.png and latency.png in {cfg.out}"
    )
    return {"out": str(cfg.out), "job": job, "devices": devices}


def _earlier_run(
    out: Path, job: str | None, resume: bool, seed: int, log
) -> tuple[str, bool]:
    """The job id to run and whether to resume. A fresh run moves an earlier one aside (its
    aggregator folder and agent logs to OUT/runs/<time>) instead of refusing to start."""
    agg_dir = out / "aggregator"
    state_path = agg_dir / "state.json"
    earlier: dict[str, Any] | None = None
    if state_path.is_file():
        try:
            earlier = json.loads(state_path.read_text())
        except (OSError, ValueError):
            earlier = None
    if resume:
        if earlier is None or not isinstance(earlier.get("job"), str):
            log(f"    nothing to resume in {agg_dir} (no readable state.json): a fresh run")
            resume = False
        else:
            if job is not None and job != earlier["job"]:
                raise ConfigError(
                    f"--resume continues job {earlier['job']!r} in {agg_dir}, not --job {job!r}"
                )
            if earlier.get("seed") != seed:
                raise ConfigError(
                    f"the run in {agg_dir} was made with seed {earlier.get('seed')}, not {seed}: "
                    "pass the same --seed to resume it"
                )
            log(
                f"    resuming job {earlier['job']} after round "
                f"{earlier.get('completed_round', 0)} ({agg_dir})"
            )
            return str(earlier["job"]), True
    if agg_dir.exists() and any(agg_dir.iterdir()):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = out / "runs" / stamp
        n = 1
        while dest.exists():
            n += 1
            dest = out / "runs" / f"{stamp}-{n}"
        dest.mkdir(parents=True)
        os.replace(agg_dir, dest / "aggregator")
        agents = out / "agents"
        for logfile in sorted(agents.glob("*.log")) if agents.is_dir() else ():
            (dest / "agents").mkdir(exist_ok=True)
            os.replace(logfile, dest / "agents" / logfile.name)
        log(f"    the earlier run moved to {dest} (pass --resume to continue a run instead)")
    return job or f"demo-{int(time.time())}", False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (agents finish cleanly), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
