"""The simulated fleet's envelopes built on demand (`FleetUpdates`, bench aggregator --sites).

Why: the 10,000-device bench cannot hold 10,000 precomputed envelopes; the ones built on demand
must be exactly what `encode_frame` and `Update.encode` give, and `mean` exactly the float64
mean of the frames sent.
"""

from __future__ import annotations

import pytest
import torch

from fedclip_edge.benchmarks.fleet import FleetUpdates, make_updates
from fedclip_edge.broker import protocol as P
from fedclip_edge.wire import decode_frame, encode_frame


@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_envelopes_on_demand_are_the_encoders_and_mean_is_exact(n: int) -> None:
    fleet = FleetUpdates(n, 4, seed=3, job="jf")
    total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in fleet.global_state.items()}
    for i in range(n):
        up = P.decode_message(fleet[i])
        assert isinstance(up, P.Update) and up.client == fleet.device_id(i) == fleet.ids[i]
        frame = decode_frame(up.frame)
        assert frame.client == up.client and (frame.job, frame.round) == ("jf", 1)
        assert bytes(up.frame) == encode_frame(frame.tensors, job="jf", round=1, client=up.client)
        for k in total:
            total[k] += frame.tensors[k].double()
    for k in total:
        assert torch.equal(total[k] / n, fleet.mean[k])
    assert fleet[0] == fleet[0]  # deterministic
    with pytest.raises(IndexError):
        fleet[n]
    ids, payloads, _, mean = make_updates(n, 4, seed=3, job="jf")
    assert ids == fleet.ids and payloads == [fleet[i] for i in range(n)]
