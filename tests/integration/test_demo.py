"""The README's demo command, small: embedded broker, agents as processes, aggregator; and the
in-process variant. Slow when the offline model is not cached yet (it is built first)."""

import json

import pytest
from support.signals import ctrl_c_enabled

from fedclip_edge.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_mqtt_demo_end_to_end(tmp_path, capsys):
    # with a delta codec (the default fp32 path runs in the interrupt/resume test below)
    rc = main(["demo", "--out", str(tmp_path), "--rounds", "2", "--per-class", "5",
               "--update-codec", "topk-int8"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "embedded MQTT broker at mqtt://127.0.0.1:" in printed
    assert "round 2/2 | clients 3/3" in printed
    summary = json.loads((tmp_path / "aggregator" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["client_rounds"] == 6
    lines = (tmp_path / "aggregator" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert {r["client"] for r in rows if "client" in r} == {
        "dev-art_painting",
        "dev-cartoon",
        "dev-sketch",
    }
    assert (tmp_path / "aggregator" / "latency.png").stat().st_size > 1000
    for client in ("dev-art_painting", "dev-cartoon", "dev-sketch"):
        assert (tmp_path / "agents" / f"{client}.log").read_text().strip()
        assert (tmp_path / "agents" / f"{client}-state.safetensors").stat().st_size > 0
    assert {r["update_codec"] for r in rows if r.get("kind") == "client"} == {"topk-int8"}
    assert set(summary["totals"]["bytes_up_by_codec"]) == {"topk-int8"}
    # each device kept and gated its model; measured through the fused ONNX graph it scores as
    # the same adapter in torch on the device's cached features, within one image
    from fedclip_edge.broker.demo_models import agree_within
    from fedclip_edge.serving.store import ModelStore

    devices = json.loads((tmp_path / "aggregator" / "devices.json").read_text())
    assert [d["client"] for d in devices] == ["dev-art_painting", "dev-cartoon", "dev-sketch"]
    for d in devices:
        store = ModelStore(tmp_path / "agents" / f"{d['client']}-models")
        assert [v.name for v in store.versions()] == ["v0001-global", "v0002-personal"]
        candidate = [v.name for v in store.versions() if v.manifest["gate_candidate"]]
        assert len(candidate) == 1 and d["version"] == (store.current_name() or candidate[0]), d
        assert d["test_n"] > 0 and agree_within(d, images=1), d
        assert (tmp_path / "agents" / f"{d['client']}-fused" / "manifest.json").is_file()
    assert "test fused ONNX" in printed


def test_inproc_demo(tmp_path, capsys):
    rc = main(
        [
            "demo",
            "--inproc",
            "--out",
            str(tmp_path),
            "--rounds",
            "2",
            "--per-class",
            "5",
            "--seeds",
            "0",
            "1",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "FedCLIP on synthetic domains" in out
    for preset in ("reference", "learning"):
        s = json.loads((tmp_path / preset / "summary.json").read_text())
        assert s["seeds"] == [0, 1] and s["rounds"] == 2


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain `text` (the demo's agents name its folder)."""
    import os

    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(f"{pid}: {cmd}")
    return found


def test_mqtt_demo_interrupt_resume_and_rerun(tmp_path, capsys):
    """Ctrl-C mid-run (made certain: the commit of round 2 is a barrier) -> one interrupted line,
    exit 130, agents stopped, round 1 kept; `--resume` finishes the same job; running the same
    command again then starts a fresh job and moves the finished run to runs/<time>."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--rounds", "3", "--per-class", "4"]
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tests)}
    cmd = [sys.executable, "-m", "support.blockrun", "fedclip_edge.broker.store:RunStore.commit",
           "1", "--", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, stdin=subprocess.DEVNULL, preexec_fn=ctrl_c_enabled)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("BLOCKED"):
                break
        else:
            pytest.fail("".join(lines))
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert "Traceback" not in text
    interrupted = [line for line in text.splitlines() if line.startswith("interrupted")]
    assert len(interrupted) == 1 and "--resume" in interrupted[0], text
    assert _processes_mentioning(str(out)) == [], "device agents outlived the demo"
    state = json.loads((out / "aggregator" / "state.json").read_text())
    assert state["completed_round"] == 1
    job = state["job"]

    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming job {job} after round 1" in printed
    state = json.loads((out / "aggregator" / "state.json").read_text())
    assert state["completed_round"] == 3 and state["job"] == job
    rows = [json.loads(x) for x in (out / "aggregator" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["round"] for r in rows if r.get("kind") == "round") == [1, 2, 3]

    assert main(["demo", "--out", str(out), "--rounds", "2", "--per-class", "4"]) == 0
    printed = capsys.readouterr().out
    moved = list((out / "runs").iterdir())
    assert len(moved) == 1 and f"moved to {moved[0]}" in printed
    earlier = json.loads((moved[0] / "aggregator" / "state.json").read_text())
    assert earlier["job"] == job and earlier["completed_round"] == 3
    assert (moved[0] / "agents" / "dev-cartoon.log").is_file()
    fresh = json.loads((out / "aggregator" / "state.json").read_text())
    assert fresh["job"] != job and fresh["completed_round"] == 2
