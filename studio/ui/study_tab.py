"""The User study tab: create a blind study, follow its image generation, add voters and copy their
links, watch voting progress, see the Fig. 16-style chart and counts, download the CSV.

As in the other tabs, handlers are plain functions of the studio and the inputs that return the whole
view (``View``) re-read from the database; ``build`` only wires them to Gradio components. Voters do
not use this tab: their links open the voter pages (``python -m studio study serve``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image

from storage import BlobNotFoundError, BlobStoreError, DatabaseError

from .. import library, runs
from .. import study_service as ss
from ..context import Studio
from ..library import LibraryError
from ..runs import RunError
from ..study_service import StudyError
from .common import error_view, guarded

log = logging.getLogger(__name__)

STUDY_HEADERS = ["id", "name", "status", "items", "voters", "votes", "systems"]
VOTER_HEADERS = ["voter", "name", "items answered", "votes", "last vote"]
RESULT_HEADERS = ["criterion", "system", "votes", "of", "share", "95% CI"]
CURATOR_ERRORS = (StudyError, LibraryError, RunError, BlobStoreError, BlobNotFoundError, DatabaseError)
DEFAULT_VOTER_URL = "http://127.0.0.1:8189"


@dataclass
class View:
    """Everything the tab shows, in the order of ``build``'s outputs."""

    notice: str
    error: str
    studies: pd.DataFrame
    choices: list[tuple[str, int]]
    selected: int | None
    detail: str
    voters: pd.DataFrame
    links: str
    chart: Image.Image | None
    results: pd.DataFrame

    def updates(self) -> tuple:
        return (
            self.notice,
            gr.update(value=self.error, visible=bool(self.error)),
            self.studies,
            gr.update(choices=self.choices, value=self.selected),
            self.detail,
            self.voters,
            self.links,
            self.chart,
            self.results,
        )


def _detail(studio: Studio, s: ss.StudySummary) -> str:
    lines = [
        f"### {s.name} (study {s.id}, {s.status})",
        f"Effects: {', '.join(s.effects)}  \nSystems: {', '.join(s.systems)}",
        f"Items: {s.items} of {s.planned_items} · voters: {s.voters} · votes: {s.votes}",
    ]
    run = ss.generation_run(studio, s.id) if s.run_id is not None else None
    if run is not None:
        state = f"Generation: run {run.id} **{run.status}**, {run.progress:.0%}"
        if run.total:
            state += f" ({run.step}/{run.total} batches)"
        if run.waiting_for:
            state += f", waiting for {run.waiting_for}"
        lines.append(state)
        if run.error:
            lines.append(f"Generation error: {run.error}")
    if s.status == "draft":
        lines.append("Voting opens when the images are made.")
    return "\n\n".join(lines)


def _results_frame(res: ss.StudyResults) -> pd.DataFrame:
    rows = [
        [
            ss.QUESTION_TEXT[ss.VoteQuestion(r.criterion)][0],
            r.system,
            r.votes,
            r.total,
            f"{100 * r.share:.1f}%",
            f"{100 * r.ci_low:.1f}–{100 * r.ci_high:.1f}%",
        ]
        for r in res.rows
    ]
    return pd.DataFrame(rows, columns=RESULT_HEADERS)


def render(studio: Studio, selected: int | None, notice: str = "", error: str = "", links: str = "") -> View:
    studies = ss.list_studies(studio)
    table = pd.DataFrame(
        [
            [s.id, s.name, s.status, f"{s.items}/{s.planned_items}", s.voters, s.votes, ", ".join(s.systems)]
            for s in studies
        ],
        columns=STUDY_HEADERS,
    )
    choices = [(f"{s.id} · {s.name}", s.id) for s in studies]
    if selected not in {s.id for s in studies}:
        selected = studies[0].id if studies else None
    view = View(
        notice,
        error,
        table,
        choices,
        selected,
        "",
        pd.DataFrame(columns=VOTER_HEADERS),
        links,
        None,
        pd.DataFrame(columns=RESULT_HEADERS),
    )
    if selected is None:
        view.detail = "No study yet: create one above."
        return view
    summary = next(s for s in studies if s.id == selected)
    view.detail = _detail(studio, summary)
    view.voters = pd.DataFrame(
        [
            [
                v.voter_id,
                v.name,
                f"{v.answered}/{v.items}",
                v.votes,
                v.last_vote_at.astimezone().strftime("%Y-%m-%d %H:%M") if v.last_vote_at else "-",
            ]
            for v in ss.voter_progress(studio, selected)
        ],
        columns=VOTER_HEADERS,
    )
    if summary.items:
        res = ss.results(studio, selected)
        view.results = _results_frame(res)
        view.chart = ss.results_chart(res) if summary.votes else None
    return view


def _guarded(studio: Studio, selected: int | None, action: Callable[[], tuple[str, int | None, str]]) -> View:
    """Run ``action`` (returns a notice, the study to show, links); errors go to the error box."""

    def run() -> View:
        nonlocal selected
        notice, selected, links = action()
        return render(studio, selected, notice=notice, links=links)

    return guarded(
        run, lambda m: _render_error(studio, selected, m), CURATOR_ERRORS, log, "User study tab action"
    )


def _render_error(studio: Studio, selected: int | None, message: str) -> View:
    empty = pd.DataFrame()
    return error_view(
        lambda: render(studio, selected, error=message),
        lambda: View("", message, empty, [], None, "", empty, "", None, empty),
        log,
        "User study tab could not re-read the studies",
    )


def _lines(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").replace(",", "\n").splitlines() if x.strip()]


def create(
    studio: Studio,
    name: str,
    effects: list[str] | None,
    systems: list[str] | None,
    extra_systems: str,
    n_items: float | None,
    seed: float | None,
    source_files: list[str] | None,
    student: str = "",
    lightning: str = "",
    fm: str = "",
) -> View:
    """Create a study from the form and queue its image generation."""

    def action() -> tuple[str, int | None, str]:
        chosen = list(systems or []) + [x.strip() for x in (extra_systems or "").splitlines() if x.strip()]
        sources = ss.store_source_images(studio, source_files) if source_files else None
        sid = ss.create_study(
            studio,
            name or "",
            list(effects or []),
            sources,
            chosen,
            int(n_items or 0),
            int(seed or 0),
            student=student.strip() or None,
            lightning=lightning.strip() or None,
            fm=fm.strip() or None,
        )
        info = ss.get_study(studio, sid)
        return (
            f"Study **{info.name}** created: {info.planned_items} items x {len(info.systems)} systems. "
            f"The images are being generated (run {info.run_id}); add voters meanwhile.",
            sid,
            "",
        )

    return _guarded(studio, None, action)


def add_voters(studio: Studio, selected: int | None, names: str, base_url: str) -> View:
    def action() -> tuple[str, int | None, str]:
        if selected is None:
            raise StudyError("Select a study first.")
        made = ss.add_voters(studio, selected, _lines(names))
        links = "\n".join(f"{n}\t{ss.voter_url(base_url or DEFAULT_VOTER_URL, t)}" for n, t in made)
        return (
            f"Added {len(made)} voter(s). Copy their links now: the studio keeps only a fingerprint of each "
            "and cannot show them again (a lost link can be replaced with `python -m studio study link ID`).",
            selected,
            links,
        )

    return _guarded(studio, selected, action)


def set_open(studio: Studio, selected: int | None, open_: bool) -> View:
    def action() -> tuple[str, int | None, str]:
        if selected is None:
            raise StudyError("Select a study first.")
        return f"Study {selected} is now {ss.set_open(studio, selected, open_)}.", selected, ""

    return _guarded(studio, selected, action)


def stop_generation(studio: Studio, selected: int | None) -> View:
    def action() -> tuple[str, int | None, str]:
        run_id = ss.get_study(studio, selected).run_id if selected is not None else None
        if run_id is None:
            raise StudyError("This study has no generation run.")
        return f"Generation run {run_id}: {runs.request_stop(studio, run_id).value}.", selected, ""

    return _guarded(studio, selected, action)


def resume_generation(studio: Studio, selected: int | None) -> View:
    def action() -> tuple[str, int | None, str]:
        run_id = ss.get_study(studio, selected).run_id if selected is not None else None
        if run_id is None:
            raise StudyError("This study has no generation run.")
        runs.resume(studio, run_id)
        return f"Generation run {run_id} resumed; it continues where it stopped.", selected, ""

    return _guarded(studio, selected, action)


def csv_file(studio: Studio, selected: int | None) -> str | None:
    """The selected study's results as a CSV file for download (None without a study)."""
    if selected is None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="study-results-"))
    path = folder / f"study-{selected}-results.csv"
    path.write_text(ss.results_csv(studio, selected))
    return str(path)


def effect_choices(studio: Studio) -> list[str]:
    return [e.name for e in library.list_effects(studio)]


# ---------------------------------------------------------------------------------------------
# Layout and wiring.


def build(studio: Studio, app: gr.Blocks) -> None:
    """The tab's components and events (call inside ``with gr.Tab(...)``)."""
    gr.Markdown(
        "A **blind side-by-side study** (appendix 10): voters see the original and each system's edit in a "
        "random order, labelled A, B, C, ..., and pick the best for visual quality, consistency and style "
        "alignment. Voters open their own link on the voter pages (`python -m studio study serve`)."
    )
    with gr.Accordion("Create a study", open=False):
        with gr.Row():
            name = gr.Textbox(label="Name", elem_id="study-name")
            n_items = gr.Number(label="Items", value=20, precision=0, elem_id="study-items")
            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="study-seed")
        effects = gr.Dropdown(choices=[], multiselect=True, label="Effects", elem_id="study-effects")
        systems = gr.CheckboxGroup(
            choices=list(ss.PAPER_SYSTEMS),
            value=list(ss.PAPER_SYSTEMS),
            label="Systems",
            elem_id="study-systems",
        )
        extra = gr.Textbox(
            label="More systems (one a line: lora:ID or a .safetensors path, optionally LABEL=...)",
            lines=2,
            elem_id="study-extra",
        )
        with gr.Row():
            student = gr.Textbox(
                label="Ours: student LoRA id or file (empty: newest)", elem_id="study-student"
            )
            lightning = gr.Textbox(
                label="Lightning LoRA id or file (empty: newest)", elem_id="study-lightning"
            )
            fm = gr.Textbox(label="FM all-in-1 LoRA id or file (empty: newest)", elem_id="study-fm")
        sources = gr.File(
            label="Source images (empty: EffectBench-mini test images)",
            file_count="multiple",
            file_types=["image"],
            elem_id="study-sources",
        )
        create_btn = gr.Button("Create and generate images", variant="primary", elem_id="study-create")
    notice = gr.Markdown(elem_id="study-notice")
    error = gr.Textbox(label="Problem", lines=3, interactive=False, visible=False, elem_id="study-error")
    studies = gr.Dataframe(
        value=pd.DataFrame(columns=STUDY_HEADERS), interactive=False, label="Studies", elem_id="study-table"
    )
    with gr.Row():
        selector = gr.Dropdown(
            choices=[], value=None, label="Selected study", scale=3, elem_id="study-selector"
        )
        refresh_btn = gr.Button("Refresh", scale=1, elem_id="study-refresh")
    detail = gr.Markdown(elem_id="study-detail")
    with gr.Row():
        open_btn = gr.Button("Open voting", elem_id="study-open")
        close_btn = gr.Button("Close voting", elem_id="study-close")
        stop_btn = gr.Button("Stop generation", elem_id="study-stop")
        resume_btn = gr.Button("Resume generation", elem_id="study-resume")
    with gr.Accordion("Voters", open=True):
        with gr.Row():
            voter_names = gr.Textbox(
                label="New voters (names, one a line)", lines=2, scale=3, elem_id="study-voter-names"
            )
            base_url = gr.Textbox(
                label="Voter pages address", value=DEFAULT_VOTER_URL, scale=2, elem_id="study-url"
            )
        add_btn = gr.Button("Add voters", elem_id="study-add-voters")
        links = gr.Textbox(
            label="Voter links (shown once: copy them now)",
            lines=3,
            interactive=False,
            buttons=["copy"],
            elem_id="study-links",
        )
        voters = gr.Dataframe(
            value=pd.DataFrame(columns=VOTER_HEADERS),
            interactive=False,
            label="Progress",
            elem_id="study-voters",
        )
    with gr.Accordion("Results", open=True):
        chart = gr.Image(label="Preference share", type="pil", interactive=False, elem_id="study-chart")
        results = gr.Dataframe(
            value=pd.DataFrame(columns=RESULT_HEADERS),
            interactive=False,
            label="Counts",
            elem_id="study-results",
        )
        csv_btn = gr.Button("Download CSV", elem_id="study-csv-button")
        csv_out = gr.File(label="CSV", interactive=False, elem_id="study-csv")
    timer = gr.Timer(5.0)

    outputs = [notice, error, studies, selector, detail, voters, links, chart, results]

    def out(view: View) -> tuple:
        return view.updates()

    def on_load():
        return (*out(render(studio, None)), gr.update(choices=effect_choices(studio)))

    def on_tick(sel):
        # only the live parts: keep any notice, links and error on screen
        view = render(studio, sel)
        return view.detail, view.voters, view.chart, view.results

    app.load(on_load, outputs=[*outputs, effects])
    create_btn.click(
        lambda *a: out(create(studio, *a)),
        [name, effects, systems, extra, n_items, seed, sources, student, lightning, fm],
        outputs,
        concurrency_limit=1,
    )
    refresh_btn.click(
        lambda sel: (*out(render(studio, sel)), gr.update(choices=effect_choices(studio))),
        selector,
        [*outputs, effects],
    )
    selector.input(lambda sel: out(render(studio, sel)), selector, outputs)
    open_btn.click(lambda sel: out(set_open(studio, sel, True)), selector, outputs)
    close_btn.click(lambda sel: out(set_open(studio, sel, False)), selector, outputs)
    stop_btn.click(lambda sel: out(stop_generation(studio, sel)), selector, outputs)
    resume_btn.click(lambda sel: out(resume_generation(studio, sel)), selector, outputs)
    add_btn.click(
        lambda sel, n, u: out(add_voters(studio, sel, n, u)), [selector, voter_names, base_url], outputs
    )
    csv_btn.click(lambda sel: csv_file(studio, sel), selector, csv_out)
    timer.tick(on_tick, selector, [detail, voters, chart, results])
