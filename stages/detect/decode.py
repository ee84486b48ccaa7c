"""JPEG decoding for the detector: nvJPEG in one batched call on its own CUDA stream, or
(``decode="cpu"``) libjpeg-turbo in a thread pool straight into pinned memory, then one upload.

``JpegDecoding`` is a part of ``Detector`` (a mixin): it uses the detector's ``settings``,
``device``, ``cuda``, ``_decode_stream``, ``_decode_pool``, ``_device_lock`` and ``_mark``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import simplejpeg
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from stream.errors import InputError

#: What decoding makes of one blob: a ``uint8`` RGB tensor ``(3, H, W)`` on the device, or
#: the ``InputError`` that names the frame and the problem.
Decoded = torch.Tensor | InputError


class JpegDecoding:
    """The decode half of ``Detector``: JPEG bytes to frames on its device."""

    def decode(self, blobs: Sequence[bytes | None], names: Sequence[str] | None = None) -> list[Decoded]:
        """Decode JPEGs to frames on the detector's device: nvJPEG in one batched call, or
        (``decode="cpu"``) libjpeg-turbo threads and one upload.

        Parameters:
            blobs: JPEG bytes; ``None`` stands for a blob that expired.
            names: what to call each frame in an error (its blob key).

        Returns:
            Per frame, a ``uint8`` RGB tensor ``(3, H, W)`` on the device, or an
            ``InputError`` naming the frame and the problem.
        """
        started = time.perf_counter()
        names = names or [f"frame {i}" for i in range(len(blobs))]
        out: list = [None] * len(blobs)
        todo: list[int] = []
        for i, blob in enumerate(blobs):
            if not blob:
                out[i] = InputError(f"{names[i]}: frame blob is missing (expired or never stored)")
            else:
                todo.append(i)
        if self.settings.decode == "cpu":
            images = self._decode_host([blobs[i] for i in todo], [names[i] for i in todo])
            for i, image in zip(todo, images, strict=True):
                out[i] = image
            self._mark("decode", started)
            return out
        tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in todo]
        if self._decode_stream is None:
            images = self._decode_batch(tensors, [names[i] for i in todo])
        else:
            with self._device_lock, torch.cuda.stream(self._decode_stream):
                images = self._decode_batch(tensors, [names[i] for i in todo])
                self._decode_stream.synchronize()
        for i, image in zip(todo, images, strict=True):
            out[i] = image
        self._mark("decode", started)
        return out

    def _decode_batch(self, tensors: list[torch.Tensor], names: list[str]) -> list:
        if not tensors:
            return []
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            # One bad JPEG fails the whole batched call: decode one by one to name it.
            return [self._decode_one(t, n) for t, n in zip(tensors, names, strict=True)]

    def _decode_host(self, blobs: list[bytes], names: list[str]) -> list:
        """libjpeg-turbo decode in the pool's threads (the GIL is released), straight into one
        pinned buffer per frame size, then one upload and one HWC to CHW copy per size."""
        out: list = [None] * len(blobs)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, blob in enumerate(blobs):
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(blob)
            except ValueError as exc:
                out[i] = InputError(f"{names[i]}: frame does not decode as JPEG ({exc})")
                continue
            groups.setdefault((height, width), []).append(i)
        for (height, width), index in groups.items():
            host = torch.empty((len(index), height, width, 3), dtype=torch.uint8, pin_memory=self.cuda)
            rows = host.numpy()

            def decode_row(k: int, index: list[int] = index, rows: np.ndarray = rows) -> str | None:
                try:
                    simplejpeg.decode_jpeg(blobs[index[k]], colorspace="RGB", buffer=rows[k])
                except ValueError as exc:
                    return str(exc)
                return None

            errors = list(self._host_pool().map(decode_row, range(len(index))))
            if self._decode_stream is None:
                frames = host.permute(0, 3, 1, 2).contiguous()
            else:
                with self._device_lock, torch.cuda.stream(self._decode_stream):
                    frames = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
                    self._decode_stream.synchronize()  # the pinned buffer is free to go after this
            for k, i in enumerate(index):
                failed = errors[k]
                out[i] = frames[k] if failed is None else InputError(f"{names[i]}: frame does not decode as JPEG ({failed})")
        return out

    def _host_pool(self) -> ThreadPoolExecutor:
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="jpeg-decode")
        return self._decode_pool

    def _decode_one(self, data: torch.Tensor, name: str) -> torch.Tensor | InputError:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            reason = str(exc).rsplit(", ", 1)[-1].strip()
            return InputError(f"{name}: frame does not decode as JPEG ({reason})")
