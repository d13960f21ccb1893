"""Open a fused classifier artifact: one session, image batch -> (logits, probs), golden-checked.

Backends: `onnxruntime` (cpu, cuda, tensorrt providers; as in runtimes.py, a provider that is
missing or silently falls back to CPU is an error, and fp16 on the CPU provider is tried in a
child process first) and `tensorrt` (the artifact's `classifier.engine`, built by `--trt`).
`auto` takes the first that opens, GPU first when one is usable; int8 only on CPU.
On open the golden set runs through the backend: every golden input (picked at export for a
clear top-1 margin) must keep its top-1 class and its probabilities within the manifest's bound,
or the classifier refuses to load.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedclip_edge.errors import ExportError, FedClipError
from fedclip_edge.exporters import names as N
from fedclip_edge.exporters.manifest import read_manifest, verify_artifact
from fedclip_edge.exporters.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

AUTO_ORDER = (
    ("tensorrt", "cuda"),
    ("onnxruntime", "tensorrt"),
    ("onnxruntime", "cuda"),
    ("onnxruntime", "cpu"),
)


class FusedModel:
    """A fused classifier on one backend: `run(batch) -> (logits, probs)`, chunked."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.classes: list[str] = list(manifest["classes"])
        self.precision: str = manifest["precision"]
        self.preprocess = PreprocessConfig.from_dict(manifest["preprocess"])
        self.max_batch = int(manifest["max_batch"])
        self.version: str = str(manifest["model_version"].get("name") or self.root.name)
        self.parity: dict[str, Any] | None = None
        self.picked: str | None = None
        self.backend = "base"
        self.detail = ""

    @property
    def name(self) -> str:
        return f"{self.backend}[{self.detail}] {self.precision} fused"

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[N, 3, H, W] float32 -> (logits [N, C], probs [N, C])."""
        x = np.asarray(batch)
        h, w = self.preprocess.size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, h, w):
            raise ExportError(f"{self.name} expects [N, 3, {h}, {w}] images, got {list(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        c = len(self.classes)
        if not len(x):
            return np.zeros((0, c), np.float32), np.zeros((0, c), np.float32)
        parts = [self._run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)]
        return (
            np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False),
            np.concatenate([p[1] for p in parts]).astype(np.float32, copy=False),
        )

    def close(self) -> None:
        """Sessions go with garbage collection; engines release their context here."""


class OrtFused(FusedModel):
    """ONNX Runtime on the CPU, CUDA or TensorRT execution provider."""

    def __init__(
        self, root: Path, manifest: dict[str, Any], device: str, threads: int | None = None
    ) -> None:
        super().__init__(root, manifest)
        import onnxruntime as ort

        from fedclip_edge.exporters.ort_utils import (
            disabled_optimizers_for,
            make_session,
            run_isolated,
        )
        from fedclip_edge.exporters.runtimes import ORT_PROVIDERS

        if device not in ORT_PROVIDERS:
            raise ExportError(f"onnxruntime device must be one of {sorted(ORT_PROVIDERS)}")
        want = ORT_PROVIDERS[device]
        if want not in ort.get_available_providers():
            raise ExportError(f"this onnxruntime has no {want}")
        self.backend = "onnxruntime"
        path = self.root / manifest["classifier"]["file"]
        providers: list[Any] = []
        if device == "tensorrt":
            h, w = self.preprocess.size
            opt = int(manifest.get("opt_batch", min(8, self.max_batch)))
            shape = f"{N.IMAGE_INPUT}:{{}}x3x{h}x{w}"
            providers.append((want, {
                "trt_fp16_enable": self.precision == "fp16",
                "trt_profile_min_shapes": shape.format(1),
                "trt_profile_opt_shapes": shape.format(opt),
                "trt_profile_max_shapes": shape.format(self.max_batch),
            }))
        if device in ("tensorrt", "cuda"):
            providers.append("CUDAExecutionProvider")
        providers.append("CPUExecutionProvider")
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        disabled = disabled_optimizers_for(self.precision, names)
        if self.precision == "fp16" and want == "CPUExecutionProvider":
            h, w = self.preprocess.size  # a crash here becomes an ExportError, not a dead process
            run_isolated(path, N.IMAGE_INPUT, [np.zeros((1, 3, h, w), np.float32)],
                         providers=names, disabled_optimizers=disabled)
        self.session = make_session(path, providers, disabled_optimizers=disabled,
                                    threads=threads)
        got = self.session.get_providers()
        if not got or got[0] != want:
            raise ExportError(f"onnxruntime could not start {want} (it fell back to {got})")
        self.detail = want.replace("ExecutionProvider", "")
        self._outputs = [N.LOGITS_OUTPUT, N.PROBS_OUTPUT]

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, probs = self.session.run(self._outputs, {N.IMAGE_INPUT: batch})
        return np.asarray(logits), np.asarray(probs)


class TensorRTFused(FusedModel):
    """The artifact's native engine; every I/O tensor bound (the graph has two outputs)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        super().__init__(root, manifest)
        from fedclip_edge.exporters.tensorrt_build import (
            check_engine_compat,
            gpu_info,
            import_tensorrt,
            read_engine,
        )

        record = manifest.get("tensorrt") or {}
        if not record.get("file"):
            raise ExportError(f"{root} has no TensorRT engine (export with --adapter ... --trt)")
        trt, why = import_tensorrt()
        if trt is None:
            raise ExportError(f"TensorRT is not importable here ({why})")
        import torch

        if not torch.cuda.is_available():
            raise ExportError("the tensorrt backend needs a CUDA device, and torch sees none")
        header, plan = read_engine(self.root / record["file"])
        check_engine_compat(header, str(trt.__version__), gpu_info())
        self._torch, self._trt = torch, trt
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ExportError(f"TensorRT could not deserialize {record['file']}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ExportError("TensorRT could not create an execution context")
        io = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        for name in (N.IMAGE_INPUT, N.LOGITS_OUTPUT, N.PROBS_OUTPUT):
            if name not in io:
                raise ExportError(f"engine tensors are {io}, {name!r} missing")
        self.max_batch = min(self.max_batch, int(header["profile"]["max"][0]))
        self._stream = torch.cuda.Stream()
        self.backend, self.detail = "tensorrt", f"TensorRT {trt.__version__}"

    def _dtype(self, name: str) -> Any:
        np_dtype = np.dtype(self._trt.nptype(self._engine.get_tensor_dtype(name)))
        return self._torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.cuda.stream(self._stream):
            x = torch.from_numpy(batch).to("cuda", dtype=self._dtype(N.IMAGE_INPUT)).contiguous()
            if not self._context.set_input_shape(N.IMAGE_INPUT, tuple(x.shape)):
                raise ExportError(f"engine refused input shape {tuple(x.shape)}")
            self._context.set_tensor_address(N.IMAGE_INPUT, x.data_ptr())
            outs = {}
            for name in (N.LOGITS_OUTPUT, N.PROBS_OUTPUT):
                shape = tuple(self._context.get_tensor_shape(name))
                outs[name] = torch.empty(shape, dtype=self._dtype(name), device="cuda")
                self._context.set_tensor_address(name, outs[name].data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise ExportError("TensorRT execute_async_v3 failed")
            got = [outs[n].float().cpu() for n in (N.LOGITS_OUTPUT, N.PROBS_OUTPUT)]
        self._stream.synchronize()
        return got[0].numpy(), got[1].numpy()


def check_golden(model: FusedModel) -> dict[str, Any]:
    """Run the golden set: same top-1 everywhere and probabilities within the bound, or refuse."""
    golden = model.manifest["golden"]
    with np.load(model.root / golden["file"]) as data:
        inputs, ref_probs = data["inputs"], data["probs"]
    _, probs = model.run(inputs)
    finite = bool(np.all(np.isfinite(probs)))
    agree = float(np.mean(probs.argmax(1) == ref_probs.argmax(1))) if finite else 0.0
    diff = float(np.abs(probs - ref_probs).max()) if finite else float("inf")
    bound = float(golden.get("max_abs_prob_diff", 1e-4))
    ok = agree >= float(golden.get("required_top1_agreement", 1.0)) and diff <= bound
    model.parity = {"status": "passed" if ok else "failed", "top1_agreement": agree,
                    "max_abs_prob_diff": diff, "bound": bound, "count": int(len(inputs)),
                    "measured_on": model.name}
    if not ok:
        raise ExportError(
            f"{model.name} misses the golden-set check on this device: top-1 agreement "
            f"{100 * agree:.0f}% (needs 100%), max probability difference {diff:.2e} (bound "
            f"{bound:g}) against the torch composition recorded at export; refusing to classify"
        )
    return model.parity


def _gpu_usable() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _construct(backend: str, device: str, root: Path, manifest: dict[str, Any],
               threads: int | None) -> FusedModel:
    if backend == "onnxruntime":
        return OrtFused(root, manifest, "cpu" if device == "auto" else device, threads)
    if backend == "tensorrt":
        return TensorRTFused(root, manifest)
    raise ExportError(f"a fused classifier runs on onnxruntime or tensorrt, not {backend!r}")


def open_fused(
    root: str | Path, backend: str = "auto", *, check: bool = True, threads: int | None = None
) -> FusedModel:
    """Verify the fused artifact's files, open a backend on it, and check its golden set."""
    from fedclip_edge.exporters.runtimes import parse_backend

    root = Path(root)
    manifest = read_manifest(root)
    if manifest.get("kind") != N.FUSED_KIND:
        raise ExportError(f"{root} is not a fused classifier (export one with --adapter)")
    manifest = verify_artifact(root, manifest)
    backend, device = parse_backend(backend)
    if backend != "auto":
        model = _construct(backend, device, root, manifest, threads)
        if check:
            check_golden(model)
        return model
    gpu = _gpu_usable()
    tried: list[str] = []
    for b, d in AUTO_ORDER:
        if (d != "cpu" and not gpu) or (manifest["precision"] == "int8" and d != "cpu"):
            continue
        if b == "tensorrt" and not (manifest.get("tensorrt") or {}).get("file"):
            continue
        try:
            model = _construct(b, d, root, manifest, threads)
        except (FedClipError, ImportError) as exc:
            tried.append(f"{b}:{d} ({exc})")
            continue
        if check:
            check_golden(model)
        model.picked = f"auto picked {model.name}" + (f"; skipped {'; '.join(tried)}"
                                                       if tried else "")
        log.info(model.picked)
        return model
    raise ExportError("no backend could open this fused classifier here: " + "; ".join(tried))


def tensorrt_step(
    stage: Path,
    result: Any,
    manifest: dict[str, Any],
    sets: dict[str, tuple[np.ndarray, np.ndarray]],
    ref_logits: dict[str, np.ndarray],
    say: Any,
) -> None:
    """`--trt`: build the engine from the fused graph (or record the trtexec commands)."""
    from fedclip_edge.exporters.tensorrt_build import (
        build_engine,
        fp32_layer_names,
        import_tensorrt,
        trtexec_commands,
    )

    precision = manifest["precision"]
    h, w = manifest["preprocess"]["size"]
    mb, opt = int(manifest["max_batch"]), int(manifest["opt_batch"])
    onnx_path = stage / N.FUSED_ONNX_FILE
    trt_mod, why = import_tensorrt()
    if trt_mod is None:
        cmds = trtexec_commands(
            result.out / N.FUSED_ONNX_FILE, result.out / N.FUSED_ENGINE_FILE,
            input_name=N.IMAGE_INPUT, image_size=(h, w), max_batch=mb, opt_batch=opt,
            precision=precision, fp32_layers=fp32_layer_names(onnx_path),
        )
        manifest["tensorrt"] = {"status": "not built", "reason": f"tensorrt not importable: "
                                f"{why}", "trtexec": cmds}
        result.trtexec = cmds
        result.notes.append("TensorRT is not importable here, so no engine was built: run the "
                            "trtexec command on the device, or this export there with --trt.")
        return
    say(f"building the TensorRT {trt_mod.__version__} engine from the fused graph")
    record = build_engine(
        onnx_path, stage / N.FUSED_ENGINE_FILE, input_name=N.IMAGE_INPUT,
        output_name=N.PROBS_OUTPUT, image_size=(h, w), max_batch=mb, opt_batch=opt,
        precision=precision, timing_cache_path=stage / N.TIMING_CACHE_FILE,
        log_path=stage / N.TRT_LOG_FILE,
    )
    manifest["tensorrt"] = record
    say("measuring the engine's parity on this GPU")
    engine = TensorRTFused(stage, manifest)
    got = {k: engine.run(x)[0] for k, (x, _) in sets.items()}
    engine.close()
    from fedclip_edge.exporters.fused_parity import FUSED_AGREEMENT, fused_parity

    rep = fused_parity(ref_logits, got, precision, engine.name)
    if rep["status"] != "passed":
        raise ExportError(f"the {precision} TensorRT engine of the fused classifier misses its "
                          f"bound: top-1 agreement {100 * rep['top1_agreement']:.1f}% (bound "
                          f"{100 * FUSED_AGREEMENT[precision]:.0f}%)")
    record["parity"] = rep


def describe_backends(manifest: dict[str, Any]) -> Sequence[str]:
    """The backend specs worth trying here (doctor checks each)."""
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except Exception:
        providers = []
    specs = []
    for device, provider in (("cpu", "CPUExecutionProvider"), ("cuda", "CUDAExecutionProvider"),
                             ("tensorrt", "TensorrtExecutionProvider")):
        if provider in providers and (device == "cpu" or manifest.get("precision") != "int8"):
            specs.append(f"onnxruntime:{device}")
    if (manifest.get("tensorrt") or {}).get("file"):
        specs.append("tensorrt:cuda")
    return specs
