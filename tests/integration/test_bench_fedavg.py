"""`bench fedavg` on a small configuration: structure, byte accounting, who touched the tower."""

import json

import pytest

from fedclip_edge.benchmarks.fedavg import run_bench
from fedclip_edge.cli import main
from fedclip_edge.data.synth import write_dataset

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchdata")
    write_dataset(root, per_class=3, seed=0, domains=("photo", "sketch", "cartoon"))
    return root


def test_bench_structure_bytes_and_tower(data, tmp_path):
    report = run_bench(
        data,
        tmp_path,
        pretrained="none",
        clients=2,
        rounds=2,
        test_domain="cartoon",
        log=lambda s: None,
    )
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["complete"] is True and saved["schema"] == report["schema"]
    for key in ("config", "machine", "params", "fedclip", "fedavg", "speedups", "projections"):
        assert key in saved, key
    assert saved["machine"]["cpu_count"] >= 1 and "torch" in saved["machine"]
    for method in ("fedclip", "fedavg"):
        rounds = saved[method]["rounds"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert set(rounds[0]["clients"]) == set(saved["config"]["clients"])
        assert rounds[0]["generalization_acc"] is not None
    # bytes = parameters x 4 bytes + the frame's framing (header, names, sha256)
    adapter = saved["params"]["adapter"]
    assert adapter == 2 * (128 * 128 + 128)
    up = saved["fedclip"]["rounds"][0]["bytes_up_per_client"]
    assert 0 < up - 4 * adapter < 2048
    from fedclip_edge.models import load_model

    tower = load_model("fedclip-tiny", "none").model.visual
    floats = sum(v.numel() for v in tower.state_dict().values() if v.is_floating_point())
    up_fa = saved["fedavg"]["rounds"][0]["bytes_up_per_client"]
    assert 0 < up_fa - 4 * floats < 64 * 1024
    # full FedAvg changed the image tower; FedCLIP left it untouched
    assert saved["fedavg"]["tower_sha256_after"] != saved["fedavg"]["tower_sha256_before"]
    assert saved["fedclip"]["tower_sha256_after"] == saved["fedclip"]["tower_sha256_before"]
    assert saved["speedups"]["bytes_per_round"] > 1
    assert all("PROJECTION" in p["label"] for p in saved["projections"])
    assert (tmp_path / "bench.md").read_text().startswith("# FedCLIP vs full-model FedAvg")
    assert (tmp_path / "accuracy_vs_cost.png").stat().st_size > 1000


def test_fp16_frames_halve_the_bytes(data, tmp_path):
    r32 = run_bench(
        data, tmp_path / "a", pretrained="none", clients=1, rounds=1, log=lambda s: None
    )
    r16 = run_bench(
        data,
        tmp_path / "b",
        pretrained="none",
        clients=1,
        rounds=1,
        dtype="float16",
        log=lambda s: None,
    )
    b32 = r32["fedclip"]["rounds"][0]["bytes_up_per_client"]
    b16 = r16["fedclip"]["rounds"][0]["bytes_up_per_client"]
    assert abs(b16 - b32 / 2) < 2048


def test_update_codec_bytes_are_measured_beside_the_dense_frames(data, tmp_path):
    """--update-codec: FedCLIP's uplink really goes in the codec (its bytes are the run's
    frames), the report puts it beside the fp32/fp16 adapter frames and the tower's."""
    r = run_bench(
        data, tmp_path, pretrained="none", clients=2, rounds=2, update_codec="topk-int8",
        topk_fraction=0.01, log=lambda s: None,
    )
    u = r["uplink"]
    got = u["bytes_up_per_client_round"]
    assert set(got) == {"topk-int8", "fp32", "fp16"}
    assert got["topk-int8"] == r["fedclip"]["rounds"][0]["bytes_up_per_client"]
    assert got["topk-int8"] * 20 < got["fp32"] and abs(got["fp16"] - got["fp32"] / 2) < 2048
    adapter = r["params"]["adapter"]
    assert 0 < got["fp32"] - 4 * adapter < 2048
    tower = u["fedavg_tower_bytes_up_per_client_round"]
    assert u["ratio_vs_fedavg_tower"]["topk-int8"] == tower / got["topk-int8"]
    assert u["ratio_vs_fp32_adapter"] > 20
    # the global still goes down dense fp32
    assert 0 < r["fedclip"]["rounds"][0]["bytes_down_per_client"] - 4 * adapter < 2048
    md = (tmp_path / "bench.md").read_text()
    assert "topk-int8 (top-k fraction 0.01)" in md and "below full FedAvg's tower frame" in md


def test_cli_errors(data, tmp_path, capsys):
    rc = main(
        [
            "bench",
            "fedavg",
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--pretrained",
            "none",
            "--clients",
            "9",
        ]
    )
    assert rc == 6 and "--clients must be 1..3" in capsys.readouterr().err
    rc = main(
        [
            "bench",
            "fedavg",
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--pretrained",
            "none",
            "--transport",
            "carrier-pigeon",
        ]
    )
    assert rc == 6


@pytest.mark.mosquitto
def test_mqtt_transport_bytes_are_frames_plus_envelopes(data, tmp_path):
    """Every exchange through a private mosquitto, chunked at 64 KiB: each direction's bytes are
    the in-process frame size plus the protocol envelope (a header under 1 KiB: the exchange
    speaks the project's global/update messages) and the chunk envelopes it splits into."""
    from support import mqtt as mqtt_helpers

    from fedclip_edge.broker.protocol import split_payload

    mqtt_helpers.require_mosquitto()
    kw = {"pretrained": "none", "clients": 1, "rounds": 1, "log": lambda s: None}
    ref = run_bench(data, tmp_path / "inproc", **kw)
    max_payload = 64 * 1024
    got = run_bench(data, tmp_path / "mqtt", transport="mqtt", max_payload=max_payload, **kw)
    saved = json.loads((tmp_path / "mqtt" / "bench.json").read_text())
    assert saved["complete"] and saved["config"]["transport"] == "mqtt"
    assert saved["config"]["broker"]["kind"].startswith("private mosquitto")
    assert saved["config"]["max_payload"] == max_payload
    for method in ("fedclip", "fedavg"):
        (name,) = saved["config"]["clients"]
        want = ref[method]["rounds"][0]["clients"][name]
        have = got[method]["rounds"][0]["clients"][name]
        for way in ("down", "up"):
            frame = want[f"bytes_{way}"]
            chunks = split_payload(bytes(frame), max_payload)
            assert len(chunks) > 1, (method, way, frame)  # chunking really happened
            n = have[f"messages_{way}"]
            assert len(chunks) <= n <= len(chunks) + 1, (method, way)
            assert 0 < have[f"bytes_{way}"] - frame <= 1024 + 512 * n, (method, way)
        assert have["transfer_s"] > 0
    # the same training happened: same losses as in process
    for method in ("fedclip", "fedavg"):
        (name,) = saved["config"]["clients"]
        assert got[method]["rounds"][0]["clients"][name]["loss"] == pytest.approx(
            ref[method]["rounds"][0]["clients"][name]["loss"]
        )


@pytest.mark.parametrize("transport", ["inproc", "mqtt"])
def test_global_codec_bytes_down_are_the_delta_frames(data, tmp_path, transport):
    """--global-codec: round 1's global is derived on the client (its 64-byte digest is what
    that round counts), later rounds' are the server's delta frames, rebuilt bit for bit (a
    mismatch would raise); the speedup is given both ways."""
    if transport == "mqtt":
        from support import mqtt as mqtt_helpers

        mqtt_helpers.require_mosquitto()
    kw = {"pretrained": "none", "clients": 2, "rounds": 3, "log": lambda s: None,
          "update_codec": "topk-int8", "topk_fraction": 0.01, "transport": transport}
    dense = run_bench(data, tmp_path / "dense", **kw)
    r = run_bench(data, tmp_path / "packed", global_codec="topk-int8", **kw)
    s = r["speedups"]
    downs = s["fedclip_bytes_down_by_round"]
    dense_down = dense["fedclip"]["rounds"][0]["bytes_down_per_client"]
    assert downs[0] == 64
    assert all(64 < b < dense_down / 20 for b in downs[1:])
    assert s["fedclip_bytes_down_per_client_round"] == pytest.approx(sum(downs) / 3)
    assert s["bytes_per_round"] > 10 * dense["speedups"]["bytes_per_round"]
    assert s["bytes_per_round_down"] == pytest.approx(
        s["fedavg_bytes_per_client_round"] / 2 / s["fedclip_bytes_down_per_client_round"],
        rel=0.01)
    # the same training in round 1 (same global); the adapter then trains from the rebuilt one
    (name, _) = r["config"]["clients"]
    assert r["fedclip"]["rounds"][0]["clients"][name]["loss"] == pytest.approx(
        dense["fedclip"]["rounds"][0]["clients"][name]["loss"])
    assert "global codec topk-int8" in " ".join(r["notes"])
