"""What both the model loader and the offline model's builder need: open_clip with the
project's configs registered, and the folder where built models are cached.

Kept apart so that `load.py` (which may build the offline model) and `tiny.py` (which builds it
with open_clip) do not import each other.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_CONFIG_DIR = Path(__file__).parent / "configs"
_registered = False


def _open_clip() -> Any:
    """Import open_clip once and register the project's own model configs with it."""
    global _registered
    import open_clip

    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True
    return open_clip


def cache_dir() -> Path:
    """Where the project keeps models it builds: $FEDCLIP_EDGE_CACHE or ~/.cache/fedclip-edge."""
    env = os.environ.get("FEDCLIP_EDGE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedclip-edge"


