"""One job config file (TOML) for the aggregator, every device agent and the demo.

A deployment is otherwise a long command line per device. The file holds what the parts share
(broker, TLS files, job id, rounds, training settings) and what each part needs (paths); a flag
on the command line overrides the file, the file overrides the built-in default. Relative paths
in the file are relative to the file's own folder, so a job folder can be moved as a whole.

Pure: parse and validate into dataclasses; the CLI maps the result onto each command's options
(`JobConfig.options(command)`). Adding a key is one line: a field with its option's name and the
commands that take it.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedclip_edge.errors import ConfigError
from fedclip_edge.names import did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

AGG, AGENT, DEMO = "aggregate", "agent", "demo"


def key(option: str, *commands: str) -> Any:
    """A config key: absent (None) unless the file sets it; `option` is the command-line
    option's parameter name in each of `commands`."""
    return field(default=None, metadata={"option": option, "commands": commands})


@dataclass(frozen=True)
class BrokerSection:
    """[broker]: how every part reaches MQTT (url `mqtt://host:port` or `mqtts://...`)."""

    url: str | None = key("broker", AGG, AGENT, DEMO)
    username: str | None = key("username", AGG, AGENT)
    password: str | None = key("password", AGG, AGENT)
    ca_certs: Path | None = key("ca_certs", AGG, AGENT)
    certfile: Path | None = key("certfile", AGG, AGENT)
    keyfile: Path | None = key("keyfile", AGG, AGENT)
    tls_insecure: bool | None = key("tls_insecure", AGG, AGENT)
    connect_timeout: float | None = key("connect_timeout", AGG, AGENT)
    max_payload: int | None = key("max_payload", AGG, AGENT)


@dataclass(frozen=True)
class JobSection:
    """[job]: what identifies the run and how long it is."""

    id: str | None = key("job", AGG, AGENT, DEMO)
    rounds: int | None = key("rounds", AGG, DEMO)
    seed: int | None = key("seed", AGG, DEMO)


@dataclass(frozen=True)
class TrainSection:
    """[train]: local training on the devices (the aggregator sends it with each round)."""

    preset: str | None = key("preset", AGG, DEMO)
    lr: float | None = key("lr", AGG, DEMO)
    epochs: int | None = key("epochs", AGG, DEMO)
    batch_size: int | None = key("batch_size", AGG, DEMO)


@dataclass(frozen=True)
class AggregatorSection:
    """[aggregator]: the server's run folder and round rules."""

    out: Path | None = key("out", AGG)
    min_clients: int | None = key("min_clients", AGG)
    round_timeout: float | None = key("round_timeout", AGG, DEMO)
    wait_clients: float | None = key("wait_clients", AGG)
    on_short: str | None = key("on_short", AGG)
    max_retries: int | None = key("max_retries", AGG)
    weighting: str | None = key("weighting", AGG)
    strategy: str | None = key("strategy", AGG, DEMO)
    dim: int | None = key("dim", AGG)
    eval_features: Path | None = key("eval_features", AGG)
    eval_domain: str | None = key("eval_domain", AGG)
    # central DP (docs/privacy.md); dp_noise_multiplier turns it on
    dp_noise_multiplier: float | None = key("dp_noise_multiplier", AGG)
    dp_clip: float | None = key("dp_clip", AGG)
    dp_adaptive_clip: bool | None = key("dp_adaptive_clip", AGG)
    dp_clip_quantile: float | None = key("dp_clip_quantile", AGG)
    dp_population: int | None = key("dp_population", AGG)
    dp_per_round: int | None = key("dp_per_round", AGG)
    dp_delta: float | None = key("dp_delta", AGG)
    dp_target_epsilon: float | None = key("dp_target_epsilon", AGG)
    dp_accountant: str | None = key("dp_accountant", AGG)


@dataclass(frozen=True)
class AgentSection:
    """[agent]: what every device shares; its own id (and domain) come from its command line."""

    client_id: str | None = key("client_id", AGENT)
    data: Path | None = key("data", AGENT)
    domain: str | None = key("domain", AGENT)
    artifacts: Path | None = key("artifacts", AGENT)
    backend: str | None = key("backend", AGENT)
    cache: Path | None = key("cache", AGENT)
    update_dtype: str | None = key("update_dtype", AGENT)
    update_codec: str | None = key("update_codec", AGENT)  # fedclip_edge.codecs.CODECS
    topk_fraction: float | None = key("topk_fraction", AGENT)
    idle_timeout: float | None = key("idle_timeout", AGENT)
    keepalive: int | None = key("keepalive", AGENT)
    models: Path | None = key("models", AGENT)  # the device's model store (docs/serving.md)
    personalize_epochs: int | None = key("personalize_epochs", AGENT)
    promote_margin: float | None = key("promote_margin", AGENT)
    threads: int | None = key("threads", AGENT)  # torch's CPU threads for local training
    dp_clip: float | None = key("dp_clip", AGENT)  # local DP (docs/privacy.md)
    dp_noise_multiplier: float | None = key("dp_noise_multiplier", AGENT)
    dp_delta: float | None = key("dp_delta", AGENT)


@dataclass(frozen=True)
class DemoSection:
    """[demo]: the one-machine trial."""

    out: Path | None = key("out", DEMO)
    per_class: int | None = key("per_class", DEMO)
    test_domain: str | None = key("test_domain", DEMO)


@dataclass(frozen=True)
class KeysSection:
    """[keys]: who signs what (`fedclip-edge keys new`); relative paths from this file."""

    device_keys: Path | None = key("device_keys", AGG)
    signing_key: Path | None = key("signing_key", AGG)
    device_key: Path | None = key("key", AGENT)  # each device's own (usually on its command line)
    aggregator_key: Path | None = key("aggregator_key", AGENT)
    artifact_key: Path | None = key("artifact_key", AGENT)
    insecure_unsigned: bool | None = key("insecure_unsigned", AGG, AGENT)
    secure_aggregation: bool | None = key("secure_aggregation", AGG, AGENT)  # docs/privacy.md


@dataclass(frozen=True)
class JobConfig:
    """A parsed job file; `path` is where it came from (for messages)."""

    path: Path | None = None
    broker: BrokerSection = field(default_factory=BrokerSection)
    job: JobSection = field(default_factory=JobSection)
    train: TrainSection = field(default_factory=TrainSection)
    aggregator: AggregatorSection = field(default_factory=AggregatorSection)
    agent: AgentSection = field(default_factory=AgentSection)
    demo: DemoSection = field(default_factory=DemoSection)
    keys: KeysSection = field(default_factory=KeysSection)

    def options(self, command: str) -> dict[str, Any]:
        """The values the file sets for `command`, keyed by its options' parameter names."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if value is not None and command in f.metadata["commands"]:
                    out[f.metadata["option"]] = value
        return out


SECTIONS: dict[str, type] = {
    "broker": BrokerSection,
    "job": JobSection,
    "train": TrainSection,
    "aggregator": AggregatorSection,
    "agent": AgentSection,
    "demo": DemoSection,
    "keys": KeysSection,
}


def _coerce(where: str, kind: Any, value: Any, base: Path) -> Any:
    """Check one value against its field's type (TOML already typed it; be strict)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if kind is Path:
        if isinstance(value, str) and value:
            p = Path(value).expanduser()
            return p if p.is_absolute() else base / p
        raise ConfigError(f"{where} must be a path (a string), got {value!r}")
    if isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be a string, got {value!r}")


def _section(name: str, cls: type, table: Any, base: Path, source: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for k, v in table.items():
        if k not in known:
            raise ConfigError(
                f"{source}: unknown key {k!r} in [{name}]{did_you_mean(k, known)}; "
                f"[{name}] takes {', '.join(known)}"
            )
        kind = next(a for a in typing.get_args(hints[k]) if a is not type(None))
        values[k] = _coerce(f"{source}: [{name}] {k}", kind, v, base)
    return cls(**values)


def parse_job_config(text: str, base: Path, source: str = "job config") -> JobConfig:
    """Parse TOML text; relative paths resolve against `base` (the file's folder)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None
    sections: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            hint = did_you_mean(name, SECTIONS)
            if not isinstance(table, dict):  # a key outside any table
                raise ConfigError(
                    f"{source}: unknown key {name!r} outside a section{hint}; keys go in "
                    f"the sections {', '.join(f'[{s}]' for s in SECTIONS)}"
                )
            raise ConfigError(
                f"{source}: unknown section [{name}]{hint}; sections are "
                f"{', '.join(f'[{s}]' for s in SECTIONS)}"
            )
        sections[name] = _section(name, SECTIONS[name], table, base, source)
    return JobConfig(path=None, **sections)


def load_job_config(path: Path) -> JobConfig:
    """Read and validate a job file; every problem is one ConfigError naming file and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"job config {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"job config {path} is a folder, not a TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read job config {path}: {exc}") from None
    cfg = parse_job_config(text, path.resolve().parent, source=str(path))
    return dataclasses.replace(cfg, path=path)
