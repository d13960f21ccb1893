"""The run's plots: latency per round, bytes per client, accuracy over rounds.

Rules learnt from looking at them: integer round ticks; a log latency axis (or a linear one
from zero) because round 1 includes the devices' feature extraction; bars from zero for bytes,
so a 0.2% difference between clients does not fill the panel; clients drawn slightly apart so
identical lines do not hide each other; zero-shot as a dashed line in the client's colour.
matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedclip_edge.tables import finite as _num
from fedclip_edge.tables import human_bytes, percentile, seconds

MAX_PLOTTED_CLIENTS = 12
MARKERS = "osD^v<>pPhX*"


def client_rows(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each client's records, in round order."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("kind") == "client" and isinstance(r.get("client"), str):
            by.setdefault(r["client"], []).append(r)
    for rows in by.values():
        rows.sort(key=lambda r: int(r.get("round", 0)))
    return dict(sorted(by.items()))


def _save(fig: Any, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_rounds(ax: Any, rounds: Sequence[int]) -> None:
    """Round ticks are whole numbers (never 1.25, 1.5)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
    if rounds:
        ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)


def plot(records: list[dict[str, Any]], out: Path) -> Path | None:
    """PNG: update latency per round (log axis: round 1 includes the devices' feature
    extraction and would flatten the rest) and bytes per client per round as bars from zero
    (a 0.2% difference between clients must not fill the panel)."""
    by_client = client_rows(records)
    if not by_client:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    names = list(by_client)
    rounds = sorted({int(r["round"]) for rows in by_client.values() for r in rows})
    plotted: list[float] = []
    if len(names) <= MAX_PLOTTED_CLIENTS:
        # identical values must not hide each other: each client is drawn a little apart
        width = 0.5 / max(1, len(names))
        for i, name in enumerate(names):
            rows = by_client[name]
            xs = [int(r["round"]) + (i - (len(names) - 1) / 2) * width for r in rows]
            ys = [_num(r.get("update_latency_s")) for r in rows]
            ax1.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], ls="-", lw=1, label=name)
            plotted += [y for y in ys if y is not None]
    else:  # hundreds of devices: the spread per round, not one line each
        for q, style in ((50, "o-"), (90, "s--"), (100, "^:")):
            ys = []
            for rnd in rounds:
                vals = [
                    v
                    for rows in by_client.values()
                    for r in rows
                    if int(r["round"]) == rnd and (v := _num(r.get("update_latency_s"))) is not None
                ]
                ys.append(percentile(vals, q) if vals else float("nan"))
            ax1.plot(rounds, ys, style, label=f"p{q} of {len(names)} clients")
            plotted += [y for y in ys if y == y]
    if plotted and min(plotted) > 0 and max(plotted) / min(plotted) > 10:
        from matplotlib.ticker import LogLocator, NullFormatter

        ax1.set_yscale("log")
        ax1.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax1.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax1.set_ylim(bottom=0)  # a linear axis from zero: small differences stay small
    ax1.yaxis.set_major_formatter(lambda v, _pos: seconds(v))
    if rounds and rounds[0] == 1 and len(rounds) > 1:
        ax1.axvspan(
            0.5,
            1.5,
            color="0.9",
            zorder=0,
            label="round 1: includes the devices'\nfeature extraction",
        )
    ax1.set_ylabel("update latency\nglobal published -> update arrived")
    ax1.set_xlabel("round")
    ax1.set_title("latency per round", fontsize="medium")
    _integer_rounds(ax1, rounds)
    ax1.legend(fontsize="small")
    ax1.grid(True, which="major", alpha=0.3)

    shown = names if len(names) <= MAX_PLOTTED_CLIENTS else ["all clients (mean)"]

    def mean_bytes(key: str) -> list[float]:
        if len(names) <= MAX_PLOTTED_CLIENTS:
            groups = [by_client[n] for n in names]
        else:
            groups = [[r for rows in by_client.values() for r in rows]]
        out = []
        for rows in groups:
            vals = [v for r in rows if (v := _num(r.get(key))) is not None]
            out.append(sum(vals) / len(vals) if vals else 0.0)
        return out

    down, up = mean_bytes("bytes_down"), mean_bytes("bytes_up")
    ys = list(range(len(shown)))
    h = 0.38
    b1 = ax2.barh([y - h / 2 for y in ys], down, height=h, label="down (global adapter)")
    b2 = ax2.barh([y + h / 2 for y in ys], up, height=h, label="up (update)")
    for bars, vals in ((b1, down), (b2, up)):
        for bar, v in zip(bars, vals, strict=True):
            ax2.text(
                bar.get_width(),
                bar.get_y() + bar.get_height() / 2,
                f" {human_bytes(v)}",
                va="center",
                fontsize="x-small",
            )
    ax2.set_yticks(ys, shown, fontsize="small")
    ax2.invert_yaxis()
    from matplotlib.ticker import MaxNLocator

    ax2.set_xlim(0, max([*down, *up, 1.0]) * 1.3)
    ax2.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax2.xaxis.set_major_formatter(lambda v, _pos: human_bytes(v))
    ax2.set_xlabel("MQTT bytes (mean over rounds)")
    ax2.set_title("bytes per client per round", fontsize="medium")
    ax2.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    return _save(fig, out)


def plot_accuracy(
    records: list[dict[str, Any]],
    out: Path,
    *,
    heldout_zero_shot: float | None = None,
    heldout_name: str = "held-out",
) -> Path | None:
    """PNG: accuracy over rounds, each client on its own test split (after its local
    training) and the global adapter on the held-out domain; zero-shot as dashed lines in the
    same colour. None when the run has no accuracy to show (a load benchmark's devices)."""
    by_client = client_rows(records)
    heldout = sorted(
        (int(r["round"]), v)
        for r in records
        if r.get("kind") == "round" and (v := _num(r.get("heldout_acc"))) is not None
    )
    has_client_acc = any(
        _num(r.get("local_test_acc")) is not None for rows in by_client.values() for r in rows
    )
    if not heldout and not has_client_acc:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rounds = sorted({int(r["round"]) for rows in by_client.values() for r in rows})
    rounds = sorted({*rounds, *(r for r, _ in heldout)})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lo_hi = [rounds[0] - 0.5, rounds[-1] + 0.5] if rounds else [0, 1]
    drawn: list[float] = []
    dashed = False
    if has_client_acc and len(by_client) <= MAX_PLOTTED_CLIENTS:
        width = 0.4 / max(1, len(by_client))  # equal accuracies must not hide each other
        for i, (name, rows) in enumerate(by_client.items()):
            color = colors[i % len(colors)]
            pts = [(int(r["round"]), _num(r.get("local_test_acc"))) for r in rows]
            pts = [(x, y) for x, y in pts if y is not None]
            dx = (i - (len(by_client) - 1) / 2) * width
            ax.plot(
                [x + dx for x, _ in pts],
                [y for _, y in pts],
                marker=MARKERS[i % len(MARKERS)],
                ls="-",
                color=color,
                ms=5,
                label=f"{name} (own test split)",
            )
            drawn += [y for _, y in pts]
            zs = zero_shot(rows)
            if zs is not None:
                ax.plot(lo_hi, [zs, zs], ls="--", lw=1, color=color)
                drawn.append(zs)
                dashed = True
    elif has_client_acc:
        means = []
        for rnd in rounds:
            vals = [
                v
                for rows in by_client.values()
                for r in rows
                if int(r["round"]) == rnd and (v := _num(r.get("local_test_acc"))) is not None
            ]
            means.append(sum(vals) / len(vals) if vals else float("nan"))
        ax.plot(
            rounds,
            means,
            "o-",
            ms=4,
            color=colors[0],
            label=f"mean of {len(by_client)} clients (own test splits)",
        )
        drawn += [m for m in means if m == m]
        zss = [z for rows in by_client.values() if (z := zero_shot(rows)) is not None]
        if zss:
            zs = sum(zss) / len(zss)
            ax.plot(lo_hi, [zs, zs], ls="--", lw=1, color=colors[0])
            drawn.append(zs)
            dashed = True
    if heldout:
        ax.plot(
            [r for r, _ in heldout],
            [v for _, v in heldout],
            "s-",
            color="black",
            ms=4,
            label=f"{heldout_name} (global adapter)",
        )
        drawn += [v for _, v in heldout]
        if heldout_zero_shot is not None:
            ax.plot(lo_hi, [heldout_zero_shot] * 2, ls="--", lw=1, color="black")
            drawn.append(heldout_zero_shot)
            dashed = True
    if dashed:
        ax.plot([], [], ls="--", lw=1, color="0.4", label="zero-shot (same colour)")
    if drawn:  # at least 10 points tall: a 0.2-point wiggle must not fill the panel
        lo, hi = min(drawn), max(drawn)
        pad = max(0.02, (0.10 - (hi - lo)) / 2)
        ax.set_ylim(max(0.0, lo - pad), max(min(1.0, hi + pad), hi))
    ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
    ax.set_ylabel("test accuracy")
    ax.set_xlabel("round")
    ax.set_title("accuracy over rounds", fontsize="medium")
    _integer_rounds(ax, rounds)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _save(fig, out)


def zero_shot(rows: list[dict[str, Any]]) -> float | None:
    """The client's zero-shot accuracy: agents send it with their first update."""
    for r in reversed(rows):
        v = _num(r.get("zero_shot_acc"))
        if v is not None:
            return v
    return None
