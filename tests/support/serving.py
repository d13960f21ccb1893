"""What the service's tests share: a model store over the tiny artifact, JPEG bytes, and a real
uvicorn on a free loopback port in a thread of the test process (so a test can hold the model
worker with a hook and make a full queue or a swap moment certain)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def artifact_record(artifact: Path) -> dict:
    """A version manifest's `artifact` field for an exported encoder artifact."""
    m = json.loads((artifact / "manifest.json").read_text())
    return {
        "path": str(Path(artifact).resolve()),
        "manifest_sha256": hashlib.sha256((artifact / "manifest.json").read_bytes()).hexdigest(),
        "model": m["model"]["name"],
        "weights_sha256": m["model"].get("weights_sha256"),
        "precision": m.get("precision", "fp32"),
    }


def add_version(store_root: Path, artifact: Path, classes: list[str], seed: int,
                kind: str = "global", artifact_path: Path | None = None) -> str:
    """A version with a random adapter and random class features (seed: different answers)."""
    import torch

    from fedclip_edge.adapter import AttentionAdapter
    from fedclip_edge.serving.store import ModelStore

    m = json.loads((artifact / "manifest.json").read_text())
    dim = int(m["model"]["embed_dim"])
    torch.manual_seed(seed)
    adapter = AttentionAdapter(dim)
    text = torch.randn(len(classes), dim, generator=torch.Generator().manual_seed(seed + 100))
    rec = artifact_record(artifact)
    if artifact_path is not None:
        rec["path"] = str(artifact_path)
    v = ModelStore(store_root).add(
        adapter.state_dict(),
        text,
        {"kind": kind, "job": "serve-test", "round": seed, "client_id": "dev-1",
         "classes": list(classes), "artifact": rec, "dim": dim, "logit_scale": 100.0,
         "accuracy": {"split": "val", "n": 1, "zero_shot": 0.5, "global": 0.5}},
    )
    return v.name


def jpeg_images(data: Path, n: int = 8) -> list[bytes]:
    """The first n images of the synthetic dataset, re-encoded as JPEG."""
    from PIL import Image

    files = sorted(p for p in Path(data).rglob("*.png"))[:n]
    out = []
    for f in files:
        buf = io.BytesIO()
        Image.open(f).convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    assert len(out) == n, f"{data}: only {len(out)} images"
    return out


def random_jpeg(seed: int, size: int = 96) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
        buf, format="JPEG")
    return buf.getvalue()


@contextmanager
def running(app, host: str = "127.0.0.1", **config) -> Iterator[str]:
    """uvicorn serving `app` on a free port in a thread; yields its base URL; stops it after."""
    import uvicorn

    cfg = uvicorn.Config(app, host=host, port=0, lifespan="on", access_log=False,
                         log_level="warning", **config)
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    for _ in range(2000):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.01)
    assert server.started, "uvicorn did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "uvicorn did not stop"
