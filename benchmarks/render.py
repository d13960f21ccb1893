"""What a person reads of a benchmark: rich tables, the markdown summary and the plots.

Why apart from the measurements: every figure rendered here comes from the report dict (the
JSON written beside it), so a table can be redrawn from a saved report and cannot show a number
the JSON lacks.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

CONTENTION_WARN = 0.05  # other processes' share of the CPUs above which a row is flagged


def _mib(v: Any) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def _num(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def aggregator_table(report: dict[str, Any]) -> Any:
    """`bench aggregator`'s rows as a rich table."""
    from rich.table import Table

    m = report["machine"]
    table = Table(
        title=f"aggregator: one round, {report['broker']['kind']}, dim {report['config']['dim']}"
        f" ({m['cpu']}, {m['cpu_count']} cores)"
    )
    cols = (
        "N", "accepted", "loss", "upd/s", "broker raw/s", "ratio", "round s", "xfer s",
        "overhead s", "ms/upd",
        "commit s", "peak RSS MiB", "round +RSS MiB", "N x frame MiB", "backlog", "others CPU",
    )
    for c in cols:
        table.add_column(c, justify="right")
    for r in report["rows"]:
        share = r.get("others_cpu_share")
        table.add_row(
            str(r["devices"]),
            f"{r['accepted']}/{r['sent']}",
            str(r["loss"]),
            _num(r["updates_per_s"], ".1f"),
            _num(r.get("raw_delivery_per_s"), ".1f"),
            _num(r.get("ratio_to_raw"), ".2f"),
            _num(r["round_wall_s"], ".2f"),
            _num(r["transfer_s"], ".2f"),
            _num(r["overhead_s"], ".2f"),
            _num(r["handle_update_ms_mean"], ".2f"),
            _num(r["commit_s"], ".2f"),
            _mib(r["aggregator_peak_rss"]),
            _mib(r["rss_round_peak_growth"]),
            _mib(r["n_copies_bytes"]),
            str(r["max_inbox_backlog"]),
            "-" if share is None else f"{100 * share:.0f}%",
        )
    return table


def _contention(share: float | None) -> str:
    if share is None:
        return "-"
    text = f"{100 * share:.0f}%"
    return f"[red]{text}[/red]" if share > CONTENTION_WARN else text


def extractor_table(report: dict[str, Any]) -> Any:
    """`bench extractor`'s report as a rich table; rows under contention in red."""
    from rich.table import Table

    m = report["machine"]
    table = Table(
        title=f"extractor throughput: {m['cpu']} ({m['cpu_count']} cores)"
        + (f", {m['gpu']}" if m.get("gpu") else "")
    )
    for col, just in (
        ("artifact", "left"),
        ("backend", "left"),
        ("precision", "left"),
        ("batch", "right"),
        ("img/s", "right"),
        ("ms/batch", "right"),
        ("x torch eager", "right"),
        ("others' CPU", "right"),
    ):
        table.add_column(col, justify=just)
    for r in sorted(report["results"], key=lambda r: (r["batch"], r["artifact"], r["backend"])):
        ratio = r["ratio_to_torch_eager"]
        table.add_row(
            r["artifact"],
            r["extractor"],
            r["precision"],
            str(r["batch"]),
            f"{r['images_per_s']:.1f}",
            f"{1000 * r['median_s']:.1f}",
            f"{ratio:.2f}x" if ratio is not None else "-",
            _contention(r.get("others_cpu_share")),
        )
    return table


def fmt_bytes(n: float) -> str:
    """Decimal units (1 MB = 10^6 bytes), as network rates are counted."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def fedavg_markdown(report: dict[str, Any]) -> str:
    """The table a person reads; every figure comes from bench.json."""
    s, p, c, m = report["speedups"], report["params"], report["config"], report["machine"]
    acc_fc = report["fedclip"]["rounds"][-1]["personalization_acc_mean"]
    acc_fa = report["fedavg"]["rounds"][-1]["personalization_acc_mean"]
    vit = p["vit_b_32_reference"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    rows = [
        (
            "local compute per client per round",
            f"{s['fedclip_compute_s_per_client_round']:.4f} s",
            f"{s['fedavg_compute_s_per_client_round']:.3f} s",
            f"**{s['compute_per_round']:.0f}x**",
        ),
        (
            "bytes per client per round (down + up)",
            fmt_bytes(s["fedclip_bytes_per_client_round"]),
            fmt_bytes(s["fedavg_bytes_per_client_round"]),
            f"**{s['bytes_per_round']:.0f}x**",
        ),
        (
            f"wall time, {s['end_to_end_rounds']} rounds (FedCLIP incl. feature extraction)",
            f"{s['fedclip_wall_s']:.2f} s",
            f"{s['fedavg_wall_s']:.2f} s",
            f"**{s['end_to_end_wall']:.1f}x**",
        ),
        ("mean client test accuracy after the last round", f"{acc_fc:.1%}", f"{acc_fa:.1%}", ""),
    ]
    lines = [
        f"# FedCLIP vs full-model FedAvg: {c['model']['model']} ({c['model']['pretrained']})",
        "",
        f"Machine: {m.get('cpu')} ({m.get('cpu_count')} cores){gpu}; device {c['device']}; "
        f"torch {m.get('torch')}. Clients {', '.join(c['clients'])}; {c['rounds']} rounds, "
        f"{c['local_epochs']} local epoch(s), loss {c['train']['loss']}, lr {c['train']['lr']}, "
        f"frames: adapter {c['dtype']}, tower {c['fedavg_dtype']}.",
        "",
        "| measured | FedCLIP | full FedAvg | ratio |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {d} | {e} |" for a, b, d, e in rows],
        "",
        *_uplink_rows(report),
        "Parameter ratios (counts, not measurements): this model's image tower / adapter "
        f"{p['ratio_tower_to_adapter']:.0f}x, whole CLIP / adapter "
        f"{p['ratio_clip_to_adapter']:.0f}x; for ViT-B-32 {vit['ratio_tower_to_adapter']:.0f}x "
        f'and {vit["ratio_clip_to_adapter"]:.0f}x (the paper\'s "283x" is such a ratio).',
        "",
        *[
            f"{pr['label']}: FedCLIP {pr['fedclip_wall_s']:.0f} s, FedAvg "
            f"{pr['fedavg_wall_s']:.0f} s ({pr['ratio']:.0f}x)."
            for pr in report["projections"]
        ],
        "",
        "Notes: " + "; ".join(report["notes"]) + ".",
        "",
    ]
    return "\n".join(lines)


def _uplink_rows(report: dict[str, Any]) -> list[str]:
    """With --update-codec: the codec's measured uplink beside the dense adapter frames."""
    u = report.get("uplink")
    if not u:
        return []
    frac = f" (top-k fraction {u['topk_fraction']:g})" if u.get("topk_fraction") else ""
    rows = [
        f"| {k}{frac if k == u['codec'] else ''} | {fmt_bytes(v)} | "
        f"**{u['ratio_vs_fedavg_tower'][k]:,.0f}x** |"
        for k, v in u["bytes_up_per_client_round"].items()
    ]
    return [
        "| FedCLIP uplink per client per round | bytes | below full FedAvg's tower frame |",
        "|---|---|---|",
        *rows,
        f"| full FedAvg (tower) | {fmt_bytes(u['fedavg_tower_bytes_up_per_client_round'])} | |",
        "",
        f"{u['how']}.",
        "",
    ]


def fedavg_plots(report: dict[str, Any], out: Path) -> None:
    """Accuracy against cumulative wall time and bytes, both methods: OUT/accuracy_vs_cost.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, style in (("fedclip", "o-"), ("fedavg", "s--")):
        rounds = report[method]["rounds"]
        acc = [r["personalization_acc_mean"] for r in rounds]
        axes[0].plot([r["cumulative_wall_s"] for r in rounds], acc, style, label=method)
        axes[1].plot([r["cumulative_bytes"] / 1e6 for r in rounds], acc, style, label=method)
    axes[0].set_xlabel("cumulative wall time (s, FedCLIP incl. extraction)")
    axes[1].set_xlabel("cumulative bytes, all clients (MB)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_ylabel("mean client test accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle("FedCLIP vs full-model FedAvg (measured)")
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_cost.png", dpi=110)
    plt.close(fig)


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def infer_table(report: dict[str, Any]) -> Any:
    """`bench infer`'s backends as a rich table: end to end from JPEG bytes."""
    from rich.table import Table

    m = report["machine"]
    table = Table(title=f"classifier end to end from JPEG bytes: {m['cpu']} ({m['cpu_count']} "
                  "cores)" + (f", {m['gpu']}" if m.get("gpu") else ""))
    for col in ("model", "backend", "batch", "img/s", "p50 ms", "p99 ms", "decode ms",
                "x torch", "others' CPU"):
        table.add_column(col, justify="left" if col in ("model", "backend") else "right")
    for r in report["results"]:
        table.add_row(
            r["model"], r["backend"], str(r["batch"]), f"{r['images_per_s']:.1f}",
            f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['decode_ms']:.1f}",
            _num(r.get("ratio_to_torch"), ".2f") + ("x" if r.get("ratio_to_torch") else ""),
            _contention(r.get("others_cpu_share")),
        )
    return table


def infer_serve_lines(report: dict[str, Any]) -> list[str]:
    """The service against the bare classifier, as plain lines (every figure from the JSON)."""
    s = report.get("serve")
    if not s:
        return []
    svc, bare, sw = s["service"], s["bare"], s["service_during_swaps"]
    versions = ", ".join(f"{v} {n}" for v, n in sorted(s["answers_by_version"].items()))
    return [
        f"service ({s['model']}, {s['backend']}, max batch {s['max_batch']}, {s['clients']} "
        f"clients, {svc['seconds']:.0f} s): {svc['images_per_s']:.2f} img/s, p50 "
        f"{_num(svc['p50_ms'], '.0f')} ms, p99 {_num(svc['p99_ms'], '.0f')} ms; bare classifier "
        f"{bare['images_per_s']:.2f} img/s -> {_num(s['ratio'], '.2f')}x",
        f"the same load with hot swaps ({sw['seconds']:.0f} s): {sw['images_per_s']:.2f} img/s "
        f"({_num(s['ratio_during_swaps'], '.2f')}x the bare classifier), p99 "
        f"{_num(sw['p99_ms'], '.0f')} ms; swaps {s['swaps_done']} of {len(s['swaps'])} took "
        "effect (in " + ", ".join(_num(w["took_s"], ".1f") + " s" for w in s["swaps"])
        + f"; the answers changed version {s['version_changes_seen']} times); failed requests "
        f"{s['failed']} of {svc['requests'] + sw['requests']}; answers by version: {versions}",
    ]


def infer_markdown(report: dict[str, Any]) -> str:
    """The tables docs/benchmarks.md quotes."""
    m = report["machine"]
    la, lb = report["load_average_before"], report["load_average_after"]
    lines = [
        f"Machine: {m['cpu']} ({m['cpu_count']} cores); load average {la[0]:.2f} before, "
        f"{lb[0]:.2f} after.",
        "",
        "| model | backend | batch | img/s | p50 ms | p99 ms | decode ms | x torch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        ratio = r.get("ratio_to_torch")
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['batch']} | {r['images_per_s']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['decode_ms']:.1f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}x'} |"
        )
    lines += ["", *infer_serve_lines(report), ""]
    for g in report["goals"]:
        ratio = "" if g.get("ratio") is None else f"{g['ratio']:.2f}x (goal >= {g['min_ratio']}x) "
        lines.append(f"- goal: {g['what']} ({g['model']}): {ratio}"
                     f"{'met' if g['met'] else 'missed'}")
    for s in report["skipped"]:
        lines.append(f"- skipped {s['model']} {s['backend']}: {s['reason']}")
    return "\n".join(lines) + "\n"
