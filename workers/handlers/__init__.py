"""The stage handlers: what each stage's worker does with a batch (``workers.handler.Handler``).

``ingest``, ``detect``, ``vera``, ``vlm`` and ``fuse`` each give a ``build(settings, blobs)``
that ``workers.registry`` names; the runtime beside this package (``workers.runtime``)
reads, claims and acknowledges for them, and the commands live in ``workers.cli``.
"""
