"""An ingest worker process's CPU priority (``ingest.nice``).

A PyAV or decord ingest process keeps a core busy decoding; ``roadstream run`` starts one
per core beside detect, fuse and its Redis server. Such a process lowers its own priority
at start, so that those get the cores first and ingest fills the rest.

The rule: the process is niced unless it will decode with NVDEC, decided as the ingest
handler decides it (``stages.nvdec.choose_decoder``): ``pyav`` and ``decord`` always;
``auto`` and ``nvdec`` when NVDEC is unavailable here (no PyNvVideoCodec or no CUDA), or
when the handler decodes with PyAV all the same (``ingest.sample = keyframes``, or
``ingest.encoding = raw``). An NVDEC process keeps its priority: its
CPU work feeds the GPU decoder. ``ingest_niceness`` is that rule, pure;
``lower_ingest_priority`` applies it, once, in ``roadstream worker ingest`` (one stage in
the process): never in a process that runs several stages.
"""

from __future__ import annotations

import logging
import os

from stream.settings import Settings
from workers.logs import STARTUP_LOGGER

startup = logging.getLogger(STARTUP_LOGGER)

#: ``ingest.decoder`` values that decode with NVDEC when it is available.
NVDEC_SETTINGS = ("auto", "nvdec")


def ingest_niceness(settings: Settings, nvdec_unavailable: str | None) -> int:
    """The increment an ingest worker process adds to its niceness: ``ingest.nice`` or 0.

    Parameters:
        settings: all settings; ``ingest.nice`` and ``ingest.decoder`` are used.
        nvdec_unavailable: ``stages.nvdec.nvdec_unavailable()``'s answer (``None``: NVDEC
            can be used); only read for ``auto`` and ``nvdec``.

    Returns:
        0 when the process will decode with NVDEC or ``ingest.nice`` is 0, else ``ingest.nice``.
    """
    ingest = settings.ingest
    if ingest.nice == 0:
        return 0
    if ingest.decoder in NVDEC_SETTINGS:
        from stages.nvdec import choose_decoder, decodes_with_nvdec

        decoder = choose_decoder(ingest.decoder, nvdec_unavailable)[0]
        if decodes_with_nvdec(decoder, ingest.sample, ingest.encoding):
            return 0
    return ingest.nice


def lower_ingest_priority(settings: Settings) -> int:
    """Nice this ingest worker process by ``ingest_niceness`` and log it; call it once.

    An ``os.nice`` that fails is logged and the worker goes on at its priority.

    Returns:
        The increment applied (0 when none was, or it failed).
    """
    decoder = settings.ingest.decoder
    unavailable = None
    if settings.ingest.nice and decoder in NVDEC_SETTINGS:
        from stages.nvdec import nvdec_unavailable  # imports torch only when PyNvVideoCodec imports

        unavailable = nvdec_unavailable()
    increment = ingest_niceness(settings, unavailable)
    if increment == 0:
        return 0
    used = "pyav" if decoder in NVDEC_SETTINGS else decoder  # auto/nvdec niced: PyAV decodes here
    try:
        now = os.nice(increment)
    except OSError as exc:
        startup.warning("ingest: could not lower this process's priority by %d (ingest.nice): %s; "
                        "going on at its own", increment, exc)  # fmt: skip
        return 0
    startup.info("ingest: niceness +%d (ingest.nice), now %d: %s decoding leaves the cores to detect, fuse "
                 "and Redis first", increment, now, used)  # fmt: skip
    return increment
