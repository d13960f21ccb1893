"""Class text features for a fused classifier: changing classes on the device, no retraining.

CLIP is open-vocabulary: the adapter reweights image features, and a class is one normalized
text feature row. A class the model version already has keeps its stored row (the one it was
validated with); a new class (or a new prompt for an old one) is encoded, from the first of:
1. `--text-encoder DIR`: the ONNX text tower of an artifact exported with `--text-encoder`;
2. the version's own encoder artifact, when it was exported with `--text-encoder`;
3. PyTorch, where the model's weights are here and hash to the artifact's `weights_sha256`.
Each must be the same CLIP as the encoder artifact (weights sha256), or the new rows would live
in another embedding space. A class that none of them can encode fails with one line.

A prompts file (`--text-encoder FILE`) lists `CLASS` or `CLASS: PROMPT` per line ('#' comments);
without a prompt the project's template ("a picture of a {}") is used, as at training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedclip_edge.errors import ExportError, FedClipError


@dataclass
class ClassFeatures:
    """The classes of a fused classifier, their normalized text features, and their origin."""

    classes: list[str]
    features: np.ndarray  # [C, D] float32, L2-normalized rows
    from_version: list[str] = field(default_factory=list)
    encoded: dict[str, str] = field(default_factory=dict)  # class -> prompt
    encoder: str | None = None  # what encoded the new rows

    def record(self) -> dict[str, Any]:
        """The manifest's `class_source`."""
        return {
            "from_version": self.from_version,
            "encoded": self.encoded,
            "text_encoder": self.encoder,
        }


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def read_prompts(path: Path) -> dict[str, str | None]:
    """`CLASS` or `CLASS: PROMPT` lines -> {class: prompt or None (the template)}."""
    out: dict[str, str | None] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"--text-encoder {path}: cannot read the prompts file ({exc})") from None
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, prompt = line.partition(":")
        name, prompt = name.strip(), prompt.strip()
        if not name or (sep and not prompt):
            raise ExportError(f"{path}:{n}: expected 'CLASS' or 'CLASS: PROMPT', got {line!r}")
        if name in out:
            raise ExportError(f"{path}:{n}: class {name!r} listed twice")
        out[name] = prompt or None
    if not out:
        raise ExportError(f"--text-encoder {path}: no classes in the prompts file")
    return out


def _onnx_text_encoder(root: Path, weights_sha256: str) -> tuple[Any, str]:
    """(encode(prompts) -> raw features, description) from an artifact's text_encoder.onnx."""
    from fedclip_edge.exporters.manifest import read_manifest, verify_artifact
    from fedclip_edge.exporters.ort_utils import make_session

    manifest = verify_artifact(root, read_manifest(root))
    entry = manifest.get("text_encoder")
    if not entry:
        raise ExportError(f"{root} has no text encoder: export it with --text-encoder")
    if manifest["model"]["weights_sha256"] != weights_sha256:
        raise ExportError(
            f"the text encoder in {root} belongs to other weights "
            f"({manifest['model']['weights_sha256'][:12]}...) than the image encoder "
            f"({weights_sha256[:12]}...): its features would not match"
        )
    session = make_session(root / entry["file"])
    name = manifest["model"]["name"]
    input_name = entry["inputs"][0]["name"]

    def encode(prompts: list[str]) -> np.ndarray:
        from fedclip_edge.models.registry import _open_clip

        tokens = _open_clip().get_tokenizer(name)(prompts).numpy().astype(np.int64)
        return np.asarray(session.run(None, {input_name: tokens})[0], dtype=np.float32)

    return encode, f"onnx text encoder {root / entry['file']}"


def _torch_text_encoder(model: dict[str, Any]) -> tuple[Any, str]:
    """(encode, description) from PyTorch, refused unless the weights hash matches."""
    import torch

    from fedclip_edge.models import load_model

    loaded = load_model(model["name"], model["pretrained"], seed=int(model.get("seed", 0)))
    if loaded.weights_sha256 != model["weights_sha256"]:
        raise ExportError(
            f"the {model['name']} weights here hash to {loaded.weights_sha256[:12]}..., "
            f"not the artifact's {model['weights_sha256'][:12]}..."
        )

    def encode(prompts: list[str]) -> np.ndarray:
        with torch.no_grad():
            return loaded.model.encode_text(loaded.tokenizer(prompts)).float().numpy()

    return encode, f"torch {model['name']} ({model['pretrained']})"


def resolve_class_features(
    *,
    version_name: str,
    version_classes: Sequence[str],
    version_features: np.ndarray,
    artifact: Path,
    artifact_manifest: dict[str, Any],
    classes: Sequence[str] | None = None,
    text_encoder: Path | None = None,
) -> ClassFeatures:
    """The classes (default: the version's) and their normalized text features (see module)."""
    from fedclip_edge import PROMPT_TEMPLATE

    prompts: dict[str, str | None] = {}
    encoder_dir: Path | None = None
    if text_encoder is not None:
        te = Path(text_encoder).expanduser()
        if te.is_dir():
            encoder_dir = te
        elif te.is_file():
            prompts = read_prompts(te)
        else:
            raise ExportError(f"--text-encoder {te}: no such artifact folder or prompts file")
    wanted = list(classes) if classes is not None else (list(prompts) or list(version_classes))
    if not wanted:
        raise ExportError("no classes to classify into")
    dupes = sorted({c for c in wanted if wanted.count(c) > 1})
    if dupes:
        raise ExportError(f"class {', '.join(dupes)} listed more than once")
    index = {c: i for i, c in enumerate(version_classes)}
    stored = _unit(version_features)
    need = {
        c: prompts.get(c) or PROMPT_TEMPLATE.format(c)
        for c in wanted
        if c not in index or prompts.get(c)
    }
    rows: dict[str, np.ndarray] = {c: stored[index[c]] for c in wanted if c not in need}
    described = None
    if need:
        encode, described = _pick_encoder(artifact, artifact_manifest, encoder_dir, need,
                                           version_name)
        new = _unit(encode(list(need.values())))
        if new.shape != (len(need), stored.shape[1]):
            raise ExportError(
                f"{described} gave text features of shape {list(new.shape)}, expected "
                f"[{len(need)}, {stored.shape[1]}]"
            )
        rows.update(zip(need, new, strict=True))
    return ClassFeatures(
        classes=wanted,
        features=np.stack([rows[c] for c in wanted]).astype(np.float32),
        from_version=[c for c in wanted if c not in need],
        encoded=need,
        encoder=described,
    )


def _pick_encoder(
    artifact: Path,
    artifact_manifest: dict[str, Any],
    encoder_dir: Path | None,
    need: dict[str, str],
    version_name: str,
) -> tuple[Any, str]:
    sha = artifact_manifest["model"]["weights_sha256"]
    if encoder_dir is not None:  # asked for explicitly: its failure is the answer
        return _onnx_text_encoder(encoder_dir, sha)
    tried = []
    if artifact_manifest.get("text_encoder"):
        try:
            return _onnx_text_encoder(artifact, sha)
        except FedClipError as exc:
            tried.append(str(exc))
    try:
        return _torch_text_encoder(artifact_manifest["model"])
    except (FedClipError, ImportError) as exc:
        tried.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    names = ", ".join(repr(c) for c in need)
    raise ExportError(
        f"no text features for class {names}: not among {version_name}'s classes, and nothing "
        f"here can encode it ({'; '.join(tried)}); pass --text-encoder ARTIFACT "
        "(an export made with --text-encoder)"
    )
