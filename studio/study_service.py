"""Blind side-by-side user study (appendix 10, Fig. 16): create, generate, vote, unblind.

A study shows voters items of one source image and the candidate edits of several systems (Base,
Base+Lightning, FM+Lightning, Ours, or any LoRA file) and asks three questions about each item:
visual quality, consistency, style alignment — one choice each.

- ``create_study`` checks everything up front (teacher LoRAs, Lightning / FM / student LoRAs, student
  catalogs, sources), pins it in ``Study.config`` and queues a ``study_gen`` run. The run
  (``generate``) edits every sampled (effect, source) pair with every system on the same noise, stores
  the images in the blob store and writes the items; the study then opens for voting.
- Blinding: a candidate's key is a random id (``secrets``), its slot (A, B, C, ...) is shuffled per
  item, and voters see images only through per-voter opaque names (an HMAC of their link token), so
  nothing a voter receives names a system or a blob. Votes store the key; ``results`` unblinds.
- Voters are links: ``add_voters`` returns each voter's token once; only its sha256 is stored.
- One vote per voter, item and question: a second vote for an answered question is refused
  (``AlreadyVoted``, HTTP 409) rather than replacing the first, so a resubmitted form or a second tab
  never changes what was recorded. The database's unique constraint backs this under concurrency.

Run config of ``study_gen``: ``{"study_id": ID}``; everything else lives in the study's config.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import math
import random
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from storage import (
    LoraFile,
    LoraKind,
    RunKind,
    Study,
    StudyItem,
    StudyStatus,
    Vote,
    VoteQuestion,
    Voter,
    hash_token,
)

from . import runs
from .context import Studio

if TYPE_CHECKING:
    from distill.backbones.base import Backbone
    from distill.callbacks import Reporter

RUN_KIND = RunKind.STUDY_GEN.value
BASE, BASE_LIGHTNING, FM_LIGHTNING, OURS = "Base", "Base+Lightning", "FM+Lightning", "Ours"
PAPER_SYSTEMS = (BASE, BASE_LIGHTNING, FM_LIGHTNING, OURS)
_ALIASES = {
    "base": BASE,
    "teacher": BASE,
    "base+lightning": BASE_LIGHTNING,
    "fm+lightning": FM_LIGHTNING,
    "fm-all+lightning": FM_LIGHTNING,
    "ours": OURS,
    "student": OURS,
}
QUESTIONS: tuple[VoteQuestion, ...] = (VoteQuestion.QUALITY, VoteQuestion.CONSISTENCY, VoteQuestion.STYLE)
# What voters read; criterion names as in Fig. 16.
QUESTION_TEXT: dict[VoteQuestion, tuple[str, str]] = {
    VoteQuestion.QUALITY: ("Visual quality", "Which result looks best: clean, sharp, free of artefacts?"),
    VoteQuestion.CONSISTENCY: (
        "Consistency",
        "Which result keeps the subject and layout of the original image best?",
    ),
    VoteQuestion.STYLE: ("Style alignment", "Which result applies the requested edit best?"),
}
MAX_SYSTEMS = 8
MAX_VOTER_NAME = 200
TOKEN_BYTES = 24  # secrets.token_urlsafe(24): 192 random bits, 32 URL-safe characters
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{20,64}")
Z95 = 1.959963984540054  # two-sided 95 % normal quantile
BASE_STEPS, FAST_STEPS = 40, 8  # §5.1: 40-step CFG teachers (the backbone's scale), 8-step accelerated


class StudyError(ValueError):
    """A curator-facing problem with creating, generating or reading a study."""


class VoteError(ValueError):
    """A voter-facing refusal; ``status`` is the HTTP status the voter pages answer with."""

    status = 400


class UnknownVoter(VoteError):
    status = 404


class UnknownItem(VoteError):
    status = 404


class StudyNotOpen(VoteError):
    status = 403


class BadChoice(VoteError):
    status = 422


class AlreadyVoted(VoteError):
    status = 409


# ------------------------------------------------------------------------------------------------
# systems


@dataclass(frozen=True)
class LoraRef:
    """A LoRA file in the blob store, pinned when the study is created."""

    relpath: str
    sha256: str
    label: str
    lora_id: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraRef:
        return cls(**d)


@dataclass(frozen=True)
class SystemSpec:
    """One candidate system: which adapters are active, which prompt, how many steps.

    ``teacher``: the effect's own teacher LoRA is active; ``loras``: further LoRA files (Lightning, the
    FM all-in-1 LoRA, a student, ...); ``prompts``: effect -> instruction from a CollectionLoRA catalog
    (trigger + student prompt), or None for the effect's teacher prompt.
    """

    label: str
    kind: str  # base | base+lightning | fm+lightning | ours | lora
    steps: int
    cfg: float = 1.0
    teacher: bool = False
    loras: tuple[LoraRef, ...] = ()
    prompts: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["loras"] = [asdict(r) for r in self.loras]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SystemSpec:
        d = dict(d)
        d["loras"] = tuple(LoraRef.from_dict(r) for r in d.get("loras") or ())
        return cls(**d)


def _lora_row(studio: Studio, kind: LoraKind) -> LoraFile | None:
    with studio.session() as s:
        return s.scalar(
            select(LoraFile)
            .where(LoraFile.kind == kind, LoraFile.backbone == studio.config.backbone)
            .order_by(LoraFile.id.desc())
            .limit(1)
        )


def _ref_of_row(lora: LoraFile) -> LoraRef:
    label = (lora.meta or {}).get("original_name") or f"{lora.kind.value} LoRA #{lora.id}"
    return LoraRef(lora.path, lora.sha256, str(label), lora.id)


def _lora_ref(
    studio: Studio, given: int | str | Path | None, what: str, fallback: LoraKind | None
) -> LoraRef:
    """A LoRA given as a LoraFile id, a .safetensors path, or (None) the studio's newest of ``fallback``."""
    if given is None or given == "":
        row = _lora_row(studio, fallback) if fallback is not None else None
        if row is None:
            raise StudyError(
                f"{what}: the studio has no {fallback.value if fallback else ''} LoRA for the "
                f"'{studio.config.backbone}' backbone; give its file (a .safetensors path) or LoRA id"
            )
        return _ref_of_row(row)
    if isinstance(given, int) or (isinstance(given, str) and given.isdigit()):
        with studio.session() as s:
            row = s.get(LoraFile, int(given))
        if row is None:
            raise StudyError(f"{what}: there is no LoRA file #{given}")
        if row.backbone and row.backbone != studio.config.backbone:
            raise StudyError(
                f"{what}: LoRA file #{given} is for the '{row.backbone}' backbone, not "
                f"'{studio.config.backbone}'"
            )
        return _ref_of_row(row)
    path = Path(given).expanduser()
    if not path.is_file():
        raise StudyError(f"{what}: no LoRA file at {path}")
    if path.suffix.lower() != ".safetensors":
        raise StudyError(f"{what}: {path.name} is not a .safetensors file")
    ref = studio.blobs.put_file(path, "safetensors")
    return LoraRef(ref.relpath, ref.sha256, path.name)


def _catalog_prompts(studio: Studio, ref: LoraRef) -> tuple[dict[str, str], int] | None:
    """effect -> trigger + student prompt, and the student's steps, if the file is a CollectionLoRA."""
    from distill.export import CatalogError, read_catalog

    try:
        catalog = read_catalog(studio.blobs.root / ref.relpath)
    except (CatalogError, OSError):
        return None
    if not catalog.entries:
        return None
    return {e.name: e.prompt for e in catalog.entries}, int(catalog.student_steps)


def parse_system(text: str) -> tuple[str | None, str]:
    """``"Label=SPEC"`` or ``"SPEC"`` -> (label or None, spec)."""
    label, sep, spec = text.partition("=")
    return (label.strip() or None, spec.strip()) if sep and not Path(text).exists() else (None, text.strip())


def resolve_systems(
    studio: Studio,
    systems: Sequence[str],
    effects: Sequence[str],
    *,
    student: int | str | Path | None = None,
    lightning: int | str | Path | None = None,
    fm: int | str | Path | None = None,
    base_steps: int = BASE_STEPS,
    base_cfg: float | None = None,
    fast_steps: int = FAST_STEPS,
) -> tuple[list[SystemSpec], list[str]]:
    """The systems as pinned specs, and every problem found (each with what fixes it)."""
    if base_cfg is None:
        from distill.backbones.registry import teacher_cfg

        base_cfg = teacher_cfg(studio.config.backbone)
    specs: list[SystemSpec] = []
    problems: list[str] = []
    cache: dict[str, LoraRef] = {}

    def ref(key: str, given: Any, what: str, kind: LoraKind | None) -> LoraRef | None:
        if key not in cache:
            try:
                cache[key] = _lora_ref(studio, given, what, kind)
            except StudyError as e:
                problems.append(str(e))
                return None
        return cache[key]

    def catalog_for(r: LoraRef, label: str) -> tuple[dict[str, str], int] | None:
        cat = _catalog_prompts(studio, r)
        if cat is None:
            return None
        missing = [e for e in effects if e not in cat[0]]
        if missing:
            problems.append(
                f"{label}: the CollectionLoRA {r.label} does not hold {', '.join(missing)}; distil one "
                "with these effects or leave them out of the study"
            )
        return cat

    for text in systems:
        label, spec = parse_system(text)
        name = _ALIASES.get(spec.lower().replace(" ", ""))
        if name == BASE:
            specs.append(SystemSpec(label or BASE, "base", base_steps, base_cfg, teacher=True))
        elif name == BASE_LIGHTNING:
            light = ref("lightning", lightning, f"{label or name} needs a Lightning LoRA", LoraKind.LIGHTNING)
            if light:
                specs.append(
                    SystemSpec(label or name, "base+lightning", fast_steps, teacher=True, loras=(light,))
                )
        elif name == FM_LIGHTNING:
            light = ref("lightning", lightning, f"{label or name} needs a Lightning LoRA", LoraKind.LIGHTNING)
            fm_ref = ref("fm", fm, f"{label or name} needs an FM all-in-1 LoRA", LoraKind.BASELINE)
            if light and fm_ref:
                specs.append(SystemSpec(label or name, "fm+lightning", fast_steps, loras=(fm_ref, light)))
        elif name == OURS:
            r = ref("student", student, f"{label or name} needs a CollectionLoRA student", LoraKind.STUDENT)
            if r is None:
                continue
            cat = catalog_for(r, label or name)
            if cat is None:
                problems.append(f"{label or name}: {r.label} has no effect catalog; is it a CollectionLoRA?")
                continue
            specs.append(SystemSpec(label or name, "ours", cat[1], loras=(r,), prompts=cat[0]))
        else:  # any LoRA file: "lora:ID", an id, or a path
            given = spec[5:] if spec.lower().startswith("lora:") else spec
            if not (given.isdigit() or Path(given).expanduser().exists()):
                problems.append(
                    f"unknown system '{text}': use {', '.join(PAPER_SYSTEMS)}, lora:ID or a .safetensors path"
                )
                continue
            r = ref(f"lora:{given}", given, f"system '{text}'", None)
            if r is None:
                continue
            cat = catalog_for(r, label or r.label)
            if cat is not None:  # a CollectionLoRA: its own prompts and steps
                specs.append(
                    SystemSpec(label or Path(r.label).stem, "lora", cat[1], loras=(r,), prompts=cat[0])
                )
            else:
                specs.append(SystemSpec(label or Path(r.label).stem, "lora", fast_steps, loras=(r,)))
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        problems.append(f"systems named twice: {', '.join(dup)} (name them apart with LABEL=SPEC)")
    return specs, problems


# ------------------------------------------------------------------------------------------------
# creating a study


def _png(array: Any) -> bytes:
    """(H, W, 3) floats in [0, 1] or a PIL image -> PNG bytes with no metadata."""
    import numpy as np

    im = (
        array
        if isinstance(array, Image.Image)
        else Image.fromarray((np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")
    )
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def store_source_images(studio: Studio, paths: Iterable[str | Path]) -> list[str]:
    """Image files -> PNG blobs (RGB); returns their shas, for ``create_study(sources=...)``."""
    shas = []
    for p in paths:
        try:
            with Image.open(p) as im:
                data = _png(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise StudyError(f"Cannot read the source image {p}: {e}") from e
        shas.append(studio.blobs.put_bytes(data, "png").sha256)
    return shas


def bench_sources(studio: Studio, n: int, seed: int = 0) -> list[str]:
    """``n`` EffectBench-mini held-out test scenes (alternating animal / portrait) as PNG blobs."""
    from distill.effectbench.bench import test_sources
    from distill.effectbench.scenes import CATEGORIES

    per = math.ceil(n / len(CATEGORIES))
    by_cat = [test_sources(cat, per, seed) for cat in CATEGORIES]
    scenes = [by_cat[i % len(CATEGORIES)][i // len(CATEGORIES)] for i in range(n)]
    return [studio.blobs.put_bytes(_png(sc.image), "png").sha256 for sc in scenes]


def create_study(
    studio: Studio,
    name: str,
    effects: Sequence[str],
    sources: Sequence[str] | int | None = None,
    systems: Sequence[str] = PAPER_SYSTEMS,
    n_items: int = 20,
    seed: int = 0,
    *,
    student: int | str | Path | None = None,
    lightning: int | str | Path | None = None,
    fm: int | str | Path | None = None,
    base_steps: int = BASE_STEPS,
    base_cfg: float | None = None,
    fast_steps: int = FAST_STEPS,
) -> int:
    """Check everything, pin it in a draft study, and queue the run that generates its images.

    ``sources``: blob shas of PNG source images, a number of EffectBench-mini test sources, or None
    for just enough test sources for ``n_items``. ``systems``: Base, Base+Lightning, FM+Lightning,
    Ours, ``lora:ID`` or a .safetensors path, each optionally ``LABEL=...``. Ours defaults to the newest
    student LoRA, Lightning to the newest Lightning LoRA, FM to the newest baseline LoRA (override with
    ``student`` / ``lightning`` / ``fm``: a LoRA id or a file). Returns the study id.
    """
    from . import library

    name = name.strip()
    effects = list(dict.fromkeys(effects))
    problems: list[str] = []
    if not name:
        problems.append("give the study a name")
    if not effects:
        problems.append("choose at least one effect")
    if not 2 <= len(systems) <= MAX_SYSTEMS:
        problems.append(f"choose 2 to {MAX_SYSTEMS} systems to compare (got {len(systems)})")
    if n_items < 1:
        problems.append("ask for at least one item")
    if base_steps < 1 or fast_steps < 1:
        problems.append("steps must be at least 1")
    instructions: dict[str, str] = {}
    teachers: dict[str, dict[str, Any]] = {}
    effect_ids: dict[str, int] = {}
    specs, sys_problems = resolve_systems(
        studio,
        systems,
        effects,
        student=student,
        lightning=lightning,
        fm=fm,
        base_steps=base_steps,
        base_cfg=base_cfg,
        fast_steps=fast_steps,
    )
    problems += sys_problems
    need_teacher = any(s.teacher for s in specs)
    need_teacher_prompt = any(s.prompts is None for s in specs)
    from . import teachers_service

    for e in effects:
        try:
            info = library.get_effect(studio, e)
        except ValueError as err:
            problems.append(str(err))
            continue
        effect_ids[e] = info.id
        instructions[e] = info.teacher_prompt.strip()
        if not instructions[e]:
            problems.append(
                f"'{e}' needs a teacher prompt: voters read it as the requested edit"
                + (" and the teacher systems use it" if need_teacher_prompt else "")
                + f' (`python -m studio effects prompt {e} "..."`)'
            )
        if need_teacher:
            lora = teachers_service.teacher_for(studio, e)
            if lora is None:
                problems.append(
                    f"'{e}' needs a teacher LoRA for {BASE} / {BASE_LIGHTNING} "
                    f"(`python -m studio teacher train {e}` or `python -m studio teacher import {e} FILE`)"
                )
            else:
                teachers[e] = asdict(_ref_of_row(lora))

    if isinstance(sources, int) or sources is None:
        want = sources if isinstance(sources, int) else math.ceil(n_items / max(1, len(effects)))
        if want < 1:
            problems.append("ask for at least one source image")
            source_shas: list[str] = []
        else:
            source_shas = bench_sources(studio, want, seed)
    else:
        source_shas = list(dict.fromkeys(sources))
        gone = [
            s for s in source_shas if not (re.fullmatch(r"[0-9a-f]{64}", s) and studio.blobs.exists(s, "png"))
        ]
        if gone:
            problems.append(
                f"{len(gone)} source image(s) are not in the studio's file store: {', '.join(g[:12] for g in gone)}"
            )
        if not source_shas:
            problems.append("give at least one source image")
    grid = [(e, s) for e in effects for s in source_shas]
    if effects and source_shas and n_items > len(grid):
        problems.append(
            f"{n_items} items need {n_items} different (effect, source) pairs, but {len(effects)} effect(s) x "
            f"{len(source_shas)} source(s) make {len(grid)}: add sources or effects, or ask for fewer items"
        )
    if problems:
        raise StudyError("Cannot create the study yet:\n- " + "\n- ".join(problems))

    plan = random.Random(seed).sample(grid, n_items)
    config = {
        "effects": effects,
        "sources": source_shas,
        "items": [list(p) for p in plan],
        "systems": [s.to_dict() for s in specs],
        "teachers": teachers,
        "instructions": instructions,
        "effect_ids": effect_ids,
        "backbone": studio.config.backbone,
        "model_path": studio.config.model_path,
        "seed": seed,
    }
    with studio.session() as s:
        study = Study(name=name, status=StudyStatus.DRAFT, config=config)
        s.add(study)
        s.flush()
        study_id = study.id
    run_id = runs.submit(studio, RUN_KIND, {"study_id": study_id}, name=f"study {study_id}: {name}")
    with studio.session() as s:
        study = s.get(Study, study_id)
        study.config = {**study.config, "run_id": run_id}
    return study_id


# ------------------------------------------------------------------------------------------------
# generating the candidates (the study_gen job body)


@dataclass
class GenOutcome:
    items: int
    images: int
    stopped: bool


def _load_adapter(backbone: Backbone, studio: Studio, ref: LoraRef, loaded: list[str]) -> str:
    """Load a pinned LoRA file as an adapter named after its content (so one file loads once)."""
    from distill.backbones import adapters

    name = f"study_{ref.sha256[:16]}"
    if name in adapters.adapter_names(backbone.transformer):
        return name
    path = studio.blobs.root / ref.relpath
    if not path.is_file():
        raise StudyError(f"The LoRA file {ref.label} of this study was deleted from the file store.")
    adapters.load_lora(backbone.transformer, path, name)
    loaded.append(name)
    return name


def _system(spec: SystemSpec, adapter_of: dict[str, str]) -> Any:
    """The ``distill.evaluation.System`` of a spec (prompts through ``EffectEntry``)."""
    from distill.evaluation import System

    extra = [adapter_of[r.sha256] for r in spec.loras]

    def active(e: Any) -> list[str] | None:
        names = ([e.teacher_adapter] if spec.teacher and e.teacher_adapter else []) + extra
        return names or None

    def prompt(e: Any) -> str:
        return spec.prompts[e.name] if spec.prompts is not None else e.teacher_prompt

    return System(spec.label, active, prompt, spec.steps, spec.cfg)


def generate(
    studio: Studio,
    study_id: int,
    reporter: Reporter | None = None,
    *,
    work_dir: Path | None = None,
    backbone: Backbone | None = None,
    device: str | None = None,
) -> GenOutcome:
    """Edit every item's source with every system (same seed per source across systems), store the
    images, write the items and open the study. ``work_dir/generated.json`` records finished
    (system, effect) chunks so a resumed run continues where it stopped."""
    import torch

    from distill.backbones.registry import load_backbone
    from distill.evaluation import EffectEntry, run_system
    from distill.images import to_tensor

    with studio.session() as s:
        study = s.get(Study, study_id)
        if study is None:
            raise StudyError(f"There is no study {study_id}.")
        if study.items:
            raise StudyError(f"Study {study_id} already has its images.")
        cfg = dict(study.config)
    specs = [SystemSpec.from_dict(d) for d in cfg["systems"]]
    plan = [(e, sha) for e, sha in cfg["items"]]
    by_effect: dict[str, list[str]] = {}
    for e, sha in plan:
        by_effect.setdefault(e, []).append(sha)
    seed = int(cfg.get("seed", 0))

    done_path = Path(work_dir) / "generated.json" if work_dir is not None else None
    done: dict[str, dict[str, str]] = {}
    if done_path is not None and done_path.is_file():
        done = json.loads(done_path.read_text())

    total = len(specs) * len(by_effect)
    chunks = [(i, e) for i in range(len(specs)) for e in by_effect]
    todo = [(i, e) for i, e in chunks if f"{i}/{e}" not in done]
    if todo:
        from distill.backbones import adapters

        backbone = backbone or load_backbone(cfg["backbone"], cfg.get("model_path"), device=device)
        loaded: list[str] = []
        try:
            adapter_of = {
                r.sha256: _load_adapter(backbone, studio, r, loaded) for sp in specs for r in sp.loras
            }
            teacher_adapter = {
                e: _load_adapter(backbone, studio, LoraRef.from_dict(cfg["teachers"][e]), loaded)
                for e in by_effect
                if any(sp.teacher for sp in specs)
            }
            sources: dict[str, torch.Tensor] = {}
            for sha in dict.fromkeys(sha for _, sha in plan):
                with Image.open(io.BytesIO(studio.blobs.read_bytes(sha, "png"))) as im:
                    sources[sha] = backbone.prepare_images(to_tensor([im.convert("RGB")]))
            step = total - len(todo)
            for i, e in todo:
                if reporter is not None and reporter.should_stop():
                    return GenOutcome(0, sum(len(v) for v in done.values()), True)
                entry = EffectEntry(e, cfg["instructions"][e], teacher_adapter=teacher_adapter.get(e))
                shas = by_effect[e]
                batch = torch.cat([sources[sha] for sha in shas])
                outs, _ = run_system(backbone, _system(specs[i], adapter_of), entry, batch, seed=seed)
                done[f"{i}/{e}"] = {
                    src: studio.blobs.put_bytes(_png(o), "png").sha256 for src, o in zip(shas, outs)
                }
                if done_path is not None:  # atomically, so a crash never leaves half a record
                    tmp = done_path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(done))
                    tmp.replace(done_path)
                step += 1
                if reporter is not None:
                    reporter.progress(step, total, {"images": float(sum(len(v) for v in done.values()))})
        finally:
            for name in loaded:
                adapters.delete(backbone.transformer, name)

    shuffle = secrets.SystemRandom()  # blinding: not reproducible on purpose
    with studio.session() as s:
        study = s.get(Study, study_id)
        if study.items:
            raise StudyError(f"Study {study_id} already has its images.")
        for pos, (e, src) in enumerate(plan):
            slots = list(range(len(specs)))
            shuffle.shuffle(slots)
            candidates: dict[str, dict[str, Any]] = {}
            for i, spec in enumerate(specs):
                key = secrets.token_hex(8)
                while key in candidates:
                    key = secrets.token_hex(8)
                candidates[key] = {"system": spec.label, "sha": done[f"{i}/{e}"][src], "slot": slots[i]}
            s.add(
                StudyItem(
                    study_id=study_id,
                    source_sha=src,
                    effect_id=cfg.get("effect_ids", {}).get(e),
                    instruction=cfg["instructions"][e],
                    position=pos,
                    candidates=candidates,
                )
            )
        study.status = StudyStatus.OPEN
    if reporter is not None:
        reporter.progress(total, total, {"images": float(len(plan) * len(specs))})
    return GenOutcome(len(plan), len(plan) * len(specs), False)


# ------------------------------------------------------------------------------------------------
# studies and voters (curator side)


@dataclass(frozen=True)
class StudySummary:
    id: int
    name: str
    status: str
    systems: list[str]
    effects: list[str]
    items: int
    planned_items: int
    voters: int
    votes: int
    run_id: int | None
    created_at: datetime


def _summary(s: Any, study: Study) -> StudySummary:
    cfg = study.config or {}
    n_items = s.scalar(select(func.count()).select_from(StudyItem).where(StudyItem.study_id == study.id))
    n_voters = s.scalar(select(func.count()).select_from(Voter).where(Voter.study_id == study.id))
    n_votes = s.scalar(
        select(func.count()).select_from(Vote).join(StudyItem).where(StudyItem.study_id == study.id)
    )
    return StudySummary(
        study.id,
        study.name,
        study.status.value,
        [d["label"] for d in cfg.get("systems", [])],
        list(cfg.get("effects", [])),
        int(n_items or 0),
        len(cfg.get("items", [])),
        int(n_voters or 0),
        int(n_votes or 0),
        cfg.get("run_id"),
        study.created_at,
    )


def list_studies(studio: Studio) -> list[StudySummary]:
    """Every study, newest first."""
    with studio.session() as s:
        return [_summary(s, st) for st in s.scalars(select(Study).order_by(Study.id.desc()))]


def get_study(studio: Studio, study_id: int) -> StudySummary:
    with studio.session() as s:
        study = s.get(Study, study_id)
        if study is None:
            raise StudyError(f"There is no study {study_id}. `python -m studio study list` shows them.")
        return _summary(s, study)


def generation_run(studio: Studio, study_id: int) -> runs.RunView | None:
    """The study's generation run (progress, status, error), if it has one."""
    run_id = get_study(studio, study_id).run_id
    return runs.run_status(studio, run_id) if run_id is not None else None


def set_open(studio: Studio, study_id: int, open_: bool) -> str:
    """Open a generated study for voting, or close it (votes are then refused); returns the status."""
    with studio.session() as s:
        study = s.get(Study, study_id)
        if study is None:
            raise StudyError(f"There is no study {study_id}.")
        if study.status == StudyStatus.DRAFT:
            raise StudyError(
                f"Study {study_id} is still waiting for its images; it opens when they are made."
            )
        study.status = StudyStatus.OPEN if open_ else StudyStatus.CLOSED
        return study.status.value


def _new_token(s: Any) -> tuple[str, str]:
    while True:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        h = hash_token(token)
        if s.scalar(select(Voter.id).where(Voter.token_hash == h)) is None:
            return token, h


def add_voters(studio: Studio, study_id: int, names: Sequence[str]) -> list[tuple[str, str]]:
    """New voter links: (name, token) per name. The token is shown only now; the studio keeps its hash."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise StudyError("Give at least one voter name.")
    long = [n for n in names if len(n) > MAX_VOTER_NAME]
    if long:
        raise StudyError(f"Voter names are at most {MAX_VOTER_NAME} characters.")
    out = []
    with studio.session() as s:
        if s.get(Study, study_id) is None:
            raise StudyError(f"There is no study {study_id}.")
        for n in names:
            token, h = _new_token(s)
            s.add(Voter(study_id=study_id, token_hash=h, name=n))
            s.flush()
            out.append((n, token))
    return out


def reissue_link(studio: Studio, voter_id: int) -> str:
    """A new token for a voter who lost the link (the old link stops working; votes are kept)."""
    with studio.session() as s:
        voter = s.get(Voter, voter_id)
        if voter is None:
            raise StudyError(f"There is no voter {voter_id}.")
        token, voter.token_hash = _new_token(s)
        return token


def voter_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/vote/{token}"


@dataclass(frozen=True)
class VoterProgress:
    voter_id: int
    name: str
    answered: int  # items with all three questions answered
    items: int
    votes: int
    last_vote_at: datetime | None


def voter_progress(studio: Studio, study_id: int) -> list[VoterProgress]:
    """Each voter of the study: items answered, votes cast, when they last voted."""
    with studio.session() as s:
        n_items = (
            s.scalar(select(func.count()).select_from(StudyItem).where(StudyItem.study_id == study_id)) or 0
        )
        voters = s.scalars(select(Voter).where(Voter.study_id == study_id).order_by(Voter.id)).all()
        rows = s.execute(
            select(Vote.voter_id, Vote.item_id, func.count(), func.max(Vote.created_at))
            .join(Voter)
            .where(Voter.study_id == study_id)
            .group_by(Vote.voter_id, Vote.item_id)
        ).all()
    per: dict[int, list[tuple[int, datetime]]] = {}
    for voter_id, _item, n, last in rows:
        per.setdefault(voter_id, []).append((n, last))
    out = []
    for v in voters:
        mine = per.get(v.id, [])
        lasts = [t for _, t in mine if t is not None]
        out.append(
            VoterProgress(
                v.id,
                v.name,
                sum(1 for n, _ in mine if n >= len(QUESTIONS)),
                int(n_items),
                sum(n for n, _ in mine),
                max(lasts) if lasts else None,
            )
        )
    return out


# ------------------------------------------------------------------------------------------------
# voting (voter side: everything starts from the voter's token)


@dataclass(frozen=True)
class CandidateView:
    letter: str  # A, B, C, ... in the item's shuffled order
    key: str  # the opaque key the vote stores
    image: str  # the per-voter opaque image name


@dataclass(frozen=True)
class VoterPage:
    """What one voter's page shows now."""

    voter_name: str
    status: str  # draft | open | closed
    total: int
    answered: int
    item_id: int | None = None
    instruction: str = ""
    source_image: str = ""
    candidates: tuple[CandidateView, ...] = ()
    questions: tuple[VoteQuestion, ...] = ()  # the item's unanswered questions

    @property
    def done(self) -> bool:
        return self.status == StudyStatus.OPEN and self.item_id is None

    @property
    def position(self) -> int:
        return min(self.answered + 1, self.total)


def _voter(s: Any, token: str) -> Voter:
    if not isinstance(token, str) or not _TOKEN_RE.fullmatch(token):
        raise UnknownVoter("This voting link is not valid.")
    voter = s.scalar(select(Voter).where(Voter.token_hash == hash_token(token)))
    if voter is None:
        raise UnknownVoter("This voting link is not valid.")
    return voter


def _opaque(token: str, item_id: int, what: str) -> str:
    """A per-voter image name: knowing it tells nothing, and another voter's token gives another."""
    return hmac.new(token.encode(), f"{item_id}:{what}".encode(), hashlib.sha256).hexdigest()[:32]


def ordered_candidates(item: StudyItem) -> list[tuple[str, str]]:
    """(letter, key) in the item's shuffled slot order."""
    keys = sorted(item.candidates, key=lambda k: (item.candidates[k].get("slot", 0), k))
    return [(chr(ord("A") + i), k) for i, k in enumerate(keys)]


def voter_page(studio: Studio, token: str) -> VoterPage:
    """The voter's next item with an unanswered question (items in study order), or where they stand."""
    with studio.session() as s:
        voter = _voter(s, token)
        study = voter.study
        items = s.scalars(
            select(StudyItem).where(StudyItem.study_id == study.id).order_by(StudyItem.position, StudyItem.id)
        ).all()
        answered_q: dict[int, set[VoteQuestion]] = {}
        for item_id, q in s.execute(select(Vote.item_id, Vote.question).where(Vote.voter_id == voter.id)):
            answered_q.setdefault(item_id, set()).add(q)
    full = sum(1 for it in items if len(answered_q.get(it.id, ())) >= len(QUESTIONS))
    base = VoterPage(voter.name, study.status.value, len(items), full)
    if study.status != StudyStatus.OPEN:
        return base
    for it in items:
        missing = tuple(q for q in QUESTIONS if q not in answered_q.get(it.id, set()))
        if missing:
            cands = tuple(
                CandidateView(letter, key, _opaque(token, it.id, key))
                for letter, key in ordered_candidates(it)
            )
            return VoterPage(
                voter.name,
                study.status.value,
                len(items),
                full,
                it.id,
                it.instruction,
                _opaque(token, it.id, "source"),
                cands,
                missing,
            )
    return base


def voter_image(studio: Studio, token: str, name: str) -> bytes:
    """The PNG behind one of the voter's opaque image names (only images of the voter's own study)."""
    if not re.fullmatch(r"[0-9a-f]{32}", name or ""):
        raise UnknownItem("No such image.")
    with studio.session() as s:
        voter = _voter(s, token)
        items = s.scalars(select(StudyItem).where(StudyItem.study_id == voter.study_id)).all()
    for it in items:
        for what, sha in [("source", it.source_sha), *((k, c["sha"]) for k, c in it.candidates.items())]:
            if hmac.compare_digest(_opaque(token, it.id, what), name):
                return studio.blobs.read_bytes(sha, "png")
    raise UnknownItem("No such image.")


def record_votes(studio: Studio, token: str, item_id: int, choices: dict[str, str]) -> None:
    """Record the voter's choice for each question of ``choices`` (question -> candidate key), all or
    none. Refuses an unknown link or item (404), a study not open (403), an unknown question or a
    choice that is not one of the item's candidates (422), and an answered question (409)."""
    try:
        with studio.session() as s:
            voter = _voter(s, token)
            item = s.get(StudyItem, item_id) if isinstance(item_id, int) else None
            if item is None or item.study_id != voter.study_id:
                raise UnknownItem("This item is not part of your study.")
            if voter.study.status != StudyStatus.OPEN:
                raise StudyNotOpen("This study is not open for voting.")
            if not choices:
                raise BadChoice("Choose one result for each question.")
            try:
                questions = {VoteQuestion(q): c for q, c in choices.items()}
            except ValueError:
                known = ", ".join(q.value for q in QUESTIONS)
                raise BadChoice(f"Unknown question; the questions are {known}.") from None
            bad = [q for q, c in questions.items() if not isinstance(c, str) or c not in item.candidates]
            if bad:
                names = ", ".join(QUESTION_TEXT[q][0] for q in bad)
                raise BadChoice(f"Choose one of the shown results for: {names}.")
            taken = s.scalars(
                select(Vote.question).where(
                    Vote.voter_id == voter.id, Vote.item_id == item.id, Vote.question.in_(list(questions))
                )
            ).all()
            if taken:
                raise AlreadyVoted(
                    "You already answered this question for this item; votes cannot be changed."
                )
            for q, c in questions.items():
                s.add(Vote(voter_id=voter.id, item_id=item.id, question=q, choice=c))
            s.flush()
    except IntegrityError:  # a concurrent request for the same question won the race
        raise AlreadyVoted(
            "You already answered this question for this item; votes cannot be changed."
        ) from None


def record_vote(studio: Studio, token: str, item_id: int, question: str, choice: str) -> None:
    """One vote (see ``record_votes``)."""
    record_votes(studio, token, item_id, {question: choice})


# ------------------------------------------------------------------------------------------------
# results


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (95 % by default); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # exactly 0 / 1 at the ends (the formula reaches them only up to rounding)
    return (0.0 if k == 0 else max(0.0, center - half)), (1.0 if k == n else min(1.0, center + half))


@dataclass(frozen=True)
class ResultRow:
    criterion: str  # quality | consistency | style
    system: str
    votes: int
    total: int  # votes cast on this criterion
    share: float
    ci_low: float
    ci_high: float


@dataclass
class StudyResults:
    study_id: int
    name: str
    systems: list[str]
    rows: list[ResultRow] = field(default_factory=list)
    voters: int = 0
    items: int = 0

    def row(self, criterion: str, system: str) -> ResultRow:
        return next(r for r in self.rows if r.criterion == criterion and r.system == system)


def results(studio: Studio, study_id: int) -> StudyResults:
    """Unblinded preference shares: per criterion and system, votes, share and Wilson 95 % CI."""
    with studio.session() as s:
        study = s.get(Study, study_id)
        if study is None:
            raise StudyError(f"There is no study {study_id}.")
        systems = [d["label"] for d in (study.config or {}).get("systems", [])]
        items = {it.id: it.candidates for it in study.items}
        votes = s.execute(
            select(Vote.item_id, Vote.question, Vote.choice, Vote.voter_id)
            .join(StudyItem)
            .where(StudyItem.study_id == study_id)
        ).all()
        name = study.name
    counts: dict[tuple[str, str], int] = {}
    totals: dict[str, int] = {}
    voters = set()
    for item_id, q, choice, voter_id in votes:
        system = items[item_id][choice]["system"]
        if system not in systems:
            systems.append(system)
        counts[(q.value, system)] = counts.get((q.value, system), 0) + 1
        totals[q.value] = totals.get(q.value, 0) + 1
        voters.add(voter_id)
    out = StudyResults(study_id, name, systems, voters=len(voters), items=len(items))
    for q in QUESTIONS:
        n = totals.get(q.value, 0)
        for system in systems:
            k = counts.get((q.value, system), 0)
            lo, hi = wilson_interval(k, n)
            out.rows.append(ResultRow(q.value, system, k, n, k / n if n else 0.0, lo, hi))
    return out


CSV_HEADER = ["study_id", "study", "criterion", "system", "votes", "total", "share", "ci95_low", "ci95_high"]


def results_csv(studio: Studio, study_id: int, res: StudyResults | None = None) -> str:
    """The results as CSV, one row per criterion and system."""
    res = res or results(studio, study_id)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for r in res.rows:
        w.writerow(
            [
                res.study_id,
                res.name,
                r.criterion,
                r.system,
                r.votes,
                r.total,
                f"{r.share:.4f}",
                f"{r.ci_low:.4f}",
                f"{r.ci_high:.4f}",
            ]
        )
    return buf.getvalue()


# A colour per system (Fig. 16 uses one colour per method across the three criteria).
PALETTE = [
    (86, 120, 196),
    (232, 150, 62),
    (112, 173, 71),
    (200, 62, 77),
    (140, 100, 180),
    (70, 170, 170),
    (160, 120, 90),
    (120, 120, 120),
]


def results_chart(res: StudyResults, width: int = 960, height: int = 520) -> Image.Image:
    """Fig. 16-style grouped bars: per criterion, each system's preference share with its 95 % CI."""
    im = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(im)
    font, small, big = (ImageFont.load_default(size=n) for n in (14, 12, 18))
    d.text(
        (20, 12),
        f"{res.name}: preference share ({res.voters} voters, {res.items} items)",
        fill="black",
        font=big,
    )
    # legend
    x = 20
    for i, system in enumerate(res.systems):
        c = PALETTE[i % len(PALETTE)]
        d.rectangle((x, 44, x + 14, 58), fill=c)
        d.text((x + 20, 43), system, fill="black", font=font)
        x += 40 + int(d.textlength(system, font=font))
    left, right, top, bottom = 60, width - 20, 80, height - 62
    # axis and grid
    for pct in range(0, 101, 20):
        y = bottom - (bottom - top) * pct / 100
        d.line((left, y, right, y), fill=(225, 225, 225))
        d.text((left - 8, y), f"{pct}%", fill=(90, 90, 90), font=small, anchor="rm")
    d.line((left, top, left, bottom), fill="black")
    d.line((left, bottom, right, bottom), fill="black")
    n_sys = max(1, len(res.systems))
    group_w = (right - left) / len(QUESTIONS)
    bar_w = min(60.0, group_w * 0.8 / n_sys)
    for g, q in enumerate(QUESTIONS):
        gx = left + g * group_w + (group_w - bar_w * n_sys) / 2
        total = 0
        for i, system in enumerate(res.systems):
            r = res.row(q.value, system)
            total = r.total
            x0, x1 = gx + i * bar_w + 2, gx + (i + 1) * bar_w - 2
            y = bottom - (bottom - top) * r.share
            d.rectangle((x0, y, x1, bottom), fill=PALETTE[i % len(PALETTE)])
            if r.total:
                ylo, yhi = (bottom - (bottom - top) * v for v in (r.ci_low, r.ci_high))
                cx = (x0 + x1) / 2
                d.line((cx, yhi, cx, ylo), fill="black", width=1)
                d.line((cx - 4, yhi, cx + 4, yhi), fill="black")
                d.line((cx - 4, ylo, cx + 4, ylo), fill="black")
                d.text((cx, min(y, yhi) - 3), f"{100 * r.share:.1f}%", fill="black", font=small, anchor="md")
        label = f"{QUESTION_TEXT[q][0]} (n={total})"
        d.text((left + (g + 0.5) * group_w, bottom + 12), label, fill="black", font=font, anchor="ma")
    d.text(
        (width - 20, height - 6),
        "bars: share of votes; whiskers: Wilson 95% CI",
        fill=(90, 90, 90),
        font=small,
        anchor="rs",
    )
    return im


def results_chart_png(studio: Studio, study_id: int, res: StudyResults | None = None) -> bytes:
    return _png(results_chart(res or results(studio, study_id)))
