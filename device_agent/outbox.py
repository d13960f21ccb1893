"""The outbox: an update waits here until the broker acknowledges it.

Robustness rests on the agent, not on broker queues (amqtt drops QoS 1 messages for offline
persistent sessions): an update not yet acknowledged stays in the outbox and is sent again after
a reconnect while its round is still open; it is dropped once a later round's global adapter
arrives. The agent's statuses (hello, online, uploaded, offline) go out from here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.transport import Delivery, Transport
from fedclip_edge.device_agent.agent_config import AgentConfig, LocalData
from fedclip_edge.device_agent.global_in import CAPABILITY


@dataclass
class _Outbox:
    round: int
    payload: bytes
    delivery: Delivery
    started: float



class Outbox:
    """The messages-out half of `Agent` (a mixin: the agent's state lives on the agent)."""

    t: Transport
    cfg: AgentConfig
    data: LocalData
    clock: Callable[[], float]
    log: Callable[[str], None]
    done: bool
    current_round: int
    last_trained: int
    last_upload_s: float | None
    job_run: str  # the job run this device holds: what it signs for
    _outbox: _Outbox | None
    _last_wire: int
    _sizes: dict[str, int]

    def _status(self, state: str, *, hello: bool = False, upload_s: float | None = None) -> None:
        st = P.Status(
            self.cfg.client_id, state, self._sizes, self.data.backend, self.data.dim,
            {**self.data.versions, **CAPABILITY}, round=self.last_trained, upload_s=upload_s,
            hello=hello,
            session=self.cfg.session, run=self.job_run,
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
