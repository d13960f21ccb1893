"""Who takes part in a job: devices seen on their status topics, and who answered this round.

Every message updates it in O(1): the round-done check reads two counters instead of
rebuilding sets over all devices (at 1000 devices a set rebuild per message made the round's
bookkeeping quadratic).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Device:
    client: str
    state: str = "online"
    samples: dict[str, int] = field(default_factory=dict)
    backend: str = ""
    dim: int = 0
    versions: dict[str, str] = field(default_factory=dict)
    session: str = ""  # the device process that said hello (its will carries the same)

    @property
    def active(self) -> bool:
        return self.state != "offline"


class Roster:
    """Devices by id, the active ones, and the round's answers, kept consistent together."""

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self._active: set[str] = set()
        self._answered: set[str] = set()
        self._waiting = 0  # active devices that have not answered this round

    # -- devices
    def __contains__(self, client: str) -> bool:
        return client in self.devices

    def __len__(self) -> int:
        return len(self.devices)

    def get(self, client: str) -> Device | None:
        return self.devices.get(client)

    @property
    def active(self) -> frozenset[str]:
        return frozenset(self._active)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def put(self, device: Device) -> None:
        """Add or replace a device (a hello), keeping the counters right."""
        self._leave(device.client)
        self.devices[device.client] = device
        if device.active:
            self._join(device.client)

    def set_state(self, client: str, state: str) -> None:
        dev = self.devices[client]
        was, dev.state = dev.active, state
        if was and not dev.active:
            self._leave(client)
        elif dev.active and not was:
            self._join(client)

    def _join(self, client: str) -> None:
        if client not in self._active:
            self._active.add(client)
            if client not in self._answered:
                self._waiting += 1

    def _leave(self, client: str) -> None:
        if client in self._active:
            self._active.discard(client)
            if client not in self._answered:
                self._waiting -= 1

    # -- the round
    def start_round(self) -> None:
        self._answered = set()
        self._waiting = len(self._active)

    def answered(self, client: str) -> None:
        if client in self._answered:
            return
        self._answered.add(client)
        if client in self._active:
            self._waiting -= 1

    @property
    def all_active_answered(self) -> bool:
        return self._waiting == 0

    # -- persistence (state.json)
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {c: asdict(d) for c, d in self.devices.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Roster:
        roster = cls()
        for d in data.values():
            roster.put(Device(**d))
        return roster
