"""Issue 21, point 1: the shipped systemd units start. Each unit's ExecStart, parsed from the
unit with its environment filled from its `.env.example` (values pointed at fixtures made by
make-dev-pki.sh and `keys new`), runs against a real TLS mosquitto (the production config):
the aggregator connects, the agent connects, signs its hello, and the aggregator admits it."""

from __future__ import annotations

import shutil

import pytest
import yaml
from support import mqtt as mh
from support import tiny_artifact
from support.pki import ROOT, credentials, make_pki, script_env, tls_mosquitto
from support.units import Proc, env_example, exec_start, unit_environment

from fedclip_edge.exporters.signature import sign_exported_artifact

pytestmark = [pytest.mark.integration, pytest.mark.mosquitto]


def _fill(example: dict[str, str], values: dict[str, str]) -> dict[str, str]:
    """The example's variables with fixture values; a fixture value the example lacks means the
    example does not document a variable the unit needs (fails)."""
    assert set(values) <= set(example), f"not in the .env.example: {set(values) - set(example)}"
    return {**example, **values}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("units")
    agent_env = env_example("agent")
    device = agent_env["FEDCLIP_CLIENT_ID"]
    pki = make_pki(base / "pki", device, port=mh.free_port())
    data, artifact = tiny_artifact.shared_artifact(tmp_path_factory)
    signed = base / "artifact"
    shutil.copytree(artifact, signed)
    sign_exported_artifact(signed, pki / "keys" / "exporter.key")  # export --sign-key
    with tls_mosquitto(pki, base / "broker") as b:
        yield {"base": base, "pki": pki, "broker": b, "data": data, "artifact": signed,
               "device": device}


def test_the_units_start_and_connect(fleet) -> None:
    b, pki, base = fleet["broker"], fleet["pki"], fleet["base"]
    keys = pki / "keys"
    common = {"FEDCLIP_BROKER": b.url, "FEDCLIP_MQTT_CA_FILE": str(b.ca)}
    agg_env = _fill(env_example("aggregator"), {
        **common, **credentials(pki, "aggregator"),
        "FEDCLIP_DEVICE_KEYS": str(keys / "devices"),
        "FEDCLIP_SIGNING_KEY": str(keys / "aggregator.key"),
    })
    dev = fleet["device"]
    agent_env = _fill(env_example("agent"), {
        **common, **credentials(pki, dev),  # deploy.md: append credentials/<device>.env
        "FEDCLIP_DATA": str(fleet["data"]), "FEDCLIP_ARTIFACTS": str(fleet["artifact"]),
        "FEDCLIP_KEY": str(keys / f"{dev}.key"),
        "FEDCLIP_AGGREGATOR_KEY": str(keys / "aggregator.pub"),
        "FEDCLIP_ARTIFACT_KEY": str(keys / "exporter.pub"),
    })
    procs = []
    try:
        for unit, env in (("fedclip-edge-aggregator.service", agg_env),
                          ("fedclip-edge-agent.service", agent_env)):
            state = base / unit.split(".")[0]
            unit_env = {k: v.replace("/var/lib/fedclip-edge", str(state))
                        for k, v in unit_environment(unit).items()}
            full = {**script_env(), **unit_env, **env}
            procs.append(Proc(exec_start(unit, env, state), full))
        agg, agent = procs
        agg.wait_for("connected to the broker; job", 180)
        agg.wait_for(f"device {dev} online", 240)  # the agent's signed hello, admitted
    finally:
        codes = [p.stop() for p in procs]
    assert codes[0] in (0, 130), "\n".join(procs[0].lines)  # SuccessExitStatus=130
    assert codes[1] == 0, "\n".join(procs[1].lines)
    assert not any("rejected" in ln for ln in procs[0].lines), "\n".join(procs[0].lines)


def test_compose_and_the_jetson_example_carry_the_keys() -> None:
    services = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    agg = " ".join(services["aggregator"]["command"])
    assert "--device-keys=" in agg and "--signing-key=" in agg
    for name in (n for n in services if n.startswith("agent-")):
        cmd = " ".join(services[name]["command"])
        for flag in ("--key=", "--aggregator-key=", "--artifact-key="):
            assert flag in cmd, f"{name} lacks {flag}"
        assert f"keys/{name}.key" in cmd
    prepare = " ".join(services["prepare"]["command"])
    assert "keys new" in prepare and "--sign-key" in prepare
    docker = (ROOT / "deploy" / "agent-jetson.Dockerfile").read_text()
    example = docker[docker.index("# Run ("):docker.index("ARG BASE_IMAGE")]
    for flag in ("--key ", "--aggregator-key ", "--artifact-key "):
        assert flag in example, f"the Jetson example lacks {flag}"
