"""The soak's own MQTT clients and fault building: a fault must land as planned, or the soak's
checks test the harness instead of the federation (CI once failed on a `cross_run` fault that a
back-off after a broker restart left unacknowledged, and on a replay that picked an earlier
forgery)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from support import mqtt as mh

from fedclip_edge.benchmarks.soak import Soak
from fedclip_edge.benchmarks.soak_mqtt import Injector
from fedclip_edge.benchmarks.soak_reconcile import _agent_sends
from fedclip_edge.broker.mosquitto import run_mosquitto


@pytest.mark.integration
@pytest.mark.mosquitto
def test_a_fault_right_after_a_broker_restart_is_acknowledged(tmp_path: Path) -> None:
    mh.require_mosquitto()
    port = mh.free_port()
    with run_mosquitto(tmp_path / "b1", port=port):
        inj = Injector(port)
        assert inj.publish("soak/x", b"before")
    try:
        deadline = time.monotonic() + 10
        while inj._connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not inj._connected.is_set(), "the injector never saw the broker go"
        time.sleep(3)  # paho's back-off grows while the broker is away
        with run_mosquitto(tmp_path / "b2", port=port):
            inbox = mh.Inbox()
            watcher = mh.connect_client(port, "watcher", inbox=inbox)
            try:
                mh.subscribe(watcher, "soak/#")
                assert inj.publish("soak/x", b"after")  # waits for the reconnect, then the ack
                assert inbox.wait_for("soak/x").payload == b"after"
            finally:
                mh.disconnect_client(watcher)
    finally:
        inj.close()


def test_faults_are_built_from_what_devices_sent_only() -> None:
    device = (0.0, "fedclip/j/update/dev-1", b"device bytes")
    forged = (1.0, "fedclip/j/update/dev-1", b"cross-run forgery")
    soak = SimpleNamespace(injected=[
        {"kind": "cross_run", "sha256": hashlib.sha256(forged[2]).hexdigest()},
        {"kind": "flood", "messages": 10},
    ])
    recorder = SimpleNamespace(snapshot=lambda: [device, forged])
    assert Soak.from_devices(soak, recorder) == [device]  # type: ignore[arg-type]


def test_a_resend_alone_counts_as_the_devices_send(tmp_path: Path) -> None:
    """A kill between the send and the round line leaves only the restarted agent's resend."""
    first, second = tmp_path / "dev-1.1.log", tmp_path / "dev-1.2.log"
    first.write_text("[dev-1] round 1 | samples 8 | loss 1.0 | upload 0.010s\n")
    second.write_text("[dev-1] round 2: reconnected, sending the queued update again\n")
    sends = _agent_sends([first, second], killed={first})
    assert sends["logged"] == {1, 2} and sends["acked"] == {1, 2}
