"""The Distill tab: one click turns the effects' teachers into ONE student LoRA (a background run).

The form starts from ``DistillConfig.for_backbone`` (the paper's §5.1 defaults; a CPU-sized recipe on
the tiny backbone) with every component switchable. Launching checks every effect first and lists
what is missing. The run is a worker process; the tab polls it (loss curves, sample grids, ETA) and
can stop, resume, and extend a finished CollectionLoRA with new effects. Two clicks never train at
once on one device: the second run waits in ``studio.runs``' queue, and the tab says behind which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import pandas as pd

from distill.config import DistillConfig
from storage import BlobNotFoundError, BlobStoreError, DatabaseError, RunKind

from .. import distill_service, preview_service, runs, teachers_service
from ..context import Studio
from ..distill_service import DistillError
from ..library import LibraryError
from ..runs import RunError, RunView
from . import runs_view
from .runs_view import SettingsError, parse_extra

log = logging.getLogger(__name__)

GENERATOR_CURVES = ["loss", "ta_fm", "dmd_ts", "dmd_bs", "dmd_bs_general"]
CRITIC_CURVES = ["critic"]  # its own plot: the critic's flow-matching loss is on another scale
CURATOR_ERRORS = (
    DistillError,
    SettingsError,
    LibraryError,
    RunError,
    BlobStoreError,
    BlobNotFoundError,
    DatabaseError,
)
KINDS = (RunKind.DISTILL.value, RunKind.EXTEND.value)
SWITCHES = [  # (label, DistillConfig field)
    ("PDSR (effect/general streams)", "pdsr"),
    ("AOP (trigger + student prompt)", "aop"),
    ("TA-FM (trajectory anchoring)", "ta_fm"),
    ("DMD with target simulation (TS)", "target_simulation"),
    ("DMD with backward simulation (BS)", "backward_simulation"),
]


@dataclass
class Form:
    """The launch form's values (also its defaults)."""

    steps: int
    p_switch: float
    tau_max: float
    tau_min: float
    lr: float
    critic_updates: int
    switches: list[str]  # the DistillConfig switch fields that are on

    def overrides(self) -> dict[str, Any]:
        on = set(self.switches)
        unknown = on - {f for _, f in SWITCHES}
        if unknown:
            raise SettingsError(f"Unknown switch(es): {', '.join(sorted(unknown))}.")
        d: dict[str, Any] = {
            "steps": _whole(self.steps, "Steps"),
            "p_switch": _number(self.p_switch, "p_switch"),
            "tau_max": _number(self.tau_max, "tau_max"),
            "tau_min": _number(self.tau_min, "tau_min"),
            "lr_student": _number(self.lr, "Learning rate"),  # the critic's: the preset's (or extra JSON)
            "critic_updates": _whole(self.critic_updates, "Critic updates per generator step"),
        }
        if not 0 < d["lr_student"] < 1:
            raise SettingsError("The learning rate must be between 0 and 1, e.g. 0.0005.")
        d.update({f: f in on for _, f in SWITCHES})
        return d


def _number(v: Any, what: str) -> float:
    if v is None or v == "":
        raise SettingsError(f"{what} is empty: give a number.")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise SettingsError(f"{what} must be a number, not {v!r}.") from None


def _whole(v: Any, what: str) -> int:
    f = _number(v, what)
    if f != int(f) or f < 1:
        raise SettingsError(f"{what} must be a whole number of at least 1.")
    return int(f)


def defaults(studio: Studio) -> Form:
    c = DistillConfig.for_backbone(studio.config.backbone)
    on = [f for _, f in SWITCHES if getattr(c, f)]
    return Form(c.steps, c.p_switch, c.tau_max, c.tau_min, c.lr_student, c.critic_updates, on)


def steps_for(studio: Studio, effects: list[str] | None) -> int:
    """The preset's generator steps for the ticked effects: the budget grows with their number."""
    return distill_service.planned_config(studio, n_effects=len(effects or [])).steps


@dataclass
class Panel:
    """The selected run's live part (what the timer refreshes) and the run history."""

    progress: str
    curves: pd.DataFrame  # generator losses, long format (step, value, metric)
    critic: pd.DataFrame
    samples: list[tuple]
    log: str
    active: bool
    can_stop: bool
    can_resume: bool
    history: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=runs_view.HISTORY_HEADERS))

    def updates(self) -> tuple:
        return (
            self.progress,
            self.curves,
            self.critic,
            self.samples,
            self.log,
            gr.update(visible=self.can_stop),
            gr.update(visible=self.can_resume),
            gr.Timer(active=self.active),
            self.history,
        )


@dataclass
class View:
    notice: str
    error: str
    effects: list[str]
    chosen: list[str]
    run_choices: list[tuple[str, int]]
    run_id: int | None
    students: list[tuple[str, int]]  # finished runs to extend
    panel: Panel

    def updates(self) -> tuple:
        return (
            self.notice,
            gr.update(value=self.error, visible=bool(self.error)),
            gr.update(choices=self.effects, value=self.chosen),
            gr.update(choices=self.run_choices, value=self.run_id),
            gr.update(choices=self.students, value=self.students[0][1] if self.students else None),
            gr.update(choices=self.effects, value=[]),
            *self.panel.updates(),
        )


def distill_runs(studio: Studio) -> list[RunView]:
    views = [v for kind in KINDS for v in runs.list_runs(studio, kind)]
    return sorted(views, key=lambda v: v.id, reverse=True)


def _empty_panel() -> Panel:
    empty = runs_view.curves_frame([])
    return Panel(runs_view.progress_html(None), empty, empty, [], "", False, False, False)


def panel(studio: Studio, run_id: int | None) -> Panel:
    view = runs_view.read_run(studio, run_id)
    history = runs_view.history_table(distill_runs(studio))
    if view is None:
        p = _empty_panel()
        p.history = history
        return p
    return Panel(
        runs_view.progress_html(view, ("loss", "critic")),
        runs_view.curves(studio, view.id, GENERATOR_CURVES),
        runs_view.curves(studio, view.id, CRITIC_CURVES),
        runs_view.sample_gallery(studio, view),
        view.log_tail,
        runs_view.is_active(view),
        view.status in ("queued", "running"),
        view.status in ("stopped", "failed"),
        history,
    )


def render(
    studio: Studio,
    run_id: int | None = None,
    notice: str = "",
    error: str = "",
    chosen: list[str] | None = None,
) -> View:
    """The tab from the database. Ticked effects: ``chosen`` (those still there), else every effect
    with a teacher."""
    views = distill_runs(studio)
    if run_id is None or all(v.id != run_id for v in views):
        run_id = runs_view.default_run(views)
    teachers = teachers_service.list_teachers(studio)
    names = [t.effect for t in teachers]
    kept = [n for n in chosen or [] if n in names]
    chosen = kept or [t.effect for t in teachers if t.lora is not None]
    students = [
        (c.label, c.run_id) for c in preview_service.finished_students(studio) if c.run_id is not None
    ]
    return View(
        notice, error, names, chosen, runs_view.run_choices(views), run_id, students, panel(studio, run_id)
    )


def _guarded(studio: Studio, run_id: int | None, action: Callable[[], tuple[str, int | None]]) -> View:
    try:
        notice, run_id = action()
        return render(studio, run_id, notice=notice)
    except CURATOR_ERRORS as e:
        message = str(e)
    except Exception as e:
        log.exception("Distill tab action failed")
        message = (
            f"Something unexpected went wrong ({type(e).__name__}); the details are in the studio's log."
        )
    try:
        return render(studio, run_id, error=message)
    except Exception:
        log.exception("Distill tab could not re-read the studio")
        return View("", message, [], [], [], None, [], _empty_panel())


def _queued_note(studio: Studio, run_id: int) -> str:
    ahead = [v for v in runs.list_runs(studio) if runs_view.is_active(v) and v.id < run_id]
    return f" It is queued behind run {ahead[-1].id} and starts when that one ends." if ahead else ""


# ---------------------------------------------------------------------------------------------
# Handlers (plain functions; tests call them directly).


def launch(
    studio: Studio, effects: list[str] | None, form: Form, extra: str | None = "", name: str = ""
) -> View:
    """Check the effects and queue a distillation run with the form's settings."""

    def action() -> tuple[str, int | None]:
        if not effects:
            raise DistillError("Tick the effects to distil (every effect needs a teacher and prompts).")
        overrides = {**form.overrides(), **parse_extra(extra)}
        run_id = distill_service.start_distillation(
            studio, list(effects), overrides, name=(name or "").strip()
        )
        coarse = distill_service.planned_config(studio, overrides).coarse
        first = f" after {coarse} coarse steps (TA-FM alone)" if coarse else ""
        return (
            f"Started run {run_id}: distilling {len(effects)} effect{'s' if len(effects) != 1 else ''} "
            f"into one LoRA, {overrides['steps']} steps{first}.{_queued_note(studio, run_id)}",
            run_id,
        )

    return _guarded(studio, None, action)


def extend(
    studio: Studio,
    from_run: int | None,
    new_effects: list[str] | None,
    steps: float | None,
    extra: str | None = "",
) -> View:
    """Queue a short run adding ``new_effects`` to the CollectionLoRA of a finished run (Tab. 5)."""

    def action() -> tuple[str, int | None]:
        if from_run is None:
            raise DistillError("Pick the finished CollectionLoRA to extend.")
        if not new_effects:
            raise DistillError("Tick the new effects to add.")
        n = None if steps in (None, "") else _whole(steps, "Steps")  # empty: the share rule
        run_id = distill_service.extend_collection(
            studio,
            list(new_effects),
            from_run=int(from_run),
            steps=n,
            config_overrides=parse_extra(extra) or None,
        )
        return (
            f"Started run {run_id}: extending run {from_run}'s CollectionLoRA with "
            f"{', '.join(new_effects)}, {distill_service.planned_steps(studio, run_id)} steps."
            f"{_queued_note(studio, run_id)}",
            run_id,
        )

    return _guarded(studio, None, action)


def stop(studio: Studio, run_id: int | None) -> View:
    def action() -> tuple[str, int | None]:
        if run_id is None:
            raise RunError("Pick a run first.")
        status = distill_service.stop(studio, int(run_id))
        return f"Asked run {run_id} to stop; it saves a checkpoint first ({status}).", run_id

    return _guarded(studio, run_id, action)


def resume(studio: Studio, run_id: int | None) -> View:
    def action() -> tuple[str, int | None]:
        if run_id is None:
            raise RunError("Pick a run first.")
        distill_service.resume(studio, int(run_id))
        return f"Resumed run {run_id} from its last checkpoint.", run_id

    return _guarded(studio, run_id, action)


def poll(studio: Studio, run_id: int | None) -> Panel:
    try:
        return panel(studio, run_id)
    except Exception:
        log.exception("Distill tab could not read run %s", run_id)
        return _empty_panel()


# ---------------------------------------------------------------------------------------------
# Layout and wiring.


def build(studio: Studio, app: gr.Blocks) -> None:
    """The tab's components and events (call inside ``with gr.Tab(...)``)."""
    d = defaults(studio)
    gr.Markdown(
        "Distil every ticked effect's teacher, and few-step generation, into **one student LoRA** "
        "(8 steps, no CFG). It runs in the background; the curves and sample grids update as it goes."
    )
    active_md = gr.Markdown(elem_id="distill-active")
    effects_in = gr.CheckboxGroup(choices=[], value=[], label="Effects", elem_id="distill-effects")
    with gr.Accordion("Settings", open=True):
        with gr.Row():
            steps_in = gr.Number(
                value=d.steps,
                label="Generator steps",
                info="Grows with the ticked effects (the preset's budget per effect); edit to override.",
                precision=0,
                elem_id="distill-steps",
            )
            lr_in = gr.Number(value=d.lr, label="Learning rate (student)", elem_id="distill-lr")
            critic_in = gr.Number(
                value=d.critic_updates, label="Critic updates per step", precision=0, elem_id="distill-critic"
            )
        with gr.Row():
            p_in = gr.Number(
                value=d.p_switch, label="p_switch (share of effect batches)", elem_id="distill-p"
            )
            tmax_in = gr.Number(
                value=d.tau_max, label="tau_max (generator, of 1000)", elem_id="distill-tau-max"
            )
            tmin_in = gr.Number(value=d.tau_min, label="tau_min (critic, of 1000)", elem_id="distill-tau-min")
        switches_in = gr.CheckboxGroup(
            choices=SWITCHES, value=d.switches, label="Components", elem_id="distill-switches"
        )
        extra_in = gr.Textbox(
            label='More settings (JSON, optional), e.g. {"batch": 4, "sample_every": 50}',
            elem_id="distill-extra",
        )
        name_in = gr.Textbox(label="Run name (optional)", elem_id="distill-name")
    launch_btn = gr.Button("Distil into one LoRA", variant="primary", elem_id="distill-launch")
    notice = gr.Markdown(elem_id="distill-notice")
    error = gr.Textbox(label="Problem", lines=4, interactive=False, visible=False, elem_id="distill-error")

    run_in = gr.Dropdown(choices=[], value=None, label="Run", elem_id="distill-run")
    progress = gr.HTML(elem_id="distill-progress")
    with gr.Row():
        stop_btn = gr.Button("Stop", variant="stop", visible=False, elem_id="distill-stop")
        resume_btn = gr.Button("Resume", visible=False, elem_id="distill-resume")
    with gr.Row():
        # No initial value: an empty frame would fix the axes' types before the first points arrive.
        plot = gr.LinePlot(
            x="step",
            y="value",
            color="metric",
            title="Generator losses",
            height=260,
            scale=2,
            elem_id="distill-plot",
        )
        critic_plot = gr.LinePlot(
            x="step",
            y="value",
            color="metric",
            title="Critic loss",
            height=260,
            scale=1,
            elem_id="distill-critic-plot",
        )
    samples = gr.Gallery(
        label="Sample grids, newest first (each row: source | teacher target | student)",
        columns=4,
        height="auto",
        object_fit="contain",
        format="png",
        elem_id="distill-samples",
    )
    with gr.Accordion("Worker log", open=False):
        log_box = gr.Textbox(
            lines=8, max_lines=20, interactive=False, show_label=False, elem_id="distill-log"
        )
    history = gr.Dataframe(
        value=pd.DataFrame(columns=runs_view.HISTORY_HEADERS),
        headers=runs_view.HISTORY_HEADERS,
        interactive=False,
        wrap=True,
        label="Run history",
        elem_id="distill-history",
    )
    with gr.Accordion("Extend a finished CollectionLoRA with new effects", open=False):
        from_in = gr.Dropdown(choices=[], value=None, label="Finished run", elem_id="distill-extend-from")
        new_in = gr.CheckboxGroup(choices=[], value=[], label="New effects", elem_id="distill-extend-effects")
        ext_steps = gr.Number(
            value=None,
            label="Steps (empty: each new effect gets one effect's share of the finished run's steps)",
            precision=0,
            elem_id="distill-extend-steps",
        )
        extend_btn = gr.Button("Extend", elem_id="distill-extend")
    timer = gr.Timer(runs_view.POLL_S, active=False)

    panel_outputs = [progress, plot, critic_plot, samples, log_box, stop_btn, resume_btn, timer, history]
    view_outputs = [notice, error, effects_in, run_in, from_in, new_in, *panel_outputs]

    def out(view: View) -> tuple:
        return view.updates()

    def on_load():  # the steps field starts at the budget for the effects ticked by default
        view = render(studio)
        return (*out(view), runs_view.active_runs_markdown(studio), steps_for(studio, view.chosen))

    def on_launch(effects, steps, p, tmax, tmin, lr, critic, switches, extra, name):
        form = Form(steps, p, tmax, tmin, lr, critic, list(switches or []))
        return out(launch(studio, effects, form, extra, name))

    def on_select(run_id, chosen):
        return (*out(render(studio, run_id, chosen=chosen)), runs_view.active_runs_markdown(studio))

    app.load(on_load, outputs=[*view_outputs, active_md, steps_in])
    runs_view.on_tab_selected(on_select, [run_in, effects_in], [*view_outputs, active_md])
    # .input, not .change: a refresh of the effect list must not overwrite steps the curator typed
    effects_in.input(lambda e: steps_for(studio, e), effects_in, steps_in)
    launch_btn.click(
        on_launch,
        [effects_in, steps_in, p_in, tmax_in, tmin_in, lr_in, critic_in, switches_in, extra_in, name_in],
        view_outputs,
        concurrency_limit=1,
    )
    extend_btn.click(
        lambda r, e, s, x: out(extend(studio, r, e, s, x)),
        [from_in, new_in, ext_steps, extra_in],
        view_outputs,
        concurrency_limit=1,
    )
    stop_btn.click(lambda r: out(stop(studio, r)), run_in, view_outputs)
    resume_btn.click(lambda r: out(resume(studio, r)), run_in, view_outputs)
    run_in.input(lambda r: poll(studio, r).updates(), run_in, panel_outputs)
    timer.tick(lambda r: poll(studio, r).updates(), run_in, panel_outputs, show_progress="hidden")
