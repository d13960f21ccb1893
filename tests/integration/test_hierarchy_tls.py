"""The shipped site-bridge template over TLS with passwords, loaded by real mosquittos.

Why: `broker/mosquitto/bridge-site.conf` is what an operator copies; its TLS and credential
lines had never been loaded by a mosquitto. Here a throwaway PKI from `make-dev-pki.sh` backs a
central mosquitto run with the shipped production config (TLS listener, passwords, the shipped
ACL) and three site mosquittos whose bridges are the shipped template rendered
(`render_bridge_template`): one good, one with a wrong password, one trusting another CA.
Messages cross the good bridge both ways on the hierarchy's topics only; the bad ones carry
nothing.
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import time
from pathlib import Path

import pytest
from support import mqtt as mh

from fedclip_edge.broker.bridge import render_bridge_template
from fedclip_edge.broker.mosquitto import free_port, mosquitto_config, run_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]

REPO = Path(__file__).resolve().parents[2]
PKI_SCRIPT = REPO / "broker" / "scripts" / "make-dev-pki.sh"
JOB = "tlsj"
NOTHING_S = 2.5  # how long "a refused bridge carries nothing" waits (its retry period: 1 s)


def _pki(out: Path, *accounts: str) -> dict[str, str]:
    """make-dev-pki.sh into `out` (no signing keys); returns the accounts' passwords."""
    made = subprocess.run(["bash", str(PKI_SCRIPT), "--out", str(out), "--no-keys", *accounts],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    pw = {}
    for env in (out / "credentials").glob("*.env"):
        values = dict(line.split("=", 1) for line in env.read_text().splitlines() if line)
        pw[values["FEDCLIP_MQTT_USERNAME"]] = values["FEDCLIP_MQTT_PASSWORD"]
    return pw


def _central_config(pki: Path, tls_port: int) -> str:
    """The generated production config (TLS only, passwords, ACL) on a free loopback port."""
    text = (pki / "mosquitto.conf").read_text()
    assert text.count("\nlistener 8883\n") == 1, "mosquitto.conf no longer has `listener 8883`"
    return text.replace("\nlistener 8883\n", f"\nlistener {tls_port} 127.0.0.1\n")


def _wait_log(broker, needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in broker.log():
        assert time.monotonic() < deadline, f"no {needle!r} in the log:\n{broker.log()}"
        time.sleep(0.05)


def _drain(inbox: mh.Inbox, seconds: float) -> list[str]:
    """The topics of every message that arrives within `seconds`."""
    topics, deadline = [], time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            topics.append(inbox.get(timeout=left).topic)
        except queue.Empty:
            break
    return topics


def _until(inbox: mh.Inbox, marker: str, timeout: float = 10.0) -> list[str]:
    """The topics of the messages before the first one on `marker` (included)."""
    topics: list[str] = []
    deadline = time.monotonic() + timeout
    while not topics or topics[-1] != marker:
        left = deadline - time.monotonic()
        assert left > 0, f"no message on {marker!r} within {timeout:g} s (got {topics})"
        with contextlib.suppress(queue.Empty):
            topics.append(inbox.get(timeout=left).topic)
    return topics[:-1]


def test_shipped_bridge_template_over_tls_with_passwords(tmp_path: Path) -> None:
    mh.require_mosquitto("mosquitto_passwd", "openssl")
    pki, other = tmp_path / "pki", tmp_path / "other-ca"
    pw = _pki(pki, "siteA", "siteB", "siteC", "dev1")
    _pki(other, "nobody")  # a second CA, which did not sign the central's certificate
    tls_port = free_port()
    central_conf = _central_config(pki, tls_port)
    address = f"127.0.0.1:{tls_port}"

    def site_conf(site: str, password: str, cafile: Path) -> str:
        # the site's own listener: plain loopback, anonymous (not what this test is about)
        return mosquitto_config(0).replace("listener 0 ", "listener {port} ") + \
            render_bridge_template(site=site, address=address, password=password,
                                   cafile=cafile, job=JOB)

    with run_mosquitto(tmp_path / "central", central_conf, port=tls_port) as central, \
         run_mosquitto(tmp_path / "siteA", site_conf("siteA", pw["siteA"], pki / "ca.crt")) as sa, \
         run_mosquitto(tmp_path / "siteB", site_conf("siteB", "wrong-" + pw["siteB"],
                                                      pki / "ca.crt")) as sb, \
         run_mosquitto(tmp_path / "siteC", site_conf("siteC", pw["siteC"],
                                                      other / "ca.crt")) as sc:
        agg_in = mh.Inbox()
        agg = mh.connect_client(tls_port, "aggregator", username="aggregator",
                                password=pw["aggregator"], ca_file=pki / "ca.crt", inbox=agg_in)
        dev = mh.connect_client(tls_port, "dev1", username="dev1", password=pw["dev1"],
                                ca_file=pki / "ca.crt")
        site_in = {s: mh.Inbox() for s in ("siteA", "siteB", "siteC")}
        site_cl = {s: mh.connect_client(b.port, f"probe-{s}", inbox=site_in[s])
                   for s, b in (("siteA", sa), ("siteB", sb), ("siteC", sc))}
        try:
            # the central's side of what sites send (not its own globals echoed back)
            assert mh.subscribe(agg, "fedclip/+/update/+") == [1]
            assert mh.subscribe(agg, "fedclip/+/status/+") == [1]
            for c in site_cl.values():
                assert mh.subscribe(c, "#") == [1]
            # central -> site: the retained global, remapped under fedclip-up
            mh.publish(agg, f"fedclip/{JOB}/global", b"g1", retain=True)
            got = site_in["siteA"].wait_for(f"fedclip-up/{JOB}/global", timeout=15)
            assert got.payload == b"g1"
            # site -> central: the site's own update and status
            for kind in ("update", "status"):
                mh.publish(site_cl["siteA"], f"fedclip-up/{JOB}/{kind}/siteA", kind.encode())
                got = agg_in.wait_for(f"fedclip/{JOB}/{kind}/siteA", timeout=10)
                assert got.payload == kind.encode()
            mh.publish(agg, f"fedclip/{JOB}/control", b"c1")
            assert site_in["siteA"].wait_for(f"fedclip-up/{JOB}/control").payload == b"c1"

            # not bridged: another site's topic, the site's devices' own topics, another job
            # (site -> central); a device's status, another job (central -> site)
            for topic in (f"fedclip-up/{JOB}/update/siteB", f"fedclip/{JOB}/update/d7",
                          f"fedclip/{JOB}/status/d7", "fedclip-up/otherjob/update/siteA"):
                mh.publish(site_cl["siteA"], topic, b"local")
            mh.publish(dev, f"fedclip/{JOB}/status/dev1", b"dev-status")
            mh.publish(agg, "fedclip/otherjob/global", b"other-job")
            # markers sent after them on the same connections: a bridge forwards in order, so
            # whatever was to cross arrived before its marker
            mh.publish(site_cl["siteA"], f"fedclip-up/{JOB}/status/siteA", b"marker")
            mh.publish(agg, f"fedclip/{JOB}/control", b"marker")
            at_central = _until(agg_in, f"fedclip/{JOB}/status/siteA")
            assert at_central == [f"fedclip/{JOB}/status/dev1"], at_central  # on the central
            at_a = _until(site_in["siteA"], f"fedclip-up/{JOB}/control")
            assert sorted(at_a) == sorted([
                f"fedclip-up/{JOB}/update/siteB", f"fedclip/{JOB}/update/d7",
                f"fedclip/{JOB}/status/d7", "fedclip-up/otherjob/update/siteA",
                f"fedclip-up/{JOB}/status/siteA"]), at_a  # its own publishes, nothing from up

            # the bad bridges were refused (wrong password; the central's certificate is not
            # signed by the CA that bridge trusts) and carry nothing either way
            _wait_log(central, "disconnected, not authorised")
            _wait_log(central, "unknown ca")
            for s in ("siteB", "siteC"):
                mh.publish(site_cl[s], f"fedclip-up/{JOB}/update/{s}", b"bad-bridge")
                mh.publish(site_cl[s], f"fedclip-up/{JOB}/status/{s}", b"bad-bridge")
            mh.publish(agg, f"fedclip/{JOB}/global", b"g2", retain=True)
            assert _drain(agg_in, NOTHING_S) == []
            for s in ("siteB", "siteC"):
                got = _drain(site_in[s], 0.1)
                assert got == [f"fedclip-up/{JOB}/update/{s}", f"fedclip-up/{JOB}/status/{s}"], \
                    (s, got)  # its own publishes only, no global
            # the global stays retained on the site broker (try_private): a late site
            # aggregator gets the current round at once
            late_in = mh.Inbox()
            late = mh.connect_client(sa.port, "late-site-aggregator", inbox=late_in)
            site_cl["late"] = late
            mh.subscribe(late, f"fedclip-up/{JOB}/global")
            got = late_in.wait_for(f"fedclip-up/{JOB}/global")
            assert got.retain and got.payload == b"g2"
        finally:
            for c in (agg, dev, *site_cl.values()):
                mh.disconnect_client(c)
        assert "New bridge connected from 127.0.0.1" in central.log()
        assert "as siteA" in central.log() and "as siteB" not in central.log()
