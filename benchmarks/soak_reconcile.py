"""The soak's reconciliation: what the devices say they sent, what the aggregators accepted or
refused, what the recorder saw on the wire, and what was committed, checked against each other.

Why a module of its own: the run (benchmarks/soak.py) drives processes; this part only reads
their logs and files, and is tested on its own against log lines as the agent and the
aggregator print them.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.benchmarks.soak_globals import (
    check_codec_rounds,
    check_devices,
    downlink_figures,
    saved_states,
    server_globals,
)
from fedclip_edge.broker import protocol as P
from fedclip_edge.wire import FrameRejected, decode_frame, decode_update

# the fault kinds, in the order the report lists them
FAULT_KINDS = (
    "kill_agent", "restart_broker", "kill_aggregator", "garbage", "replay", "foreign_signed",
    "site_claim", "flood", "cross_run",
)
_RATE_LIMITED = re.compile(r"rate limit: dropped (\d+) messages")
_PENALTY = re.compile(r"penalty: \S+ went over its rate limit")
_ROUND_LINE = re.compile(r"\] round (\d+) \| samples .* \| upload (\S+)$")
_RESENT = re.compile(r"\] round (\d+): (aggregator lacks my update|reconnected), sending")
_DROPPED = re.compile(r"\] round (\d+): unsent update dropped")
_REJECTED = re.compile(r"rejected \((\w+)\) on fedclip/[^/]+/(\w+)/([^:\s]*): (.*)$")
_ROUND_IN_TEXT = re.compile(r"(?:update for round|for round) (\d+)")
_COMMIT = re.compile(r"^round (\d+)/\d+ \| clients")


def _update_round(payload: bytes) -> int | None:
    """The round of an update payload, None when it is not one (garbage)."""
    try:
        m = P.decode_message(payload)
    except Exception:  # noqa: BLE001 - whatever a hostile payload raises, it is not an update
        return None
    return m.round if isinstance(m, P.Update) else None


def made_by_chaos(injected: list[dict[str, Any]]) -> set[str]:
    """sha256 of each message the chaos client made. Not replays: a replay is a device's own
    message, byte for byte, so its bytes are that device's."""
    return {i["sha256"] for i in injected if i["kind"] != "replay" and "sha256" in i}


# ---------------------------------------------------------------------------------- reconcile


def _agent_sends(paths: list[Path], killed: set[Path]) -> dict[str, Any]:
    """What one device's logs say it sent: acknowledged (client, round) updates, messages."""
    acked: set[int] = set()
    unacked_killed: set[int] = set()
    logged: set[int] = set()  # every round it trained and published for, acknowledged or not
    messages = 0
    for path in paths:
        queued: set[int] = set()
        for line in path.read_text(errors="replace").splitlines():
            if m := _ROUND_LINE.search(line):
                rnd, upload = int(m.group(1)), m.group(2)
                logged.add(rnd)
                messages += 1
                if upload == "queued":
                    queued.add(rnd)
                else:
                    acked.add(rnd)
            elif m := _RESENT.search(line):
                messages += 1
                # sent before; the resend makes it count as sent (a kill between the first send
                # and its round line leaves only this line, from the restarted agent's outbox)
                acked.add(int(m.group(1)))
                logged.add(int(m.group(1)))
            elif m := _DROPPED.search(line):
                queued.discard(int(m.group(1)))
        if path in killed:
            unacked_killed |= queued - acked
        else:
            acked |= queued  # an outbox not dropped is sent after a reconnect
    return {"acked": acked, "unacked_killed": unacked_killed - acked, "messages": messages,
            "logged": logged}


def _aggregator_log(paths: list[Path], killed: set[Path],
                    committed_at_kill: dict[Path, int] | None = None) -> dict[str, Any]:
    """Every rejection line of every aggregator incarnation, and which were counted in a
    committed state (lines after the last commit of a killed incarnation were not).

    The aggregator writes state.json, then prints the round's line: a kill -9 between the two
    leaves a log whose last round line is older than what was committed. Then every line of
    that log preceded the commit (one thread does both), so all were counted."""
    rejected: list[dict[str, Any]] = []
    uncounted: Counter[str] = Counter()
    for path in paths:
        lines = path.read_text(errors="replace").splitlines()
        commits = [(i, int(m.group(1))) for i, ln in enumerate(lines)
                   if (m := _COMMIT.search(ln))]
        last_commit = max((i for i, _ in commits), default=-1)
        at_kill = (committed_at_kill or {}).get(path)
        if at_kill is not None and at_kill > max((r for _, r in commits), default=0):
            last_commit = len(lines)  # its last round line was never printed
        for i, line in enumerate(lines):
            m = _REJECTED.search(line)
            if not m:
                continue
            reason, kind, client, text = m.groups()
            r = _ROUND_IN_TEXT.search(text)
            rejected.append({"reason": reason, "kind": kind, "client": client,
                             "round": int(r.group(1)) if r else None})
            if path in killed and i > last_commit:
                uncounted[reason] += 1
    return {"rejected": rejected, "uncounted": uncounted}


def _tensors(payload: bytes, base: dict[str, torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor] | None:
    """The full adapter an update stands for; a delta codec's frame needs `base` (the global of
    its round, as the aggregator decodes it)."""
    try:
        up = P.decode_message(payload)
        if not isinstance(up, P.Update):
            return None
        if base is not None:
            return decode_update(up.frame, base).tensors
        return decode_frame(up.frame).tensors
    except (P.MessageRejected, FrameRejected):
        return None


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _check_rounds(agg_out: Path, accepted: dict[int, list[str]],
                  recorded: dict[tuple[str, int], list[dict[str, torch.Tensor]]],
                  completed: int, codec_check: Any = None) -> dict[str, Any]:
    """Each committed global against the float64 uniform mean of the recorded updates of the
    clients metrics.jsonl lists for its round. With a global codec (`codec_check`, see
    soak_globals.check_codec_rounds) the means, as float32 aggregates, are replayed through
    the server's encoder instead."""
    from safetensors.torch import load_file

    bad: list[str] = []
    ambiguous = 0
    checked = 0
    means: dict[int, list[dict[str, torch.Tensor]]] = {}
    for rnd in range(1, completed + 1):
        gfile = agg_out / "rounds" / f"global_r{rnd:04d}.safetensors"
        clients = accepted.get(rnd, [])
        if not gfile.is_file() or not clients:
            bad.append(f"round {rnd}: no global file or no accepted client")
            continue
        options = []
        for c in clients:
            distinct: list[dict[str, torch.Tensor]] = []
            for t in recorded.get((c, rnd), []):
                if not any(_same(t, d) for d in distinct):
                    distinct.append(t)
            if not distinct:
                break
            options.append(distinct)
        if len(options) < len(clients):
            bad.append(f"round {rnd}: an accepted update was not recorded")
            continue
        ambiguous += sum(len(o) > 1 for o in options)
        glob = load_file(str(gfile))
        if codec_check is not None:
            means[rnd] = [
                {k: (sum(u[k].to(torch.float64) for u in combo) / len(combo)).to(torch.float32)
                 for k in glob} for combo in itertools.islice(itertools.product(*options), 256)]
            continue
        ok = False
        for combo in itertools.islice(itertools.product(*options), 256):
            mean = {k: sum(u[k].to(torch.float64) for u in combo) / len(combo) for k in glob}
            if all(torch.allclose(glob[k].to(torch.float64), mean[k], rtol=0, atol=1e-6)
                   for k in glob):
                ok = True
                break
        checked += 1
        if not ok:
            bad.append(f"round {rnd}: the global is not the mean of its accepted updates")
    replay = None
    if codec_check is not None:
        replay = codec_check(means)
        bad += replay["mismatched"]
        checked = replay["replayed"]
    final_ok = False
    if completed:
        from safetensors.torch import load_file as lf

        a = lf(str(agg_out / "global.safetensors"))
        b = lf(str(agg_out / "rounds" / f"global_r{completed:04d}.safetensors"))
        final_ok = _same(a, b)
    return {"checked": checked, "mismatched": bad, "ambiguous_updates": ambiguous,
            "final_equals_last_round": final_ok, "codec_replay": replay}


def _ancestors() -> set[int]:
    """This process and its parents (a shell that started the soak names the folder too)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _leftovers(out: Path) -> list[str]:
    """Processes (any parent) whose command line names the run's folder: agents, aggregators
    and mosquitto (its config lives there). Linux /proc; elsewhere nothing is found."""
    found = []
    needle = str(out).encode()
    mine = _ancestors()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmd and int(d.name) not in mine:
            text = cmd.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{d.name}: {text}")
    return found


def _broker_save_errors(folder: Path) -> list[str]:
    """mosquitto's own "Error saving ..." lines, from every incarnation's log."""
    out = []
    for log in sorted(folder.glob("run*/mosquitto-*.log")):
        with contextlib.suppress(OSError):
            out += [f"{log.parent.name}: {x.strip()}" for x in log.read_text().splitlines()
                    if "Error saving" in x]
    return out


def reconcile(soak: Any, recorded_msgs: list[tuple[float, str, bytes]], finished: bool,
              error: str, wall: float) -> dict[str, Any]:
    """The report: figures, and every check with what failed it. `soak` is the run
    (`benchmarks.soak.Soak`; not imported here, it imports this module)."""
    cfg = soak.cfg
    agg_out = soak.agg_out
    try:
        state = json.loads((agg_out / "state.json").read_text())
    except (OSError, ValueError):
        state = {"completed_round": 0, "counters": {}}
    completed = int(state.get("completed_round", 0))
    counters = Counter({k: int(v) for k, v in state.get("counters", {}).items()})
    rows = []
    with contextlib.suppress(OSError):
        rows = [json.loads(x) for x in (agg_out / "metrics.jsonl").read_text().splitlines() if x]
    client_rows = [(int(r["round"]), str(r["client"])) for r in rows if r.get("kind") == "client"]
    accepted: dict[int, list[str]] = defaultdict(list)
    for rnd, c in client_rows:
        accepted[rnd].append(c)
    row_counts = Counter(client_rows)

    agg = _aggregator_log(soak.procs.logs.get("aggregator", []), soak.procs.killed,
                          soak.procs.committed_at_kill)
    rejected_for: dict[tuple[str, int], list[str]] = defaultdict(list)
    for r in agg["rejected"]:
        if r["kind"] == "update" and r["round"] is not None:
            rejected_for[(r["client"], r["round"])].append(r["reason"])
    logged = Counter(r["reason"] for r in agg["rejected"])

    sent_updates = 0
    sent_messages = 0
    unacked_killed = 0
    verdicts: Counter[str] = Counter()
    lost: list[str] = []
    sent_pairs: set[tuple[str, int]] = set()
    published: set[tuple[str, int]] = set()
    for c in soak.clients:
        s = _agent_sends(soak.procs.logs.get(c, []), soak.procs.killed)
        sent_messages += s["messages"]
        published |= {(c, r) for r in s["logged"]}
        unacked_killed += len(s["unacked_killed"])
        for rnd in sorted(s["acked"]):
            if rnd > completed:
                verdicts["after_the_last_commit"] += 1
                continue
            sent_updates += 1
            sent_pairs.add((c, rnd))
            n = row_counts.get((rnd, c), 0)
            if n == 1:
                verdicts["accepted"] += 1
            elif n > 1:
                lost.append(f"{c} round {rnd}: accepted {n} times")
            elif rejected_for.get((c, rnd)):
                verdicts["rejected_" + rejected_for[(c, rnd)][0]] += 1
            else:
                lost.append(f"{c} round {rnd}: sent, neither accepted nor rejected")
    # the server's committed globals: the bases delta-coded updates decode against, and what
    # every device must have rebuilt (soak_globals.py)
    globals_ = server_globals(agg_out, cfg.seed, int(state.get("dim") or 0), completed)
    recorded: dict[tuple[str, int], list[dict[str, torch.Tensor]]] = defaultdict(list)
    # what the broker carried on a device's topic that the chaos client did not make came from
    # that device (only it holds its key): a kill -9 between the agent's send and its round
    # line leaves no line for an update the aggregator rightly accepted
    carried: set[tuple[str, int]] = set()
    junk = made_by_chaos(soak.injected)
    for _, topic, payload in recorded_msgs:
        if hashlib.sha256(payload).hexdigest() in junk:
            continue  # an injected forgery must not count as the device's update
        r = _update_round(payload)
        if r is None:
            continue
        carried.add((topic.rsplit("/", 1)[-1], r))
        t = _tensors(payload, globals_.get(r - 1) if r else None)
        if t is not None:
            recorded[(topic.rsplit("/", 1)[-1], r)].append(t)
    forged = [f"{c} round {r}" for r, c in row_counts if (c, r) not in published | carried]
    codec_check = None
    if cfg.global_codec != "fp32":
        saved = saved_states(soak.procs.logs.get("aggregator", []), state)

        def codec_check(means: dict[int, list[dict[str, torch.Tensor]]]) -> dict[str, Any]:
            return check_codec_rounds(cfg, soak.job, globals_, means, completed, saved)

    rounds_check = _check_rounds(agg_out, accepted, recorded, completed, codec_check)
    devices = check_devices({c: soak.procs.logs.get(c, []) for c in soak.clients}, globals_,
                            cfg.rounds, completed)

    expected_counted = logged - agg["uncounted"]
    rejected_counters = rejected_in_state(counters)
    counters_ok = (rejected_counters == expected_counted
                   and counters["accepted"] == len(client_rows))
    leaked = soak.procs.unreaped() + _leftovers(soak.out)
    faults = Counter(f.kind for f in soak.faults if f.outcome == "injected")
    skipped = {f.kind: f.outcome for f in soak.faults if f.outcome != "injected"}
    broker_save_errors = _broker_save_errors(soak.out / "broker")
    checks = {
        "finished": finished and not error,
        # a restart tests persistence only if the broker could save (its folder must exist)
        "broker_saved_its_database": not broker_save_errors,
        "all_rounds_committed": completed == cfg.rounds,
        "lost_0": not lost,
        "no_update_accepted_that_no_device_sent": not forged,
        "globals_match_accepted_updates": not rounds_check["mismatched"]
        and rounds_check["checked"] == completed,
        "final_global_is_last_round": rounds_check["final_equals_last_round"],
        # (b): every global a device rebuilt is the aggregator's, bit for bit (sha256)
        "devices_hold_the_servers_globals": devices["lines"] > 0 and not any(
            devices[k] for k in ("mismatched", "no_server_global", "digest_failures",
                                 "sent_without_a_logged_global")),
        "counters_match_logged_rejections": counters_ok,
        "no_process_leaked": not leaked and soak.brokers_started >= 1,
    }
    if cfg.global_codec != "fp32":  # the codec was exercised: devices rebuilt from deltas
        checks["globals_went_down_compressed"] = devices["rebuilt"].get("delta", 0) > 0
        checks["residual_checked_at_every_kill_and_the_end"] = bool(
            rounds_check["codec_replay"]) and rounds_check["codec_replay"][
            "residuals_checked"] >= len({completed, *soak.procs.committed_at_kill.values()})
    report = {
        "ok": all(checks.values()),
        "checks": checks,
        "error": error,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "job": soak.job,
        "wall_s": round(wall, 1),
        "rounds_committed": completed,
        "faults_injected": dict(faults),
        "faults_not_injected": skipped,
        "schedule": [asdict(f) for f in soak.faults],
        "updates_sent": sent_updates,
        "update_messages_sent_by_devices": sent_messages,
        "unacknowledged_when_killed": unacked_killed,
        "messages_recorded_on_update_topics": len(recorded_msgs),
        "injected_messages": len(soak.injected),
        "broker_save_errors": broker_save_errors,
        "verdicts_of_sent_updates": dict(verdicts),
        "accepted": counters["accepted"],
        "rejected_by_reason": dict(logged),
        "rejected_counted_in_state": dict(rejected_counters),
        "rejected_lost_with_a_killed_aggregator": dict(agg["uncounted"]),
        "lost": lost,
        "accepted_not_sent": forged,
        "rounds_check": rounds_check,
        "device_globals": devices,
        "downlink": downlink_figures(rows),
        "brokers_started": soak.brokers_started,
        "aggregators_started": len(soak.procs.logs.get("aggregator", [])),
        "agent_starts": sum(len(soak.procs.logs.get(c, [])) for c in soak.clients),
        "leaked": leaked,
        # the flood's messages over its sender's limit: dropped at the transport, one summary
        # line per interval (not rejections: never decoded, never in state.json's counters)
        "rate_limited": _rate_limited(soak.procs.logs.get("aggregator", [])),
        # a registered flooder unsubscribed at the broker for a while (broker/penalty.py)
        "penalties": _rate_limited(soak.procs.logs.get("aggregator", []), _PENALTY),
    }
    report["line"] = figures_line(report)
    return report


def rejected_in_state(counters: dict[str, int]) -> Counter:
    """The rejections state.json counted, by reason (both soaks compare them with the log)."""
    return Counter({k[len("rejected_"):]: v for k, v in counters.items()
                    if k.startswith("rejected_")})


def _rate_limited(paths: list[Path], pattern: re.Pattern[str] = _RATE_LIMITED) -> int:
    """The messages the rate-limit lines say were dropped (or, given `pattern` without a group,
    how many lines match it)."""
    n = 0
    for path in paths:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        n += sum(int(m.group(1)) if m.groups() else 1 for m in pattern.finditer(text))
    return n


def figures_line(r: dict[str, Any]) -> str:
    """The one line of figures a run ends with."""
    faults = ", ".join(f"{k} {r['faults_injected'].get(k, 0)}" for k in FAULT_KINDS)
    rej = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected_by_reason"].items())) or "none"
    return (
        f"soak {'OK' if r['ok'] else 'FAILED'}: rounds {r['rounds_committed']}/"
        f"{r['config']['rounds']} ({r['config']['agents']} agents, seed {r['config']['seed']}) | "
        f"faults {faults} | updates sent {r['updates_sent']} "
        f"({r['update_messages_sent_by_devices']} messages), accepted {r['accepted']} | "
        f"rejected {rej} | rate-limited {r.get('rate_limited', 0)} | lost {len(r['lost'])} | "
        f"globals {r['rounds_check']['checked']}/{r['rounds_committed']} match | "
        f"{_downlink_text(r)}leaked {len(r['leaked'])} | {r['wall_s']:.0f}s"
    )


def _downlink_text(r: dict[str, Any]) -> str:
    """The devices' globals against the server's, and (with a global codec) what went down."""
    d = r.get("device_globals")
    if not d:
        return ""
    text = (f"device globals {d['matched']}/{d['lines']} match (delta "
            f"{d['rebuilt'].get('delta', 0)}, dense {d['rebuilt'].get('dense', 0)}, derived "
            f"{d['rebuilt'].get('derived', 0)}; dense asked "
            f"{sum(d['dense_asked'].values())}) | ")
    down = r.get("downlink") or {}
    if r["config"].get("global_codec", "fp32") != "fp32" and down:
        text += (f"{r['config']['global_codec']} down: {down['globals_delta']} delta, "
                 f"{down['globals_dense']} dense, {down.get('globals_derived', 0)} derived "
                 "publications | ")
    return text


