"""Logging set-up: plain text for people, or one JSON object a line for log pipelines.

Records carry context as ``extra`` fields — ``stage``, ``consumer``, ``drive``, ``window``,
``stream``, ``entry`` — which the JSON format writes as keys, so logs can be filtered by
drive or window (``jq 'select(.drive == "d…")'``).
"""

from __future__ import annotations

import json
import logging
import time

#: Start-up records (which model a worker loaded, …) print at INFO even when the command
#: logs only warnings: a worker says what it runs with.
STARTUP_LOGGER = "roadstream.startup"

#: ``extra`` keys written by the JSON format when a record has them.
CONTEXT_FIELDS = ("stage", "consumer", "drive", "window", "stream", "entry")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message and the context fields."""

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update({key: getattr(record, key) for key in CONTEXT_FIELDS if getattr(record, key, None) is not None})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(level: int, fmt: str = "text") -> None:
    """Configure the root logger for a command.

    Parameters:
        level: the logging level.
        fmt: ``text`` or ``json``.
    """
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger(STARTUP_LOGGER).setLevel(min(level, logging.INFO))
