"""The thin I/O shell around the pure core: read datasets and caches, write reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedclip_edge.config import PRESETS, SimulationConfig, train_config  # noqa: F401
from fedclip_edge.data.devices import split_domains
from fedclip_edge.data.folder import scan_dataset
from fedclip_edge.data.synth import write_dataset
from fedclip_edge.errors import ConfigError
from fedclip_edge.features import FeatureSet, TorchEncoder, extract_features, load_feature_cache
from fedclip_edge.models import encode_prompts, load_model
from fedclip_edge.models.tiny import ensure_pretrained
from fedclip_edge.names import unknown_name
from fedclip_edge.privacy.central import dp_strategy
from fedclip_edge.simulate import result_table, simulate, write_json


def build_features(
    data: Path,
    out: Path,
    *,
    model: str = "fedclip-tiny",
    pretrained: str | None = None,
    domains: list[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> FeatureSet:
    """Encode a dataset folder with the PyTorch image tower into a feature cache."""

    dataset = scan_dataset(Path(data), domains)
    loaded = load_model(model, pretrained)
    text = encode_prompts(loaded, list(dataset.classes))
    fs, report = extract_features(
        dataset,
        TorchEncoder(loaded),
        text,
        loaded.logit_scale,
        Path(out),
        batch_size=batch_size,
        progress=progress,
    )
    rate = f", {report.images_per_second:.1f} img/s (encoder only)" if report.encoded else ""
    print(
        f"features: {report.encoded} encoded, {report.reused} reused from the cache, "
        f"{len(report.skipped)} skipped{rate}; cache at {out}"
    )

    write_json(Path(out) / "extract_report.json", {**report.to_dict(), "identity": fs.identity})
    return fs


def run_simulation(
    out: Path,
    *,
    data: Path | None = None,
    features_dir: Path | None = None,
    model: str = "fedclip-tiny",
    pretrained: str | None = None,
    test_domain: str,
    rounds: int,
    seeds: tuple[int, ...] = (0,),
    preset: str = "reference",
    overrides: dict[str, Any] | None = None,
    weighting: str = "uniform",
    personalize_epochs: int = 0,
    strategy: str = "fedavg",
    strategy_options: dict[str, Any] | None = None,
    update_codec: str = "fp32",
    topk_fraction: float = 0.01,
    dp: Any = None,
    clients_per_domain: int = 1,
    clients_per_round: int | None = None,
    global_codec: str = "fp32",
    global_topk_fraction: float | None = None,
) -> dict[str, Any]:
    """Features (cached) -> federated simulation -> OUT/summary.json. `dp`: central DP's
    config (privacy.central.CentralDPConfig), None when off."""

    train = train_config(preset, overrides)
    cfg = SimulationConfig(
        test_domain=test_domain,
        rounds=rounds,
        seeds=seeds,
        weighting=weighting,
        personalize_epochs=personalize_epochs,
        train=train,
        strategy=strategy,
        strategy_options=strategy_options or {},
        update_codec=update_codec,
        topk_fraction=topk_fraction,
        dp=dp,
        clients_per_round=clients_per_round,
        global_codec=global_codec,
        global_topk_fraction=global_topk_fraction,
    )
    out = Path(out)
    if features_dir is None:
        if data is None:
            raise ConfigError("give --data DIR or --features CACHE_DIR")
        _check_test_domain(test_domain, scan_dataset(Path(data)).domains)  # before any work
        fs = build_features(data, out / "features", model=model, pretrained=pretrained)
    else:
        fs = load_feature_cache(features_dir)
    _check_test_domain(test_domain, fs.domains)
    fs = split_domains(fs, clients_per_domain, test_domain)
    if dp is not None:
        note = dp_strategy(strategy, weighting)[1]
        if note:
            print(note)
    t0 = time.perf_counter()
    summary = simulate(fs, cfg, out)
    for line in result_table(summary):
        print(line)
    print(f"summary: {out / 'summary.json'} ({time.perf_counter() - t0:.1f}s)")
    return summary


def _check_test_domain(test_domain: str, domains: Any) -> None:
    if test_domain not in domains:
        raise ConfigError(unknown_name("test domain", test_domain, list(domains)))


def run_demo(
    out: Path,
    *,
    rounds: int = 15,
    per_class: int = 100,
    test_domain: str = "photo",
    seeds: tuple[int, ...] = (0, 1, 2),
    personalize_epochs: int = 5,
    dp: Any = None,
) -> dict[str, Any]:
    """Synthetic data, the offline default model, cached features, and FedCLIP with the paper's
    reference setting and with the setting that learns (plus local personalization), side by
    side, over several seeds; `dp`: both with central DP (privacy.central.CentralDPConfig)."""

    out = Path(out)
    t0 = time.perf_counter()
    print("1/4 offline default model (fedclip-tiny, pretrained here on synthetic data)")
    _, meta = ensure_pretrained()
    zs = ", ".join(f"{d} {a:.0%}" for d, a in meta["zero_shot"].items())
    print(f"    zero-shot accuracy recorded at pretraining: {zs}")
    print(f"2/4 synthetic data: {per_class} images per domain and class")
    info = write_dataset(out / "data", per_class=per_class, seed=0)
    print(f"    {info['images']} images in {out / 'data'}")
    print("3/4 features: every image encoded once, cached")
    fs = build_features(out / "data", out / "features")
    results = {}
    runs = (
        ("reference", "reference", 0),
        ("learning", "learning", personalize_epochs),
    )
    for name, preset, k in runs:
        print(
            f"4/4 FedCLIP, {preset} setting: {rounds} rounds, seeds {list(seeds)}, held-out "
            f"domain {test_domain}" + (f", then {k} local epochs per client" if k else "")
        )
        cfg = SimulationConfig(
            test_domain=test_domain,
            rounds=rounds,
            seeds=seeds,
            train=train_config(preset),
            personalize_epochs=k,
            dp=dp,
        )
        results[name] = simulate(fs, cfg, out / name, log=_quiet_rounds)
        if dp is not None:
            p = results[name]["privacy"]
            eps = "inf" if p["epsilon"] is None else f"{p['epsilon']:.3g}"
            print(f"    central DP: epsilon {eps} at delta {p['delta']:.3g} after {p['rounds']} "
                  f"rounds (z {p['noise_multiplier']:g}, C {p['clip']:g}, q "
                  f"{p['sampling_rate']:.3g})")
    _print_demo_table(results, test_domain)
    report = {
        "seconds": round(time.perf_counter() - t0, 1),
        "model_zero_shot_at_pretraining": meta["zero_shot"],
        "results": {name: str(out / name / "summary.json") for name in results},
    }
    write_json(out / "demo.json", report)
    print(
        f"done in {report['seconds']:.0f}s; reports: {out / 'demo.json'}, "
        + ", ".join(report["results"].values())
    )
    return results


def _quiet_rounds(line: str) -> None:
    """Per-round lines of the demo, every fifth round only (the summary has them all)."""
    if line.startswith("round"):
        try:
            rnd = int(line.split()[1].split("/")[0])
        except (IndexError, ValueError):
            rnd = 0
        if rnd % 5:
            return
    print("    " + line)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.1%} ± {std:.1%}"


def _print_demo_table(results: dict[str, dict[str, Any]], test_domain: str) -> None:

    ref, learn = results["reference"], results["learning"]
    table = Table(title="FedCLIP on synthetic domains: test accuracy, mean ± std over seeds")
    for col in (
        "domain",
        "zero-shot",
        "FedCLIP reference",
        "FedCLIP learning",
        f"+ {learn['personalize_epochs']} local epochs",
    ):
        table.add_column(col)
    for c in ref["clients"]:
        table.add_row(
            f"{c} (client)",
            _pm(ref["zero_shot_test"][c], ref["std"]["zero_shot_test"][c]),
            _pm(ref["personalization_acc"][c], ref["std"]["personalization_acc"][c]),
            _pm(learn["personalization_acc"][c], learn["std"]["personalization_acc"][c]),
            _pm(learn["personalization_acc_local"][c], learn["std"]["personalization_acc_local"][c])
            if "personalization_acc_local" in learn
            else "-",
        )
    table.add_row(
        f"{test_domain} (held out)",
        f"{ref['zero_shot'][test_domain]:.1%}",
        _pm(ref["generalization_acc"], ref["std"]["generalization_acc"]),
        _pm(learn["generalization_acc"], learn["std"]["generalization_acc"]),
        "-",
    )
    Console().print(table)
    print(
        "reference: Adam lr 5e-5, coupled weight decay 0.2, clip loss (the paper's); learning: "
        "lr 1e-3, weight decay 0, ce loss. Client rows: each client's own 20% test split."
    )
