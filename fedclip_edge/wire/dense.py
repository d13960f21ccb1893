"""Dense frames (version 1): fp32 or fp16 tensors as they are, one safetensors entry each.

The header names the job, round, client, dtype and every tensor's name and shape; the payload
is safetensors with the tensors under their own names. `encode_frame` still writes them (older
receivers read nothing else); `fedclip_edge.wire.decode` reads them through `_decode_dense`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import safetensors.torch
import torch

from fedclip_edge import codecs
from fedclip_edge.wire.container import (
    _PREFIX,
    _TENSOR_KEYS,
    DENSE_FORMAT_VERSION,
    Frame,
    FrameRejected,
    _assemble,
    _check_expected,
    _check_meta_args,
    _check_payload_len,
    _is_int,
    _name_diff,
    _typed_header,
)
from fedclip_edge.wire.payload import _DENSE_TAGS, _safetensors_views

SUPPORTED_DTYPES: tuple[str, ...] = ("float32", "float16")
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# safetensors' dtype tag for each frame dtype.
_SAFETENSORS_TAGS = {"float32": "F32", "float16": "F16"}

_HEADER_KEYS = frozenset({"job", "round", "client", "dtype", "tensors", "payload_len"})


def encode_frame(
    tensors: Mapping[str, torch.Tensor],
    *,
    job: str,
    round: int,
    client: str,
    dtype: str = "float32",
) -> bytes:
    """Serialize an update into one frame; the same inputs always give the same bytes.

    Names are sorted and tensors copied to contiguous CPU memory in `dtype` ("float16" halves
    the payload). Refuses what a receiver would refuse, so a bad update fails at its source:
    non-floating or non-finite tensors (also values that overflow float16), an empty update,
    an empty job or client, a negative round.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported frame dtype {dtype!r}: use one of {list(SUPPORTED_DTYPES)}")
    _check_meta_args(job=job, round=round, client=client)
    if not tensors:
        raise ValueError("an update frame needs at least one tensor")

    torch_dtype = _TORCH_DTYPES[dtype]
    prepared: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if not tensor.is_floating_point():
            raise TypeError(f"tensor {name!r} has non-floating dtype {tensor.dtype}")
        # clone(): an owned buffer per tensor, so tied/shared weights serialize too.
        cast = tensor.detach().to(device="cpu", dtype=torch_dtype).contiguous().clone()
        if not bool(torch.isfinite(cast).all()):
            extra = " (or overflows float16)" if dtype == "float16" else ""
            raise FrameRejected("nonfinite", f"tensor {name!r} has NaN or Inf values{extra}")
        prepared[name] = cast

    payload = safetensors.torch.save(prepared)
    header = {
        "job": job,
        "round": round,
        "client": client,
        "dtype": dtype,
        "tensors": [{"name": n, "shape": list(t.shape)} for n, t in prepared.items()],
        "payload_len": len(payload),
    }
    return _assemble(DENSE_FORMAT_VERSION, header, payload)


def _decode_dense(
    body: memoryview, header_len: int, *, expected: Mapping[str, Sequence[int]] | None
) -> Frame:
    """Validate and decode a version-1 frame whose size, prefix and hash were checked: the
    header before the payload, the payload against the header, then against `expected`
    (names and shapes of the model the receiver holds), and values last."""
    header = _parse_header(bytes(body[_PREFIX.size : _PREFIX.size + header_len]))
    dtype: str = header["dtype"]
    declared: dict[str, tuple[int, ...]] = {t["name"]: tuple(t["shape"]) for t in header["tensors"]}

    payload = body[_PREFIX.size + header_len :]
    _check_payload_len(header, payload)

    stored = _safetensors_views(payload, _DENSE_TAGS)  # views of `data`, no copy
    if set(stored) != set(declared):
        raise FrameRejected(
            "header",
            "payload tensors differ from the header's: "
            + _name_diff(expected=declared, got=stored, got_label="in payload only"),
        )

    tag = _SAFETENSORS_TAGS[dtype]
    result: dict[str, torch.Tensor] = {}
    for name in sorted(declared):
        st_tag, array = stored[name]
        if st_tag != tag:
            raise FrameRejected(
                "dtype",
                f"tensor {name!r} is stored as {st_tag}, header says {dtype} ({tag})",
            )
        if array.shape != declared[name]:
            raise FrameRejected(
                "shape",
                f"tensor {name!r} has shape {list(array.shape)} in the payload, "
                f"{list(declared[name])} in the header",
            )
        if array.dtype != np.float32:
            # float16 on the wire: the one copy it needs, through torch in single-threaded
            # chunks (2x numpy's astype; the same values)
            array = codecs.to_fp32(array)
        result[name] = torch.from_numpy(array)

    if expected is not None:
        _check_expected({name: tuple(t.shape) for name, t in result.items()}, expected)

    for name, tensor in result.items():
        # numpy, not torch: on a busy aggregator torch's thread pool made this check ~100x
        # slower (127 ms vs 0.04 ms per adapter, measured by `bench aggregator`)
        if not np.isfinite(tensor.numpy()).all():
            raise FrameRejected("nonfinite", f"tensor {name!r} has NaN or Inf values")

    return Frame(
        job=header["job"],
        round=header["round"],
        client=header["client"],
        dtype=dtype,
        tensors=result,
        codec="fp16" if dtype == "float16" else "fp32",
    )


def _parse_header(raw: bytes) -> dict[str, Any]:
    """Decode and type-check the JSON header; semantic checks (meta, dtype) follow the types."""
    header = _typed_header(raw, _HEADER_KEYS, "dtype")
    if not isinstance(header["tensors"], list) or not header["tensors"]:
        raise FrameRejected("header", "header 'tensors' must be a non-empty list")
    names: set[str] = set()
    for i, entry in enumerate(header["tensors"]):
        if not isinstance(entry, dict) or entry.keys() != _TENSOR_KEYS:
            raise FrameRejected("header", f"header tensor entry {i} must be {{name, shape}}")
        name, shape = entry["name"], entry["shape"]
        if not isinstance(name, str) or not name:
            raise FrameRejected("header", f"header tensor entry {i} has no valid name")
        if name in names:
            raise FrameRejected("header", f"header lists tensor {name!r} twice")
        names.add(name)
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise FrameRejected(
                "header", f"tensor {name!r} shape must be a list of non-negative integers"
            )

    if not header["job"]:
        raise FrameRejected("meta", "frame has an empty job id")
    if not header["client"]:
        raise FrameRejected("meta", "frame has an empty client id")
    if header["round"] < 0:
        raise FrameRejected("meta", f"frame has negative round {header['round']}")
    if header["dtype"] not in SUPPORTED_DTYPES:
        raise FrameRejected(
            "dtype",
            f"frame dtype {header['dtype']!r} is not one of {list(SUPPORTED_DTYPES)}",
        )
    return header
