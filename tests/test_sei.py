"""SEI telemetry: the car's NAL layout, written by the generator and read back by ingest."""

from __future__ import annotations

from pathlib import Path

from fixtures import teslacam as tc
from stages import sei
from stages.decode import read_telemetry
from stages.proto.sei_pb2 import SeiMetadata


def test_a_nal_round_trips_through_emulation_prevention() -> None:
    # Given telemetry whose protobuf bytes contain 00 00 0x runs (zero speeds, small ints)
    meta = SeiMetadata(version=1, frame_seq_no=0x300, latitude_deg=0.0, longitude_deg=1e-310, heading_deg=0.0)
    # When it is written as a NAL and parsed back
    nal = sei.build_nal(meta)
    payload = sei.telemetry_payload(nal)
    # Then the NAL has no start-code emulation and the payload is the message again
    assert b"\x00\x00\x00" not in nal and b"\x00\x00\x01" not in nal
    assert sei.parse_metadata(payload) == meta


def test_other_user_data_and_other_nals_are_not_telemetry() -> None:
    # Given x264's own user-data SEI (a UUID, no 0x42 run) and a slice NAL
    x264 = bytes([6, 5, 20]) + bytes(range(0xDC, 0xEC)) + b"x264" + b"\x80"
    slice_nal = bytes([0x65, 0x88, 0x84, 0x00, 0x42, 0x69])
    # When the reader looks at them
    # Then neither yields a payload
    assert sei.telemetry_payload(x264) is None
    assert sei.telemetry_payload(slice_nal) is None


def test_long_payloads_use_the_extended_size_field() -> None:
    # Given a marker run long enough that the SEI payload passes 255 bytes
    meta = SeiMetadata(frame_seq_no=7, latitude_deg=30.5)
    nal = sei.build_nal(meta, fill=300)
    # When it is read
    # Then the size field's 0xFF bytes are skipped and the message is found
    assert sei.parse_metadata(sei.telemetry_payload(nal)) == meta


def test_telemetry_of_a_clip_is_read_frame_for_frame(tmp_path: Path) -> None:
    # Given a generated clip with telemetry on every frame
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat")
    written = drive.clips[(0, "front")].telemetry
    # When ingest reads it from the demuxed packets
    read = read_telemetry(drive.clip(0, "front"))
    # Then every frame carries exactly what the generator wrote
    assert sorted(read) == sorted(written)
    for pts, meta in written.items():
        assert read[pts] == sei.to_telemetry(meta)


def test_b_frames_keep_telemetry_on_its_own_picture(tmp_path: Path) -> None:
    # Given a clip with B-frames: decode order differs from presentation order
    spec = tc.ClipSpec(bframes=2)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=spec)
    written = drive.clips[(0, "front")].telemetry
    # When the telemetry is read
    read = read_telemetry(drive.clip(0, "front"))
    # Then each presentation time has its own frame sequence number, not its neighbour's
    assert {pts: t.frame_seq_no for pts, t in read.items()} == {pts: m.frame_seq_no for pts, m in written.items()}


def test_telemetry_that_stops_mid_clip_leaves_later_frames_without(tmp_path: Path) -> None:
    # Given SEI on the first 7 frames only (the car stopped writing it)
    spec = tc.ClipSpec(sei_frames=7)
    drive = tc.make_drive(tmp_path, minutes=1, cameras=("front",), layout="flat", spec=spec)
    # When it is read
    read = read_telemetry(drive.clip(0, "front"))
    # Then exactly those frames have telemetry, by their own times
    assert sorted(read) == [round(i / 30, 6) for i in range(7)]


def test_an_unset_or_impossible_gps_fix_is_no_position():
    # Given telemetry with latitude/longitude unset (0, 0), out of range, and valid
    from stages.proto.sei_pb2 import SeiMetadata
    from stages.sei import to_telemetry

    def tel(lat: float, lon: float):
        return to_telemetry(SeiMetadata(vehicle_speed_mps=13.0, latitude_deg=lat, longitude_deg=lon))

    # When mapped / Then only the valid one is a position; the speed is kept either way
    assert (tel(0.0, 0.0).lat, tel(0.0, 0.0).lon, tel(0.0, 0.0).speed_mps) == (None, None, 13.0)
    assert (tel(95.0, 10.0).lat, tel(30.0, 200.0).lon) == (None, None)
    assert (tel(30.2226, -97.6188).lat, tel(30.2226, -97.6188).lon) == (30.2226, -97.6188)
