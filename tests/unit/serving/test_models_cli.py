"""`fedclip-edge models list/promote/rollback --models DIR`: the store from a shell."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedclip_edge.adapter import AttentionAdapter
from fedclip_edge.cli import main
from fedclip_edge.serving.store import ModelStore


def _store(tmp_path: Path) -> ModelStore:
    store = ModelStore(tmp_path / "models")
    for i, kind in enumerate(["global", "personal"]):
        torch.manual_seed(i)
        store.add(
            AttentionAdapter(4).state_dict(),
            torch.randn(2, 4),
            {
                "kind": kind,
                "job": "job-a",
                "round": 5,
                "classes": ["a", "b"],
                "accuracy": {
                    "split": "val",
                    "n": 20,
                    "zero_shot": 0.5,
                    "global": 0.55,
                    "personal": 0.7 if kind == "personal" else None,
                },
            },
        )
    return store


def test_list_promote_rollback(tmp_path: Path, capsys) -> None:
    store = _store(tmp_path)
    d = str(store.root)
    assert main(["models", "list", "--models", d]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "version",
        "kind",
        "job",
        "round",
        "val",
        "n",
        "zero-shot",
        "global",
        "personal",
    ]
    assert out[2].split() == ["v0001-global", "global", "job-a", "5", "20", "50.0%", "55.0%", "-"]
    assert out[3].split() == [
        "v0002-personal",
        "personal",
        "job-a",
        "5",
        "20",
        "50.0%",
        "55.0%",
        "70.0%",
    ]
    assert out[-1].startswith("no current version")

    assert main(["models", "promote", "v0002-personal", "--models", d]) == 0
    assert capsys.readouterr().out.strip() == "current: v0002-personal (was none)"
    assert main(["models", "promote", "v0001-global", "--models", d, "--reason", "test"]) == 0
    capsys.readouterr()
    assert main(["models", "list", "--models", d, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["current"]) for r in rows] == [
        ("v0001-global", True),
        ("v0002-personal", False),
    ]
    assert rows[1]["accuracy"]["personal"] == 0.7 and rows[0]["job"] == "job-a"

    assert main(["models", "rollback", "--models", d]) == 0
    assert capsys.readouterr().out.strip() == "current: v0002-personal (was v0001-global)"
    assert main(["models", "list", "--models", d]) == 0
    assert capsys.readouterr().out.splitlines()[3].startswith("* v0002-personal")
    assert store.history()[-1]["action"] == "rollback"


def test_user_mistakes_are_one_line(tmp_path: Path, capsys) -> None:
    store = _store(tmp_path)
    d = str(store.root)
    assert main(["models", "rollback", "--models", d]) == 10
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing to roll back to" in err and "\n" not in err
    assert main(["models", "promote", "v0042-global", "--models", d]) == 10
    assert "no version 'v0042-global'" in capsys.readouterr().err
    # a corrupt version is listed as refused, the others still show
    (store.versions_dir / "v0001-global" / "adapter.safetensors").write_bytes(b"x")
    assert main(["models", "list", "--models", d]) == 0
    out = capsys.readouterr().out
    assert "v0002-personal" in out and "v0001-global  refused:" in out and "sha256" in out
    assert main(["models", "list", "--models", str(tmp_path / "none")]) == 0
    assert "no versions yet" in capsys.readouterr().out


def test_promote_with_the_folder_first(tmp_path: Path, capsys) -> None:
    """`models promote --models DIR NAME`, the order README's line suggests: `--models` is one
    folder here (a list only in `bench infer`), so NAME is not swallowed as a second value."""
    d = str(_store(tmp_path).root)
    assert main(["models", "promote", "--models", d, "v0002-personal"]) == 0
    assert capsys.readouterr().out.strip() == "current: v0002-personal (was none)"
