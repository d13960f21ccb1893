"""The embedded broker's amqtt is an extra (`fedclip-edge[embedded]`): without it, every way in
(`broker run`, the demo without --broker, EmbeddedBroker) ends in one error line that names the
extra, before anything is built or started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedclip_edge.broker.embedded import EXTRA_HINT, EmbeddedBroker, broker_class
from fedclip_edge.errors import ConfigError


@pytest.fixture
def no_amqtt(monkeypatch: pytest.MonkeyPatch) -> None:
    """amqtt as if not installed: a None entry in sys.modules makes its import fail."""
    for name in [m for m in sys.modules if m == "amqtt" or m.startswith("amqtt.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "amqtt", None)
    monkeypatch.setitem(sys.modules, "amqtt.broker", None)


def test_with_the_extra_the_broker_class_loads() -> None:
    assert broker_class().__module__.startswith("amqtt")


def test_without_it_embedded_broker_names_the_extra(no_amqtt: None) -> None:
    with pytest.raises(ConfigError, match=r"pip install 'fedclip-edge\[embedded\]'"):
        EmbeddedBroker("127.0.0.1", 0).start()


def test_without_it_broker_run_is_one_error_line(
    no_amqtt: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedclip_edge.cli import main

    assert main(["broker", "run", "--port", "0"]) == ConfigError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and EXTRA_HINT in err[0]


def test_without_it_the_demo_stops_before_building_anything(
    no_amqtt: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedclip_edge.cli import main

    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out)]) == ConfigError.exit_code
    assert "fedclip-edge[embedded]" in capsys.readouterr().err
    assert not out.exists()
