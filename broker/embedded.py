"""An MQTT broker inside Python (amqtt) for local runs, demos and tests.

Why: devices, the aggregator and the test suite need a real MQTT broker over TCP without
installing or configuring mosquitto. This one is anonymous and meant for loopback; production
runs use the mosquitto configuration in `broker/mosquitto/` (see docs/broker.md).

Two ways in:
- `EmbeddedBroker`: runs the broker on its own asyncio loop in a background thread of the
  calling process (context manager). Starting takes milliseconds, so tests can use one each.
- `run_broker(host, port)`: runs it in the foreground until SIGTERM/SIGINT (the CLI).

amqtt 0.12 facts this relies on (checked in its source): `Broker(config)` must be created inside a
running loop; `await broker.start()` binds the listener; there is no message size limit besides
MQTT's own (268,435,455 bytes), so 64 MiB chunks pass; it logs a lot at INFO/WARNING/ERROR,
including for ordinary events such as a client closing without DISCONNECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fedclip_edge.errors import ConfigError, Interrupted, TransportError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 1883
# MQTT's own maximum payload (remaining length 268,435,455 bytes minus the topic and headers).
MQTT_MAX_PACKET = 268_435_455
_LISTENER = "default"
_SHUTDOWN_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)

EXTRA_HINT = (
    "the embedded MQTT broker needs amqtt, installed with fedclip-edge's 'embedded' extra: "
    "pip install 'fedclip-edge[embedded]' (or give --broker mqtt://HOST:PORT to use your own)"
)


def broker_class() -> type:
    """amqtt's Broker, or one ConfigError naming the extra. Imported late: a CLI that never runs
    a broker stays fast, and an install beside Flower (whose typer pin amqtt cannot share) runs
    everything else without it."""
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise ConfigError(f"{EXTRA_HINT} [{exc}]") from exc
    return Broker


def quiet_amqtt_logging(level: int = logging.CRITICAL) -> None:
    """Raise amqtt's logger threshold: it reports routine events (a client dropping its TCP
    connection, a probe connect) as warnings and errors, which would drown the project's output.
    Leaves the logger alone when the application already set a level on it."""
    for name in ("amqtt", "transitions"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(level)


def _bind_string(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def broker_url(host: str, port: int) -> str:
    """`mqtt://host:port`, with IPv6 addresses in brackets."""
    return f"mqtt://{_bind_string(host, port)}"


def amqtt_config(host: str, port: int) -> dict[str, Any]:
    """The amqtt configuration: one TCP listener, anonymous clients, no $SYS publisher (its
    default 20 s ticker only adds traffic) and no packet-logging plugins."""
    return {
        "listeners": {_LISTENER: {"type": "tcp", "bind": _bind_string(host, port)}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


def _listen_error(host: str, port: int, exc: BaseException) -> TransportError:
    """One clear line for the usual reasons a listener cannot open."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    where = _bind_string(host, port)
    if isinstance(cause, OSError):
        if cause.errno == errno.EADDRINUSE:
            return TransportError(
                f"cannot listen on {where}: the port is already in use "
                "(another broker running? choose another --port)"
            )
        if cause.errno == errno.EACCES:
            return TransportError(
                f"cannot listen on {where}: permission denied (ports below 1024 need privileges)"
            )
        if cause.errno == errno.EADDRNOTAVAIL:
            return TransportError(f"cannot listen on {where}: no such address on this machine")
        if isinstance(cause, socket.gaierror):
            return TransportError(f"cannot listen on {where}: unknown host {host!r}")
        return TransportError(f"cannot listen on {where}: {cause.strerror or cause}")
    return TransportError(f"cannot start the embedded broker on {where}: {exc}")


def _close_streams_after_session(broker: Any) -> None:
    """Close each client's TCP stream when amqtt is done with it. amqtt 0.12 leaves the socket
    open when a connection ends before a valid CONNECT (a port probe, a refused client), which
    leaks a file descriptor per such connection in a long-running broker."""
    handle = broker.stream_connected  # asyncio.start_server gets this attribute at start()

    async def stream_connected(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
    ) -> None:
        try:
            await handle(reader, writer, listener_name=listener_name)
        finally:
            writer.close()

    broker.stream_connected = stream_connected


async def _start_amqtt(host: str, port: int) -> tuple[Any, int]:
    """Start an amqtt broker on the running loop; return it and the port it actually bound
    (port 0 picks a free one)."""
    if not 0 <= port <= 65535:
        raise TransportError(f"port must be between 0 and 65535, got {port}")
    broker = broker_class()(amqtt_config(host, port))
    _close_streams_after_session(broker)
    try:
        await broker.start()
    except Exception as exc:
        raise _listen_error(host, port, exc) from exc
    bound = port
    if port == 0:
        # amqtt keeps its asyncio.Server on a private attribute; the only way to learn the port
        # the OS picked. Fail loudly if a later amqtt moves it.
        try:
            server = broker._servers[_LISTENER].instance
            bound = int(server.sockets[0].getsockname()[1])
        except (AttributeError, KeyError, IndexError, TypeError) as exc:
            await _shutdown_amqtt(broker)
            raise TransportError(
                "cannot tell which port the embedded broker bound; pass an explicit port"
            ) from exc
    return broker, bound


async def _shutdown_amqtt(broker: Any, timeout: float = _SHUTDOWN_TIMEOUT_S) -> None:
    """Stop the broker within `timeout`, closing client connections; never raise."""
    try:
        await asyncio.wait_for(broker.shutdown(), timeout)
    except Exception as exc:  # noqa: BLE001 - shutting down: report, do not propagate
        log.debug("amqtt shutdown did not finish cleanly: %r", exc)
        for server in getattr(broker, "_servers", {}).values():
            with contextlib.suppress(Exception):
                server.instance.close()


async def _cancel_pending(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what amqtt left running (client handlers, keep-alive timers) so the loop can close
    without 'Task was destroyed but it is pending' noise."""
    tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=_SHUTDOWN_TIMEOUT_S)


def _wait_accepting(host: str, port: int, timeout: float) -> None:
    """Block until a TCP connect to host:port succeeds, or raise TransportError."""
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.02)
    raise TransportError(
        f"embedded broker on {_bind_string(host, port)} did not accept connections within "
        f"{timeout:g} s ({last})"
    )


class EmbeddedBroker:
    """An amqtt MQTT broker on a background thread with its own asyncio loop.

    A thread rather than a subprocess: it starts in milliseconds, needs no free-port guessing
    (port 0 binds a free port and `.port` reports it) and cannot be orphaned (daemon thread).
    Clients (paho, in any thread or process) talk to it over real TCP.

        with EmbeddedBroker() as broker:
            client.connect(broker.host, broker.port)

    Anonymous access: bind it to loopback only.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = 0,
        *,
        start_timeout: float = 10.0,
        quiet: bool = True,
    ) -> None:
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self.start_timeout = start_timeout
        self.quiet = quiet
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The TCP port it listens on (known once started)."""
        if self._port is None:
            raise TransportError("the embedded broker is not started")
        return self._port

    @property
    def url(self) -> str:
        """`mqtt://host:port`."""
        return broker_url(self.host, self.port)

    @property
    def running(self) -> bool:
        """True between a successful start() and stop()."""
        return self._thread is not None and self._thread.is_alive() and self._port is not None

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until its port accepts TCP connections.

        Raises TransportError with one clear line when it cannot listen (port in use, ...) or is
        not accepting within `start_timeout` seconds."""
        if self._thread is not None:
            raise TransportError("this embedded broker was already started; make a new one")
        broker_class()  # a missing extra is the caller's one-line error, not the thread's
        if self.quiet:
            quiet_amqtt_logging()
        self._thread = threading.Thread(
            target=self._thread_main, name=f"amqtt-broker-{self._requested_port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            self.stop()
            raise TransportError(
                f"embedded broker on {_bind_string(self.host, self._requested_port)} did not "
                f"start within {self.start_timeout:g} s"
            )
        if self._error is not None:
            self._thread.join(self.start_timeout)
            err = self._error
            if isinstance(err, TransportError):
                raise err
            raise TransportError(f"embedded broker failed to start: {err}") from err
        try:
            _wait_accepting(self.host, self.port, self.start_timeout)
        except TransportError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close the listener and every client connection, then end the thread. Idempotent.

        Clients see their connection drop (paho calls on_disconnect). Does not raise: a broker
        that fails to stop within `timeout` is left to its daemon thread and logged."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or not thread.is_alive():
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("embedded broker thread did not stop within %.1f s", timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._port is not None else f"port {self._requested_port}"
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({where}, {state})"

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to start() in the calling thread
            self._error = exc
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(_cancel_pending(loop))
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        broker, self._port = await _start_amqtt(self.host, self._requested_port)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await _shutdown_amqtt(broker)


def run_broker(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    quiet: bool = True,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the embedded broker in the foreground until SIGTERM or SIGINT, then stop cleanly.

    Prints `broker listening on mqtt://HOST:PORT` (flushed) once the port accepts connections,
    or calls `on_ready(url)` instead; scripts wait for that line. Raises TransportError when it
    cannot listen."""
    broker_class()
    if quiet:
        quiet_amqtt_logging()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed: list[int] = []

        def on_signal(sig: int) -> None:
            received.append(sig)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
            except (ValueError, RuntimeError, NotImplementedError):
                pass  # not the main thread, or no signal support: stop with KeyboardInterrupt
        broker, bound = await _start_amqtt(host, port)
        try:
            url = broker_url(host, bound)
            if on_ready is not None:
                on_ready(url)
            else:
                print(f"broker listening on {url}", flush=True)
            await stop.wait()
        finally:
            await _shutdown_amqtt(broker)
            for sig in installed:
                loop.remove_signal_handler(sig)
            await _cancel_pending(loop)

    received: list[int] = []
    asyncio.run(main())
    if signal.SIGINT in received:  # Ctrl-C: stopped cleanly, and the exit code says why
        raise Interrupted("broker stopped")
