"""The OpenAI-compatible HTTP backend against a real server on loopback.

The server (``tests/vlm_tiny.py serve``) runs the tiny Qwen2-VL behind
``/v1/chat/completions`` in its own process; ``transformers serve`` refuses ``logprobs``
and ``response_format``, which this backend needs.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vlm_tiny import jpeg

from stages.vlm.base import Prompt, VlmImage, VlmOutputError, make_backend
from stages.vlm.openai_backend import BackendUnavailable, OpenAIBackend, json_request, yes_no_request
from stages.vlm.transformers_backend import TransformersBackend
from stream.errors import ConfigError
from stream.schemas import VlmAnswerBody
from stream.settings import VlmSettings

SERVER = Path(__file__).with_name("vlm_tiny.py")
QUESTION = "Is there roadwork? Answer yes or no."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, delay_s: float = 0.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, str(SERVER), "serve", str(model), "--port", str(port), "--delay", str(delay_s)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.stdout.readline().strip() == "ready":
            return proc, f"http://127.0.0.1:{port}/v1"
        if proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("the tiny OpenAI-compatible server did not start")


def stop_server(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_vlm_path):
    proc, url = start_server(tiny_vlm_path)
    yield url
    stop_server(proc)


def images(n: int) -> tuple[VlmImage, ...]:
    return tuple(VlmImage(jpeg((30 * i, 90, 160)), f"cam{i}") for i in range(n))


async def test_p_yes_over_http_matches_the_model_in_process(server, tiny_vlm_path):
    # Given the HTTP backend asking for every token's log-probability (tiny vocabulary)
    client = OpenAIBackend(model="tiny", base_url=server, top_logprobs=400)
    local = TransformersBackend(model=str(tiny_vlm_path))
    # When the same question over the same labelled images is scored both ways
    remote_score = await client.p_yes(QUESTION, images(2))
    local_score = await local.p_yes(QUESTION, images(2))
    await client.close()
    # Then the server really ran the model: the scores agree
    assert 0.0 < remote_score < 1.0
    assert remote_score == pytest.approx(local_score, abs=1e-3)


async def test_concurrent_requests_all_answer(server):
    # Given more prompts than the concurrency bound
    client = OpenAIBackend(model="tiny", base_url=server, top_logprobs=400, max_concurrency=2)
    prompts = [Prompt(QUESTION, images(1 + i % 2)) for i in range(6)]
    # When scored at once
    scores = await client.p_yes_many(prompts)
    await client.close()
    # Then every prompt has a score, and equal prompts equal scores
    assert len(scores) == 6 and scores[0] == pytest.approx(scores[2]) and scores[0] != scores[1]


async def test_invalid_json_from_the_server_is_retried_then_raised(server):
    # Given the random model behind the server
    client = OpenAIBackend(model="tiny", base_url=server, max_new_tokens=16, json_attempts=2)
    # When asked for a structured answer
    with pytest.raises(VlmOutputError) as caught:
        await client.answer_json("Is there roadwork?", images(1), VlmAnswerBody)
    await client.close()
    # Then the error carries what the model wrote
    assert "after 2 attempts" in str(caught.value) and caught.value.text


def test_requests_carry_logprobs_and_the_json_schema():
    prompt = Prompt("q?", images(2))
    yes_no = yes_no_request("m", prompt, 20)
    assert yes_no["max_tokens"] == 1 and yes_no["logprobs"] is True and yes_no["top_logprobs"] == 20
    parts = yes_no["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[0]["text"] == "Camera cam0:" and parts[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    body = json_request("m", prompt, VlmAnswerBody.model_json_schema(), max_tokens=64, temperature=0.0)
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["title"] == "VlmAnswerBody"


async def test_a_server_that_never_answers_times_out_after_retries():
    # Given a loopback server that accepts connections and never replies
    held: list[asyncio.StreamWriter] = []

    async def hang(reader, writer):
        held.append(writer)

    silent = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    client = OpenAIBackend(
        model="tiny", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=0.2, max_retries=2, backoff_s=0.01
    )
    # When a score is asked for
    with pytest.raises(BackendUnavailable, match="3 tries; last: timed out"):
        await client.p_yes(QUESTION, images(1))
    # Then each try opened a connection
    assert len(held) == 3
    await client.close()
    silent.close()


async def test_a_server_that_dies_mid_run_fails_the_requests_in_flight(tiny_vlm_path):
    # Given a server that takes a while per request, and requests in flight
    proc, url = start_server(tiny_vlm_path, delay_s=1.0)
    client = OpenAIBackend(model="tiny", base_url=url, max_retries=1, backoff_s=0.05, timeout_s=10)
    task = asyncio.create_task(client.p_yes_many([Prompt(QUESTION, images(1))] * 3))
    await asyncio.sleep(0.4)
    # When the server is killed
    stop_server(proc)
    # Then the requests fail as unavailable (retryable), not hang and not crash otherwise
    with pytest.raises(BackendUnavailable):
        await asyncio.wait_for(task, timeout=15)
    await client.close()


def test_factory_needs_a_base_url():
    with pytest.raises(ConfigError, match="base_url"):
        make_backend(VlmSettings(backend="openai", model="tiny"))
    made = make_backend(VlmSettings(backend="openai", model="tiny", base_url="http://127.0.0.1:1/v1"))
    assert isinstance(made, OpenAIBackend)
