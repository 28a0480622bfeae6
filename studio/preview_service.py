"""Inference the studio UI runs in its own process: previews, a quick evaluation, the switch cost.

Short, bounded work only (a handful of images); training always runs in worker processes. The
backbone is loaded once per process and kept; LoRAs (students, teachers, Lightning) are named
adapters on its one transformer, loaded the first time they are needed and switched per call:
never a copy of the model. One lock serialises the calls that use the backbone (switching adapters
is not thread-safe), so two browser tabs previewing at once take turns.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from distill.backbones import adapters
from distill.backbones.base import Backbone
from distill.backbones.registry import load_backbone
from distill.effectbench.bench import test_sources
from distill.effectbench.effects import EFFECT_NAMES, compose, get_effect
from distill.effectbench.scenes import CATEGORIES, Scene
from distill.evaluation import (
    EffectEntry,
    System,
    composition_prompt,
    evaluate_system,
    run_system,
    student_system,
)
from distill.export import Catalog, CatalogEntry, CatalogError, compose_prompt, read_catalog
from distill.images import to_tensor
from distill.serving import BANK_PREFIX, BankEntry, LoraBankEditor
from distill.teachers import TEACHER_STEPS
from storage import Evaluation, LoraFile, LoraKind, Run, RunKind, RunStatus

from . import library, teachers_service
from .context import Studio

log = logging.getLogger(__name__)

MAX_ADAPTERS = 12  # LoRAs kept loaded on the preview backbone (least recently used go first)
DISPLAY_SIZE = 256  # previews are upscaled (nearest) so a 32 px tiny-backbone image is visible
BENCH_SOURCES_PER_CATEGORY = 4
LIGHTNING_STEPS = 8
DISTILL_KINDS = (RunKind.DISTILL, RunKind.EXTEND)

_LOCK = threading.RLock()
_BACKBONES: dict[tuple[str, str | None], Backbone] = {}
_LOADED: dict[int, OrderedDict[str, str]] = {}  # id(backbone) -> adapter name -> file sha, in LRU order


class PreviewError(ValueError):
    """A preview, evaluation or measurement that cannot run; the message says what to do."""


# -- the backbone and its adapters ---------------------------------------------------------------


def backbone(studio: Studio) -> Backbone:
    """The studio's backbone for in-process inference, loaded on first use and kept."""
    key = (studio.config.backbone, studio.config.model_path)
    with _LOCK:
        bb = _BACKBONES.get(key)
        if bb is None:
            try:
                bb = load_backbone(studio.config.backbone, studio.config.model_path)
            except FileNotFoundError as e:
                raise PreviewError(str(e)) from e
            _BACKBONES.clear()  # one backbone per process: a different one replaces it
            _LOADED.clear()
            _BACKBONES[key] = bb
        return bb


@contextmanager
def locked_backbone(studio: Studio) -> Iterator[Backbone]:
    """The cached backbone, held for exclusive use (e.g. to check an imported LoRA on it)."""
    with _LOCK:
        yield backbone(studio)


def forget_backbones() -> None:
    """Drop the cached backbone (tests; a studio switching models)."""
    with _LOCK:
        _BACKBONES.clear()
        _LOADED.clear()


def lora_path(studio: Studio, lora: LoraFile) -> Path:
    return studio.blobs.root / lora.path


def ensure_adapter(bb: Backbone, name: str, path: Path, sha: str, keep: tuple[str, ...] = ()) -> str:
    """Adapter ``name`` holding the file ``path`` (content ``sha``), loading it unless already there.

    At most ``MAX_ADAPTERS`` stay loaded; the least recently used (not in ``keep``) are dropped."""
    with _LOCK:
        loaded = _LOADED.setdefault(id(bb), OrderedDict())
        names = adapters.adapter_names(bb.transformer)
        if loaded.get(name) == sha and name in names:
            loaded.move_to_end(name)
            return name
        if name in names:
            adapters.delete(bb.transformer, name)
        for old in list(loaded):
            if len(loaded) < MAX_ADAPTERS:
                break
            if old not in keep and old != name:
                if old in adapters.adapter_names(bb.transformer):
                    adapters.delete(bb.transformer, old)
                del loaded[old]
        adapters.load_lora(bb.transformer, path, name)
        loaded[name] = sha
        return name


def _lora_adapter(studio: Studio, bb: Backbone, lora: LoraFile, keep: tuple[str, ...] = ()) -> str:
    path = lora_path(studio, lora)
    if not path.is_file():
        raise PreviewError(f"The LoRA file #{lora.id} is missing from the blob store ({lora.path}).")
    return ensure_adapter(bb, f"pv_{lora.kind.value}_{lora.id}", path, lora.sha256, keep)


# -- finished students ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StudentChoice:
    run_id: int | None
    lora_id: int
    label: str
    effects: tuple[str, ...]


def finished_students(studio: Studio) -> list[StudentChoice]:
    """Every CollectionLoRA student of this backbone, newest first."""
    with studio.session() as s:
        rows = s.execute(
            select(LoraFile, Run.name)
            .outerjoin(Run, Run.id == LoraFile.run_id)
            .where(LoraFile.kind == LoraKind.STUDENT, LoraFile.backbone == studio.config.backbone)
            .order_by(LoraFile.id.desc())
        ).all()
    out = []
    for lora, run_name in rows:
        effects = tuple((lora.meta or {}).get("effects") or [])
        shown = ", ".join(effects[:4]) + (f" +{len(effects) - 4} more" if len(effects) > 4 else "")
        where = f"run #{lora.run_id}" if lora.run_id else f"file #{lora.id}"
        label = f"{where}{f' {run_name}' if run_name else ''} ({shown})"
        out.append(StudentChoice(lora.run_id, lora.id, label, effects))
    return out


def student_file(studio: Studio, run_id: int) -> LoraFile:
    """The student LoRA of a finished distill/extend run, with a curator-facing error otherwise."""
    with studio.session() as s:
        run = s.get(Run, int(run_id))
        lora = s.scalar(
            select(LoraFile)
            .where(LoraFile.run_id == int(run_id), LoraFile.kind == LoraKind.STUDENT)
            .order_by(LoraFile.id.desc())
            .limit(1)
        )
    if run is None:
        raise PreviewError(f"There is no run {run_id}.")
    if run.kind not in DISTILL_KINDS:
        raise PreviewError(f"Run {run_id} is a {run.kind.value} run, not a distillation.")
    if lora is None:
        state = "still running" if run.status in (RunStatus.QUEUED, RunStatus.RUNNING) else run.status.value
        raise PreviewError(f"Run {run_id} has no finished student yet (it is {state}).")
    return lora


def catalog_of(studio: Studio, lora: LoraFile) -> Catalog:
    """The student's effect catalog (from its row, else from the file's metadata)."""
    entries = (lora.meta or {}).get("catalog")
    if entries:
        steps = int((lora.meta or {}).get("student_steps") or 8)
        return Catalog([CatalogEntry(**e) for e in entries], backbone=lora.backbone, student_steps=steps)
    try:
        return read_catalog(lora_path(studio, lora))
    except CatalogError as e:
        raise PreviewError(str(e)) from e


# -- sources ---------------------------------------------------------------------------------------


def bench_sources(n_per_category: int = BENCH_SOURCES_PER_CATEGORY) -> dict[str, Scene]:
    """EffectBench-mini's held-out test scenes by label ('animal 1', 'portrait 2', ...)."""
    return {
        f"{cat} {i + 1}": sc for cat in CATEGORIES for i, sc in enumerate(test_sources(cat, n_per_category))
    }


def ground_truth(effects: list[str], scene: Scene) -> np.ndarray | None:
    """The exact output of the effect (or of A then B) on a bench scene, when they are bench effects."""
    if not effects or any(e not in EFFECT_NAMES for e in effects):
        return None
    fn = get_effect(effects[0]) if len(effects) == 1 else compose(effects[0], effects[1])
    return fn(scene.image, scene.mask)


def as_pil(img: np.ndarray | Image.Image) -> Image.Image:
    """An (H, W, 3) array in [0, 1] (or a PIL image) as an RGB PIL image, at its own size."""
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def display_image(img: np.ndarray | Image.Image) -> Image.Image:
    """Upscaled (nearest, whole factor) to about ``DISPLAY_SIZE`` so small images are visible."""
    im = as_pil(img)
    if max(im.size) < DISPLAY_SIZE:
        scale = max(1, DISPLAY_SIZE // max(im.size))
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return im


# -- preview ----------------------------------------------------------------------------------------


@dataclass
class PreviewImage:
    label: str
    image: Image.Image
    nfe: int  # 0 for the input and the ground truth
    seconds: float
    prompt: str = ""

    @property
    def caption(self) -> str:
        if not self.nfe:
            return self.label
        return f"{self.label} · {self.nfe} NFE · {self.seconds:.2f} s"


@dataclass
class PreviewResult:
    images: list[PreviewImage]
    notes: list[str] = field(default_factory=list)  # systems that could not be shown, and why


def _lightning(studio: Studio) -> LoraFile | None:
    with studio.session() as s:
        return s.scalar(
            select(LoraFile)
            .where(LoraFile.kind == LoraKind.LIGHTNING, LoraFile.backbone == studio.config.backbone)
            .order_by(LoraFile.id.desc())
            .limit(1)
        )


def _teacher_prompt(studio: Studio, effects: list[str]) -> str:
    prompts = [library.get_effect(studio, e).teacher_prompt.strip() for e in effects]
    if len(prompts) == 1:
        return prompts[0]
    return composition_prompt(prompts[0].rstrip(". "), prompts[1].rstrip(". "))


def preview(
    studio: Studio,
    run_id: int,
    effects: list[str],
    image: Image.Image | np.ndarray,
    *,
    seed: int = 0,
    truth: np.ndarray | None = None,
    teacher_steps: int = TEACHER_STEPS,
    teacher_cfg: float | None = None,
) -> PreviewResult:
    """The student of ``run_id`` on one effect or a composition of two (A then B), beside the
    teacher(s) (``teacher_steps`` x CFG ``teacher_cfg``, None: the backbone's) and Base+Lightning
    where a Lightning LoRA exists. ``truth`` (an exact expected output) is shown when given."""
    effects = [e for e in effects if e]
    if len(effects) not in (1, 2) or len(set(effects)) != len(effects):
        raise PreviewError("Pick one effect, or two different effects to compose (A then B).")
    lora = student_file(studio, run_id)
    catalog = catalog_of(studio, lora)
    missing = [e for e in effects if e not in catalog.names()]
    if missing:
        raise PreviewError(
            f"Run {run_id}'s CollectionLoRA does not hold {', '.join(missing)}; it holds "
            f"{', '.join(catalog.names())}."
        )
    image = as_pil(image)
    entry = EffectEntry(
        "+".join(effects),
        _teacher_prompt(studio, effects),
        catalog.get(effects[0]).prompt if len(effects) == 1 else compose_prompt(catalog, *effects),
    )
    result = PreviewResult([PreviewImage("Input", display_image(image), 0, 0.0)])
    if truth is not None:
        result.images.append(PreviewImage("Ground truth", display_image(truth), 0, 0.0))
    with _LOCK:
        bb = backbone(studio)
        src = bb.prepare_images(to_tensor([image.convert("RGB")]))
        student = _lora_adapter(studio, bb, lora)
        systems: list[tuple[System, str]] = [
            (student_system(catalog.student_steps, student, "Student (CollectionLoRA)"), entry.student_prompt)
        ]
        teachers = []
        for e in effects:
            t = teachers_service.teacher_for(studio, e)
            if t is None:
                result.notes.append(f"Teacher: '{e}' has no teacher LoRA any more.")
            else:
                teachers.append(_lora_adapter(studio, bb, t, keep=(student, *teachers)))
        if len(teachers) == len(effects):
            label = "Teacher" if len(effects) == 1 else "Teachers stacked"
            systems.append(
                (
                    System(
                        label,
                        lambda _e, t=tuple(teachers): list(t),
                        lambda e: e.teacher_prompt,
                        teacher_steps,
                        bb.teacher_cfg if teacher_cfg is None else teacher_cfg,
                    ),
                    entry.teacher_prompt,
                )
            )
            light = _lightning(studio)
            if light is None:
                result.notes.append("Base+Lightning: the studio has no Lightning LoRA for this backbone.")
            else:
                la = _lora_adapter(studio, bb, light, keep=(student, *teachers))
                systems.append(
                    (
                        System(
                            "Base+Lightning",
                            lambda _e, t=(*teachers, la): list(t),
                            lambda e: e.teacher_prompt,
                            LIGHTNING_STEPS,
                        ),
                        entry.teacher_prompt,
                    )
                )
        for system, prompt in systems:
            outs, seconds = run_system(bb, system, entry, src, seed=seed)
            result.images.append(
                PreviewImage(system.name, display_image(outs[0]), system.nfe, seconds, prompt)
            )
    return result


# -- quick evaluation -------------------------------------------------------------------------------


@dataclass
class EffectScore:
    effect: str
    n: int
    psnr: float
    bad_case_rate: float


@dataclass
class QuickEval:
    lora_id: int
    system: str
    scores: list[EffectScore]
    skipped: list[str]  # effects without exact ground truth (not EffectBench-mini effects)
    sources: int
    nfe: int
    seconds: float


def quick_evaluate(
    studio: Studio,
    run_id: int,
    n_per_category: int = 2,
    effects: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    seed: int = 0,
) -> QuickEval:
    """The run's student on ``n_per_category`` EffectBench-mini test sources per category, for every
    bench effect of its catalog (or ``effects``): PSNR against the exact ground truth and the bad-case
    rate (the output is nearer another effect's ground truth, or the untouched source). Stored as
    ``Evaluation`` rows of system ``student:<lora id>`` with ``details["quick"]``."""
    if n_per_category < 1:
        raise PreviewError("Use at least one test source per category.")
    lora = student_file(studio, run_id)
    catalog = catalog_of(studio, lora)
    names = effects or catalog.names()
    bench = [n for n in names if n in EFFECT_NAMES]
    skipped = [n for n in names if n not in EFFECT_NAMES]
    if not bench:
        raise PreviewError(
            "None of this CollectionLoRA's effects is an EffectBench-mini effect, so there is no exact "
            "ground truth to score against; use the Preview tab to judge them by eye."
        )
    scenes = [sc for cat in CATEGORIES for sc in test_sources(cat, n_per_category, seed)]
    entries = [EffectEntry(n, catalog.get(n).teacher_prompt, catalog.get(n).prompt) for n in bench]
    t0 = time.perf_counter()
    with _LOCK:
        bb = backbone(studio)
        adapter = _lora_adapter(studio, bb, lora)
        system = student_system(catalog.student_steps, adapter, f"student:{lora.id}")
        res = evaluate_system(bb, system, entries, scenes, seed=seed, progress=progress)
    seconds = time.perf_counter() - t0
    scores = [EffectScore(n, s.n, s.psnr, s.bad_case_rate) for n, s in res.per_effect.items()]
    ids = {e.name: e.id for e in library.list_effects(studio)}
    with studio.session() as s:
        for sc in scores:
            details = {"quick": True, "sources": len(scenes), "nfe": system.nfe, "run_id": run_id}
            for metric, value in (("psnr_mean", sc.psnr), ("bad_case_rate", sc.bad_case_rate)):
                s.add(
                    Evaluation(
                        run_id=run_id,
                        system=system.name,
                        effect_id=ids.get(sc.effect),
                        metric=metric,
                        value=float(value),
                        n=sc.n,
                        details=details,
                    )
                )
    return QuickEval(lora.id, system.name, scores, skipped, len(scenes), system.nfe, seconds)


# -- deployment: the cost of switching LoRAs per query ------------------------------------------


@dataclass
class SwitchCost:
    files: int
    queries: int
    switches: int  # queries that needed another teacher file than the one loaded
    mean_seconds: float  # per switch: reading the file and swapping it in
    max_seconds: float

    @property
    def per_query(self) -> float:
        return self.switches / self.queries if self.queries else 0.0


def measure_switch_cost(
    studio: Studio, teachers: dict[str, LoraFile], queries: int = 20, seed: int = 0
) -> SwitchCost:
    """What a LoRA bank pays to serve a seeded stream of ``queries`` requests spread over these effects'
    teacher files: ``LoraBankEditor.prepare``, the code the serving API runs, on this backbone (no
    Lightning LoRA stacked). The bank's adapters are dropped afterwards."""
    if not teachers:
        raise PreviewError("There are no teacher LoRA files to measure.")
    bank = [
        BankEntry(name, lora_path(studio, lora), str((lora.meta or {}).get("teacher_prompt") or name))
        for name, lora in teachers.items()
    ]
    rng = random.Random(seed)
    stream = [rng.choice(list(teachers)) for _ in range(queries)]
    loads: list[float] = []
    with _LOCK:
        bb = backbone(studio)
        tr = bb.transformer
        before = adapters.active(tr)
        try:
            editor = LoraBankEditor(bb, bank, None)
            for name in stream:
                seconds, switched = editor.prepare((name,))
                if switched:
                    loads.append(seconds)
        finally:
            adapters.activate(tr, None)
            for name in adapters.adapter_names(tr):
                if name.startswith(BANK_PREFIX):
                    adapters.delete(tr, name)
            adapters.activate(tr, *before)
    return SwitchCost(len(bank), len(stream), len(loads), float(np.mean(loads)), float(np.max(loads)))
