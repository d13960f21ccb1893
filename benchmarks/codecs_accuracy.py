"""Accuracy against bytes per codec, from `fedclip-edge simulate --update-codec` runs.

    python -m fedclip_edge.benchmarks.codecs_accuracy RUN_DIR... --out FOLDER [--tower-bytes N]

Each RUN_DIR holds one simulate summary.json (one codec, several seeds, same everything else).
Writes FOLDER/codecs_accuracy.json (per codec: personalization and held-out accuracy of the
selected model and of the last round, mean and spread over seeds, bytes per client per round,
their ratios to fp32 and to the tower frame) and FOLDER/codecs_accuracy.png (mean test accuracy
of the clients against cumulative uplink bytes per client, one line per codec), and prints a
Markdown table. Reads only what simulate wrote: nothing is re-run or estimated here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _spread(xs: list[float]) -> dict[str, float]:
    return {
        "mean": _mean(xs),
        "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0,
        "min": min(xs),
        "max": max(xs),
    }


def summarize(summary: dict[str, Any]) -> dict[str, Any]:
    """One codec's numbers from its summary.json (per seed, then over seeds)."""
    runs = summary["per_seed"]
    sel_pers = [_mean(list(r["personalization_acc"].values())) for r in runs]
    sel_gen = [r["generalization_acc"] for r in runs]
    last_pers = [_mean(list(r["history"][-1]["test_acc"].values())) for r in runs]
    last_gen = [r["history"][-1]["generalization_acc"] for r in runs]
    curve_bytes: list[float] = []
    curve_both: list[float] = []  # up + down, where simulate counted the downlink per round
    curve_acc: list[float] = []
    cumulative = both = 0.0
    rounds = len(runs[0]["history"])
    for i in range(rounds):
        per_seed_up = [_mean(list(r["history"][i]["up_bytes"].values())) for r in runs]
        cumulative += _mean(per_seed_up)
        curve_bytes.append(cumulative)
        # a dense (fp32) global costs the same every round: simulate writes that one figure
        down = [r["down_bytes_by_round"][i] if "down_bytes_by_round" in r
                else r["down_bytes_per_client_per_round"] if not summary.get("global_codec")
                else None for r in runs]
        if None not in down:
            both += _mean(per_seed_up) + _mean(down)
            curve_both.append(both)
        curve_acc.append(_mean([_mean(list(r["history"][i]["test_acc"].values())) for r in runs]))
    return {
        "codec": summary["update_codec"],
        "topk_fraction": summary.get("topk_fraction"),
        "seeds": summary["seeds"],
        "rounds": summary["rounds"],
        "up_bytes_per_client_per_round": summary["up_bytes_per_client_per_round"],
        "down_bytes_per_client_per_round": summary["down_bytes_per_client_per_round"],
        "selected": {"personalization": _spread(sel_pers), "held_out": _spread(sel_gen)},
        "last_round": {"personalization": _spread(last_pers), "held_out": _spread(last_gen)},
        "zero_shot_personalization": _mean(list(summary["zero_shot_test"].values())),
        "curve": {"cumulative_up_bytes": curve_bytes, "mean_test_acc": curve_acc,
                  **({"cumulative_up_down_bytes": curve_both} if curve_both else {})},
        **({"global_codec": summary["global_codec"],
            # unset: the uplink's fraction (simulate's default for the downlink)
            "global_topk_fraction": summary.get("global_topk_fraction")
            or summary.get("topk_fraction")}
           if summary.get("global_codec") else {}),
    }


def _label(row: dict[str, Any], both_ways: bool = False) -> str:
    up = (f"{row['codec']} {row['topk_fraction']:g}" if row["codec"] in ("topk", "topk-int8")
          else row["codec"])
    if not both_ways:
        return up
    down = row.get("global_codec", "fp32")
    if down in ("topk", "topk-int8"):
        down = f"{down} {row['global_topk_fraction']:g}"
    return f"{up} up / {down} down"


def table(rows: list[dict[str, Any]], tower_bytes: int | None) -> str:
    """Markdown: accuracy (points) and bytes per codec, differences and ratios against fp32."""
    base = next((r for r in rows if r["codec"] == "fp32"), rows[0])

    def pm(s: dict[str, float]) -> str:
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"

    head = (
        "| codec | personalization (selected) | Δ vs fp32 | held-out (selected) | Δ vs fp32 "
        "| personalization (round {r}) | held-out (round {r}) | bytes up / client / round "
        "| vs fp32 |" + (" vs FedAvg tower (ViT-B-32) |" if tower_bytes else "")
    ).format(r=base["rounds"])
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d_pers = 100 * (
            r["selected"]["personalization"]["mean"] - base["selected"]["personalization"]["mean"]
        )
        d_gen = 100 * (r["selected"]["held_out"]["mean"] - base["selected"]["held_out"]["mean"])
        ratio = base["up_bytes_per_client_per_round"] / r["up_bytes_per_client_per_round"]
        line = (
            f"| {_label(r)} | {pm(r['selected']['personalization'])} | {d_pers:+.2f} "
            f"| {pm(r['selected']['held_out'])} | {d_gen:+.2f} "
            f"| {pm(r['last_round']['personalization'])} | {pm(r['last_round']['held_out'])} "
            f"| {r['up_bytes_per_client_per_round']:,.0f} | {ratio:.1f}x |"
        )
        if tower_bytes and "tower_ratio_at_512" in r:
            line += f" {r['tower_ratio_at_512']:,.0f}x |"
        elif tower_bytes:
            line += " - |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, both_ways: bool = False) -> None:
    """Mean client test accuracy against cumulative uplink bytes per client (log x); with
    `both_ways`, against uplink plus downlink bytes (runs with a --global-codec)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    key = "cumulative_up_down_bytes" if both_ways else "cumulative_up_bytes"
    for r in rows:
        per_round = r["up_bytes_per_client_per_round"] + (
            r["down_bytes_per_client_per_round"] if both_ways else 0)
        ax.plot(
            r["curve"][key],
            [100 * a for a in r["curve"]["mean_test_acc"]],
            marker=".",
            label=f"{_label(r, both_ways)} ({per_round / 1024:,.1f} KiB/round)",
        )
    zs = 100 * rows[0]["zero_shot_personalization"]
    ax.axhline(zs, color="grey", linestyle=":", label=f"zero-shot ({zs:.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink + downlink bytes per client" if both_ways
                  else "cumulative uplink bytes per client")
    ax.set_ylabel("mean test accuracy of the clients (%), mean over seeds")
    ax.set_title(
        f"FedCLIP {'codecs up and down' if both_ways else 'update codecs'}: "
        f"{rows[0]['rounds']} rounds, seeds {rows[0]['seeds']}, "
        "error feedback"
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="simulate output folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--bench",
        type=Path,
        action="append",
        default=[],
        help="bench codecs' bench.json at d=512 (repeatable, one per top-k fraction): adds each "
        "codec's ratio to full FedAvg's tower frame",
    )
    parser.add_argument(
        "--both-ways",
        action="store_true",
        help="plot against uplink + downlink bytes (runs with --global-codec; simulate counts "
        "the downlink per round)",
    )
    args = parser.parse_args(argv)
    rows = []
    for run in args.runs:
        path = run / "summary.json"
        if not path.is_file():
            print(f"error: {path} not found (run simulate into {run} first)", file=sys.stderr)
            return 2
        rows.append(summarize(json.loads(path.read_text())))
    tower_bytes = None
    ratios: dict[tuple[str, float | None], float] = {}
    for bench_path in args.bench:
        bench = json.loads(bench_path.read_text())
        if not bench.get("fedavg_tower"):
            continue
        tower_bytes = bench["fedavg_tower"]["frame_bytes"]
        for b in bench["rows"]:
            sparse = b["codec"] in ("topk", "topk-int8")
            ratios[(b["codec"], bench["topk_fraction"] if sparse else None)] = b[
                "ratio_vs_fedavg_tower"
            ]
    for r in rows:
        sparse = r["codec"] in ("topk", "topk-int8")
        key = (r["codec"], r["topk_fraction"] if sparse else None)
        if key in ratios:  # measured at d=512 with this codec and fraction
            r["tower_ratio_at_512"] = ratios[key]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "codecs_accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.both_ways and not all("cumulative_up_down_bytes" in r["curve"] for r in rows):
        print("error: --both-ways needs runs whose summary.json counts a compressed downlink "
              "per round (down_bytes_by_round: simulate with this version)", file=sys.stderr)
        return 2
    plot(rows, args.out / "codecs_accuracy.png", both_ways=args.both_ways)
    print(table(rows, tower_bytes))
    print(f"wrote {args.out / 'codecs_accuracy.json'} and {args.out / 'codecs_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
