"""A tiny Qwen2-VL-style vision-language model built locally, for tests and CPU benchmarks.

Nothing is downloaded: the config is written here with toy sizes and random weights, the
byte-level BPE tokenizer is trained on a few sentences with the ``tokenizers`` library,
and the processor is Qwen2-VL's own, all saved to a folder so that the REAL
``from_pretrained`` loading path of ``AutoModelForImageTextToText`` / ``AutoProcessor``
runs against it.

Also a small OpenAI-compatible server (``/v1/chat/completions``) that answers with that
model through ``stages.vlm.transformers_backend`` — ``transformers serve`` rejects
``logprobs``/``top_logprobs``/``response_format``, which the HTTP backend needs::

    python3 tests/vlm_tiny.py build DIR
    python3 tests/vlm_tiny.py serve DIR --port 8123 [--delay 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the project importable
    sys.path.insert(0, str(ROOT))

#: Bump when the built files change, so cached copies are rebuilt.
TINY_VERSION = "1"

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template, trimmed to text and image parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "Yes yes YES No no NO yes. no. Answer yes or no. yes no Yes No",
    'Is there roadwork? {"roadwork": true, "confidence": 0.9, "objects": [], "lanes_affected": 1}',
    '{"questions": ["Are there traffic cones on the road?", "Is a lane closed?"]}',
    "cone drum barrier barricade arrow board worker sign lane closed construction zone camera front back",
    "0 1 2 3 4 5 6 7 8 9 . , : ; \" { } [ ] true false null description",
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4 + ["yes no Yes No"] * 20, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _config(tokenizer):
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 1,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
    )


def build_tiny_vlm(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random Qwen2-VL model, tokenizer and processor to ``path``.

    Parameters:
        path: the folder to write (created; reused when it already holds this version).
        seed: the torch seed of the random weights.

    Returns:
        The folder, ready for ``from_pretrained``.
    """
    import torch
    from transformers import (
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    stamp = path / "tiny_version.txt"
    if stamp.exists() and stamp.read_text() == TINY_VERSION:
        return path
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    model = Qwen2VLForConditionalGeneration(_config(tokenizer)).eval()
    # Small images keep CPU runs short: at most 8x8 patches of 14 px, 16 tokens after merging.
    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=112 * 112)
    videos = Qwen2VLVideoProcessor(min_pixels=28 * 28, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(
        image_processor=images, tokenizer=tokenizer, video_processor=videos, chat_template=CHAT_TEMPLATE
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    stamp.write_text(TINY_VERSION)
    return path


def jpeg(color: tuple[int, int, int] = (200, 120, 40), size: tuple[int, int] = (64, 48)) -> bytes:
    """A small solid-colour JPEG with a stripe, for test images."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).rectangle([0, size[1] // 3, size[0], size[1] // 2], fill=(255, 140, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


# -- the OpenAI-compatible test server --------------------------------------------------


def _images_and_text(messages: list[dict]):
    from stages.vlm.base import VlmImage

    images: list[VlmImage] = []
    texts: list[str] = []
    pending_label: str | None = None
    for message in messages:
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                data = base64.b64decode(url.split(",", 1)[1])
                images.append(VlmImage(data, pending_label))
                pending_label = None
            elif part.get("type") == "text":
                text = part["text"]
                # The client labels each image with a text part just before it.
                if text.startswith("Camera ") and text.endswith(":"):
                    pending_label = text[len("Camera ") : -1]
                else:
                    texts.append(text)
    return "\n".join(texts), images


class _Server:
    """The model behind the HTTP handler; model calls run on one asyncio loop thread."""

    def __init__(self, model_dir: str, delay_s: float) -> None:
        from stages.vlm.transformers_backend import TransformersBackend

        self.backend = TransformersBackend(model=model_dir, device="cpu", batch_size=4)
        self.delay_s = delay_s
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.run(self.backend.load())  # like vllm serve: ready once the model is loaded

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def complete(self, body: dict) -> dict:
        from stages.vlm.base import Prompt

        if self.delay_s:
            time.sleep(self.delay_s)
        text, images = _images_and_text(body["messages"])
        prompt = Prompt(text, tuple(images))
        if body.get("logprobs"):
            top = self.run(self.backend.top_logprobs(prompt, int(body.get("top_logprobs") or 5)))
            first = top[0][0]
            content = [
                {
                    "token": first,
                    "logprob": top[0][1],
                    "top_logprobs": [{"token": t, "logprob": lp} for t, lp in top],
                }
            ]
            return _completion(body, first, {"content": content})
        # response_format is accepted but not enforced: a random tiny model writes what it writes.
        temperature = float(body.get("temperature") or 0.0)
        max_tokens = int(body.get("max_tokens") or 64)
        (out,) = self.run(self.backend.generate([prompt], max_tokens=max_tokens, temperature=temperature))
        return _completion(body, out, None)


def _completion(body: dict, text: str, logprobs: dict | None) -> dict:
    return {
        "id": f"chatcmpl-{time.time_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "tiny"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": "length",
            }
        ],
    }


def make_handler(server: _Server) -> type[BaseHTTPRequestHandler]:
    """An HTTP handler class bound to one loaded model."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                self._send(400, {"error": {"message": "body is not JSON"}})
                return
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": "not found"}})
                return
            try:
                self._send(200, server.complete(body))
            except Exception as exc:  # noqa: BLE001 - report to the client like a real server would
                self._send(500, {"error": {"message": f"{type(exc).__name__}: {exc}"}})

    return Handler


def serve(model_dir: str, port: int, delay_s: float = 0.0) -> None:
    """Serve the model on 127.0.0.1:port until killed; prints ``ready`` once listening."""
    httpd = ThreadingHTTPServer(("127.0.0.1", port), make_handler(_Server(model_dir, delay_s)))
    print("ready", flush=True)
    httpd.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    build = sub.add_parser("build")
    build.add_argument("dir")
    run = sub.add_parser("serve")
    run.add_argument("dir")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    if args.cmd == "build":
        print(build_tiny_vlm(args.dir))
    else:
        serve(args.dir, args.port, args.delay)


if __name__ == "__main__":
    main()


# -- fixture segments ------------------------------------------------------------------

#: Colours of fixture frames: roadwork segments are orange-heavy, others grey-blue.
ROADWORK_COLOR = (240, 120, 20)
PLAIN_COLOR = (90, 100, 120)


def fixture_segment(drive: str, camera: str, index: int, *, frames: int = 3, roadwork: bool = False):
    """A ``Segment`` of ``frames`` key frames and its blobs (blob key -> JPEG).

    Returns:
        (segment, blobs) — put the blobs in a store before a worker reads the segment.
    """
    from stream.ids import blob_key
    from stream.schemas import KeyFrame, Segment

    color = ROADWORK_COLOR if roadwork else PLAIN_COLOR
    blobs: dict[str, bytes] = {}
    key_frames = []
    for i in range(frames):
        seq = index * 50 + i * 10
        key = blob_key(drive, camera, seq)
        blobs[key] = jpeg(tuple(min(255, c + 7 * i) for c in color))
        key_frames.append(KeyFrame(seq=seq, tick=seq, t=seq / 5.0, blob_key=key))
    segment = Segment(
        drive_id=drive,
        camera=camera,
        index=index,
        t_start=index * 10.0,
        t_end=index * 10.0 + 10.0,
        key_frames=key_frames,
        frames_total=50,
        frames_kept=frames,
        descriptor=[1.0, float(roadwork), float(index % 2)],
    )
    return segment, blobs
