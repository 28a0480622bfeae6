"""Evaluate editing systems on EffectBench-mini test sources against exact ground truth.

A ``System`` is a way of producing an edit on the one backbone: which adapters are active (with
weights), which prompt each effect gets, how many steps and what CFG. The paper's rows are systems:
- Base:            [teacher_i], teacher prompt, 40 steps x the backbone's teacher CFG (80 NFE)
- Base+Lightning:  [teacher_i, lightning], teacher prompt, 8 steps (8 NFE)
- FM + Lightning:  [fm_all, lightning], teacher prompt, 8 steps
- Ours:            [student], trigger + student prompt, 8 steps
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .backbones import adapters
from .backbones.base import Backbone
from .effectbench.effects import Effect, compose, get_effect
from .effectbench.scenes import Scene
from .images import resize, to_numpy, to_tensor
from .metrics import ImageScore, Summary, score, summarize
from .sampling import euler_sample

COMPOSITION_TEMPLATE = "Please apply {A} to the input image, and then apply {B}."


@dataclass
class EffectEntry:
    """An effect in the collection under test, with the prompts each system may use."""

    name: str
    teacher_prompt: str
    student_prompt: str = ""  # trigger + VLM prompt (eq. 5)
    teacher_adapter: str | None = None

    @property
    def effect(self) -> Effect:
        return get_effect(self.name)


@dataclass
class System:
    name: str
    adapters: Callable[[EffectEntry], list[str] | None]
    prompt: Callable[[EffectEntry], str]
    steps: int
    cfg: float = 1.0
    weights: Callable[[EffectEntry], list[float] | None] = field(default=lambda e: None)

    @property
    def nfe(self) -> int:
        return self.steps * (2 if self.cfg > 1.0 else 1)


def teacher_system(cfg: float, steps: int = 40) -> System:
    """The teachers as deployed: ``steps`` x true CFG ``cfg`` (``Backbone.teacher_cfg``)."""
    return System(
        "Base",
        lambda e: [e.teacher_adapter] if e.teacher_adapter else None,
        lambda e: e.teacher_prompt,
        steps,
        cfg,
    )


def student_system(steps: int = 8, adapter: str = "student", name: str = "Ours") -> System:
    return System(name, lambda e: [adapter], lambda e: e.student_prompt, steps)


def stacked_system(
    name: str, per_effect: bool, lora: str, accel: str = "lightning", steps: int = 8
) -> System:
    """Base+Lightning (per_effect: the effect's teacher) or FM+Lightning (one all-in-1 LoRA)."""
    return System(
        name, lambda e: [e.teacher_adapter if per_effect else lora, accel], lambda e: e.teacher_prompt, steps
    )


@dataclass
class SystemResult:
    system: str
    nfe: int
    seconds_per_image: float
    summary: Summary
    per_effect: dict[str, Summary]
    scores: list[ImageScore]
    outputs: dict[str, np.ndarray]  # effect -> (N, H, W, 3) outputs, for grids
    requested: list[str]  # each score's effect, in the order of ``scores``


def ground_truths(entries: list[EffectEntry], scenes: list[Scene], size: int) -> dict[str, np.ndarray]:
    """Every effect's exact output on every scene (and the untouched sources), at ``size``."""
    out = {"source": to_numpy(resize(to_tensor([s.image for s in scenes]), size))}
    for e in entries:
        out[e.name] = to_numpy(resize(to_tensor([e.effect(s.image, s.mask) for s in scenes]), size))
    return out


def run_system(
    backbone: Backbone,
    system: System,
    entry: EffectEntry,
    sources: torch.Tensor,
    seed: int = 0,
    batch: int = 16,
) -> tuple[np.ndarray, float]:
    """The system's edits of ``sources`` for one effect: outputs (N, H, W, 3) and seconds."""
    outs, t0 = [], time.perf_counter()
    with adapters.using(backbone.transformer, system.adapters(entry), system.weights(entry)):
        for i in range(0, len(sources), batch):
            src = sources[i : i + batch].to(backbone.device)
            with torch.no_grad():
                cond = backbone.encode_prompt([system.prompt(entry)] * len(src), src)
                uncond = (
                    backbone.encode_prompt([backbone.negative_prompt] * len(src), src)
                    if system.cfg > 1
                    else None
                )
            res = euler_sample(
                backbone, cond, uncond=uncond, cfg_scale=system.cfg, steps=system.steps, seed=seed + i
            )
            outs.append(to_numpy(res.images))
    return np.concatenate(outs), time.perf_counter() - t0


def evaluate_system(
    backbone: Backbone,
    system: System,
    entries: list[EffectEntry],
    scenes: list[Scene],
    truths: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> SystemResult:
    """Every effect of ``entries`` on every scene; candidates for the bad-case test are all the
    collection's effects plus the untouched source."""
    truths = truths or ground_truths(entries, scenes, backbone.image_size)
    sources = backbone.prepare_images(to_tensor([s.image for s in scenes]))
    scores: list[ImageScore] = []
    requested: list[str] = []
    per_effect: dict[str, Summary] = {}
    outputs: dict[str, np.ndarray] = {}
    seconds = 0.0
    for k, e in enumerate(entries):
        outs, sec = run_system(backbone, system, e, sources, seed=seed)
        seconds += sec
        outputs[e.name] = outs
        mine = [score(outs[j], e.name, {n: t[j] for n, t in truths.items()}) for j in range(len(scenes))]
        per_effect[e.name] = summarize(mine, [e.name] * len(mine))
        scores += mine
        requested += [e.name] * len(mine)
        if progress:
            progress(k + 1, len(entries))
    n_img = max(1, len(scores))
    return SystemResult(
        system.name,
        system.nfe,
        seconds / n_img,
        summarize(scores, requested),
        per_effect,
        scores,
        outputs,
        requested,
    )


def composition_prompt(a: str, b: str) -> str:
    return COMPOSITION_TEMPLATE.format(A=a, B=b)


def evaluate_composition(
    backbone: Backbone, system: System, a: EffectEntry, b: EffectEntry, scenes: list[Scene], seed: int = 0
) -> tuple[float, np.ndarray]:
    """Fig. 7: one pass with the composition prompt, scored against "A then B" (mean PSNR)."""
    both = EffectEntry(
        f"{a.name}+{b.name}",
        composition_prompt(a.teacher_prompt, b.teacher_prompt),
        composition_prompt(a.student_prompt, b.student_prompt),
        a.teacher_adapter,
    )
    sources = backbone.prepare_images(to_tensor([s.image for s in scenes]))
    outs, _ = run_system(backbone, system, both, sources, seed=seed)
    ab = compose(a.name, b.name)
    truth = to_numpy(resize(to_tensor([ab(s.image, s.mask) for s in scenes]), backbone.image_size))
    from .metrics import psnr

    return float(np.mean([psnr(o, t) for o, t in zip(outs, truth, strict=True)])), outs
