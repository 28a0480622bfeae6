"""Teacher effect LoRAs in the studio: train one (now, or as a background run), import an existing
LoRA file, find an effect's teacher, and measure it beside the base model.

A teacher is a ``LoraFile`` row (kind ``teacher`` when trained here, ``imported`` when brought in)
pointing at a .safetensors file in the blob store, for one effect and one backbone. The newest one
for the studio's backbone is the effect's teacher.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from sqlalchemy import select

from distill.backbones import adapters
from distill.backbones.base import Backbone
from distill.backbones.lora_formats import LoraFormatError
from distill.backbones.registry import load_backbone
from distill.callbacks import Reporter
from distill.effectbench.bench import test_sources
from distill.effectbench.effects import EFFECT_NAMES
from distill.effectbench.effects import get_effect as get_bench_effect
from distill.effectbench.scenes import CATEGORIES
from distill.images import resize, to_tensor
from distill.lora_training import LoraTrainConfig, TrainPair, TrainResult, train_lora
from distill.teachers import TEACHER_STEPS, TeacherEval, evaluate_edits, ground_truths
from storage import Effect, Evaluation, LoraFile, LoraKind, Prompt, RunKind, TeacherSource

from . import library
from .context import Studio
from .library import LibraryError
from .lora_files import lora_row, store_lora

TEACHER_KINDS = (LoraKind.TEACHER, LoraKind.IMPORTED)
RUN_KIND = RunKind.TEACHER.value


# a teacher "clearly learns" its effect when its mean PSNR to the ground truth beats the base model's
# (same prompt, same noise) by at least this (#4's target; results/teachers.md)
CLEAR_GAIN_DB = 1.0


class TeacherError(ValueError):
    """A curator-facing problem with training, importing or evaluating a teacher."""


# ------------------------------------------------------------------------------------------------
# lookups


def open_backbone(studio: Studio, device: str | None = None) -> Backbone:
    """The studio's backbone (``StudioConfig.backbone`` / ``model_path``), frozen."""
    return load_backbone(studio.config.backbone, studio.config.model_path, device=device)


def adapter_name(effect_name: str) -> str:
    """The adapter name an effect's teacher gets on the transformer (no '.': PEFT forbids it)."""
    return "teacher_" + effect_name.replace(".", "_")


def _effect(studio: Studio, name: str) -> Effect:
    with studio.session() as s:
        effect = s.scalar(select(Effect).where(Effect.name == name))
        if effect is None:
            raise LibraryError(
                f"There is no effect called '{name}'. `python -m studio effects list` shows them."
            )
        return effect


def teacher_for(studio: Studio, effect_name: str) -> LoraFile | None:
    """The effect's newest teacher (trained or imported) for the studio's backbone, or None."""
    effect = _effect(studio, effect_name)
    with studio.session() as s:
        return s.scalar(
            select(LoraFile)
            .where(
                LoraFile.effect_id == effect.id,
                LoraFile.kind.in_(TEACHER_KINDS),
                LoraFile.backbone == studio.config.backbone,
            )
            .order_by(LoraFile.id.desc())
            .limit(1)
        )


def teacher_path(studio: Studio, lora: LoraFile) -> Path:
    return studio.blobs.root / lora.path


def load_teacher(studio: Studio, backbone: Backbone, effect_name: str, name: str | None = None) -> str:
    """Load the effect's teacher onto the backbone as adapter ``name`` (default ``adapter_name``)."""
    lora = teacher_for(studio, effect_name)
    if lora is None:
        raise TeacherError(
            f"Effect '{effect_name}' has no teacher yet: train one (`python -m studio teacher train "
            f"{effect_name}`) or import a LoRA file (`python -m studio teacher import {effect_name} FILE`)."
        )
    name = name or adapter_name(effect_name)
    if name in adapters.adapter_names(backbone.transformer):
        adapters.delete(backbone.transformer, name)
    adapters.load_lora(backbone.transformer, teacher_path(studio, lora), name)
    return name


@dataclass
class TeacherRow:
    effect: str
    pairs: int
    teacher_prompt: str
    lora: LoraFile | None


def list_teachers(studio: Studio) -> list[TeacherRow]:
    """Every effect with its teacher (or None)."""
    return [
        TeacherRow(e.name, e.pairs, e.teacher_prompt, teacher_for(studio, e.name))
        for e in library.list_effects(studio)
    ]


def effects_without_teacher(studio: Studio) -> list[str]:
    return [t.effect for t in list_teachers(studio) if t.lora is None]


# ------------------------------------------------------------------------------------------------
# training


def _image(studio: Studio, sha: str) -> Image.Image:
    return Image.open(io.BytesIO(studio.blobs.read_bytes(sha, "png"))).convert("RGB")


def training_pairs(studio: Studio, effect_name: str) -> tuple[list[TrainPair], str]:
    """The effect's kept pairs as (source, target, teacher prompt) and the teacher prompt."""
    info = library.get_effect(studio, effect_name)
    prompt = info.teacher_prompt.strip()
    if not prompt:
        raise TeacherError(
            f"Effect '{effect_name}' has no teacher prompt. Write the instruction its LoRA should answer to "
            f'first: python -m studio effects prompt {effect_name} "..."'
        )
    pairs = library.effect_pairs(studio, effect_name)
    if not pairs:
        raise TeacherError(
            f"Effect '{effect_name}' has no pairs to train on (all were dropped, or none imported)."
        )
    return [(_image(studio, p.source_sha), _image(studio, p.target_sha), prompt) for p in pairs], prompt


def check_train_config(config: LoraTrainConfig) -> LoraTrainConfig:
    """Refuse settings a training run could not use (a wrong type or range, e.g. ``"steps": null`` typed
    into "More settings"), now rather than as a crash in the worker."""
    defaults = LoraTrainConfig()
    wrong = []
    for f in fields(config):
        value, want = getattr(config, f.name), getattr(defaults, f.name)
        if want is None or isinstance(want, tuple):
            continue
        if isinstance(want, bool):
            ok = isinstance(value, bool)
        elif isinstance(want, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(want, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, type(want))
        if ok and f.name in ("steps", "batch", "rank", "sample_n", "sample_steps") and value < 1:
            ok = False
        if ok and isinstance(value, int | float) and value < 0:
            ok = f.name in ("logit_mean",)
        if not ok:
            wrong.append(
                f"{f.name}={value!r} (expected {'a positive' if f.name != 'logit_mean' else 'a'} "
                f"{type(want).__name__}, like {want!r})"
            )
    if config.resolution is not None and (not isinstance(config.resolution, int) or config.resolution < 8):
        wrong.append(f"resolution={config.resolution!r} (expected a whole number of pixels, or leave it out)")
    if wrong:
        raise TeacherError("These training settings cannot be used: " + "; ".join(wrong) + ".")
    return config


def default_config(studio: Studio, **overrides: Any) -> LoraTrainConfig:
    """The LoRA training preset of the studio's backbone, with overrides (e.g. ``steps=300``)."""
    return LoraTrainConfig.for_backbone(studio.config.backbone, **overrides)


@dataclass
class TrainedTeacher:
    result: TrainResult
    lora: LoraFile | None  # None when the training was stopped before the end


def train_teacher_now(
    studio: Studio,
    effect_name: str,
    config: LoraTrainConfig | None = None,
    reporter: Reporter | None = None,
    *,
    backbone: Backbone | None = None,
    run_id: int | None = None,
    resume_from: Path | None = None,
    checkpoint_dir: Path | None = None,
) -> TrainedTeacher:
    """Train the effect's teacher in this process and register it (a ``LoraFile`` of kind teacher).

    The trained adapter stays on ``backbone`` under ``adapter_name(effect_name)``.
    """
    effect = _effect(studio, effect_name)
    pairs, prompt = training_pairs(studio, effect_name)
    backbone = backbone or open_backbone(studio)
    config = config or default_config(studio)
    name = adapter_name(effect_name)
    result = train_lora(backbone, name, pairs, config, reporter, resume_from, checkpoint_dir)
    if result.stopped:
        return TrainedTeacher(result, None)
    meta = {
        "effect": effect_name,
        "teacher_prompt": prompt,
        "steps": result.steps,
        "pairs": len(pairs),
        "final_loss": result.final_loss,
        "train_seconds": round(result.seconds, 2),
        "train_config": config.to_dict(),
    }
    file_meta = {
        "effect": effect_name,
        "teacher_prompt": prompt,
        "backbone": backbone.name,
        "train_config": json.dumps(config.to_dict()),
    }
    lora = store_lora(
        studio,
        lambda path: adapters.save_lora(backbone.transformer, name, path, file_meta),
        kind=LoraKind.TEACHER,
        effect_id=effect.id,
        run_id=run_id,
        rank=config.rank,
        alpha=config.alpha,
        format="diffusers",
        backbone=backbone.name,
        meta=meta,
    )
    return TrainedTeacher(result, lora)


def submit_training(studio: Studio, effect_name: str, config: LoraTrainConfig | None = None) -> int:
    """Queue the effect's teacher training as a background run; returns the run id."""
    from . import runs

    effect = _effect(studio, effect_name)
    training_pairs(studio, effect_name)  # refuse now, not in the worker, if there is nothing to train
    config = check_train_config(config or default_config(studio))
    run_config = {
        "effect": effect_name,
        "backbone": studio.config.backbone,
        "model_path": studio.config.model_path,
        "train": config.to_dict(),
    }
    return runs.submit(studio, RUN_KIND, run_config, name=f"teacher {effect_name}", effect_id=effect.id)


def submit_missing(studio: Studio, config: LoraTrainConfig | None = None) -> list[tuple[str, int]]:
    """Queue a teacher training for every effect that has no teacher and none queued or training;
    returns (effect, run id) in library order. The runs go one after another on the device."""
    from . import runs

    busy = {
        v.effect_id for v in runs.list_runs(studio, RUN_KIND) if v.status in {a.value for a in runs.ACTIVE}
    }
    config = check_train_config(config or default_config(studio))
    ids = {e.name: e.id for e in library.list_effects(studio)}
    todo = [n for n in effects_without_teacher(studio) if ids.get(n) not in busy]
    if not todo:
        raise TeacherError(
            "Every effect has a teacher or one training already." if ids else "There are no effects yet."
        )
    return [(n, submit_training(studio, n, config)) for n in todo]


# ------------------------------------------------------------------------------------------------
# import


def import_teacher(
    studio: Studio,
    effect_name: str,
    path: Path,
    teacher_prompt: str | None = None,
    *,
    backbone: Backbone | None = None,
) -> LoraFile:
    """Register an existing LoRA file (diffusers, PEFT, ai-toolkit, kohya/ComfyUI or lightx2v keys) as
    the effect's teacher. It is loaded onto the studio's backbone first: a file that does not fit is
    refused with the reason. ``teacher_prompt`` replaces the effect's teacher prompt."""
    effect = _effect(studio, effect_name)
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"No LoRA file at {path}.")
    prompt = (teacher_prompt or "").strip()
    if not prompt and not library.get_effect(studio, effect_name).teacher_prompt.strip():
        raise TeacherError(
            f"Effect '{effect_name}' has no teacher prompt: give the instruction this LoRA was trained with "
            '(--prompt "...").'
        )
    backbone = backbone or open_backbone(studio)
    check = "import_check"
    if check in adapters.adapter_names(backbone.transformer):
        adapters.delete(backbone.transformer, check)
    try:
        report = adapters.load_lora(backbone.transformer, path, check)
    except LoraFormatError as e:
        raise TeacherError(f"{path.name} cannot be the teacher of '{effect_name}': {e}") from e
    finally:
        if check in adapters.adapter_names(backbone.transformer):
            adapters.delete(backbone.transformer, check)
    ref = studio.blobs.put_file(path, "safetensors")
    with studio.session() as s:
        if prompt:
            row = s.scalar(select(Prompt).where(Prompt.effect_id == effect.id))
            if row is None:
                s.add(Prompt(effect_id=effect.id, teacher_prompt=prompt, teacher_source=TeacherSource.IMPORT))
            else:
                row.teacher_prompt, row.teacher_source = prompt, TeacherSource.IMPORT
        lora = lora_row(
            ref,
            kind=LoraKind.IMPORTED,
            effect_id=effect.id,
            rank=report.rank,
            alpha=report.alpha,
            format=report.format_detected,
            backbone=backbone.name,
            meta={
                "original_name": path.name,
                "matched_modules": report.matched_modules,
                "ignored_keys": len(report.ignored_keys),
                "file_metadata": {k: v for k, v in report.metadata.items() if len(v) < 2000},
            },
        )
        s.add(lora)
    return lora


# ------------------------------------------------------------------------------------------------
# evaluation


@dataclass
class TeacherComparison:
    effect: str
    teacher: TeacherEval
    base: TeacherEval
    on: str  # what the sources were ("EffectBench-mini test sources" or "the effect's training pairs")

    @property
    def gain(self) -> float:
        """Teacher minus base, mean PSNR (dB)."""
        return self.teacher.psnr_mean - self.base.psnr_mean

    def verdict(self) -> str:
        """One sentence for a curator: did the teacher clearly learn its effect?"""
        where = "" if self.on.startswith("EffectBench") else " on its own training pairs (a fit check only)"
        if self.gain >= CLEAR_GAIN_DB:
            return f"Learned{where}: {self.gain:+.2f} dB over the base model given the same prompt."
        return (
            f"Not clearly learned{where}: {self.gain:+.2f} dB over the base model given the same prompt "
            f"(a clear teacher is at least +{CLEAR_GAIN_DB:g} dB). More pairs help an effect the editor can "
            "represent (on the tiny editor a checkerboard background went from 5.5 to 14.3 dB with 200 pairs "
            "instead of 20); per-pixel quantisation, thin outlines and global re-arrangements stay weak on it "
            "(results/teachers_hard.md)."
        )


def _bench_sources(
    effect_name: str, n_per_category: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Test sources and exact ground truth where the effect is an EffectBench-mini effect."""
    if effect_name not in EFFECT_NAMES:
        return None
    scenes = [sc for cat in CATEGORIES for sc in test_sources(cat, n_per_category, seed)]
    return to_tensor([sc.image for sc in scenes]), ground_truths(get_bench_effect(effect_name), scenes)


def evaluate(
    studio: Studio,
    effect_name: str,
    *,
    backbone: Backbone | None = None,
    n_per_category: int = 8,
    steps: int = TEACHER_STEPS,
    cfg: float | None = None,
    seed: int = 0,
    run_id: int | None = None,
) -> TeacherComparison:
    """The effect's teacher and the base model (same teacher prompt, same noise) against the ground truth.

    Bench effects are measured on EffectBench-mini's test sources (``n_per_category`` per category);
    other effects, which have no ground truth beyond their pairs, on their own training pairs (a fit
    check, said so in ``on``). The numbers are stored as ``Evaluation`` rows.
    """
    effect = _effect(studio, effect_name)
    lora = teacher_for(studio, effect_name)
    backbone = backbone or open_backbone(studio)
    cfg = backbone.teacher_cfg if cfg is None else cfg
    name = load_teacher(studio, backbone, effect_name)
    prompt = library.get_effect(studio, effect_name).teacher_prompt
    try:
        bench = _bench_sources(effect_name, n_per_category, seed)
        if bench is not None:
            sources, targets = bench
            on = f"EffectBench-mini test sources ({len(sources)})"
        else:
            pairs, _ = training_pairs(studio, effect_name)
            size = backbone.image_size
            sources = torch.cat([resize(to_tensor([s]), size) for s, _, _ in pairs])
            targets = torch.cat([resize(to_tensor([t]), size) for _, t, _ in pairs])
            on = f"the effect's training pairs ({len(pairs)}; it has no held-out ground truth)"
        kw = dict(effect=effect_name, steps=steps, cfg=cfg, seed=seed)
        teacher = evaluate_edits(backbone, name, prompt, sources, targets, **kw)
        base = evaluate_edits(backbone, None, prompt, sources, targets, **kw)
    finally:
        adapters.delete(backbone.transformer, name)
    with studio.session() as s:
        for system, ev in ((f"teacher:{lora.id}", teacher), ("base", base)):
            details = {"on": on, "psnr": ev.psnr, "ssim": ev.ssim, "steps": steps, "cfg": cfg, "nfe": ev.nfe}
            for metric, value in ev.summary().items():
                s.add(
                    Evaluation(
                        run_id=run_id,
                        system=system,
                        effect_id=effect.id,
                        metric=metric,
                        value=value,
                        n=ev.n,
                        details=details if metric == "psnr_mean" else {"on": on},
                    )
                )
    return TeacherComparison(effect_name, teacher, base, on)
