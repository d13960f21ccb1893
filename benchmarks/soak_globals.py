"""The soak's globals: what each device trained from against what the aggregator committed, and
(with `--global-codec`) every committed global re-derived from the recorded updates.

Why a module of its own: `soak_reconcile.py` checks delivery (nothing lost) and plain FedAvg;
a compressed downlink adds two rules, read from the same logs and files:
- (b) every global a device rebuilt (its `round N: global <sha256> (...)` line, the digest of
  the exact tensors it holds) has the digest of the aggregator's committed global of round N-1
  (round 1: the initial global, derived from the job's seed; after the last round: the final
  global); a device whose rebuilt global failed the aggregator's digest (a `compressed global
  not usable here` line for any other cause than holding another round's global, or none) is
  a finding, and every update a device logged as sent was trained from a global it logged;
- (c) with a global codec the committed global is not the mean of the round's updates but what
  devices rebuild from it: `base + decode(encode(mean - base + residual))`, the residual
  carried over rounds (the server's error feedback). The reconciliation replays that from the
  recorded updates, round after round, and needs every committed global bit for bit; the
  residual it carries must equal the one each killed aggregator saved (its state.json, copied
  when it died: the moment is certain) and the final one, so a resume that lost the residual
  is caught.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.codecs import ErrorFeedback
from fedclip_edge.global_codec import (
    GLOBAL_CLIENT,
    GlobalDelta,
    derive_initial,
    state_digest,
)
from fedclip_edge.wire import DEFAULT_MAX_FRAME_BYTES, decode_update, encode_update

_DIGEST_LINE = re.compile(
    r"\] round (\d+): global ([0-9a-f]{64}) \((dense|delta on round \d+|derived from seed \d+)")
_NOT_USABLE = re.compile(r"\] round (\d+): compressed global not usable here \((.*)\); asking")
_SENT_LINE = re.compile(r"\] round (\d+) \| samples ")
# the causes a healthy federation has for a dense copy: the device holds another round's
# global (it missed one) or none (it was restarted)
_EXPECTED_CAUSE = re.compile(r"^it is a change since round \d+'s global, this device holds ")

State = dict[str, torch.Tensor]


def codec_args(cfg: Any) -> tuple[list[str], list[str]]:
    """(the aggregator's, each agent's) extra arguments for the soak's codecs."""
    agg = ["--global-codec", cfg.global_codec, "--keyframe-every", str(cfg.keyframe_every)]
    if cfg.global_topk_fraction is not None:
        agg += ["--global-topk-fraction", str(cfg.global_topk_fraction)]
    return agg, ["--update-codec", cfg.update_codec]


def check_codec_config(cfg: Any) -> None:
    """The soak's codec fields, checked (one ConfigError line)."""
    from fedclip_edge.errors import ConfigError
    from fedclip_edge.global_fields import CODECS

    for flag, codec in (("--global-codec", cfg.global_codec), ("--update-codec", cfg.update_codec)):
        if codec not in CODECS:
            raise ConfigError(f"unknown {flag} {codec!r}; choose one of {', '.join(CODECS)}")
    if cfg.keyframe_every < 0:
        raise ConfigError("--keyframe-every must be >= 0")


def snapshot_state(agg_out: Path, log: Path) -> None:
    """A killed aggregator's state.json, kept beside its log (it is dead: nothing changes it)."""
    with contextlib.suppress(OSError):
        shutil.copyfile(agg_out / "state.json", log.with_suffix(".state.json"))


def _plugin(state: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The downlink plug-in's saved state in a state.json (`GlobalCodecPlugin.state_dict`)."""
    for p in state.get("plugins", []) or []:
        if isinstance(p, dict) and "residual" in p and "codec" in p:
            return p
    return None


def _residual(p: Mapping[str, Any]) -> State:
    import base64

    import safetensors.torch

    raw = base64.b64decode(p.get("residual") or "")
    return dict(safetensors.torch.load(raw)) if raw else {}


def server_globals(agg_out: Path, seed: int, dim: int, completed: int) -> dict[int, State]:
    """Round -> the global the aggregator committed after it (0: the initial one; a round
    without a file is left out)."""
    from safetensors.torch import load_file

    out: dict[int, State] = {0: derive_initial(seed, dim)} if dim else {}
    for rnd in range(1, completed + 1):
        f = agg_out / "rounds" / f"global_r{rnd:04d}.safetensors"
        if f.is_file():
            out[rnd] = load_file(str(f))
    return out


def device_logs(paths: list[Path]) -> dict[str, Any]:
    """One device's digest lines, dense asks and sent rounds, per log file."""
    per_log = []
    for path in paths:
        lines = path.read_text(errors="replace").splitlines()
        digests: list[tuple[int, str, str]] = []
        asks: list[tuple[int, str]] = []
        untracked: list[int] = []  # sent rounds without an earlier digest line in this log
        seen: set[int] = set()
        for line in lines:
            if m := _DIGEST_LINE.search(line):
                digests.append((int(m.group(1)), m.group(2), m.group(3)))
                seen.add(int(m.group(1)))
            elif m := _NOT_USABLE.search(line):
                asks.append((int(m.group(1)), m.group(2)))
            elif (m := _SENT_LINE.search(line)) and int(m.group(1)) not in seen:
                untracked.append(int(m.group(1)))
        per_log.append({"log": path.name, "digests": digests, "asks": asks,
                        "untracked": untracked})
    return {"logs": per_log}


def check_devices(logs: Mapping[str, list[Path]], globals_: Mapping[int, State],
                  rounds: int, completed: int) -> dict[str, Any]:
    """Rule (b): each device's rebuilt globals against the server's committed ones."""
    want = {r + 1: state_digest(s) for r, s in globals_.items()}
    if completed in globals_ and completed == rounds:
        want[rounds + 1] = state_digest(globals_[completed])  # the final global
    mismatched: list[str] = []
    unknown: list[str] = []
    bad_asks: list[str] = []
    untracked: list[str] = []
    how: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    per_log: dict[str, int] = {}  # digest lines per agent incarnation (restarts are logs 2..)
    lines = 0
    for _, paths in sorted(logs.items()):
        for entry in device_logs(paths)["logs"]:
            per_log[entry["log"]] = len(entry["digests"])
            for rnd, digest, kind in entry["digests"]:
                lines += 1
                how[kind if kind == "dense" else kind.split()[0]] += 1  # dense|delta|derived
                if rnd not in want:
                    unknown.append(f"{entry['log']}: round {rnd} (no committed global for it)")
                elif digest != want[rnd]:
                    mismatched.append(f"{entry['log']}: round {rnd} global {digest[:12]}, the "
                                      f"aggregator's {want[rnd][:12]}")
            for rnd, why in entry["asks"]:
                if _EXPECTED_CAUSE.match(why):
                    causes["holds none" if why.endswith("none") else "missed a round"] += 1
                else:
                    bad_asks.append(f"{entry['log']}: round {rnd}: {why}")
            untracked += [f"{entry['log']}: round {r}" for r in entry["untracked"]]
    return {"lines": lines, "matched": lines - len(mismatched) - len(unknown),
            "mismatched": mismatched, "no_server_global": unknown,
            "digest_failures": bad_asks, "sent_without_a_logged_global": untracked,
            "rebuilt": dict(how), "dense_asked": dict(causes), "per_log": per_log}


def check_codec_rounds(cfg: Any, job: str, globals_: Mapping[int, State],
                       means: Mapping[int, list[State]], completed: int,
                       saved: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """Rule (c): replay the server's encoder from the recorded updates. `means[r]` are the
    candidate float32 aggregates of round r (one per combination of recorded updates);
    `saved[r]` a state.json that committed round r (killed aggregators' and the final)."""
    feedback = ErrorFeedback()
    bad: list[str] = []
    residuals_checked = 0
    replayed = 0
    for rnd in range(1, completed + 1):
        base, glob = globals_.get(rnd - 1), globals_.get(rnd)
        if base is None or glob is None or not means.get(rnd):
            bad.append(f"round {rnd}: no committed global or no recorded aggregate")
            break
        hit = None
        for agg in means[rnd]:
            fb = ErrorFeedback(feedback.residual)
            frame = encode_update(agg, base, codec=cfg.global_codec, job=job, round=rnd + 1,
                                  client=GLOBAL_CLIENT, feedback=fb,
                                  topk_fraction=cfg.global_topk_fraction or 0.01)
            new = decode_update(frame, base, max_bytes=max(DEFAULT_MAX_FRAME_BYTES, len(frame)))
            if _same(new.tensors, glob):
                hit = fb
                break
        if hit is None:
            bad.append(f"round {rnd}: the committed global is not base + the codec's change of "
                       "the mean of its accepted updates (with the carried residual)")
            break  # the residual carried from here on is unknown
        feedback = hit
        replayed += 1
        if rnd in saved:
            residuals_checked += 1
            p = _plugin(saved[rnd]) or {}
            # within 1e-6: a float64 sum in another order may move an aggregate by one ulp, and
            # the residual with it; a residual lost on resume is orders of magnitude more
            if not _same(_residual(p), feedback.residual, atol=1e-6):
                bad.append(f"round {rnd}: the residual the aggregator saved differs from the "
                           "one replayed from the recorded updates")
            last = p.get("last")
            if rnd > 1 and last:
                d = GlobalDelta.from_dict(last)
                rebuilt = decode_update(d.frame, globals_[rnd - 1],
                                        max_bytes=max(DEFAULT_MAX_FRAME_BYTES, len(d.frame)))
                if d.round != rnd + 1 or d.digest != state_digest(glob) or not _same(
                        rebuilt.tensors, glob):
                    bad.append(f"round {rnd}: the saved delta frame does not rebuild the "
                               "committed global")
    return {"replayed": replayed, "residuals_checked": residuals_checked, "mismatched": bad}


def saved_states(agg_logs: list[Path], final: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """Round -> a state.json that committed it: each killed aggregator's copy, and the final."""
    out: dict[int, dict[str, Any]] = {}
    for log in agg_logs:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            st = json.loads(log.with_suffix(".state.json").read_text())
            out[int(st["completed_round"])] = st
    with contextlib.suppress(KeyError, TypeError, ValueError):
        out[int(final["completed_round"])] = dict(final)
    return out


def downlink_figures(rows: list[dict[str, Any]]) -> dict[str, int]:
    """What the aggregator's round rows say went down: delta, dense and derived publications."""
    rounds = [r for r in rows if r.get("kind") != "client" and "globals_dense" in r]
    return {"globals_delta": sum(int(r["globals_delta"]) for r in rounds),
            "globals_dense": sum(int(r["globals_dense"]) for r in rounds),
            "globals_derived": sum(int(r.get("globals_derived", 0)) for r in rounds),
            "bytes_down_per_client": sum(int(r["bytes_down_per_client"]) for r in rounds)}


def _same(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
          atol: float = 0.0) -> bool:
    """Same names and values (bit for bit, or within `atol`)."""
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].to(torch.float32), b[k].to(torch.float32), rtol=0, atol=atol)
        if atol else torch.equal(a[k].to(torch.float32), b[k].to(torch.float32)) for k in a)
