"""GPU decoding with NVIDIA's PyNvVideoCodec (NVDEC): decode, resize and JPEG-encode on the GPU.

The sampling is the PyAV path's (``stages.decode``): a demux-only PyAV pass gives every
frame's presentation time and telemetry SEI, ``pick_nearest`` chooses the frame of each
tick, and NVDEC decodes the clip in display order (frame *i* is the *i*-th smallest
pts). The chosen frames are resized on the GPU and encoded there with torchvision's
nvJPEG ``encode_jpeg``, so decoded pixels never cross to the host: only the JPEG bytes do.

PyNvVideoCodec is optional (``pip install 'roadstream[nvdec]'``) and needs the driver's
``libnvcuvid``. ``choose_decoder`` says what a worker decodes with when it is missing;
``nvdec_refuses`` names the clips NVDEC cannot take (codec, size), which the ingest worker
hands to PyAV with a log line.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stages.decode import (
    ClipInfo,
    ClipStats,
    Sample,
    _Candidate,
    _SeiReader,
    clip_info,
    half_interval,
    open_container,
    pick_nearest,
)
from stages.frames import Encoded, target_size
from stream.errors import FootageError

#: Codecs NVDEC decodes here (TeslaCam writes H.264; some firmware HEVC).
NVDEC_CODECS = frozenset({"h264", "hevc"})
#: NVDEC's picture size limits per codec, (min side, max width, max height) in pixels.
NVDEC_LIMITS = {"h264": (48, 4096, 4096), "hevc": (144, 8192, 8192)}
#: Decoded frames fetched from the decoder per call.
BATCH = 16


def nvdec_unavailable() -> str | None:
    """Why NVDEC cannot be used in this process; ``None`` when it can."""
    try:
        import PyNvVideoCodec  # noqa: F401 - only whether it imports
    except ImportError as exc:  # also: libnvcuvid missing (the module fails to load)
        return f"PyNvVideoCodec cannot be imported ({exc}); install roadstream[nvdec]"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def choose_decoder(setting: str, unavailable: str | None) -> tuple[str, str | None]:
    """The decoder a worker uses for ``ingest.decoder``, and a note when it is not the one asked.

    Parameters:
        setting: ``pyav``, ``decord``, ``nvdec`` or ``auto``.
        unavailable: ``nvdec_unavailable()``'s answer.

    Returns:
        (``pyav`` | ``decord`` | ``nvdec``, a line to log or ``None``).
    """
    if setting not in ("auto", "nvdec"):
        return setting, None
    if unavailable is None:
        return "nvdec", None
    return "pyav", f"ingest.decoder={setting}: {unavailable}; decoding with PyAV"


def decodes_with_nvdec(decoder: str, sample: str, encoding: str) -> bool:
    """Whether an ingest process whose decoder resolved to ``decoder`` (``choose_decoder``)
    decodes clips with NVDEC: only ticks (``ingest.sample``) into JPEG (``ingest.encoding``);
    keyframe sampling and raw frames go through PyAV in such a process too."""
    return decoder == "nvdec" and sample != "keyframes" and encoding == "jpeg"


def nvdec_refuses(info: ClipInfo) -> str | None:
    """Why NVDEC cannot take a clip (codec, picture size); ``None`` when it can."""
    if info.codec not in NVDEC_CODECS:
        return f"codec {info.codec} is not one NVDEC decodes here ({', '.join(sorted(NVDEC_CODECS))})"
    low, max_w, max_h = NVDEC_LIMITS[info.codec]
    if min(info.width, info.height) < low or info.width > max_w or info.height > max_h:
        return f"{info.width}x{info.height} is outside NVDEC's {info.codec} range ({low} to {max_w}x{max_h})"
    return None


@dataclass(frozen=True)
class Timeline:
    """A clip's frames in display order, from a demux-only pass."""

    info: ClipInfo
    candidates: list[_Candidate]  # display order; ``frame`` holds the display index
    reader: _SeiReader


def timeline(path: Path) -> Timeline:
    """Every frame's presentation time (display order) and the telemetry SEI, without decoding.

    Raises:
        FootageError: the file cannot be opened or demuxed.
    """
    import av

    with open_container(path) as container:
        stream = container.streams.video[0]
        info = clip_info(container)
        reader = _SeiReader(stream)
        pts: list[int] = []
        try:
            for packet in container.demux(stream):
                reader.read(packet)
                if packet.pts is not None and packet.size:
                    pts.append(packet.pts)
        except av.FFmpegError as exc:
            raise FootageError(path, f"cannot demux ({exc})") from exc
        base, tb = stream.start_time or 0, float(stream.time_base)
    ordered = sorted(pts)
    candidates = [_Candidate(round((p - base) * tb, 6), p, i) for i, p in enumerate(ordered)]
    return Timeline(info, candidates, reader)


def wanted(
    line: Timeline, sample_fps: float, limit_s: float, tolerance_s: float | None = None,
    missed: list[float] | None = None,
) -> list[tuple[int, float, _Candidate]]:
    """The (tick index, tick time, frame) picks of a clip, as the PyAV path makes them (by
    default a tolerance of half the local frame spacing); ``missed`` gets the tick times
    that had no frame near."""
    nominal = half_interval(line.info.fps)
    return list(pick_nearest(iter(line.candidates), 1.0 / sample_fps, tolerance_s, limit_s, nominal_s=nominal,
                             missed=missed))  # fmt: skip


class NvdecSampler:
    """Decodes clips on one GPU and yields their sampled frames as JPEGs encoded there.

    Parameters:
        device: the CUDA device (``cuda:0`` …).
        long_side: the longest side after resizing (no upscaling).
        quality: JPEG quality, 1-100.

    Raises:
        FootageError: from ``sample`` when NVDEC fails on a clip before any frame (the
            caller falls back to PyAV).
    """

    def __init__(self, device: str = "cuda:0", *, long_side: int = 640, quality: int = 85) -> None:
        import PyNvVideoCodec as nvc
        import torch

        self.nvc = nvc
        self.device = torch.device(device)
        self.long_side = long_side
        self.quality = quality

    def warm_up(self, size: tuple[int, int] = (1280, 960)) -> None:
        """Start CUDA on the device, and resize and nvJPEG-encode one grey frame of ``size``
        (width, height; a Tesla HW3 camera's by default) there, so that the first clip pays
        none of that (the worker calls it before it takes a job)."""
        import torch
        from torchvision.io import encode_jpeg

        grey = torch.full((3, size[1], size[0]), 114, dtype=torch.uint8, device=self.device)
        info = ClipInfo(codec="h264", width=size[0], height=size[1], fps=36.0, frames=0, creation_utc=None)
        encode_jpeg([self._resized(grey, info)], quality=self.quality)
        torch.cuda.synchronize(self.device)

    def sample(self, path: str | Path, *, sample_fps: float, limit_s: float = float("inf"),
               line: Timeline | None = None, stats: ClipStats | None = None) -> Iterator[Sample]:  # fmt: skip
        """Yield one ``Sample`` per tick, its ``image`` an ``Encoded`` JPEG (see the module docstring).
        ``stats`` gets the frames the index promises and the ticks without a frame near.

        Raises:
            FootageError: NVDEC cannot open or decode the clip.
        """
        path = Path(path)
        line = line or timeline(path)
        stats = stats if stats is not None else ClipStats()
        missed: list[float] = []
        picks = wanted(line, sample_fps, limit_s, missed=missed)
        stats.expected = stats.decoded = len(line.candidates)
        stats.missed = missed
        by_index = {item.frame: (k, tick, item) for k, tick, item in picks}
        if not picks:
            return
        last = max(by_index)
        try:
            decoder = self.nvc.SimpleDecoder(
                str(path), gpu_id=self.device.index or 0, use_device_memory=True,
                output_color_type=self.nvc.OutputColorType.RGBP,
            )
        except Exception as exc:  # the library raises its own types (unsupported, CUDA)
            raise FootageError(path, f"NVDEC cannot open the clip ({exc})") from exc
        index, pending = 0, []
        while index <= last:
            try:
                frames = decoder.get_batch_frames(BATCH)
            except Exception as exc:
                raise FootageError(path, f"NVDEC stopped after {index} frames ({exc})") from exc
            if not frames:
                break
            try:
                for frame in frames:
                    if index in by_index:
                        pending.append((by_index[index], self._resized(frame, line.info)))
                    index += 1
                samples = list(self._encoded(pending, line.reader))
            except Exception as exc:  # DLPack, resize or nvJPEG: a clip problem, never a crash
                raise FootageError(path, f"NVDEC frames could not be resized or encoded ({exc})") from exc
            yield from samples
            pending = []

    def _resized(self, frame, info: ClipInfo):
        import torch
        import torch.nn.functional as F  # noqa: N812

        # Zero-copy view of the decoder's surface (planar RGB, 3×H×W uint8): resized at
        # once into a tensor of our own, before the decoder reuses the surface.
        image = torch.from_dlpack(frame)
        width, height = target_size(info.width, info.height, self.long_side)
        if (width, height) == (info.width, info.height):
            return image.clone()
        scaled = F.interpolate(image[None].float(), size=(height, width), mode="bilinear", antialias=True)
        return scaled[0].round().clamp(0, 255).to(torch.uint8)

    def _encoded(self, pending: list, reader: _SeiReader) -> Iterator[Sample]:
        from torchvision.io import encode_jpeg

        if not pending:
            return
        jpegs = encode_jpeg([image for _, image in pending], quality=self.quality)  # nvJPEG, one batch
        for ((k, tick, item), image), data in zip(pending, jpegs, strict=True):
            encoded = Encoded(bytes(data.cpu().numpy().tobytes()), int(image.shape[2]), int(image.shape[1]), "jpeg")
            yield Sample(k, tick, item.pts_s, encoded, reader.telemetry(item.pts))
