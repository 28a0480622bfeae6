"""The VLM prompt writer against a real OpenAI-format HTTP server running in this test process."""

from __future__ import annotations

import base64
import io
import json
import socket
import time

import numpy as np
import pytest
from fake_vlm_server import ScriptedChatServer
from PIL import Image

from distill.prompts.template import fill_general_instruction_template, fill_student_prompt_template
from distill.prompts.vlm import (
    LocalTransformersVLM,
    OpenAICompatibleVLM,
    VLMConfig,
    VLMError,
    pick_pairs,
)


@pytest.fixture()
def server():
    s = ScriptedChatServer()
    yield s
    s.close()


def config(base_url: str, **kw) -> VLMConfig:
    defaults = dict(model="test-vlm", timeout_s=2.0, max_retries=2, backoff_s=0.01)
    defaults.update(kw)
    return VLMConfig(base_url=base_url, **defaults)


def pair(seed: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Image.fromarray(src), Image.fromarray(255 - src)


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_refine_student_prompt_sends_template_and_four_images(server, monkeypatch):
    monkeypatch.setenv("STUDIO_VLM_API_KEY", "sekrit")
    server.script = [("ok", '```\n"Invert every colour of the pet photo, keep the pose."\n```')]
    pairs = [pair(1), pair(2)]
    with OpenAICompatibleVLM(config(server.base_url)) as vlm:
        prompt = vlm.refine_student_prompt(pairs, "Invert the colours.")

    assert prompt.text == "Invert every colour of the pet photo, keep the pose."
    assert prompt.source == "vlm:test-vlm"
    assert len(server.requests) == 1
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sekrit"
    body = req["body"]
    assert body["model"] == "test-vlm"
    (message,) = body["messages"]
    texts = [p["text"] for p in message["content"] if p["type"] == "text"]
    urls = [p["image_url"]["url"] for p in message["content"] if p["type"] == "image_url"]
    assert texts == [fill_student_prompt_template("Invert the colours.")]
    assert 'rough prompt: "Invert the colours."' in texts[0]
    assert "You are provided with four images" in texts[0]
    assert len(urls) == 4
    # The images arrive intact and in Fig. 15's order: source 1, result 1, source 2, result 2.
    sent = [np.asarray(decode_data_url(u)) for u in urls]
    expected = [np.asarray(img) for p in pairs for img in p]
    for got, want in zip(sent, expected):
        np.testing.assert_array_equal(got, want)


def test_no_authorization_header_without_key(server, monkeypatch):
    monkeypatch.delenv("STUDIO_VLM_API_KEY", raising=False)
    with OpenAICompatibleVLM(config(server.base_url)) as vlm:
        vlm.write_instruction(pair(0)[0])
    assert "Authorization" not in server.requests[0]["headers"]


def test_write_instruction_sends_one_image(server):
    server.script = [("ok", "'Turn the sky into a sunset.'")]
    with OpenAICompatibleVLM(config(server.base_url + "/chat/completions")) as vlm:
        text = vlm.write_instruction(pair(0)[0])
    assert text == "Turn the sky into a sunset."
    content = server.requests[0]["body"]["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url", "text"]
    assert content[1]["text"] == fill_general_instruction_template()
    assert server.requests[0]["path"] == "/v1/chat/completions"


def test_slow_answer_times_out_then_retry_succeeds(server):
    server.script = [("slow", 1.0, "too late"), ("ok", "Make it warmer.")]
    t0 = time.monotonic()
    with OpenAICompatibleVLM(config(server.base_url, timeout_s=0.3)) as vlm:
        text = vlm.write_instruction(pair(0)[0])
    assert text == "Make it warmer."
    assert len(server.requests) == 2
    assert time.monotonic() - t0 < 1.0  # the client did not wait for the slow answer


def test_server_errors_exhaust_retries_with_clear_message(server):
    server.script = [("status", 503, '{"error": "overloaded"}')]
    vlm = OpenAICompatibleVLM(config(server.base_url, max_retries=2))
    with pytest.raises(VLMError) as info:
        vlm.write_instruction(pair(0)[0])
    msg = str(info.value)
    assert f"The captioning service at {server.base_url}/chat/completions did not answer after 3 tries" in msg
    assert "HTTP 503" in msg
    assert len(server.requests) == 3


def test_backoff_grows_exponentially(server):
    server.script = [("status", 500, "boom")]
    vlm = OpenAICompatibleVLM(config(server.base_url, max_retries=2, backoff_s=0.1))
    t0 = time.monotonic()
    with pytest.raises(VLMError, match="HTTP 500"):
        vlm.write_instruction(pair(0)[0])
    assert time.monotonic() - t0 >= 0.1 + 0.2  # waits 0.1 s then 0.2 s between the three tries


def test_429_is_retried(server):
    server.script = [("status", 429, "slow down"), ("ok", "Add snow.")]
    with OpenAICompatibleVLM(config(server.base_url)) as vlm:
        assert vlm.write_instruction(pair(0)[0]) == "Add snow."
    assert len(server.requests) == 2


def test_401_is_not_retried(server, monkeypatch):
    monkeypatch.delenv("STUDIO_VLM_API_KEY", raising=False)
    server.script = [("status", 401, '{"error": "invalid api key"}'), ("ok", "never sent")]
    vlm = OpenAICompatibleVLM(config(server.base_url))
    with pytest.raises(VLMError) as info:
        vlm.write_instruction(pair(0)[0])
    assert len(server.requests) == 1
    msg = str(info.value)
    assert "HTTP 401" in msg and "invalid api key" in msg
    assert "STUDIO_VLM_API_KEY is not set" in msg


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("<html>Bad Gateway</html>", "not with JSON"),
        ('{"choices": []}', "without any choices"),
        ('{"error": {"message": "model not loaded"}}', "model not loaded"),
        ('{"choices": [{"message": {"role": "assistant", "content": "  "}}]}', "empty message"),
        ('{"choices": [{"message": {"role": "assistant", "content": null}}]}', "empty message"),
        ("[1, 2]", "not a chat completion"),
    ],
)
def test_malformed_answers_give_clear_errors(server, body, expected):
    server.script = [("raw", body)]
    vlm = OpenAICompatibleVLM(config(server.base_url))
    with pytest.raises(VLMError, match=expected):
        vlm.write_instruction(pair(0)[0])
    assert len(server.requests) == 1  # a malformed answer is not retried


def test_content_parts_answer_is_joined(server):
    body = json.dumps(
        {
            "choices": [
                {
                    "message": {
                        "content": [
                            {"type": "text", "text": "Blur the "},
                            {"type": "text", "text": "background."},
                        ]
                    }
                }
            ]
        }
    )
    server.script = [("raw", body)]
    with OpenAICompatibleVLM(config(server.base_url)) as vlm:
        assert vlm.write_instruction(pair(0)[0]) == "Blur the background."


def test_unreachable_endpoint():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    vlm = OpenAICompatibleVLM(config(f"http://127.0.0.1:{port}/v1", max_retries=1))
    with pytest.raises(VLMError, match="did not answer after 2 tries \\(connection failed"):
        vlm.write_instruction(pair(0)[0])


def test_large_images_are_shrunk(server):
    big = Image.new("RGB", (300, 150), (10, 200, 30))
    with OpenAICompatibleVLM(config(server.base_url, max_image_side=64)) as vlm:
        vlm.write_instruction(big)
    url = server.requests[0]["body"]["messages"][0]["content"][0]["image_url"]["url"]
    img = decode_data_url(url)
    assert img.size == (64, 32)
    assert img.getpixel((5, 5)) == (10, 200, 30)


def test_pick_pairs():
    pairs = [pair(i) for i in range(6)]
    a = pick_pairs(pairs, 2, seed=3)
    assert len(a) == 2 and all(p in pairs for p in a) and a[0] is not a[1]
    assert pick_pairs(pairs, 2, seed=3) == a
    picks = {tuple(pairs.index(p) for p in pick_pairs(pairs, 2, seed=s)) for s in range(20)}
    assert len(picks) > 1  # the choice is random across seeds
    with pytest.raises(ValueError, match="at least 2 training pairs"):
        pick_pairs(pairs[:1], 2)


def test_local_vlm_missing_folder(tmp_path):
    with pytest.raises(VLMError, match="does not exist"):
        LocalTransformersVLM(tmp_path / "nope")
    with pytest.raises(VLMError, match="has no config.json"):
        LocalTransformersVLM(tmp_path)
