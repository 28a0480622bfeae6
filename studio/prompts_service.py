"""Asymmetric Orthogonal Prompting in the studio: trigger words and student prompts per effect.

The method lives in ``distill.prompts`` (trigger drawing and checking, the VLM / offline writers);
this module wires it to the database: every effect gets a unique trigger (``trigger_source`` "auto"
when drawn, "curator" when typed), a student prompt with its provenance (``student_source``,
``student_updated_at``), and the trigger cosine matrix is kept as JSON under the data dir so the UI
can show it without loading a text encoder. A prompt a curator edited by hand is never overwritten
unless the caller says so. The UI and the CLI both call these functions.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from distill.prompts import (
    DEFAULT_THRESHOLD,
    ImagePair,
    OfflineDescriber,
    PromptWriter,
    PromptWriterConfig,
    TriggerAssignment,
    TriggerCheck,
    VLMConfig,
    VLMError,
    check_triggers,
    make_writer,
)
from distill.prompts import assign_triggers as draw_triggers
from distill.prompts import student_condition as join_condition
from distill.prompts.embedding import embedder_for
from distill.prompts.triggers import EmbedFn
from storage import Effect, Prompt, utcnow

from .context import Studio

log = logging.getLogger(__name__)

# Environment: which writer writes student prompts (see ``writer_config_from_env``).
ENV_BASE_URL = "STUDIO_VLM_BASE_URL"
ENV_MODEL = "STUDIO_VLM_MODEL"
ENV_API_KEY = "STUDIO_VLM_API_KEY"  # read by the VLM client itself, never stored
ENV_LOCAL_DIR = "STUDIO_VLM_LOCAL_DIR"
# "1": measure triggers with a randomly initialised tiny backbone even if weights exist (tests, demos).
ENV_RANDOM_BACKBONE = "STUDIO_PROMPTS_RANDOM_BACKBONE"

MATRIX_FILE = Path("prompts") / "trigger_matrix.json"  # under the data dir
TRIGGER_MAX_LENGTH = 64  # the column width of Prompt.trigger
_TRIGGER = re.compile(r"^<[A-Za-z0-9][A-Za-z0-9_-]*>$")
VLM_PAIRS = 2  # appendix 9: two random training pairs go to the VLM
OFFLINE_PAIRS = 6  # the describer votes over pairs: more is steadier, and it costs nothing

Progress = Callable[[int, int, str], None]  # (done, total, what)

__all__ = [
    "PromptsError",
    "PromptRow",
    "StoredMatrix",
    "StudentPromptResult",
    "TriggerAssignment",
    "TriggerCheck",
    "assign_triggers",
    "check_trigger_format",
    "describe_writer",
    "embedder_for",
    "general_instructions",
    "generate_student_prompts",
    "open_embedder",
    "prompt_rows",
    "set_student_prompt",
    "set_trigger",
    "stored_matrix",
    "student_condition",
    "trigger_matrix",
    "writer_config_from_env",
]


class PromptsError(ValueError):
    """A curator-facing problem with triggers or student prompts; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# The text encoder the triggers are measured in.

_EMBEDDERS: dict[tuple, tuple[EmbedFn, str]] = {}
_EMBEDDERS_LOCK = threading.Lock()


def open_embedder(studio: Studio, force_random: bool | None = None) -> tuple[EmbedFn, str]:
    """The studio backbone's trigger embedder and a line saying which encoder it is (cached).

    The tiny backbone loads its pretrained weights when they exist; otherwise (or with
    ``STUDIO_PROMPTS_RANDOM_BACKBONE=1``) a randomly initialised one, and the line says so.
    """
    if force_random is None:
        force_random = os.environ.get(ENV_RANDOM_BACKBONE, "").strip() in ("1", "true", "yes")
    cfg = studio.config
    key = (cfg.backbone, cfg.model_path, force_random)
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = _load_embedder(cfg.backbone, cfg.model_path, force_random)
        return _EMBEDDERS[key]


def _load_embedder(backbone: str, model_path: str | None, force_random: bool) -> tuple[EmbedFn, str]:
    if backbone == "tiny":
        from distill.backbones.tiny import WEIGHTS_DIR, TinyConfig, TinyEditor

        path = Path(model_path).expanduser() if model_path else WEIGHTS_DIR
        if not force_random and (path / "tiny_config.json").is_file():
            return embedder_for(TinyEditor.from_pretrained(path)), f"tiny backbone text encoder ({path})"
        why = "as asked" if force_random else f"no pretrained weights at {path}"
        # The text encoder does not depend on the transformer depth; 2 layers build faster.
        editor = TinyEditor.random(TinyConfig(num_layers=2), seed=0)
        return embedder_for(editor), f"tiny backbone text encoder, randomly initialised ({why})"
    from distill.backbones.registry import load_backbone

    try:
        return embedder_for(load_backbone(backbone, model_path)), f"{backbone} text encoder"
    except TypeError as e:
        raise PromptsError(str(e)) from e


# ---------------------------------------------------------------------------------------------
# Reading prompt rows.


@dataclass
class PromptRow:
    """One effect's prompts as stored (what ``prompts show`` and the Prompts tab list)."""

    effect: str
    display_name: str
    pairs: int
    teacher_prompt: str
    teacher_source: str
    trigger: str | None
    trigger_source: str | None
    student_prompt: str | None
    student_source: str | None
    student_edited_by_curator: bool
    student_updated_at: datetime | None

    @property
    def condition(self) -> str | None:
        """The student condition (eq. 5) once both parts exist."""
        if self.trigger and self.student_prompt:
            return join_condition(self.trigger, self.student_prompt)
        return None


def _effect(s: Session, name: str) -> Effect:
    effect = s.scalar(select(Effect).where(Effect.name == name))
    if effect is None:
        raise PromptsError(f"There is no effect called '{name}'. `python -m studio effects list` shows them.")
    return effect


def _prompt(effect: Effect) -> Prompt:
    if effect.prompt is None:  # every import creates one; older or hand-made rows may lack it
        effect.prompt = Prompt(teacher_prompt="")
    return effect.prompt


def _row(e: Effect) -> PromptRow:
    p = e.prompt
    return PromptRow(
        effect=e.name,
        display_name=e.display_name,
        pairs=sum(not pr.excluded for pr in e.pairs),
        teacher_prompt=p.teacher_prompt if p else "",
        teacher_source=str(p.teacher_source) if p else "",
        trigger=p.trigger if p else None,
        trigger_source=p.trigger_source if p else None,
        student_prompt=p.student_prompt if p else None,
        student_source=p.student_source if p else None,
        student_edited_by_curator=bool(p and p.student_edited_by_curator),
        student_updated_at=p.student_updated_at if p else None,
    )


def prompt_rows(studio: Studio, effects: Sequence[str] | None = None) -> list[PromptRow]:
    """Every effect's prompts in library order, or those of ``effects`` in the order given."""
    with studio.session() as s:
        if effects:
            return [_row(_effect(s, n)) for n in effects]
        return [_row(e) for e in s.scalars(select(Effect).order_by(Effect.id)).all()]


def student_condition(studio: Studio, effect: str) -> str:
    """c_student = trigger + " " + student prompt (eq. 5) of one effect."""
    [row] = prompt_rows(studio, [effect])
    if not row.trigger:
        raise PromptsError(
            f"Effect '{effect}' has no trigger word yet. Run `python -m studio prompts generate {effect}` "
            f"or press 'Generate missing prompts' in the Prompts tab."
        )
    if not row.student_prompt:
        raise PromptsError(
            f"Effect '{effect}' has no student prompt yet. Run `python -m studio prompts generate {effect}`, "
            f'or write one with `python -m studio prompts set {effect} --student "..."`.'
        )
    return join_condition(row.trigger, row.student_prompt)


# ---------------------------------------------------------------------------------------------
# Triggers.


@dataclass
class StoredMatrix:
    """The last trigger check, as saved under the data dir."""

    names: list[str]
    triggers: dict[str, str]
    matrix: np.ndarray  # (N, N) centred cosines, rows/cols in ``names`` order
    threshold: float
    encoder: str
    checked_at: str  # ISO time

    @property
    def max_offdiag(self) -> float | None:
        n = len(self.names)
        if n < 2:
            return None
        return float(self.matrix[~np.eye(n, dtype=bool)].max())

    @property
    def ok(self) -> bool:
        worst = self.max_offdiag
        return worst is None or worst <= self.threshold

    def failing_pairs(self) -> list[tuple[str, str, float]]:
        n = len(self.names)
        pairs = [
            (self.names[i], self.names[j], float(self.matrix[i, j]))
            for i in range(n)
            for j in range(i + 1, n)
            if self.matrix[i, j] > self.threshold
        ]
        return sorted(pairs, key=lambda p: -p[2])

    def is_current(self, rows: Sequence[PromptRow]) -> bool:
        """Whether it still describes exactly the effects' current triggers."""
        now = {r.effect: r.trigger for r in rows if r.trigger}
        return now == self.triggers


def _matrix_path(studio: Studio) -> Path:
    return studio.config.data_dir / MATRIX_FILE


def _save_matrix(studio: Studio, check: TriggerCheck, order: Sequence[str], encoder: str) -> None:
    """Save ``check`` with rows in ``order`` (library order), atomically."""
    index = {n: i for i, n in enumerate(check.names)}
    names = [n for n in order if n in index]
    perm = torch.tensor([index[n] for n in names], dtype=torch.long)
    cos = check.cosine[perm][:, perm] if names else torch.zeros(0, 0)
    data = {
        "names": names,
        "triggers": {n: check.triggers[n] for n in names},
        "matrix": [[round(float(v), 4) for v in row] for row in cos.tolist()],
        "threshold": check.threshold,
        "encoder": encoder,
        "checked_at": utcnow().isoformat(timespec="seconds"),
    }
    path = _matrix_path(studio)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def stored_matrix(studio: Studio) -> StoredMatrix | None:
    """The last saved trigger check, or None when triggers were never checked."""
    path = _matrix_path(studio)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        names = list(data["names"])
        matrix = np.asarray(data["matrix"], dtype=np.float32).reshape(len(names), len(names))
        return StoredMatrix(
            names,
            dict(data["triggers"]),
            matrix,
            float(data["threshold"]),
            str(data.get("encoder", "")),
            str(data.get("checked_at", "")),
        )
    except (ValueError, KeyError, TypeError) as e:
        log.warning("unreadable trigger matrix %s (%s); treating triggers as unchecked", path, e)
        return None


def trigger_matrix(studio: Studio) -> tuple[list[str], np.ndarray]:
    """Effect names and their (N, N) centred trigger cosines from the last check (empty if none)."""
    stored = stored_matrix(studio)
    if stored is None:
        return [], np.zeros((0, 0), dtype=np.float32)
    return stored.names, stored.matrix


def check_trigger_format(trigger: str) -> str:
    """The trigger, stripped, if it is usable; else a PromptsError that says what a trigger looks like."""
    trigger = (trigger or "").strip()
    if not _TRIGGER.match(trigger) or len(trigger) > TRIGGER_MAX_LENGTH:
        raise PromptsError(
            f"'{trigger}' is not a usable trigger word: write one word in angle brackets, made of letters, "
            f"digits, '_' or '-', at most {TRIGGER_MAX_LENGTH} characters, e.g. <warm_film_Xy59Q9a>. "
            f"A mix of letters and digits that never occurs in normal text works best."
        )
    return trigger


def assign_triggers(
    studio: Studio,
    embed: EmbedFn | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    seed: int = 0,
) -> TriggerAssignment:
    """Give every effect without a trigger a new one (existing triggers are kept), redraw new ones
    until all pairs are at most ``threshold`` apart in the text encoder, store them
    (``trigger_source`` "auto") and save the cosine matrix of all triggers. ``report()`` on the
    result says whether the check passed. ``embed`` defaults to the studio backbone's encoder."""
    rows = prompt_rows(studio)
    order = [r.effect for r in rows]
    if not rows:
        return TriggerAssignment([], {}, torch.zeros(0, 0), threshold)
    encoder = "given embedder"
    if embed is None:
        embed, encoder = open_embedder(studio)
    existing = {r.effect: r.trigger for r in rows if r.trigger}
    new = [r.effect for r in rows if not r.trigger]
    result = draw_triggers(new, embed, threshold=threshold, existing=existing, seed=seed)
    try:
        with studio.session() as s:
            for name in new:
                effect = _effect(s, name)
                prompt = _prompt(effect)
                if prompt.trigger:  # set meanwhile (another window): keep theirs
                    continue
                prompt.trigger = result.triggers[name]
                prompt.trigger_source = "auto"
    except IntegrityError as e:
        raise PromptsError(
            "Another window or command changed trigger words at the same time; run it again."
        ) from e
    _save_matrix(studio, result, order, encoder)
    return result


def set_trigger(
    studio: Studio,
    effect: str,
    trigger: str,
    embed: EmbedFn | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> TriggerCheck:
    """A curator's trigger for ``effect``: format and uniqueness are enforced; then all triggers are
    re-checked in the text encoder and the check is returned (and saved). A too-similar trigger is
    stored anyway, and ``check.report()`` names the pairs that are too close."""
    trigger = check_trigger_format(trigger)
    rows = prompt_rows(studio)
    if effect not in {r.effect for r in rows}:
        raise PromptsError(
            f"There is no effect called '{effect}'. `python -m studio effects list` shows them."
        )
    for r in rows:
        if r.trigger == trigger and r.effect != effect:
            raise PromptsError(f"The trigger word {trigger} already belongs to effect '{r.effect}'.")
    triggers = {r.effect: r.trigger for r in rows if r.trigger and r.effect != effect}
    triggers[effect] = trigger
    encoder = "given embedder"
    if embed is None:
        embed, encoder = open_embedder(studio)
    check = check_triggers(triggers, embed, threshold=threshold, fixed=set(triggers))
    try:
        with studio.session() as s:
            prompt = _prompt(_effect(s, effect))
            prompt.trigger = trigger
            prompt.trigger_source = "curator"
    except IntegrityError as e:
        raise PromptsError(f"The trigger word {trigger} was just given to another effect.") from e
    _save_matrix(studio, check, [r.effect for r in rows], encoder)
    return check


# ---------------------------------------------------------------------------------------------
# Student prompts.


def writer_config_from_env(env: Mapping[str, str] | None = None) -> PromptWriterConfig:
    """The writer the environment asks for: an OpenAI-compatible endpoint (``STUDIO_VLM_BASE_URL`` +
    ``STUDIO_VLM_MODEL``, key in ``STUDIO_VLM_API_KEY``), else a local VLM folder
    (``STUDIO_VLM_LOCAL_DIR``), else the offline describer."""
    env = os.environ if env is None else env
    base = env.get(ENV_BASE_URL, "").strip()
    model = env.get(ENV_MODEL, "").strip()
    if base or model:
        if not (base and model):
            missing = ENV_MODEL if base else ENV_BASE_URL
            raise PromptsError(
                f"The captioning service is only half configured: set {missing} too "
                f"(e.g. {ENV_BASE_URL}=http://localhost:8000/v1 and {ENV_MODEL}=Qwen/Qwen2.5-VL-7B-Instruct), "
                f"or unset both to use the offline describer."
            )
        if not base.startswith(("http://", "https://")):
            raise PromptsError(f"{ENV_BASE_URL} must be an http(s) address such as http://localhost:8000/v1.")
        return PromptWriterConfig(vlm=VLMConfig(base_url=base, model=model, api_key_env=ENV_API_KEY))
    local = env.get(ENV_LOCAL_DIR, "").strip()
    if local:
        return PromptWriterConfig(local_vlm_dir=local)
    return PromptWriterConfig()


def describe_writer(config: PromptWriterConfig) -> str:
    """One line for the UI / CLI: who will write student prompts."""
    if config.vlm is not None:
        return f"the VLM '{config.vlm.model}' at {config.vlm.base_url}"
    if config.local_vlm_dir:
        return f"the local VLM in {config.local_vlm_dir}"
    return "the offline describer (no VLM configured: it measures the pairs' colour, tone, geometry...)"


@dataclass
class StudentPromptResult:
    effect: str
    status: str  # "written" | "kept" (curator's edit or existing prompt left alone) | "skipped"
    text: str | None = None  # the stored prompt after the call
    source: str | None = None
    message: str = ""


def _writer(config: PromptWriterConfig) -> PromptWriter:
    try:
        return make_writer(config)
    except VLMError as e:
        raise PromptsError(str(e)) from e


def _load_pairs(studio: Studio, effect: str, k: int, rng: random.Random) -> list[ImagePair]:
    """``k`` random kept pairs of ``effect`` (all when it has fewer), images read from the blob store."""
    with studio.session() as s:
        kept = [(p.source_sha, p.target_sha) for p in _effect(s, effect).pairs if not p.excluded]
    chosen = rng.sample(kept, k) if len(kept) > k else kept
    pairs = []
    for src, tgt in chosen:
        with Image.open(studio.blobs.path(src, "png")) as a, Image.open(studio.blobs.path(tgt, "png")) as b:
            pairs.append((a.convert("RGB"), b.convert("RGB")))
    return pairs


def generate_student_prompts(
    studio: Studio,
    effects: Sequence[str] | None = None,
    writer_config: PromptWriterConfig | None = None,
    overwrite_curator_edits: bool = False,
    progress: Progress | None = None,
    *,
    only_missing: bool = False,
    seed: int | None = None,
    writer: PromptWriter | None = None,
) -> list[StudentPromptResult]:
    """Write student prompts for ``effects`` (default: all) from random kept pairs and the teacher
    prompt, with the writer ``writer_config`` (default: from the environment) describes.

    Prompts a curator edited by hand are kept unless ``overwrite_curator_edits``; with
    ``only_missing`` effects that already have a student prompt are kept too. Each prompt is stored
    as soon as it is written. An effect the writer cannot describe (too few pairs) is skipped with a
    message; an unreachable or failing VLM stops the run with a PromptsError (earlier prompts stay).
    """
    names = list(effects) if effects else [r.effect for r in prompt_rows(studio)]
    rows = {r.effect: r for r in prompt_rows(studio, names)} if names else {}  # unknown names raise here
    own_writer = writer is None
    writer = writer or _writer(writer_config or writer_config_from_env())
    k = OFFLINE_PAIRS if isinstance(writer, OfflineDescriber) else VLM_PAIRS
    rng = random.Random(seed)
    results: list[StudentPromptResult] = []
    try:
        for i, name in enumerate(names):
            if progress is not None:
                progress(i, len(names), name)
            row = rows[name]
            if row.student_edited_by_curator and not overwrite_curator_edits:
                results.append(
                    StudentPromptResult(
                        name, "kept", row.student_prompt, row.student_source, "edited by a curator; kept"
                    )
                )
                continue
            if only_missing and row.student_prompt:
                results.append(StudentPromptResult(name, "kept", row.student_prompt, row.student_source))
                continue
            pairs = _load_pairs(studio, name, k, rng)
            try:
                written = writer.refine_student_prompt(pairs, row.teacher_prompt)
            except VLMError as e:
                done = sum(r.status == "written" for r in results)
                kept = f" The {done} prompt(s) written before were saved." if done else ""
                raise PromptsError(f"Could not write the student prompt of '{name}': {e}{kept}") from e
            except ValueError as e:  # e.g. too few pairs: a problem of this effect only
                results.append(StudentPromptResult(name, "skipped", row.student_prompt, None, str(e)))
                continue
            results.append(
                _store_written(studio, name, written.text, written.source, overwrite_curator_edits)
            )
        if progress is not None:
            progress(len(names), len(names), "done")
    finally:
        if own_writer and callable(getattr(writer, "close", None)):
            writer.close()
    return results


def _store_written(studio: Studio, name: str, text: str, source: str, overwrite: bool) -> StudentPromptResult:
    with studio.session() as s:
        prompt = _prompt(_effect(s, name))
        if prompt.student_edited_by_curator and not overwrite:  # edited while the VLM was writing
            return StudentPromptResult(
                name, "kept", prompt.student_prompt, prompt.student_source, "edited by a curator; kept"
            )
        prompt.student_prompt = text
        prompt.student_source = source
        prompt.student_edited_by_curator = False
        prompt.student_updated_at = utcnow()
        return StudentPromptResult(name, "written", text, source)


def set_student_prompt(studio: Studio, effect: str, text: str) -> None:
    """A curator's student prompt: stored as edited by hand, so generation leaves it alone."""
    text = " ".join((text or "").split())
    with studio.session() as s:
        prompt = _prompt(_effect(s, effect))
        if prompt.trigger and text.startswith(prompt.trigger):
            text = text[len(prompt.trigger) :].strip()  # the trigger is put in front anyway
        if not text:
            raise PromptsError(
                "The student prompt is empty: describe the effect in a sentence or two "
                "(the trigger word is put in front automatically)."
            )
        prompt.student_prompt = text
        prompt.student_source = "curator"
        prompt.student_edited_by_curator = True
        prompt.student_updated_at = utcnow()


# ---------------------------------------------------------------------------------------------
# The general stream.


def general_instructions(
    images: Sequence[Image.Image],
    writer: PromptWriter | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """One edit instruction per unlabelled general image (the general stream's c), written by
    ``writer`` (default: the one the environment configures; offline describer when none)."""
    own = writer is None
    writer = writer or _writer(writer_config_from_env())
    out: list[str] = []
    try:
        for i, image in enumerate(images):
            if progress is not None:
                progress(i, len(images), f"image {i + 1}")
            try:
                out.append(writer.write_instruction(image))
            except VLMError as e:
                raise PromptsError(f"Could not write an instruction for general image {i + 1}: {e}") from e
    finally:
        if own and callable(getattr(writer, "close", None)):
            writer.close()
    return out
