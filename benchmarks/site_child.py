"""One site aggregator of `bench aggregator --sites`, in its own process, instrumented.

Why a child process: its peak RSS and CPU must be the site's own. The parent writes a spec and
runs `python -m fedclip_edge.benchmarks.site_child SPEC`; this runs a `SiteAggregator` on the
site broker (devices' topics) with its upstream through the same broker under the bridge's
prefix, and writes spec['result'] (JSON): timings through `AggregatorHooks`, both links' bytes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from fedclip_edge.benchmarks.agg_child import BenchHooks, RxPrevalidating
from fedclip_edge.benchmarks.procstats import proc_status
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import AggregatorConfig
from fedclip_edge.broker.remap import RemappedMqttTransport
from fedclip_edge.broker.site import SiteAggregator
from fedclip_edge.errors import FedClipError


def serve(spec_path: Path) -> int:
    spec = json.loads(Path(spec_path).read_text())
    job, site = spec["job"], spec["site"]
    cfg = AggregatorConfig(
        job=job, rounds=1, out=Path(spec["out"]), min_clients=spec["n"],
        round_timeout_s=spec["round_timeout_s"], seed=spec["seed"], dim=spec["dim"],
        on_short="stop", wait_clients_s=spec["wait_clients_s"], upload_grace_s=0.0,
        connect_timeout_s=10.0,
        insecure_unsigned=True,  # precomputed unsigned fleet, as in agg_child
    )
    result: dict[str, Any] = {"ok": False}
    hooks = BenchHooks()
    local = RxPrevalidating(spec["url"], f"aggregator-{site}", manual_ack=True)
    up = RemappedMqttTransport(
        spec["url"], site, topic_prefix=spec["prefix"],
        will=(P.status_topic(job, site), P.offline_status(site), True),
    )
    with open(spec["log"], "a", buffering=1) as log_fh:
        agg = SiteAggregator(local, up, cfg, site=site, hooks=hooks,
                             log=lambda s: log_fh.write(f"{time.monotonic():.3f} {s}\n"))
        try:
            agg.run()
            result["ok"] = True
        except FedClipError as exc:
            result["error"] = str(exc)
        finally:
            local.close()
            up.close()
    result.update({
        "site": site,
        "accepted": agg.counters.get("accepted", 0),
        "rejected": {k: v for k, v in agg.counters.items() if k.startswith("rejected_")},
        "central_rounds": agg.central_rounds,
        "round_start": hooks.round_start, "round_close": hooks.closed_at,
        "round_wall_s": hooks.round_wall, "commit_s": hooks.commit_s,
        "handle_update_s": hooks.handle_update_s,
        "first_update_rx": local.first_rx, "last_update_rx": local.last_rx,
        "updates_rx": local.updates_rx,
        "local_link": local.counters.snapshot(), "upstream_link": up.counters.snapshot(),
        "peak_rss": proc_status().get("VmHWM"),
    })
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fedclip_edge.benchmarks.site_child SPEC.json")
    sys.exit(serve(Path(sys.argv[1])))
