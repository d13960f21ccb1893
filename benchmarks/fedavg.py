"""`fedclip-edge bench fedavg`: FedCLIP against full-model FedAvg, measured side by side.

Both methods run on the same clients (one per domain), splits, rounds, local epochs, loss,
optimizer settings and hardware, in one process. FedCLIP encodes every image once (timed), then
trains the adapter on cached features; full FedAvg fine-tunes the whole CLIP image tower on the
images every round and ships the whole tower. Nothing is estimated: every round of both really
runs, and the bytes are those of real wire frames (`fedclip_edge.wire`).

Fairness notes, also written into bench.json: images are decoded and preprocessed once for both
methods (FedAvg keeps the tensors in memory, which favours it); evaluation (accuracy after each
round) is timed separately and left out of the wall times that the speedups use; with the
in-process transport "transfer" is frame encoding plus decoding, not a network. With
`--transport mqtt` every down and up exchange goes through a real broker in the project's
protocol (`mqtt_link.MqttLink`: global and update envelopes on the job's topics): frame
encoding, QoS 1 publish, chunking above `--max-payload`, reassembly and decoding are timed, and
the bytes are the MQTT payload bytes the sender's transport counted (envelopes included).

Modules: the exchange in `mqtt_link.py`, the shared round loop in `rounds.py`, full FedAvg's
tower in `tower.py`, the markdown and plots in `render.py`, the command in `cli.py`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.benchmarks.mqtt_link import MqttLink, open_link, xfer
from fedclip_edge.benchmarks.procstats import machine_info
from fedclip_edge.benchmarks.render import fedavg_markdown, fedavg_plots
from fedclip_edge.benchmarks.rounds import Client, federate
from fedclip_edge.benchmarks.tower import param_count, run_fedavg, state_hash
from fedclip_edge.codecs import (
    DEFAULT_TOPK_FRACTION,
    SPARSE_CODECS,
    check_codec,
    check_topk_fraction,
)
from fedclip_edge.config import TrainConfig
from fedclip_edge.errors import ConfigError
from fedclip_edge.global_codec import derive_initial
from fedclip_edge.train import accuracy, train_local

SCHEMA = "fedclip-edge/bench-fedavg/v1"
# Parameter counts of CLIP ViT-B-32 (FEDCLIP.md), printed next to the measured ratios.
VIT_B_32 = {"clip": 151_277_313, "image_tower": 87_849_216, "adapter": 525_312}


def run_bench(
    data: Path,
    out: Path,
    *,
    model: str = "fedclip-tiny",
    pretrained: str | None = None,
    clients: int = 3,
    rounds: int = 3,
    local_epochs: int = 1,
    test_domain: str | None = None,
    per_client: int | None = None,
    cfg: TrainConfig | None = None,
    dtype: str = "float32",
    fedavg_dtype: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    transport: str = "inproc",
    broker: str | None = None,
    max_payload: int | None = None,
    update_codec: str | None = None,
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
    global_codec: str | None = None,
    global_topk_fraction: float | None = None,
    log=print,
) -> dict[str, Any]:
    """Run both methods and write OUT/bench.json, bench.md and the plots (after every round).

    update_codec: FedCLIP's updates travel in this codec (the global still goes down dense, in
    `dtype`); the report then compares its measured uplink bytes with the fp32 and fp16
    adapter frames and full FedAvg's tower frame.

    global_codec: the global goes down as the change since the last round in this codec, with
    the server's error feedback (fedclip_edge.global_codec); round 1's goes down dense.

    transport "mqtt": every exchange goes through `broker` (default: a private mosquitto, or the
    embedded broker, on a free loopback port), chunked above `max_payload` bytes."""
    from fedclip_edge.broker.protocol import DEFAULT_MAX_PAYLOAD
    from fedclip_edge.data.folder import load_image, scan_dataset
    from fedclip_edge.data.split import split_indices
    from fedclip_edge.models import encode_prompts, load_model
    from fedclip_edge.simulate import write_json

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch here")
    for flag, value in (("--rounds", rounds), ("--clients", clients), ("--local-epochs",
                                                                        local_epochs)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if transport not in ("inproc", "mqtt"):
        raise ConfigError(f"unknown --transport {transport!r}; choose inproc or mqtt")
    if update_codec is not None:
        try:
            check_codec(update_codec)
            check_topk_fraction(topk_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if dtype != "float32":
            raise ConfigError("--fp16 ships the adapter in fp16 both ways; with --update-codec "
                              "the global goes down fp32 and the codec sets the uplink: give one")
    if global_codec is not None:
        try:
            check_codec(global_codec)
            check_topk_fraction(global_topk_fraction or topk_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if dtype != "float32":
            raise ConfigError("--fp16 ships the adapter in fp16 both ways; with --global-codec "
                              "the codec sets the downlink: give one")
    max_payload = max_payload or DEFAULT_MAX_PAYLOAD
    if transport == "mqtt" and not 4096 <= max_payload <= 268_435_455:
        raise ConfigError("--max-payload must be 4096..268435455 bytes (MQTT's limit)")
    cfg = (cfg or TrainConfig()).with_overrides(epochs=local_epochs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = scan_dataset(Path(data))
    domains = [d for d in dataset.domains if d != test_domain]
    if test_domain is not None and test_domain not in dataset.domains:
        raise ConfigError(
            f"test domain {test_domain!r} is not in {data} (has: {', '.join(dataset.domains)})"
        )
    if clients < 1 or clients > len(domains):
        raise ConfigError(
            f"--clients must be 1..{len(domains)} (one client per domain"
            f"{' besides the held-out one' if test_domain else ''}), got {clients}"
        )
    names = domains[:clients]
    loaded = load_model(model, pretrained, device=device)
    text = encode_prompts(loaded, list(dataset.classes)).to(device)
    scale = loaded.logit_scale

    # images decoded and preprocessed once, for both methods
    def load_split(records) -> tuple[torch.Tensor, torch.Tensor]:
        if not records:
            size = loaded.preprocess_cfg["size"]
            return torch.zeros(0, 3, *size), torch.zeros(0, dtype=torch.long)
        px = torch.stack([loaded.preprocess(load_image(r.path)) for r in records])
        return px.to(device), torch.tensor([r.label for r in records], device=device)

    parts: list[Client] = []
    for name in names:
        recs = dataset.records[name]
        if per_client is not None:
            recs = [
                recs[i]
                for i in torch.randperm(len(recs), generator=torch.Generator().manual_seed(seed))[
                    :per_client
                ].tolist()
            ]
        tr, va, te = split_indices(len(recs), seed)
        pix, lab = {}, {}
        for split, ix in (("train", tr), ("val", va), ("test", te)):
            pix[split], lab[split] = load_split([recs[i] for i in ix])
        parts.append(Client(name, pix, lab))
    held = load_split(dataset.records[test_domain]) if test_domain else None

    visual0 = loaded.model.visual
    tower_params = param_count(visual0)
    adapter_params = 2 * (loaded.embed_dim**2 + loaded.embed_dim)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "complete": False,
        "config": {
            "model": loaded.identity,
            "clients": names,
            "test_domain": test_domain,
            "rounds": rounds,
            "local_epochs": local_epochs,
            "train": cfg.to_dict(),
            "dtype": dtype,
            "update_codec": update_codec,
            "topk_fraction": topk_fraction if update_codec in SPARSE_CODECS else None,
            **({"global_codec": global_codec,
                "global_topk_fraction": global_topk_fraction or topk_fraction}
               if global_codec is not None else {}),
            "fedavg_dtype": fedavg_dtype,
            "device": device,
            "seed": seed,
            "transport": transport,
            "samples": {c.name: {s: int(v.numel()) for s, v in c.labels.items()} for c in parts},
        },
        "machine": {**machine_info(), "torch": torch.__version__},
        "params": {
            "image_tower": tower_params,
            "adapter": adapter_params,
            "whole_clip": param_count(loaded.model),
            "ratio_tower_to_adapter": tower_params / adapter_params,
            "ratio_clip_to_adapter": param_count(loaded.model) / adapter_params,
            "vit_b_32_reference": {
                "ratio_tower_to_adapter": VIT_B_32["image_tower"] / VIT_B_32["adapter"],
                "ratio_clip_to_adapter": VIT_B_32["clip"] / VIT_B_32["adapter"],
            },
        },
        "notes": [
            "images are decoded and preprocessed once for both methods; FedAvg keeps them as "
            "tensors in memory (favours FedAvg)",
            "wall times exclude evaluation, which is timed separately",
            "inproc transport: transfer seconds are wire-frame encoding plus decoding"
            if transport == "inproc"
            else "mqtt transport: transfer seconds are frame encoding, QoS 1 publish through "
            "the broker on loopback (chunked above max_payload), reassembly and decoding; bytes "
            "are MQTT payload bytes incl. chunk envelopes",
            *([f"global codec {global_codec}: from round 2 the global goes down as the server's "
               "delta frame (error feedback on the server), rebuilt and digest-checked on the "
               "client; round 1's is derived on the client from the job's seed (as the server "
               "makes it) and checked against the server's digest: its 64 hex characters are "
               "that round's downlink bytes (a mismatch would send it dense)"]
              if global_codec not in (None, "fp32") else []),
        ],
        "fedclip": {"rounds": []},
        "fedavg": {"rounds": []},
    }

    def save() -> None:
        write_json(out / "bench.json", report)

    with contextlib.ExitStack() as stack:
        link, binfo = stack.enter_context(
            open_link(transport, broker, names, max_payload, out / "broker")
        )
        if link is not None:
            report["config"]["broker"] = binfo
            report["config"]["max_payload"] = max_payload
            log(f"transport: mqtt via {binfo['kind']} at {binfo['url']}, chunks <= {max_payload} B")
        _run_methods(
            report,
            parts,
            loaded,
            text,
            scale,
            held,
            cfg,
            rounds=rounds,
            dtype=dtype,
            fedavg_dtype=fedavg_dtype,
            device=device,
            seed=seed,
            link=link,
            log=log,
            save=save,
            update_codec=update_codec,
            topk_fraction=topk_fraction,
            global_codec=global_codec,
            global_topk_fraction=global_topk_fraction,
        )
        if update_codec is not None:
            report["uplink"] = _uplink(report, parts[0].name, loaded.embed_dim, link, rounds)
            log(_uplink_line(report["uplink"]))
    report["speedups"] = _speedups(report)
    report["projections"] = [
        _projections(report, rounds=r, uplink_mbit=mbit) for r, mbit in ((50, 0.0), (200, 10.0))
    ]
    report["complete"] = True
    save()
    (out / "bench.md").write_text(fedavg_markdown(report))
    fedavg_plots(report, out)
    return report


def _run_methods(
    report: dict[str, Any],
    parts: list[Client],
    loaded: Any,
    text: torch.Tensor,
    scale: float,
    held: Any,
    cfg: TrainConfig,
    *,
    rounds: int,
    dtype: str,
    fedavg_dtype: str,
    device: str,
    seed: int,
    link: MqttLink | None,
    log: Any,
    save: Any,
    update_codec: str | None = None,
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
    global_codec: str | None = None,
    global_topk_fraction: float | None = None,
) -> None:
    """FedCLIP then full FedAvg, over the same clients and exchange (in-process or MQTT)."""
    visual0 = loaded.model.visual

    # ---- FedCLIP: features once, then adapter rounds --------------------------------------
    tower_hash_before = state_hash(visual0)
    t0 = time.perf_counter()
    n_img = 0
    with torch.no_grad():
        for c in parts:
            for split, px in c.pixels.items():
                c.features[split] = (
                    visual0(px).float()
                    if len(px)
                    else torch.zeros(0, loaded.embed_dim, device=device)
                )
                n_img += len(px)
        held_feats = visual0(held[0]).float() if held is not None else None
    extract_s = time.perf_counter() - t0
    report["fedclip"]["extraction"] = {
        "backend": f"torch-{device}",
        "images": n_img,
        "seconds": extract_s,
        "images_per_second": n_img / extract_s if extract_s else None,
    }
    log(f"fedclip: features of {n_img} images in {extract_s:.2f}s (torch {device})")
    torch.manual_seed(seed)
    global_adapter = AttentionAdapter(loaded.embed_dim).to(device)

    def train_adapter(local: AttentionAdapter, c: Client, gen: torch.Generator) -> tuple:
        res = train_local(
            local,
            c.features["train"],
            c.labels["train"],
            text,
            cfg,
            logit_scale=scale,
            generator=gen,
        )
        return res.loss, res.steps, res.samples

    def eval_adapter() -> tuple[dict[str, float], float | None]:
        accs = {
            c.name: accuracy(global_adapter, c.features["test"], c.labels["test"], text)
            for c in parts
        }
        gen = accuracy(global_adapter, held_feats, held[1], text) if held is not None else None
        return accs, gen

    federate(
        "fedclip",
        report["fedclip"],
        global_adapter,
        parts,
        rounds=rounds,
        dtype=dtype,
        seed=seed,
        start_wall=extract_s,
        state=lambda m: m.state_dict(),
        make_local=lambda: AttentionAdapter(loaded.embed_dim).to(device),
        train=train_adapter,
        evaluate=eval_adapter,
        log=log,
        save=save,
        link=link,
        update_codec=update_codec,
        topk_fraction=topk_fraction,
        global_codec=global_codec,
        global_topk_fraction=global_topk_fraction,
        derive=lambda: derive_initial(seed, loaded.embed_dim),
    )
    report["fedclip"]["tower_sha256_before"] = tower_hash_before
    report["fedclip"]["tower_sha256_after"] = state_hash(visual0)

    run_fedavg(
        report, parts, visual0, text, scale, held, cfg, rounds=rounds,
        fedavg_dtype=fedavg_dtype, seed=seed, link=link, log=log, save=save,
    )


def _uplink(report: dict[str, Any], client: str, dim: int, link: MqttLink | None,
            rounds: int) -> dict[str, Any]:
    """The codec's measured uplink bytes (mean per client per round over the run) beside the
    fp32 and fp16 adapter frames and full FedAvg's tower frame, each measured: the adapter
    frames by one more real exchange of a trained-size adapter over the same transport."""
    codec = report["config"]["update_codec"]
    up_codec = statistics.mean(x["bytes_up_per_client"] for x in report["fedclip"]["rounds"])
    up_tower = statistics.mean(x["bytes_up_per_client"] for x in report["fedavg"]["rounds"])
    adapter = AttentionAdapter(dim).state_dict()
    dense = {
        name: xfer(link, adapter, rnd=rounds + 1, client=client, dtype=dtype, down=False)[1]
        for name, dtype in (("fp32", "float32"), ("fp16", "float16"))
    }
    bytes_up = {codec: up_codec, **{k: v for k, v in dense.items() if k != codec}}
    return {
        "codec": codec,
        "topk_fraction": report["config"]["topk_fraction"],
        "bytes_up_per_client_round": bytes_up,
        "fedavg_tower_bytes_up_per_client_round": up_tower,
        "ratio_vs_fedavg_tower": {k: _ratio(up_tower, v) for k, v in bytes_up.items()},
        "ratio_vs_fp32_adapter": _ratio(dense["fp32"], up_codec),
        "how": f"{codec}: mean over the run's real updates (error feedback on); fp32/fp16: one "
        "real adapter frame each over the same transport; tower: full FedAvg's measured uplink",
    }


def _uplink_line(u: dict[str, Any]) -> str:
    parts = [
        f"{k} {v:,.0f} B ({u['ratio_vs_fedavg_tower'][k]:,.0f}x below the tower)"
        for k, v in u["bytes_up_per_client_round"].items()
    ]
    return "uplink per client per round: " + "; ".join(parts)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _speedups(report: dict[str, Any]) -> dict[str, Any]:
    fc, fa = report["fedclip"], report["fedavg"]
    r = len(fa["rounds"])
    comp_fc = statistics.mean(x["compute_s_mean"] for x in fc["rounds"])
    comp_fa = statistics.mean(x["compute_s_mean"] for x in fa["rounds"])
    bytes_fc = statistics.mean(
        x["bytes_up_per_client"] + x["bytes_down_per_client"] for x in fc["rounds"]
    )
    bytes_fa = statistics.mean(
        x["bytes_up_per_client"] + x["bytes_down_per_client"] for x in fa["rounds"]
    )
    wall_fc = fc["rounds"][-1]["cumulative_wall_s"]  # extraction included once
    wall_fa = fa["rounds"][-1]["cumulative_wall_s"]
    both_ways = {}
    if report["config"].get("global_codec") is not None:  # what each direction contributes
        up_fc, up_fa, down_fc, down_fa = (
            statistics.mean(x[f"bytes_{d}_per_client"] for x in m["rounds"])
            for d, m in (("up", fc), ("up", fa), ("down", fc), ("down", fa))
        )
        both_ways = {
            "bytes_per_round_up": _ratio(up_fa, up_fc),
            "bytes_per_round_down": _ratio(down_fa, down_fc),
            "fedclip_bytes_up_per_client_round": up_fc,
            "fedclip_bytes_down_per_client_round": down_fc,
            "fedclip_bytes_down_by_round": [x["bytes_down_per_client"] for x in fc["rounds"]],
        }
    return {
        **both_ways,
        "compute_per_round": _ratio(comp_fa, comp_fc),
        "bytes_per_round": _ratio(bytes_fa, bytes_fc),
        "end_to_end_wall": _ratio(wall_fa, wall_fc),
        "end_to_end_rounds": r,
        "fedclip_compute_s_per_client_round": comp_fc,
        "fedavg_compute_s_per_client_round": comp_fa,
        "fedclip_bytes_per_client_round": bytes_fc,
        "fedavg_bytes_per_client_round": bytes_fa,
        "fedclip_wall_s": wall_fc,
        "fedavg_wall_s": wall_fa,
        "param_ratio_tower_to_adapter": report["params"]["ratio_tower_to_adapter"],
    }


def _projections(report: dict[str, Any], rounds: int, uplink_mbit: float) -> dict:
    """Derived from the measured per-round figures, and labelled so. uplink_mbit 0 = the
    measured transport as is (no slower link added)."""
    fc, fa = report["fedclip"], report["fedavg"]
    per_fc = statistics.mean(x["wall_s"] for x in fc["rounds"])
    per_fa = statistics.mean(x["wall_s"] for x in fa["rounds"])
    up_fc = statistics.mean(x["bytes_up_per_client"] for x in fc["rounds"])
    up_fa = statistics.mean(x["bytes_up_per_client"] for x in fa["rounds"])
    link = uplink_mbit * 1e6 / 8 if uplink_mbit > 0 else math.inf
    wall_fc = fc["extraction"]["seconds"] + rounds * (per_fc + up_fc / link)
    wall_fa = rounds * (per_fa + up_fa / link)
    how = (
        f"each client uploading over its own {uplink_mbit:g} Mbit/s link"
        if uplink_mbit > 0
        else "on this machine's measured per-round wall time"
    )
    return {
        "label": f"PROJECTION from measured per-round means to {rounds} rounds, {how}",
        "rounds": rounds,
        "uplink_mbit_s": uplink_mbit,
        "fedclip_wall_s": wall_fc,
        "fedavg_wall_s": wall_fa,
        "ratio": _ratio(wall_fa, wall_fc),
    }


# Names this module had before the split.
render_markdown = fedavg_markdown
