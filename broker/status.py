"""`fedclip-edge status`: what a job is doing, from what already exists (no new server).

Two sources, either or both:

- the broker's retained topics of the job (`protocol.py`): each device's status (online or its
  last will "offline", backend, last round answered), the global adapter (the round in progress,
  its size: what each device downloads) and the control message (running / done);
- the aggregator's run folder (`store.py`, `report.py`): state.json (committed round, device
  roster, accepted / rejected counters), metrics.jsonl (per client and per round lines).

The broker says what is happening now; only the run folder knows accuracy, latency, bytes and
rejections (the aggregator publishes no metrics). Anyone who can publish on the broker can
retain a message there, so with keys (`Signers`: the devices' registry and the aggregator's
public key) only signed state is shown and every other retained message is listed, with its
reason, under `unverified_topics`; without keys the status says it is not verified.
The functions that build the status dict are pure (messages and files in, a dict out);
`collect_retained` is the one that talks to a broker, and it is bounded in time.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import report as M
from fedclip_edge.broker.store import METRICS_FILE, STATE_FILE
from fedclip_edge.broker.transport import Transport
from fedclip_edge.errors import ConfigError
from fedclip_edge.signing import KeyRegistry
from fedclip_edge.tables import human_bytes

SCHEMA = "fedclip-edge/status/v1"


# ----------------------------------------------------------------------------- the broker


def collect_retained(
    transport: Transport,
    job: str,
    *,
    connect_timeout_s: float = 10.0,
    quiet_s: float = 1.0,
    max_wait_s: float = 10.0,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, bytes]:
    """The job's retained messages by topic (the latest if one changes meanwhile).

    MQTT does not say how many retained messages a subscription will bring, so collection ends
    once nothing new arrived for `quiet_s`, and in any case after `max_wait_s`.
    """
    P.check_id(job, "job")
    transport.subscribe(P.status_filter(job), P.global_topic(job), P.control_topic(job))
    transport.connect(connect_timeout_s)
    got: dict[str, bytes] = {}
    start = last = clock()
    while True:
        now = clock()
        wait = min(start + max_wait_s, last + quiet_s) - now
        if wait <= 0:
            return got
        msg = transport.recv(wait)
        if msg is not None:
            got[msg.topic] = msg.payload
            last = clock()


class Signers:
    """Whose signatures make retained state true: the devices (a `KeyRegistry`, as the
    aggregator's `--device-keys`) for statuses, the aggregator's key for globals and controls."""

    def __init__(self, devices: KeyRegistry, aggregator: KeyRegistry) -> None:
        self.devices = devices
        self.aggregator = aggregator

    def check(self, msg: P.Message, job: str) -> None:
        """`MessageRejected` (reason: unsigned, bad_signature, unknown_key, ...) unless signed."""
        if isinstance(msg, P.Status):
            authn.verify(msg, self.devices, job=job)
        else:
            authn.verify(msg, self.aggregator, job=job, key_id=P.AGGREGATOR_ID)


def status_from_messages(
    job: str, messages: Mapping[str, bytes], signers: Signers | None = None
) -> dict[str, Any]:
    """What the retained topics say: devices, the round in progress, who answered it. With
    `signers`, only what they signed (the rest in `unverified_topics`, topic -> reason)."""
    devices: dict[str, dict[str, Any]] = {}
    glob: P.GlobalModel | None = None
    glob_bytes = 0
    control: P.Control | None = None
    unreadable: list[str] = []
    unverified: dict[str, str] = {}
    for topic, payload in sorted(messages.items()):
        try:
            t_job, kind, client = P.parse_topic(topic)
            if t_job != job:
                continue
            msg = P.decode_message(payload)
        except P.MessageRejected:
            unreadable.append(topic)
            continue
        if signers is not None and isinstance(msg, (P.Status, P.GlobalModel, P.Control)):
            try:
                signers.check(msg, job)
            except P.MessageRejected as exc:
                unverified[topic] = exc.reason
                continue
        if kind == "status" and isinstance(msg, P.Status) and msg.client == client:
            devices[msg.client] = {
                "client": msg.client,
                "state": msg.state,
                "online": msg.state != "offline",
                "backend": msg.backend or None,
                "samples": sum(msg.samples.values()) if msg.samples else None,
                "dim": msg.dim or None,
                "last_round": msg.round if msg.round >= 0 else None,
            }
        elif kind == "global" and isinstance(msg, P.GlobalModel) and msg.job == job:
            glob, glob_bytes = msg, len(payload)
        elif kind == "control" and isinstance(msg, P.Control) and msg.job == job:
            control = msg
        else:
            unreadable.append(topic)

    rounds = glob.rounds if glob else (control.rounds if control else None)
    state = control.state if control else None
    current = completed = None
    answered: list[str] = []
    if glob is not None:
        # the global of round r is published once round r-1 is committed; r > rounds is the
        # final adapter, kept retained after the job ended
        completed = min(glob.round - 1, glob.rounds)
        if glob.round <= glob.rounds and state != "done":
            current = glob.round
            answered = sorted(
                set(glob.have) | {c for c, d in devices.items() if d["last_round"] == glob.round}
            )
    elif control is not None:
        completed = control.round  # written when the aggregator (re)starts or ends: a floor
    online = [c for c, d in sorted(devices.items()) if d["online"]]
    return {
        "job": job,
        "state": state,
        "rounds": rounds,
        "completed_round": completed,
        "current_round": current,
        "answered": answered if current is not None else None,
        # the aggregator waits for every device online (or the deadline, with min-clients)
        "expected": sorted(set(online) | set(answered)) if current is not None else None,
        "global_bytes": glob_bytes or None,
        "devices": [devices[c] for c in sorted(devices)],
        "devices_online": len(online),
        "unreadable_topics": unreadable,
        "verified": signers is not None,
        "unverified_topics": unverified if signers is not None else None,
    }


# ----------------------------------------------------------------------------- the run folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def _num(v: Any) -> float | None:
    return M._num(v)


def _latency(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    xs = [x for x in (_num(r.get("update_latency_s")) for r in rows) if x is not None]
    return {
        "p50": M.percentile(xs, 50),
        "p95": M.percentile(xs, 95),
        "max": max(xs) if xs else None,
    }


def status_from_run_folder(out: Path, job: str | None = None) -> dict[str, Any]:
    """What the aggregator committed: last round's accuracy, latency, bytes; rejections."""
    out = Path(out)
    if not out.is_dir():
        raise ConfigError(f"--out {out} is not a folder (the aggregator's --out)")
    state_path = out / STATE_FILE
    if not state_path.is_file():
        raise ConfigError(
            f"{out} has no {STATE_FILE}: no round is committed yet, or it is not an "
            "aggregator's --out folder"
        )
    st = _read_json(state_path)
    if job is not None and st.get("job") != job:
        raise ConfigError(f"{state_path} belongs to job {st.get('job')!r}, not {job!r}")
    try:
        completed = int(st["completed_round"])
        rounds = int(st["rounds"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{state_path} lacks or mangles {exc}") from None
    # lines of a round written but not committed (a crash between the two) do not count
    records = [
        r
        for r in M.read_metrics(out / METRICS_FILE)
        if _num(r.get("round")) is not None and int(r["round"]) <= completed
    ]
    clients = [r for r in records if r.get("kind") == "client"]
    by_round = {int(r["round"]): r for r in records if r.get("kind") == "round"}
    last = by_round.get(completed)
    last_rows = [r for r in clients if r.get("round") == completed]
    last_round = None
    if last is not None:
        n = len(last_rows)
        last_round = {
            "round": completed,
            "clients": len(last.get("clients") or []),
            "active": len(last.get("active") or []),
            "heldout_acc": last.get("heldout_acc"),
            "personalization_acc": last.get("personalization_acc"),
            "global_test_acc": last.get("global_test_acc"),
            "mean_loss": last.get("mean_loss"),
            "round_wall_s": last.get("round_wall_s"),
            "latency_s": _latency(last_rows),
            "bytes_down": last.get("bytes_down"),
            "bytes_up": last.get("bytes_up"),
            "bytes_down_per_client": (last.get("bytes_down") or 0) / n if n else None,
            "bytes_up_per_client": (last.get("bytes_up") or 0) / n if n else None,
        }
        # each codec's count and uplink bytes, and what that saves (report.codec_savings)
        by_codec = {
            "clients": [r.get("client") for r in last_rows],
            "bytes_down": last.get("bytes_down"),
            "bytes_up": last.get("bytes_up"),
            "bytes_up_by_codec": M.bytes_by_codec(last_rows),
            "updates_by_codec": dict(sorted(Counter(M.codec_of(r) for r in last_rows).items())),
        }
        last_round["updates_by_codec"] = by_codec["updates_by_codec"]
        last_round["bytes_up_by_codec"] = by_codec["bytes_up_by_codec"]
        last_round["codec_savings"] = M.codec_savings(by_codec) or None
    counters = st.get("counters") if isinstance(st.get("counters"), dict) else {}
    roster = st.get("devices") if isinstance(st.get("devices"), dict) else {}
    codecs = {r.get("client"): M.codec_of(r) for r in clients}  # each client's latest
    devices = []
    for c in sorted(roster):
        d = roster[c] if isinstance(roster[c], dict) else {}
        samples = d.get("samples") if isinstance(d.get("samples"), dict) else {}
        devices.append(
            {
                "client": c,
                "state": d.get("state"),
                "online": d.get("state") not in (None, "offline"),
                "backend": d.get("backend") or None,
                "samples": sum(v for v in samples.values() if _num(v) is not None) or None,
                "dim": d.get("dim") or None,
                "last_round": max(
                    (int(r["round"]) for r in clients if r.get("client") == c), default=None
                ),
                "codec": codecs.get(c),
            }
        )
    # central DP's block (privacy/central.py), as committed with the last round
    plugins = st.get("plugins") if isinstance(st.get("plugins"), list) else []
    privacy = next((p["central_dp"].get("privacy") for p in plugins
                    if isinstance(p, dict) and isinstance(p.get("central_dp"), dict)), None)
    return {
        "privacy": privacy,
        "job": st.get("job"),
        "state": "done" if completed >= rounds else None,
        "rounds": rounds,
        "completed_round": completed,
        "devices": devices,
        "devices_online": sum(1 for d in devices if d["online"]),
        "last_round": last_round,
        "run": {
            "rounds": len(by_round),
            "latency_s": _latency(clients),
            "bytes_down": int(sum(_num(r.get("bytes_down")) or 0 for r in clients)),
            "bytes_up": int(sum(_num(r.get("bytes_up")) or 0 for r in clients)),
            "accepted": int(counters.get("accepted", 0)),
        },
        "rejected": {
            k[len("rejected_") :]: int(v)
            for k, v in sorted(counters.items())
            if k.startswith("rejected_") and _num(v)
        },
    }


# ----------------------------------------------------------------------------- together


def build_status(
    job: str | None,
    messages: Mapping[str, bytes] | None = None,
    out: Path | None = None,
    *,
    broker: str | None = None,
    signers: Signers | None = None,
) -> dict[str, Any]:
    """One status dict from the retained messages, the run folder, or both (`signers`: show
    only the retained state they signed).

    With both, the broker wins on what is live (devices, the round in progress) and the run
    folder gives what only it has (accuracy, latency, bytes, rejections).
    """
    if messages is None and out is None:
        raise ConfigError("give --broker (and --job), --out, or both")
    files = None
    pending = False  # --out given with the broker, no round committed there yet: not an error
    if out is not None:
        pending = messages is not None and not (Path(out) / STATE_FILE).is_file()
        files = None if pending else status_from_run_folder(out, job)
    if job is None:
        job = files["job"] if files else None
    if job is None:
        raise ConfigError("give --job (or --out, whose state.json names it)")
    live = status_from_messages(job, messages, signers) if messages is not None else None
    status: dict[str, Any] = {
        "schema": SCHEMA,
        "job": job,
        "sources": {
            "broker": broker if live is not None else None,
            "out": str(out) if out is not None else None,
        },
        "state": None,
        "rounds": None,
        "completed_round": None,
        "current_round": None,
        "answered": None,
        "expected": None,
        "global_bytes": None,
        "devices": [],
        "devices_online": 0,
        "devices_as_of": None,
        "unreadable_topics": None,
        "verified": None,
        "unverified_topics": None,
        "note": None,
        "last_round": None,
        "run": None,
        "rejected": None,
        "privacy": None,
    }
    if files is not None:
        status.update(files)
        status["devices_as_of"] = f"round {files['completed_round']} commit"
    if live is not None:
        seen = bool(live["devices"]) or live["rounds"] is not None
        if files is not None and not seen:
            pass  # nothing retained for this job: keep what the folder says
        else:
            for key in (
                "rounds",
                "current_round",
                "answered",
                "expected",
                "global_bytes",
                "devices",
                "devices_online",
                "unreadable_topics",
            ):
                status[key] = live[key]
            if files is not None:
                status["devices"] = _merge_devices(live["devices"], files["devices"])
            status["devices_as_of"] = None  # live
            if live["state"] is not None:
                status["state"] = live["state"]
            if live["completed_round"] is not None:
                status["completed_round"] = max(
                    live["completed_round"], status["completed_round"] or 0
                )
        status["verified"] = live["verified"]
        status["unverified_topics"] = live["unverified_topics"]
        if not seen:
            status["state"] = status["state"] or "unknown"
            status["note"] = f"nothing retained on the broker for job {job!r}"
    if pending:
        status["note"] = f"no round committed in {out} yet"
    if status["state"] is None:
        # files alone cannot tell a running aggregator from a stopped one; devices without a
        # control message mean no aggregator has started this job on this broker
        status["state"] = "not done" if live is None else "no aggregator yet"
    return status


def _merge_devices(live: list[dict[str, Any]], files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Live state, with what a last will does not carry (backend, samples, width) taken from
    the aggregator's roster; devices the broker holds nothing for are listed as not online."""
    known = {d["client"]: d for d in files}
    out = []
    for d in live:
        d = dict(d)
        for key in ("backend", "samples", "dim", "codec"):
            if d.get(key) is None and d["client"] in known:
                d[key] = known[d["client"]].get(key)
        if d.get("last_round") is None and d["client"] in known:
            d["last_round"] = known[d["client"]].get("last_round")
        out.append(d)
    seen = {d["client"] for d in live}
    for c, d in known.items():
        if c not in seen:
            out.append({**d, "state": "no retained status", "online": False})
    return sorted(out, key=lambda d: d["client"])


# ----------------------------------------------------------------------------- for people


def _pct(v: Any) -> str:
    x = _num(v)
    return "-" if x is None else f"{x:.1%}"


def _sec(v: Any) -> str:
    x = _num(v)
    return "-" if x is None else f"{x:.3f}s"


def _bytes(v: Any) -> str:
    x = _num(v)
    return "-" if x is None else human_bytes(x)


def format_status(s: Mapping[str, Any]) -> str:
    """The status as a few aligned lines and a device table (what `status` prints)."""
    lines = []
    src = " and ".join(f"{k} {v}" for k, v in (s.get("sources") or {}).items() if v is not None)
    lines.append(f"job {s['job']}: {s['state']} (from {src})")
    if s.get("note"):
        lines.append(f"  note: {s['note']}")
    if s.get("verified") is False:
        lines.append("  signatures NOT verified (give --device-keys and --aggregator-key): what "
                     "follows from the broker is what anyone able to publish there says")
    elif s.get("verified"):
        refused = s.get("unverified_topics") or {}
        lines.append("  signatures verified: only signed retained state is shown"
                     + (f"; ignored {len(refused)} unsigned or badly signed: "
                        + ", ".join(f"{t} ({r})" for t, r in sorted(refused.items()))
                        if refused else ""))
    rnd = (
        f"round {s['current_round']}/{s['rounds']} in progress"
        if s.get("current_round")
        else f"no round in progress ({s.get('rounds') or '-'} planned)"
    )
    lines.append(f"  {rnd}; committed rounds: {s.get('completed_round') or 0}")
    if s.get("answered") is not None:
        exp = s.get("expected") or []
        waiting = sorted(set(exp) - set(s["answered"]))
        lines.append(
            f"  answered {len(s['answered'])}/{len(exp)}"
            + (f" (waiting for {', '.join(waiting)})" if waiting else "")
        )
    if s.get("global_bytes"):
        which = "round's global adapter" if s.get("current_round") else "final adapter (retained)"
        lines.append(f"  {which}: {_bytes(s['global_bytes'])} to each device")
    last = s.get("last_round")
    if last:
        lat = last["latency_s"]
        lines.append(
            f"  last committed round {last['round']}: clients {last['clients']}/"
            f"{last['active'] or last['clients']} | held-out {_pct(last['heldout_acc'])} | "
            f"pers {_pct(last['personalization_acc'])} | global "
            f"{_pct(last['global_test_acc'])} | wall {_sec(last['round_wall_s'])}"
        )
        lines.append(
            f"    update latency p50 {_sec(lat['p50'])} p95 {_sec(lat['p95'])} max "
            f"{_sec(lat['max'])} | per client down {_bytes(last['bytes_down_per_client'])} "
            f"up {_bytes(last['bytes_up_per_client'])} | round total down "
            f"{_bytes(last['bytes_down'])} up {_bytes(last['bytes_up'])}"
        )
        if last.get("codec_savings"):
            lines.append(f"    {last['codec_savings']}")
    dp = s.get("privacy")
    if isinstance(dp, dict):
        eps = dp.get("epsilon")
        lines.append(
            f"  central DP: epsilon {'inf' if eps is None else format(eps, '.3g')} at delta "
            f"{dp.get('delta'):.3g} after {dp.get('rounds')} round(s) (z "
            f"{dp.get('noise_multiplier'):g}, clip {dp.get('clip'):.3g}, q "
            f"{dp.get('sampling_rate'):.3g}, {dp.get('accountant')})")
    run = s.get("run")
    if run:
        lat = run["latency_s"]
        lines.append(
            f"  whole run ({run['rounds']} rounds): accepted {run['accepted']} updates | "
            f"latency p50 {_sec(lat['p50'])} p95 {_sec(lat['p95'])} max {_sec(lat['max'])} | "
            f"down {_bytes(run['bytes_down'])} up {_bytes(run['bytes_up'])}"
        )
    if s.get("rejected") is not None:
        rej = s["rejected"]
        lines.append(
            "  rejected: " + (", ".join(f"{k} {v}" for k, v in rej.items()) if rej else "none")
        )
    elif s.get("sources", {}).get("out") is None:
        lines.append("  accuracy, latency, bytes, rejections: pass --out (the run folder)")
    devs = s.get("devices") or []
    as_of = (
        f" (as the aggregator saw them at its {s['devices_as_of']})"
        if s.get("devices_as_of")
        else ""
    )
    lines.append(f"  devices{as_of}: {s.get('devices_online', 0)} online of {len(devs)}")
    if devs:
        cols = ("client", "state", "backend", "samples", "dim", "last round", "codec")
        rows = [
            (
                d["client"],
                str(d.get("state") or "-"),
                str(d.get("backend") or "-"),
                str(d.get("samples") if d.get("samples") is not None else "-"),
                str(d.get("dim") or "-"),
                str(d.get("last_round") if d.get("last_round") is not None else "-"),
                str(d.get("codec") or "-"),
            )
            for d in devs
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        lines.append("    " + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            lines.append("    " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)
