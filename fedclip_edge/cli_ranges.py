"""Ranges of the command line's numbers, checked when the line is parsed (typer's min/max), so a
number out of range is one `error:` line before anything runs, never a traceback deep inside.

Spread into an option: `typer.Option(help=..., **R.ROUNDS)`. Where the protocol has a limit
(rounds, widths, seconds, message bytes), the range is the protocol's own, so a value the
command line accepts is one every receiver accepts too.
"""

from __future__ import annotations

from typing import Any

from fedclip_edge.broker.protocol import MAX_DIM, MAX_MESSAGE_BYTES, MAX_ROUND, MAX_SECONDS

ROUNDS: dict[str, Any] = {"min": 1, "max": MAX_ROUND}
# numpy's legacy RandomState takes seeds below 2**32; torch.manual_seed more
SEED: dict[str, Any] = {"min": 0, "max": 2**32 - 1}
EPOCHS: dict[str, Any] = {"min": 1, "max": 1_000}  # what a device accepts (config.py)
EPOCHS0: dict[str, Any] = {"min": 0, "max": 1_000}  # optional extra epochs: 0 means none
BATCH: dict[str, Any] = {"min": 1, "max": 65_536}
CLIENTS: dict[str, Any] = {"min": 1, "max": 1_000_000}
COUNT: dict[str, Any] = {"min": 1, "max": 1_000_000}  # images per class, repeats, windows
COUNT0: dict[str, Any] = {"min": 0, "max": 1_000_000}
DIM: dict[str, Any] = {"min": 1, "max": MAX_DIM}
IMAGE_SIDE: dict[str, Any] = {"min": 8, "max": 4096}
# below 4 KiB a chunk is mostly its own envelope header (512 bytes)
PAYLOAD: dict[str, Any] = {"min": 4096, "max": MAX_MESSAGE_BYTES}
SECONDS: dict[str, Any] = {"min": 0.001, "max": MAX_SECONDS}  # a wait that must be positive
SECONDS0: dict[str, Any] = {"min": 0.0, "max": MAX_SECONDS}
LR: dict[str, Any] = {"min": 0.0, "max": 10.0}
WEIGHT_DECAY: dict[str, Any] = {"min": 0.0, "max": 10.0}
TRIM: dict[str, Any] = {"min": 0.0, "max": 0.5}  # the strategy refuses 0.5 itself (nothing left)
FRACTION: dict[str, Any] = {"min": 1e-9, "max": 1.0}  # topk: (0, 1]
RETRIES: dict[str, Any] = {"min": 0, "max": 1000}
THREADS: dict[str, Any] = {"min": 0, "max": 1024}  # 0: the library's default
RATE: dict[str, Any] = {"min": 0.0, "max": 1e9}  # messages per second, 0: as fast as possible
GB: dict[str, Any] = {"min": 0.0, "max": 1e6}
MB: dict[str, Any] = {"min": 1.0, "max": MAX_MESSAGE_BYTES / 2**20 * 64}
OPSET: dict[str, Any] = {"min": 7, "max": 30}
