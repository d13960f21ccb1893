"""The aggregator's cost per update, per codec, at ViT-B-32 width (d = 512), in process.

Why: issue 11 asks that no codec make the aggregator's ingest slower than the network it saves.
Columns: `Aggregator._handle` with no validation worker (envelope, frame decode with every check,
FedAvg add, bookkeeping); the worker's `_predecode` alone; `_handle` when the worker already
decoded. Median of N interleaved repeats (argument 1, default 15). Run with the repository on
PYTHONPATH and OMP_NUM_THREADS=1; numbers in docs/codecs.md.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.prevalidate import Decoded
from fedclip_edge.broker.roster import Device
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport, Received
from fedclip_edge.codecs import ErrorFeedback
from fedclip_edge.wire import encode_frame, encode_update

D, JOB = 512, "t"


def main(repeats: int) -> None:
    """Print one row per codec."""
    torch.set_num_threads(1)
    cfg = AggregatorConfig(job=JOB, rounds=1, out=Path(tempfile.mkdtemp()), dim=D,
                           insecure_unsigned=True)
    agg = Aggregator(MemoryTransport(MemoryBroker(), "aggregator"), cfg, log=lambda s: None)
    torch.manual_seed(0)
    glob = {k: v.clone() for k, v in AttentionAdapter(D).state_dict().items()}
    agg.global_state = glob
    agg.roster.put(Device("c", "online", {"train": 10}, "x", D))
    agg._round = 1
    agg._open = agg._decode_ctx = agg.engine.open(1, glob)
    g = torch.Generator().manual_seed(1)
    local = {k: v + 1e-3 * v.abs().mean() * torch.randn(v.shape, generator=g)
             for k, v in glob.items()}
    payloads = {}
    for codec in ("fp32", "fp16", "int8", "topk", "topk-int8"):
        if codec in ("fp32", "fp16"):
            dtype = "float32" if codec == "fp32" else "float16"
            frame = encode_frame(local, job=JOB, round=1, client="c", dtype=dtype)
        else:
            frame = encode_update(local, glob, codec=codec, job=JOB, round=1, client="c",
                                  feedback=ErrorFeedback())
        payloads[codec] = P.Update(JOB, 1, "c", 10, {}, frame).encode()
    topic = P.update_topic(JOB, "c")
    res: dict[str, dict[str, list[float]]] = {c: {"full": [], "after": [], "worker": []}
                                              for c in payloads}

    def handle(msg: Received) -> float:
        agg._open = agg._decode_ctx = agg.engine.open(1, glob)  # a fresh round each time
        t = time.perf_counter()
        agg._handle(msg)
        return time.perf_counter() - t

    for _ in range(repeats):
        for codec, pl in payloads.items():
            msg = Received(topic, pl, wire_bytes=len(pl))
            res[codec]["full"].append(handle(msg))
            t = time.perf_counter()
            pre = agg._predecode(msg)
            res[codec]["worker"].append(time.perf_counter() - t)
            res[codec]["after"].append(handle(Decoded(topic, pl, False, len(pl), 0.0, None, pre)))
    assert agg.counters["accepted"] == 2 * repeats * len(payloads), agg.counters
    print(f"d={D}, {repeats} repeats, median ms; the payload's time on a 10 Mbit/s uplink")
    print(f"{'codec':<10} {'payload B':>10} {'main loop (no worker)':>22} {'worker decode':>14}"
          f" {'main loop after worker':>23} {'10Mbit/s ms':>12}")
    for codec, r in res.items():
        m = {k: 1000 * statistics.median(v) for k, v in r.items()}
        n = len(payloads[codec])
        print(f"{codec:<10} {n:>10,} {m['full']:>22.2f} {m['worker']:>14.2f} "
              f"{m['after']:>23.2f} {n * 8 / 10e6 * 1000:>12.1f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
