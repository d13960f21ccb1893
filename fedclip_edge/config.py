"""Settings as data: dataclasses with the reference's defaults, overrides applied on a copy."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedclip_edge.errors import ConfigError
from fedclip_edge.losses import LOSSES
from fedclip_edge.names import unknown_name


@dataclass(frozen=True)
class TrainConfig:
    """Local adapter training. Defaults are the FedCLIP reference's (microsoft/PersonalizedFL,
    `fedclip/`; docs/results.md, "The method, and where it departs from the reference").

    Adam with *coupled* L2 (torch.optim.Adam's weight_decay), re-created every round.
    `logit_scale=None` means: use the CLIP model's own learned scale.
    """

    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.2
    batch_size: int = 32
    epochs: int = 1
    loss: str = "clip"
    logit_scale: float | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 0 or self.weight_decay < 0:
            raise ConfigError(
                "lr must be > 0, batch_size >= 1, epochs >= 0 and weight_decay >= 0 "
                f"(got lr={self.lr}, batch_size={self.batch_size}, epochs={self.epochs}, "
                f"weight_decay={self.weight_decay})"
            )

    @classmethod
    def from_untrusted(cls, data: Any) -> TrainConfig:
        """Settings that arrived over the network (the global adapter's `train`): every field
        typed and bounded, unknown fields refused, so a bad value is one ConfigError naming it
        instead of a traceback or a round that never ends (epochs 10**9)."""
        if not isinstance(data, dict):
            raise ConfigError(f"training settings must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(map(str, unknown))}")
        out: dict[str, Any] = {}
        for name, value in data.items():
            if name in _FLOAT_BOUNDS:
                lo, hi, lo_open = _FLOAT_BOUNDS[name]
                out[name] = _bounded_float(name, value, lo, hi, lo_open)
            elif name in _INT_BOUNDS:
                out[name] = _bounded_int(name, value, *_INT_BOUNDS[name])
            elif name == "betas":
                if not isinstance(value, (list, tuple)) or len(value) != 2:
                    raise ConfigError(f"training setting betas must be two numbers, got {value!r}")
                out[name] = tuple(_bounded_float("betas", b, 0.0, 1.0, False, hi_open=True)
                                  for b in value)
            elif name == "loss":
                if value not in LOSSES:
                    raise ConfigError(f"training setting loss {value!r} is not one of "
                                      f"{', '.join(LOSSES)}")
                out[name] = value
            elif name == "logit_scale":
                out[name] = None if value is None else _bounded_float(name, value, 0.0, 1e4, True)
        return cls(**out)

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        """A copy with the given non-None fields replaced."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Bounds on settings received over the network: generous for any real use, tight enough that
# no value can pin a device (epochs, batch size) or poison the optimizer (eps <= 0, betas >= 1).
_FLOAT_BOUNDS: dict[str, tuple[float, float, bool]] = {  # name: (low, high, low is exclusive)
    "lr": (0.0, 10.0, True),
    "eps": (0.0, 1.0, True),
    "weight_decay": (0.0, 100.0, False),
}
_INT_BOUNDS: dict[str, tuple[int, int]] = {"batch_size": (1, 65_536), "epochs": (0, 1_000)}


def _bounded_float(
    name: str, value: Any, lo: float, hi: float, lo_open: bool, *, hi_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"training setting {name} must be a number, got {value!r}")
    try:
        f = float(value)
    except OverflowError:
        raise ConfigError(f"training setting {name} is out of range") from None
    if not (f > lo if lo_open else f >= lo) or not (f < hi if hi_open else f <= hi):
        raise ConfigError(f"training setting {name}={f!r} is outside [{lo}, {hi}]")
    return f


def _bounded_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"training setting {name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"training setting {name}={value} is outside [{lo}, {hi}]")
    return int(value)


# The setting that measurably learns on the project's synthetic data (docs/results.md): the
# reference's coupled weight decay pulls the adapter back to uniform attention, and at lr 5e-5
# Adam moves each weight by at most about lr x steps (docs/results.md, "Why the
# reference setting barely moves").
LEARNING_PRESET = {"lr": 1e-3, "weight_decay": 0.0, "loss": "ce"}


@dataclass(frozen=True)
class SimulationConfig:
    """The paper's protocol: one client per training domain, leave one domain out."""

    test_domain: str
    rounds: int = 20
    seeds: tuple[int, ...] = (0,)
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)
    weighting: str = "uniform"
    personalize_epochs: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    # Aggregation: a name from strategy.STRATEGIES and its options (bound, trim).
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)

    def make_strategy(self):  # -> strategy.Strategy (imported late: strategy imports torch)
        from fedclip_edge.strategy import make_strategy

        if self.dp is not None:  # central DP runs DP-FedAvg (privacy/central.py)
            from fedclip_edge.privacy.central import dp_strategy

            return make_strategy(dp_strategy(self.strategy, self.weighting)[0])
        return make_strategy(self.strategy, weighting=self.weighting, **self.strategy_options)

    # Central DP (privacy.central.CentralDPConfig), None when off.
    dp: Any = None
    # Poisson sampling of clients: this many expected per round (None: every client, every round)
    clients_per_round: int | None = None

    # How each client's update travels (fedclip_edge.codecs); fp32 is lossless, today's frames.
    update_codec: str = "fp32"
    topk_fraction: float = 0.01
    # How the global goes down (fedclip_edge.global_codec); fp32: dense, today's behaviour.
    global_codec: str = "fp32"
    global_topk_fraction: float | None = None  # None: topk_fraction's

    def __post_init__(self) -> None:
        from fedclip_edge.codecs import CODECS, check_topk_fraction

        self.make_strategy()  # a typo in a name or option fails here, before any training
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.update_codec not in CODECS:
            raise ConfigError(
                f"unknown update codec {self.update_codec!r}; choose one of {', '.join(CODECS)}"
            )
        if self.global_codec not in CODECS:
            raise ConfigError(
                f"unknown global codec {self.global_codec!r}; choose one of {', '.join(CODECS)}"
            )
        try:
            check_topk_fraction(self.topk_fraction)
            if self.global_topk_fraction is not None:
                check_topk_fraction(self.global_topk_fraction)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ConfigError(f"split fractions must be positive and sum to 1, got {self.split}")


PRESETS: dict[str, dict[str, Any]] = {"reference": {}, "learning": LEARNING_PRESET}


def train_config(preset: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A preset's TrainConfig with the user's overrides (None = keep the preset's value)."""
    if preset not in PRESETS:
        raise ConfigError(unknown_name("preset", preset, PRESETS))
    return TrainConfig().with_overrides(**PRESETS[preset]).with_overrides(**(overrides or {}))
