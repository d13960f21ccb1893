"""The job file's parser (pure), the did-you-mean helper, the log-file progress lines, and the
CLI's mapping of a file onto a command's options (flags win; the file fills required ones)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fedclip_edge.errors import ConfigError
from fedclip_edge.jobconfig import SECTIONS, load_job_config, parse_job_config
from fedclip_edge.names import did_you_mean, unknown_name
from fedclip_edge.progress import LineProgress

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "job.toml"


def test_example_parses_and_maps_to_each_command() -> None:
    cfg = load_job_config(EXAMPLE)
    base = EXAMPLE.parent
    agg = cfg.options("aggregate")
    assert agg["broker"] == "mqtt://127.0.0.1:1883" and agg["job"] == "shapes-demo"
    assert agg["rounds"] == 2 and agg["preset"] == "learning"
    assert agg["out"] == base / "runs" / "aggregator"  # relative to the file's folder
    assert "data" not in agg and "per_class" not in agg
    agent = cfg.options("agent")
    assert agent["data"] == base / "data" and agent["backend"] == "onnxruntime"
    assert agent["job"] == "shapes-demo" and "rounds" not in agent
    demo = cfg.options("demo")
    assert demo["out"] == base / "demo-out" and demo["per_class"] == 20
    assert "min_clients" not in demo


def test_values_are_typed_and_paths_resolved(tmp_path: Path) -> None:
    cfg = parse_job_config(
        '[aggregator]\nround_timeout = 5\nout = "/abs/run"\n[agent]\ncache = "c"\n'
        "[broker]\ntls_insecure = true\n",
        tmp_path,
    )
    assert cfg.aggregator.round_timeout == 5.0 and isinstance(cfg.aggregator.round_timeout, float)
    assert cfg.aggregator.out == Path("/abs/run")
    assert cfg.agent.cache == tmp_path / "c"
    assert cfg.broker.tls_insecure is True


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[aggregator]\nmin_client = 2\n", "unknown key 'min_client' in [aggregator] (did you mean "
         "'min_clients'?)"),
        ("[agnet]\ndata = 'x'\n", "unknown section [agnet] (did you mean 'agent'?)"),
        ("rounds = 2\n", "unknown key 'rounds' outside a section"),
        ("[job]\nrounds = '2'\n", "[job] rounds must be an integer, got '2'"),
        ("[job]\nrounds = true\n", "[job] rounds must be an integer"),
        ("[broker]\ntls_insecure = 1\n", "[broker] tls_insecure must be true or false"),
        ("[agent]\ndata = 3\n", "[agent] data must be a path"),
        ("[job]\nid = 7\n", "[job] id must be a string"),
        ("[job\n", "is not valid TOML"),
        ("[job]\nrounds = 1\n[job]\nseed = 2\n", "is not valid TOML"),
    ],
)
def test_bad_files_are_one_config_error(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_job_config(text, tmp_path, source="job.toml")
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_job_config(tmp_path)


def test_every_key_names_a_command_option() -> None:
    """A key the CLI would silently ignore is a bug: each maps onto an option of a command."""
    import dataclasses
    import inspect

    from fedclip_edge.broker.cli import aggregate
    from fedclip_edge.cli import demo
    from fedclip_edge.device_agent.cli import agent

    params = {
        name: set(inspect.signature(fn).parameters)
        for name, fn in (("aggregate", aggregate), ("agent", agent), ("demo", demo))
    }
    for section in SECTIONS.values():
        for f in dataclasses.fields(section):
            assert f.metadata["commands"], f.name
            for command in f.metadata["commands"]:
                assert f.metadata["option"] in params[command], (command, f.name)


def test_cli_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real parser: the file fills required options, a flag wins over the file."""
    from fedclip_edge.broker import cli as broker_cli
    from fedclip_edge.cli import main

    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def fake_config(**kwargs: object) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(broker_cli, "AggregatorConfig", fake_config)
    cfg = tmp_path / "job.toml"
    cfg.write_text(
        '[broker]\nurl = "mqtt://127.0.0.1:1"\n[job]\nid = "from-file"\nrounds = 3\n'
        '[aggregator]\nout = "run"\nmin_clients = 4\n'
    )
    with pytest.raises(Stop):
        main(["aggregate", "--config", str(cfg), "--rounds", "7"])
    assert seen["job"] == "from-file" and seen["rounds"] == 7 and seen["min_clients"] == 4
    assert seen["out"] == tmp_path / "run"


def test_did_you_mean() -> None:
    assert did_you_mean("ViT-B-3", ["ViT-B-32", "RN50"]) == " (did you mean 'ViT-B-32'?)"
    assert did_you_mean("phto", ["photo", "sketch"]) == " (did you mean 'photo'?)"
    assert did_you_mean("zzz", ["photo", "sketch"]) == ""
    msg = unknown_name("preset", "lerning", ["reference", "learning"])
    assert msg == ("unknown preset 'lerning' (did you mean 'learning'?); "
                   "choose one of reference, learning")


def test_line_progress_prints_at_start_every_interval_and_at_the_end() -> None:
    now = [0.0]
    out = io.StringIO()
    p = LineProgress("features", 100, "images", stream=out, every_s=5.0, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 1.0
        p.advance(10)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "features: 0/100 images (0%)",
        "features: 50/100 images (50%), 10.0 images/s, about 5 s left",
        "features: 100/100 images (100%), 10.0 images/s",
    ]
    now[0] = 0.0
    p = LineProgress("synth", 10, "images", stream=out, every_s=5.0, clock=lambda: now[0])
    now[0] = 1.0
    p.advance(3)
    p.close()  # the end is always reported, even within the interval
    assert out.getvalue().splitlines()[-1] == "synth: 3/10 images (30%), 3.0 images/s"


def test_line_progress_says_how_long_is_left() -> None:
    """At the rate so far: 64 of 640 steps in 100 s is 900 s left, 15 min."""
    now = [0.0]
    out = io.StringIO()
    p = LineProgress("pretrain", 640, "steps", stream=out, every_s=0.0, clock=lambda: now[0])
    now[0] = 100.0
    p.advance(64)
    now[0] = 5000.0
    p.advance(1)
    assert out.getvalue().splitlines()[1:] == [
        "pretrain: 64/640 steps (10%), 0.64 steps/s, about 15 min left",
        "pretrain: 65/640 steps (10%), 0.013 steps/s, about 12.3 h left",
    ]
