"""A kept model's test accuracy through the fused ONNX graph equals the same adapter's accuracy
in torch on the device's cached features, within one image (what the demo's final table shows;
broker/demo_models.py). Built as a device does: features through the agent's extractor path,
versions through keep_models, then measured as the demo measures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.tiny_artifact import shared_artifact

from fedclip_edge.broker.demo_models import agree_within, device_models_table, measure_device
from fedclip_edge.config import TrainConfig
from fedclip_edge.device_agent.agent import load_local_features
from fedclip_edge.serving.keep import artifact_record, keep_models


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    data, artifact = shared_artifact(tmp_path_factory)
    agents = tmp_path_factory.mktemp("agents")
    local = load_local_features(
        data, artifact, backend="onnxruntime", cache=agents / "dev-photo-cache", log=lambda _: None
    )
    splits = local.split(0)
    keep_models(
        agents / "dev-photo-models",
        global_state=_state(local.dim),
        text_features=local.text_features,
        classes=sorted(p.name for p in (data / "photo").iterdir()),
        logit_scale=local.logit_scale,
        train=splits["train"],
        val=splits["val"],
        train_cfg=TrainConfig().with_overrides(lr=1e-3),
        personalize_epochs=2,
        promote_margin=0.99 - 1e-9,  # promote whatever it is: this test is about measuring
        provenance={
            "job": "j",
            "round": 1,
            "client_id": "dev-photo",
            "artifact": artifact_record(artifact),
        },
        log=lambda _: None,
    )
    return agents, data, artifact


def _state(dim: int) -> dict[str, torch.Tensor]:
    from fedclip_edge.adapter import AttentionAdapter

    torch.manual_seed(0)
    return AttentionAdapter(dim).state_dict()


def test_fused_onnx_accuracy_equals_torch_within_one_image(device) -> None:
    agents, data, _ = device
    lines: list[str] = []
    row = measure_device(agents, "dev-photo", "photo", data, 0, log=lines.append)
    assert row["current"] is True and row["version"].startswith("v000")
    assert row["test_n"] > 0
    assert agree_within(row, images=1), row
    assert (agents / "dev-photo-fused" / "manifest.json").is_file()
    table = device_models_table([row])
    assert table[0].split()[:4] == ["device", "model", "val", "zero-shot"]
    assert table[2].startswith("dev-photo") and row["version"] in table[2]


def test_agree_within_counts_images() -> None:
    row = {
        "version": "v0001-global",
        "test_n": 10,
        "test_torch_correct": 7,
        "test_fused_correct": 8,
        "test_fused": 0.8,
    }
    assert agree_within(row, images=1) and not agree_within(row, images=0)
    assert not agree_within({**row, "test_fused_correct": 5})
    assert not agree_within({"version": None})
