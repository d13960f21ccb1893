"""The round engine that simulate, the aggregator and bench fedavg drive (engine.py), and its
in-process fleet (inprocess.py)."""

from fedclip_edge.rounds.engine import (
    BestRound,
    Fleet,
    LastRound,
    OpenRound,
    RoundEngine,
    RoundPlugin,
    RoundResult,
    Selector,
    Update,
    better,
)
from fedclip_edge.rounds.inprocess import InProcessFleet, Uplink, records

__all__ = [
    "BestRound",
    "Fleet",
    "InProcessFleet",
    "LastRound",
    "OpenRound",
    "RoundEngine",
    "RoundPlugin",
    "RoundResult",
    "Selector",
    "Update",
    "Uplink",
    "better",
    "records",
]
