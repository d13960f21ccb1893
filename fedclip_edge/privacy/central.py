"""Central differential privacy (DP-FedAvg, user level) as a round-engine plug-in.

Why a plug-in: `simulate` (to measure what DP costs in accuracy) and the aggregator (to protect
a fleet) get it from this one implementation, between collect and aggregate:

- `on_update`: each device's delta against the round's global is clipped to L2 norm C (over the
  whole adapter) and added to the plug-in's own float64 sum (the clipped update also goes on to
  the strategy's accumulator, which only counts it: the strategy's mean is not used);
- `on_aggregate`: Gaussian noise of std z_delta * C is added to the sum, which is divided by the
  EXPECTED number of devices per round, a constant (dividing by the count that answered would
  leak it): the new global is global + (sum + noise) / expected;
- `on_close`: the round is accounted; epsilon at delta is recomputed by dp-accounting from the
  schedule of committed rounds (`accountant.schedule_epsilon`), which is also what `state_dict`
  saves, so a resumed job's epsilon is exact.

Adaptive clipping (Andrew et al. 2021) moves C toward a quantile of the round's unclipped norms
with a noised count of the devices under C; the count's noise sigma_b takes part of the budget,
so the deltas' noise multiplier is raised to z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 (their
Theorem 1) and the accountant composes the stated z: the quantile estimate is accounted.

The accountant assumes each device takes part in a round independently with probability
q = expected / population (Poisson sampling). Devices that answer when they are online are not
Poisson sampled: the epsilon is then an approximation (docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedclip_edge.errors import ConfigError, FedClipError
from fedclip_edge.privacy import accountant as A
from fedclip_edge.privacy.dp import (
    AdaptiveClip,
    apply_delta,
    clip_delta,
    delta_of,
    secure_generator,
    split_noise_multiplier,
)
from fedclip_edge.rounds.engine import OpenRound, RoundPlugin, RoundResult, Update

# The clip when --dp-clip is not given: about the norm of a round's delta on the 128-wide
# synthetic features with the learning preset (0.18; docs/privacy.md); with adaptive
# clipping it is only the starting point.
DEFAULT_CLIP = 0.2
ADAPTIVE_LR = 0.2  # eta_C, Andrew et al.'s geometric learning rate
# The quantile count's noise: the paper's expected/20, but at least enough that the count takes
# no more than a tenth of the noise budget ((2 sigma_b)^-2 <= 0.1 z^-2).
COUNT_BUDGET_SHARE = 0.1
# Strategies DP-FedAvg can stand in for: it is a mean; fedavg-clip's clipping is replaced.
DP_STRATEGIES = ("fedavg", "fedavg-clip")


class PrivacyBudgetSpent(FedClipError):
    """The next round would take epsilon past --dp-target-epsilon: the job stops, every round
    before it committed (a resume stops again: the budget is spent)."""

    exit_code = 1


@dataclass(frozen=True)
class CentralDPConfig:
    """The options `aggregate` and `simulate` take (`--dp-*`)."""

    noise_multiplier: float
    clip: float = DEFAULT_CLIP
    adaptive: bool = False
    quantile: float = 0.5
    population: int | None = None  # None: the expected count per round (q = 1)
    per_round: int | None = None  # expected devices per round; None: the caller's fleet size
    delta: float | None = None  # None: 1 / population
    target_epsilon: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"central DP: {msg}")

        z = self.noise_multiplier
        if not (math.isfinite(z) and z >= 0):
            raise bad(f"--dp-noise-multiplier must be a number >= 0, got {z}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise bad(f"--dp-clip must be a number > 0, got {self.clip}")
        if not 0.0 < self.quantile < 1.0:
            raise bad(f"--dp-clip-quantile must be in (0, 1), got {self.quantile}")
        for name, v in (("--dp-population", self.population), ("--dp-per-round", self.per_round)):
            if v is not None and v < 1:
                raise bad(f"{name} must be >= 1, got {v}")
        if self.population is not None and self.per_round is not None \
                and self.per_round > self.population:
            raise bad(f"{self.per_round} devices per round exceed the population "
                      f"--dp-population {self.population}")
        if self.delta is not None and not 0.0 < self.delta < 1.0:
            raise bad(f"--dp-delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None:
            if not self.target_epsilon > 0:
                raise bad(f"--dp-target-epsilon must be > 0, got {self.target_epsilon}")
            if z == 0:
                raise bad("--dp-target-epsilon needs --dp-noise-multiplier > 0 (without noise "
                          "no round has a finite epsilon)")
        if self.accountant not in A.ACCOUNTANTS:
            raise bad(f"unknown accountant {self.accountant!r}; choose one of "
                      f"{', '.join(A.ACCOUNTANTS)}")


def dp_config(noise_multiplier: float | None, *, clip: float | None = None,
              adaptive: bool = False, quantile: float | None = None,
              population: int | None = None, per_round: int | None = None,
              delta: float | None = None, target_epsilon: float | None = None,
              accountant: str | None = None) -> CentralDPConfig | None:
    """The command line's `--dp-*` options as a config; None when central DP is off (no
    --dp-noise-multiplier). Another --dp-* option without it is refused (it would do nothing)."""
    given = {"--dp-clip": clip, "--dp-adaptive-clip": adaptive or None,
             "--dp-clip-quantile": quantile, "--dp-population": population,
             "--dp-per-round": per_round, "--dp-delta": delta,
             "--dp-target-epsilon": target_epsilon, "--dp-accountant": accountant}
    if noise_multiplier is None:
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise ConfigError(f"{', '.join(named)} need{'s' if len(named) == 1 else ''} "
                              "--dp-noise-multiplier (central DP is on "
                              "only with it; 0 clips without noise)")
        return None
    return CentralDPConfig(
        noise_multiplier=noise_multiplier,
        clip=DEFAULT_CLIP if clip is None else clip,
        adaptive=adaptive,
        quantile=0.5 if quantile is None else quantile,
        population=population,
        per_round=per_round,
        delta=delta,
        target_epsilon=target_epsilon,
        accountant=accountant or "rdp",
    )


def dp_strategy(strategy: str, weighting: str) -> tuple[str, str | None]:
    """The strategy to run under central DP and a note to log: DP-FedAvg is a mean, so fedavg
    runs; fedavg-clip's clipping is replaced by DP's (note); any other strategy is refused."""
    if strategy not in DP_STRATEGIES:
        raise ConfigError(f"central DP is DP-FedAvg, defined over the mean of clipped deltas: "
                          f"strategy {strategy!r} is refused (use fedavg or fedavg-clip)")
    if weighting != "uniform":
        raise ConfigError("central DP weighs every device equally (a weight by sample count "
                          "would change a device's sensitivity): --weighting samples is refused")
    note = None
    if strategy == "fedavg-clip":
        note = ("central DP: strategy fedavg-clip runs as fedavg, its median-multiple clipping "
                "replaced by DP's clip C")
    return "fedavg", note


# The one line a central (or a regional site) over sites says to --dp-*: its updates are
# sites' aggregates, so clipping and noising them would bound a SITE's influence (site-level
# DP), not a device's; user-level DP runs at each site, over that site's own devices.
OVER_SITES = ("central DP over sites is refused: it would clip and noise each SITE's aggregate "
              "(site-level DP), not each device's update (user-level DP); run the --dp-* "
              "options at each site (aggregate --upstream ... --site S --dp-...) instead "
              "(docs/privacy.md)")


def aggregator_dp(cfg: CentralDPConfig | None, *, rounds: int | None, min_clients: int,
                  sites: bool, resume: bool, site: str | None = None) -> CentralDP | None:
    """`aggregate`'s plug-in (None when central DP is off): noise from the OS's CSPRNG. A job
    whose plan exceeds --dp-target-epsilon is refused here when the expected count is known
    (--dp-per-round) and nothing is committed yet; else before its first round. `sites`: this
    aggregator takes sites' updates (--site-keys): refused (OVER_SITES). `site`: this is site
    `site` (--upstream): DP over its own devices, accounted for them alone."""
    if cfg is None:
        return None
    if sites:
        raise ConfigError(OVER_SITES)
    if cfg.per_round is not None and cfg.per_round < min_clients:
        raise ConfigError(f"central DP: --dp-per-round {cfg.per_round} is below --min-clients "
                          f"{min_clients}")
    dp = CentralDP(cfg, planned_rounds=rounds, site=site)
    if cfg.per_round is not None and not resume:
        dp.check_plan()
    return dp


def count_stddev(noise_multiplier: float, expected: float) -> float:
    """sigma_b of adaptive clipping's noised count (0 without noise)."""
    if noise_multiplier == 0:
        return 0.0
    floor = noise_multiplier / (2 * math.sqrt(COUNT_BUDGET_SHARE))
    return max(expected / 20.0, floor)


def _fmt_eps(eps: float | None) -> str:
    return "inf" if eps is None else f"{eps:.3g}"


class CentralDP(RoundPlugin):
    """DP-FedAvg between collect and aggregate (module docstring). `generator` draws the noise:
    a seeded one for a reproducible simulation, else `secure_generator()` (seeded from the
    OS's CSPRNG). `planned_rounds` lets the first round refuse a job whose plan exceeds
    --dp-target-epsilon; `fleet_size` gives the expected count per round when the config does
    not (the aggregator's devices online at the first round), fixed for the job from then on.
    `site`: the plug-in of site aggregator `site` (broker/site.py): its rounds are the central's
    rounds it answers, so a round it skips (late, too few devices) is simply not accounted."""

    def __init__(self, cfg: CentralDPConfig, *, planned_rounds: int | None = None,
                 generator: torch.Generator | None = None,
                 fleet_size: Callable[[], int] | None = None, site: str | None = None) -> None:
        self.cfg = cfg
        self.site = site
        self.planned_rounds = planned_rounds
        self.generator = generator if generator is not None else secure_generator()
        self.fleet_size = fleet_size
        self.per_round: int | None = cfg.per_round
        self.clip = cfg.clip
        self.segments: list[list[float]] = []  # [z, q, rounds] of committed rounds, in order
        self.epsilon: float | None = 0.0  # None: infinite (z = 0)
        self._checked = False
        self._next_clip: tuple[int, float] | None = None

    # ------------------------------------------------------------------ figures
    @property
    def rounds(self) -> int:
        return int(sum(s[2] for s in self.segments))

    @property
    def population(self) -> int:
        return self.cfg.population or self.expected

    @property
    def expected(self) -> int:
        if self.per_round is None:
            raise RuntimeError("expected count unknown before the first round")
        return self.per_round

    @property
    def sampling_rate(self) -> float:
        return A.sampling_rate(self.expected, self.population)

    @property
    def delta(self) -> float:
        return self.cfg.delta if self.cfg.delta is not None else 1.0 / self.population

    def _epsilon_of(self, segments: list[list[float]]) -> float | None:
        eps = A.schedule_epsilon([(z, q, int(r)) for z, q, r in segments], self.delta,
                                 self.cfg.accountant)
        return None if math.isinf(eps) else eps

    def _with(self, rounds: int) -> list[list[float]]:
        segs = [list(s) for s in self.segments]
        z, q = self.cfg.noise_multiplier, self.sampling_rate
        if segs and segs[-1][0] == z and segs[-1][1] == q:
            segs[-1][2] += rounds
        else:
            segs.append([z, q, rounds])
        return segs

    def privacy(self) -> dict[str, Any]:
        """summary.json's `privacy` block (epsilon None: no finite epsilon, z = 0)."""
        known = self.per_round is not None
        return {
            "mechanism": ("central DP-FedAvg (user level: each device's whole update)"
                          if self.site is None else
                          f"central DP-FedAvg at site {self.site} (user level for its own "
                          "devices: each device's whole update; what it sends upstream)"),
            "epsilon": self.epsilon,
            "delta": self.delta if known else self.cfg.delta,
            "noise_multiplier": self.cfg.noise_multiplier,
            "clip": self.clip,
            "adaptive_clip": ({"target_quantile": self.cfg.quantile, "lr": ADAPTIVE_LR,
                               "initial_clip": self.cfg.clip}
                              if self.cfg.adaptive else None),
            "accountant": f"dp-accounting {self.cfg.accountant.upper()}, Poisson-subsampled "
                          "Gaussian",
            "population": self.population if known else self.cfg.population,
            "expected_per_round": self.per_round,
            "sampling_rate": self.sampling_rate if known else None,
            "rounds": self.rounds,
            "target_epsilon": self.cfg.target_epsilon,
        }

    def report(self) -> dict[str, Any]:
        """What the aggregator's summary.json gains."""
        return {"privacy": self.privacy()}

    def note(self) -> str:
        """What a round line ends with."""
        return (f"DP eps {_fmt_eps(self.epsilon)} at delta {self.delta:.3g} "
                f"(z {self.cfg.noise_multiplier:g}, C {self.clip:.3g}, q {self.sampling_rate:.3g})")

    def check_plan(self) -> None:
        """Refuse (ConfigError) a job whose planned rounds, after those already committed, would
        spend more than --dp-target-epsilon; once, before its first round (or earlier, when the
        expected count per round is known before devices connect)."""
        self._checked = True
        target = self.cfg.target_epsilon
        if target is None or self.planned_rounds is None:
            return
        left = self.planned_rounds - self.rounds
        planned = self._epsilon_of(self._with(max(left, 0)))
        if planned is None or planned > target:
            allowed = A.max_rounds(target, self.cfg.noise_multiplier, self.sampling_rate,
                                   self.delta, self.cfg.accountant)
            raise ConfigError(
                f"central DP: {self.planned_rounds} rounds would spend epsilon "
                f"{_fmt_eps(planned)} > --dp-target-epsilon {target:g} at delta "
                f"{self.delta:.3g} (z {self.cfg.noise_multiplier:g}, q {self.sampling_rate:.3g});"
                f" {allowed} rounds fit the budget from none spent")

    # ------------------------------------------------------------------ the round
    def on_open(self, rnd: OpenRound) -> None:
        if self.site is None and rnd.number != self.rounds + 1:
            raise ConfigError(
                f"central DP: round {rnd.number} opens with {self.rounds} round(s) accounted; "
                "the rounds before it ran without central DP (their globals have no finite "
                "epsilon): start a new job (another --out) to run it with DP")
        if self.per_round is None:
            size = self.fleet_size() if self.fleet_size is not None else 0
            if size < 1:
                raise ConfigError("central DP: the expected number of devices per round is "
                                  "unknown (give --dp-per-round)")
            if self.cfg.population is not None and size > self.cfg.population:
                raise ConfigError(f"central DP: {size} devices per round exceed the population "
                                  f"--dp-population {self.cfg.population}")
            self.per_round = size
        if self.delta >= 1.0:
            raise ConfigError("central DP: a population of 1 makes the default delta 1 (no "
                              "guarantee): give --dp-population or --dp-delta")
        if not self._checked:
            self.check_plan()
        target = self.cfg.target_epsilon
        if target is not None:
            after = self._epsilon_of(self._with(1))
            if after is None or after > target:
                raise PrivacyBudgetSpent(
                    f"central DP: round {rnd.number} would take epsilon from "
                    f"{_fmt_eps(self.epsilon)} to {_fmt_eps(after)} > --dp-target-epsilon "
                    f"{target:g}; stopped with {self.rounds} round(s) committed")
        rnd.extras["dp"] = {"sum": None, "norms": [], "clip": self.clip}

    def on_update(self, rnd: OpenRound, update: Update) -> Update:
        box = rnd.extras["dp"]
        clipped, norm = clip_delta(delta_of(update.state, rnd.global_state), box["clip"])
        box["norms"].append(norm)
        if box["sum"] is None:
            box["sum"] = {k: t.double() for k, t in clipped.items()}
        else:
            for k, t in clipped.items():
                box["sum"][k] += t.double()
        return Update(update.client, apply_delta(rnd.global_state, clipped), update.samples,
                      update.weight, update.record)

    def on_aggregate(self, rnd: OpenRound, state: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
        box = rnd.extras["dp"]
        if box["sum"] is None:
            return state  # nothing collected: the engine never aggregates then
        z, expected = self.cfg.noise_multiplier, float(self.expected)
        sigma_b = count_stddev(z, expected) if self.cfg.adaptive else 0.0
        z_delta = split_noise_multiplier(z, sigma_b) if sigma_b > 0 else z
        std = z_delta * box["clip"]
        mean = {}
        for k in sorted(box["sum"]):  # a fixed order: a seeded generator gives the same noise
            t = box["sum"][k]
            noise = torch.randn(t.shape, generator=self.generator, dtype=torch.float64)
            mean[k] = ((t + std * noise) / expected).float()
        if self.cfg.adaptive:
            ac = AdaptiveClip(box["clip"], self.cfg.quantile, ADAPTIVE_LR, sigma_b)
            self._next_clip = (rnd.number, ac.update(box["norms"], expected, self.generator))
        return apply_delta(rnd.global_state, mean)

    def on_close(self, result: RoundResult) -> None:
        self.segments = self._with(1)
        self.epsilon = self._epsilon_of(self.segments)
        # the adaptive clip moves only with a closed (then committed) round
        if self._next_clip is not None and self._next_clip[0] == result.number:
            self.clip = self._next_clip[1]
        self._next_clip = None

    def state_dict(self) -> dict[str, Any]:
        return {"central_dp": {"segments": self.segments, "clip": self.clip,
                               "per_round": self.per_round, "privacy": self.privacy()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        st = state.get("central_dp")
        if not isinstance(st, Mapping):
            raise ConfigError("central DP: the run folder has no central DP state to resume "
                              "(it ran without --dp-noise-multiplier)")
        self.segments = [[float(z), float(q), int(r)] for z, q, r in st["segments"]]
        self.clip = float(st["clip"]) if self.cfg.adaptive else self.cfg.clip
        if self.cfg.per_round is None and st.get("per_round") is not None:
            self.per_round = int(st["per_round"])
        if self.per_round is not None:
            self.epsilon = self._epsilon_of(self.segments)
