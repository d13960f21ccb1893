"""The aggregator's Prometheus endpoint, scraped with urllib during and after a real short run
(in-memory transport), checked against the run folder; and the Grafana dashboard's queries."""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.federation import make_federation

from fedclip_edge.broker import report as M
from fedclip_edge.broker.prom import METRICS, MetricsServer, PromHooks, serve_metrics
from fedclip_edge.errors import ConfigError

DASHBOARD = Path(__file__).resolve().parents[3] / "deploy" / "grafana" / "fedclip-edge.json"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


class ScrapeMidRun(PromHooks):
    """Scrapes its own endpoint when round 2's updates are all in: a certain moment, on the
    aggregator's thread, while the round is still open."""

    def __init__(self) -> None:
        super().__init__()
        self.url = ""
        self.mid: dict = {}

    def round_closed(self, agg: Any, rnd: int) -> None:
        super().round_closed(agg, rnd)
        if rnd == 2:
            self.mid = scrape(self.url)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("prom") / "out"
    hooks = ScrapeMidRun()
    _, agg, _ = make_federation(out, rounds=3, hooks=hooks)
    server = serve_metrics(agg, hooks, "127.0.0.1", 0)
    hooks.url = server.url
    try:
        agg.run()
        agg.t.close()  # as the command does: agents' goodbyes no longer count as received
        after = scrape(server.url)
    finally:
        server.close()
    return {"out": out, "mid": hooks.mid, "after": after, "agg": agg, "url": server.url}


def test_mid_run_scrape_shows_the_round_in_progress(run) -> None:
    mid = run["mid"]
    assert value(mid, "fedclip_round_current") == 2
    assert value(mid, "fedclip_round_committed") == 1
    assert value(mid, "fedclip_rounds_completed_total") == 1
    assert value(mid, "fedclip_round_updates") == 3
    assert value(mid, "fedclip_updates_accepted_total") == 6
    assert value(mid, "fedclip_devices_online") == 3
    assert value(mid, "fedclip_devices_known") == 3
    assert value(mid, "fedclip_rounds_planned") == 3
    assert value(mid, "fedclip_round_wall_seconds_count") == 1


def test_final_scrape_agrees_with_the_run_folder(run) -> None:
    after, out = run["after"], run["out"]
    records = M.read_metrics(out / "metrics.jsonl")
    clients = [r for r in records if r["kind"] == "client"]
    rounds = [r for r in records if r["kind"] == "round"]
    assert value(after, "fedclip_rounds_completed_total") == 3
    assert value(after, "fedclip_round_committed") == 3
    assert value(after, "fedclip_round_current") == 0
    assert value(after, "fedclip_updates_accepted_total") == len(clients) == 9
    assert value(after, "fedclip_messages_rejected_total", reason="envelope") == 1
    assert value(after, "fedclip_messages_rejected_total", reason="duplicate") == 0
    assert value(after, "fedclip_update_bytes_up_total") == sum(r["bytes_up"] for r in clients)
    assert value(after, "fedclip_update_bytes_down_total") == sum(r["bytes_down"] for r in clients)
    assert value(after, "fedclip_update_latency_seconds_count") == 9
    assert value(after, "fedclip_update_latency_seconds_sum") == pytest.approx(
        sum(r["update_latency_s"] for r in clients)
    )
    assert value(after, "fedclip_update_latency_seconds_bucket", le="+Inf") == 9
    below = sum(r["update_latency_s"] <= 0.5 for r in clients)
    assert value(after, "fedclip_update_latency_seconds_bucket", le="0.5") == below
    assert value(after, "fedclip_round_wall_seconds_count") == 3
    assert value(after, "fedclip_round_wall_seconds_sum") == pytest.approx(
        sum(r["round_wall_s"] for r in rounds)
    )
    # 9 updates and 1 rejected message were handled
    assert value(after, "fedclip_update_handling_seconds_count") == 10
    snap = run["agg"].t.counters.snapshot()
    assert value(after, "fedclip_mqtt_payload_bytes_total", direction="sent") == snap["bytes_up"]
    assert (
        value(after, "fedclip_mqtt_payload_bytes_total", direction="received")
        == (snap["bytes_down"])
    )
    for reason in ("chunk", "chunk_hash", "chunk_oversize", "inbox_full"):
        got = value(after, "fedclip_transport_rejected_total", reason=reason)
        assert got == run["agg"].t.rejected[reason] == 0
    info = [k for k in after if k[0] == "fedclip_aggregator_info"]
    assert dict(info[0][1])["fedclip_job"] == "j1"


def test_served_names_are_the_documented_ones(run) -> None:
    families = {name for name, _ in run["after"]}
    for name, kind in METRICS.items():
        want = {
            "histogram": f"{name}_count",
            "counter": name,
            "gauge": name,
            "info": name,
        }[kind]
        assert want in families, name
    served = {n for n in families if n.startswith("fedclip_")}
    base = {re.sub(r"_(bucket|count|sum|created)$", "", n) for n in served}
    base = {n if n in METRICS else n + "_total" for n in base}
    assert base <= set(METRICS), base - set(METRICS)


def test_two_exporters_in_one_process_keep_separate_series(tmp_path: Path) -> None:
    a, b = PromHooks(), PromHooks()
    a.accepted.inc(5)
    sa, sb = MetricsServer(a.registry, port=0), MetricsServer(b.registry, port=0)
    try:
        assert sa.port != sb.port
        assert value(scrape(sa.url), "fedclip_updates_accepted_total") == 5
        assert value(scrape(sb.url), "fedclip_updates_accepted_total") == 0
        with pytest.raises(ConfigError, match="cannot serve metrics on 127.0.0.1"):
            MetricsServer(PromHooks().registry, port=sa.port)  # the port is taken
    finally:
        sa.close()
        sb.close()


# ----------------------------------------------------------------------------- the dashboard


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_the_dashboard_queries_only_metrics_the_exporter_serves(run) -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["panels"]
    exprs = _exprs(board)
    assert len(exprs) >= 8
    served = {name for name, _ in run["after"]}
    queried = {m for e in exprs for m in re.findall(r"\bfedclip_[a-z_]+", e)}
    assert queried, exprs
    assert queried <= served, sorted(queried - served)
    # every panel draws something, and the dashboard covers every metric family but the info
    bases = {re.sub(r"_(bucket|count|sum)$", "", m) for m in queried}
    assert set(METRICS) - {"fedclip_aggregator_info"} <= bases, set(METRICS) - bases
