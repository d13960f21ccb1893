"""Exit codes and messages through real subprocesses: a user's mistake is one `error:` line (no
traceback), Ctrl-C is one `interrupted` line and exit 130.

SIGINT moments are made certain: either the command waits on something that cannot come (an
aggregator with no devices, a broker with no end), or `support.blockrun` turns a function the
command calls mid-work into a barrier that prints `BLOCKED ...`; the test reads the child's
output up to that line and only then sends SIGINT.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import keys
from support import mqtt as mh
from support.signals import ctrl_c_enabled

pytestmark = pytest.mark.integration
# Commands run with `--pretrained none` (fedclip-tiny, random init) where the weights do not
# matter, so no test waits for the offline model's pretraining (or for another process's lock
# on it in the shared cache).

PY = sys.executable
CLI = [PY, "-m", "fedclip_edge.cli"]
TESTS = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=_env(**env),
        stdin=subprocess.DEVNULL,
    )


def assert_one_error_line(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, no traceback, exactly one `error:` line, naming what was wrong."""
    both = r.stdout + r.stderr
    assert r.returncode not in (0, 130), both
    assert "Traceback" not in both, both
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, both
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("exits") / "data"
    r = run_cli("data", "synth", "--out", str(data), "--per-class", "2")
    assert r.returncode == 0, r.stderr
    return data


# ----------------------------------------------------------------------------- user mistakes


def test_bad_job_and_client_ids(tmp_path: Path) -> None:
    url = "mqtt://127.0.0.1:1"
    for job in ("my job", "a/#"):
        r = run_cli("aggregate", "--broker", url, "--job", job, "--rounds", "1", "--out",
                    str(tmp_path / "o"))
        assert_one_error_line(r, "job", repr(job))
    r = run_cli("agent", "--broker", url, "--job", "j", "--client-id", "a/b#", "--data",
                str(tmp_path), "--artifacts", str(tmp_path))
    assert_one_error_line(r, "client id", "'a/b#'")


def test_out_is_a_file(tmp_path: Path) -> None:
    kdir = keys.key_files(tmp_path / "keys", ["dev-a"])
    f = tmp_path / "a-file"
    f.write_text("x")
    r = run_cli("aggregate", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--rounds", "1",
                "--out", str(f), "--device-keys", str(kdir / "devices"),
                "--signing-key", str(kdir / "aggregator.key"))
    assert_one_error_line(r, str(f), "is a file")
    r = run_cli("data", "synth", "--out", str(f), "--per-class", "1")
    assert_one_error_line(r, str(f), "is a file")


def test_bench_fedavg_zero_rounds(tmp_path: Path) -> None:
    r = run_cli("bench", "fedavg", "--data", str(tmp_path), "--out", str(tmp_path / "b"),
                "--rounds", "0")
    assert_one_error_line(r, "'--rounds'", "greater than or equal to 1")


def test_mistyped_names_get_a_suggestion(small_data: Path, tmp_path: Path) -> None:
    r = run_cli("features", "--data", str(small_data), "--out", str(tmp_path / "c"), "--model",
                "ViT-B-3")
    line = assert_one_error_line(r, "'ViT-B-3'", "did you mean 'ViT-B-32'")
    assert "`fedclip-edge model list`" in line
    # the command the message points to exists and lists the architecture
    listed = run_cli("model", "list")
    assert listed.returncode == 0 and "ViT-B-32" in listed.stdout.split()
    r = run_cli("features", "--data", str(small_data), "--out", str(tmp_path / "c"),
                "--domains", "phto")
    assert_one_error_line(r, "phto", "did you mean 'photo'")
    r = run_cli("simulate", "--data", str(small_data), "--out", str(tmp_path / "s"),
                "--test-domain", "photo", "--preset", "lerning")
    assert_one_error_line(r, "'lerning'", "did you mean 'learning'")
    r = run_cli("simulate", "--data", str(small_data), "--out", str(tmp_path / "s"),
                "--test-domain", "skech")
    assert_one_error_line(r, "'skech'", "did you mean 'sketch'")
    r = run_cli("demo", "--out", str(tmp_path / "d"), "--test-domain", "phot")
    assert_one_error_line(r, "'phot'", "did you mean 'photo'")


def test_pretrained_tag_mistyped_and_offline(small_data: Path, tmp_path: Path) -> None:
    r = run_cli("features", "--data", str(small_data), "--out", str(tmp_path / "c"), "--model",
                "ViT-B-32", "--pretrained", "opena")
    assert_one_error_line(r, "'opena'", "did you mean 'openai'")
    # no network here (and HF_HUB_OFFLINE=1 in case there is): one line, no retry warnings
    r = run_cli("features", "--data", str(small_data), "--out", str(tmp_path / "c"), "--model",
                "ViT-B-32", "--pretrained", "openai", HF_HOME=str(tmp_path / "hf"))
    assert_one_error_line(r, "ViT-B-32/openai", "not available")
    assert "Retry" not in r.stderr + r.stdout


def test_pretrained_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not offline by setting, but no route to the hub: the download runs in offline mode (the
    cache only) and fails with one ModelError saying so; online, the hub's client would retry
    for ~50 s first."""
    import huggingface_hub.constants as hf_constants

    from fedclip_edge.errors import ModelError
    from fedclip_edge.models import load

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("FEDCLIP_EDGE_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # restored after the test
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{mh.free_port()}")  # nothing listens
    offline_at_download: list[bool] = []

    def download(*args: object, **kwargs: object) -> str:
        offline_at_download.append(bool(hf_constants.HF_HUB_OFFLINE))
        raise FileNotFoundError("not in the cache")

    monkeypatch.setattr("open_clip.pretrained.download_pretrained", download)
    with pytest.raises(ModelError, match=r"no network: 127\.0\.0\.1:\d+ unreachable"):
        load._resolve_tag("ViT-B-32", "openai")
    assert offline_at_download == [True]


def test_multi_value_options_in_every_command() -> None:
    """`--devices 5 10` like `--seeds 0 1 2`: the runner finds every list option itself."""
    import typer.main

    from fedclip_edge.cli import _register_parts, app
    from fedclip_edge.cli_runner import expand_multi_values, multi_value_options

    _register_parts()
    names = multi_value_options(typer.main.get_command(app))
    assert {"--devices", "--seeds", "--domains", "--batch"} <= names
    assert expand_multi_values(["bench", "aggregator", "--devices", "5", "10", "--keep"],
                               names) == ["bench", "aggregator", "--devices", "5", "--devices",
                                          "10", "--keep"]


def test_bench_aggregator_takes_several_devices_counts(tmp_path: Path) -> None:
    """Through the real parser: `--devices 5 10` reaches the benchmark as [5, 10] (an invalid
    --broker-kind then stops it before any work)."""
    r = run_cli("bench", "aggregator", "--devices", "5", "10", "--out", str(tmp_path),
                "--broker-kind", "nope")
    assert "Got unexpected extra argument" not in r.stderr, r.stderr
    assert_one_error_line(r, "nope")


# ----------------------------------------------------------------------------- Ctrl-C


class Child:
    """A CLI subprocess whose merged output is read line by line on a thread."""

    def __init__(self, cmd: list[str], **env: str) -> None:
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**env),
            stdin=subprocess.DEVNULL, preexec_fn=ctrl_c_enabled,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._seen = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            with self._seen:
                sink.append(line.rstrip("\n"))
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def text(self) -> str:
        return "\n".join(self.out) + "\n--- stderr\n" + "\n".join(self.err)

    def wait_line(self, needle: str, timeout: float = 240) -> None:
        """Block until a printed line contains `needle` (or the child ends: fail)."""
        def found() -> bool:
            return any(needle in line for line in self.out + self.err)

        with self._seen:
            ok = self._seen.wait_for(
                lambda: found() or self.proc.poll() is not None, timeout=timeout
            )
        if not found():
            self.kill()
            pytest.fail(f"no line with {needle!r} (ok={ok}, rc={self.proc.poll()})\n{self.text()}")

    def interrupt(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGUSR1)  # every thread's stack, to see where it hangs
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(3)
            self.kill()
            for t in self._threads:
                t.join(5)
            pytest.fail(f"did not end within {timeout}s of SIGINT\n{self.text()}")
        for t in self._threads:
            t.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def child(cmd: list[str], **env: str) -> Iterator[Child]:
    c = Child(cmd, **env)
    try:
        yield c
    finally:
        c.kill()


def blocked(target: str, *args: str, after: int = 0) -> list[str]:
    return [PY, "-m", "support.blockrun", target, str(after), "--", *args]


def assert_interrupted(c: Child, rc: int, *needles: str) -> str:
    assert rc == 130, c.text()
    both = c.out + c.err
    assert not any("Traceback" in line for line in both), c.text()
    lines = [line for line in both if line.lower().startswith("interrupted")]
    assert len(lines) == 1, c.text()
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("name", "target", "args"),
    [
        (
            "features",
            "fedclip_edge.features:file_sha256",
            ["features", "--out", "{tmp}/c", "--pretrained", "none"],
        ),
        ("synth", "fedclip_edge.data.synth:render", ["data", "synth", "--out", "{tmp}/d"]),
        (
            "simulate",
            "fedclip_edge.simulate:train_local",
            ["simulate", "--test-domain", "photo", "--out", "{tmp}/s", "--rounds", "2",
             "--pretrained", "none"],
        ),
        (
            "export",
            "fedclip_edge.exporters.export:_run_candidate",
            ["export", "--out", "{tmp}/a", "--pretrained", "none"],
        ),
    ],
)
def test_sigint_mid_work(
    name: str, target: str, args: list[str], small_data: Path, tmp_path: Path
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if name in ("features", "simulate"):
        args += ["--data", str(small_data)]
    if name == "export":
        args += ["--classes", str(small_data)]
    with child(blocked(target, *args)) as c:
        c.wait_line(f"BLOCKED {target}")
        rc = c.interrupt()
    assert_interrupted(c, rc)


def test_sigint_features_keeps_resumable_cache(small_data: Path, tmp_path: Path) -> None:
    """Interrupted after the first domain is written: a re-run re-uses it."""
    out = tmp_path / "cache"
    args = ["features", "--data", str(small_data), "--out", str(out), "--pretrained", "none"]
    per_domain = 8 * 2
    # file_sha256 runs once per image: the barrier sits at the second domain's first image
    with child(blocked("fedclip_edge.features:file_sha256", *args, after=per_domain)) as c:
        c.wait_line("BLOCKED")
        rc = c.interrupt()
    assert_interrupted(c, rc)
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    report = json.loads((out / "extract_report.json").read_text())
    assert report["reused"] == per_domain and report["encoded"] == 3 * per_domain


def test_sigint_aggregate_waiting_for_devices(tmp_path: Path) -> None:
    kdir = keys.key_files(tmp_path / "keys", ["dev-a"])
    with mh.embedded_broker() as broker:
        cmd = [*CLI, "aggregate", "--broker", broker.url, "--job", "exits", "--rounds", "2",
               "--out", str(tmp_path / "agg"), "--wait-clients", "600", "--connect-timeout", "20",
               "--device-keys", str(kdir / "devices"),
               "--signing-key", str(kdir / "aggregator.key")]
        with child(cmd) as c:
            c.wait_line("waiting up to 600s for 1 device(s)")
            c.proc.send_signal(signal.SIGUSR1)  # an operator asks where it is: stacks, goes on
            c.wait_line("most recent call first")
            assert c.proc.poll() is None
            rc = c.interrupt()
    # no round was committed: there is nothing to resume, and the line says so
    line = assert_interrupted(c, rc, "nothing to keep")
    assert "--resume" not in line, line


def test_sigint_broker_run() -> None:
    port = mh.free_port()
    with child([*CLI, "broker", "run", "--port", str(port)]) as c:
        c.wait_line("broker listening on")
        rc = c.interrupt()
    assert_interrupted(c, rc)


def test_sigterm_broker_run_is_a_clean_stop() -> None:
    port = mh.free_port()
    with child([*CLI, "broker", "run", "--port", str(port)]) as c:
        c.wait_line("broker listening on")
        c.proc.send_signal(signal.SIGTERM)
        assert c.proc.wait(60) == 0, c.text()
