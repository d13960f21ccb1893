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
    """Local adapter training. Defaults are the FedCLIP reference's (see FEDCLIP.md).

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

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        """A copy with the given non-None fields replaced."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The setting that measurably learns on the project's synthetic data (MEASURED.md): the
# reference's coupled weight decay pulls the adapter back to uniform attention.
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

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ConfigError(f"split fractions must be positive and sum to 1, got {self.split}")


PRESETS: dict[str, dict[str, Any]] = {"reference": {}, "learning": LEARNING_PRESET}


def train_config(preset: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A preset's TrainConfig with the user's overrides (None = keep the preset's value)."""
    if preset not in PRESETS:
        raise ConfigError(unknown_name("preset", preset, PRESETS))
    return TrainConfig().with_overrides(**PRESETS[preset]).with_overrides(**(overrides or {}))
