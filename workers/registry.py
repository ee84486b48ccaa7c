"""Where each stage's handler is built: ``STAGE -> "module:function"``.

A builder takes ``(settings, blobs)`` and returns a ``workers.handler.Handler``. Modules
are imported only when their stage runs, so the CLI starts without loading torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from brokers.blobs import BlobStore
    from stream.settings import Settings
    from workers.handler import Handler

BUILDERS: dict[str, str] = {
    "ingest": "workers.handlers.ingest:build",
    "detect": "workers.handlers.detect:build",
    "vera": "workers.handlers.vera:build",
    "vlm": "workers.handlers.vlm:build",
    "fuse": "workers.handlers.fuse:build",
}


def builder(stage: str) -> Callable[[Settings, BlobStore], Handler]:
    """The function that builds a stage's handler.

    Raises:
        KeyError: no such stage; the message lists the known ones.
    """
    try:
        target = BUILDERS[stage]
    except KeyError:
        known = ", ".join(sorted(BUILDERS)) or "none"
        message = f"unknown stage {stage!r} (known: {known})"
        raise KeyError(message) from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
