"""Teacher effect LoRAs on EffectBench-mini: how close their outputs come to the exact ground truth.

A teacher is the base model plus one effect LoRA, sampled as the paper's teachers are (40 Euler steps
with true CFG, i.e. 80 NFE, at the backbone's ``teacher_cfg``: the pipeline's 4.0 for Qwen-Image-Edit).
Because every bench effect is procedural, its true output on a test source is known, so fidelity is
measured exactly: PSNR and SSIM to the ground truth at the backbone's working resolution (the 64 px
ground truth area-downsampled). The base model given the same teacher prompt without the LoRA is
measured the same way, with the same noise, as the reference a teacher must clearly beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from skimage.metrics import structural_similarity

from .backbones import adapters
from .backbones.base import Backbone
from .effectbench.bench import ground_truth
from .effectbench.effects import Effect, get_effect
from .effectbench.scenes import Scene
from .images import psnr, resize, to_numpy, to_tensor
from .sampling import euler_sample

TEACHER_STEPS = 40  # Qwen-Image-Edit-2509's model card


@dataclass
class TeacherEval:
    """Fidelity of one system's outputs to the ground truth on a set of test sources."""

    effect: str
    system: str  # the adapter's name, or "base"
    psnr: list[float] = field(repr=False)  # per source, dB
    ssim: list[float] = field(repr=False)
    seconds: float  # sampling wall time for all sources
    nfe: int  # network evaluations per image

    @property
    def psnr_mean(self) -> float:
        return float(np.mean(self.psnr))

    @property
    def psnr_worst(self) -> float:
        return float(np.min(self.psnr))

    @property
    def ssim_mean(self) -> float:
        return float(np.mean(self.ssim))

    @property
    def n(self) -> int:
        return len(self.psnr)

    def summary(self) -> dict[str, float]:
        return {
            "psnr_mean": self.psnr_mean,
            "psnr_worst": self.psnr_worst,
            "ssim_mean": self.ssim_mean,
            "seconds": self.seconds,
            "nfe": float(self.nfe),
        }

    def to_dict(self) -> dict:
        return {**asdict(self), **self.summary()}


def ssim(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-image SSIM of (B, 3, H, W) images in [-1, 1] (scikit-image, on the [0, 1] scale)."""
    na, nb = to_numpy(a), to_numpy(b)
    return [float(structural_similarity(x, y, channel_axis=2, data_range=1.0)) for x, y in zip(na, nb)]


@torch.no_grad()
def generate(
    backbone: Backbone,
    adapter_name: str | None,
    prompt: str,
    sources: torch.Tensor,
    *,
    steps: int = TEACHER_STEPS,
    cfg: float | None = None,
    seed: int = 0,
    batch: int = 16,
) -> tuple[torch.Tensor, float, int]:
    """The teacher's (or with ``adapter_name=None`` the base model's) edits of ``sources``: images at the
    working resolution, sampling seconds, NFE per image (``cfg`` None: the backbone's teacher CFG).
    Batch ``i`` uses noise seed ``seed + i``, so teacher and base see the same noise."""
    cfg = backbone.teacher_cfg if cfg is None else cfg
    src = backbone.prepare_images(sources).to(backbone.device, backbone.dtype)
    outs, seconds, nfe = [], 0.0, 0
    with adapters.using(backbone.transformer, [adapter_name] if adapter_name else []):
        for i, start in enumerate(range(0, len(src), batch)):
            chunk = src[start : start + batch]
            cond = backbone.encode_prompt([prompt] * len(chunk), chunk)
            uncond = backbone.encode_prompt([backbone.negative_prompt] * len(chunk), chunk)
            res = euler_sample(backbone, cond, uncond=uncond, cfg_scale=cfg, steps=steps, seed=seed + i)
            outs.append(res.images.float().cpu())
            seconds += res.seconds
            nfe = res.nfe
    return torch.cat(outs), seconds, nfe


def score(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR and SSIM of outputs to targets, at the outputs' resolution (targets area-resized)."""
    targets = resize(targets.float(), outputs.shape[-1])
    return [float(x) for x in psnr(outputs, targets)], ssim(outputs, targets)


def evaluate_edits(
    backbone: Backbone,
    adapter_name: str | None,
    prompt: str,
    sources: torch.Tensor,
    targets: torch.Tensor,
    *,
    effect: str = "",
    steps: int = TEACHER_STEPS,
    cfg: float | None = None,
    seed: int = 0,
    batch: int = 16,
) -> TeacherEval:
    """Edit ``sources`` (B, 3, H, W in [-1, 1]) with ``prompt`` and score against ``targets``."""
    if len(sources) == 0 or len(sources) != len(targets):
        raise ValueError(f"Need as many targets as sources (got {len(sources)} and {len(targets)}).")
    out, seconds, nfe = generate(
        backbone, adapter_name, prompt, sources, steps=steps, cfg=cfg, seed=seed, batch=batch
    )
    p, s = score(out, targets)
    return TeacherEval(effect, adapter_name or "base", p, s, seconds, nfe)


def ground_truths(effect: Effect, sources: Sequence[Scene]) -> torch.Tensor:
    """The effect's exact outputs on the scenes, as (B, 3, H, W) in [-1, 1] at the scenes' size."""
    return to_tensor([ground_truth(effect, sc) for sc in sources])


def evaluate_teacher(
    backbone: Backbone,
    adapter_name: str | None,
    effect: str | Effect,
    teacher_prompt: str,
    sources: Sequence[Scene],
    steps: int = TEACHER_STEPS,
    cfg: float | None = None,
    seed: int = 0,
    batch: int = 16,
) -> TeacherEval:
    """A bench effect's teacher (``adapter_name``; None: the base model) on test scenes."""
    eff = get_effect(effect) if isinstance(effect, str) else effect
    if not sources:
        raise ValueError("No test sources to evaluate on.")
    src = to_tensor([sc.image for sc in sources])
    return evaluate_edits(
        backbone,
        adapter_name,
        teacher_prompt,
        src,
        ground_truths(eff, sources),
        effect=eff.name,
        steps=steps,
        cfg=cfg,
        seed=seed,
        batch=batch,
    )
