"""The paper's protocol, in one process: one client per training domain, leave one domain out.

Pure over a FeatureSet (no image decoding, no sockets): features come from the cache.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.codecs import ErrorFeedback
from fedclip_edge.config import SimulationConfig
from fedclip_edge.data.split import split_indices
from fedclip_edge.errors import ConfigError
from fedclip_edge.features import FeatureSet
from fedclip_edge.io import atomic_write_json
from fedclip_edge.train import accuracy, train_local
from fedclip_edge.wire import decode_update, encode_frame, encode_update


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % (2**63)
    return torch.Generator().manual_seed(seed)


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def _client_splits(
    fs: FeatureSet, clients: list[str], seed: int, fractions: tuple[float, float, float]
) -> dict[str, dict[str, Any]]:
    splits = {}
    for c in clients:
        d = fs.domains[c]
        tr, va, te = (torch.from_numpy(ix).long() for ix in split_indices(len(d), seed, fractions))
        splits[c] = {
            name: (d.features[ix], d.labels[ix])
            for name, ix in (("train", tr), ("val", va), ("test", te))
        }
    return splits


def run_seed(
    fs: FeatureSet, cfg: SimulationConfig, seed: int, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """One federated run; returns its history and the test accuracies at the best round."""
    if cfg.test_domain not in fs.domains:
        raise ConfigError(
            f"test domain {cfg.test_domain!r} is not in the features (has: {', '.join(fs.domains)})"
        )
    clients = [d for d in fs.domains if d != cfg.test_domain]
    if not clients:
        raise ConfigError("need at least one training domain besides the held-out one")
    text = fs.text_features
    splits = _client_splits(fs, clients, seed, cfg.split)
    held = fs.domains[cfg.test_domain]
    torch.manual_seed(seed)
    global_adapter = AttentionAdapter(fs.dim)
    strategy = cfg.make_strategy()

    zero_shot_test = {c: accuracy(None, *splits[c]["test"], text) for c in clients}
    zero_shot_val = {c: accuracy(None, *splits[c]["val"], text) for c in clients}
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"round": 0, "val": _mean(list(zero_shot_val.values()))}
    best_state = copy.deepcopy(global_adapter.state_dict())
    log(
        f"seed {seed}: clients {', '.join(clients)}; held out {cfg.test_domain}; "
        f"zero-shot test " + ", ".join(f"{c} {a:.1%}" for c, a in zero_shot_test.items())
    )
    # Each client's update goes through the wire codec as on a device: encoded against the
    # round's global with the client's own error feedback, decoded by the server.
    feedback = {c: ErrorFeedback() for c in clients}
    down_bytes = len(encode_frame(global_adapter.state_dict(), job="simulate", round=0, client="s"))
    for rnd in range(1, cfg.rounds + 1):
        acc = strategy.start_round()
        losses = {}
        up_bytes: dict[str, int] = {}
        global_state = {k: v.detach().clone() for k, v in global_adapter.state_dict().items()}
        for ci, c in enumerate(clients):
            local = AttentionAdapter(fs.dim)
            local.load_state_dict(global_state)
            feats, labels = splits[c]["train"]
            res = train_local(
                local,
                feats,
                labels,
                text,
                cfg.train,
                logit_scale=fs.logit_scale,
                generator=_generator(seed, rnd, ci),
            )
            losses[c] = res.loss
            frame = encode_update(
                local.state_dict(),
                global_state,
                codec=cfg.update_codec,
                job="simulate",
                round=rnd,
                client=c,
                feedback=feedback[c],
                topk_fraction=cfg.topk_fraction,
            )
            up_bytes[c] = len(frame)
            update = decode_update(frame, global_state).tensors
            acc.add(update, res.samples if res.samples else len(labels), global_state)
        global_adapter.load_state_dict(acc.result())
        val = {c: accuracy(global_adapter, *splits[c]["val"], text) for c in clients}
        test = {c: accuracy(global_adapter, *splits[c]["test"], text) for c in clients}
        gen = accuracy(global_adapter, held.features, held.labels, text)
        entry = {
            "round": rnd,
            "train_loss": losses,
            "val_acc": val,
            "test_acc": test,
            "generalization_acc": gen,
            "up_bytes": up_bytes,
        }
        history.append(entry)
        mean_val = _mean(list(val.values()))
        if mean_val > best["val"]:
            best = {"round": rnd, "val": mean_val}
            best_state = copy.deepcopy(global_adapter.state_dict())
        log(
            f"round {rnd:>3}/{cfg.rounds} | loss {_mean(list(losses.values())):.4f} | val "
            f"{mean_val:.1%} | test "
            + " ".join(f"{c} {a:.1%}" for c, a in test.items())
            + f" | held-out {cfg.test_domain} {gen:.1%}"
        )

    best_round = best["round"]
    global_adapter.load_state_dict(best_state)
    if best_round:
        pers = dict(history[best_round - 1]["test_acc"])
        gen = history[best_round - 1]["generalization_acc"]
    else:  # no round beat zero-shot on validation: the untrained adapter is the selected model
        pers = {c: accuracy(global_adapter, *splits[c]["test"], text) for c in clients}
        gen = accuracy(global_adapter, held.features, held.labels, text)
    result: dict[str, Any] = {
        "seed": seed,
        "best_round": best_round,
        "best_mean_val_acc": best["val"],
        "generalization_acc": gen,
        "personalization_acc": pers,
        "zero_shot_test": zero_shot_test,
        "update_codec": cfg.update_codec,
        "up_bytes_per_client_per_round": _mean(
            [float(b) for h in history for b in h["up_bytes"].values()]
        ),
        "down_bytes_per_client_per_round": down_bytes,
        "history": history,
    }
    if cfg.personalize_epochs > 0:
        local_cfg = cfg.train.with_overrides(epochs=cfg.personalize_epochs)
        local_acc = {}
        for ci, c in enumerate(clients):
            local = AttentionAdapter(fs.dim)
            local.load_state_dict(best_state)
            train_local(
                local,
                *splits[c]["train"],
                text,
                local_cfg,
                logit_scale=fs.logit_scale,
                generator=_generator(seed, 10**6, ci),
            )
            local_acc[c] = accuracy(local, *splits[c]["test"], text)
        result["personalization_acc_local"] = local_acc
        log(
            f"seed {seed}: after {cfg.personalize_epochs} local epochs: "
            + " ".join(f"{c} {a:.1%}" for c, a in local_acc.items())
        )
    return result


def _per_client_stats(runs: list[dict[str, Any]], key: str) -> tuple[dict, dict]:
    clients = list(runs[0][key])
    mean = {c: _mean([r[key][c] for r in runs]) for c in clients}
    std = {c: _std([r[key][c] for r in runs]) for c in clients}
    return mean, std


def simulate(
    fs: FeatureSet,
    cfg: SimulationConfig,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every seed and write OUT/summary.json (means and std over seeds)."""
    runs = [run_seed(fs, cfg, s, log) for s in cfg.seeds]
    pers_mean, pers_std = _per_client_stats(runs, "personalization_acc")
    zs_mean, zs_std = _per_client_stats(runs, "zero_shot_test")
    gains = [
        {c: r["personalization_acc"][c] - r["zero_shot_test"][c] for c in r["zero_shot_test"]}
        for r in runs
    ]
    gain_mean = {c: _mean([g[c] for g in gains]) for c in gains[0]}
    gain_std = {c: _std([g[c] for g in gains]) for c in gains[0]}
    gen = [r["generalization_acc"] for r in runs]
    summary: dict[str, Any] = {
        "method": "fedclip",
        "model": fs.identity,
        "test_domain": cfg.test_domain,
        "clients": list(runs[0]["personalization_acc"]),
        "rounds": cfg.rounds,
        "seeds": list(cfg.seeds),
        "train": cfg.train.to_dict(),
        "weighting": cfg.weighting,
        "strategy": cfg.make_strategy().describe(),
        "split": list(cfg.split),
        "personalize_epochs": cfg.personalize_epochs,
        "update_codec": cfg.update_codec,
        "topk_fraction": cfg.topk_fraction,
        "up_bytes_per_client_per_round": _mean([r["up_bytes_per_client_per_round"] for r in runs]),
        "down_bytes_per_client_per_round": runs[0]["down_bytes_per_client_per_round"],
        "trainable_params": sum(p.numel() for p in AttentionAdapter(fs.dim).parameters()),
        "zero_shot": {
            d: accuracy(None, v.features, v.labels, fs.text_features) for d, v in fs.domains.items()
        },
        "zero_shot_test": zs_mean,
        "generalization_acc": _mean(gen),
        "personalization_acc": pers_mean,
        "personalization_acc_mean": _mean(list(pers_mean.values())),
        "gain_over_zero_shot": gain_mean,
        "best_round": runs[0]["best_round"] if len(runs) == 1 else [r["best_round"] for r in runs],
        "history": runs[0]["history"] if len(runs) == 1 else None,
        "std": {
            "generalization_acc": _std(gen),
            "personalization_acc": pers_std,
            "zero_shot_test": zs_std,
            "gain_over_zero_shot": gain_std,
        },
        "per_seed": runs,
    }
    if cfg.personalize_epochs > 0:
        loc_mean, loc_std = _per_client_stats(runs, "personalization_acc_local")
        summary["personalization_acc_local"] = loc_mean
        summary["std"]["personalization_acc_local"] = loc_std
    up = summary["up_bytes_per_client_per_round"]
    fp32 = len(
        encode_update(
            AttentionAdapter(fs.dim).state_dict(), None, codec="fp32", job="s", round=0, client="s"
        )
    )
    log(
        f"update codec {cfg.update_codec}: {up:,.0f} bytes per client per round up "
        f"({fp32 / up:.1f}x fewer than fp32's {fp32:,}); "
        f"{summary['down_bytes_per_client_per_round']:,} down (the dense fp32 global)"
    )
    if out is not None:
        write_json(Path(out) / "summary.json", summary)
    return summary


def write_json(path: Path, data: Any) -> None:
    """Atomic strict-JSON write (kept under this name for the callers that import it here)."""
    atomic_write_json(path, data, fsync=False)
