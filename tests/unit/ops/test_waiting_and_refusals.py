"""Issue 21, points 2, 4, 9 and 10, in memory: a refused device or site is named with its fix
when the job cannot start, a site says every `wait_log_s` what it waits for, the round line and
`status` spell out each codec's saving, and the small wordings (Ctrl-C before any round, resends
after a resume, "the registered key of 'dev-b'")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import keys

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker import report as M
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.site import SiteAggregator
from fedclip_edge.broker.status import build_status, format_status
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport
from fedclip_edge.errors import FedClipError, TransportError

JOB = "ops"
DIM = 4


def _hello(client: str, signer: str, backend: str = "test") -> bytes:
    st = P.Status(client, "online", {"train": 30}, backend, DIM, hello=True, session="s1")
    return authn.sign(st, keys.key(signer), job=JOB).encode()


def _central(broker: MemoryBroker, out: Path, registered: list[str], **kw) -> Aggregator:
    cfg = AggregatorConfig(job=JOB, rounds=1, out=out, min_clients=1, round_timeout_s=1.0,
                           wait_clients_s=kw.pop("wait_clients_s", 0.5), upload_grace_s=0.0,
                           registry=keys.registry(registered),
                           signing_key=keys.key(keys.AGGREGATOR), **kw)
    lines: list[str] = []
    agg = Aggregator(MemoryTransport(broker, "aggregator"), cfg, log=lines.append)
    agg.lines = lines  # type: ignore[attr-defined]
    return agg


def test_a_device_signing_with_another_key_is_named_not_pass_dim(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.publish("dev-b", P.status_topic(JOB, "dev-b"), _hello("dev-b", signer="dev-a"), True)
    agg = _central(broker, tmp_path / "c", ["dev-a", "dev-b"])
    with pytest.raises(TransportError) as err:
        agg.run()
    msg = str(err.value)
    assert msg.startswith("1 device refused: bad_signature (dev-b): "), msg
    assert "the registered key of 'dev-b'" in msg and "''s" not in msg
    assert "pass --dim" not in msg


def test_with_dim_the_stopped_round_names_the_refused_device(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.publish("dev-b", P.status_topic(JOB, "dev-b"), _hello("dev-b", signer="dev-a"), True)
    agg = _central(broker, tmp_path / "c", ["dev-a", "dev-b"], dim=DIM, on_short="stop")
    with pytest.raises(FedClipError, match=r"stopped at round 1: .*1 device refused: "
                                           r"bad_signature \(dev-b\)"):
        agg.run()


def test_an_unregistered_site_is_told_to_copy_its_key_to_the_central(tmp_path: Path) -> None:
    broker = MemoryBroker()
    broker.publish("site-a", P.status_topic(JOB, "site-a"),
                   _hello("site-a", signer="site-a", backend="site"), True)
    agg = _central(broker, tmp_path / "c", ["dev-a"])
    with pytest.raises(TransportError) as err:
        agg.run()
    msg = str(err.value)
    assert "1 device refused: unknown_key (site-a): site not registered at the central: copy " \
        "its public key (site-a.pub" in msg and "the central's --site-keys" in msg, msg
    logged = "\n".join(agg.lines)  # type: ignore[attr-defined]
    assert "rejected (unknown_key) on fedclip/ops/status/site-a: site not registered" in logged


def test_a_site_says_what_it_waits_for(tmp_path: Path) -> None:
    site_broker, central = MemoryBroker(), MemoryBroker()
    # one of the two devices the site needs says hello
    site_broker.publish("d1", P.status_topic(JOB, "d1"),
                        P.Status("d1", "online", {"train": 5}, "test", DIM, hello=True).encode(),
                        True)
    lines: list[str] = []
    cfg = AggregatorConfig(job=JOB, rounds=1, out=tmp_path / "s", min_clients=2,
                           round_timeout_s=1.0, dim=DIM, wait_clients_s=0.9,
                           upload_grace_s=0.0, insecure_unsigned=True)
    site = SiteAggregator(MemoryTransport(site_broker, "aggregator"),
                          MemoryTransport(central, "site-a"), cfg, site="site-a",
                          log=lines.append, idle_timeout_s=1.5)
    site.wait_log_s = 0.3
    with pytest.raises(FedClipError, match="nothing from the central"):
        site.run()
    text = "\n".join(lines)
    assert "site site-a: waiting for its devices: 1 of 2 online on this site's broker" in text
    assert "site site-a: waiting for the central's global of job ops (nothing for " in text
    assert ("is the central aggregator running this job, and is this site's public key "
            "(site-a.pub) in the central's --site-keys?") in text


def _rows() -> list[dict]:
    base = {"kind": "client", "round": 1, "bytes_down": 2_000_000, "update_latency_s": 0.1}
    return [
        {**base, "client": "a", "update_codec": "topk-int8", "bytes_up": 50_000},
        {**base, "client": "b", "update_codec": "topk-int8", "bytes_up": 50_000},
        {**base, "client": "c", "update_codec": "fp32", "bytes_up": 2_000_100},
    ]


def test_the_round_line_spells_out_each_codecs_saving() -> None:
    row = M.round_record(1, _rows(), active=["a", "b", "c"], wall=1.0, retries=0,
                         heldout=None, counters={})
    line = M.round_line(row, 3)
    # per topk-int8 update 2,000,000 / 50,000 = 40x; the round: (6,000,000 + 2,100,100)
    # / (2 x 6,000,000) = 0.675 of what all-fp32 would have moved
    assert "| codecs topk-int8 x2 40.0x fewer bytes than fp32, fp32 x1; round total 0.68x " \
        "of all-fp32 (the global goes down dense)" in line, line
    assert "\n" not in line
    fp32 = M.round_record(1, _rows()[2:], active=["c"], wall=1.0, retries=0, heldout=None,
                          counters={})
    assert M.round_line(fp32, 3).endswith("| codec fp32 x1")


def test_status_names_each_clients_codec_and_the_saving(tmp_path: Path) -> None:
    rnd = M.round_record(1, _rows(), active=["a", "b", "c"], wall=1.0, retries=0,
                         heldout=None, counters={})
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in [*_rows(), rnd]))
    (tmp_path / "state.json").write_text(json.dumps({
        "job": JOB, "completed_round": 1, "rounds": 3, "counters": {"accepted": 3},
        "devices": {c: {"state": "uploaded", "backend": "onnxruntime", "dim": DIM,
                        "samples": {"train": 30}} for c in "abc"}}))
    st = build_status(None, None, tmp_path)
    assert [d["codec"] for d in st["devices"]] == ["topk-int8", "topk-int8", "fp32"]
    assert st["last_round"]["updates_by_codec"] == {"fp32": 1, "topk-int8": 2}
    text = format_status(st)
    assert "topk-int8 x2 40.0x fewer bytes than fp32" in text and "codec" in text
    table = {ln.split()[0]: ln.split()[-1] for ln in text.splitlines()[-3:]}
    assert table == {"a": "topk-int8", "b": "topk-int8", "c": "fp32"}, text


def test_ctrl_c_before_any_round_keeps_nothing_and_says_so() -> None:
    from fedclip_edge.broker.cli import interrupted_message

    assert "nothing to keep" in interrupted_message(0)
    assert "last completed round" not in interrupted_message(0)
    assert "round 4" in interrupted_message(4) and "--resume" in interrupted_message(4)


def test_after_a_resume_resends_are_said_to_be_expected(tmp_path: Path) -> None:
    lines: list[str] = []
    for resume in (False, True):
        cfg = AggregatorConfig(job=JOB, rounds=1, out=tmp_path / str(resume), dim=DIM,
                               resume=resume, insecure_unsigned=True)
        agg = Aggregator(MemoryTransport(MemoryBroker(), "aggregator"), cfg, log=lines.append)
        agg.resumed = resume  # as _init_state sets it when state.json was loaded
        agg._reject("duplicate", "fedclip/ops/update/a", "second update of a for round 2")
        agg._reject("frame_hash", "fedclip/ops/update/a", "bad hash")
    assert M.RESEND_NOTE not in lines[0] and M.RESEND_NOTE in lines[2]
    assert M.RESEND_NOTE not in lines[3]  # only duplicate/stale are expected resends


def test_wait_lines_use_a_30_second_period_by_default() -> None:
    cfg = AggregatorConfig(job=JOB, rounds=1, out=Path("/nonexistent-ops"), dim=DIM,
                           insecure_unsigned=True)
    site = SiteAggregator(MemoryTransport(MemoryBroker(), "a"), MemoryTransport(MemoryBroker(),
                          "s"), cfg, site="s")
    assert site.wait_log_s == 30.0


def test_off_a_terminal_the_log_is_plain_unwrapped_lines_and_no_round_tables() -> None:
    import io

    from fedclip_edge.broker.cli import make_log

    stream = io.StringIO()
    log, console = make_log(stream)
    line = "round 1/3 | " + " | ".join(f"field{i} {i * 1.5:.2f}" for i in range(40))
    assert len(line) > 300
    log(line)
    assert stream.getvalue() == line + "\n"
    assert console is None  # the aggregator prints per-client tables only with a console

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    log, console = make_log(tty)
    assert console is not None
    log(line)
    assert tty.getvalue().count("\n") == 1  # soft wrap: the terminal folds it, not us
