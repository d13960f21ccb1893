"""`fedclip-edge` commands of the serving part (models, classify, serve): typer lives here only.

`fedclip_edge/cli.py` registers each function on the main app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve(
    model: Annotated[
        Path,
        typer.Option(
            "--model", "-m",
            help="A model store (hot swap when its `current` changes), one version folder, or "
            "a fused export (fedclip-edge export --adapter).",
        ),
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8080,
    max_batch: Annotated[
        int, typer.Option(min=1, max=1024, help="Images per model call (micro-batching).")
    ] = 8,
    max_wait_ms: Annotated[
        float,
        typer.Option(min=0, max=10_000, help="How long the first image of a batch waits for "
                     "others (ms); a backlog makes full batches without waiting."),
    ] = 5.0,
    queue_size: Annotated[
        int, typer.Option(min=1, max=100_000, help="Requests that may wait for the model; "
                          "beyond, 503 with Retry-After.")
    ] = 64,
    max_body_mb: Annotated[
        float, typer.Option(min=0.001, max=2048, help="Largest image body (MiB); beyond, 413.")
    ] = 8.0,
    backend: Annotated[
        str, typer.Option(help="auto | onnxruntime | tensorrt | torch (optionally :cpu/:cuda).")
    ] = "auto",
    poll_s: Annotated[
        float, typer.Option(min=0.01, max=3600, help="How often a store's `current` is read.")
    ] = 0.5,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's log level: critical | error | warning | info.")
    ] = "warning",
) -> None:
    """Serve the model over HTTP: POST /classify, GET /healthz, GET /metrics, POST /reload."""
    import logging

    from fedclip_edge.serving.service import connection_limit, create_app, run_server

    logging.getLogger("fedclip_edge.serving").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    app = create_app(
        model,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        max_body_bytes=int(max_body_mb * 2**20),
        backend=backend,
        poll_s=poll_s,
    )
    service = app.state.service
    typer.echo(
        f"serving {service.holder.version} from {model} on http://{host}:{port} "
        f"(max batch {max_batch}, queue {queue_size}"
        + (", watching the store for a new current" if service.holder.store else "")
        + ")",
        err=True,
    )
    run_server(app, host, port, limit_concurrency=connection_limit(queue_size, max_batch),
               log_level=log_level)
