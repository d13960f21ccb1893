"""Fixtures several test files share (helpers that are not fixtures live in tests/support).

Why session scope: loading fedclip-tiny and exporting it take seconds each on a shared CPU; the
export and runtime tests (and the extractor benchmark's) read the same model and artifacts and
never modify them (a test that tampers with an artifact works on a copy: `copy_artifact`).

torch's CPU thread count is process state that CLIs run in-process set (`agent --threads`):
every test gets it back as it found it, so no later test computes with another count (float
sums split over another number of threads round differently: the goldens saw it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.export import MODEL, exported


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Any:
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny() -> Any:
    """The export tests' small model (random init, no download): the reference the exported
    graphs are compared against."""
    from fedclip_edge.models import load_model

    return load_model(MODEL, "none")


@pytest.fixture(scope="session")
def exported_artifact(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`exported_artifact("fp16")`: the path of that precision's artifact, exported on first
    use in this session. Read-only: tamper with a `copy_artifact` copy."""
    return lambda precision: exported(tmp_path_factory, precision)
