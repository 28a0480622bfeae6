"""The paper's MLLM judge (appendix 7.2): Bad Case Rate and Valid Subject Alignment.

Per test image, the judge first answers the Fig. 11 question (template pair, test pair, instruction,
expert criteria) "is this a bad case?"; BCR is the share of bad cases. VSA asks Fig. 12 ("is the
subject's identity preserved? 1-5") only when the case is not bad, and scores a bad case 0.

The judge talks to any OpenAI-compatible chat endpoint through the studio's VLM client. An answer
that cannot be read is counted as unparsable and left out of the means, never guessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

from .prompts.template import fill_bcr_template, fill_vsa_template, parse_bcr_answer, parse_vsa_answer
from .prompts.vlm import OpenAICompatibleVLM, VLMConfig, VLMError

# Fig. 11 needs expert criteria per effect; without a curator's, this one asks for what BCR counts.
DEFAULT_CRITERIA = (
    "The Test Result Image must clearly show the effect of the editing instruction, applied to the "
    "Test Source Image in the way the Reference Template Image Pair shows it."
)

ImageLike = Image.Image | np.ndarray  # numpy: H x W x 3 in [0, 1]


def as_pil(image: ImageLike, min_side: int = 0) -> Image.Image:
    """An RGB PIL image, enlarged (bicubic) so its shorter side is at least ``min_side``."""
    if isinstance(image, Image.Image):
        im = image.convert("RGB")
    else:
        im = Image.fromarray((np.clip(np.asarray(image, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8))
    if min_side and min(im.size) < min_side:
        k = min_side / min(im.size)
        im = im.resize((round(im.width * k), round(im.height * k)), Image.Resampling.BICUBIC)
    return im


@dataclass(frozen=True)
class JudgeCase:
    """The judge's verdict on one output. ``None`` where it gave none (see ``problem``)."""

    bad_case: bool | None
    consistency: int | None = None  # Fig. 12 score 1..5, asked only for cases that are not bad
    problem: str = ""  # "unparsable: ...", "request failed: ..." or "not asked: ..."

    @property
    def vsa(self) -> float | None:
        """0 for a bad case, else the consistency score; None when either verdict is missing."""
        if self.bad_case is None:
            return None
        if self.bad_case:
            return 0.0
        return None if self.consistency is None else float(self.consistency)


class MLLMJudge:
    """Asks the Fig. 11 / Fig. 12 questions. ``with MLLMJudge(cfg) as judge: judge.judge_all(...)``"""

    def __init__(
        self,
        config: VLMConfig,
        client: httpx.Client | None = None,
        min_image_side: int = 256,
        max_failures_in_a_row: int = 3,
    ) -> None:
        self.vlm = OpenAICompatibleVLM(config, client)
        self.min_image_side = min_image_side  # bench images are 32-64 px: too small for most VLMs
        self.max_failures_in_a_row = max_failures_in_a_row  # then stop: the endpoint is down

    def close(self) -> None:
        self.vlm.close()

    def __enter__(self) -> MLLMJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, text: str, images: Sequence[ImageLike]) -> str:
        return self.vlm.ask(text, [as_pil(im, self.min_image_side) for im in images])

    def judge(
        self,
        output: ImageLike,
        source: ImageLike,
        template: tuple[ImageLike, ImageLike],
        instruction: str,
        criteria: str = DEFAULT_CRITERIA,
    ) -> JudgeCase:
        """One test image. Raises VLMError when the endpoint fails (so callers can stop asking)."""
        answer = self._ask(fill_bcr_template(instruction, criteria), [*template, source, output])
        try:
            verdict = parse_bcr_answer(answer)
        except ValueError as e:
            return JudgeCase(None, problem=f"unparsable bad-case answer: {e}")
        if verdict.is_bad_case:
            return JudgeCase(True)
        answer = self._ask(fill_vsa_template(instruction), [source, output])
        try:
            return JudgeCase(False, parse_vsa_answer(answer).score)
        except ValueError as e:
            return JudgeCase(False, problem=f"unparsable consistency answer: {e}")

    def judge_all(
        self, cases: Sequence[tuple[ImageLike, ImageLike, tuple[ImageLike, ImageLike], str, str]]
    ) -> list[JudgeCase]:
        """(output, source, template pair, instruction, criteria) per case, in order. After
        ``max_failures_in_a_row`` failed requests in a row the rest are not asked."""
        out: list[JudgeCase] = []
        failures = 0
        for output, source, template, instruction, criteria in cases:
            if failures >= self.max_failures_in_a_row:
                out.append(JudgeCase(None, problem=f"not asked: {failures} requests in a row failed"))
                continue
            try:
                out.append(self.judge(output, source, template, instruction, criteria))
                failures = 0
            except VLMError as e:
                failures += 1
                out.append(JudgeCase(None, problem=f"request failed: {e}"))
        return out
