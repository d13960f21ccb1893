"""`agent --threads` and `[agent] threads`: torch's CPU threads for local training are a setting,
applied before the agent starts; the default leaves the device's other cores to its other work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedclip_edge.device_agent import agent as agent_mod
from fedclip_edge.device_agent.cli import DEFAULT_AGENT_THREADS


class Started(Exception):
    """Raised by the stand-in for run_agent: the command got as far as starting the agent."""


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Run the real CLI up to run_agent; record torch's thread count at that moment."""
    seen: dict[str, int] = {}

    def fake_run_agent(**kwargs: object) -> None:
        seen["threads"] = torch.get_num_threads()
        raise Started

    monkeypatch.setattr(agent_mod, "run_agent", fake_run_agent)
    before = torch.get_num_threads()
    yield seen
    torch.set_num_threads(before)


ARGS = ["agent", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--client-id", "dev-1",
        "--data", "d", "--artifacts", "a", "--insecure-unsigned"]


def run(argv: list[str]) -> None:
    from fedclip_edge.cli import main

    with pytest.raises(Started):
        main(argv)


def test_default_is_one_thread(started: dict[str, int]) -> None:
    torch.set_num_threads(2)
    run(ARGS)
    assert DEFAULT_AGENT_THREADS == 1 and started["threads"] == 1


def test_flag_sets_torch_threads(started: dict[str, int]) -> None:
    run([*ARGS, "--threads", "3"])
    assert started["threads"] == 3


def test_job_file_sets_threads_and_the_flag_wins(tmp_path: Path, started: dict[str, int]) -> None:
    cfg = tmp_path / "job.toml"
    cfg.write_text("[agent]\nthreads = 2\n")
    run([*ARGS, "--config", str(cfg)])
    assert started["threads"] == 2
    run([*ARGS, "--config", str(cfg), "--threads", "1"])
    assert started["threads"] == 1


def test_zero_threads_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from fedclip_edge.cli import main

    assert main([*ARGS, "--threads", "0"]) != 0
    assert "'--threads'" in capsys.readouterr().err
