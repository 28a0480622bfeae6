"""What every prompt writer produces, and the student condition of AOP (eq. 5)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

from PIL import Image

ImagePair = tuple[Image.Image, Image.Image]  # (source, target) of one training pair


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class StudentPrompt:
    """A refined, descriptive prompt for one effect (c_vlm in the paper) and who wrote it."""

    text: str
    source: str  # "vlm:<model>", "local-vlm:<folder name>" or "offline-describer"
    created_at: datetime = field(default_factory=_now)


def student_condition(trigger: str, student_prompt: str) -> str:
    """c_student = [v_i, c_vlm_i] (eq. 5): the effect's trigger followed by its student prompt."""
    return f"{trigger} {student_prompt}"


@runtime_checkable
class PromptWriter(Protocol):
    """Writes student prompts for effects and instructions for unlabelled general images."""

    def refine_student_prompt(self, pairs: list[ImagePair], teacher_prompt: str) -> StudentPrompt: ...

    def write_instruction(self, image: Image.Image) -> str: ...
