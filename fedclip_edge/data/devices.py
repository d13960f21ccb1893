"""Many simulated devices from few domains: each training domain's images dealt round-robin
(after a seeded shuffle) to K devices named `<domain>-<i>`, so `simulate` can run a population
large enough for device sampling and central DP to mean something (docs/privacy.md). The held-out
domain stays whole. Devices of one domain share its style: the split is IID within a domain."""

from __future__ import annotations

import torch

from fedclip_edge.errors import ConfigError
from fedclip_edge.features import DomainFeatures, FeatureSet


def split_domains(fs: FeatureSet, per_domain: int, keep: str, seed: int = 0) -> FeatureSet:
    """The feature set with every domain but `keep` split into `per_domain` devices."""
    if per_domain == 1:
        return fs
    domains: dict[str, DomainFeatures] = {}
    for name, d in fs.domains.items():
        if name == keep:
            domains[name] = d
            continue
        if len(d) < 5 * per_domain:
            raise ConfigError(f"domain {name} has {len(d)} images: too few for {per_domain} "
                              "devices (at least 5 each, for train, validation and test)")
        order = torch.randperm(len(d), generator=torch.Generator().manual_seed(seed))
        for i in range(per_domain):
            ix = order[i::per_domain]
            domains[f"{name}-{i}"] = DomainFeatures(
                f"{name}-{i}", d.features[ix], d.labels[ix], [d.paths[j] for j in ix.tolist()],
                d.content_sha256[ix])
    return FeatureSet(fs.identity, fs.class_names, fs.text_features, fs.logit_scale, domains)


def poisson_sample(clients: list[str], per_round: int, generator: torch.Generator) -> list[str]:
    """Each client independently with probability per_round / len(clients) (the sampling the
    DP accountant assumes); drawn again in the rare round that picks nobody ((1 - q)^N)."""
    q = per_round / len(clients)
    while True:
        picked = torch.rand(len(clients), generator=generator, dtype=torch.float64) < q
        chosen = [c for c, p in zip(clients, picked.tolist(), strict=True) if p]
        if chosen:
            return chosen
