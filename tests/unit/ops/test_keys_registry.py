"""Issue 21, point 6: `keys new --out keys/` makes the `keys/devices/` registry that the next
copied line (`aggregate --device-keys keys/devices/`) reads."""

from __future__ import annotations

from pathlib import Path

from fedclip_edge.cli import main
from fedclip_edge.errors import SigningError
from fedclip_edge.signing import KeyRegistry, load_public_key


def test_keys_new_writes_the_device_registry(tmp_path: Path, capsys) -> None:
    out = tmp_path / "keys"
    argv = ["keys", "new", "--out", str(out), "--id", "aggregator", "--id", "exporter",
            "--id", "dev-1", "--id", "dev-2"]
    assert main(argv) == 0
    assert "device registry" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "devices").iterdir()) == ["dev-1.pub", "dev-2.pub"]
    registry = KeyRegistry.load(out / "devices")
    assert registry.ids() == ["dev-1", "dev-2"]
    assert registry.get("dev-1") == load_public_key(out / "dev-1.pub")

    # again without --force: refused, nothing replaced; with --force both copies are new
    before = (out / "devices" / "dev-1.pub").read_bytes()
    assert main(["keys", "new", "--out", str(out), "--id", "dev-1"]) == SigningError.exit_code
    assert (out / "devices" / "dev-1.pub").read_bytes() == before
    assert main(["keys", "new", "--out", str(out), "--id", "dev-1", "--force"]) == 0
    assert (out / "devices" / "dev-1.pub").read_bytes() == (out / "dev-1.pub").read_bytes()
    assert (out / "dev-1.pub").read_bytes() != before


def test_keys_new_for_the_aggregator_alone_makes_no_registry(tmp_path: Path) -> None:
    assert main(["keys", "new", "--out", str(tmp_path), "--id", "aggregator"]) == 0
    assert not (tmp_path / "devices").exists()


def test_keys_new_site_goes_to_the_site_registry_not_the_devices(tmp_path: Path, capsys) -> None:
    """A site's key is what the central's --site-keys reads: in devices/ it would be refused as
    a device that calls itself a site (and the central refuses a key in both folders)."""
    from broker.hierarchy import SiteRegistry

    out = tmp_path / "keys"
    assert main(["keys", "new", "--out", str(out), "--id", "dev-1", "--site", "site-a"]) == 0
    assert "site registry" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "devices").iterdir()) == ["dev-1.pub"]
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["site-a.pub"]
    sites = SiteRegistry.load(out / "sites", 100.0)
    assert "site-a" in sites and "dev-1" not in sites
    assert sites.keys.get("site-a") == load_public_key(out / "site-a.pub")
    # a site named like a role, a site given twice, or nothing at all: refused, nothing made
    for argv in (["--site", "aggregator"], ["--site", "s", "--id", "s"], []):
        assert main(["keys", "new", "--out", str(tmp_path / "x"), *argv]) == SigningError.exit_code
    assert not (tmp_path / "x").exists()
