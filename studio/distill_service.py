"""Distillation in the studio: check the effects, queue a run, run it (the job body), extend, export.

A distillation run turns every chosen effect's teacher LoRA into ONE student LoRA (``distill.trainer``).
Before a run is queued, every effect is checked for what the run needs (a teacher LoRA, a trigger, a
student prompt, a teacher prompt, kept pairs) and everything missing is listed with the command that
fixes it. The run config pins what was checked (teacher LoraFile ids, triggers, prompts), so a
resumed run distils the same thing.

Run config (JSON in ``runs.config``): ``effects`` (names, in catalog order), ``new_effects`` (extend
only), ``backbone`` / ``model_path``, ``distill`` (a
``DistillConfig`` as a dict), ``plans`` (each effect as checked: teacher LoraFile id, prompts), ``general`` (``images``, ``seed``, ``instructions``: "phrasings" = the
general edits' phrasings the tiny backbone was pretrained on, "writer" = the prompt writer of
``prompts_service``), and for extend runs ``init_student_lora_id`` and ``parent_run_id``.

The finished student is stored in the blob store (diffusers layout, catalog in its metadata, see
``distill.export``) with a ``LoraFile`` row of kind ``student``.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from sqlalchemy import select

from distill.backbones import adapters
from distill.backbones.base import Backbone
from distill.backbones.registry import load_backbone
from distill.callbacks import Reporter
from distill.config import DistillConfig, merge_overrides
from distill.effectbench.general import GENERAL_EDITS, general_images
from distill.export import (
    FORMATS,
    CatalogEntry,
    CatalogError,
    convert_collection_lora,
    export_collection_lora,
    read_catalog,
    student_init,
)
from distill.images import resize, to_tensor
from distill.prompts.base import student_condition
from distill.targets import EffectSpec
from distill.trainer import STUDENT, CollectionDistiller, DistillResult, GeneralData, adapter_params
from storage import LoraFile, LoraKind, Run, RunKind

from . import library, runs, teachers_service
from .context import Studio
from .library import LibraryError
from .lora_files import store_lora

RUN_KINDS = (RunKind.DISTILL.value, RunKind.EXTEND.value)
GENERAL_IMAGES = 64
FAKE_PREFIX = "fake/"  # the fake critic's tensors in a distillation checkpoint


class DistillError(ValueError):
    """A curator-facing problem with starting, extending or exporting a distillation."""


# ------------------------------------------------------------------------------------------------
# checking the effects


@dataclass(frozen=True)
class EffectPlan:
    """Everything a run needs of one effect, checked."""

    name: str
    teacher_lora_id: int
    teacher_prompt: str
    trigger: str
    student_prompt: str
    pairs: int

    @property
    def condition(self) -> str:
        """c_student = trigger + student prompt (eq. 5)."""
        return student_condition(self.trigger, self.student_prompt)

    def catalog_entry(self) -> CatalogEntry:
        return CatalogEntry(self.name, self.trigger, self.student_prompt, self.teacher_prompt)


def plan_effects(studio: Studio, names: list[str]) -> list[EffectPlan]:
    """Check every effect at once; raise ``DistillError`` listing everything missing and its fix."""
    if not names:
        raise DistillError(
            "There are no effects to distil: import pair sets first (`python -m studio import NAME FOLDER`)."
        )
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DistillError(f"Effects named twice: {', '.join(dup)}.")
    plans, problems = [], []
    for name in names:
        try:
            info = library.get_effect(studio, name)
        except LibraryError as e:
            problems.append(str(e))
            continue
        missing = []
        teacher = teachers_service.teacher_for(studio, name)
        if teacher is None:
            missing.append(
                f"a teacher LoRA (`python -m studio teacher train {name}`, or "
                f"`python -m studio teacher import {name} FILE`)"
            )
        if not info.teacher_prompt.strip():
            missing.append(f'a teacher prompt (`python -m studio effects prompt {name} "..."`)')
        if not (info.trigger or "").strip():
            missing.append(f"a trigger word (`python -m studio prompts generate {name}`)")
        if not (info.student_prompt or "").strip():
            missing.append(
                f"a student prompt (`python -m studio prompts generate {name}`, or "
                f'`python -m studio prompts set {name} --student "..."`)'
            )
        if info.pairs == 0:
            missing.append(f"kept training pairs (all were dropped; `python -m studio effects show {name}`)")
        if missing:
            problems.append(f"'{name}' needs " + "; ".join(missing))
            continue
        plans.append(
            EffectPlan(
                name,
                teacher.id,
                info.teacher_prompt.strip(),
                info.trigger.strip(),
                info.student_prompt.strip(),
                info.pairs,
            )
        )
    if problems:
        raise DistillError("Cannot distil yet:\n- " + "\n- ".join(problems))
    return plans


def _config(
    backbone: str,
    base: dict[str, Any] | None,
    overrides: dict[str, Any] | None,
    n_effects: int | None = None,
) -> DistillConfig:
    d = dict(base) if base else DistillConfig.for_backbone(backbone, n_effects).to_dict()
    try:
        return DistillConfig.from_dict(merge_overrides(d, overrides or {}))
    except (TypeError, ValueError) as e:
        raise DistillError(f"Bad distillation settings: {e}") from e


def planned_config(
    studio: Studio, overrides: dict[str, Any] | None = None, n_effects: int | None = None
) -> DistillConfig:
    """The settings a new run of ``n_effects`` effects on this studio's backbone gets with ``overrides``
    (checked); without ``overrides["steps"]`` the budget grows with the effects (``budget_steps``)."""
    return _config(studio.config.backbone, None, overrides, n_effects)


def _general(backbone: str, images: int, seed: int = 0) -> dict[str, Any]:
    # The tiny backbone was pretrained on the general edits' phrasings; a real model gets instructions
    # written for its general images by the prompt writer (VLM or offline describer).
    return {"images": images, "seed": seed, "instructions": "phrasings" if backbone == "tiny" else "writer"}


def start_distillation(
    studio: Studio,
    effects: list[str] | None = None,
    config_overrides: dict[str, Any] | None = None,
    name: str = "",
    *,
    general_image_count: int = GENERAL_IMAGES,
) -> int:
    """Check the effects (default: every effect of the library) and queue a distillation run."""
    names = effects if effects else [e.name for e in library.list_effects(studio)]
    plans = plan_effects(studio, list(names))
    backbone = studio.config.backbone
    config = _config(backbone, None, config_overrides, len(plans))
    run_config = {
        "effects": [p.name for p in plans],
        "plans": [asdict(p) for p in plans],
        "backbone": backbone,
        "model_path": studio.config.model_path,
        "distill": config.to_dict(),
        "general": _general(backbone, general_image_count),
    }
    label = name or f"distill {len(plans)} effects"
    return runs.submit(studio, RunKind.DISTILL.value, run_config, name=label)


def student_lora(studio: Studio, run_id: int) -> LoraFile | None:
    """The student LoRA a distill/extend run produced (None while it runs or when it was stopped)."""
    with studio.session() as s:
        return s.scalar(
            select(LoraFile)
            .where(LoraFile.run_id == run_id, LoraFile.kind == LoraKind.STUDENT)
            .order_by(LoraFile.id.desc())
            .limit(1)
        )


def _resolve_student(studio: Studio, run_id: int | None, lora_id: int | None) -> LoraFile:
    if (run_id is None) == (lora_id is None):
        raise DistillError("Give either a run or a LoRA file, not both or neither.")
    if lora_id is not None:
        with studio.session() as s:
            lora = s.get(LoraFile, lora_id)
        if lora is None or lora.kind != LoraKind.STUDENT:
            raise DistillError(f"LoRA file #{lora_id} is not a CollectionLoRA student.")
        return lora
    run = _check_kind(studio, run_id)
    lora = student_lora(studio, run_id)
    if lora is None:
        raise DistillError(
            f"Run {run_id} has no finished student LoRA yet (it is {run.status.value}); "
            f"`python -m studio distill status {run_id}` shows where it is."
        )
    return lora


def _catalog_of(studio: Studio, lora: LoraFile) -> list[CatalogEntry]:
    entries = (lora.meta or {}).get("catalog")
    if entries:
        return [CatalogEntry(**e) for e in entries]
    return read_catalog(studio.blobs.root / lora.path).entries


def extend_collection(
    studio: Studio,
    new_effects: list[str],
    *,
    from_run: int | None = None,
    from_lora: int | None = None,
    steps: int | None = None,
    config_overrides: dict[str, Any] | None = None,
    name: str = "",
) -> int:
    """Queue a short run that adds ``new_effects`` to an existing CollectionLoRA (Tab. 5). Without
    ``steps``, each new effect gets one effect's share of the parent run's steps, and the coarse stage
    runs at the extension's lr (``DistillConfig.for_extension``).

    The student starts from the existing one and the old effects are replayed beside the new ones
    (``DistillConfig.new_effect_share`` of the effect batches go to the new effects); the fake critic
    starts from the parent run's last checkpoint when it still exists."""
    parent = _resolve_student(studio, from_run, from_lora)
    old = [e.name for e in _catalog_of(studio, parent)]
    again = [n for n in new_effects if n in old]
    if again:
        raise DistillError(
            f"Already in this CollectionLoRA: {', '.join(again)}. Extend with new effects only."
        )
    if not new_effects:
        raise DistillError("Name at least one new effect to add.")
    backbone = parent.backbone or studio.config.backbone
    if backbone != studio.config.backbone:
        raise DistillError(
            f"The CollectionLoRA was distilled on the '{backbone}' backbone; open the studio with that "
            f"backbone to extend it (this one runs '{studio.config.backbone}')."
        )
    plans = plan_effects(studio, [*old, *new_effects])
    parent_cfg: dict[str, Any] | None = None
    model_path = studio.config.model_path
    share_of = len(old)  # the effects the parent's steps were for
    if parent.run_id is not None:
        with studio.session() as s:
            prun = s.get(Run, parent.run_id)
            if prun is not None:
                parent_cfg = (prun.config or {}).get("distill")
                model_path = (prun.config or {}).get("model_path", model_path)
                share_of = len((prun.config or {}).get("new_effects") or old)  # an extension's: its new ones
    # settings the parent's run predates take the preset's values (not the bare dataclass defaults)
    base = {**DistillConfig.for_backbone(backbone, len(old)).to_dict(), **(parent_cfg or {})}
    if parent_cfg is None:  # the student's shape is what the file says
        spec = {"rank": parent.rank, "alpha": parent.alpha}
        base["student_lora"] = {**base["student_lora"], **spec}
    extension = DistillConfig.from_dict(base).for_extension(share_of, len(new_effects))
    overrides = {**({} if steps is None else {"steps": steps}), **(config_overrides or {})}
    config = _config(backbone, extension.to_dict(), overrides)
    run_config = {
        "effects": [p.name for p in plans],
        "new_effects": list(new_effects),
        "plans": [asdict(p) for p in plans],
        "backbone": backbone,
        "model_path": model_path,
        "distill": config.to_dict(),
        "general": _general(backbone, GENERAL_IMAGES),
        "init_student_lora_id": parent.id,
        "parent_run_id": parent.run_id,
    }
    label = name or f"extend #{parent.id} with {', '.join(new_effects)}"
    return runs.submit(studio, RunKind.EXTEND.value, run_config, name=label, parent_run_id=parent.run_id)


# ------------------------------------------------------------------------------------------------
# the job body (run in the worker process; tests call it in-process)


@dataclass
class Prepared:
    distiller: CollectionDistiller
    backbone: Backbone
    plans: list[EffectPlan]
    config: DistillConfig


@dataclass
class DistillOutcome:
    result: DistillResult
    lora: LoraFile | None  # None when the run was stopped before the end


def _studio_for(studio: Studio, run_config: dict[str, Any]) -> Studio:
    """The studio as the run sees it: the run's backbone, whatever the opener's default."""
    cfg = replace(
        studio.config,
        backbone=run_config.get("backbone") or studio.config.backbone,
        model_path=run_config.get("model_path") or studio.config.model_path,
    )
    return Studio(cfg, studio.engine, studio.sessions, studio.blobs)


def _sources(studio: Studio, effect: str, size: int) -> torch.Tensor:
    images = []
    for p in library.effect_pairs(studio, effect):
        im = Image.open(io.BytesIO(studio.blobs.read_bytes(p.source_sha, "png"))).convert("RGB")
        images.append(resize(to_tensor([im]), size))
    return torch.cat(images)


def _general_data(settings: dict[str, Any], size: int) -> GeneralData:
    n, seed = int(settings.get("images", GENERAL_IMAGES)), int(settings.get("seed", 0))
    arrays = general_images(n, seed, size=size)
    if settings.get("instructions", "phrasings") == "writer":
        from . import prompts_service  # the VLM / offline writer, only where it is asked for

        instructions = prompts_service.general_instructions([Image.fromarray(_u8(a)) for a in arrays])
    else:
        phrasings = [ph for edit in GENERAL_EDITS for ph in edit.phrasings]
        instructions = [phrasings[i % len(phrasings)] for i in range(n)]
    return GeneralData(to_tensor(arrays), instructions)


def _u8(a: Any) -> Any:
    return (a.clip(0, 1) * 255 + 0.5).astype("uint8")


def _load_teacher(
    studio: Studio, backbone: Backbone, effect: str, lora_id: int, config: DistillConfig
) -> str:
    """Load the run's teacher LoRA file of ``effect`` as its adapter (offloaded at once where the
    config says, so that loading never holds every teacher on the GPU)."""
    with studio.session() as s:
        lora = s.get(LoraFile, lora_id)
    if lora is None:
        raise DistillError(f"The teacher LoRA file #{lora_id} of '{effect}' was deleted; start a new run.")
    name = teachers_service.adapter_name(effect)
    if name in adapters.adapter_names(backbone.transformer):
        adapters.delete(backbone.transformer, name)
    adapters.load_lora(backbone.transformer, teachers_service.teacher_path(studio, lora), name)
    if config.offload_teachers:
        adapters.offload(backbone.transformer, name, keep=config.micro_batches)
    return name


def _fake_init(studio: Studio, parent_run_id: int | None) -> dict[str, torch.Tensor] | None:
    """The fake critic of the parent run's last checkpoint (only its tensors are read)."""
    if parent_run_id is None:
        return None
    ckpt = runs.last_checkpoint(studio, parent_run_id)
    if ckpt is None or not (ckpt.path / "state.safetensors").is_file():
        return None
    with safe_open(ckpt.path / "state.safetensors", framework="pt", device="cpu") as f:
        return {k[len(FAKE_PREFIX) :]: f.get_tensor(k) for k in f.keys() if k.startswith(FAKE_PREFIX)}


def prepare(
    studio: Studio,
    run_config: dict[str, Any],
    work_dir: Path,
    reporter: Reporter | None = None,
    *,
    backbone: Backbone | None = None,
    device: str | None = None,
) -> Prepared:
    """Backbone with every teacher loaded, effect specs, general data and the distiller, ready to train."""
    studio = _studio_for(studio, run_config)
    # the effects as checked when the run was queued (a resumed run distils the same thing)
    pinned = run_config.get("plans")
    plans = [EffectPlan(**d) for d in pinned] if pinned else plan_effects(studio, list(run_config["effects"]))
    config = DistillConfig.from_dict(run_config["distill"])
    backbone = backbone or load_backbone(studio.config.backbone, studio.config.model_path, device=device)
    new = set(run_config.get("new_effects") or [])
    size = backbone.image_size
    specs = []
    for p in plans:
        adapter = _load_teacher(studio, backbone, p.name, p.teacher_lora_id, config)
        sources = _sources(studio, p.name, size)
        specs.append(EffectSpec(p.name, adapter, p.teacher_prompt, p.condition, sources, new=p.name in new))
    adapters.set_trainable(backbone.transformer, [])  # teachers stay frozen
    general = _general_data(run_config.get("general") or {}, size)

    init_student = init_fake = None
    if run_config.get("init_student_lora_id") is not None:
        with studio.session() as s:
            parent = s.get(LoraFile, int(run_config["init_student_lora_id"]))
        if parent is None:
            raise DistillError("The CollectionLoRA this run extends was deleted; start a new run.")
        init_student = student_init(studio.blobs.root / parent.path)
        init_fake = _fake_init(studio, run_config.get("parent_run_id"))
    distiller = CollectionDistiller(
        backbone,
        specs,
        general,
        config,
        work_dir,
        reporter,
        init_student=init_student,
        init_fake=init_fake,
    )
    if init_student is not None:
        own = adapter_params(backbone.transformer, STUDENT)
        if set(own) != set(init_student):
            raise DistillError(
                "The CollectionLoRA being extended does not fit this run's student adapter (other layers or "
                "rank); extend it with the settings it was distilled with."
            )
    return Prepared(distiller, backbone, plans, config)


def run_distillation(
    studio: Studio,
    run_config: dict[str, Any],
    reporter: Reporter | None = None,
    *,
    work_dir: Path,
    run_id: int | None = None,
    resume_from: Path | None = None,
    backbone: Backbone | None = None,
    device: str | None = None,
) -> DistillOutcome:
    """Distil (or extend) in this process and register the student LoRA when the run completes."""
    prep = prepare(studio, run_config, work_dir, reporter, backbone=backbone, device=device)
    result = prep.distiller.train(resume_from)
    if result.stopped:
        return DistillOutcome(result, None)
    lora = _register_student(_studio_for(studio, run_config), prep, run_config, result, run_id)
    return DistillOutcome(result, lora)


def _register_student(
    studio: Studio, prep: Prepared, run_config: dict[str, Any], result: DistillResult, run_id: int | None
) -> LoraFile:
    catalog = [p.catalog_entry() for p in prep.plans]
    spec = prep.config.student_lora
    extra = {"run_id": str(run_id or ""), "steps": str(result.steps)}
    meta = {
        "catalog": [
            {
                "name": e.name,
                "trigger": e.trigger,
                "student_prompt": e.student_prompt,
                "teacher_prompt": e.teacher_prompt,
            }
            for e in catalog
        ],
        "effects": [e.name for e in catalog],
        "new_effects": list(run_config.get("new_effects") or []),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "student_steps": prep.config.student_steps,
        "final_metrics": {k: float(v) for k, v in result.metrics.items()},
    }
    return store_lora(
        studio,
        lambda path: export_collection_lora(
            prep.backbone.transformer,
            path,
            catalog,
            adapter=STUDENT,
            backbone=prep.backbone.name,
            student_steps=prep.config.student_steps,
            extra_meta=extra,
        ),
        kind=LoraKind.STUDENT,
        run_id=run_id,
        rank=spec.rank,
        alpha=spec.alpha,
        format="diffusers",
        backbone=prep.backbone.name,
        meta=meta,
    )


# ------------------------------------------------------------------------------------------------
# export and run control


def export(
    studio: Studio,
    out_path: Path,
    *,
    run_id: int | None = None,
    lora_id: int | None = None,
    fmt: str = "diffusers",
) -> Path:
    """Write a run's (or a LoRA file's) CollectionLoRA to ``out_path`` in diffusers or kohya layout."""
    if fmt not in FORMATS:
        raise DistillError(f"Unknown format '{fmt}': choose {' or '.join(FORMATS)}.")
    lora = _resolve_student(studio, run_id, lora_id)
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise DistillError(f"Name the output file *.safetensors (got {out_path.name}).")
    try:
        return convert_collection_lora(studio.blobs.root / lora.path, out_path, fmt)  # type: ignore[arg-type]
    except CatalogError as e:
        raise DistillError(str(e)) from e


def _check_kind(studio: Studio, run_id: int) -> Run:
    """The run, if it is a distillation (or extension) run."""
    with studio.session() as s:
        run = s.get(Run, run_id)
    if run is None:
        raise DistillError(f"There is no run {run_id}.")
    if run.kind.value not in RUN_KINDS:
        raise DistillError(f"Run {run_id} is a {run.kind.value} run, not a distillation.")
    return run


def stop(studio: Studio, run_id: int) -> str:
    """Ask a distillation run to stop (it checkpoints first); returns its status."""
    _check_kind(studio, run_id)
    return runs.request_stop(studio, run_id).value


def resume(studio: Studio, run_id: int) -> int:
    """Restart a stopped or failed distillation run from its last checkpoint; returns the worker pid."""
    _check_kind(studio, run_id)
    return runs.resume(studio, run_id)


def planned_steps(studio: Studio, run_id: int) -> int:
    """The generator steps a queued distillation or extension run will take."""
    return int(status(studio, run_id).config["distill"]["steps"])


def status(studio: Studio, run_id: int) -> runs.RunView:
    _check_kind(studio, run_id)
    return runs.run_status(studio, run_id)
