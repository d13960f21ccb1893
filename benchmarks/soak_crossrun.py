"""The soak's `cross_run` fault: messages signed, with the real keys, for another run of the job.

Why: the red team replayed a first run's signed updates and `done` into a second run of the
same job id. The soak runs one job, so it makes what such a replay carries: a device's update
for the open round, signed with that device's own key, and a `done`, signed with the
aggregator's key, both for an older run (`broker/runbind.py`). The aggregator must refuse the
update (`run`; or duplicate/stale/future when the device or the round got there first) and
the agents must ignore the `done` (it is published live, not retained): the soak still ends
with every round committed and nothing lost.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.runbind import new_run_id
from fedclip_edge.signing import load_private_key


def older_run(run: str) -> str:
    """A run id that started before `run` (one second before, or at the epoch)."""
    try:
        start = int(run.split("-")[0], 16)
    except ValueError:
        start = 1
    return f"{max(0, start - 1):010x}-{secrets.token_hex(8)}"


def cross_run_payloads(keys: Path, job: str, rnd: int,
                       recorded: list[bytes]) -> tuple[str, bytes, bytes] | None:
    """(client, update, done) for round `rnd` of an older run than the recorded updates';
    None before any update was recorded."""
    ups = [m for m in (_update(p) for p in recorded) if m is not None and m.run]
    if not ups:
        return None
    up = ups[-1]
    old = older_run(up.run) if up.run else new_run_id(now=0)
    forged = dataclasses.replace(up, round=rnd, sig="", run=old)
    update = authn.sign(forged, load_private_key(keys / f"{up.client}.key")).encode()
    done = P.Control(job, "done", max(0, rnd - 1), max(rnd, 1), session="soak-replay", run=old)
    return up.client, update, authn.sign(done, load_private_key(keys / "aggregator.key")).encode()


def _update(payload: bytes) -> P.Update | None:
    try:
        m = P.decode_message(payload)
    except P.MessageRejected:
        return None
    return m if isinstance(m, P.Update) else None
