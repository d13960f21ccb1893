"""Build an open_clip model with its weights. Loading weights, building models and pretraining
are separate small steps (open_clip's factory mixes them); this module only resolves and loads.

`pretrained` is one of:
- an open_clip tag (`openai`, `laion2b_s34b_b79k`, ...): from the Hugging Face cache or a download;
- a path to a local checkpoint file (.pt/.bin/.safetensors);
- `none`: random init (real sizes and speed, no accuracy), seeded so it is reproducible;
- `synth`: only for `fedclip-tiny`, the project's own small CLIP pretrained on synthetic data.
A weight source that is not there fails with one line saying what to provide; there is never a
silent fallback to random weights.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedclip_edge.errors import ModelError
from fedclip_edge.models.registry import _open_clip, cache_dir  # noqa: F401  (re-exported)
from fedclip_edge.names import did_you_mean

DEFAULT_MODEL = "fedclip-tiny"
SYNTH_TAG = "synth"
NONE_TAG = "none"
def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and values: independent of file format."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A CLIP model with what every consumer needs to know about it."""

    name: str
    pretrained: str
    model: Any  # open_clip CLIP in eval mode
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> [3, H, W] tensor (open_clip's own)
    preprocess_cfg: dict[str, Any]
    embed_dim: int
    weights_sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> dict[str, Any]:
        """What makes two feature sets comparable: same architecture, same weights."""
        return {
            "model": self.name,
            "pretrained": self.pretrained,
            "weights_sha256": self.weights_sha256,
        }

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().detach())


def list_architectures() -> list[str]:
    return _open_clip().list_models()


def _check_architecture(name: str) -> None:
    oc = _open_clip()
    names = oc.list_models()
    if name not in names:
        raise ModelError(
            f"unknown model architecture {name!r}{did_you_mean(name, names)}: use an open_clip "
            f"name such as ViT-B-32 (`fedclip-edge model list` lists them) or "
            f"{DEFAULT_MODEL!r}, the offline default"
        )


def _offline() -> bool:
    flags = (os.environ.get("FEDCLIP_EDGE_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in flags)


def _hub_unreachable(timeout_s: float = 3.0) -> str:
    """"" when the weights' host answers a TCP connect within `timeout_s`, else why not."""
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:  # behind a proxy, the proxy is what has to answer
        endpoint = proxy if "://" in proxy else f"http://{proxy}"
    host = urlparse(endpoint).hostname or "huggingface.co"
    port = urlparse(endpoint).port or (80 if endpoint.startswith("http:") else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return ""
    except OSError as exc:
        return f"{host}:{port} unreachable ({exc.strerror or type(exc).__name__})"


def _resolve_tag(name: str, tag: str) -> str:
    """Path of the checkpoint for an open_clip tag: cached or downloaded, else ModelError."""
    oc = _open_clip()
    tags = oc.list_pretrained_tags_by_model(name)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none published"
        raise ModelError(
            f"{name!r} has no pretrained tag {tag!r}{did_you_mean(tag, tags)} (known: {known}); "
            "or pass a checkpoint file path, or 'none' for random init"
        )
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    unreachable = "" if _offline() else _hub_unreachable()
    if _offline() or unreachable:
        # huggingface_hub reads HF_HUB_OFFLINE once at import; honour it (and ours) at call time
        # so an offline machine fails at once (or reads the cache) instead of after a minute of
        # retries. No network counts as offline: the hub's client would retry for ~50 s.
        try:
            import huggingface_hub.constants as hf_constants

            hf_constants.HF_HUB_OFFLINE = True
        except ImportError:
            pass
    try:
        path = download_pretrained(get_pretrained_cfg(name, tag))
    except Exception as exc:  # hub/network errors come in many types
        path = ""
        reason = str(exc).splitlines()[0][:200]
    else:
        reason = "download returned nothing"
    if unreachable:
        reason = f"no network: {unreachable}, and not in the local cache"
    if not path or not Path(path).is_file():
        raise ModelError(
            f"pretrained weights {name}/{tag} are not available ({reason}). Fetch them once on a "
            "machine with internet (they land in the Hugging Face cache, ~/.cache/huggingface), "
            "or pass --pretrained /path/to/checkpoint.pt; use --pretrained none for random init"
        )
    return str(path)


def load_model(
    name: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    *,
    device: str = "cpu",
    seed: int = 0,
) -> LoadedModel:
    """Build `name` with weights from `pretrained` (see module docstring), in eval mode."""
    oc = _open_clip()
    _check_architecture(name)
    if pretrained is None:
        if name != DEFAULT_MODEL:
            raise ModelError(
                f"say which weights to use for {name!r}: --pretrained TAG (e.g. openai), "
                "--pretrained /path/to/checkpoint, or --pretrained none for random init"
            )
        pretrained = SYNTH_TAG

    checkpoint: str | None = None
    extra: dict[str, Any] = {}
    if pretrained == SYNTH_TAG:
        if name != DEFAULT_MODEL:
            raise ModelError(f"'synth' weights exist only for {DEFAULT_MODEL!r}, not {name!r}")
        from fedclip_edge.models.tiny import ensure_pretrained

        checkpoint_path, extra = ensure_pretrained(seed=seed)
        checkpoint = str(checkpoint_path)
        label = SYNTH_TAG
    elif pretrained == NONE_TAG:
        label = NONE_TAG
    elif (
        Path(pretrained).expanduser().exists()
        or os.sep in pretrained
        or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
    ):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ModelError(f"checkpoint file not found: {path}")
        checkpoint, label = str(path.resolve()), str(path.resolve())
    else:
        checkpoint, label = _resolve_tag(name, pretrained), pretrained

    torch.manual_seed(seed)  # random init ('none') is reproducible
    try:
        model, _, preprocess = oc.create_model_and_transforms(
            name, pretrained=checkpoint, device=device
        )
    except ModelError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise ModelError(f"could not load {name} weights from {label}: {first}") from exc
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    visual_cfg = dict(model.visual.preprocess_cfg)
    size = visual_cfg.get("size")
    if isinstance(size, int):
        size = (size, size)
    visual_cfg["size"] = list(size)
    visual_cfg["mean"] = list(visual_cfg["mean"])
    visual_cfg["std"] = list(visual_cfg["std"])
    embed_dim = (
        int(model.text_projection.shape[1])
        if hasattr(model, "text_projection")
        else int(model.visual.output_dim)
    )
    return LoadedModel(
        name=name,
        pretrained=label,
        model=model,
        tokenizer=oc.get_tokenizer(name),
        preprocess=preprocess,
        preprocess_cfg=visual_cfg,
        embed_dim=embed_dim,
        weights_sha256=state_sha256(model.state_dict()),
        extra=extra,
    )


@torch.no_grad()
def encode_prompts(loaded: LoadedModel, class_names: list[str]) -> torch.Tensor:
    """Raw text features of the class prompts, [C, D] float32 (normalize before use)."""
    from fedclip_edge import PROMPT_TEMPLATE

    tokens = loaded.tokenizer([PROMPT_TEMPLATE.format(c) for c in class_names])
    device = next(loaded.model.parameters()).device
    return loaded.model.encode_text(tokens.to(device)).float().cpu()


@torch.no_grad()
def encode_images(loaded: LoadedModel, batch: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalized) image features, [N, D] float32."""
    device = next(loaded.model.parameters()).device
    return loaded.model.encode_image(batch.to(device)).float().cpu()
