"""`fedclip-edge bench codecs`: bytes and CPU cost of every update codec, side by side, one run.

For an adapter of width `dim` (512 = ViT-B-32) each codec encodes the same update against the
same global (with error feedback, as a device does) and the server decodes it back into the full
adapter (`wire.encode_update` / `wire.decode_update`: real frames, every check included). Timing
is interleaved (each repeat runs every codec once, so a busy neighbour on a shared machine hits
all codecs alike) and the median is reported. Bytes are the frames' lengths, compared with the
fp32 adapter frame and with full FedAvg's fp32 frame of the ViT-B-32 image tower, which is
built here (open_clip, random init: the size does not depend on the weights) and really encoded
with `wire.encode_frame`, unless `--no-tower`, when it is left out.

The update is a synthetic delta (Gaussian, 1e-3 of the weights' scale, like one round of the
learning preset): the top-k and int8 costs do not depend on the values' distribution, and the
accuracy of each codec is measured by `simulate --update-codec` (docs/codecs.md), not here.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.adapter import AttentionAdapter, adapter_param_count
from fedclip_edge.codecs import CODECS, DEFAULT_TOPK_FRACTION, ErrorFeedback, check_topk_fraction
from fedclip_edge.errors import ConfigError
from fedclip_edge.io import make_out_dir
from fedclip_edge.wire import decode_update, encode_frame, encode_update

SCHEMA = "fedclip-edge/bench-codecs/v1"
# The uplink the issue sizes things by (a fp32 ViT-B-32 adapter takes 1.7 s on it).
UPLINK_MBIT_S = 10.0
META = {"job": "bench-codecs", "round": 1, "client": "device-0"}


def tower_frame_bytes(arch: str = "ViT-B-32") -> dict[str, Any]:
    """Length of full FedAvg's fp32 frame of the image tower (weights and floating buffers, as
    `bench fedavg` ships it), from a random-init open_clip model really encoded."""
    import open_clip

    model = open_clip.create_model(arch, pretrained=None)
    state = {k: v.detach() for k, v in model.visual.state_dict().items() if v.is_floating_point()}
    params = sum(p.numel() for p in model.visual.parameters())
    nbytes = len(encode_frame(state, job=META["job"], round=1, client=META["client"]))
    del model, state
    return {"arch": arch, "params": params, "frame_bytes": nbytes, "how": "built and encoded"}


def _update(dim: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    global_state = AttentionAdapter(dim).state_dict()
    local = {k: v + 1e-3 * v.abs().mean() * torch.randn_like(v) for k, v in global_state.items()}
    return global_state, local


def _relative_error(got: dict, want: dict, base: dict) -> float:
    """||decoded delta - delta|| / ||delta|| for one update without feedback (what one round
    loses before error feedback carries it into the next)."""
    num = sum(float((got[k] - want[k]).double().pow(2).sum()) for k in want)
    den = sum(float((want[k] - base[k]).double().pow(2).sum()) for k in want)
    return (num / den) ** 0.5 if den else 0.0


def run_codec_bench(
    *,
    dim: int = 512,
    repeats: int = 20,
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
    codecs: tuple[str, ...] = CODECS,
    tower: bool = True,
    seed: int = 0,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every codec; returns the report (and writes OUT/bench.json when `out`)."""
    if dim < 1 or repeats < 1:
        raise ConfigError(f"dim and repeats must be >= 1, got {dim} and {repeats}")
    try:
        check_topk_fraction(topk_fraction)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    unknown = [c for c in codecs if c not in CODECS]
    if unknown:
        raise ConfigError(f"unknown codecs {unknown}; choose from {', '.join(CODECS)}")
    if out is not None:
        make_out_dir(out)  # before the measurements: a folder that cannot be made loses none
    global_state, local = _update(dim, seed)

    times: dict[str, dict[str, list[float]]] = {c: {"encode": [], "decode": []} for c in codecs}
    frames: dict[str, bytes] = {}
    for rep in range(repeats + 1):  # repeat 0 warms up and is not counted
        for codec in codecs:
            feedback = ErrorFeedback()
            t0 = time.perf_counter()
            frame = encode_update(
                local,
                global_state,
                codec=codec,
                feedback=feedback,
                topk_fraction=topk_fraction,
                **META,
            )
            t1 = time.perf_counter()
            decoded = decode_update(frame, global_state)
            t2 = time.perf_counter()
            if rep:
                times[codec]["encode"].append((t1 - t0) * 1e3)
                times[codec]["decode"].append((t2 - t1) * 1e3)
            frames[codec] = frame
            if rep == 0:
                times[codec]["rel_error"] = [_relative_error(decoded.tensors, local, global_state)]

    tower_info = tower_frame_bytes() if tower and dim == 512 else None
    fp32_bytes = len(encode_update(local, None, codec="fp32", **META))
    rows = []
    for codec in codecs:
        nbytes = len(frames[codec])
        up_ms = nbytes * 8 / (UPLINK_MBIT_S * 1e6) * 1e3
        row = {
            "codec": codec,
            "bytes": nbytes,
            "encode_ms": statistics.median(times[codec]["encode"]),
            "decode_ms": statistics.median(times[codec]["decode"]),
            "relative_error_one_round": times[codec]["rel_error"][0],
            "ratio_vs_fp32": fp32_bytes / nbytes,
            "uplink_ms_at_10mbit": up_ms,
            "uplink_ms_saved_vs_fp32": (fp32_bytes - nbytes) * 8 / (UPLINK_MBIT_S * 1e6) * 1e3,
        }
        if tower_info:
            row["ratio_vs_fedavg_tower"] = tower_info["frame_bytes"] / nbytes
        rows.append(row)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "dim": dim,
        "adapter_params": adapter_param_count(dim),
        "topk_fraction": topk_fraction,
        "repeats": repeats,
        "fp32_adapter_frame_bytes": fp32_bytes,
        "fedavg_tower": tower_info,
        "uplink_mbit_s": UPLINK_MBIT_S,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
        },
        "rows": rows,
    }
    log(format_table(report))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".bench.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, out / "bench.json")
        log(f"wrote {out / 'bench.json'}")
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table with the ratios, as the docs quote it."""
    tower = report["fedavg_tower"]
    lines = [
        f"update codecs at d={report['dim']} ({report['adapter_params']:,} adapter parameters), "
        f"top-k fraction {report['topk_fraction']:g}, median of {report['repeats']} runs; "
        f"load average {report['machine']['load_average'][0]:.2f} "
        f"on {report['machine']['cpus']} CPUs",
    ]
    head = (
        f"{'codec':<11} {'bytes':>11} {'vs fp32':>8} {'vs tower':>9} {'encode ms':>10} "
        f"{'decode ms':>10} {'10Mbit/s ms':>12} {'err 1 round':>12}"
    )
    lines += [head, "-" * len(head)]
    for r in report["rows"]:
        vs_tower = f"{r['ratio_vs_fedavg_tower']:,.0f}x" if "ratio_vs_fedavg_tower" in r else "-"
        lines.append(
            f"{r['codec']:<11} {r['bytes']:>11,} {r['ratio_vs_fp32']:>7.1f}x {vs_tower:>9} "
            f"{r['encode_ms']:>10.2f} {r['decode_ms']:>10.2f} {r['uplink_ms_at_10mbit']:>12.1f} "
            f"{r['relative_error_one_round']:>12.4f}"
        )
    if tower:
        lines.append(
            f"full FedAvg {tower['arch']} image tower: {tower['params']:,} parameters, fp32 frame "
            f"{tower['frame_bytes']:,} bytes ({tower['how']})"
        )
    else:
        lines.append("full FedAvg tower frame: not measured (--no-tower, or dim is not 512)")
    slow = [
        r["codec"]
        for r in report["rows"]
        if r["decode_ms"] > r["uplink_ms_saved_vs_fp32"] and r["codec"] != "fp32"
    ]
    lines.append(
        "decode cost vs uplink time saved against fp32 at "
        f"{report['uplink_mbit_s']:g} Mbit/s: "
        + (f"decoding costs more than it saves for {slow}" if slow else "every codec saves more")
    )
    return "\n".join(lines)
