"""Asymmetric Orthogonal Prompting (§4.3): trigger words, student prompts, and their writers.

Teachers keep their original prompts; the student sees ``student_condition(trigger, student_prompt)``
(eq. 5). Student prompts come from a VLM endpoint, a local VLM, or the offline describer, whichever
``make_writer`` finds configured, in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .base import ImagePair, PromptWriter, StudentPrompt, student_condition
from .describer import describe_effect, describe_instruction
from .embedding import embedder_for, mean_pool
from .triggers import (
    DEFAULT_THRESHOLD,
    TriggerAssignment,
    TriggerCheck,
    assign_triggers,
    check_triggers,
    cosine_matrix,
    make_trigger,
)
from .vlm import LocalTransformersVLM, OpenAICompatibleVLM, VLMConfig, VLMError


class OfflineDescriber:
    """The PromptWriter that needs no model (see ``describer``)."""

    source = "offline-describer"

    def refine_student_prompt(self, pairs: list[ImagePair], teacher_prompt: str) -> StudentPrompt:
        return describe_effect(pairs, teacher_prompt)

    def write_instruction(self, image: Image.Image) -> str:
        return describe_instruction(image)


@dataclass(frozen=True)
class PromptWriterConfig:
    """Which writer to use: an endpoint if ``vlm`` is set, else a local VLM folder, else offline."""

    vlm: VLMConfig | None = None
    local_vlm_dir: str | Path | None = None
    local_vlm_device: str | None = None


def make_writer(config: PromptWriterConfig | None = None) -> PromptWriter:
    config = config or PromptWriterConfig()
    if config.vlm is not None:
        return OpenAICompatibleVLM(config.vlm)
    if config.local_vlm_dir:
        return LocalTransformersVLM(config.local_vlm_dir, device=config.local_vlm_device)
    return OfflineDescriber()


__all__ = [
    "DEFAULT_THRESHOLD",
    "ImagePair",
    "LocalTransformersVLM",
    "OfflineDescriber",
    "OpenAICompatibleVLM",
    "PromptWriter",
    "PromptWriterConfig",
    "StudentPrompt",
    "TriggerAssignment",
    "TriggerCheck",
    "VLMConfig",
    "VLMError",
    "assign_triggers",
    "check_triggers",
    "cosine_matrix",
    "describe_effect",
    "describe_instruction",
    "embedder_for",
    "make_trigger",
    "make_writer",
    "mean_pool",
    "student_condition",
]
