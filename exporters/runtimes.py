"""One extractor interface over several backends, opened from an exported artifact.

`open_extractor(artifacts_dir, backend=..., device=...)` reads the manifest, checks every file's
sha256, builds the backend, and runs the artifact's golden set through it: features that miss
the precision's cosine bound against the PyTorch fp32 features recorded at export make it refuse
to load. That is the check that catches, on the device itself, an fp16 TensorRT engine that
overflows on real hardware, before the agent trains on its features.

Backends (`backend` or `backend:device`):
- `torch` (cpu or cuda; fp16 autocast on cuda): rebuilds the model named in the manifest and
  refuses weights whose sha256 differs from the export's;
- `onnxruntime` (cpu, cuda, tensorrt = the CPU, CUDA or TensorRT execution provider; the
  TensorRT provider caches its engines under the fedclip-edge cache directory);
- `tensorrt`: the native engine in the artifact (TensorRT 10/11 tensor-address API, a CUDA
  stream; buffers through torch's CUDA allocator).
`auto` takes the fastest that works here, in the order of `AUTO_ORDER`, and says which it took.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedclip_edge.errors import ExportError, FedClipError
from fedclip_edge.exporters import parity
from fedclip_edge.exporters.manifest import read_manifest, verify_artifact
from fedclip_edge.exporters.names import CLASS_FEATURES_FILE, FUSED_KIND
from fedclip_edge.exporters.preprocess import PreprocessConfig, preprocess_images

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ORT_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# Fastest first. GPU entries are tried only when a GPU is usable.
AUTO_ORDER = (
    ("tensorrt", "cuda"),
    ("onnxruntime", "tensorrt"),
    ("onnxruntime", "cuda"),
    ("torch", "cuda"),
    ("onnxruntime", "cpu"),
    ("torch", "cpu"),
)


@runtime_checkable
class Extractor(Protocol):
    """What the agent needs: a name to log, and preprocessed images -> raw features."""

    name: str

    def extract(self, batch: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] float32 (preprocessed) -> [N, D] float32 raw image features."""
        ...


class BaseExtractor:
    """Shared checks, chunking to the artifact's max batch, and image preprocessing."""

    backend = "base"

    def __init__(self, root: Path, manifest: dict[str, Any], device: str) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.device = device
        self.precision: str = manifest["precision"]
        self.preprocess = PreprocessConfig.from_dict(manifest["preprocess"])
        self.max_batch = int(manifest["max_batch"])
        self.embed_dim = int(manifest["model"]["embed_dim"])
        self.parity: dict[str, Any] | None = None
        self.picked: str | None = None  # set by auto: why this backend
        self.detail = ""

    @property
    def label(self) -> str:
        """Backend and where it runs, e.g. `onnxruntime[CPU]`, `torch[cuda autocast fp16]`."""
        return f"{self.backend}[{self.detail or self.device}]"

    @property
    def name(self) -> str:
        return f"{self.label} {self.precision}"

    @property
    def parity_precision(self) -> str:
        """Which bound this backend must meet (autocast makes torch on CUDA an fp16 backend)."""
        return self.precision

    def _run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def extract(self, batch: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] float32 -> [N, D] float32, in chunks of at most max_batch."""
        x = np.asarray(batch)
        h, w = self.preprocess.size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, h, w):
            raise ExportError(f"{self.name} expects [N, 3, {h}, {w}] images, got {list(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        outs = [self._run(x[i : i + self.max_batch]) for i in range(0, x.shape[0], self.max_batch)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def extract_images(self, images: Iterable[Any]) -> np.ndarray:
        """PIL images -> features, preprocessed as the manifest says."""
        return self.extract(preprocess_images(images, self.preprocess))

    def class_features(self) -> tuple[list[str], np.ndarray] | None:
        """The class names and raw prompt features exported with the model, if any."""
        entry = self.manifest.get("class_features")
        if not entry:
            return None
        with np.load(self.root / entry.get("file", CLASS_FEATURES_FILE)) as data:
            return [str(c) for c in data["classes"]], data["features"].astype(np.float32)

    def close(self) -> None:
        """Release sessions/engines (the objects also go with garbage collection)."""


# --------------------------------------------------------------------------- torch


class TorchExtractor(BaseExtractor):
    """PyTorch eager on the manifest's model; fp16 autocast on CUDA."""

    backend = "torch"

    def __init__(
        self, root: Path, manifest: dict[str, Any], device: str = "cpu", threads: int | None = None
    ) -> None:
        super().__init__(root, manifest, device)
        import torch

        from fedclip_edge.models import load_model

        if device not in ("cpu", "cuda"):
            raise ExportError(f"torch runs on cpu or cuda, not {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ExportError("torch:cuda asked for, but torch sees no CUDA device")
        if threads:
            torch.set_num_threads(int(threads))
        m = manifest["model"]
        loaded = load_model(m["name"], m["pretrained"], device=device, seed=int(m.get("seed", 0)))
        if loaded.weights_sha256 != m["weights_sha256"]:
            raise ExportError(
                f"torch backend: the {m['name']} weights from {m['pretrained']!r} here have "
                f"sha256 {loaded.weights_sha256[:12]}..., the artifact was exported from "
                f"{m['weights_sha256'][:12]}...: not the same model"
            )
        self._torch = torch
        self._model = loaded.model
        self._autocast = device == "cuda"
        self.precision = "fp16" if self._autocast else "fp32"
        self.detail = "cuda autocast fp16" if self._autocast else f"{device} eager"
        self.max_batch = 1 << 16  # eager PyTorch has no profile limit; batches are not split

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        x = torch.from_numpy(batch).to(self.device)
        with torch.no_grad():
            if self._autocast:
                with torch.autocast("cuda", dtype=torch.float16):
                    y = self._model.encode_image(x)
            else:
                y = self._model.encode_image(x)
        return y.float().cpu().numpy()


# --------------------------------------------------------------------------- onnxruntime


def _ort_cache_dir(manifest: dict[str, Any]) -> Path:
    from fedclip_edge.models import cache_dir

    sha = manifest["files"][manifest["image_encoder"]["file"]]["sha256"][:16]
    path = cache_dir() / "ort-tensorrt" / sha
    path.mkdir(parents=True, exist_ok=True)
    return path


class OnnxRuntimeExtractor(BaseExtractor):
    """ONNX Runtime on the CPU, CUDA or TensorRT execution provider."""

    backend = "onnxruntime"

    def __init__(
        self, root: Path, manifest: dict[str, Any], device: str = "cpu", threads: int | None = None
    ) -> None:
        super().__init__(root, manifest, device)
        import onnxruntime as ort

        from fedclip_edge.exporters.ort_utils import disabled_optimizers_for, make_session

        if device not in ORT_PROVIDERS:
            raise ExportError(
                f"onnxruntime device must be one of {sorted(ORT_PROVIDERS)}, not {device!r}"
            )
        want = ORT_PROVIDERS[device]
        available = ort.get_available_providers()
        if want not in available:
            raise ExportError(
                f"this onnxruntime has no {want} (available: {', '.join(available)}); "
                "GPU providers need the onnxruntime-gpu build (never installed beside onnxruntime)"
            )
        enc = manifest["image_encoder"]
        self.input_name = enc["inputs"][0]["name"]
        self.path = self.root / enc["file"]
        providers: list[Any] = []
        if device == "tensorrt":
            h, w = self.preprocess.size
            cache = str(_ort_cache_dir(manifest))
            opt = int(manifest.get("opt_batch", min(8, self.max_batch)))
            providers.append(
                (
                    want,
                    {
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": cache,
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": cache,
                        "trt_fp16_enable": self.precision == "fp16",
                        "trt_profile_min_shapes": f"{self.input_name}:1x3x{h}x{w}",
                        "trt_profile_opt_shapes": f"{self.input_name}:{opt}x3x{h}x{w}",
                        "trt_profile_max_shapes": f"{self.input_name}:{self.max_batch}x3x{h}x{w}",
                    },
                )
            )
        if device in ("tensorrt", "cuda"):
            providers.append("CUDAExecutionProvider")
        providers.append("CPUExecutionProvider")
        names = [p[0] if isinstance(p, tuple) else p for p in providers]
        self._disabled = disabled_optimizers_for(self.precision, names)
        self._providers = providers
        self._threads = threads
        if self.precision == "fp16" and want == "CPUExecutionProvider":
            # fp16 graphs have crashed this provider outright: load it in a child process first,
            # so a crash becomes an ExportError naming the signal instead of a dead agent.
            h, w = self.preprocess.size
            self.isolated_run([np.zeros((1, 3, h, w), dtype=np.float32)])
        self.session = make_session(
            self.path, providers, disabled_optimizers=self._disabled, threads=threads
        )
        got = self.session.get_providers()
        if not got or got[0] != want:
            raise ExportError(
                f"onnxruntime could not start {want} (it fell back to {got}): "
                "check the GPU libraries"
            )
        self.detail = want.replace("ExecutionProvider", "")

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: batch})[0])

    def isolated_run(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The same model and settings in a child process (for checks that might crash)."""
        from fedclip_edge.exporters.ort_utils import run_isolated

        names = [p[0] if isinstance(p, tuple) else p for p in self._providers]
        return run_isolated(
            self.path, self.input_name, batches, providers=names, disabled_optimizers=self._disabled
        )


# --------------------------------------------------------------------------- tensorrt


class TensorRTExtractor(BaseExtractor):
    """The artifact's native TensorRT engine (refused if built elsewhere)."""

    backend = "tensorrt"

    def __init__(self, root: Path, manifest: dict[str, Any], device: str = "cuda") -> None:
        super().__init__(root, manifest, "cuda")
        from fedclip_edge.exporters.tensorrt_build import (
            check_engine_compat,
            gpu_info,
            import_tensorrt,
            read_engine,
        )

        record = manifest.get("tensorrt") or {}
        if not record.get("file"):
            raise ExportError(
                f"{root} has no TensorRT engine: export with --trt on the device "
                "(or use backend onnxruntime)"
            )
        trt, why = import_tensorrt()
        if trt is None:
            raise ExportError(f"TensorRT is not importable here ({why})")
        try:
            import torch
        except ImportError as exc:
            raise ExportError(
                "the tensorrt backend uses torch's CUDA allocator: install torch"
            ) from exc
        if not torch.cuda.is_available():
            raise ExportError("the tensorrt backend needs a CUDA device, and torch sees none")
        header, plan = read_engine(self.root / record["file"])
        check_engine_compat(header, str(trt.__version__), gpu_info())
        self._torch = torch
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ExportError(f"TensorRT could not deserialize {record['file']}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ExportError("TensorRT could not create an execution context (out of GPU memory?)")
        self._in, self._out = header["input"], header["output"]
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if self._in not in names or self._out not in names:
            raise ExportError(f"engine tensors are {names}, the header says {self._in}/{self._out}")

        def torch_dtype(name: str) -> Any:
            np_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            return torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype

        self._in_dtype, self._out_dtype = torch_dtype(self._in), torch_dtype(self._out)
        self.max_batch = min(self.max_batch, int(header["profile"]["max"][0]))
        self.precision = header.get("precision", self.precision)
        self._stream = torch.cuda.Stream()
        self.detail = f"TensorRT {trt.__version__}, {header.get('gpu_name', 'GPU')}"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.cuda.stream(self._stream):
            x = torch.from_numpy(batch).to("cuda", dtype=self._in_dtype).contiguous()
            if not self._context.set_input_shape(self._in, tuple(x.shape)):
                raise ExportError(f"engine refused input shape {tuple(x.shape)}")
            shape = tuple(self._context.get_tensor_shape(self._out))
            y = torch.empty(shape, dtype=self._out_dtype, device="cuda")
            self._context.set_tensor_address(self._in, x.data_ptr())
            self._context.set_tensor_address(self._out, y.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise ExportError("TensorRT execute_async_v3 failed")
            out = y.float().cpu()
        self._stream.synchronize()
        return out.numpy()


# --------------------------------------------------------------------------- opening


def parse_backend(spec: str, device: str = "auto") -> tuple[str, str]:
    """'onnxruntime:cuda' -> ('onnxruntime', 'cuda'); a device in the spec wins over `device`."""
    backend, _, dev = spec.partition(":")
    backend = backend.strip().lower()
    if backend == "ort":
        backend = "onnxruntime"
    if backend == "trt":
        backend = "tensorrt"
    if backend not in BACKENDS + ("auto",):
        raise ExportError(f"unknown backend {spec!r}: use one of auto, {', '.join(BACKENDS)}")
    return backend, (dev or device).strip().lower()


def _construct(
    backend: str, device: str, root: Path, manifest: dict[str, Any], threads: int | None
) -> BaseExtractor:
    if backend == "torch":
        return TorchExtractor(root, manifest, "cpu" if device == "auto" else device, threads)
    if backend == "onnxruntime":
        return OnnxRuntimeExtractor(root, manifest, "cpu" if device == "auto" else device, threads)
    return TensorRTExtractor(root, manifest)


def check_golden(extractor: BaseExtractor) -> dict[str, Any]:
    """Run the artifact's golden set; ExportError with the numbers if it misses the bound."""
    golden = extractor.manifest["golden"]
    with np.load(extractor.root / golden["file"]) as data:
        inputs, reference = data["inputs"], data["features"]
    got = extractor.extract(inputs)
    cf = extractor.class_features()
    rep = parity.report(
        {"golden": (reference, got)},
        cf[1] if cf else None,
        extractor.parity_precision,
        measured_on=extractor.name,
    )
    # On load only the cosine gates: a handful of images is too few for an agreement rate.
    bound = parity.bound_for(extractor.parity_precision)
    rep["status"] = "passed" if rep["min_cosine"] >= bound.min_cosine else "failed"
    extractor.parity = rep
    if rep["status"] != "passed":
        raise ExportError(
            f"{extractor.name} misses the golden-set parity bound on this device: min cosine "
            f"{rep['min_cosine']:.6f} < {bound.min_cosine} against the PyTorch fp32 features "
            "recorded at export; refusing to extract features with it"
        )
    return rep


def _gpu_usable() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def open_extractor(
    artifacts_dir: str | Path,
    backend: str = "auto",
    device: str = "auto",
    *,
    check_parity: bool = True,
    threads: int | None = None,
) -> BaseExtractor:
    """Verify the artifact, open a backend on it, and check its golden set on this device.

    `backend`: auto | torch | onnxruntime | tensorrt, optionally with ':device'.
    `device`: auto | cpu | cuda (onnxruntime also takes tensorrt, its TensorRT provider).
    """
    root = Path(artifacts_dir)
    manifest = read_manifest(root)
    if manifest.get("kind") == FUSED_KIND:
        raise ExportError(
            f"{root} is a fused classifier (image -> class probabilities), not an image encoder: "
            "open it with fedclip_edge.serving.classifier.open_classifier"
        )
    manifest = verify_artifact(root, manifest)
    backend, device = parse_backend(backend, device)

    if backend != "auto":
        ext = _construct(backend, device, root, manifest, threads)
        if check_parity:
            check_golden(ext)
        return ext

    gpu = device in ("cuda", "tensorrt") or (device == "auto" and _gpu_usable())
    tried: list[str] = []
    for b, d in AUTO_ORDER:
        if d == "cpu" and device in ("cuda", "tensorrt"):
            continue
        if d != "cpu" and not gpu:
            continue
        if b == "tensorrt" and not (manifest.get("tensorrt") or {}).get("file"):
            continue
        if manifest["precision"] == "int8" and d != "cpu":
            continue  # int8 (dynamic quantization) is for CPU providers
        try:
            ext = _construct(b, d, root, manifest, threads)
        except FedClipError as exc:  # ExportError, or ModelError from the torch backend
            tried.append(f"{b}:{d} ({exc})")
            continue
        if check_parity:
            check_golden(ext)
        ext.picked = f"auto picked {ext.name}" + (f"; skipped {'; '.join(tried)}" if tried else "")
        log.info(ext.picked)
        return ext
    raise ExportError("no backend could open this artifact here: " + "; ".join(tried))
