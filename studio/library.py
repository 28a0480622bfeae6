"""The effect library: import pair sets, list, rename, prompt, drop pairs, delete.

The functions the UI and the CLI both call. Pair sets are fully validated (``pairsets.read_pairset``)
before anything is written; images go to the content-addressed blob store and the rows go in in one
transaction, so an import either lands whole or not at all (a failed one, e.g. on a full disk, also
removes the images it had stored).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage import Effect, Pair, Prompt

from .context import Studio
from .pairsets import PairSet, PairSetLimits, read_pairset
from .thumbnails import make_thumbnail

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class LibraryError(ValueError):
    """A curator-facing problem with an effect operation."""


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.strip().lower()).strip("-_")
    return slug[:64]


def check_name(name: str) -> str:
    if not _SLUG.match(name or ""):
        raise LibraryError(
            f"'{name}' is not a usable effect name: use 1-64 lowercase letters, digits, '-' or '_' "
            f"(for example '{slugify(name) or 'warm-film'}')."
        )
    return name


@dataclass
class ImportResult:
    effect_id: int
    name: str
    pairs: int
    warnings: list[str]


def _effect(session: Session, name: str) -> Effect:
    effect = session.scalar(select(Effect).where(Effect.name == name))
    if effect is None:
        raise LibraryError(f"There is no effect called '{name}'. `python -m studio effects list` shows them.")
    return effect


def store_pairset(
    studio: Studio,
    name: str,
    pairset: PairSet,
    *,
    teacher_prompt: str = "",
    display_name: str | None = None,
    category: str | None = None,
    teacher_source: str = "curator",
    description: str = "",
) -> ImportResult:
    """Write a validated pair set as a new effect (or add its pairs to an existing one)."""
    check_name(name)
    new_blobs: list[str] = []  # blobs this import created, removed again if it fails

    def put(data: bytes) -> str:
        existed = studio.blobs.exists(hashlib.sha256(data).hexdigest(), "png")
        ref = studio.blobs.put_bytes(data, "png")
        if not existed:
            new_blobs.append(ref.sha256)
        return ref.sha256

    try:
        return _store_pairset(
            studio, name, pairset, put, teacher_prompt, display_name, category, teacher_source, description
        )
    except BaseException:
        _drop_unreferenced(studio, new_blobs)  # e.g. the disk filled up half-way: leave nothing behind
        raise


def _drop_unreferenced(studio: Studio, shas: list[str]) -> None:
    """Delete these png blobs unless a pair references them (best effort: the import already failed)."""
    if not shas:
        return
    try:
        with studio.session() as s:
            used = set()
            for col in (Pair.source_sha, Pair.target_sha, Pair.thumb_source_sha, Pair.thumb_target_sha):
                used |= set(s.scalars(select(col).where(col.in_(shas))))
        for sha in set(shas) - used:
            studio.blobs.delete(sha, "png")
    except Exception:  # the original error is the one the curator needs to see
        pass


def _store_pairset(
    studio: Studio,
    name: str,
    pairset: PairSet,
    put: Callable[[bytes], str],
    teacher_prompt: str,
    display_name: str | None,
    category: str | None,
    teacher_source: str,
    description: str,
) -> ImportResult:
    rows = []
    for p in pairset.pairs:
        shas = [
            put(b)
            for b in (p.source_bytes, p.target_bytes, make_thumbnail(p.source), make_thumbnail(p.target))
        ]
        rows.append((p, *shas))
    with studio.session() as s:
        effect = s.scalar(select(Effect).where(Effect.name == name))
        if effect is None:
            effect = Effect(
                name=name, display_name=display_name or name, category=category, description=description
            )
            effect.prompt = Prompt(teacher_prompt=teacher_prompt, teacher_source=teacher_source)
            s.add(effect)
            s.flush()
        elif teacher_prompt and effect.prompt is not None and not effect.prompt.teacher_prompt:
            effect.prompt.teacher_prompt = teacher_prompt
        have = {(pr.source_sha, pr.target_sha) for pr in effect.pairs}
        added = 0
        for p, s_sha, t_sha, th_s, th_t in rows:
            if (s_sha, t_sha) in have:
                continue
            have.add((s_sha, t_sha))
            s.add(
                Pair(
                    effect_id=effect.id,
                    source_sha=s_sha,
                    target_sha=t_sha,
                    thumb_source_sha=th_s,
                    thumb_target_sha=th_t,
                    caption=p.caption,
                    width=p.target.width,
                    height=p.target.height,
                    original_name=p.original_source_name,
                )
            )
            added += 1
        return ImportResult(effect.id, name, added, list(pairset.warnings))


def import_pairset(
    studio: Studio,
    name: str,
    path: Path,
    *,
    teacher_prompt: str = "",
    display_name: str | None = None,
    category: str | None = None,
    limits: PairSetLimits = PairSetLimits(),
) -> ImportResult:
    """Read, validate and store a pair set from a folder or zip (raises PairSetError, LibraryError)."""
    check_name(name)
    path = Path(path)
    if not path.exists():
        raise LibraryError(f"Nothing found at {path}: give a folder or a .zip of image pairs.")
    return store_pairset(
        studio,
        name,
        read_pairset(path, limits),
        teacher_prompt=teacher_prompt,
        display_name=display_name,
        category=category,
    )


@dataclass
class EffectSummary:
    id: int
    name: str
    display_name: str
    category: str | None
    pairs: int
    excluded: int
    teacher_prompt: str
    trigger: str | None
    student_prompt: str | None


def _summary(effect: Effect, n: int, excluded: int) -> EffectSummary:
    pr = effect.prompt
    return EffectSummary(
        effect.id,
        effect.name,
        effect.display_name,
        str(effect.category) if effect.category else None,
        n,
        excluded,
        pr.teacher_prompt if pr else "",
        pr.trigger if pr else None,
        pr.student_prompt if pr else None,
    )


def list_effects(studio: Studio) -> list[EffectSummary]:
    with studio.session() as s:
        counts = dict(
            s.execute(
                select(Pair.effect_id, func.count()).where(Pair.excluded.is_(False)).group_by(Pair.effect_id)
            ).all()
        )
        dropped = dict(
            s.execute(
                select(Pair.effect_id, func.count()).where(Pair.excluded.is_(True)).group_by(Pair.effect_id)
            ).all()
        )
        effects = s.scalars(select(Effect).order_by(Effect.id)).all()
        return [_summary(e, counts.get(e.id, 0), dropped.get(e.id, 0)) for e in effects]


def get_effect(studio: Studio, name: str) -> EffectSummary:
    with studio.session() as s:
        e = _effect(s, name)
        kept = sum(not p.excluded for p in e.pairs)
        return _summary(e, kept, len(e.pairs) - kept)


def effect_pairs(studio: Studio, name: str, include_excluded: bool = False) -> list[Pair]:
    with studio.session() as s:
        e = _effect(s, name)
        return [p for p in e.pairs if include_excluded or not p.excluded]


def delete_effect(studio: Studio, name: str) -> None:
    with studio.session() as s:
        s.delete(_effect(s, name))


def rename_effect(studio: Studio, name: str, new_name: str, display_name: str | None = None) -> None:
    check_name(new_name)
    with studio.session() as s:
        e = _effect(s, name)
        if new_name != name and s.scalar(select(Effect).where(Effect.name == new_name)) is not None:
            raise LibraryError(f"An effect called '{new_name}' already exists.")
        e.name = new_name
        if display_name:
            e.display_name = display_name


def set_teacher_prompt(studio: Studio, name: str, prompt: str) -> None:
    prompt = prompt.strip()
    if not prompt:
        raise LibraryError(
            "The teacher prompt is empty: write the instruction the effect's LoRA was trained with."
        )
    with studio.session() as s:
        e = _effect(s, name)
        if e.prompt is None:
            e.prompt = Prompt(teacher_prompt=prompt, teacher_source="curator")
        else:
            e.prompt.teacher_prompt = prompt
            e.prompt.teacher_source = "curator"


def set_pair_excluded(studio: Studio, name: str, pair_id: int, excluded: bool = True) -> None:
    with studio.session() as s:
        e = _effect(s, name)
        pair = s.get(Pair, pair_id)
        if pair is None or pair.effect_id != e.id:
            raise LibraryError(f"Effect '{name}' has no pair #{pair_id}.")
        pair.excluded = excluded
