"""Issue 22 against a real mosquitto: the flood scenario of tests/support/flood.py with the
aggregator's command-line transport (paho, manual acknowledgements, the validation worker).

What only a real broker shows: the stranger's flood is not routed to the aggregator at all
(its transport never receives one of those messages, not just its handlers), and mosquitto still
delivers what it had queued for the aggregator before the UNSUBSCRIBE of evil's topics: those
arrive and are dropped as `penalized`, before decoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from support import flood
from support import mqtt as mh

from fedclip_edge.broker.prevalidate import PrevalidatingMqttTransport
from fedclip_edge.broker.transport import MqttTransport

pytestmark = pytest.mark.integration


class _Recording(PrevalidatingMqttTransport):
    """The aggregator's transport, recording every topic the broker sent it."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.topics: list[str] = []

    def _on_raw(self, topic: str, payload: bytes, retained: bool, token: Any = None) -> None:
        self.topics.append(topic)
        super()._on_raw(topic, payload, retained, token)


@pytest.mark.mosquitto
def test_a_flood_stays_at_mosquitto_and_the_honest_rounds_complete(tmp_path: Path) -> None:
    with mh.start_mosquitto(tmp_path) as (_, port):
        url = f"mqtt://127.0.0.1:{port}"
        clock, lines = flood.FakeClock(), []
        flooder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flooder")
        flooder.connect("127.0.0.1", port)
        flooder.loop_start()

        def publish_garbage(topic: str, n: int) -> None:
            infos = [flooder.publish(topic, b"FCMQ\x01garbage" + bytes([i % 256]) * 186, qos=1)
                     for i in range(n)]
            for info in infos:  # every one PUBACKed: the broker has routed it (or not)
                info.wait_for_publish(60)

        t = _Recording(url, "aggregator-flood", manual_ack=True, clean_session=True,
                       **flood.limits(clock, lines))
        devices = [flood.Device(MqttTransport(url, c), c, v)
                   for c, v in (("a", 1.0), ("b", 3.0), ("evil", 2.0))]
        hooks = flood.FloodHooks(clock, publish_garbage)
        agg = flood.make_aggregator(t, tmp_path / "run", hooks, lines)
        try:
            for d in devices:
                d.start()
            agg.run()
        finally:
            t.close()
            for d in devices:
                d.t.close()
            flooder.loop_stop()
            flooder.disconnect()
        flood.check(agg, hooks, lines)
        assert not [x for x in t.topics if "/stranger" in x]  # not routed here at all
        # evil: the burst went through (then rejected as garbage), the message that tripped
        # the limit was dropped, and what mosquitto had queued before the UNSUBSCRIBE arrived
        # and was dropped as `penalized`; everything else of its flood stayed at the broker
        evil_in = [x for x in t.topics if x.endswith("/evil")]
        assert t.rate_limit.dropped["evil"] == 1
        assert t.rejected["penalized"] == t.penalty.dropped["evil"] > 0
        handled = [x for x in agg.handled if x.endswith("/evil")]  # type: ignore[attr-defined]
        assert len(evil_in) == len(handled) + 1 + t.rejected["penalized"]
