"""The round loop both methods of `bench fedavg` share, and what one round records.

Why one loop: FedCLIP and full FedAvg must differ only in what is trained and shipped (the
adapter or the whole image tower), never in how a round is run, timed or counted. The round
itself is the round engine's (`fedclip_edge.rounds`), which simulate and the aggregator drive
too; this module is the benchmark's fleet (timed exchanges, in process or over MQTT).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedclip_edge.benchmarks.mqtt_link import DownDelta, MqttLink, UpCodec, xfer
from fedclip_edge.codecs import DEFAULT_TOPK_FRACTION, DELTA_CODECS, ErrorFeedback
from fedclip_edge.global_codec import (
    DIGEST_HEX_BYTES,
    GlobalCodecPlugin,
    GlobalEncoder,
    state_digest,
)
from fedclip_edge.rounds import InProcessFleet, OpenRound, RoundEngine, Update
from fedclip_edge.strategy import FedAvg


@dataclass
class Client:
    """One client (one domain): its images, preprocessed once, and FedCLIP's features."""

    name: str
    pixels: dict[str, torch.Tensor]  # split -> [N,3,H,W] preprocessed images
    labels: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # FedCLIP's cache



def federate(
    name: str,
    record: dict[str, Any],
    global_model: torch.nn.Module,
    parts: list[Client],
    *,
    rounds: int,
    dtype: str,
    seed: int,
    start_wall: float,
    state,
    make_local,
    train,
    evaluate,
    log,
    save,
    link: MqttLink | None = None,
    update_codec: str | None = None,
    topk_fraction: float = DEFAULT_TOPK_FRACTION,
    global_codec: str | None = None,
    global_topk_fraction: float | None = None,
    derive: Callable[[], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Both methods' rounds, driven through the round engine (`fedclip_edge.rounds`, as
    simulate and the aggregator): ship the global model down, train locally, ship the update up
    (real wire frames, in process or over MQTT), average, then evaluate (timed apart), record,
    save.

    `update_codec`: the uplink's codec (as `agent --update-codec`); each client keeps its
    error-feedback residual across rounds, as a device does. `global_codec`: the downlink's
    (fedclip_edge.global_codec): from round 2 each client gets the server's delta frame and
    rebuilds the global from the one it holds (digest checked). Round 1's is `derive()`d on the
    client (from the job's seed) when given and its digest matches the server's: the digest
    (64 B) is all that round's downlink counts; else it goes down dense."""
    downlink = GlobalCodecPlugin(
        GlobalEncoder(global_codec or "fp32", job="bench",
                      topk_fraction=global_topk_fraction or topk_fraction)
    )
    compressed = downlink.encoder.active
    # evaluation is timed apart, below
    engine = RoundEngine(FedAvg("uniform"), plugins=[downlink] if compressed else [])
    held: dict[str, dict[str, torch.Tensor]] = {}  # each client's global (compressed only)
    cum_wall, cum_bytes = start_wall, 0
    feedback = {c.name: ErrorFeedback() for c in parts}
    base: dict[str, torch.Tensor] = {}  # the round's global on the CPU: the codecs' base

    def publish(rnd: OpenRound) -> None:
        nonlocal base
        base = (
            {k: v.detach().to("cpu", torch.float32).clone() for k, v in rnd.global_state.items()}
            if update_codec is not None
            else {}
        )

    def work(rnd: OpenRound, ci: int, client: str) -> Update:
        c = parts[ci]
        gdown = None
        if compressed and rnd.number > 1:
            assert downlink.last is not None and downlink.last.round == rnd.number
            gdown = DownDelta(downlink.last, held[c.name])
        derived = _derived(derive, rnd) if compressed and rnd.number == 1 else None
        if derived is not None:
            down, b_down, s_down, m_down = derived
        else:
            down, b_down, s_down, m_down = xfer(
                link, rnd.global_state, rnd=rnd.number, client=c.name, dtype=dtype, down=True,
                gdown=gdown,
            )
        if compressed:
            held[c.name] = {k: v.detach().to("cpu", torch.float32) for k, v in down.items()}
        local = make_local()
        local.load_state_dict(down, strict=False)
        t = time.perf_counter()
        loss, steps, samples = train(
            local, c, torch.Generator().manual_seed(seed * 1000 + rnd.number * 31 + ci)
        )
        compute = time.perf_counter() - t
        codec = None if update_codec is None else UpCodec(
            update_codec, base,
            feedback[c.name] if update_codec in DELTA_CODECS else None, topk_fraction,
        )
        up, b_up, s_up, m_up = xfer(
            link, state(local), rnd=rnd.number, client=c.name, dtype=dtype, down=False,
            samples=samples, up=codec,
        )
        del local
        return Update(c.name, up, samples, record={
            "compute_s": compute,
            "bytes_down": b_down,
            "bytes_up": b_up,
            "transfer_s": s_down + s_up,
            "messages_down": m_down,
            "messages_up": m_up,
            "loss": loss,
            "steps": steps,
        })

    fleet = InProcessFleet([c.name for c in parts], work, on_publish=publish)
    for rnd in range(1, rounds + 1):
        t_round = time.perf_counter()
        result = engine.run_round(rnd, state(global_model), fleet)
        assert result is not None  # every client answers in process
        per_client = result.answered
        global_model.load_state_dict(result.state, strict=False)
        wall = time.perf_counter() - t_round
        t = time.perf_counter()
        accs, gen = evaluate()
        eval_s = time.perf_counter() - t
        cum_wall += wall
        cum_bytes += sum(v["bytes_down"] + v["bytes_up"] for v in per_client.values())
        record["rounds"].append(
            round_record(rnd, per_client, wall, eval_s, accs, gen, cum_wall, cum_bytes)
        )
        log(round_line(name, rnd, rounds, per_client, wall, accs, gen))
        save()


def _derived(
    derive: Callable[[], dict[str, torch.Tensor]] | None, rnd: OpenRound
) -> tuple[dict[str, torch.Tensor], int, float, int] | None:
    """Round 1's global made on the client, if it is bit for bit the server's (its digest, the
    64 hex characters a device checks, is the round's only downlink byte count); else None."""
    if derive is None:
        return None
    t = time.perf_counter()
    state = derive()
    if state_digest(state) != state_digest(rnd.global_state):
        return None
    return state, DIGEST_HEX_BYTES, time.perf_counter() - t, 0


def round_record(rnd, per_client, wall, eval_s, accs, gen, cum_wall, cum_bytes) -> dict:
    return {
        "round": rnd,
        "clients": per_client,
        "wall_s": wall,
        "eval_s": eval_s,
        "compute_s_mean": statistics.mean(v["compute_s"] for v in per_client.values()),
        "bytes_up_per_client": statistics.mean(v["bytes_up"] for v in per_client.values()),
        "bytes_down_per_client": statistics.mean(v["bytes_down"] for v in per_client.values()),
        "transfer_s_mean": statistics.mean(v["transfer_s"] for v in per_client.values()),
        "personalization_acc": accs,
        "personalization_acc_mean": statistics.mean(accs.values()),
        "generalization_acc": gen,
        "cumulative_wall_s": cum_wall,
        "cumulative_bytes": cum_bytes,
    }


def round_line(method, rnd, rounds, per_client, wall, accs, gen) -> str:
    comp = statistics.mean(v["compute_s"] for v in per_client.values())
    up = statistics.mean(v["bytes_up"] for v in per_client.values())
    acc = statistics.mean(accs.values())
    held = f" | held-out {gen:.1%}" if gen is not None else ""
    return (
        f"{method:<7} round {rnd}/{rounds} | compute/client {comp:.3f}s | up/client "
        f"{up / 1e6:.3f} MB | wall {wall:.2f}s | acc {acc:.1%}{held}"
    )
