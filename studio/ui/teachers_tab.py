"""The Teachers tab: train an effect's teacher LoRA as a background run, or import a LoRA file.

Training is a worker process (``teachers_service.submit_training``); the tab polls the run's row
every couple of seconds (progress, loss, ETA, the latest sample grid) and can stop and resume it.
Handlers are plain functions of the studio and the inputs returning the whole ``View`` re-read
from the database; ``build`` only wires them to Gradio components.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from distill.backbones.registry import teacher_cfg
from distill.lora_training import LoraTrainConfig
from storage import BlobNotFoundError, BlobStoreError, DatabaseError, RunKind

from .. import preview_service, runs, teachers_service
from ..context import Studio
from ..library import LibraryError
from ..preview_service import PreviewError
from ..runs import RunError, RunView
from ..teachers_service import TeacherError
from . import runs_view
from .runs_view import SettingsError, parse_extra

log = logging.getLogger(__name__)

TABLE_HEADERS = ["effect", "pairs", "teacher", "rank", "size", "teacher prompt"]
CURATOR_ERRORS = (
    TeacherError,
    LibraryError,
    RunError,
    PreviewError,
    SettingsError,
    BlobStoreError,
    BlobNotFoundError,
    DatabaseError,
)
KIND = RunKind.TEACHER.value


@dataclass
class Defaults:
    rank: int
    steps: int
    lr: float


def defaults(studio: Studio) -> Defaults:
    """The form's starting values: the backbone's preset (tiny: sized for 2 CPU cores)."""
    c = teachers_service.default_config(studio)
    return Defaults(c.rank, c.steps, c.lr)


@dataclass
class View:
    """Everything the tab shows, in the order of ``build``'s ``view_outputs``."""

    notice: str
    error: str
    effects: list[str]
    effect: str | None
    run_choices: list[tuple[str, int]]
    run_id: int | None
    panel: Panel

    def updates(self) -> tuple:
        return (
            self.notice,
            gr.update(value=self.error, visible=bool(self.error)),
            gr.update(choices=self.effects, value=self.effect),
            gr.update(choices=self.run_choices, value=self.run_id),
            *self.panel.updates(),
        )


@dataclass
class Panel:
    """The selected run's live part (what the timer refreshes)."""

    progress: str
    samples: Image.Image | None
    log: str
    active: bool
    can_stop: bool
    can_resume: bool
    table: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TABLE_HEADERS))

    def updates(self) -> tuple:
        return (
            self.progress,
            self.samples,
            self.log,
            gr.update(visible=self.can_stop),
            gr.update(visible=self.can_resume),
            gr.Timer(active=self.active),
            self.table,
        )


def _size(n: int | None) -> str:
    if not n:
        return ""
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def teachers_table(studio: Studio) -> pd.DataFrame:
    rows = []
    for t in teachers_service.list_teachers(studio):
        if t.lora is None:
            teacher, rank, size = "none yet", "", ""
        else:
            how = "trained" if t.lora.kind.value == "teacher" else f"imported ({t.lora.format})"
            teacher, rank, size = f"#{t.lora.id} {how}", str(t.lora.rank or ""), _size(t.lora.bytes)
        rows.append([t.effect, t.pairs, teacher, rank, size, t.teacher_prompt])
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def panel(studio: Studio, run_id: int | None) -> Panel:
    """The run's progress, latest sample grid, log tail and which buttons apply."""
    view = runs_view.read_run(studio, run_id)
    table = teachers_table(studio)
    if view is None:
        return Panel(runs_view.progress_html(None), None, "", False, False, False, table)
    return Panel(
        runs_view.progress_html(view),
        runs_view.latest_samples(studio, view),
        view.log_tail,
        runs_view.is_active(view),
        view.status in ("queued", "running"),
        view.status in ("stopped", "failed"),
        table,
    )


def _teacher_runs(studio: Studio) -> list[RunView]:
    return runs.list_runs(studio, KIND)


def render(
    studio: Studio,
    effect: str | None = None,
    run_id: int | None = None,
    notice: str = "",
    error: str = "",
) -> View:
    """The tab from the database; ``run_id`` None shows the newest active (else newest) teacher run."""
    views = _teacher_runs(studio)
    if run_id is None or all(v.id != run_id for v in views):
        run_id = runs_view.default_run(views)
    names = [t.effect for t in teachers_service.list_teachers(studio)]
    if effect not in names:
        effect = names[0] if names else None
    return View(notice, error, names, effect, runs_view.run_choices(views), run_id, panel(studio, run_id))


def _guarded(
    studio: Studio,
    effect: str | None,
    run_id: int | None,
    action: Callable[[], tuple[str, str | None, int | None]],
) -> View:
    """Run `action` (returns a notice, the effect and the run to show); errors go to the error box."""
    try:
        notice, effect, run_id = action()
        return render(studio, effect, run_id, notice=notice)
    except CURATOR_ERRORS as e:
        message = str(e)
    except Exception as e:
        log.exception("Teachers tab action failed")
        message = (
            f"Something unexpected went wrong ({type(e).__name__}); the details are in the studio's log."
        )
    try:
        return render(studio, effect, run_id, error=message)
    except Exception:
        log.exception("Teachers tab could not re-read the studio")
        empty = Panel(runs_view.progress_html(None), None, "", False, False, False)
        return View("", message, [], None, [], None, empty)


# ---------------------------------------------------------------------------------------------
# Handlers (plain functions; tests call them directly).


MIRRORS = {"left-right": "flip_x", "upside-down": "flip_y"}  # form choice -> LoraTrainConfig field


def check_teacher(studio: Studio, effect: str | None, n_per_category: int = 4) -> str:
    """The effect's teacher beside the base model (same prompt, same noise) against the ground truth,
    as markdown with a verdict; problems come back as text, never as an exception."""
    if not effect:
        return "Choose an effect first."
    try:
        res = teachers_service.evaluate(studio, effect, n_per_category=n_per_category)
    except CURATOR_ERRORS as e:
        return f"**Problem:** {e}"
    except Exception as e:
        log.exception("Teacher check failed")
        return f"Something unexpected went wrong ({type(e).__name__}); the details are in the studio's log."
    rows = [
        f"| {label} | {ev.psnr_mean:.2f} | {ev.psnr_worst:.2f} | {ev.ssim_mean:.3f} |"
        for label, ev in (("teacher", res.teacher), ("base model, same prompt", res.base))
    ]
    return "\n".join(
        [
            f"On {res.on}, {res.teacher.nfe} NFE per image:",
            "",
            "| system | PSNR mean (dB) | PSNR worst | SSIM |",
            "|---|---|---|---|",
            *rows,
            "",
            f"**{res.verdict()}**",
        ]
    )


def train_config(
    studio: Studio,
    rank: float | None,
    steps: float | None,
    lr: float | None,
    extra: str | None = "",
    mirror: Sequence[str] | None = (),
) -> LoraTrainConfig:
    """The preset with the form's values; alpha follows the rank (the preset's alpha/rank ratio);
    ``mirror``: the flips (keys of ``MIRRORS``) to add mirrored copies of the pairs in."""
    base = teachers_service.default_config(studio)
    d = base.to_dict()
    if rank is None or int(rank) < 1 or int(rank) != rank:
        raise SettingsError(f"Rank must be a whole number of at least 1 (the preset uses {base.rank}).")
    if steps is None or int(steps) < 1 or int(steps) != steps:
        raise SettingsError("Steps must be a whole number of at least 1.")
    if lr is None or not 0 < float(lr) < 1:
        raise SettingsError("The learning rate must be a number between 0 and 1, e.g. 0.002.")
    d.update(rank=int(rank), alpha=base.alpha * int(rank) / base.rank, steps=int(steps), lr=float(lr))
    d.update({key: choice in (mirror or ()) for choice, key in MIRRORS.items()})
    d.update(parse_extra(extra))
    try:
        return teachers_service.check_train_config(LoraTrainConfig.from_dict(d))
    except (TypeError, ValueError) as e:
        raise SettingsError(f"Bad training settings: {e}") from None


def start_training(
    studio: Studio,
    effect: str | None,
    rank: float | None,
    steps: float | None,
    lr: float | None,
    extra: str | None = "",
    mirror: Sequence[str] | None = (),
) -> View:
    """Queue the effect's teacher training as a background run and show it."""

    def action() -> tuple[str, str | None, int | None]:
        if not effect:
            raise LibraryError("Pick the effect to train a teacher for.")
        config = train_config(studio, rank, steps, lr, extra, mirror)
        run_id = teachers_service.submit_training(studio, effect, config)
        ahead = [v for v in runs.list_runs(studio) if runs_view.is_active(v) and v.id < run_id]
        note = f" It is queued behind run {ahead[-1].id}." if ahead else ""
        return f"Started run {run_id}: teacher of **{effect}**, {config.steps} steps.{note}", effect, run_id

    return _guarded(studio, effect, None, action)


def train_missing(
    studio: Studio,
    effect: str | None,
    rank: float | None,
    steps: float | None,
    lr: float | None,
    extra: str | None = "",
) -> View:
    """Queue a teacher training, with the form's settings, for every effect still without a teacher."""

    def action() -> tuple[str, str | None, int | None]:
        config = train_config(studio, rank, steps, lr, extra, ())
        queued = teachers_service.submit_missing(studio, config)
        names = ", ".join(n for n, _ in queued[:6]) + (
            f" and {len(queued) - 6} more" if len(queued) > 6 else ""
        )
        first, last = queued[0][1], queued[-1][1]
        ids = f"run {first}" if first == last else f"runs {first}-{last}"
        return (
            f"Queued {len(queued)} teacher training{'s' if len(queued) != 1 else ''} ({ids}), {config.steps} "
            f"steps each, one after another: {names}. Mirrored pairs are left out (they suit only some effects).",
            effect,
            first,
        )

    return _guarded(studio, effect, None, action)


def import_lora(studio: Studio, effect: str | None, file: str | Path | None, prompt: str = "") -> View:
    """Register an uploaded .safetensors LoRA as the effect's teacher (checked on the backbone first)."""

    def action() -> tuple[str, str | None, int | None]:
        if not effect:
            raise LibraryError("Pick the effect this LoRA belongs to.")
        if not file:
            raise TeacherError("Upload the LoRA file (.safetensors) first.")
        path = Path(file)
        if path.suffix.lower() != ".safetensors":
            raise TeacherError(
                f"{path.name} is not a .safetensors file. Export the LoRA as .safetensors "
                "(pickled .ckpt/.pt/.bin files can run code and are refused)."
            )
        with preview_service.locked_backbone(studio) as bb:
            lora = teachers_service.import_teacher(studio, effect, path, prompt or None, backbone=bb)
        return (
            f"Imported {path.name} as the teacher of **{effect}** "
            f"({lora.format}, rank {lora.rank}, {(lora.meta or {}).get('matched_modules', '?')} layers).",
            effect,
            None,
        )

    return _guarded(studio, effect, None, action)


def stop(studio: Studio, run_id: int | None, effect: str | None = None) -> View:
    def action() -> tuple[str, str | None, int | None]:
        if run_id is None:
            raise RunError("Pick a run first.")
        status = runs.request_stop(studio, int(run_id))
        return f"Asked run {run_id} to stop; it saves a checkpoint first ({status.value}).", effect, run_id

    return _guarded(studio, effect, run_id, action)


def resume(studio: Studio, run_id: int | None, effect: str | None = None) -> View:
    def action() -> tuple[str, str | None, int | None]:
        if run_id is None:
            raise RunError("Pick a run first.")
        runs.resume(studio, int(run_id))
        return f"Resumed run {run_id} from its last checkpoint.", effect, run_id

    return _guarded(studio, effect, run_id, action)


def poll(studio: Studio, run_id: int | None) -> Panel:
    """What the timer refreshes: the run's progress, samples and log, and the teachers table."""
    try:
        return panel(studio, run_id)
    except Exception:
        log.exception("Teachers tab could not read run %s", run_id)
        return Panel(runs_view.progress_html(None), None, "", False, False, False)


# ---------------------------------------------------------------------------------------------
# Layout and wiring.


def build(studio: Studio, app: gr.Blocks) -> None:
    """The tab's components and events (call inside ``with gr.Tab(...)``)."""
    d = defaults(studio)
    gr.Markdown(
        "Each effect needs a **teacher**: a LoRA that applies it "
        f"(40 steps × CFG {teacher_cfg(studio.config.backbone):g}). Train one on the effect's pairs — "
        "it runs in the background, you can leave the page — or import a LoRA file."
    )
    active_md = gr.Markdown(elem_id="teachers-active")
    effect_in = gr.Dropdown(choices=[], value=None, label="Effect", elem_id="teachers-effect")
    with gr.Accordion("Train a teacher", open=True):
        with gr.Row():
            rank_in = gr.Number(value=d.rank, label="Rank", precision=0, elem_id="teachers-rank")
            steps_in = gr.Number(value=d.steps, label="Steps", precision=0, elem_id="teachers-steps")
            lr_in = gr.Number(value=d.lr, label="Learning rate", elem_id="teachers-lr")
        mirror_in = gr.CheckboxGroup(
            choices=list(MIRRORS),
            value=[],
            label="Also train on mirrored pairs (only for an effect that looks the same in that mirror)",
            elem_id="teachers-mirror",
        )
        extra_in = gr.Textbox(
            label='More settings (JSON, optional), e.g. {"batch": 4, "sample_every": 50}',
            elem_id="teachers-extra",
        )
        with gr.Row():
            train_btn = gr.Button("Train teacher", variant="primary", elem_id="teachers-train")
            train_all_btn = gr.Button(
                "Train every effect without a teacher", elem_id="teachers-train-missing"
            )
    with gr.Accordion("Import a LoRA file", open=False):
        file_in = gr.File(
            label="Teacher LoRA (.safetensors: diffusers, kohya/ComfyUI or ai-toolkit keys)",
            file_types=[".safetensors"],
            elem_id="teachers-file",
        )
        prompt_in = gr.Textbox(
            label="Its teacher prompt (the instruction it was trained with; empty: keep the effect's)",
            elem_id="teachers-import-prompt",
        )
        import_btn = gr.Button("Import as teacher", elem_id="teachers-import")

    with gr.Accordion("Check a teacher against the base model", open=False):
        check_btn = gr.Button("Check the effect's teacher", elem_id="teachers-check")
        check_md = gr.Markdown(elem_id="teachers-check-result")

    notice = gr.Markdown(elem_id="teachers-notice")
    error = gr.Textbox(label="Problem", lines=3, interactive=False, visible=False, elem_id="teachers-error")

    run_in = gr.Dropdown(choices=[], value=None, label="Run", elem_id="teachers-run")
    progress = gr.HTML(elem_id="teachers-progress")
    with gr.Row():
        stop_btn = gr.Button("Stop", variant="stop", visible=False, elem_id="teachers-stop")
        resume_btn = gr.Button("Resume", visible=False, elem_id="teachers-resume")
    samples = gr.Image(
        label="Samples of the latest checkpoint (rows: sources, teacher outputs, targets)",
        type="pil",
        interactive=False,
        elem_id="teachers-samples",
    )
    with gr.Accordion("Worker log", open=False):
        log_box = gr.Textbox(
            lines=8, max_lines=20, interactive=False, show_label=False, elem_id="teachers-log"
        )
    table = gr.Dataframe(
        value=pd.DataFrame(columns=TABLE_HEADERS),
        headers=TABLE_HEADERS,
        interactive=False,
        wrap=True,
        label="Teachers",
        elem_id="teachers-table",
    )
    timer = gr.Timer(runs_view.POLL_S, active=False)

    panel_outputs = [progress, samples, log_box, stop_btn, resume_btn, timer, table]
    view_outputs = [notice, error, effect_in, run_in, *panel_outputs]

    def out(view: View) -> tuple:
        return view.updates()

    def on_load():
        return (*out(render(studio)), runs_view.active_runs_markdown(studio))

    def on_select(effect, run_id):
        return (*out(render(studio, effect, run_id)), runs_view.active_runs_markdown(studio))

    app.load(on_load, outputs=[*view_outputs, active_md])
    runs_view.on_tab_selected(on_select, [effect_in, run_in], [*view_outputs, active_md])
    train_btn.click(
        lambda e, r, s, lr, x, m: out(start_training(studio, e, r, s, lr, x, m)),
        [effect_in, rank_in, steps_in, lr_in, extra_in, mirror_in],
        view_outputs,
        concurrency_limit=1,
    )
    train_all_btn.click(
        lambda e, r, s, lr, x: out(train_missing(studio, e, r, s, lr, x)),
        [effect_in, rank_in, steps_in, lr_in, extra_in],
        view_outputs,
        concurrency_limit=1,
    )
    import_btn.click(
        lambda e, f, p: out(import_lora(studio, e, f, p)),
        [effect_in, file_in, prompt_in],
        view_outputs,
        concurrency_limit=1,
    )
    check_btn.click(lambda e: check_teacher(studio, e), effect_in, check_md, concurrency_limit=1)
    stop_btn.click(lambda r, e: out(stop(studio, r, e)), [run_in, effect_in], view_outputs)
    resume_btn.click(lambda r, e: out(resume(studio, r, e)), [run_in, effect_in], view_outputs)
    run_in.input(lambda r: poll(studio, r).updates(), run_in, panel_outputs)
    timer.tick(lambda r: poll(studio, r).updates(), run_in, panel_outputs, show_progress="hidden")
