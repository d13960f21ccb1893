"""The round engine's plug-ins in the aggregator: every accepted update passes `on_update`
before the strategy, `on_close` sees each committed round, and the plug-ins' state is saved
with the commit and restored by --resume (what DP's accountant and a global codec's residual
will need)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from support.federation import CLIENTS, make_federation

from fedclip_edge.rounds import OpenRound, RoundPlugin, RoundResult, Update


class Counting(RoundPlugin):
    def __init__(self) -> None:
        self.updates: list[tuple[int, str]] = []
        self.closed: list[int] = []

    def on_update(self, rnd: OpenRound, update: Update) -> Update:
        # the update arrives decoded against the round's global, a full adapter
        assert set(update.state) == set(rnd.global_state)
        self.updates.append((rnd.number, update.client))
        return update

    def on_aggregate(self, rnd: OpenRound, state: dict[str, torch.Tensor]) -> dict:
        return {k: torch.zeros_like(v) for k, v in state.items()}  # visible in the commit

    def on_close(self, result: RoundResult) -> None:
        self.closed.append(result.number)

    def state_dict(self) -> dict[str, int]:
        return {"updates": len(self.updates)}

    def load_state_dict(self, state) -> None:  # type: ignore[no-untyped-def]
        self.updates = [(0, "restored")] * int(state["updates"])


def test_plugins_see_every_update_and_their_state_survives_a_resume(tmp_path: Path) -> None:
    plugin = Counting()
    _, agg, threads = make_federation(tmp_path, rounds=2, plugins=(plugin,))
    final = agg.run()
    for th in threads:
        th.join(30)
    assert sorted(plugin.updates) == [(r, c) for r in (1, 2) for c in CLIENTS]
    assert plugin.closed == [1, 2]
    assert all(not v.any() for v in final.values())  # on_aggregate's result was committed
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["plugins"] == [{"updates": 6}]
    agg.t.close()

    again = Counting()
    _, resumed, _ = make_federation(tmp_path, rounds=2, plugins=(again,), resume=True,
                                    agents=False)
    resumed._init_state()
    assert len(again.updates) == 6 and resumed.completed == 2
    resumed.t.close()
