"""The CLI end to end: synthetic images -> features -> simulation -> summary.json."""

import json
import subprocess
import sys

import pytest

from fedclip_edge.cli import expand_multi_values, main

pytestmark = pytest.mark.integration


def test_expand_multi_values():
    assert expand_multi_values(["simulate", "--seeds", "0", "1", "2", "--rounds", "3"]) == [
        "simulate",
        "--seeds",
        "0",
        "--seeds",
        "1",
        "--seeds",
        "2",
        "--rounds",
        "3",
    ]
    assert expand_multi_values(["--rounds", "3", "x"]) == ["--rounds", "3", "x"]


def test_synth_to_summary(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "run"
    assert main(["data", "synth", "--out", str(data), "--per-class", "5"]) == 0
    rc = main(
        [
            "simulate",
            "--data",
            str(data),
            "--pretrained",
            "none",
            "--test-domain",
            "sketch",
            "--rounds",
            "2",
            "--seeds",
            "0",
            "1",
            "--preset",
            "learning",
            "--personalize-epochs",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "method",
        "model",
        "rounds",
        "seeds",
        "trainable_params",
        "zero_shot",
        "generalization_acc",
        "personalization_acc",
        "best_round",
        "history",
        "std",
        "per_seed",
        "personalization_acc_local",
    ):
        assert key in summary, key
    assert summary["seeds"] == [0, 1] and summary["rounds"] == 2
    assert summary["clients"] == ["art_painting", "cartoon", "photo"]
    assert summary["trainable_params"] == 2 * (128 * 128 + 128)
    assert summary["model"]["pretrained"] == "none"
    assert set(summary["zero_shot"]) == {"photo", "art_painting", "cartoon", "sketch"}
    assert len(summary["per_seed"][0]["history"]) == 2
    assert summary["train"]["lr"] == 1e-3 and summary["train"]["loss"] == "ce"
    printed = capsys.readouterr().out
    assert "round   2/2" in printed and "held-out sketch" in printed

    # a second run on the cache encodes nothing
    rc = main(
        [
            "simulate",
            "--features",
            str(out / "features"),
            "--test-domain",
            "photo",
            "--rounds",
            "1",
            "--out",
            str(tmp_path / "run2"),
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["test_domain"] == "photo"


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["features", "--data", "/nonexistent/data", "--out", "x"], 2, "/nonexistent/data"),
        (
            ["simulate", "--features", "/nonexistent/cache", "--test-domain", "a", "--out", "x"],
            4,
            "/nonexistent/cache",
        ),
        (["simulate", "--test-domain", "a", "--out", "x"], 6, "--data"),
        (["features", "--data", "data", "--out", "x", "--model", "ViT-B-32"], 3, "--pretrained"),
    ],
)
def test_user_errors_are_one_line(args, code, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from fedclip_edge.data.synth import write_dataset

    write_dataset(tmp_path / "data", per_class=1)
    assert main(args) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


def test_unknown_test_domain_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "data"
    main(["data", "synth", "--out", str(data), "--per-class", "2"])
    rc = main(
        [
            "simulate",
            "--data",
            str(data),
            "--pretrained",
            "none",
            "--test-domain",
            "clipart",
            "--rounds",
            "1",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 6
    assert "test domain 'clipart'" in capsys.readouterr().err


def test_console_script_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "fedclip_edge.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("fedclip-edge ")


def test_usage_error_is_a_message_not_a_traceback(capsys):
    assert main(["simulate", "--bogus"]) == 2
    err = capsys.readouterr().err
    # click/typer word it "No such option: --bogus" or "No such option '--bogus'" by version
    assert "No such option" in err and "--bogus" in err and "Traceback" not in err
