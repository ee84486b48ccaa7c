"""roadstream's vocabulary: schemas, codec, names, ids, settings and errors."""

__version__ = "0.1.0"
