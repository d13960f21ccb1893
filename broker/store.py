"""The aggregator's run folder: round adapters, metrics.jsonl, state.json, and resuming from them.

Commit order, so a crash at any point loses nothing and counts nothing twice:
1. `OUT/rounds/global_rNNNN.safetensors` (atomic), 2. the round's lines appended to
`OUT/metrics.jsonl` (fsync), 3. `OUT/state.json` (atomic; the commit point), then the
convenience copies `OUT/global.safetensors`, `OUT/summary.json` and the plots.
`--resume` reads state.json, drops metric lines of rounds after it, and redoes the next round.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedclip_edge.broker import report as M
from fedclip_edge.broker.runbind import is_run_id
from fedclip_edge.errors import ConfigError
from fedclip_edge.io import atomic_write_json

STATE_SCHEMA = "fedclip-edge/aggregator-state/v1"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"


@dataclass
class Resumed:
    """What a run folder's state.json says was committed."""

    completed: int
    global_state: dict[str, torch.Tensor]
    dim: int
    counters: dict[str, int] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    global_file: str = ""
    plugins: list[dict[str, Any]] = field(default_factory=list)  # the round engine's plug-ins
    run: str = ""  # the job run (broker/runbind.py); "" in a state.json from before runs


def save_adapter(path: Path, state: dict[str, torch.Tensor], rnd: int) -> str:
    """Atomic safetensors write; returns the file's sha256 (recorded in state.json)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"round": str(rnd)})
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
        digest = hashlib.sha256(fh.read()).hexdigest()
    os.replace(tmp, path)
    return digest


class RunStore:
    """One aggregator run folder."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file, not a folder")
        self.state_path = self.out / STATE_FILE
        self.metrics_path = self.out / METRICS_FILE

    def open(self, *, job: str, seed: int, resume: bool) -> Resumed | None:
        """Start fresh (refusing to overwrite a run) or read what `--resume` continues."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create --out {self.out}: {exc.strerror}") from None
        if resume and self.state_path.is_file():
            return self._read_state(job, seed)
        if not resume and self.state_path.exists():
            raise ConfigError(
                f"{self.out} already holds a run (state.json): pass --resume "
                "to continue it or choose another --out"
            )
        self.metrics_path.unlink(missing_ok=True)
        return None

    def stored_run(self) -> str:
        """The run id state.json keeps ("" when there is none to read): a resumed job goes
        on as the same run, so its devices' signed messages still count."""
        try:
            run = json.loads(self.state_path.read_text()).get("run")
        except (OSError, ValueError, AttributeError):
            return ""
        return run if is_run_id(run) else ""

    def _read_state(self, job: str, seed: int) -> Resumed:
        path = self.state_path
        try:
            st = json.loads(path.read_text())
            if not isinstance(st, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot resume: {path} is unreadable or not JSON ({exc})") from None
        if st.get("schema") != STATE_SCHEMA or st.get("job") != job:
            raise ConfigError(f"{path} belongs to another job or format; cannot resume")
        if st.get("seed") != seed:
            raise ConfigError(
                f"{path} was made with seed {st.get('seed')}, not {seed}: resuming would not "
                "reproduce the run"
            )
        try:
            rel = str(st["global_file"])
            completed, dim = int(st["completed_round"]), int(st["dim"])
            want = str(st["global_sha256"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"cannot resume: {path} lacks or mangles {exc}") from None
        gfile = self.out / rel
        try:
            data = gfile.read_bytes()
        except OSError:
            raise ConfigError(f"cannot resume: {gfile} named in {path} is missing") from None
        if hashlib.sha256(data).hexdigest() != want:
            raise ConfigError(f"{gfile} does not match its hash in state.json")
        M.truncate_metrics(self.metrics_path, completed)
        return Resumed(
            completed=completed,
            global_state=load_file(str(gfile)),
            dim=dim,
            counters=dict(st.get("counters", {})),
            devices=dict(st.get("devices", {})),
            history=list(st.get("history", [])),
            global_file=rel,
            plugins=list(st.get("plugins", [])),
            run=str(st.get("run") or ""),
        )

    def commit(
        self,
        rnd: int,
        state: dict[str, torch.Tensor],
        records: list[dict[str, Any]],
        run_state: dict[str, Any],
    ) -> str:
        """Make round `rnd` durable, in the order the module docstring gives."""
        rel = f"rounds/global_r{rnd:04d}.safetensors"
        digest = save_adapter(self.out / rel, state, rnd)
        M.append_metrics(self.metrics_path, records)
        atomic_write_json(
            self.state_path,
            {
                "schema": STATE_SCHEMA,
                **run_state,
                "completed_round": rnd,
                "global_file": rel,
                "global_sha256": digest,
            },
        )
        save_adapter(self.out / "global.safetensors", state, rnd)
        return digest


def state_sha(out: Path) -> str:
    """sha256 of the final global adapter file named in OUT/state.json (for tests/tools)."""
    st = json.loads((Path(out) / STATE_FILE).read_text())
    return str(st["global_sha256"])
