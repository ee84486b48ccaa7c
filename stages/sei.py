"""Per-frame telemetry in TeslaCam clips: H.264/H.265 SEI user-data NAL units.

Layout of one telemetry NAL (see ``/work/shared/reference.md``): NAL header, SEI payload
type 5 (user data unregistered), payload size, then a run of ``0x42`` bytes closed by
``0x69`` (together the 16-byte "UUID" field), then a ``SeiMetadata`` protobuf with
``00 00 03`` emulation-prevention bytes, then the RBSP trailing byte.

An SEI belongs to the picture of its access unit. A demuxed packet is one access unit,
so the reader keys telemetry by the packet's presentation timestamp: that stays right
when B-frames make decode order differ from presentation order, and when the SEI is
absent for some frames or stops mid-clip (never align by SEI count).
"""

from __future__ import annotations

import math

from collections.abc import Iterator

from google.protobuf.message import DecodeError as ProtoDecodeError

from stages.proto.sei_pb2 import SeiMetadata
from stream.schemas import Telemetry

H264_SEI = 6
HEVC_SEI_PREFIX = 39
USER_DATA_UNREGISTERED = 5
MARKER_FILL = 0x42
MARKER_END = 0x69

_GEARS = {0: "park", 1: "drive", 2: "reverse", 3: "neutral"}
_AUTOPILOT = {0: "none", 1: "self_driving", 2: "autosteer", 3: "tacc"}


def iter_avcc_nals(data: bytes, length_size: int = 4) -> Iterator[bytes]:
    """Split a length-prefixed (MP4/AVCC) packet into NAL units; stops at a torn one."""
    pos, end = 0, len(data)
    while pos + length_size <= end:
        size = int.from_bytes(data[pos : pos + length_size], "big")
        pos += length_size
        if size == 0 or pos + size > end:
            return
        yield data[pos : pos + size]
        pos += size


def iter_annexb_nals(data: bytes) -> Iterator[bytes]:
    """Split an Annex-B byte stream (start codes ``00 00 01``) into NAL units."""
    starts = []
    i = data.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i + 3)
        i = data.find(b"\x00\x00\x01", i + 3)
    for n, start in enumerate(starts):
        stop = starts[n + 1] - 3 if n + 1 < len(starts) else len(data)
        nal = data[start:stop]
        yield nal.rstrip(b"\x00") if n + 1 < len(starts) else nal


def remove_emulation_prevention(data: bytes) -> bytes:
    """Undo H.264 emulation prevention: drop the ``03`` of every ``00 00 03``."""
    if b"\x00\x00\x03" not in data:
        return data
    out = bytearray()
    zeros = 0
    for byte in data:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def add_emulation_prevention(data: bytes) -> bytes:
    """Insert ``03`` wherever two zero bytes precede a byte ≤ 3 (the writer's side)."""
    out = bytearray()
    zeros = 0
    for byte in data:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _read_sei_number(nal: bytes, pos: int) -> tuple[int, int]:
    # SEI payload type and size: a run of 0xFF bytes adds 255 each, then a last byte.
    value = 0
    while pos < len(nal) and nal[pos] == 0xFF:
        value += 255
        pos += 1
    if pos >= len(nal):
        return -1, pos
    return value + nal[pos], pos + 1


def telemetry_payload(nal: bytes, hevc: bool = False) -> bytes | None:
    """The protobuf bytes of a telemetry SEI NAL, or ``None`` for any other NAL."""
    header = 2 if hevc else 1
    if len(nal) < header + 4:
        return None
    kind = (nal[0] >> 1) & 0x3F if hevc else nal[0] & 0x1F
    if kind != (HEVC_SEI_PREFIX if hevc else H264_SEI):
        return None
    payload_type, pos = _read_sei_number(nal, header)
    if payload_type != USER_DATA_UNREGISTERED:
        return None
    _size, pos = _read_sei_number(nal, pos)
    start = pos
    while pos < len(nal) and nal[pos] == MARKER_FILL:
        pos += 1
    if pos == start or pos >= len(nal) - 1 or nal[pos] != MARKER_END:
        return None  # another tool's user data (x264 writes its version this way)
    return remove_emulation_prevention(nal[pos + 1 : -1])


def parse_metadata(payload: bytes) -> SeiMetadata | None:
    """Parse telemetry protobuf bytes; ``None`` when they do not parse."""
    meta = SeiMetadata()
    try:
        meta.ParseFromString(payload)
    except ProtoDecodeError:
        return None
    return meta


def position(lat: float, lon: float) -> tuple[float | None, float | None]:
    """A GPS fix as ``(lat, lon)``, or ``(None, None)`` when it is no position.

    Latitude and longitude left unset (proto3 reads them as 0, 0: the car had no fix yet,
    leaving a garage) or outside the globe (or not finite) are no position.
    """
    if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        return None, None
    if lat == 0.0 and lon == 0.0:
        return None, None
    return lat, lon


def to_telemetry(meta: SeiMetadata) -> Telemetry:
    """Map the car's protobuf onto the pipeline's ``Telemetry`` schema (no fix: no lat/lon)."""
    lat, lon = position(meta.latitude_deg, meta.longitude_deg)
    return Telemetry(
        version=meta.version,
        gear=_GEARS.get(meta.gear_state),
        frame_seq_no=meta.frame_seq_no,
        speed_mps=meta.vehicle_speed_mps,
        accelerator=meta.accelerator_pedal_position,
        steering_angle=meta.steering_wheel_angle,
        blinker_left=meta.blinker_on_left,
        blinker_right=meta.blinker_on_right,
        brake=meta.brake_applied,
        autopilot=_AUTOPILOT.get(meta.autopilot_state),
        lat=lat,
        lon=lon,
        heading=meta.heading_deg,
        accel_x=meta.linear_acceleration_mps2_x,
        accel_y=meta.linear_acceleration_mps2_y,
        accel_z=meta.linear_acceleration_mps2_z,
    )


def build_nal(meta: SeiMetadata, fill: int = 15) -> bytes:
    """Write one telemetry SEI NAL (no start code) as the car does.

    Parameters:
        meta: the telemetry of the picture that follows.
        fill: how many ``0x42`` bytes precede the ``0x69`` marker (15 makes the
            marker exactly the 16-byte UUID field of user data unregistered).

    Returns:
        The NAL unit bytes, emulation prevention applied.
    """
    body = bytes([MARKER_FILL] * fill + [MARKER_END]) + meta.SerializeToString()
    size = len(body)
    size_bytes = b"\xff" * (size // 255) + bytes([size % 255])
    rbsp = bytes([USER_DATA_UNREGISTERED]) + size_bytes + body + b"\x80"
    return bytes([H264_SEI]) + add_emulation_prevention(rbsp)
