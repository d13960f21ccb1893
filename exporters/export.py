"""The export: model -> ONNX (fp32/fp16/int8) [-> TensorRT] -> parity -> manifest, atomically.

Order matters: everything is written into a hidden staging directory; parity against PyTorch fp32
(real synthetic images and random tensors, zero-shot agreement against class prompts, batch 1
and max-batch) must pass before `manifest.json` is written and the directory renamed into place.
An export that misses its bound raises ExportError with the numbers and leaves nothing behind.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedclip_edge.errors import ExportError
from fedclip_edge.exporters import names as N
from fedclip_edge.exporters import parity
from fedclip_edge.exporters.manifest import staged_dir, write_manifest
from fedclip_edge.exporters.preprocess import PreprocessConfig, preprocess_images

Progress = Callable[[str], None]


@dataclass
class ExportResult:
    """Where the artifact went, what its manifest says, and what the user should know."""

    out: Path
    manifest: dict[str, Any]
    trtexec: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)


def resolve_classes(spec: str | Path | Sequence[str] | None) -> list[str] | None:
    """Class names from a text file (one per line, '#' comments) or a dataset folder."""
    if spec is None:
        return None
    if not isinstance(spec, (str, Path)):
        names = [str(s) for s in spec]
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            names = [ln.strip() for ln in path.read_text().splitlines()]
            names = [n for n in names if n and not n.startswith("#")]
        elif path.is_dir():
            from fedclip_edge.data.folder import scan_dataset

            names = list(scan_dataset(path).classes)
        else:
            raise ExportError(f"--classes {path}: no such file or dataset folder")
    if not names:
        raise ExportError(f"--classes {spec}: no class names found")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ExportError(f"--classes lists {', '.join(dupes)} more than once")
    return names


def tool_versions() -> dict[str, str]:
    """Versions of what built the artifact (tensorrt is recorded with the engine)."""
    import onnx
    import onnxruntime
    import open_clip
    import torch

    from fedclip_edge import __version__

    return {
        "fedclip_edge": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


_REFERENCE_CACHE: dict[tuple, tuple[np.ndarray, ...]] = {}


def _parity_inputs(
    loaded: Any, cfg: PreprocessConfig, per_domain: int, n_random: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(real, random, PyTorch features of real, of random); kept for the last model, so
    exporting several precisions in one process computes the references once."""
    key = (loaded.name, loaded.weights_sha256, cfg, per_domain, n_random)
    if key not in _REFERENCE_CACHE:
        h, w = cfg.size
        real = preprocess_images(parity.synthetic_images(max(h, w), per_domain), cfg)
        rand = parity.random_inputs(n_random, (h, w))
        _REFERENCE_CACHE.clear()
        _REFERENCE_CACHE[key] = (
            real,
            rand,
            _torch_features(loaded, real),
            _torch_features(loaded, rand),
        )
    return _REFERENCE_CACHE[key]  # type: ignore[return-value]


def _torch_features(loaded: Any, x: np.ndarray, chunk: int = 32) -> np.ndarray:
    import torch

    from fedclip_edge.models import encode_images

    outs = [
        encode_images(loaded, torch.from_numpy(x[i : i + chunk])).numpy()
        for i in range(0, len(x), chunk)
    ]
    return np.concatenate(outs).astype(np.float32)


def _run_candidate(
    path: Path, precision: str, batches: list[np.ndarray]
) -> tuple[list[np.ndarray], str]:
    """Run the exported model on CPU; fp16 in a child process (it may crash the provider)."""
    from fedclip_edge.exporters.ort_utils import (
        disabled_optimizers_for,
        make_session,
        run_batches,
        run_isolated,
    )

    providers = ["CPUExecutionProvider"]
    disabled = disabled_optimizers_for(precision, providers)
    if precision == "fp16":
        outs = run_isolated(
            path, N.IMAGE_INPUT, batches, providers=providers, disabled_optimizers=disabled
        )
        where = (
            "onnxruntime CPUExecutionProvider, child process (kernels the CPU provider "
            "lacks in fp16 run in fp32 between Casts; the device re-checks its golden set "
            "on its own provider at load)"
        )
    else:
        session = make_session(path, providers)
        outs = run_batches(session, N.IMAGE_INPUT, batches)
        where = "onnxruntime CPUExecutionProvider"
    return outs, where


def export_artifact(
    out: str | Path,
    *,
    model: str = "fedclip-tiny",
    pretrained: str | None = None,
    precision: str = "fp32",
    max_batch: int = 32,
    opt_batch: int = 8,
    classes: str | Path | Sequence[str] | None = None,
    text_encoder: bool = False,
    trt: bool = False,
    opset: int = 17,
    seed: int = 0,
    overwrite: bool = False,
    parity_per_domain: int = 20,
    parity_random: int = 20,
    golden_real: int = 4,
    golden_random: int = 2,
    progress: Progress | None = None,
) -> ExportResult:
    """Export `model` to an artifact directory `out` (see module docstring)."""
    say = progress or (lambda _msg: None)
    if precision not in N.PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}: use fp32, fp16 or int8")
    if max_batch < 1:
        raise ExportError("--max-batch must be at least 1")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: 17 or newer")
    if trt and precision == "int8":
        raise ExportError(
            "int8 artifacts are ONNX Runtime dynamic quantization for CPU devices; TensorRT "
            "needs fp16 or fp32: use --precision fp16 --trt"
        )
    opt_batch = max(1, min(int(opt_batch), int(max_batch)))
    class_names = resolve_classes(classes)
    out_path = Path(out).expanduser()
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:  # fail before the work
        raise ExportError(
            f"--out {out_path} already exists and is not empty: pass --force to replace it"
        )

    from fedclip_edge import PROMPT_TEMPLATE
    from fedclip_edge.data import synth
    from fedclip_edge.exporters.onnx_export import (
        check_onnx,
        export_image_encoder,
        export_text_encoder,
        model_io,
        opset_of,
        save_onnx,
    )
    from fedclip_edge.models import encode_prompts, load_model

    say(f"loading {model} ({pretrained or 'default weights'})")
    loaded = load_model(model, pretrained, seed=seed)
    cfg = PreprocessConfig.from_dict(loaded.preprocess_cfg)
    h, w = cfg.size

    zs_names = class_names or list(synth.CLASSES)
    zs_features = encode_prompts(loaded, zs_names).numpy()

    say("preparing parity inputs (synthetic images, random tensors) and PyTorch fp32 features")
    real, rand, ref_real, ref_rand = _parity_inputs(loaded, cfg, parity_per_domain, parity_random)

    everything = np.concatenate([real, rand])
    ref_all = np.concatenate([ref_real, ref_rand])
    reps = -(-max_batch // len(everything))
    max_in = np.concatenate([everything] * reps)[:max_batch]
    max_ref = np.concatenate([ref_all] * reps)[:max_batch]

    with staged_dir(Path(out), overwrite=overwrite) as stage:
        work = stage / "_work"
        work.mkdir()
        fp32_path = work / "image_fp32.onnx"
        final = stage / N.IMAGE_ONNX_FILE
        say(f"exporting the image encoder to ONNX (opset {opset}, dynamic batch)")
        export_image_encoder(loaded.model, fp32_path, (h, w), opset=opset)
        extra: dict[str, Any] = {}
        if precision == "fp32":
            shutil.move(fp32_path, final)
        elif precision == "fp16":
            import onnx

            from fedclip_edge.exporters.fp16 import FP32_OPS, convert_to_fp16, fp16_summary

            say("converting to an fp16 body (LayerNorm/Softmax and I/O stay fp32)")
            converted = convert_to_fp16(onnx.load(str(fp32_path)))
            save_onnx(converted, final)
            check_onnx(final)
            from fedclip_edge.exporters.ort_utils import FP16_CPU_DISABLED_OPTIMIZERS

            extra = {
                "fp16": {**fp16_summary(converted), "fp32_ops": sorted(FP32_OPS)},
                "ort_cpu_disabled_optimizers": list(FP16_CPU_DISABLED_OPTIMIZERS),
            }
            del converted
        else:
            from fedclip_edge.exporters.quantize import quantize_int8

            say("quantizing (ONNX Runtime dynamic int8, QInt8 weights)")
            op_types = quantize_int8(fp32_path, final)
            check_onnx(final)
            extra = {
                "int8": {
                    "method": "onnxruntime.quantization.quantize_dynamic",
                    "weight_type": "QInt8",
                    "op_types": op_types,
                }
            }

        say(f"measuring parity against PyTorch ({precision}, batch 1 and {max_batch})")
        chunks = [everything[i : i + max_batch] for i in range(0, len(everything), max_batch)]
        batches = [everything[:1], max_in, *chunks]
        outs, where = _run_candidate(final, precision, batches)
        for b, o in zip(batches, outs, strict=True):
            if o.shape != (b.shape[0], loaded.embed_dim):
                raise ExportError(
                    f"exported encoder gave shape {list(o.shape)} for a batch of {b.shape[0]} "
                    f"(expected [{b.shape[0]}, {loaded.embed_dim}]): the batch axis is not dynamic"
                )
        cand_all = np.concatenate(outs[2:])
        n_real = len(real)
        rep = parity.report(
            {
                "real": (ref_real, cand_all[:n_real]),
                "random": (ref_rand, cand_all[n_real:]),
                "batch_1": (ref_all[:1], outs[0]),
                f"batch_{max_batch}": (max_ref, outs[1]),
            },
            zs_features,
            precision,
            measured_on=where,
            agreement_on=("real", "random"),
        )
        rep["zero_shot_classes"] = "--classes" if class_names else "synthetic shape classes"
        rep["inputs"] = {
            "real": f"{n_real} synthetic images ({', '.join(synth.DOMAINS)}), "
            f"rendered at {max(h, w)} px",
            "random": f"{len(rand)} standard-normal tensors",
        }
        rep["dynamic_batch_checked"] = [1, max_batch]
        parity.require(rep, f"the {precision} export of {model}")

        gi = np.concatenate([real[:golden_real], rand[:golden_random]])
        gf = np.concatenate([ref_real[:golden_real], ref_rand[:golden_random]])
        np.savez(stage / N.GOLDEN_FILE, inputs=gi, features=gf)

        class_entry = None
        if class_names:
            feats = encode_prompts(loaded, class_names).numpy().astype(np.float32)
            np.savez(stage / N.CLASS_FEATURES_FILE, features=feats, classes=np.array(class_names))
            class_entry = {
                "file": N.CLASS_FEATURES_FILE,
                "count": len(class_names),
                "classes": class_names,
                "prompt_template": PROMPT_TEMPLATE,
                "normalized": False,
            }

        text_entry = None
        if text_encoder:
            say("exporting the text encoder (fp32)")
            text_entry = _export_text(loaded, stage, zs_names, opset, export_text_encoder, model_io)

        io = model_io(final)
        manifest: dict[str, Any] = {
            "schema": N.SCHEMA,
            "schema_version": N.SCHEMA_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "name": loaded.name,
                "pretrained": loaded.pretrained,
                "weights_sha256": loaded.weights_sha256,
                "seed": seed,
                "embed_dim": loaded.embed_dim,
                "logit_scale": loaded.logit_scale,
            },
            "preprocess": cfg.to_dict(),
            "precision": precision,
            "opset": opset_of(final),
            "max_batch": int(max_batch),
            "opt_batch": opt_batch,
            "image_encoder": {
                "file": N.IMAGE_ONNX_FILE,
                "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
                **io,
                **extra,
            },
            "text_encoder": text_entry,
            "class_features": class_entry,
            "golden": {
                "file": N.GOLDEN_FILE,
                "count": int(len(gi)),
                "real": golden_real,
                "random": golden_random,
                "bound": parity.bound_for(precision).min_cosine,
            },
            "parity": rep,
            "tensorrt": None,
            "versions": tool_versions(),
            "files": {},
        }
        shutil.rmtree(work)

        result = ExportResult(out=Path(out).expanduser().absolute(), manifest=manifest)
        if trt:
            _tensorrt_step(
                stage,
                result,
                manifest,
                precision,
                (h, w),
                max_batch,
                opt_batch,
                real,
                rand,
                ref_real,
                ref_rand,
                zs_features,
                say,
            )
        say("writing manifest")
        result.manifest = write_manifest(stage, manifest)
    return result


def _export_text(
    loaded: Any,
    stage: Path,
    names: list[str],
    opset: int,
    export_text_encoder: Callable,
    model_io: Callable,
) -> dict[str, Any]:
    """Text tower to ONNX (fp32), checked against PyTorch on the class prompts."""
    import torch

    from fedclip_edge import PROMPT_TEMPLATE
    from fedclip_edge.exporters.ort_utils import make_session, run_batches

    tokens = loaded.tokenizer([PROMPT_TEMPLATE.format(n) for n in names])
    path = stage / N.TEXT_ONNX_FILE
    export_text_encoder(loaded.model, tokens, path, opset=opset)
    with torch.no_grad():
        ref = loaded.model.encode_text(tokens).float().numpy()
    got = run_batches(make_session(path), N.TEXT_INPUT, [tokens.numpy().astype(np.int64)])[0]
    rep = parity.report({"prompts": (ref, got)}, None, "fp32", "onnxruntime CPUExecutionProvider")
    parity.require(rep, "the text encoder export")
    return {
        "file": N.TEXT_ONNX_FILE,
        "precision": "fp32",
        **model_io(path),
        "context_length": int(tokens.shape[1]),
        "tokenizer": f"open_clip.get_tokenizer({loaded.name!r})",
        "prompt_template": PROMPT_TEMPLATE,
        "parity": {"min_cosine": rep["min_cosine"], "count": len(names)},
    }


def _tensorrt_step(
    stage: Path,
    result: ExportResult,
    manifest: dict[str, Any],
    precision: str,
    size: tuple[int, int],
    max_batch: int,
    opt_batch: int,
    real: np.ndarray,
    rand: np.ndarray,
    ref_real: np.ndarray,
    ref_rand: np.ndarray,
    zs_features: np.ndarray,
    say: Progress,
) -> None:
    """Build the engine where TensorRT imports; otherwise record the trtexec command lines."""
    from fedclip_edge.exporters.tensorrt_build import (
        build_engine,
        fp32_layer_names,
        import_tensorrt,
        trtexec_commands,
    )

    trt_mod, why = import_tensorrt()
    if trt_mod is None:
        cmds = trtexec_commands(
            result.out / N.IMAGE_ONNX_FILE,
            result.out / N.ENGINE_FILE,
            input_name=N.IMAGE_INPUT,
            image_size=size,
            max_batch=max_batch,
            opt_batch=opt_batch,
            precision=precision,
            fp32_layers=fp32_layer_names(stage / N.IMAGE_ONNX_FILE),
        )
        manifest["tensorrt"] = {
            "status": "not built",
            "reason": f"tensorrt not importable: {why}",
            "trtexec": cmds,
        }
        result.trtexec = cmds
        result.notes.append(
            "TensorRT is not importable here, so no engine was built. On the device, run the "
            "trtexec command for its TensorRT version, then adopt the engine with "
            "fedclip_edge.exporters.tensorrt_build.adopt_engine(ARTIFACT_DIR, ENGINE_FILE) "
            "(or run this export there with --trt)."
        )
        return
    say(
        f"building the TensorRT {trt_mod.__version__} engine "
        f"(batch 1..{max_batch}, opt {opt_batch})"
    )
    record = build_engine(
        stage / N.IMAGE_ONNX_FILE,
        stage / N.ENGINE_FILE,
        input_name=N.IMAGE_INPUT,
        output_name=N.IMAGE_OUTPUT,
        image_size=size,
        max_batch=max_batch,
        opt_batch=opt_batch,
        precision=precision,
        timing_cache_path=stage / N.TIMING_CACHE_FILE,
        log_path=stage / N.TRT_LOG_FILE,
    )
    manifest["tensorrt"] = record
    from fedclip_edge.exporters.runtimes import TensorRTExtractor

    say("measuring the engine's parity on this GPU")
    ext = TensorRTExtractor(stage, manifest)
    got_real, got_rand = ext.extract(real), ext.extract(rand)
    rep = parity.report(
        {"real": (ref_real, got_real), "random": (ref_rand, got_rand)},
        zs_features,
        precision,
        measured_on=ext.name,
    )
    parity.require(rep, f"the {precision} TensorRT engine")
    record["parity"] = rep
    ext.close()
