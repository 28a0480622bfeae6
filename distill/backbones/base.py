"""The one small interface the trainer, sampler and evaluator use.

A backbone is an instruction image editor: a frozen ``QwenImageTransformer2DModel`` (which carries
every named PEFT adapter: teachers, ``student``, ``fake``), a text encoder, and an image codec (a VAE
for Qwen-Image-Edit, patchified pixels for the tiny model). Images cross the interface as float
tensors (B, 3, H, W) in [-1, 1]; latents are (B, C, h, w).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..flow import ScheduleConfig
from ..images import resize


@dataclass
class Condition:
    """Encoded instruction (+ source image where the text encoder sees it) and the source latents."""

    embeds: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L), 1 for real tokens
    source_latents: torch.Tensor  # (B, C, h, w)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def select(self, idx: torch.Tensor | slice) -> Condition:
        return Condition(self.embeds[idx], self.mask[idx], self.source_latents[idx])

    def repeat(self, n: int) -> Condition:
        return Condition(
            self.embeds.repeat_interleave(n, 0),
            self.mask.repeat_interleave(n, 0),
            self.source_latents.repeat_interleave(n, 0),
        )

    def detach(self) -> Condition:
        return Condition(self.embeds.detach(), self.mask.detach(), self.source_latents.detach())

    def padded(self, length: int) -> Condition:
        """The text padded (masked zeros) to ``length`` tokens."""
        extra = length - self.embeds.shape[1]
        if extra <= 0:
            return self

        def pad(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(t.shape[0], extra, *t.shape[2:])], dim=1)

        return Condition(pad(self.embeds), pad(self.mask), self.source_latents)

    @staticmethod
    def cat(conds: list[Condition]) -> Condition:
        """Concatenate along the batch, padding the text to the longest."""
        length = max(c.embeds.shape[1] for c in conds)
        conds = [c.padded(length) for c in conds]
        return Condition(
            torch.cat([c.embeds for c in conds]),
            torch.cat([c.mask for c in conds]),
            torch.cat([c.source_latents for c in conds]),
        )


TEXT_BUCKET = 32


class Backbone(ABC):
    """An instruction editor with named LoRA adapters on one frozen transformer."""

    name: str
    transformer: torch.nn.Module  # a diffusers QwenImageTransformer2DModel (PEFT adapters live here)
    schedule: ScheduleConfig
    image_size: int  # default working resolution (square side, pixels)
    negative_prompt: str = " "  # the unconditional prompt of true CFG (the Qwen pipelines use " ")
    # the true-CFG scale teachers sample with (and the Base baseline, the distillation's targets):
    # Qwen-Image-Edit pipelines' true_cfg_scale
    teacher_cfg: float = 4.0
    _compiled: Any = None  # torch.compile of the transformer, made on the first ``compiled()``
    _use_compiled: bool = False

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, C, h, w)."""

    @abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [-1, 1]."""

    @abstractmethod
    def encode_prompt(self, prompts: list[str], source_images: torch.Tensor) -> Condition:
        """Instructions with their source images -> a Condition (one row per prompt)."""

    @abstractmethod
    def predict_velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Velocity of the currently active adapters at noise level ``s`` (B,), latents in and out."""

    @abstractmethod
    def image_seq_len(self, latents_shape: tuple[int, ...]) -> int:
        """Number of target-image tokens, which sets the dynamic schedule shift."""

    @contextmanager
    def compiled(self) -> Iterator[None]:
        """Inside the block ``predict_velocity`` runs the transformer through ``torch.compile``
        (compiled on first use, then kept; it wraps the same module, so adapters switch as usual)."""
        if self._compiled is None:
            self._compiled = torch.compile(self.transformer)
        before, self._use_compiled = self._use_compiled, True
        try:
            yield
        finally:
            self._use_compiled = before

    def _transformer_call(self) -> Callable[..., Any]:
        return self._compiled if self._use_compiled else self.transformer

    def _text_for_call(self, cond: Condition) -> Condition:
        """Compiled calls see the text padded to a multiple of TEXT_BUCKET tokens: a few shapes to
        compile instead of one per prompt length (padding is masked: the output is the same)."""
        if not self._use_compiled:
            return cond
        n = cond.embeds.shape[1]
        return cond.padded(-(-n // TEXT_BUCKET) * TEXT_BUCKET)

    def guidance_norm(self, v: torch.Tensor) -> torch.Tensor:
        """The norm true CFG rescales by: per token, as the pipeline sees the latents. Here one
        token is one latent position's channels; packed-latent backbones override this."""
        return v.norm(dim=1, keepdim=True)

    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Resize images to the working resolution (square)."""
        return resize(images, self.image_size)
