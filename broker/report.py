"""Latency and bandwidth bookkeeping for a federated run: metrics.jsonl, summary.json, the
end-of-run table and round lines (the plots are drawn by plots.py).

`OUT/metrics.jsonl` holds one JSON object per line: `kind: "client"` (one per client per round)
and `kind: "round"` (one per round). Durations are each side's own monotonic clock: devices
report what they measured (waiting for and receiving the global model, feature extraction,
training, upload until PUBACK), the aggregator adds what it measured (update latency from its
publish of the global to the update's arrival, the round's wall time). Nothing subtracts
timestamps taken on different machines.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fedclip_edge.broker.plots import (
    client_rows,
    plot,
    plot_accuracy,
    zero_shot,
)
from fedclip_edge.io import atomic_write_json, jsonable
from fedclip_edge.tables import finite as _num
from fedclip_edge.tables import human_bytes, pct, percentile, points, seconds, text_table

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


def bytes_by_codec(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Uplink bytes per update codec (`update_codec` of each client line; lines written before
    codecs existed count as their `update_dtype`'s codec), so a mixed fleet shows what each
    codec costs."""
    out: dict[str, int] = {}
    for r in rows:
        codec = codec_of(r)
        out[codec] = out.get(codec, 0) + int(_num(r.get("bytes_up")) or 0)
    return dict(sorted(out.items()))


def codec_of(row: Mapping[str, Any]) -> str:
    """A client line's update codec (lines from before codecs: their dtype's codec)."""
    codec = row.get("update_codec")
    if isinstance(codec, str):
        return codec
    return "fp16" if row.get("update_dtype") == "float16" else "fp32"


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
                "bytes_up_by_codec": bytes_by_codec(rows),
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
            "bytes_up_by_codec": bytes_by_codec(clients),
            "updates_by_codec": dict(sorted(Counter(codec_of(c) for c in clients).items())),
            "round_wall_s": sum(_num(r.get("round_wall_s")) or 0 for r in rounds),
        },
        "overall": {f: stats(c.get(f) for c in clients) for f in CLIENT_FIELDS},
        "round_wall_s": stats(r.get("round_wall_s") for r in rounds),
        "per_round": per_round,
    }


def final_rows(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per client, the end-of-run figures: zero-shot, the global adapter and the client's own
    adapter after local training in its last round (each on its own test split), the gain,
    mean bytes per round and latency percentiles. summary.json and the table share it."""
    out = {}
    for name, rows in client_rows(records).items():
        last = rows[-1]
        zs = zero_shot(rows)
        local = _num(last.get("local_test_acc"))
        # the first round includes feature extraction on the device: reported apart
        lat_all = [_num(r.get("update_latency_s")) for r in rows]
        first = lat_all[0]
        lat = [v for v in (lat_all[1:] if len(rows) > 1 else lat_all) if v is not None]

        def mean(key: str, rows: list[dict[str, Any]] = rows) -> float | None:
            vals = [v for r in rows if (v := _num(r.get(key))) is not None]
            return sum(vals) / len(vals) if vals else None

        out[name] = {
            "rounds": len(rows),
            "last_round": int(last.get("round", 0)),
            "zero_shot_acc": zs,
            "global_test_acc": _num(last.get("global_test_acc")),
            "local_test_acc": local,
            "gain": None if zs is None or local is None else local - zs,
            "bytes_down_per_round": mean("bytes_down"),
            "bytes_up_per_round": mean("bytes_up"),
            "latency_p50_s": percentile(lat, 50),
            "latency_p95_s": percentile(lat, 95),
            "latency_first_s": first,
        }
    return out


def final_table(
    records: list[dict[str, Any]],
    *,
    heldout_name: str | None = None,
    heldout_zero_shot: float | None = None,
) -> list[str]:
    """The table a run ends with (plain text: it reads the same in a terminal and a log)."""
    rows = final_rows(records)
    if not rows:
        return ["no client finished a round: nothing to report"]
    last = max(r["last_round"] for r in rows.values())
    body = [
        [
            name,
            pct(r["zero_shot_acc"]),
            pct(r["global_test_acc"]),
            pct(r["local_test_acc"]),
            points(r["gain"]),
            human_bytes(r["bytes_down_per_round"]),
            human_bytes(r["bytes_up_per_round"]),
            seconds(r["latency_p50_s"]),
            seconds(r["latency_p95_s"]),
            seconds(r["latency_first_s"]),
        ]
        for name, r in rows.items()
    ]
    heldout = [
        v
        for r in records
        if r.get("kind") == "round" and (v := _num(r.get("heldout_acc"))) is not None
    ]
    if heldout_name is not None and heldout:
        final = heldout[-1]
        gain = None if heldout_zero_shot is None else final - heldout_zero_shot
        body.append(
            [
                f"{heldout_name} (held out)",
                pct(heldout_zero_shot),
                pct(final),
                "-",
                points(gain),
                "-",
                "-",
                "-",
                "-",
                "-",
            ]
        )
    lines = text_table(
        [
            "client",
            "zero-shot",
            "global",
            "local",
            "gain",
            "down/round",
            "up/round",
            "latency p50",
            "p95",
            "first round",
        ],
        body,
    )
    return [
        f"result after round {last}, test accuracy on each client's own test split:",
        *lines,
        "global: the global adapter the client received for its last round; local: after its "
        "local training; gain: local - zero-shot, in points",
        "down/round, up/round: MQTT bytes per client per round (mean); latency: global "
        "published -> update arrived, over the client's rounds after its first (the first "
        "includes the device's feature extraction)",
    ]


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
            human_bytes(r.get("bytes_down")),
            human_bytes(r.get("bytes_up")),
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
        "bytes_up_by_codec": bytes_by_codec(rows),
        "updates_by_codec": dict(sorted(Counter(codec_of(r) for r in rows).items())),
        "rejected": {k: v for k, v in counters.items() if k.startswith("rejected_")},
    }


def codec_savings(row: Mapping[str, Any]) -> str:
    """'topk-int8 x2 41x fewer bytes than fp32, fp32 x1; round total 0.52x of all-fp32 (the
    global goes down dense)': what each codec saves on the way up, and why the round's total
    saves far less (every device downloads the dense fp32 global). The fp32 size of an update
    is the global's, which each device downloads: the same adapter, dense fp32."""
    counts = row.get("updates_by_codec") or {}
    by_codec = row.get("bytes_up_by_codec") or {}
    n = len(row.get("clients") or ())
    down = _num(row.get("bytes_down"))
    if not counts or not n or not down:
        return ""
    dense = down / n  # one fp32 global (envelope included), as each device downloaded it
    parts = []
    for codec, k in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        up = (_num(by_codec.get(codec)) or 0) / k
        if codec == "fp32" or not up:
            parts.append(f"{codec} x{k}")
        else:
            parts.append(f"{codec} x{k} {dense / up:.1f}x fewer bytes than fp32")
    if set(counts) == {"fp32"}:
        return "codec " + ", ".join(parts)
    total = down + (_num(row.get("bytes_up")) or 0)
    return (f"codecs {', '.join(parts)}; round total {total / (2 * down):.2f}x of all-fp32 "
            "(the global goes down dense)")


# After --resume devices send again what the new aggregator session may lack: refusals of these
# reasons are then the protocol working, not an attack (issue 21).
RESEND_REASONS = ("duplicate", "stale")
RESEND_NOTE = "expected after a resume: a device sending again what the new session may lack"


def refused_summary(refused: Mapping[str, tuple[str, str]]) -> str:
    """'2 devices refused: bad_signature (dev-2), unknown_key (site-a): <first message>': who
    was turned away at hello, by reason, with the first refusal's own words (its fix)."""
    if not refused:
        return ""
    by_reason: dict[str, list[str]] = {}
    for client, (reason, _) in sorted(refused.items()):
        by_reason.setdefault(reason, []).append(client)
    n = len(refused)
    first = next(iter(sorted(refused.items())))[1][1]
    listed = ", ".join(f"{r} ({', '.join(cs)})" for r, cs in sorted(by_reason.items()))
    return f"{n} device{'s' if n != 1 else ''} refused: {listed}: {first}"


def _per_client(total: Any, n: int) -> str:
    """'133 kB/client (399 kB total)': a total over clients is never mistaken for one's."""
    x = _num(total)
    if x is None or n < 1:
        return "-"
    if n == 1:
        return f"{human_bytes(x)}/client"
    return f"{human_bytes(x / n)}/client ({human_bytes(x)} total)"


def round_line(row: dict[str, Any], rounds: int) -> str:
    """The one line per round an operator reads in a log."""

    def num(v: Any, spec: str) -> str:
        return "-" if _num(v) is None else format(v, spec)

    rej = sum(row["rejected"].values())
    n = len(row["clients"])
    return (
        f"round {row['round']}/{rounds} | clients {n}/"
        f"{len(row['active']) or n} | loss {num(row['mean_loss'], '.4f')}"
        f" | acc local {pct(row['personalization_acc'])} global {pct(row['global_test_acc'])}"
        f" held-out {pct(row['heldout_acc'])} | latency p50 "
        f"{seconds(row['latency_p50_s'])} max {seconds(row['latency_max_s'])}"
        f" | down {_per_client(row['bytes_down'], n)} up {_per_client(row['bytes_up'], n)}"
        f" | wall {row['round_wall_s']:.2f}s | rejected {rej}"
        + (f" | {saving}" if (saving := codec_savings(row)) else "")
    )


def write_reports(
    out: Path, extra: Mapping[str, Any], *, draw: bool = True, log: Any = print
) -> None:
    """OUT/summary.json from metrics.jsonl, and the plot when asked (never stops a run)."""
    records = read_metrics(Path(out) / "metrics.jsonl")
    summary = summarize(records)
    summary["final"] = final_rows(records)
    summary.update(extra)
    atomic_write_json(Path(out) / "summary.json", summary)
    if not draw:
        return
    for name, draw_it in (
        ("latency.png", lambda p: plot(records, p)),
        (
            "accuracy.png",
            lambda p: plot_accuracy(
                records,
                p,
                heldout_zero_shot=_num(extra.get("heldout_zero_shot")),
                heldout_name=str(extra.get("eval_domain") or "held-out"),
            ),
        ),
    ):
        try:
            draw_it(Path(out) / name)
        except Exception as exc:  # a plot must never stop a federated run
            log(f"warning: could not draw {name}: {exc}")
