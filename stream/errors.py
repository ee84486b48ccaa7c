"""The one error tree of roadstream.

``RoadstreamError`` is the root; transport errors branch off ``BrokerError`` so that
the worker runtime never imports a client library to know a connection dropped.
"""

from __future__ import annotations


class RoadstreamError(Exception):
    """Root of every error roadstream raises on purpose."""


class ConfigError(RoadstreamError):
    """A setting or a config file is invalid."""


class DecodeError(RoadstreamError):
    """An entry could not be decoded into a known message.

    Parameters:
        reason: what was wrong, readable by a person.
        raw: the undecodable bytes, kept for the dead-letter stream.
    """

    def __init__(self, reason: str, raw: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.raw = raw


class BrokerError(RoadstreamError):
    """The transport failed."""


class BrokerConnectionError(BrokerError):
    """The transport's server could not be reached or dropped the connection."""


class WorkerFailed(RoadstreamError):
    """One of a worker's own tasks (reading, processing, heartbeat) ended unexpectedly.

    The worker stops and reports not-live; its process exits non-zero so that a
    supervisor restarts it. Its unacknowledged entries are reclaimed by others.
    """


class BrokerAuthError(BrokerError):
    """The server refused the credentials (WRONGPASS, NOAUTH): retrying will not help."""


class BrokerPermissionError(BrokerError):
    """The server's ACL denies a command or key to this user (NOPERM)."""


class BrokerOutOfMemory(BrokerConnectionError):
    """The server refused a write for want of memory (``maxmemory`` with ``noeviction``).

    A connection error for the runtime: the write is retried after a delay, as after an
    outage, until consumers have freed memory; never counted as the entries' failure.
    """


class InputError(RoadstreamError):
    """Bad input (a file, a frame, a model) that must be reported, not retried.

    Entries whose processing raises this are dead-lettered at once.
    """


class FootageError(InputError):
    """A footage file or folder cannot be used; the message names the file."""

    def __init__(self, path: object, problem: str) -> None:
        message = f"{path}: {problem}"
        super().__init__(message)
        self.path = str(path)
        self.problem = problem


class ModelError(InputError):
    """A model file is missing or is not the kind of model a stage needs."""
