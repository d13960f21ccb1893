"""Latency and bandwidth bookkeeping for a federated run: metrics.jsonl, summary.json, a plot.

`OUT/metrics.jsonl` holds one JSON object per line: `kind: "client"` (one per client per round)
and `kind: "round"` (one per round). Durations are each side's own monotonic clock: devices
report what they measured (waiting for and receiving the global model, feature extraction,
training, upload until PUBACK), the aggregator adds what it measured (update latency from its
publish of the global to the update's arrival, the round's wall time). Nothing subtracts
timestamps taken on different machines.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedclip_edge.io import atomic_write_json, jsonable

CLIENT_FIELDS = (
    "bytes_down",
    "bytes_up",
    "global_wait_s",
    "global_transfer_s",
    "extract_s",
    "train_s",
    "upload_s",
    "update_latency_s",
)


def _num(v: Any) -> float | None:
    """A finite number, or None: metrics come from devices, so 10**400 or "x" are possible."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def percentile(xs: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) without numpy; None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats(xs: Iterable[Any]) -> dict[str, float | int | None]:
    vals = [v for v in (_num(x) for x in xs) if v is not None]
    return {
        "n": len(vals),
        "mean": sum(vals) / len(vals) if vals else None,
        "p50": percentile(vals, 50),
        "p90": percentile(vals, 90),
        "max": max(vals) if vals else None,
        "total": sum(vals) if vals else 0.0,
    }


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics.jsonl (a torn last line from a crash is skipped)."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def truncate_metrics(path: Path, last_round: int) -> None:
    """Keep only rounds <= last_round (resume: a round written but not committed is redone)."""
    keep = [r for r in read_metrics(path) if int(r.get("round", 0)) <= last_round]
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in keep))
    os.replace(tmp, path)


def append_metrics(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Append and fsync, so a committed round's lines are on disk before its state is."""
    text = "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in records)
    with open(path, "a") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals, per-round means and percentiles, over every field of CLIENT_FIELDS."""
    clients = [r for r in records if r.get("kind") == "client"]
    rounds = [r for r in records if r.get("kind") == "round"]
    per_round = []
    for rr in rounds:
        rnd = rr["round"]
        rows = [c for c in clients if c.get("round") == rnd]
        per_round.append(
            {
                "round": rnd,
                "clients": len(rows),
                "round_wall_s": rr.get("round_wall_s"),
                "heldout_acc": rr.get("heldout_acc"),
                "mean_loss": stats(c.get("loss") for c in rows)["mean"],
                **{f: stats(c.get(f) for c in rows) for f in CLIENT_FIELDS},
            }
        )
    return {
        "rounds": len(rounds),
        "client_rounds": len(clients),
        "clients": sorted({c["client"] for c in clients}),
        "totals": {
            "bytes_down": int(sum(_num(c.get("bytes_down")) or 0 for c in clients)),
            "bytes_up": int(sum(_num(c.get("bytes_up")) or 0 for c in clients)),
            "round_wall_s": sum(_num(r.get("round_wall_s")) or 0 for r in rounds),
        },
        "overall": {f: stats(c.get(f) for c in clients) for f in CLIENT_FIELDS},
        "round_wall_s": stats(r.get("round_wall_s") for r in rounds),
        "per_round": per_round,
    }


MAX_PLOTTED_CLIENTS = 12


def plot(records: list[dict[str, Any]], out: Path) -> Path | None:
    """PNG: per-round update latency and bytes (down/up) for each client."""
    clients = [r for r in records if r.get("kind") == "client"]
    if not clients:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    names = sorted({c["client"] for c in clients})
    if len(names) <= MAX_PLOTTED_CLIENTS:
        for name in names:
            rows = sorted((c for c in clients if c["client"] == name), key=lambda c: c["round"])
            xs = [c["round"] for c in rows]
            ax1.plot(xs, [_num(c.get("update_latency_s")) for c in rows], marker="o", label=name)
            ax2.plot(
                xs, [_num(c.get("bytes_down")) for c in rows], marker="v", label=f"{name} down"
            )
            ax2.plot(
                xs, [_num(c.get("bytes_up")) for c in rows], marker="^", ls="--", label=f"{name} up"
            )
    else:  # hundreds of devices: per-round spread, not one line each
        by_round: dict[int, list[dict[str, Any]]] = {}
        for c in clients:
            by_round.setdefault(c["round"], []).append(c)
        xs = sorted(by_round)

        def stat(key: str, q: float) -> list[float]:
            out = []
            for r in xs:
                vals = sorted(v for v in (_num(c.get(key)) for c in by_round[r]) if v == v)
                out.append(vals[min(len(vals) - 1, int(q * len(vals)))] if vals else float("nan"))
            return out

        for q, style in ((0.5, "o-"), (0.9, "s--"), (1.0, "^:")):
            ax1.plot(
                xs,
                stat("update_latency_s", q),
                style,
                label=f"p{int(q * 100)} of {len(names)} clients",
            )
            ax2.plot(xs, stat("bytes_up", q), style, label=f"up p{int(q * 100)}")
    ax1.set_ylabel("update latency (s)\nglobal publish -> update")
    ax2.set_ylabel("MQTT payload bytes")
    ax2.set_xlabel("round")
    ax1.legend(fontsize="small")
    ax2.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _fmt(v: Any, spec: str) -> str:
    x = _num(v)
    return "-" if x is None else format(x, spec)


def round_table(rnd: int, rows: list[dict[str, Any]]) -> Any:
    """A rich table of one round's clients (printed by the aggregator each round)."""
    from rich.table import Table

    t = Table(title=f"round {rnd}", title_justify="left", pad_edge=False)
    for col in (
        "client",
        "samples",
        "loss",
        "acc glob",
        "acc local",
        "down",
        "up",
        "extract s",
        "train s",
        "upload s",
        "latency s",
    ):
        t.add_column(col, justify="right")
    for r in sorted(rows, key=lambda r: r["client"]):
        t.add_row(
            r["client"],
            str(r.get("samples", "-")),
            _fmt(r.get("loss"), ".4f"),
            _fmt(r.get("global_test_acc"), ".1%"),
            _fmt(r.get("local_test_acc"), ".1%"),
            _fmt_bytes(_num(r.get("bytes_down"))),
            _fmt_bytes(_num(r.get("bytes_up"))),
            _fmt(r.get("extract_s"), ".2f"),
            _fmt(r.get("train_s"), ".3f"),
            _fmt(r.get("upload_s"), ".3f"),
            _fmt(r.get("update_latency_s"), ".3f"),
        )
    return t


def _mean(xs: list[Any]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def round_record(
    rnd: int,
    rows: list[dict[str, Any]],
    *,
    active: list[str],
    wall: float,
    retries: int,
    heldout: float | None,
    counters: Mapping[str, int],
) -> dict[str, Any]:
    """The round's line of metrics.jsonl (`kind: round`), from its clients' lines."""

    def vals(key: str) -> list[Any]:
        return [r[key] for r in rows if _num(r.get(key)) is not None]

    lat = [r["update_latency_s"] for r in rows]
    return {
        "kind": "round",
        "round": rnd,
        "clients": sorted(r["client"] for r in rows),
        "active": active,
        "round_wall_s": wall,
        "retries": retries,
        "mean_loss": _mean(vals("loss")),
        "personalization_acc": _mean(vals("local_test_acc")),
        "global_test_acc": _mean(vals("global_test_acc")),
        "heldout_acc": heldout,
        "latency_p50_s": percentile(lat, 50),
        "latency_max_s": max(lat) if lat else None,
        "bytes_down": sum(int(_num(r.get("bytes_down")) or 0) for r in rows),
        "bytes_up": sum(int(_num(r.get("bytes_up")) or 0) for r in rows),
        "rejected": {k: v for k, v in counters.items() if k.startswith("rejected_")},
    }


def round_line(row: dict[str, Any], rounds: int) -> str:
    """The one line per round an operator reads in a log."""

    def pct(v: Any) -> str:
        return "-" if _num(v) is None else f"{v:.1%}"

    def num(v: Any, spec: str) -> str:
        return "-" if _num(v) is None else format(v, spec)

    rej = sum(row["rejected"].values())
    return (
        f"round {row['round']}/{rounds} | clients {len(row['clients'])}/"
        f"{len(row['active']) or len(row['clients'])} | loss {num(row['mean_loss'], '.4f')}"
        f" | pers {pct(row['personalization_acc'])} | global {pct(row['global_test_acc'])}"
        f" | held-out {pct(row['heldout_acc'])} | latency p50 "
        f"{num(row['latency_p50_s'], '.3f')}s max {num(row['latency_max_s'], '.3f')}s"
        f" | down {_fmt_bytes(row['bytes_down'])} up {_fmt_bytes(row['bytes_up'])}"
        f" | wall {row['round_wall_s']:.2f}s | rejected {rej}"
    )


def write_reports(
    out: Path, extra: Mapping[str, Any], *, draw: bool = True, log: Any = print
) -> None:
    """OUT/summary.json from metrics.jsonl, and the plot when asked (never stops a run)."""
    records = read_metrics(Path(out) / "metrics.jsonl")
    summary = summarize(records)
    summary.update(extra)
    atomic_write_json(Path(out) / "summary.json", summary)
    if not draw:
        return
    try:
        plot(records, Path(out) / "latency.png")
    except Exception as exc:  # a plot must never stop a federated run
        log(f"warning: could not draw latency.png: {exc}")
