"""Stream, group and key names, built in one place.

Every hop of the pipeline is one Redis stream; the hops into stateful stages are
partitioned (``frames:{p}``, ``detections:{q}`` …) so that one worker sees a
partition's entries in order. The ``{p}`` braces double as Redis Cluster hash tags,
so a partition's stream and its dedupe and lease keys share a slot. Streams of
non-partitioned hops (``rs:jobs``, ``rs:verdicts`` …) have no braces: each hashes by its
whole name, so they land on slots of their own, spread over a cluster's nodes.
"""

from __future__ import annotations

import hashlib

#: Default key namespace; lets several deployments share one Redis server.
DEFAULT_NAMESPACE = "rs"

# Hops (stream base names).
JOBS = "jobs"
FRAMES = "frames"
SEGMENTS = "segments"
DETECTIONS = "detections"
ANOMALY = "anomaly"
ESCALATIONS = "escalations"
ANSWERS = "answers"
VERDICTS = "verdicts"
DRIVES = "drives"
DEADLETTERS = "deadletters"

# Consumer groups: one per stage.
INGEST = "ingest"
DETECT = "detect"
VERA = "vera"
VLM = "vlm"
FUSE = "fuse"

STAGES = (INGEST, DETECT, VERA, VLM, FUSE)

#: Which hops each stage reads, and whether they are partitioned.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    INGEST: (JOBS,),
    DETECT: (FRAMES,),
    VERA: (SEGMENTS,),
    VLM: (ESCALATIONS,),
    FUSE: (DETECTIONS, ANOMALY, ANSWERS),
}
PARTITIONED_HOPS = frozenset({FRAMES, DETECTIONS, ANOMALY, ANSWERS})


def stream_name(hop: str, partition: int | None = None, ns: str = DEFAULT_NAMESPACE) -> str:
    """Name of a hop's stream, or of one partition of a partitioned hop."""
    if partition is None:
        return f"{ns}:{hop}"
    return f"{ns}:{hop}:{{{partition}}}"


def dead_letter_name(ns: str = DEFAULT_NAMESPACE) -> str:
    """The one dead-letter stream of a namespace; entries name their source stream."""
    return stream_name(DEADLETTERS, ns=ns)


def lease_name(group: str, partition: int, ns: str = DEFAULT_NAMESPACE) -> str:
    """Key that says which consumer of ``group`` owns ``partition``."""
    return f"{ns}:lease:{group}:{{{partition}}}"


def members_name(group: str, ns: str = DEFAULT_NAMESPACE) -> str:
    """Key of the live members of a partitioned group (for rebalancing)."""
    return f"{ns}:members:{group}"


def blob_name(key: str, ns: str = DEFAULT_NAMESPACE) -> str:
    """Redis key of one stored blob.

    Its cluster hash tag is the key less a trailing ``:seq`` (a frame's ``drive:camera``,
    ``stream.ids.blob_key``), else the whole key: one camera's frames share a slot, so
    a detect batch, drawn from the few partitions its worker owns, is a few MGETs, while
    the drives and cameras spread over every slot. Keys made from a blob's name
    (``…:version``) share its slot, so one script may touch both.
    """
    head, sep, seq = key.rpartition(":")
    if sep and head and seq.isdigit():
        return f"{ns}:blob:{{{head}}}:{seq}"
    return f"{ns}:blob:{{{key}}}"


def health_name(group: str, consumer: str, ns: str = DEFAULT_NAMESPACE) -> str:
    """Key a worker writes its health record to (with a TTL)."""
    return f"{ns}:health:{group}:{consumer}"


def error_name(group: str, stream: str, entry_id: str, ns: str = DEFAULT_NAMESPACE) -> str:
    """Key of the last error ``group`` met processing one entry (kept a while, for reports)."""
    return f"{ns}:error:{group}:{stream}:{entry_id}"


def stream_partition(stream: str) -> int | None:
    """The partition of a partitioned hop's stream name (``ns:hop:{p}``), or None when the
    name has no ``:{p}`` suffix."""
    if stream.endswith("}") and ":{" in stream:
        return int(stream.rsplit(":{", 1)[1][:-1])
    return None


def parse_entry_id(text: str, *, upper: bool = False) -> tuple[int, int]:
    """A stream entry id as a tuple that sorts like the stream does.

    Parameters:
        text: ``ms-seq``; or, as a range bound, ``ms`` alone (the whole millisecond),
            ``-`` (the first id) or ``+`` (past the last).
        upper: ``ms`` alone is an upper bound: it takes the millisecond's last id.

    Returns:
        ``(ms, seq)``.
    """
    if text == "-":
        return (0, 0)
    if text == "+":
        return (2**64, 0)
    ms, sep, seq = text.partition("-")
    if not sep:  # "ms" alone means the whole millisecond
        return (int(ms), 2**64 if upper else 0)
    return (int(ms), int(seq or 0))


def stable_hash(*parts: str) -> int:
    """A hash that is the same in every process (unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def frame_partition(drive_id: str, camera: str, partitions: int) -> int:
    """Partition of the frames hop that holds one camera of one drive."""
    return stable_hash(drive_id, camera) % partitions


def drive_partition(drive_id: str, partitions: int) -> int:
    """Partition of the fuse hops that holds one drive."""
    return stable_hash(drive_id) % partitions
