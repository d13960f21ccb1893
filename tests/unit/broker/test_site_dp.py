"""Central DP at a site (aggregate --upstream ... --site S --dp-...), through the in-memory broker:
a central over one DP site (3 devices) and one plain site (2 devices). The DP site's update
upstream is, worked out here, its devices' clipped deltas summed, noised (a seeded generator)
and divided by the expected count; its epsilon is dp-accounting's for its own population and
rounds, in its round lines, summary.json and status; the plain site's update is its plain mean.
What stays refused: user-level DP at an aggregator over sites, in one line."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.broker import protocol as P
from fedclip_edge.broker.aggregator import Aggregator, AggregatorConfig
from fedclip_edge.broker.site import SiteAggregator
from fedclip_edge.broker.status import status_from_run_folder
from fedclip_edge.broker.transport import MemoryBroker, MemoryTransport, Received
from fedclip_edge.errors import ConfigError
from fedclip_edge.privacy import accountant as A
from fedclip_edge.privacy.central import CentralDP, CentralDPConfig, aggregator_dp
from fedclip_edge.wire import decode_frame, encode_frame

JOB, DIM = "sitedp", 2
Z, CLIP, POPULATION, DELTA, SEED = 1.0, 0.5, 30, 1e-3, 5
DP_SITE = {"a1": 1.0, "a2": 2.0, "a3": 4.0}  # a device's adapter: this value everywhere
PLAIN_SITE = {"b1": 8.0, "b2": 16.0}


def const_state(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full(v.shape, value) for k, v in AttentionAdapter(DIM).state_dict().items()}


class Device(threading.Thread):
    """Answers round 1's global with const_state(value); ends on `done`."""

    def __init__(self, broker: MemoryBroker, client: str, value: float) -> None:
        super().__init__(daemon=True)
        self.client, self.value = client, value
        self.t = MemoryTransport(broker, client,
                                 will=(P.status_topic(JOB, client), P.offline_status(client), True))
        self.t.subscribe(P.global_topic(JOB), P.control_topic(JOB))
        self.t.connect()
        st = P.Status(client, "online", {"train": 10}, "test", DIM, hello=True)
        self.t.publish(P.status_topic(JOB, client), st.encode(), retain=True)

    def run(self) -> None:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            msg = self.t.recv(0.05)
            if msg is None:
                continue
            m = P.decode_message(msg.payload)
            if isinstance(m, P.Control) and m.state == "done":
                return
            if isinstance(m, P.GlobalModel) and m.round == 1 <= m.rounds:
                frame = encode_frame(const_state(self.value), job=JOB, round=1,
                                     client=self.client)
                up = P.Update(JOB, 1, self.client, 10, {"loss": self.value}, frame)
                self.t.publish(P.update_topic(JOB, self.client), up.encode())


def cfg(out: Path, min_clients: int, rounds: int = 1) -> AggregatorConfig:
    return AggregatorConfig(job=JOB, rounds=rounds, out=out, min_clients=min_clients,
                            round_timeout_s=10.0, dim=DIM, wait_clients_s=5.0,
                            upload_grace_s=0.0, insecure_unsigned=True)


def dp_plugin(site: str | None = "dpsite") -> CentralDP:
    return CentralDP(CentralDPConfig(noise_multiplier=Z, clip=CLIP, population=POPULATION,
                                     per_round=len(DP_SITE), delta=DELTA),
                     generator=torch.Generator().manual_seed(SEED), site=site)


def test_dp_site_forwards_its_clipped_noised_mean_accounted_for_its_own_devices(
        tmp_path: Path) -> None:
    central_broker = MemoryBroker()
    spy = MemoryTransport(central_broker, "spy")  # what travels on the central's broker
    spy.subscribe(P.global_topic(JOB), P.update_topic(JOB, "dpsite"), P.update_topic(JOB, "plain"))
    spy.connect()
    lines: list[str] = []
    central = Aggregator(MemoryTransport(central_broker, "aggregator"),
                         cfg(tmp_path / "central", 2, rounds=1), log=lines.append)
    dp = dp_plugin()
    sites, devices = [], []
    for name, devs, plugins in (("dpsite", DP_SITE, (dp,)), ("plain", PLAIN_SITE, ())):
        b = MemoryBroker()
        devices += [Device(b, c, v) for c, v in devs.items()]
        will = (P.status_topic(JOB, name), P.offline_status(name), True)
        sites.append(SiteAggregator(
            MemoryTransport(b, "aggregator"), MemoryTransport(central_broker, name, will=will),
            cfg(tmp_path / name, len(devs)), site=name,
            log=lambda line, n=name: lines.append(f"{n}: {line}"), plugins=plugins))
    errors: list[BaseException] = []

    def run_site(s: SiteAggregator) -> None:
        try:
            s.run()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run_site, args=(s,), daemon=True) for s in sites]
    for th in [*devices, *threads]:
        th.start()
    final = central.run()
    for th in [*threads, *devices]:
        th.join(30)
    assert not errors, (errors, lines)

    glob: dict[str, torch.Tensor] | None = None
    forwarded: dict[str, Any] = {}
    while (msg := spy.recv(0.05)) is not None:
        m = P.decode_message(msg.payload)
        if isinstance(m, P.GlobalModel) and m.round == 1:
            glob = decode_frame(m.frame).tensors
        elif isinstance(m, P.Update):
            forwarded[m.client] = m
    assert glob is not None and set(forwarded) == {"dpsite", "plain"}

    # by hand: each delta clipped to CLIP over the whole adapter, summed in float64, noise
    # N(0, (Z * CLIP)^2) drawn in sorted key order from the seeded generator, over 3 expected
    total = {k: torch.zeros(t.shape, dtype=torch.float64) for k, t in glob.items()}
    for v in DP_SITE.values():
        delta = {k: const_state(v)[k].double() - glob[k].double() for k in glob}
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in delta.values()))
        assert norm > CLIP  # every device is clipped: the test can tell
        for k in glob:
            total[k] += delta[k] * (CLIP / norm)
    gen = torch.Generator().manual_seed(SEED)
    want = {}
    for k in sorted(total):
        noise = torch.randn(total[k].shape, generator=gen, dtype=torch.float64)
        want[k] = glob[k].double() + (total[k] + Z * CLIP * noise) / len(DP_SITE)
    got = decode_frame(forwarded["dpsite"].frame).tensors
    for k in glob:
        assert torch.allclose(got[k].double(), want[k], atol=1e-5, rtol=0), k
    # the release's weight is the expected count, not who answered; no samples, no loss
    m = forwarded["dpsite"].metrics
    assert (m["site_weight"], m["site_devices"], forwarded["dpsite"].samples) == (3.0, 3, 0)
    assert "loss" not in m

    # the plain site: its devices' plain mean, its own count, samples and loss
    plain = decode_frame(forwarded["plain"].frame).tensors
    mean = sum(PLAIN_SITE.values()) / len(PLAIN_SITE)
    assert all(torch.allclose(t, torch.full(t.shape, mean)) for t in plain.values())
    pm = forwarded["plain"].metrics
    assert (pm["site_devices"], forwarded["plain"].samples, pm["loss"]) == (2, 20, mean)
    assert not (tmp_path / "plain" / "summary.json").is_file() or \
        "privacy" not in json.loads((tmp_path / "plain" / "summary.json").read_text())
    # the central: FedAvg over sites, as without DP (weights 3 and 2)
    for k, t in final.items():
        assert torch.allclose(t.double(), (3 * got[k].double() + 2 * plain[k].double()) / 5,
                              atol=1e-5, rtol=0), k

    # epsilon: dp-accounting's, for the DP site's population and its one round
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(list(A.DEFAULT_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(len(DP_SITE) / POPULATION,
                                                    dp_accounting.GaussianDpEvent(Z)))
    eps = acc.get_epsilon(DELTA)
    assert dp.epsilon == pytest.approx(eps, rel=1e-6) and dp.rounds == 1
    round_lines = [ln for ln in lines if ln.startswith("dpsite: round ") and "| DP eps" in ln]
    assert len(round_lines) == 1 and f"DP eps {eps:.3g} at delta 0.001 (z 1, C 0.5, q 0.1)" \
        in round_lines[0]
    assert not any("DP eps" in ln for ln in lines if not ln.startswith("dpsite: "))
    block = json.loads((tmp_path / "dpsite" / "summary.json").read_text())["privacy"]
    assert block["epsilon"] == pytest.approx(eps) and "at site dpsite" in block["mechanism"]
    assert (block["population"], block["expected_per_round"], block["rounds"]) == (30, 3, 1)
    assert status_from_run_folder(tmp_path / "dpsite")["privacy"]["epsilon"] == \
        pytest.approx(eps)
    assert status_from_run_folder(tmp_path / "plain")["privacy"] is None
    spy.close()


def test_user_level_dp_over_sites_stays_refused_in_one_line(tmp_path: Path) -> None:
    # aggregate --site-keys ... --dp-* (a central, or a regional site, over sites)
    config = CentralDPConfig(noise_multiplier=Z, clip=CLIP)
    with pytest.raises(ConfigError, match="central DP over sites is refused") as err:
        aggregator_dp(config, rounds=2, min_clients=2, sites=True, resume=False)
    assert "\n" not in str(err.value) and "site-level" in str(err.value)
    # an unsigned DP job (no --site-keys) refuses a site's hello: it would clip the site's
    # aggregate as if it were one device
    broker = MemoryBroker()
    agg = Aggregator(MemoryTransport(broker, "aggregator"), cfg(tmp_path, 1),
                     plugins=(dp_plugin(site=None),))
    hello = P.Status("s1", "online", {"train": 0}, "site", DIM, hello=True)
    with pytest.raises(P.MessageRejected, match="s1 is a site: central DP over sites") as rej:
        agg._on_status("s1", Received(P.status_topic(JOB, "s1"), hello.encode()))
    assert rej.value.reason == "site_claim"
    # a device's hello is taken
    dev = P.Status("d1", "online", {"train": 3}, "test", DIM, hello=True)
    agg._on_status("d1", Received(P.status_topic(JOB, "d1"), dev.encode()))
    agg.t.close()
    # a DP site under a central that weighs by samples: refused in one line (a weight by sample
    # count changes a device's sensitivity); under uniform it takes the central's settings
    site = SiteAggregator(MemoryTransport(MemoryBroker(), "aggregator"),
                          MemoryTransport(broker, "s2"), cfg(tmp_path / "s2", 1), site="s2",
                          plugins=(dp_plugin("s2"),))
    with pytest.raises(ConfigError, match="s2: central DP at this site weighs every device "
                                          "equally; the central's job weighs by samples"):
        site._adopt(P.GlobalModel(JOB, 1, b"", rounds=3, weighting="samples"))
    assert site._adopt(P.GlobalModel(JOB, 1, b"", rounds=3, weighting="uniform"))
    assert site.cfg.rounds == 3


def test_command_line_refuses_dp_over_sites_and_with_secure_aggregation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedclip_edge.cli import main

    (tmp_path / "sites").mkdir()
    base = ["aggregate", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--insecure-unsigned",
            "--out", str(tmp_path / "a"), "--dp-noise-multiplier", "1"]
    cases = [
        (["--rounds", "3", "--site-keys", str(tmp_path / "sites")],
         "central DP over sites is refused"),
        (["--upstream", "mqtt://127.0.0.1:1", "--site", "s1", "--secure-aggregation"],
         "which --secure-aggregation hides"),
    ]
    for extra, says in cases:
        assert main([*base, *extra]) == 6, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err
    assert not (tmp_path / "a").exists()  # refused before anything was written
