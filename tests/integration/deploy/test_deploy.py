"""deploy/: the container recipes, the compose trial and the systemd units are checked against
the tools that would run them (systemd-analyze, hadolint, a container engine where one runs)
and against the real `fedclip-edge` commands, so a renamed flag breaks a test, not a fleet."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.cli import check_invocation as _check_invocation

from fedclip_edge.data.synth import DOMAINS

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
COMPOSE = DEPLOY / "compose.yaml"
INSTALLED_BIN = "/opt/fedclip-edge/venv/bin/fedclip-edge"
# CI sets this so the checks that need a tool cannot pass by skipping.
REQUIRE_ENV = "FEDCLIP_REQUIRE_DEPLOY_TOOLS"


def _tool(name: str) -> str:
    """Path of `name` (also next to this Python: pip-installed linters); skip without it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        msg = f"{name} is not installed"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg}; {REQUIRE_ENV}=1 requires it", pytrace=False)
        pytest.skip(msg)
    return found


# ----------------------------------------------------------------------------- systemd


def _exec_start(unit: Path) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def _unit_keys(unit: Path) -> dict[str, dict[str, str]]:
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for ln in unit.read_text().replace("\\\n", " ").splitlines():
        if ln.startswith("["):
            current = ln.strip("[]")
            sections[current] = {}
        elif "=" in ln and not ln.startswith("#"):
            k, v = ln.split("=", 1)
            sections[current][k] = v
    return sections


def test_units_exist() -> None:
    assert [u.name for u in UNITS] == ["fedclip-edge-agent.service",
                                        "fedclip-edge-aggregator.service",
                                        "fedclip-edge-serve.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    """The unit as shipped, with only the install prefix pointed at this checkout's command
    (verify refuses a missing executable). Any warning fails: verify exits 0 on unknown keys."""
    tool = _tool("systemd-analyze")
    here = shutil.which("fedclip-edge", path=str(Path(sys.executable).parent))
    assert here, "fedclip-edge is not installed in this environment"
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(INSTALLED_BIN, here))
    res = subprocess.run([tool, "verify", "--man=no", str(copy)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and not res.stderr.strip() and not res.stdout.strip(), (
        res.stdout + res.stderr
    )


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_runs_a_real_command_with_real_flags(unit: Path) -> None:
    argv = _exec_start(unit)
    assert argv[0] == INSTALLED_BIN
    _check_invocation([a for a in argv[1:] if not a.startswith("$")], unit.name)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_restarts_on_failure_stops_gently_and_logs_to_the_journal(unit: Path) -> None:
    s = _unit_keys(unit)
    svc = s["Service"]
    assert svc["Restart"] == "on-failure"
    assert svc["KillSignal"] == "SIGTERM"
    assert int(svc["TimeoutStopSec"]) >= 30  # time to finish a step and say offline
    assert svc["StandardOutput"] == svc["StandardError"] == "journal"
    assert svc["EnvironmentFile"].startswith("/etc/fedclip-edge/")
    assert svc["User"] != "root"
    assert "--password" not in " ".join(_exec_start(unit)), "secrets belong in the env file"
    assert "StartLimitBurst" in s["Unit"]


def test_env_examples_define_every_variable_the_units_use() -> None:
    for unit in UNITS:
        used = set(re.findall(r"\$\{?([A-Z_]+)\}?", " ".join(_exec_start(unit))))
        example = DEPLOY / "systemd" / (unit.name.split("-")[-1].replace(".service", "")
                                        + ".env.example")
        defined = {ln.split("=", 1)[0] for ln in example.read_text().splitlines()
                   if ln and not ln.startswith("#")}
        assert used <= defined, f"{example.name} lacks {sorted(used - defined)}"
        if "--broker" in _exec_start(unit):
            assert "FEDCLIP_MQTT_PASSWORD" in defined  # read by --password's envvar


def test_serve_unit_reads_the_store_the_agent_writes_and_starts_after_it() -> None:
    serve = DEPLOY / "systemd" / "fedclip-edge-serve.service"
    argv = _exec_start(serve)
    assert argv[1] == "serve" and argv[argv.index("--model") + 1] == "${FEDCLIP_MODELS}"
    assert "fedclip-edge-agent.service" in _unit_keys(serve)["Unit"]["After"]
    env = dict(ln.split("=", 1) for ln in
               (DEPLOY / "systemd" / "serve.env.example").read_text().splitlines()
               if ln and not ln.startswith("#"))
    # the example's store is the one the agent's example keeps (--models), and flags are real
    agent_env = dict(ln.split("=", 1) for ln in
                     (DEPLOY / "systemd" / "agent.env.example").read_text().splitlines()
                     if ln and not ln.startswith("#"))
    agent_args = agent_env["FEDCLIP_AGENT_ARGS"].split()
    assert agent_args[agent_args.index("--models") + 1] == env["FEDCLIP_MODELS"]
    _check_invocation(["agent", *agent_args], "agent.env.example")
    _check_invocation(["serve", *env["FEDCLIP_SERVE_ARGS"].split()], "serve.env.example")


# ----------------------------------------------------------------------------- containers


def test_dockerfiles_exist() -> None:
    assert [d.name for d in DOCKERFILES] == ["agent-jetson.Dockerfile", "server.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    tool = _tool("hadolint")
    res = subprocess.run([tool, "--no-color", str(dockerfile)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_files_that_exist_and_runs_as_non_root(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src}: no such path"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = re.search(r"^ENTRYPOINT (\[.*\])", text, re.M)
    assert entry and yaml.safe_load(entry.group(1)) == ["fedclip-edge"]


def test_jetson_recipe_does_not_reinstall_what_the_base_provides() -> None:
    text = (DEPLOY / "agent-jetson.Dockerfile").read_text()
    installs = " ".join(ln for ln in text.replace("\\\n", " ").splitlines()
                        if "pip install" in ln and not ln.lstrip().startswith("#"))
    for pkg in ("torch", "tensorrt", "numpy", "onnxruntime=="):
        assert not re.search(rf"(?<![-\w]){re.escape(pkg)}(?![-\w])", installs), pkg
    assert "onnxruntime-gpu==" in installs and "--no-deps ." in installs
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=\S+:r36\.", text, re.M), "a JetPack 6 (L4T r36) base"


def test_agent_requirements_leave_out_the_heavy_and_the_provided_packages() -> None:
    names = set()
    for line in (DEPLOY / "requirements-agent.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements-agent.txt: {line} is not pinned"
            names.add(name.lower())
    heavy = {"torch", "torchvision", "open-clip-torch", "open_clip_torch", "matplotlib", "numpy",
             "onnxruntime", "onnxruntime-gpu", "tensorrt", "onnx"}
    assert not names & heavy
    assert {"safetensors", "paho-mqtt", "typer", "click", "pillow"} <= names


def test_server_image_builds_where_a_container_engine_runs() -> None:
    engine = shutil.which("docker") or shutil.which("podman")
    if engine is None:
        pytest.skip("no container engine (docker or podman) installed")
    info = subprocess.run([engine, "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"{engine} is installed but no engine runs: "
                    f"{(info.stderr or info.stdout).strip().splitlines()[-1]}")
    res = subprocess.run(
        [engine, "build", "-f", str(DEPLOY / "server.Dockerfile"), "-t",
         "fedclip-edge-server:test", str(ROOT)],
        capture_output=True, text=True, timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = subprocess.run([engine, "run", "--rm", "fedclip-edge-server:test", "agent", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "--artifacts" in run.stdout, run.stderr


# ----------------------------------------------------------------------------- compose


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


PKI_VAR = "${FEDCLIP_PKI:-../broker-dev}"


def _host_path(spec: str, pki: Path) -> Path:
    """A bind-mount source or env_file as compose resolves it (relative to deploy/)."""
    return (DEPLOY / spec.replace(PKI_VAR, str(pki))).resolve()


def _mounts(svc: dict, pki: Path) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    out = {}
    for v in svc.get("volumes", []):
        src, target = v.replace(PKI_VAR, str(pki)).split(":")[:2]
        if src.startswith((".", "/")):
            out[target] = _host_path(src, pki)
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The development PKI exactly as the compose file's header says to make it."""
    for t in ("openssl", "mosquitto_passwd"):
        _tool(t)
    agents = [n for n in _compose()["services"] if n.startswith("agent-")]
    out = tmp_path_factory.mktemp("pki") / "broker-dev"
    res = subprocess.run(
        ["bash", str(ROOT / "broker/scripts/make-dev-pki.sh"), "--out", str(out), "--host",
         "mosquitto", *agents], capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return out


def test_compose_services_and_volumes() -> None:
    c = _compose()
    services = c["services"]
    assert {"mosquitto", "prepare", "aggregator"} <= set(services)
    agents = sorted(n for n in services if n.startswith("agent-"))
    assert len(agents) >= 2
    declared = set(c.get("volumes") or {})
    for name, svc in services.items():
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if not src.startswith((".", "/", "$")):  # a named volume
                assert src in declared, f"{name}: named volume {src} is not declared"
    for name in ("prepare", "aggregator", *agents):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for a in agents:
        assert services[a]["depends_on"]["prepare"]["condition"] == (
            "service_completed_successfully")


def test_compose_mounts_the_production_mosquitto_config(pki: Path) -> None:
    svc = _compose()["services"]["mosquitto"]
    mounts = _mounts(svc, pki)
    conf_path = mounts["/mosquitto/config/mosquitto.conf"]
    assert conf_path == (ROOT / "broker/mosquitto/mosquitto.conf").resolve()
    conf = conf_path.read_text()
    # Every file the configuration names is inside a mounted folder that holds it.
    for key in ("password_file", "acl_file", "cafile", "certfile", "keyfile"):
        path = re.search(rf"^{key} (\S+)", conf, re.M).group(1)
        folder, name = path.rsplit("/", 1)
        assert folder in mounts, f"{key} {path}: {folder} is not mounted"
        assert (mounts[folder] / name).is_file(), f"{key}: {mounts[folder] / name} missing"
    persistence = re.search(r"^persistence_location (\S+)", conf, re.M).group(1).rstrip("/")
    assert persistence in mounts and mounts[persistence].is_dir()
    port = re.search(r"^listener (\d+)", conf, re.M).group(1)
    assert any(p.split(":")[-1] == port for p in svc["ports"])


def test_compose_clients_use_real_flags_and_their_own_credentials(pki: Path) -> None:
    services = _compose()["services"]
    port = re.search(r"^listener (\d+)",
                     (ROOT / "broker/mosquitto/mosquitto.conf").read_text(), re.M).group(1)
    domains = []
    for name, svc in services.items():
        if name not in ("aggregator",) and not name.startswith("agent-"):
            continue
        cmd = svc["command"]
        _check_invocation(cmd, f"compose service {name}")
        opts = dict(a.removeprefix("--").split("=", 1) for a in cmd if a.startswith("--")
                    and "=" in a)
        assert opts["broker"] == f"mqtts://mosquitto:{port}"
        account = opts.get("client-id", "aggregator")
        env_file = _host_path(svc["env_file"], pki)
        assert env_file.name == f"{account}.env" and env_file.is_file()
        assert "FEDCLIP_MQTT_PASSWORD=" in env_file.read_text()
        assert _mounts(svc, pki)["/keys/ca.crt"].is_file()
        if name.startswith("agent-"):
            assert account == name
            domains.append(opts["domain"])
    assert len(set(domains)) == len(domains) and set(domains) <= set(DOMAINS)


def test_compose_serves_an_agents_model_store_beside_it() -> None:
    services = _compose()["services"]
    serving = {n: s for n, s in services.items() if s.get("command", [None])[0] == "serve"}
    assert serving, "no compose service runs `fedclip-edge serve`"
    for name, svc in serving.items():
        cmd = svc["command"]
        _check_invocation(cmd, f"compose service {name}")
        opts = dict(a.removeprefix("--").split("=", 1) for a in cmd if "=" in a)
        agent = name.replace("serve-", "agent-")
        assert agent in services and agent in svc["depends_on"], name
        # the store is the one the agent beside it keeps (its --models), in the shared volume
        agent_opts = dict(a.removeprefix("--").split("=", 1)
                          for a in services[agent]["command"] if "=" in a)
        assert opts["model"] == agent_opts["models"], (name, agent)
        assert any(v.startswith("trial:/var/lib/fedclip-edge") for v in svc["volumes"])
        assert opts["host"] == "0.0.0.0"  # reachable through the published port
        assert any(p.split(":")[-1] == opts["port"] for p in svc["ports"])


def test_compose_config_where_docker_compose_runs(pki: Path) -> None:
    docker = shutil.which("docker")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True,
                           timeout=30) if docker else None
    if probe is None or probe.returncode != 0:
        pytest.skip("docker compose is not installed (the YAML checks above still ran)")
    res = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "FEDCLIP_PKI": str(pki)})
    assert res.returncode == 0, res.stderr
