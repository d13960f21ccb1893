"""The broker's own delivery rate: a plain paho subscriber, no project code.

Why: "the aggregator validates U updates/s" means little without what the same broker delivers
to a subscriber that does nothing with the messages, on the same machine, in the same run, with
the same publishers and payloads. This process imports only paho and the standard library (so
its rate is the broker's and paho's, not ours): it subscribes QoS 1 to `spec['topic']`, counts
messages and bytes, notes the first and last arrival (CLOCK_MONOTONIC, shared with the parent),
writes spec['result'] once it has `spec['n']` messages or at the deadline, and exits.

    python -m fedclip_edge.benchmarks.raw_child SPEC.json     (the parent waits for READY)
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any


def serve(spec_path: Path) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    spec = json.loads(Path(spec_path).read_text())
    n, deadline = int(spec["n"]), time.monotonic() + float(spec["timeout_s"])
    state: dict[str, Any] = {"count": 0, "bytes": 0, "first": None, "last": None}
    done, subscribed = threading.Event(), threading.Event()

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        now = time.monotonic()
        if state["first"] is None:
            state["first"] = now
        state["last"] = now
        state["count"] += 1
        state["bytes"] += len(msg.payload)
        if state["count"] >= n:
            done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=spec["client_id"],
                    protocol=mqtt.MQTTv311, clean_session=True)
    c.on_message = on_message
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(spec["topic"], qos=1)
    c.on_subscribe = lambda cl, u, mid, rc, p: subscribed.set()
    c.connect(spec["host"], int(spec["port"]), keepalive=60)
    c.loop_start()
    ok = subscribed.wait(10)
    print("READY" if ok else "NOT SUBSCRIBED", flush=True)
    while ok and not done.wait(0.2) and time.monotonic() < deadline:
        pass
    c.disconnect()
    c.loop_stop()
    first, last = state["first"], state["last"]
    state["rate_per_s"] = (
        state["count"] / (last - first) if first is not None and last > first else None
    )
    Path(spec["result"]).write_text(json.dumps(state))
    return 0 if state["count"] >= n else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fedclip_edge.benchmarks.raw_child SPEC.json")
    sys.exit(serve(Path(sys.argv[1])))
