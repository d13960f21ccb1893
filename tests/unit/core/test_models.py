"""Model loading: real weight sources, clear one-line failures, never a silent random fallback."""

import pytest
import torch

from fedclip_edge.errors import ModelError
from fedclip_edge.models import load_model, state_sha256


def test_random_init_is_explicit_and_reproducible():
    a = load_model("fedclip-tiny", "none")
    b = load_model("fedclip-tiny", "none")
    assert a.pretrained == "none" and a.embed_dim == 128
    assert a.weights_sha256 == b.weights_sha256
    assert a.preprocess_cfg["size"] == [64, 64]


def test_other_architectures_need_an_explicit_weight_source():
    with pytest.raises(ModelError, match="--pretrained"):
        load_model("ViT-B-32")


def test_unknown_architecture():
    with pytest.raises(ModelError, match="unknown model architecture 'ViT-Z-99'"):
        load_model("ViT-Z-99", "none")


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(ModelError, match="checkpoint file not found"):
        load_model("fedclip-tiny", str(tmp_path / "nope.pt"))


def test_unknown_tag():
    with pytest.raises(ModelError, match="no pretrained tag 'bogus'"):
        load_model("ViT-B-32", "bogus")


def test_unavailable_tag_offline_says_what_to_provide(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not available.*--pretrained /path/to/checkpoint"):
        load_model("RN50", "openai")


def test_local_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = load_model("fedclip-tiny", "none", seed=3)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    loaded = load_model("fedclip-tiny", str(path))
    assert loaded.weights_sha256 == src.weights_sha256
    assert loaded.pretrained == str(path.resolve())


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "wrong.safetensors"
    from safetensors.torch import save_file

    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ModelError, match="could not load fedclip-tiny weights"):
        load_model("fedclip-tiny", str(path))


def test_state_hash_changes_with_values():
    s = {"a": torch.zeros(2), "b": torch.tensor(1.0)}
    h = state_sha256(s)
    s["b"] = torch.tensor(2.0)
    assert state_sha256(s) != h
