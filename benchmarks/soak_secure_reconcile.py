"""The secure soak's reconciliation: nobody can unmask a vector after the fact, so each side's
own record is checked against the other's.

- The devices: each keeps (`agent --secagg-record`) a line of `sent.jsonl` and the clipped
  delta (`rNNNN-ATTEMPT.npy`, float64) for every masked vector, written before it leaves, with
  the writing process's pid (a killed incarnation's record may never have been published).
- The aggregator: its log names every attempt it starts (`attempt A: roster of n`), fails
  (`attempt failed: ... (attempt A)`) and sums (`... attempt A)`), and every refusal; the
  client rows of metrics.jsonl list, per committed round, the devices whose vectors are in the
  sum and the attempt (`secagg_attempt`).

Checks (besides the plain soak's counters, final global and leaks):
- `lost_0`: every masked vector a device recorded for a committed round is in that round's
  sum (its attempt is the committed one and metrics.jsonl lists it, once), or in an attempt
  the aggregator logged as failed, or in one a killed aggregator started and never ended, or
  refused with a counted reason (a `rejected (...)` line for that device's `masked` of that
  round), or left out by the signed survivors list (the device logs `not in this attempt's
  sum`); a record of a killed agent that none of these explain is `unacknowledged_when_killed`
  (published or not, the kill decided); anything else is lost.
- `no_update_accepted_that_no_device_sent`: every client row has the device's record of that
  attempt.
- `globals_match_accepted_updates`: each committed global equals the previous one (round 0:
  the seeded initial adapter) plus the weighted mean of the recorded clipped deltas of the
  round's clients, within the fixed-point error (docs/privacy.md: n / (2 x scale) over the
  sum of weights) plus float32 rounding of the stored global (2 ulp).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fedclip_edge.benchmarks.soak_reconcile import (
    _PENALTY,
    _aggregator_log,
    _broker_save_errors,
    _leftovers,
    _rate_limited,
    figures_line,
    rejected_in_state,
)
from fedclip_edge.broker import secagg_wire as W
from fedclip_edge.broker.secagg_round import DEFAULT_CLIP

_ROSTER = re.compile(r"^round (\d+): secure aggregation attempt (\w+): roster of")
_FAILED = re.compile(r"^round (\d+): secure aggregation attempt failed: .*\(attempt (\w+)\)$")
_NOT_IN_SUM = re.compile(r"\] round (\d+): my masked update is not in this attempt's sum")
_MASKED_ROUND = re.compile(r"\bmasked\b.*?\bround (\d+)")


def device_records(folder: Path, client: str) -> list[dict[str, Any]]:
    """The lines of a device's `sent.jsonl` (a line cut by a kill was never followed by a send:
    skipped)."""
    out = []
    with contextlib.suppress(OSError):
        for line in (folder / "sent.jsonl").read_text().splitlines():
            try:
                r = json.loads(line)
                out.append({"client": client, "round": int(r["round"]),
                            "attempt": str(r["attempt"]), "weight": int(r["weight"]),
                            "file": folder / str(r["file"]), "pid": int(r["pid"])})
            except (ValueError, KeyError, TypeError):
                continue
    return out


def attempts_logged(paths: list[Path], killed: set[Path]) -> dict[str, set[tuple[int, str]]]:
    """(round, attempt) the aggregators started, failed, and started in a killed incarnation."""
    started: set[tuple[int, str]] = set()
    failed: set[tuple[int, str]] = set()
    by_killed: set[tuple[int, str]] = set()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            if m := _ROSTER.search(line):
                started.add((int(m.group(1)), m.group(2)))
                if path in killed:
                    by_killed.add((int(m.group(1)), m.group(2)))
            elif m := _FAILED.search(line):
                failed.add((int(m.group(1)), m.group(2)))
    return {"started": started, "failed": failed, "by_killed": by_killed}


def masked_rejections(rejected: list[dict[str, Any]]) -> dict[tuple[str, int], list[str]]:
    """(client, round) -> reasons of the refusals of that device's masked vectors."""
    out: dict[tuple[str, int], list[str]] = defaultdict(list)
    for r in rejected:
        m = _MASKED_ROUND.search(r.get("text", ""))
        if r["kind"] == "update" and m:
            out[(r["client"], int(m.group(1)))].append(r["reason"])
    return out


def verdict(rec: dict[str, Any], committed: dict[int, str], rows: Counter[tuple[int, str]],
            logged: dict[str, set[tuple[int, str]]],
            refused: dict[tuple[str, int], list[str]], not_in_sum: set[tuple[str, int]],
            killed_pids: set[int]) -> str:
    """What became of one recorded masked vector ("lost" when nothing explains it)."""
    c, rnd, a = rec["client"], rec["round"], rec["attempt"]
    if committed.get(rnd) == a and rows.get((rnd, c), 0) == 1:
        return "accepted"
    if (rnd, a) in logged["failed"]:
        return "in_failed_attempt"
    if (rnd, a) in logged["by_killed"] and committed.get(rnd) != a:
        return "abandoned_by_killed_aggregator"
    if refused.get((c, rnd)):
        return "rejected_" + refused[(c, rnd)][0]
    if committed.get(rnd) == a and (c, rnd) in not_in_sum:
        return "left_out_by_survivors"
    if rec["pid"] in killed_pids:
        return "unacknowledged_when_killed"
    return "lost"


def _refuses(inj: dict[str, Any], r: dict[str, Any]) -> bool:
    """Whether rejection line `r` is the refusal of injected message `inj`."""
    kind, text = inj["kind"], r.get("text", "")
    if r["kind"] != "update" or r["client"] != inj["topic"].rsplit("/", 1)[-1]:
        return False
    if kind == "garbage":
        return r["reason"] == "envelope" or text.startswith("a plain update")
    if kind == "flood":
        return True
    if kind == "foreign_signed":
        return r["reason"] in ("bad_signature", "unknown_key")
    if kind == "cross_run":
        return r["reason"] == "run"
    if kind == "site_claim":
        return "weight 1000000000000000 " in text or (
            r["reason"] in ("secagg", "stale") and text.startswith("keys")
            and f"round {inj['round']}" in text)
    if kind == "replay":
        return text.startswith(f"{inj.get('step')} ") and f"round {inj.get('of_round')}" in text
    return False


def injected_refused(injected: list[dict[str, Any]], rejected: list[dict[str, Any]]
                     ) -> list[str]:
    """Each injected message matched to a refusal line of its own (a line serves one); what
    none refuses is returned: it was lost on the way, or accepted."""
    used: set[int] = set()
    missing = []
    for inj in injected:
        hit = next((i for i, r in enumerate(rejected) if i not in used and _refuses(inj, r)),
                   None)
        if hit is None:
            missing.append(f"{inj['kind']} on {inj['topic']} (round {inj.get('round')})")
        else:
            used.add(hit)
    return missing


def initial_global(dim: int, seed: int) -> dict[str, Any]:
    """The aggregator's round-0 adapter (broker/aggregator.py `_make_initial`)."""
    import torch

    from fedclip_edge.adapter import AttentionAdapter

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in AttentionAdapter(dim).state_dict().items()}


def check_globals(agg_out: Path, state: dict[str, Any], seed: int, agents: int,
                  committed: dict[int, str], clients: dict[int, list[str]],
                  recs: dict[tuple[str, int, str], dict[str, Any]],
                  drop: tuple[str, int] | None = None) -> dict[str, Any]:
    """Each committed global against the previous one + the weighted mean of the recorded
    clipped deltas of its clients. `drop` (client, round) leaves one delta out: the test of
    this check shows it then fails."""
    from safetensors.torch import load_file

    completed = int(state.get("completed_round", 0))
    bad: list[str] = []
    worst = 0.0
    checked = 0
    prev = None
    with contextlib.suppress(KeyError, ValueError, TypeError):
        prev = W.flatten(initial_global(int(state["dim"]), seed))
    for rnd in range(1, completed + 1):
        gfile = agg_out / "rounds" / f"global_r{rnd:04d}.safetensors"
        if not gfile.is_file() or prev is None:
            bad.append(f"round {rnd}: no global file (or no previous global)")
            prev = None
            continue
        glob = W.flatten(load_file(str(gfile)))
        a = committed.get(rnd)
        members = [recs.get((c, rnd, a or "")) for c in clients.get(rnd, [])
                   if (c, rnd) != drop]
        if a is None or not members or any(m is None for m in members):
            bad.append(f"round {rnd}: no committed attempt, or a client's record is missing")
            prev = glob
            continue
        total_w = sum(m["weight"] for m in members)  # type: ignore[index]
        mean = sum(m["weight"] * np.load(m["file"]) for m in members) / total_w  # type: ignore
        if mean.shape != prev.shape:
            bad.append(f"round {rnd}: the recorded deltas do not fit the adapter")
            prev = glob
            continue
        fp = W.fixed_point(DEFAULT_CLIP, max(m["weight"] for m in members), agents)  # type: ignore
        tol = fp.error_bound(agents) / total_w + np.abs(glob) * 2.0**-22
        err = np.abs(glob - (prev + mean))
        worst = max(worst, float(np.max(err / np.maximum(tol, 1e-300))))
        checked += 1
        if not np.all(err <= tol):
            bad.append(f"round {rnd}: the global is not the previous one + the mean of its "
                       f"clients' recorded deltas (max error {float(err.max()):.3g})")
        prev = glob
    final_ok = False
    if completed:
        a = load_file(str(agg_out / "global.safetensors"))
        b = load_file(str(agg_out / "rounds" / f"global_r{completed:04d}.safetensors"))
        final_ok = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    return {"checked": checked, "mismatched": bad, "worst_error_over_bound": round(worst, 4),
            "final_equals_last_round": final_ok}


def killed_pids(procs: Any) -> set[int]:
    """The pids of the incarnations the soak killed (their logs are in `procs.killed`)."""
    seen: Counter[str] = Counter()
    out = set()
    for name, proc in procs.all:
        log = procs.logs[name][seen[name]]
        seen[name] += 1
        if log in procs.killed:
            out.add(proc.pid)
    return out


def reconcile_secure(soak: Any, recorded_msgs: list[tuple[float, str, bytes]], finished: bool,
                     error: str, wall: float, drop: tuple[str, int] | None = None
                     ) -> dict[str, Any]:
    """The secure soak's report (the plain soak's fields, its checks read as above)."""
    cfg, agg_out = soak.cfg, soak.agg_out
    try:
        state = json.loads((agg_out / "state.json").read_text())
    except (OSError, ValueError):
        state = {"completed_round": 0, "counters": {}}
    completed = int(state.get("completed_round", 0))
    counters = Counter({k: int(v) for k, v in state.get("counters", {}).items()})
    rows: list[dict[str, Any]] = []
    with contextlib.suppress(OSError):
        rows = [json.loads(x) for x in (agg_out / "metrics.jsonl").read_text().splitlines() if x]
    client_rows = [r for r in rows if r.get("kind") == "client"]
    row_counts = Counter((int(r["round"]), str(r["client"])) for r in client_rows)
    clients: dict[int, list[str]] = defaultdict(list)
    attempts_of: dict[int, set[str]] = defaultdict(set)
    for r in client_rows:
        clients[int(r["round"])].append(str(r["client"]))
        attempts_of[int(r["round"])].add(str(r.get("secagg_attempt", "")))
    committed = {rnd: next(iter(a)) for rnd, a in attempts_of.items() if len(a) == 1}

    agg_logs = soak.procs.logs.get("aggregator", [])
    agg = _aggregator_log(agg_logs, soak.procs.killed, soak.procs.committed_at_kill)
    _add_texts(agg["rejected"], agg_logs)
    logged = attempts_logged(agg_logs, soak.procs.killed)
    refused = masked_rejections(agg["rejected"])
    not_in_sum: set[tuple[str, int]] = set()
    for c in soak.clients:
        for path in soak.procs.logs.get(c, []):
            for m in _NOT_IN_SUM.finditer(path.read_text(errors="replace")):
                not_in_sum.add((c, int(m.group(1))))
    dead = killed_pids(soak.procs)

    verdicts: Counter[str] = Counter()
    lost: list[str] = []
    recs: dict[tuple[str, int, str], dict[str, Any]] = {}
    messages = sent = 0
    for c in soak.clients:
        for rec in device_records(soak.record_dir(c), c):
            messages += 1
            recs[(c, rec["round"], rec["attempt"])] = rec
            if rec["round"] > completed:
                verdicts["after_the_last_commit"] += 1
                continue
            sent += 1
            v = verdict(rec, committed, row_counts, logged, refused, not_in_sum, dead)
            verdicts[v] += 1
            if v == "lost":
                lost.append(f"{c} round {rec['round']} attempt {rec['attempt']}: masked and "
                            "sent, in no sum, failed attempt or refusal")
    lost += [f"{c} round {rnd}: in the sum {n} times" for (rnd, c), n in row_counts.items()
             if n > 1]
    lost += [f"round {rnd}: client rows of {len(a)} attempts" for rnd, a in attempts_of.items()
             if len(a) != 1]
    forged = [f"{c} round {rnd}" for (rnd, c) in row_counts
              if (c, rnd, committed.get(rnd, "")) not in recs]
    rounds_check = check_globals(agg_out, state, cfg.seed, cfg.agents, committed, clients, recs,
                                 drop)

    unrefused = injected_refused(soak.injected, agg["rejected"])
    rejected_logged = Counter(r["reason"] for r in agg["rejected"])
    rejected_counters = rejected_in_state(counters)
    counters_ok = (rejected_counters == rejected_logged - agg["uncounted"]
                   and counters["accepted"] == len(client_rows))
    leaked = soak.procs.unreaped() + _leftovers(soak.out)
    broker_save_errors = _broker_save_errors(soak.out / "broker")
    checks = {
        "finished": finished and not error,
        "broker_saved_its_database": not broker_save_errors,
        "all_rounds_committed": completed == cfg.rounds,
        "lost_0": not lost,
        "no_update_accepted_that_no_device_sent": not forged,
        "every_injected_message_refused": not unrefused,
        "globals_match_accepted_updates": not rounds_check["mismatched"]
        and rounds_check["checked"] == completed,
        "final_global_is_last_round": rounds_check["final_equals_last_round"],
        "counters_match_logged_rejections": counters_ok,
        "no_process_leaked": not leaked and soak.brokers_started >= 1,
    }
    report = {
        "ok": all(checks.values()),
        "secure_aggregation": True,
        "checks": checks,
        "error": error,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "job": soak.job,
        "wall_s": round(wall, 1),
        "rounds_committed": completed,
        "faults_injected": dict(Counter(f.kind for f in soak.faults if f.outcome == "injected")),
        "faults_not_injected": {f.kind: f.outcome for f in soak.faults
                                if f.outcome != "injected"},
        "schedule": [asdict(f) for f in soak.faults],
        "updates_sent": sent,  # masked vectors recorded for committed rounds
        "update_messages_sent_by_devices": messages,  # masked vectors recorded, all
        "messages_recorded_on_update_topics": len(recorded_msgs),
        "injected_messages": len(soak.injected),
        "broker_save_errors": broker_save_errors,
        "verdicts_of_sent_updates": dict(verdicts),
        "attempts": {"started": len(logged["started"]), "failed": len(logged["failed"]),
                     "started_by_killed_aggregators": len(logged["by_killed"])},
        "accepted": counters["accepted"],
        "rejected_by_reason": dict(rejected_logged),
        "rejected_counted_in_state": dict(rejected_counters),
        "rejected_lost_with_a_killed_aggregator": dict(agg["uncounted"]),
        "lost": lost,
        "accepted_not_sent": forged,
        "injected_not_refused": unrefused,
        "rounds_check": rounds_check,
        "brokers_started": soak.brokers_started,
        "aggregators_started": len(agg_logs),
        "agent_starts": sum(len(soak.procs.logs.get(c, [])) for c in soak.clients),
        "leaked": leaked,
        "rate_limited": _rate_limited(agg_logs),
        "penalties": _rate_limited(agg_logs, _PENALTY),
    }
    report["line"] = figures_line(report).replace("soak ", "secure soak ", 1)
    return report


def _add_texts(rejected: list[dict[str, Any]], paths: list[Path]) -> None:
    """The text of each rejection line (soak_reconcile keeps only its round), in order."""
    from fedclip_edge.benchmarks.soak_reconcile import _REJECTED

    texts = [m.group(4) for p in paths
             for ln in p.read_text(errors="replace").splitlines() if (m := _REJECTED.search(ln))]
    for r, t in zip(rejected, texts, strict=True):
        r["text"] = t
