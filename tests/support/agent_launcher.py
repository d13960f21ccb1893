"""`python -m support.agent_launcher ARGS...`: the device agent with a long MQTT keepalive.

Why: the fault tests hold a round open by freezing devices with SIGSTOP. A frozen client sends
no PINGREQ, so the broker drops it after 1.5 x keepalive (15 s by default: 22 s) and sends its
will, which ends the hold early on a loaded machine. 600 s keeps a frozen device connected
(and active) for as long as any test holds it; a killed one still gets its will at once (its
socket closes). Runs with `tests/` on PYTHONPATH (the tests' Procs set it).
"""

from __future__ import annotations

import sys

from fedclip_edge.broker import transport

KEEPALIVE_S = 600
_init = transport.MqttTransport.__init__


def _long_keepalive(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
    kwargs.setdefault("keepalive", KEEPALIVE_S)
    _init(self, *args, **kwargs)


transport.MqttTransport.__init__ = _long_keepalive  # type: ignore[method-assign]

if __name__ == "__main__":
    from fedclip_edge.device_agent.cli import main

    sys.exit(main())
