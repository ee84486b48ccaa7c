"""Training of roadstream's own models from the shared data.

``stages.train.scorer`` fine-tunes the roadwork frame scorer on footage clips;
``stages.train.detector`` trains the cone detector with ultralytics. Both run as
``python -m stages.train.<name>`` or through ``roadstream train <name>``, on CPU or GPU,
and write weights plus a metadata JSON (data, settings, validation figures, versions).
"""
