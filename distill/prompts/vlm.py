"""Prompt writers backed by a vision-language model: any OpenAI-compatible chat endpoint, or a
transformers VLM (e.g. Qwen2.5-VL) from a local folder.

The paper (appendix 9) sends two randomly sampled training pairs and the teacher prompt through the
Fig. 15 template to Qwen-VL-Max; ``refine_student_prompt`` does the same with whichever VLM is set up.
"""

from __future__ import annotations

import base64
import io
import os
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from .base import ImagePair, StudentPrompt
from .template import clean_answer, fill_general_instruction_template, fill_student_prompt_template


class VLMError(RuntimeError):
    """The VLM could not be reached, refused, or answered something unusable. The message says which."""


@dataclass(frozen=True)
class VLMConfig:
    """An OpenAI-compatible chat completions endpoint (vLLM, SGLang, Ollama, DashScope, OpenAI...)."""

    base_url: str  # e.g. "http://localhost:8000/v1"; "/chat/completions" is appended unless present
    model: str  # e.g. "qwen-vl-max-latest"
    api_key_env: str = "STUDIO_VLM_API_KEY"  # the key is read from this environment variable, if set
    timeout_s: float = 60.0  # per try
    max_retries: int = 2  # tries after the first one, on 429 / 5xx / timeouts / connection errors
    backoff_s: float = 2.0  # wait before retry k is backoff_s * 2**(k-1), capped by max_backoff_s
    max_backoff_s: float = 30.0
    max_tokens: int = 300
    temperature: float = 0.2
    max_image_side: int = 1024  # larger images are shrunk before sending: the prompt is about the effect


# --- Shared by both VLM writers --------------------------------------------------------------


def pick_pairs(pairs: list[ImagePair], k: int = 2, seed: int | None = None) -> list[ImagePair]:
    """``k`` training pairs, sampled at random when there are more (appendix 9: two random pairs)."""
    if len(pairs) < k:
        raise ValueError(
            f"Writing a student prompt needs at least {k} training pairs of the effect; it has {len(pairs)}."
        )
    if len(pairs) == k:
        return list(pairs)
    return random.Random(seed).sample(list(pairs), k)


class VLMPromptWriter(ABC):
    """A PromptWriter that asks a VLM one question (text + images) and takes its answer as text."""

    @property
    @abstractmethod
    def source(self) -> str:
        """Recorded with every prompt this writer produces."""

    @abstractmethod
    def ask(self, text: str, images: list[Image.Image]) -> str:
        """One user turn: the images, then the text. Returns the model's cleaned answer."""

    def refine_student_prompt(
        self, pairs: list[ImagePair], teacher_prompt: str, seed: int | None = None
    ) -> StudentPrompt:
        chosen = pick_pairs(pairs, 2, seed)
        images = [img for pair in chosen for img in pair]  # src1, tgt1, src2, tgt2 as Fig. 15 says
        text = self.ask(fill_student_prompt_template(teacher_prompt), images)
        return StudentPrompt(text=text, source=self.source)

    def write_instruction(self, image: Image.Image) -> str:
        return self.ask(fill_general_instruction_template(), [image])


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def image_data_url(image: Image.Image, max_side: int = 1024) -> str:
    """A PNG ``data:`` URL, the form OpenAI-compatible servers accept in ``image_url`` parts."""
    buf = io.BytesIO()
    _fit(image, max_side).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_messages(text: str, images: list[Image.Image], max_image_side: int = 1024) -> list[dict[str, Any]]:
    """One OpenAI-format user message: the images as ``image_url`` parts, then the text."""
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": image_data_url(img, max_image_side)}} for img in images
    ]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


# --- OpenAI-compatible endpoint --------------------------------------------------------------


def _snippet(text: str, n: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


class OpenAICompatibleVLM(VLMPromptWriter):
    """Chat completions over HTTP with retries. ``with OpenAICompatibleVLM(cfg) as vlm: ...``"""

    def __init__(self, config: VLMConfig, client: httpx.Client | None = None) -> None:
        self.config = config
        self._client = client or httpx.Client()
        self._owns_client = client is None
        base = config.base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"

    @property
    def source(self) -> str:
        return f"vlm:{self.config.model}"

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> OpenAICompatibleVLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ask(self, text: str, images: list[Image.Image]) -> str:
        return self.chat(build_messages(text, images, self.config.max_image_side))

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.config.api_key_env, "").strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _delay(self, retry: int, response: httpx.Response | None) -> float:
        delay = self.config.backoff_s * 2 ** (retry - 1)
        if response is not None:  # a 429 may say how long to wait
            try:
                delay = max(delay, float(response.headers.get("Retry-After", "")))
            except ValueError:
                pass
        return min(delay, self.config.max_backoff_s)

    def chat(self, messages: list[dict[str, Any]]) -> str:
        """Send ``messages`` (OpenAI format) and return the cleaned text of the first choice."""
        cfg = self.config
        body = {
            "model": cfg.model,
            "messages": messages,
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
        }
        tries = cfg.max_retries + 1
        last_problem = ""
        for attempt in range(1, tries + 1):
            response: httpx.Response | None = None
            try:
                response = self._client.post(
                    self.url, json=body, headers=self._headers(), timeout=cfg.timeout_s
                )
            except httpx.TimeoutException:
                last_problem = f"no answer within {cfg.timeout_s:g} s"
            except httpx.TransportError as e:
                last_problem = f"connection failed: {e or type(e).__name__}"
            else:
                code = response.status_code
                if code == 429 or code >= 500:
                    last_problem = f"HTTP {code}"
                elif code >= 300:
                    raise VLMError(self._refusal_message(response))
                else:
                    return self._read_answer(response)
            if attempt < tries:
                time.sleep(self._delay(attempt, response))
        raise VLMError(
            f"The captioning service at {self.url} did not answer after {tries} "
            f"{'try' if tries == 1 else 'tries'} ({last_problem}). Check that it is running and "
            f"reachable, or leave the VLM unset to write prompts with the offline describer."
        )

    def _refusal_message(self, response: httpx.Response) -> str:
        code = response.status_code
        head = f"The captioning service at {self.url} refused the request (HTTP {code}: {_snippet(response.text)})."
        if code in (401, 403):
            where = (
                f"the environment variable {self.config.api_key_env} is set"
                if os.environ.get(self.config.api_key_env)
                else f"the environment variable {self.config.api_key_env} is not set"
            )
            return f"{head} Check the API key: {where}."
        if code == 404:
            return f"{head} Check the address and the model name '{self.config.model}'."
        return f"{head} The model '{self.config.model}' may not accept images or this request."

    def _read_answer(self, response: httpx.Response) -> str:
        where = f"The captioning service at {self.url}"
        try:
            data = response.json()
        except ValueError:
            raise VLMError(f"{where} answered, but not with JSON: {_snippet(response.text)!r}") from None
        if not isinstance(data, dict):
            raise VLMError(
                f"{where} answered with JSON that is not a chat completion: {_snippet(response.text)!r}"
            )
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices:
            error = data.get("error")
            detail = f" It said: {_snippet(str(error))}" if error else ""
            raise VLMError(f"{where} answered without any choices.{detail}")
        message = choices[0].get("message") if isinstance(choices[0], dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        text = clean_answer(content) if isinstance(content, str) else ""
        if not text:
            raise VLMError(f"{where} answered with an empty message (model '{self.config.model}').")
        return text


# --- A transformers VLM from a local folder ---------------------------------------------------


class LocalTransformersVLM(VLMPromptWriter):
    """A chat VLM (e.g. Qwen2.5-VL-7B-Instruct) loaded from a local folder, on first use."""

    def __init__(
        self, model_dir: str | Path, device: str | None = None, max_new_tokens: int = 200, dtype: Any = None
    ) -> None:
        self.model_dir = Path(model_dir).expanduser()
        if not self.model_dir.is_dir():
            raise VLMError(f"The local VLM folder {self.model_dir} does not exist.")
        if not (self.model_dir / "config.json").is_file():
            raise VLMError(
                f"The local VLM folder {self.model_dir} has no config.json. Point it at a folder that holds "
                f"a transformers vision-language model, e.g. a download of Qwen/Qwen2.5-VL-7B-Instruct."
            )
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype
        self._model: Any = None
        self._processor: Any = None

    @property
    def source(self) -> str:
        return f"local-vlm:{self.model_dir.name}"

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self.dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        try:
            self._processor = AutoProcessor.from_pretrained(self.model_dir, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(
                self.model_dir, local_files_only=True, dtype=dtype
            )
        except Exception as e:  # any loading failure means the same to a curator
            raise VLMError(f"Could not load a vision-language model from {self.model_dir}: {e}") from e
        self._model = model.to(device).eval()

    def ask(self, text: str, images: list[Image.Image]) -> str:
        import torch

        self._load()
        content: list[dict[str, Any]] = [{"type": "image", "image": img.convert("RGB")} for img in images]
        content.append({"type": "text", "text": text})
        inputs = self._processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(self._model.device)
        with torch.inference_mode():
            out = self._model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        answer = self._processor.batch_decode(new_tokens, skip_special_tokens=True)[0]
        text = clean_answer(answer)
        if not text:
            raise VLMError(f"The local VLM in {self.model_dir} answered with an empty message.")
        return text
