"""`status` with keys shows only signed retained state (issue 22, item 7).

The red team retained unsigned messages on a signed federation's broker and `status --json`
reported `state: done`, a ghost device online and a real device offline with a forged backend.
Here the same forgeries over a signed round 2 of 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import keys
from support.fleet import JOB

from fedclip_edge.broker import authn
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.status import Signers, build_status, format_status, status_from_messages
from fedclip_edge.cli import main
from fedclip_edge.signing import KeyRegistry
from fedclip_edge.wire import encode_frame

AGG = keys.key(keys.AGGREGATOR)


def _signed_state() -> dict[str, bytes]:
    """Round 2 of 3 in progress; a and b online (signed), a answered round 2."""
    msgs = {}
    for client, backend, rnd in (("a", "tensorrt", 2), ("b", "onnxruntime", 1)):
        st = P.Status(client, "uploaded", {"train": 6}, backend, 8, round=rnd, session="s1")
        msgs[P.status_topic(JOB, client)] = authn.sign(st, keys.key(client), job=JOB).encode()
    frame = encode_frame({"w": torch.zeros(4)}, job=JOB, round=2, client=P.AGGREGATOR_ID)
    msgs[P.global_topic(JOB)] = authn.sign(
        P.GlobalModel(JOB, 2, frame, rounds=3, session="agg"), AGG).encode()
    msgs[P.control_topic(JOB)] = authn.sign(
        P.Control(JOB, "running", 1, 3, session="agg"), AGG).encode()
    return msgs


def _forged(msgs: dict[str, bytes]) -> dict[str, bytes]:
    out = dict(msgs)
    out[P.control_topic(JOB)] = P.Control(JOB, "done", 3, 3).encode()
    out[P.status_topic(JOB, "ghost")] = P.Status("ghost", "online", {}, "cuda", 8).encode()
    out[P.status_topic(JOB, "a")] = P.Status("a", "offline", {}, "forged-backend", 8).encode()
    # signed, but by another device's key
    other = P.Status("b", "offline", {}, "x", 8, session="s9")
    out[P.status_topic(JOB, "b")] = authn.sign(other, keys.key("a"), job=JOB).encode()
    return out


def _signers() -> Signers:
    return Signers(keys.registry(["a", "b"]),
                   KeyRegistry({P.AGGREGATOR_ID: keys.aggregator_public()}))


def test_forged_retained_state_is_what_status_showed_without_keys() -> None:
    st = status_from_messages(JOB, _forged(_signed_state()))
    assert st["state"] == "done" and st["verified"] is False
    assert {d["client"] for d in st["devices"] if d["online"]} == {"ghost"}
    text = format_status(build_status(JOB, _forged(_signed_state()), broker="mqtt://x"))
    assert "signatures NOT verified" in text  # ... and now it says so


def test_with_keys_only_signed_state_is_shown() -> None:
    honest = status_from_messages(JOB, _signed_state(), _signers())
    assert honest["state"] == "running" and honest["unverified_topics"] == {}
    assert honest["devices_online"] == 2 and honest["current_round"] == 2

    st = status_from_messages(JOB, _forged(_signed_state()), _signers())
    assert st["verified"] is True
    assert st["state"] is None  # the forged "done" is not the job's state
    assert st["current_round"] == 2 and st["rounds"] == 3  # the signed global still is
    assert [d["client"] for d in st["devices"]] == []  # no ghost; a and b's topics are forged
    assert st["unverified_topics"] == {
        P.control_topic(JOB): "unsigned",
        P.status_topic(JOB, "ghost"): "unsigned",
        P.status_topic(JOB, "a"): "unsigned",
        P.status_topic(JOB, "b"): "bad_signature",
    }
    text = format_status(build_status(JOB, _forged(_signed_state()), broker="mqtt://x",
                                      signers=_signers()))
    assert "signatures verified: only signed retained state is shown; ignored 4" in text
    assert "forged-backend" not in text and "ghost (unsigned)" not in text.split("ignored")[0]


def test_status_needs_both_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kdir = keys.key_files(tmp_path / "keys", ["a"])
    rc = main(["status", "--broker", "mqtt://127.0.0.1:1", "--job", JOB,
               "--device-keys", str(kdir / "devices")])
    err = capsys.readouterr().err
    assert rc != 0 and err.strip() == (
        "error: give --device-keys and --aggregator-key together (who signs what)")
