"""One error family. The CLI prints `error: <message>` and exits with the class's code, so a
user sees one clear line instead of a traceback for a mistake of theirs."""

from __future__ import annotations


class FedClipError(Exception):
    """Base of every error a user can cause or fix."""

    exit_code = 1


class DataError(FedClipError):
    """Missing, empty, unreadable or inconsistent dataset folders and images."""

    exit_code = 2


class ModelError(FedClipError):
    """Unknown architecture, weights that are not there, checkpoints that do not fit."""

    exit_code = 3


class CacheError(FedClipError):
    """A feature cache file that is corrupt or belongs to another model or dataset."""

    exit_code = 4


class FrameError(FedClipError):
    """An update frame that fails decoding or validation (wire format)."""

    exit_code = 5


class ConfigError(FedClipError):
    """Options that contradict each other or name something that does not exist."""

    exit_code = 6


class ExportError(FedClipError):
    """An export that failed, missed its parity bound, or an artifact that does not verify."""

    exit_code = 7


class TransportError(FedClipError):
    """Broker unreachable, refused credentials, protocol violations."""

    exit_code = 8


class SigningError(FedClipError):
    """Keys that cannot be loaded or made, and signatures that do not verify."""

    exit_code = 9


class ModelStoreError(FedClipError):
    """A device's model store or version that is missing, corrupt, foreign or cannot change as
    asked (nothing to roll back to, a name that is not there)."""

    exit_code = 10


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, carrying what is kept and how to go on (e.g. "re-run with --resume"). The CLI
    prints it as one `interrupted: ...` line and exits 130; a plain KeyboardInterrupt gets the
    generic line."""
