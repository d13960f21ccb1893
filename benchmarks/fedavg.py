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
`--transport mqtt` every down and up exchange goes through a real broker (`MqttLink`): frame
encoding, QoS 1 publish, chunking above `--max-payload`, reassembly and decoding are timed, and
the bytes are the MQTT payload bytes the sender's transport counted (chunk envelopes included).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from torch.nn import functional as F

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.config import TrainConfig
from fedclip_edge.errors import ConfigError, Interrupted
from fedclip_edge.losses import get_loss
from fedclip_edge.strategy import FedAvg
from fedclip_edge.train import accuracy, train_local
from fedclip_edge.wire import decode_frame, encode_frame

SCHEMA = "fedclip-edge/bench-fedavg/v1"
# Parameter counts of CLIP ViT-B-32 (FEDCLIP.md), printed next to the measured ratios.
VIT_B_32 = {"clip": 151_277_313, "image_tower": 87_849_216, "adapter": 525_312}


@dataclass
class Client:
    name: str
    pixels: dict[str, torch.Tensor]  # split -> [N,3,H,W] preprocessed images
    labels: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # FedCLIP's cache


def _param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _state_hash(module: torch.nn.Module) -> str:
    from fedclip_edge.models import state_sha256

    return state_sha256(module.state_dict())


def _exchange(
    state: dict[str, torch.Tensor], *, job: str, rnd: int, client: str, dtype: str
) -> tuple[dict[str, torch.Tensor], int, float]:
    """Encode and decode one frame: (tensors as received, bytes on the wire, seconds)."""
    t0 = time.perf_counter()
    frame = encode_frame(state, job=job, round=rnd, client=client, dtype=dtype)
    out = decode_frame(
        frame, expected={k: tuple(v.shape) for k, v in state.items()}, max_bytes=len(frame)
    )
    return out.tensors, len(frame), time.perf_counter() - t0


class MqttLink:
    """Both ends of every exchange over a real broker: a server transport and one transport per
    client (MqttTransport: QoS 1, chunking above `max_payload`, reassembly). Down goes on
    `fedclip/<job>/down/<client>`, up on `fedclip/<job>/update/<client>`; raw wire frames, so
    the byte counts compare one to one with the in-process frames."""

    def __init__(
        self, url: str, clients: list[str], *, max_payload: int, timeout_s: float = 600.0
    ) -> None:
        from fedclip_edge.broker import protocol as P
        from fedclip_edge.broker.transport import MqttTransport

        self.timeout_s = timeout_s
        self.job = f"benchfedavg-{uuid.uuid4().hex[:8]}"
        self.topic_id = {c: re.sub(r"[^A-Za-z0-9_.\-]", "_", c)[:64] for c in clients}
        big = max(P.MAX_MESSAGE_BYTES, 2 * max_payload)
        kw = {"max_payload": max_payload, "max_message_bytes": big, "clean_session": True}
        self.server = MqttTransport(url, f"{self.job}-server", **kw)
        self.server.subscribe(P.update_filter(self.job))
        self.ends = {}
        for c in clients:
            t = MqttTransport(url, f"{self.job}-{self.topic_id[c]}"[:64], **kw)
            t.subscribe(self._down(c))
            self.ends[c] = t
        try:
            for t in (self.server, *self.ends.values()):
                t.connect(10.0)
            self._probe()
        except BaseException:
            self.close()
            raise

    def _down(self, client: str) -> str:
        return f"fedclip/{self.job}/down/{self.topic_id[client]}"

    def _up(self, client: str) -> str:
        from fedclip_edge.broker import protocol as P

        return P.update_topic(self.job, self.topic_id[client])

    def _probe(self) -> None:
        """Subscriptions are asynchronous: send probes on every route until they arrive."""
        routes = [(self.server, self.ends[c], self._down(c)) for c in self.ends]
        routes += [(self.ends[c], self.server, self._up(c)) for c in self.ends]
        deadline = time.monotonic() + 15.0
        for sender, receiver, topic in routes:
            while True:
                if time.monotonic() > deadline:
                    from fedclip_edge.errors import TransportError

                    raise TransportError(f"no probe came through on {topic} within 15 s")
                sender.publish(topic, b"probe").wait(2.0)
                msg = receiver.recv(0.5)
                if msg is not None and msg.topic == topic and msg.payload == b"probe":
                    break
        for t in (self.server, *self.ends.values()):  # drop duplicate probes
            while t.recv(0.05) is not None:
                pass

    def exchange(
        self,
        state: dict[str, torch.Tensor],
        *,
        job: str,
        rnd: int,
        client: str,
        dtype: str,
        down: bool,
    ) -> tuple[dict[str, torch.Tensor], int, float, int]:
        """Encode, publish (chunked), receive, reassemble, decode: (tensors, payload bytes on
        the wire incl. chunk envelopes, seconds, MQTT messages)."""
        from fedclip_edge.errors import TransportError

        sender, receiver = (
            (self.server, self.ends[client]) if down else (self.ends[client], self.server)
        )
        topic = self._down(client) if down else self._up(client)
        t0 = time.perf_counter()
        frame = encode_frame(state, job=job, round=rnd, client=client if not down else "server")
        before = sender.counters.snapshot()
        delivery = sender.publish(topic, frame)
        deadline = time.monotonic() + self.timeout_s
        while True:
            msg = receiver.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise TransportError(
                    f"{'down' if down else 'up'} frame of {len(frame)} B for {client} did not "
                    f"arrive within {self.timeout_s:g} s (rejected: {dict(receiver.rejected)})"
                )
            if msg.topic == topic and msg.payload != b"probe":
                break
        out = decode_frame(
            msg.payload,
            expected={k: tuple(v.shape) for k, v in state.items()},
            max_bytes=len(msg.payload),
        )
        seconds = time.perf_counter() - t0
        if not delivery.wait(max(1.0, deadline - time.monotonic())):
            raise TransportError(f"publish on {topic} not acknowledged")
        after = sender.counters.snapshot()
        sent = after["bytes_up"] - before["bytes_up"]
        if sent != msg.wire_bytes:
            raise TransportError(f"sent {sent} B but the receiver counted {msg.wire_bytes} B")
        return out.tensors, sent, seconds, after["messages_up"] - before["messages_up"]

    def close(self) -> None:
        for t in (self.server, *self.ends.values()):
            with contextlib.suppress(Exception):
                t.close()


@contextlib.contextmanager
def _link(
    transport: str, broker: str | None, clients: list[str], max_payload: int, workdir: Path
) -> Iterator[tuple[MqttLink | None, dict[str, Any]]]:
    """None for inproc; else an MqttLink over `broker` or a private broker on loopback."""
    if transport == "inproc":
        yield None, {}
        return
    from fedclip_edge.benchmarks.aggregator import broker_for_bench

    with broker_for_bench(broker, workdir) as b:
        link = MqttLink(b["url"], clients, max_payload=max_payload)
        try:
            yield link, {k: v for k, v in b.items() if k != "pid"}
        finally:
            link.close()


def _float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What FedAvg ships: every floating tensor of the tower (weights and buffers)."""
    return {k: v.detach() for k, v in module.state_dict().items() if v.is_floating_point()}


def _tower_accuracy(
    visual: torch.nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    batch: int,
) -> float:
    if labels.numel() == 0:
        return float("nan")
    visual.eval()
    with torch.no_grad():
        feats = torch.cat([visual(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
    return accuracy(None, feats, labels, text)


def _train_tower(
    visual: torch.nn.Module,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    text: torch.Tensor,
    cfg: TrainConfig,
    scale: float,
    generator: torch.Generator,
) -> tuple[float, int]:
    """One client's local fine-tuning of the whole image tower (same loss and optimizer family
    as FedCLIP's adapter: Adam with coupled L2, re-created every round)."""
    loss_fn = get_loss(cfg.loss)
    text_n = F.normalize(text.float(), dim=-1)
    for p in visual.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(
        visual.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    visual.train()
    total, steps = 0.0, 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            if cfg.loss == "clip" and idx.numel() < 2:
                continue
            feats = F.normalize(visual(pixels[idx]), dim=-1)
            loss = loss_fn(feats, text_n, labels[idx], scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            steps += 1
    visual.eval()
    return (total / steps if steps else float("nan")), steps


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
    log=print,
) -> dict[str, Any]:
    """Run both methods and write OUT/bench.json, bench.md and the plots (after every round).

    transport "mqtt": every exchange goes through `broker` (default: a private mosquitto, or the
    embedded broker, on a free loopback port), chunked above `max_payload` bytes."""
    from fedclip_edge.benchmarks.extractor import machine_info
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
    tower_params = _param_count(visual0)
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
            "whole_clip": _param_count(loaded.model),
            "ratio_tower_to_adapter": tower_params / adapter_params,
            "ratio_clip_to_adapter": _param_count(loaded.model) / adapter_params,
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
        ],
        "fedclip": {"rounds": []},
        "fedavg": {"rounds": []},
    }

    def save() -> None:
        write_json(out / "bench.json", report)

    with contextlib.ExitStack() as stack:
        link, binfo = stack.enter_context(
            _link(transport, broker, names, max_payload, out / "broker")
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
        )
    report["speedups"] = _speedups(report)
    report["projections"] = [
        _projections(report, rounds=r, uplink_mbit=mbit) for r, mbit in ((50, 0.0), (200, 10.0))
    ]
    report["complete"] = True
    save()
    (out / "bench.md").write_text(render_markdown(report))
    _plots(report, out)
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
) -> None:
    """FedCLIP then full FedAvg, over the same clients and exchange (in-process or MQTT)."""
    visual0 = loaded.model.visual

    # ---- FedCLIP: features once, then adapter rounds --------------------------------------
    tower_hash_before = _state_hash(visual0)
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

    _federate(
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
    )
    report["fedclip"]["tower_sha256_before"] = tower_hash_before
    report["fedclip"]["tower_sha256_after"] = _state_hash(visual0)

    # ---- full FedAvg: fine-tune and ship the whole image tower every round -----------------
    global_tower = copy.deepcopy(visual0)
    report["fedavg"]["tower_sha256_before"] = _state_hash(global_tower)
    report["zero_shot_test"] = {
        c.name: _tower_accuracy(
            global_tower, c.pixels["test"], c.labels["test"], text, cfg.batch_size
        )
        for c in parts
    }

    def train_tower(local: torch.nn.Module, c: Client, gen: torch.Generator) -> tuple:
        loss, steps = _train_tower(
            local, c.pixels["train"], c.labels["train"], text, cfg, scale, gen
        )
        return loss, steps, int(c.labels["train"].numel())

    def eval_tower() -> tuple[dict[str, float], float | None]:
        accs = {
            c.name: _tower_accuracy(
                global_tower, c.pixels["test"], c.labels["test"], text, cfg.batch_size
            )
            for c in parts
        }
        gen = (
            _tower_accuracy(global_tower, held[0], held[1], text, cfg.batch_size)
            if held is not None
            else None
        )
        return accs, gen

    _federate(
        "fedavg",
        report["fedavg"],
        global_tower,
        parts,
        rounds=rounds,
        dtype=fedavg_dtype,
        seed=seed,
        start_wall=0.0,
        state=_float_state,
        make_local=lambda: copy.deepcopy(global_tower),
        train=train_tower,
        evaluate=eval_tower,
        log=log,
        save=save,
        link=link,
    )
    report["fedavg"]["tower_sha256_after"] = _state_hash(global_tower)


def _federate(
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
) -> None:
    """The round loop both methods share: ship the global model down, train locally, ship the
    update up (real wire frames), average, evaluate (timed apart), record, save."""
    strategy = FedAvg("uniform")
    cum_wall, cum_bytes = start_wall, 0
    for rnd in range(1, rounds + 1):
        t_round = time.perf_counter()
        acc_round = strategy.start_round()
        per_client = {}
        for ci, c in enumerate(parts):
            down, b_down, s_down, m_down = _xfer(
                link, state(global_model), rnd=rnd, client=c.name, dtype=dtype, down=True
            )
            local = make_local()
            local.load_state_dict(down, strict=False)
            t = time.perf_counter()
            loss, steps, samples = train(
                local, c, torch.Generator().manual_seed(seed * 1000 + rnd * 31 + ci)
            )
            compute = time.perf_counter() - t
            up, b_up, s_up, m_up = _xfer(
                link, state(local), rnd=rnd, client=c.name, dtype=dtype, down=False
            )
            acc_round.add(up, samples)
            per_client[c.name] = {
                "compute_s": compute,
                "bytes_down": b_down,
                "bytes_up": b_up,
                "transfer_s": s_down + s_up,
                "messages_down": m_down,
                "messages_up": m_up,
                "loss": loss,
                "steps": steps,
            }
            del local
        global_model.load_state_dict(acc_round.result(), strict=False)
        wall = time.perf_counter() - t_round
        t = time.perf_counter()
        accs, gen = evaluate()
        eval_s = time.perf_counter() - t
        cum_wall += wall
        cum_bytes += sum(v["bytes_down"] + v["bytes_up"] for v in per_client.values())
        record["rounds"].append(
            _round_record(rnd, per_client, wall, eval_s, accs, gen, cum_wall, cum_bytes)
        )
        log(_round_line(name, rnd, rounds, per_client, wall, accs, gen))
        save()


def _xfer(
    link: MqttLink | None,
    state: dict[str, torch.Tensor],
    *,
    rnd: int,
    client: str,
    dtype: str,
    down: bool,
) -> tuple[dict[str, torch.Tensor], int, float, int]:
    """One exchange: (tensors as received, bytes, seconds, messages), in-process or via MQTT."""
    if link is None:
        tensors, nbytes, secs = _exchange(
            state, job="bench", rnd=rnd, client="server" if down else client, dtype=dtype
        )
        return tensors, nbytes, secs, 1
    return link.exchange(state, job="bench", rnd=rnd, client=client, dtype=dtype, down=down)


def _round_record(rnd, per_client, wall, eval_s, accs, gen, cum_wall, cum_bytes) -> dict:
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


def _round_line(method, rnd, rounds, per_client, wall, accs, gen) -> str:
    comp = statistics.mean(v["compute_s"] for v in per_client.values())
    up = statistics.mean(v["bytes_up"] for v in per_client.values())
    acc = statistics.mean(accs.values())
    held = f" | held-out {gen:.1%}" if gen is not None else ""
    return (
        f"{method:<7} round {rnd}/{rounds} | compute/client {comp:.3f}s | up/client "
        f"{up / 1e6:.3f} MB | wall {wall:.2f}s | acc {acc:.1%}{held}"
    )


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
    return {
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


def _fmt_bytes(n: float) -> str:
    """Decimal units (1 MB = 10^6 bytes), as network rates are counted."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def render_markdown(report: dict[str, Any]) -> str:
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
            _fmt_bytes(s["fedclip_bytes_per_client_round"]),
            _fmt_bytes(s["fedavg_bytes_per_client_round"]),
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


def _plots(report: dict[str, Any], out: Path) -> None:
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


def bench_fedavg(
    data: Annotated[Path, typer.Option(help="Dataset root: DOMAIN/CLASS/images.")],
    out: Annotated[Path, typer.Option(help="Folder for bench.json, bench.md and plots.")],
    model: Annotated[
        str, typer.Option("--model", "-m", help="open_clip architecture or fedclip-tiny.")
    ] = "fedclip-tiny",
    pretrained: Annotated[str | None, typer.Option(help="Tag, checkpoint file or 'none'.")] = None,
    clients: Annotated[int, typer.Option(help="Clients, one per domain.")] = 3,
    rounds: Annotated[int, typer.Option(help="Rounds of each method.")] = 3,
    local_epochs: Annotated[int, typer.Option(help="Local epochs per round.")] = 1,
    test_domain: Annotated[
        str | None, typer.Option(help="Held-out domain for generalization.")
    ] = None,
    per_client: Annotated[
        int | None, typer.Option(help="Use at most this many images per client (a quick run).")
    ] = None,
    loss: Annotated[str, typer.Option(help="clip (reference) or ce.")] = "clip",
    lr: Annotated[float, typer.Option(help="Learning rate of both methods.")] = 5e-5,
    weight_decay: Annotated[float, typer.Option(help="Coupled L2 of both methods.")] = 0.2,
    fp16: Annotated[bool, typer.Option("--fp16", help="Ship FedCLIP's adapter in fp16.")] = False,
    fedavg_fp16: Annotated[
        bool, typer.Option("--fedavg-fp16", help="Ship full FedAvg's image tower in fp16 too.")
    ] = False,
    transport: Annotated[
        str, typer.Option(help="inproc, or mqtt: every exchange through a real broker.")
    ] = "inproc",
    broker: Annotated[
        str | None,
        typer.Option(help="mqtt: broker URL (default: a private mosquitto on loopback)."),
    ] = None,
    max_payload: Annotated[
        int, typer.Option(help="mqtt: payload bytes above which frames are chunked.")
    ] = 64 * 1024 * 1024,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of splits, init and shuffling.")] = 0,
) -> None:
    """FedCLIP and full-model FedAvg side by side: time, bytes, accuracy, measured."""
    for flag, value in (("--rounds", rounds), ("--clients", clients), ("--local-epochs",
                                                                        local_epochs)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    if transport not in ("inproc", "mqtt"):
        raise ConfigError(f"unknown --transport {transport!r}; choose inproc or mqtt")
    if broker is not None and transport != "mqtt":
        raise ConfigError("--broker needs --transport mqtt")
    cfg = TrainConfig(lr=lr, weight_decay=weight_decay, loss=loss)
    try:
        report = run_bench(
            data,
            out,
            model=model,
            pretrained=pretrained,
            clients=clients,
            rounds=rounds,
            local_epochs=local_epochs,
            test_domain=test_domain,
            per_client=per_client,
            cfg=cfg,
            dtype="float16" if fp16 else "float32",
            fedavg_dtype="float16" if fedavg_fp16 else "float32",
            device=device,
            seed=seed,
            transport=transport,
            broker=broker,
            max_payload=max_payload,
        )
    except KeyboardInterrupt:
        raise Interrupted(f"what was measured so far is in {Path(out) / 'bench.json'}") from None
    print((Path(out) / "bench.md").read_text())
    s = report["speedups"]
    if not all(math.isfinite(v) for v in (s["compute_per_round"], s["bytes_per_round"])):
        raise ConfigError("a ratio could not be computed (a method measured zero time or bytes)")
