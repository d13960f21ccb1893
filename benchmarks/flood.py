"""`fedclip-edge bench flood`: an honest round's time under a 30 s garbage flood (issue 22).

The setup of docs/reliability.md "The flood, measured", kept: a loopback mosquitto, the
aggregator with the command line's transport (paho, manual acknowledgements, the validation
worker, the per-sender rate limit, and in mode `after` the penalty box) in this process, a
signed job, 3 agents on small synthetic features (threads of one child process), and after
round 5 a flooder (its own process) that publishes 200-byte garbage, QoS 1, on one id's update
topic as fast as it can for `seconds`. The flooding id is either unregistered (not in the
job's device keys) or registered (in them, but no agent runs for it); `none` is the control run
(no message published: how much the round times of this machine spread by themselves).

Modes: `before` subscribes the wildcards `update/+` and `status/+` and has no penalty box: the
transport of merge2 (rate limit only); `after` is the command line's transport now (per-id
subscriptions, penalty box). Both run the same code otherwise.

A round's time here runs from its global going out (`round_started`) to its last update in
(`before_commit`): what a flood can delay. The commit and the reports after it (plots every few
rounds: seconds on a busy machine, flood or not) are reported apart as `cycle_s`.

Reported per case: quiet round median (rounds 2..5 and those after the flood), the slowest round
that overlaps the flood, flood messages published (PUBACKed), what reached the aggregator from
the flooding id, drops (rate limited, penalized, by mosquitto) and the load average.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

JOB = "flood"
AGENTS = ("dev-a", "dev-b", "dev-c")
FLOODER_ID = "dev-evil"
DIM = 16
TRAIN = {"lr": 1e-2, "weight_decay": 0.0, "loss": "ce", "batch_size": 8, "epochs": 1,
         "betas": [0.9, 0.98], "eps": 1e-6, "logit_scale": None}
CASES = (("before", "unregistered"), ("before", "registered"),
         ("after", "unregistered"), ("after", "registered"))


def key(key_id: str) -> Ed25519PrivateKey:
    """The same key in every process of the bench (derived from the id: a benchmark only)."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"flood:" + key_id.encode())
                                                .digest())


# ----------------------------------------------------------------------------- children


def _agents(url: str, run_s: float) -> None:
    """The 3 agents, threads of this process, until killed or `run_s` passes."""
    import torch

    from fedclip_edge.broker import authn
    from fedclip_edge.broker import protocol as P
    from fedclip_edge.broker.transport import MqttTransport
    from fedclip_edge.device_agent.agent import Agent, AgentConfig, LocalData

    text = torch.randn(3, DIM, generator=torch.Generator().manual_seed(0))
    for i, c in enumerate(AGENTS):
        g = torch.Generator().manual_seed(i + 1)
        labels = torch.arange(30) % 3
        data = LocalData(text[labels] + 0.8 * torch.randn(30, DIM, generator=g), labels, text,
                         10.0, backend="memory")
        cfg = AgentConfig(JOB, c, idle_timeout_s=run_s, poll_s=0.02, key=key(c),
                          aggregator_key=key("aggregator").public_key())
        t = MqttTransport(url, c, keepalive=600, will=(
            P.status_topic(JOB, c), authn.signed_will(c, JOB, cfg.session, cfg.key), True))
        a = Agent(t, cfg, data, log=lambda line: None)
        threading.Thread(target=a.run, daemon=True).start()
    time.sleep(run_s)


def _flooder(url: str, topic: str, seconds: float, result: str) -> None:
    """200-byte garbage, QoS 1, as fast as paho takes it (at most 1000 unacknowledged);
    topic `-`: nothing, the control run (the machine's own spread of round times)."""
    if topic == "-":
        time.sleep(seconds)
        Path(result).write_text(json.dumps({"published": 0}))
        return
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fedclip_edge.broker.transport import parse_broker_url

    host, port, *_ = parse_broker_url(url)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder")
    c.max_inflight_messages_set(1000)
    c.connect(host, port)
    c.loop_start()
    payload = b"FCMQ\x01" + os.urandom(195)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        info = c.publish(topic, payload, qos=1)
        n += 1
        if n % 1000 == 0:
            info.wait_for_publish(30)
    info.wait_for_publish(30)
    c.loop_stop()
    c.disconnect()
    Path(result).write_text(json.dumps({"published": n}))


# ----------------------------------------------------------------------------- one case


def run_case(mode: str, flooder: str, out: Path, *, seconds: float = 30.0,
             after_rounds: int = 5, round_timeout_s: float = 60.0,
             log: Any = print) -> dict[str, Any]:
    """One run: `mode` before/after, `flooder` registered/unregistered. Returns its report."""
    from fedclip_edge.broker import protocol as P
    from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig, AggregatorHooks
    from fedclip_edge.broker.mosquitto import run_mosquitto
    from fedclip_edge.broker.penalty import PenaltyBox
    from fedclip_edge.broker.prevalidate import PrevalidatingMqttTransport
    from fedclip_edge.broker.ratelimit import SenderRateLimit
    from fedclip_edge.signing import KeyRegistry

    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    ids = [*AGENTS, *((FLOODER_ID,) if flooder == "registered" else ())]
    topic = P.update_topic(JOB, FLOODER_ID)
    flood_topic = "-" if flooder == "none" else topic

    class Rx(PrevalidatingMqttTransport):
        from_flooder = 0

        def _on_raw(self, t: str, payload: bytes, retained: bool, token: Any = None) -> None:
            if t == topic:
                self.from_flooder += 1
            super()._on_raw(t, payload, retained, token)

    class Before(Aggregator):
        """merge2's subscriptions: the wildcards, whatever the job."""

        def _subscriptions(self) -> list[str]:
            return [P.update_filter(JOB), P.status_filter(JOB)]

        def _narrow(self) -> None:
            pass

    state: dict[str, Any] = {"rounds": {}, "cycles": {}, "flood": None, "proc": None,
                             "done_after": None}

    class Hooks(AggregatorHooks):
        def round_started(self, agg: Aggregator, rnd: int) -> None:
            state["rounds"][rnd] = [time.monotonic(), None]

        def before_commit(self, agg: Aggregator, rnd: int, wall_s: float) -> None:
            state["rounds"][rnd][1] = time.monotonic()  # the round's updates are all in

        def after_commit(self, agg: Aggregator, rnd: int, commit_s: float,
                         reports_s: float) -> None:
            now = time.monotonic()
            state["cycles"][rnd] = now - state["rounds"][rnd][0]
            if rnd == 5:
                state["flood"] = [now, None]
                state["proc"] = subprocess.Popen(
                    [sys.executable, "-m", "fedclip_edge.benchmarks.flood", "flooder", url,
                     flood_topic, str(seconds), str(out / "flooder.json")])
            proc = state["proc"]
            if proc is not None and state["flood"][1] is None and proc.poll() is not None:
                state["flood"][1] = now  # the flooder is done (it exits when its time is up)
                state["done_after"] = rnd
            if state["done_after"] is not None and rnd >= state["done_after"] + after_rounds:
                raise _Enough

    with run_mosquitto(out, extra="sys_interval 1") as mq:
        url = f"mqtt://127.0.0.1:{mq.port}"
        kw: dict[str, Any] = {}
        if mode == "after":
            kw["penalty"] = PenaltyBox(log=lines.append)
        t = Rx(url, f"aggregator-{JOB}", manual_ack=True, clean_session=True,
               rate_limit=SenderRateLimit(log=lines.append), **kw)
        cfg = AggregatorConfig(
            job=JOB, rounds=100_000, out=out / "run", min_clients=3,
            round_timeout_s=round_timeout_s,
            dim=DIM, wait_clients_s=120.0, upload_grace_s=0.0, train=TRAIN,
            registry=KeyRegistry({i: key(i).public_key() for i in ids}),
            signing_key=key("aggregator"), strategy="fedavg")
        agg = (Before if mode == "before" else Aggregator)(t, cfg, log=lines.append,
                                                           hooks=Hooks())
        agents = subprocess.Popen([sys.executable, "-m", "fedclip_edge.benchmarks.flood",
                                   "agents", url, str(seconds + 600)])
        load0 = os.getloadavg()
        try:
            agg.run()
        except _Enough:
            pass
        finally:
            load1 = os.getloadavg()
            agents.kill()
            agents.wait()
            if state["proc"] is not None:
                state["proc"].wait(120)
            t.close()
            mq_dropped = _mosquitto_dropped(url)
    flood_s = state["flood"]
    durations = {r: e - s for r, (s, e) in state["rounds"].items() if e is not None}
    during = {r: d for r, d in durations.items()
              if state["rounds"][r][1] > flood_s[0] and state["rounds"][r][0] < flood_s[1]}
    quiet = [d for r, d in durations.items() if r >= 2 and r not in during]
    published = json.loads((out / "flooder.json").read_text())["published"]
    report = {
        "mode": mode, "flooder": flooder, "flood_seconds": seconds,
        "flood_messages": published,
        "reached_aggregator": t.from_flooder,
        "quiet_round_median_s": statistics.median(quiet),
        "slowest_round_during_flood_s": max(during.values()) if during else None,
        "rounds_during_flood": len(during),
        "round_s": {r: round(d, 3) for r, d in sorted(durations.items())},
        # with the commit and the reports (plots every few rounds: seconds on a busy machine)
        "cycle_s": {r: round(d, 3) for r, d in sorted(state["cycles"].items())},
        "flood_rounds": sorted(during),
        "rate_limited": int(t.rejected.get("rate_limited", 0)),
        "penalized": int(t.rejected.get("penalized", 0)),
        "penalties": dict(t.penalty.penalties) if t.penalty is not None else {},
        "mosquitto_dropped": mq_dropped,
        "load_average": [round(x, 2) for x in (*load0, *load1)],
        "log": [ln for ln in lines if ln.startswith(("penalty:", "rate limit:"))],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


class _Enough(Exception):
    """Raised from the hook once enough rounds ran after the flood."""


def _mosquitto_dropped(url: str) -> int | None:
    """mosquitto's count of messages it dropped (queues full), from its retained $SYS topic."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from fedclip_edge.broker.transport import parse_broker_url

    host, port, *_ = parse_broker_url(url)
    got = threading.Event()
    value: list[int] = []

    def on_message(c: Any, u: Any, m: Any) -> None:
        value.append(int(m.payload))
        got.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sys-reader")
    c.on_message = on_message
    c.on_connect = lambda cl, *a: cl.subscribe("$SYS/broker/publish/messages/dropped")
    c.connect(host, port)
    c.loop_start()
    got.wait(8)  # $SYS topics are published every sys_interval (1 s here)
    c.loop_stop()
    c.disconnect()
    return value[0] if value else None


def run_bench(out: Path, *, seconds: float = 30.0, cases: tuple[tuple[str, str], ...] = CASES,
              round_timeout_s: float = 60.0, log: Any = print) -> list[dict[str, Any]]:
    """Every case in turn; bench_flood.json and one table row per case."""
    reports = []
    for mode, flooder in cases:
        log(f"flood bench: {mode}, {flooder} flooder ({seconds:g}s flood) ...")
        r = run_case(mode, flooder, out / f"{mode}-{flooder}", seconds=seconds,
                     round_timeout_s=round_timeout_s, log=log)
        log(table_row(r))
        reports.append(r)
    (out / "bench_flood.json").write_text(json.dumps(reports, indent=1))
    return reports


def table_row(r: dict[str, Any]) -> str:
    slow = r["slowest_round_during_flood_s"]
    drops = f"{r['rate_limited']} rate_limited, {r['penalized']} penalized" + (
        f", {r['mosquitto_dropped']} at mosquitto" if r["mosquitto_dropped"] else "")
    return (f"| {r['mode']} | {r['flooder']} | {r['flood_messages']:,} | "
            f"{r['reached_aggregator']:,} | {r['quiet_round_median_s']:.2f} s | "
            f"{'-' if slow is None else f'{slow:.2f} s'} ({r['rounds_during_flood']} rounds) | "
            f"{drops} | {' '.join(f'{x:.1f}' for x in r['load_average'][:1])}"
            f"-{r['load_average'][3]:.1f} |")


if __name__ == "__main__":
    if sys.argv[1] == "agents":
        _agents(sys.argv[2], float(sys.argv[3]))
    elif sys.argv[1] == "flooder":
        _flooder(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
    else:
        sys.exit("usage: python -m fedclip_edge.benchmarks.flood agents URL SECONDS | "
                 "flooder URL TOPIC SECONDS RESULT")
