"""The paper's protocol, in one process: one client per training domain, leave one domain out.

Pure over a FeatureSet (no image decoding, no sockets): features come from the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.config import SimulationConfig
from fedclip_edge.data.devices import poisson_sample
from fedclip_edge.data.split import split_indices
from fedclip_edge.errors import ConfigError
from fedclip_edge.features import FeatureSet
from fedclip_edge.global_codec import (
    DIGEST_HEX_BYTES,
    GlobalCodecPlugin,
    GlobalEncoder,
    derive_initial,
    state_digest,
)
from fedclip_edge.io import atomic_write_json
from fedclip_edge.privacy.central import CentralDP, CentralDPConfig, PrivacyBudgetSpent
from fedclip_edge.rounds import (
    BestRound,
    InProcessFleet,
    OpenRound,
    RoundEngine,
    Update,
    Uplink,
    better,
    records,
)
from fedclip_edge.tables import points, text_table
from fedclip_edge.train import accuracy, personalize, train_local
from fedclip_edge.wire import encode_frame, encode_update


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


def select_round(mean_val_accs: Sequence[float]) -> int:
    """The round (1-based) that the reference selects: the best mean validation accuracy among
    the trained rounds, the earliest on ties. Zero-shot is not a candidate: it is reported
    beside the selection, never instead of a trained adapter. Round 1 when nothing is finite."""
    if not mean_val_accs:
        raise ValueError("no trained round to select from")
    best, best_val = 1, float("nan")
    for rnd, v in enumerate(mean_val_accs, start=1):
        if better(v, best_val):
            best, best_val = rnd, v
    return best


def selection_line(seed: int, rounds: int, selection: dict[str, Any]) -> str:
    """Says which round was selected and why, with zero-shot beside it."""
    v, z = selection["mean_val_acc"], selection["zero_shot_mean_val_acc"]
    verdict = "above zero-shot" if selection["beats_zero_shot_on_val"] else "not above zero-shot"
    return (
        f"seed {seed}: selected round {selection['round']}/{rounds}: best mean validation "
        f"accuracy among the trained rounds, {v:.1%} ({verdict}: zero-shot {z:.1%} on validation)"
    )


def _sampled_dp(dp: CentralDPConfig, per_round: int | None, clients: int) -> CentralDPConfig:
    """Central DP's config for this simulation: with client sampling the population is the
    clients (the accountant's q is then the rate the simulation samples at)."""
    if per_round is None:
        return dp
    if dp.population is not None and dp.population != clients:
        raise ConfigError(f"--dp-population {dp.population}: simulate samples from its own "
                          f"{clients} clients, so the population is {clients}")
    return dataclasses.replace(dp, population=clients)


def _movement(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far training moved the adapter from its start: Adam moves each weight by about lr
    per step at most, so max_abs is bounded by about lr x local steps (README explains)."""
    diffs = torch.cat([(after[k].float() - before[k].float()).abs().flatten() for k in before])
    return {"max_abs": float(diffs.max()), "mean_abs": float(diffs.mean())}


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

    zero_shot_test = {c: accuracy(None, *splits[c]["test"], text) for c in clients}
    zero_shot_val = {c: accuracy(None, *splits[c]["val"], text) for c in clients}
    history: list[dict[str, Any]] = []
    zs_val_mean = _mean(list(zero_shot_val.values()))
    init_state = copy.deepcopy(global_adapter.state_dict())
    steps: dict[str, int] = {c: 0 for c in clients}
    log(
        f"seed {seed}: clients {', '.join(clients)}; held out {cfg.test_domain}; "
        f"zero-shot test " + ", ".join(f"{c} {a:.1%}" for c, a in zero_shot_test.items())
    )
    # Each client's update goes through the wire codec as on a device: encoded against the
    # round's global with the client's own error feedback, decoded by the server.
    uplink = Uplink(cfg.update_codec, job="simulate", topk_fraction=cfg.topk_fraction)
    down_bytes = len(encode_frame(global_adapter.state_dict(), job="simulate", round=0, client="s"))

    def work(rnd: OpenRound, ci: int, c: str) -> Update:
        local = AttentionAdapter(fs.dim)
        local.load_state_dict(rnd.global_state)
        feats, labels = splits[c]["train"]
        res = train_local(
            local, feats, labels, text, cfg.train, logit_scale=fs.logit_scale,
            generator=_generator(seed, rnd.number, ci),
        )
        steps[c] += res.steps
        update, nbytes = uplink.send(rnd, c, local.state_dict())
        return Update(c, update, res.samples if res.samples else len(labels),
                      record={"loss": res.loss, "up_bytes": nbytes})

    def evaluate(state: dict[str, torch.Tensor]) -> dict[str, Any]:
        global_adapter.load_state_dict(state)
        val = {c: accuracy(global_adapter, *splits[c]["val"], text) for c in clients}
        return {
            "val_acc": val,
            "mean_val_acc": _mean(list(val.values())),
            "test_acc": {c: accuracy(global_adapter, *splits[c]["test"], text) for c in clients},
            "generalization_acc": accuracy(global_adapter, held.features, held.labels, text),
        }

    best = BestRound("mean_val_acc")  # as select_round()
    # central DP: every client takes part every round (expected count = clients), the noise
    # from a generator of the seed (a simulation is reproducible; the aggregator's is not)
    per_round = cfg.clients_per_round
    if per_round is not None and not 1 <= per_round <= len(clients):
        raise ConfigError(f"--clients-per-round {per_round} must be in 1..{len(clients)} "
                          "(the training clients)")
    dp = None if cfg.dp is None else CentralDP(
        _sampled_dp(cfg.dp, per_round, len(clients)), planned_rounds=cfg.rounds,
        generator=_generator(seed, 7_919), fleet_size=lambda: per_round or len(clients))
    # A compressed global: every global (evaluated, selected, trained from) is the one a device
    # rebuilds from the frames; round 1's is the dense initial one.
    downlink = GlobalCodecPlugin(
        GlobalEncoder(cfg.global_codec, job="simulate", topk_fraction=cfg.global_topk_fraction
                      if cfg.global_topk_fraction is not None else cfg.topk_fraction)
    )
    # the global codec's plugin last: it encodes the global the other plugins left
    plugins = ([] if dp is None else [dp]) + ([downlink] if downlink.encoder.active else [])
    # round 1's global: derived on the device from the seed (its digest: 64 B) when it matches
    derived = state_digest(derive_initial(seed, fs.dim)) == state_digest(init_state)
    down_frames: list[int] = [DIGEST_HEX_BYTES if derived else down_bytes]
    engine = RoundEngine(cfg.make_strategy(), evaluate=evaluate, select=best, plugins=plugins)
    fleet = InProcessFleet(clients, work)
    index = {c: i for i, c in enumerate(clients)}
    sampler = _generator(seed, 104_729)
    for rnd in range(1, cfg.rounds + 1):
        global_state = {k: v.detach().clone() for k, v in global_adapter.state_dict().items()}
        if per_round is not None:  # Poisson sampling; a client keeps its generator's index
            fleet = InProcessFleet(poisson_sample(clients, per_round, sampler),
                                   lambda r, i, c: work(r, index[c], c))
        try:
            done = engine.run_round(rnd, global_state, fleet)
        except PrivacyBudgetSpent as exc:
            if rnd == 1:
                raise
            log(f"seed {seed}: {exc}")
            break
        assert done is not None  # every client answers in process
        if downlink.encoder.active and rnd < cfg.rounds:  # the next global, as a delta frame
            assert downlink.last is not None
            down_frames.append(len(downlink.last.frame))
        ev = done.evaluation
        losses = records(done.answered, "loss")
        entry = {
            "round": rnd,
            "train_loss": losses,
            "val_acc": ev["val_acc"],
            "mean_val_acc": ev["mean_val_acc"],
            "test_acc": ev["test_acc"],
            "generalization_acc": ev["generalization_acc"],
            "up_bytes": records(done.answered, "up_bytes"),
        }
        history.append(entry)
        log(
            f"round {rnd:>3}/{cfg.rounds} | loss {_mean(list(losses.values())):.4f} | val "
            f"{entry['mean_val_acc']:.1%} | test "
            + (" ".join(f"{c} {a:.1%}" for c, a in entry["test_acc"].items())
               if len(clients) <= 8 else
               f"mean {_mean(list(entry['test_acc'].values())):.1%} of {len(clients)} clients, "
               f"{len(losses)} trained")
            + f" | held-out {cfg.test_domain} {entry['generalization_acc']:.1%}"
            + ("" if dp is None else f" | {dp.note()}")
        )
        if dp is not None:
            entry["epsilon"] = dp.epsilon

    best_round = best.round
    assert best.state is not None
    best_state = best.state
    moved = _movement(init_state, global_adapter.state_dict())
    global_adapter.load_state_dict(best_state)
    pers = dict(history[best_round - 1]["test_acc"])
    gen = history[best_round - 1]["generalization_acc"]
    zero_shot_heldout = accuracy(None, held.features, held.labels, text)
    selection = {
        "rule": "best mean validation accuracy among trained rounds (earliest on ties)",
        "round": best_round,
        "mean_val_acc": history[best_round - 1]["mean_val_acc"],
        "zero_shot_mean_val_acc": zs_val_mean,
        "beats_zero_shot_on_val": bool(history[best_round - 1]["mean_val_acc"] > zs_val_mean),
    }
    result: dict[str, Any] = {
        "seed": seed,
        "best_round": best_round,
        "best_mean_val_acc": selection["mean_val_acc"],
        "selection": selection,
        "generalization_acc": gen,
        "zero_shot_heldout": zero_shot_heldout,
        "personalization_acc": pers,
        "zero_shot_test": zero_shot_test,
        "update_codec": cfg.update_codec,
        "up_bytes_per_client_per_round": _mean(
            [float(b) for h in history for b in h["up_bytes"].values()]
        ),
        "down_bytes_per_client_per_round": down_bytes,
        "local_steps": steps,
        **({"global_codec": cfg.global_codec, "down_bytes_by_round": down_frames,
            "initial_global": "derived" if derived else "dense",
            "down_bytes_per_client_per_round": _mean([float(b) for b in down_frames])}
           if plugins else {}),
        "adapter_change": moved,
        "history": history,
    }
    if dp is not None:
        result["privacy"] = dp.privacy()
    log(selection_line(seed, len(history), selection))
    log(
        f"seed {seed}: round {best_round} test "
        + (", ".join(f"{c} {pers[c]:.1%} (zero-shot {zero_shot_test[c]:.1%})" for c in clients)
           if len(clients) <= 8 else
           f"mean of {len(clients)} clients {_mean(list(pers.values())):.1%} (zero-shot "
           f"{_mean(list(zero_shot_test.values())):.1%})")
        + f" | held-out {cfg.test_domain} {gen:.1%} (zero-shot {zero_shot_heldout:.1%})"
    )
    if cfg.personalize_epochs > 0:
        local_acc = {}
        for ci, c in enumerate(clients):
            local = personalize(
                best_state,
                *splits[c]["train"],
                text,
                cfg.train,
                cfg.personalize_epochs,
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
        **({} if cfg.clients_per_round is None else {"clients_per_round": cfg.clients_per_round}),
        "up_bytes_per_client_per_round": _mean([r["up_bytes_per_client_per_round"] for r in runs]),
        "down_bytes_per_client_per_round": runs[0]["down_bytes_per_client_per_round"]
        if cfg.global_codec == "fp32"
        else _mean([r["down_bytes_per_client_per_round"] for r in runs]),
        **({"global_codec": cfg.global_codec,
            "global_topk_fraction": cfg.global_topk_fraction or cfg.topk_fraction}
           if cfg.global_codec != "fp32" else {}),
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
        "selection": runs[0]["selection"] if len(runs) == 1 else [r["selection"] for r in runs],
        "zero_shot_heldout": runs[0]["zero_shot_heldout"],
        "adapter_change": runs[0]["adapter_change"]
        if len(runs) == 1
        else [r["adapter_change"] for r in runs],
        "adam_bound_lr_x_steps": cfg.train.lr * max(runs[0]["local_steps"].values()),
        "history": runs[0]["history"] if len(runs) == 1 else None,
        "std": {
            "generalization_acc": _std(gen),
            "personalization_acc": pers_std,
            "zero_shot_test": zs_std,
            "gain_over_zero_shot": gain_std,
        },
        "per_seed": runs,
    }
    if cfg.dp is not None:  # the schedule is the same for every seed: seed 0's block
        summary["privacy"] = runs[0]["privacy"]
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
        + (f"{summary['down_bytes_per_client_per_round']:,} down (the dense fp32 global)"
           if cfg.global_codec == "fp32" else
           f"{summary['down_bytes_per_client_per_round']:,.0f} down (global codec "
           f"{cfg.global_codec}; round 1's global {runs[0]['initial_global']} on the device)")
    )
    if out is not None:
        write_json(Path(out) / "summary.json", summary)
    return summary


def result_table(summary: dict[str, Any]) -> list[str]:
    """The lines `simulate` ends with: which round was selected (per seed), and per client the
    zero-shot and selected-round test accuracy and the gain; the held-out domain likewise."""
    runs = summary["per_seed"]
    rounds = ", ".join(
        f"{r['best_round']}" + ("" if r["selection"]["beats_zero_shot_on_val"] else "*")
        for r in runs
    )
    many = len(runs) > 1

    def cell(mean: float, std: float | None = None) -> str:
        return f"{mean:.1%}" + (f" ± {std:.1%}" if many and std is not None else "")

    std = summary["std"]
    rows = [
        [
            c,
            cell(summary["zero_shot_test"][c], std["zero_shot_test"][c]),
            cell(summary["personalization_acc"][c], std["personalization_acc"][c]),
            points(summary["gain_over_zero_shot"][c]),
        ]
        for c in summary["clients"]
    ]
    zs_held = _mean([r["zero_shot_heldout"] for r in runs])
    rows.append(
        [
            f"{summary['test_domain']} (held out)",
            cell(zs_held),
            cell(summary["generalization_acc"], std["generalization_acc"]),
            points(summary["generalization_acc"] - zs_held),
        ]
    )
    seeds = "seed" + ("s " if many else " ") + ", ".join(str(r["seed"]) for r in runs)
    lines = [
        f"selected round{'s' if many else ''} ({seeds}): {rounds} of {summary['rounds']}; rule: "
        "best mean validation accuracy among the trained rounds"
        + ("; * = no trained round beat zero-shot on validation" if "*" in rounds else ""),
        *text_table(["client", "zero-shot", "selected round", "gain"], rows),
        "test accuracy on each client's own test split"
        + (", mean ± std over seeds" if many else "")
        + "; gain in points",
    ]
    return lines


def write_json(path: Path, data: Any) -> None:
    """Atomic strict-JSON write (kept under this name for the callers that import it here)."""
    atomic_write_json(path, data, fsync=False)
