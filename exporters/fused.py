"""Fused classifier export: encoder artifact + adapter + class text features -> one ONNX graph.

`image` [N,3,H,W] -> `logits` [N,C] (logit_scale x cosine to each class) and `probs` [N,C].

Composed, not re-exported. The graph is the version's encoder artifact's own
`image_encoder.onnx` joined (`onnx.compose.merge_models`) to an adapter head written with
`onnx.helper` (exporters/fused_graph.py). Why not trace encoder + adapter from PyTorch again:
- the device holds the artifact, not necessarily the torch weights (a slim device, or weights that
  were only on the exporting machine); composing needs nothing but the artifact's files;
- the encoder part is byte for byte the graph whose features the adapter was trained and validated
  on (and that passed its own parity check), so the fused classifier sees the same features;
- no tracing on the device (slow, memory-hungry, and the TorchScript exporter's quirks);
- the head is a few small ops; writing it directly makes every node's precision explicit.
Precision follows the artifact: an fp32 artifact can become fp32, fp16 (exporters/fp16.py on
the whole fused graph) or int8 (dynamic quantization of the encoder; the head's nodes stay fp32:
the class decision is a few thousand weights and int8 would move its boundary for no gain); an
fp16 or int8 artifact composes only at its own precision (its head in fp32).

Parity is measured against the torch composition: the PyTorch AttentionAdapter and the class
matrix applied, in float32, to the encoder's reference features (PyTorch fp32 features: the
artifact's golden set, plus synthetic images and random tensors encoded by PyTorch when the
weights are here; otherwise by the artifact's fp32 ONNX encoder, and the manifest says so).
Top-1 agreement must be 100% at fp32 and >= 99% at fp16/int8. As with `export`, everything is
staged in a hidden folder that becomes `--out` only after parity passed and the manifest is
written; a failure leaves nothing that looks like an export.
"""

from __future__ import annotations

import datetime as _dt
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedclip_edge.errors import ExportError
from fedclip_edge.exporters import names as N
from fedclip_edge.exporters import parity
from fedclip_edge.exporters.export import ExportResult, tool_versions
from fedclip_edge.exporters.fused_parity import (
    FUSED_AGREEMENT,
    fused_parity,
    softmax,
    torch_composition,
)
from fedclip_edge.exporters.manifest import (
    read_manifest,
    sha256_file,
    staged_dir,
    verify_artifact,
    write_manifest,
)
from fedclip_edge.exporters.preprocess import PreprocessConfig, preprocess_images

Progress = Callable[[str], None]

GOLDEN_COUNT = 8


@dataclass
class FusedSource:
    """What a fused export needs from a model version (see serving.store.ModelVersion)."""

    name: str
    manifest: dict[str, Any]
    state: dict[str, np.ndarray]
    text_features: np.ndarray  # [C, D] normalized
    logit_scale: float
    classes: list[str]

    @classmethod
    def from_version(cls, version: Any) -> FusedSource:
        """From a `ModelVersion` (duck-typed: name, manifest, classes, load())."""
        state, text, scale = version.load()
        return cls(
            name=version.name,
            manifest=dict(version.manifest),
            state={k: v.detach().cpu().float().numpy() for k, v in state.items()},
            text_features=np.asarray(text.detach().cpu().float().numpy(), dtype=np.float32),
            logit_scale=float(scale),
            classes=list(version.classes),
        )

    @property
    def model_version(self) -> dict[str, Any]:
        m = self.manifest
        files = m.get("files") or {}
        return {
            "name": self.name,
            "kind": m.get("kind"),
            "job": m.get("job"),
            "round": m.get("round"),
            "client_id": m.get("client_id"),
            "adapter_sha256": (files.get("adapter.safetensors") or {}).get("sha256"),
            "global_sha256": m.get("global_sha256"),
        }

    def artifact(self) -> tuple[Path, dict[str, Any]]:
        """The encoder artifact the version pairs with, verified, and its manifest."""
        rec = self.manifest.get("artifact") or {}
        if not rec.get("path"):
            raise ExportError(f"model version {self.name} names no encoder artifact")
        root = Path(rec["path"])
        manifest = verify_artifact(root, read_manifest(root))
        want = rec.get("manifest_sha256")
        if want and sha256_file(root / N.MANIFEST_FILE) != want:
            raise ExportError(
                f"the artifact {root} changed since {self.name} was made (its manifest no longer "
                "hashes to the version's artifact.manifest_sha256): the adapter may not fit it"
            )
        if manifest.get("kind", N.ENCODER_KIND) != N.ENCODER_KIND:
            raise ExportError(f"{root} is a {manifest['kind']}, not an image encoder artifact")
        dim = int(manifest["model"]["embed_dim"])
        if self.text_features.shape[1] != dim:
            raise ExportError(
                f"{self.name} has {self.text_features.shape[1]}-dim features, the artifact {dim}"
            )
        return root, manifest


def _reference_features(
    root: Path, manifest: dict[str, Any], inputs: np.ndarray
) -> tuple[np.ndarray | None, str]:
    """PyTorch fp32 features of `inputs` (or the fp32 ONNX encoder's), or None if neither."""
    from fedclip_edge.errors import FedClipError

    m = manifest["model"]
    try:
        from fedclip_edge.models import encode_images, load_model

        loaded = load_model(m["name"], m["pretrained"], seed=int(m.get("seed", 0)))
        if loaded.weights_sha256 == m["weights_sha256"]:
            import torch

            out = [
                encode_images(loaded, torch.from_numpy(inputs[i : i + 32])).numpy()
                for i in range(0, len(inputs), 32)
            ]
            return np.concatenate(out).astype(np.float32), "PyTorch fp32 encoder"
    except (FedClipError, ImportError):
        pass
    if manifest["precision"] == "fp32":
        from fedclip_edge.exporters.ort_utils import make_session, run_batches

        session = make_session(root / manifest["image_encoder"]["file"])
        mb = int(manifest["max_batch"])
        outs = run_batches(
            session, N.IMAGE_INPUT, [inputs[i : i + mb] for i in range(0, len(inputs), mb)]
        )
        return np.concatenate(outs), "the artifact's fp32 ONNX encoder (no torch weights here)"
    return None, "none (only the artifact's golden set has PyTorch features)"


def _parity_sets(
    root: Path, manifest: dict[str, Any], cfg: PreprocessConfig, per_domain: int, n_random: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """{set name: (inputs, reference features)} and where the extra sets' features came from."""
    with np.load(root / manifest["golden"]["file"]) as data:
        sets = {"golden": (data["inputs"].astype(np.float32), data["features"].astype(np.float32))}
    h, w = cfg.size
    real = preprocess_images(parity.synthetic_images(max(h, w), per_domain), cfg)
    rand = parity.random_inputs(n_random, (h, w))
    extra = np.concatenate([real, rand])
    feats, where = _reference_features(root, manifest, extra)
    if feats is not None:
        sets["real"] = (real, feats[: len(real)])
        sets["random"] = (rand, feats[len(real) :])
    return sets, where


def _candidate(path: Path, precision: str, batches: list[np.ndarray]) -> tuple[list, str]:
    """Logits of each batch from ONNX Runtime on CPU (fp16 in a child process)."""
    from fedclip_edge.exporters.export import _run_candidate

    return _run_candidate(path, precision, batches)


def export_fused(
    source: FusedSource,
    out: str | Path,
    *,
    classes: Sequence[str] | None = None,
    precision: str | None = None,
    text_encoder: Path | None = None,
    trt: bool = False,
    overwrite: bool = False,
    parity_per_domain: int = 20,
    parity_random: int = 20,
    progress: Progress | None = None,
) -> ExportResult:
    """Write a fused classifier artifact for `source` to `out` (see the module docstring)."""
    import onnx

    from fedclip_edge.exporters.fused_graph import build_head, class_matrix, compose, head_opset_ir
    from fedclip_edge.exporters.fused_text import resolve_class_features
    from fedclip_edge.exporters.onnx_export import check_onnx, model_io, opset_of, save_onnx

    say = progress or (lambda _msg: None)
    root, art = source.artifact()
    src_precision = art["precision"]
    precision = precision or src_precision
    if precision not in N.PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}: use fp32, fp16 or int8")
    if precision != src_precision and src_precision != "fp32":
        raise ExportError(
            f"the artifact {root} is {src_precision}: a fused {precision} graph needs an fp32 "
            f"artifact (or use --precision {src_precision})"
        )
    if trt and precision == "int8":
        raise ExportError("int8 is ONNX Runtime dynamic quantization (CPU); TensorRT needs "
                          "fp16 or fp32: use --precision fp16 --trt")
    out_path = Path(out).expanduser()
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        raise ExportError(f"--out {out_path} already exists and is not empty: pass --force")

    cf = resolve_class_features(
        version_name=source.name,
        version_classes=source.classes,
        version_features=source.text_features,
        artifact=root,
        artifact_manifest=art,
        classes=classes,
        text_encoder=text_encoder,
    )
    cls = class_matrix(cf.features, source.logit_scale)
    cfg = PreprocessConfig.from_dict(art["preprocess"])
    max_batch = int(art["max_batch"])

    say("preparing parity inputs and the torch composition's logits")
    sets, ref_where = _parity_sets(root, art, cfg, parity_per_domain, parity_random)
    ref_logits = {k: torch_composition(source.state, cls, f) for k, (_, f) in sets.items()}

    with staged_dir(out_path, overwrite=overwrite) as stage:
        work = stage / "_work"
        work.mkdir()
        encoder = onnx.load(str(root / art["image_encoder"]["file"]))
        opset, ir = head_opset_ir(encoder)
        head = build_head(source.state, cf.features, source.logit_scale, opset=opset,
                          ir_version=ir)
        say(f"composing {art['image_encoder']['file']} ({src_precision}) with the adapter head")
        fused = compose(encoder, head)
        del encoder
        final = stage / N.FUSED_ONNX_FILE
        extra: dict[str, Any] = {}
        if precision == src_precision:
            save_onnx(fused, final)
        elif precision == "fp16":
            from fedclip_edge.exporters.fp16 import FP32_OPS, convert_to_fp16, fp16_summary
            from fedclip_edge.exporters.ort_utils import FP16_CPU_DISABLED_OPTIMIZERS

            say("converting the fused graph to an fp16 body (normalizations and I/O stay fp32)")
            converted = convert_to_fp16(fused)
            save_onnx(converted, final)
            extra = {
                "fp16": {**fp16_summary(converted), "fp32_ops": sorted(FP32_OPS)},
                "ort_cpu_disabled_optimizers": list(FP16_CPU_DISABLED_OPTIMIZERS),
            }
        else:
            from fedclip_edge.exporters.quantize import quantize_int8

            say("quantizing the encoder part (dynamic int8; the head stays fp32)")
            save_onnx(fused, work / "fused_fp32.onnx")
            head_nodes = [n.name for n in fused.graph.node if n.name.startswith("head/")]
            # quantize_dynamic first splits a Gemm into `<name>_MatMul` + `<name>_Add`
            head_nodes += [f"{n}_MatMul" for n in head_nodes]
            ops = quantize_int8(work / "fused_fp32.onnx", final, nodes_to_exclude=head_nodes)
            extra = {"int8": {"method": "onnxruntime.quantization.quantize_dynamic",
                              "weight_type": "QInt8", "op_types": ops,
                              "excluded": "the adapter head (head/*)"}}
        del fused
        check_onnx(final)

        say(f"measuring parity against the torch composition ({precision}, batch 1 and "
            f"{max_batch})")
        everything = np.concatenate([x for x, _ in sets.values()])
        reps = -(-max_batch // len(everything))
        max_in = np.concatenate([everything] * reps)[:max_batch]
        chunks = [everything[i : i + max_batch] for i in range(0, len(everything), max_batch)]
        outs, where = _candidate(final, precision, [everything[:1], max_in, *chunks])
        c = len(cf.classes)
        for b, o in zip([everything[:1], max_in, *chunks], outs, strict=True):
            if o.shape != (b.shape[0], c):
                raise ExportError(f"the fused graph gave logits of shape {list(o.shape)} for a "
                                  f"batch of {b.shape[0]} (expected [{b.shape[0]}, {c}])")
        cand_all = np.concatenate(outs[2:])
        ref_all = np.concatenate(list(ref_logits.values()))
        reps_ref = np.concatenate([ref_all] * reps)[:max_batch]
        cand, start = {}, 0
        for k, (x, _) in sets.items():
            cand[k] = cand_all[start : start + len(x)]
            start += len(x)
        names = list(sets)
        ref_logits_b = {**ref_logits, "batch_1": ref_all[:1], f"batch_{max_batch}": reps_ref}
        cand_b = {**cand, "batch_1": outs[0], f"batch_{max_batch}": outs[1]}
        rep = fused_parity(ref_logits_b, cand_b, precision, where, pooled_sets=names)
        rep["reference_features"] = {"golden": "PyTorch fp32, recorded in the artifact",
                                     **{k: ref_where for k in names if k != "golden"}}
        rep["dynamic_batch_checked"] = [1, max_batch]
        if rep["status"] != "passed":
            raise ExportError(
                f"the fused {precision} classifier of {source.name} misses its parity bound: "
                f"top-1 agreement {100 * rep['top1_agreement']:.1f}% with the torch composition "
                f"(bound {100 * FUSED_AGREEMENT[precision]:.0f}%) over "
                f"{rep['top1_agreement_over']['count']} inputs"
            )

        # Golden set: the inputs whose reference top-1 is clearest, so that a flip at load
        # time means a broken runtime, not a near tie.
        ref_probs = softmax(ref_all)
        top2 = np.sort(ref_probs, axis=1)[:, -2:] if c > 1 else np.ones((len(ref_probs), 2))
        margin = top2[:, -1] - top2[:, 0] if c > 1 else np.ones(len(ref_probs))
        pick = np.sort(np.argsort(-margin, kind="stable")[:GOLDEN_COUNT])
        np.savez(stage / N.GOLDEN_FILE, inputs=everything[pick], logits=ref_all[pick],
                 probs=ref_probs[pick])
        shutil.rmtree(work)

        io = model_io(final)
        manifest: dict[str, Any] = {
            "schema": N.SCHEMA,
            "schema_version": N.SCHEMA_VERSION,
            "kind": N.FUSED_KIND,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {**art["model"], "logit_scale": source.logit_scale},
            "model_version": source.model_version,
            "classes": cf.classes,
            "class_source": cf.record(),
            "source_artifact": {
                "path": str(root.absolute()),
                "manifest_sha256": sha256_file(root / N.MANIFEST_FILE),
                "precision": src_precision,
            },
            "preprocess": cfg.to_dict(),
            "precision": precision,
            "opset": opset_of(final),
            "max_batch": max_batch,
            "opt_batch": int(art.get("opt_batch", min(8, max_batch))),
            "classifier": {
                "file": N.FUSED_ONNX_FILE,
                "composed_from": f"{art['image_encoder']['file']} of the artifact + adapter "
                "head (onnx.helper), onnx.compose.merge_models",
                "head_precision": "fp32" if precision != "fp16" or src_precision == "fp16"
                else "fp16 (fp32 islands)",
                **io,
                **extra,
            },
            "golden": {
                "file": N.GOLDEN_FILE,
                "count": int(len(pick)),
                "selected": "largest top-1 margin of the reference probabilities",
                "min_reference_margin": float(margin[pick].min()),
                "required_top1_agreement": 1.0,
                "max_abs_prob_diff": GOLDEN_PROB_DIFF[precision],
            },
            "parity": rep,
            "tensorrt": None,
            "versions": tool_versions(),
            "files": {},
        }
        result = ExportResult(out=out_path.absolute(), manifest=manifest)
        if trt:
            from fedclip_edge.exporters.fused_runtime import tensorrt_step

            tensorrt_step(stage, result, manifest, sets, ref_logits, say)
        say("writing manifest")
        result.manifest = write_manifest(stage, manifest)
    return result


# How far the golden set's probabilities may move at load time (after export) on a device's own
# backend; fp16 and int8 move them more than fp32's rounding does.
GOLDEN_PROB_DIFF = {"fp32": 1e-4, "fp16": 5e-2, "int8": 0.1}
