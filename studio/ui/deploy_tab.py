"""The Deploy tab: export a finished student as ONE downloadable safetensors file, its effect catalog,
and what the deployment costs beside the LoRA bank it replaces (Tab. 2), measured from the files.

The file is written in the diffusers layout (``QwenImageEditPlusPipeline.load_lora_weights``) or the
kohya layout (ComfyUI's LoRA loader); either carries the catalog (trigger + student prompt per effect)
in its metadata. Sizes are read from the files on disk; the switch cost is timed on this backbone.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd
from sqlalchemy import select

from distill.export import read_catalog
from storage import BlobNotFoundError, BlobStoreError, DatabaseError, LoraFile, Run

from .. import distill_service, preview_service, teachers_service
from ..context import Studio
from ..distill_service import DistillError
from ..preview_service import PreviewError, SwitchCost
from . import runs_view

log = logging.getLogger(__name__)

FORMAT_CHOICES = [("diffusers (QwenImageEditPlusPipeline)", "diffusers"), ("ComfyUI / kohya", "kohya")]
CATALOG_HEADERS = ["effect", "trigger", "student prompt", "teacher prompt"]
COST_HEADERS = ["deployment", "files", "size", "LoRA switches per query", "time per switch"]
CURATOR_ERRORS = (DistillError, PreviewError, BlobStoreError, BlobNotFoundError, DatabaseError)
EXPORT_DIR = Path(tempfile.gettempdir()) / "collectionlora-exports"  # Gradio serves files from the temp dir


def _size(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


@dataclass
class Cost:
    teacher_files: list[Path]
    teacher_bytes: int
    student_bytes: int
    student_steps: int
    switch: SwitchCost | None = None

    @property
    def ratio(self) -> float:
        return self.teacher_bytes / self.student_bytes if self.student_bytes else float("nan")

    def table(self) -> pd.DataFrame:
        if self.switch is None:
            switches, per_switch = (
                "1 whenever the effect changes",
                "press “Measure the LoRA-bank switch cost”",
            )
        else:
            sw = self.switch
            switches = f"{sw.per_query:.2f} ({sw.switches} of {sw.queries} mixed queries)"
            per_switch = f"{sw.mean_seconds * 1000:.0f} ms mean, {sw.max_seconds * 1000:.0f} ms max"
        rows = [
            [
                "LoRA bank: one teacher per effect (+ routing, + Lightning)",
                len(self.teacher_files),
                _size(self.teacher_bytes),
                switches,
                per_switch,
            ],
            ["CollectionLoRA: one student file", 1, _size(self.student_bytes), "0 (loaded once, fused)", "0"],
        ]
        return pd.DataFrame(rows, columns=COST_HEADERS)


@dataclass
class View:
    students: list[tuple[str, int]]
    run_id: int | None
    catalog: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CATALOG_HEADERS))
    cost: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=COST_HEADERS))
    summary: str = ""
    file: str | None = None
    error: str = ""

    def updates(self) -> tuple:
        return (
            gr.update(choices=self.students, value=self.run_id),
            self.catalog,
            self.cost,
            self.summary,
            self.file,
            gr.update(value=self.error, visible=bool(self.error)),
        )


def catalog_table(path: Path) -> pd.DataFrame:
    """The effect catalog as the file itself states it."""
    cat = read_catalog(path)
    rows = [[e.name, e.trigger, e.student_prompt, e.teacher_prompt] for e in cat.entries]
    return pd.DataFrame(rows, columns=CATALOG_HEADERS)


def teacher_files(studio: Studio, run_id: int) -> dict[str, LoraFile]:
    """Effect -> the teacher LoRA file the run distilled (pinned in its config), else the effect's
    current teacher."""
    with studio.session() as s:
        run = s.get(Run, run_id)
        plans = ((run.config if run else None) or {}).get("plans") or []
        pinned = {p["name"]: int(p["teacher_lora_id"]) for p in plans if p.get("teacher_lora_id") is not None}
        rows = {r.id: r for r in s.scalars(select(LoraFile).where(LoraFile.id.in_(pinned.values())))}
    if pinned:
        return {name: rows[i] for name, i in pinned.items() if i in rows}
    lora = preview_service.student_file(studio, run_id)
    out = {}
    for name in preview_service.catalog_of(studio, lora).names():
        t = teachers_service.teacher_for(studio, name)
        if t is not None:
            out[name] = t
    return out


def cost(studio: Studio, run_id: int, student_path: Path, switch: SwitchCost | None = None) -> Cost:
    paths = [preview_service.lora_path(studio, t) for t in teacher_files(studio, run_id).values()]
    paths = [p for p in paths if p.is_file()]
    steps = read_catalog(student_path).student_steps
    return Cost(paths, sum(p.stat().st_size for p in paths), Path(student_path).stat().st_size, steps, switch)


def _summary(c: Cost) -> str:
    if not c.teacher_files:
        return "The teachers' files are no longer in the studio, so there is nothing to compare with."
    return (
        f"One {_size(c.student_bytes)} file replaces {len(c.teacher_files)} teacher LoRAs "
        f"({_size(c.teacher_bytes)}; {c.ratio:.1f}× the bytes) and the per-query LoRA switching, "
        f"at {c.student_steps} steps without a separate Lightning LoRA."
    )


def students(studio: Studio) -> list[tuple[str, int]]:
    return [(c.label, c.run_id) for c in preview_service.finished_students(studio) if c.run_id is not None]


def _view(studio: Studio, run_id: int | None) -> View:
    choices = students(studio)
    ids = [r for _, r in choices]
    if run_id not in ids:
        run_id = ids[0] if ids else None
    return View(choices, run_id)


def show(studio: Studio, run_id: int | None, switch: SwitchCost | None = None) -> View:
    """The chosen student's catalog and cost table (from its stored file)."""
    view = _view(studio, run_id)
    try:
        if view.run_id is None:
            view.summary = "No finished distillation yet: distil in the Distill tab first."
            return view
        lora = preview_service.student_file(studio, view.run_id)
        path = preview_service.lora_path(studio, lora)
        view.catalog = catalog_table(path)
        c = cost(studio, view.run_id, path, switch)
        view.cost, view.summary = c.table(), _summary(c)
    except CURATOR_ERRORS as e:
        view.error = str(e)
    except Exception as e:
        log.exception("Deploy tab failed")
        view.error = (
            f"Something unexpected went wrong ({type(e).__name__}); the details are in the studio's log."
        )
    return view


def export_file(studio: Studio, run_id: int | None, fmt: str = "diffusers") -> View:
    """Write the student as ``collectionlora-run<N>-<fmt>.safetensors`` for download."""
    view = show(studio, run_id)
    if view.error:
        return view
    try:
        if view.run_id is None:
            raise DistillError("There is no finished distillation to export yet.")
        out = EXPORT_DIR / f"run{view.run_id}" / f"collectionlora-run{view.run_id}-{fmt}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        path = distill_service.export(studio, out, run_id=view.run_id, fmt=fmt)
        view.file = str(path)
        view.catalog = catalog_table(path)  # what the exported file itself says
        c = cost(studio, view.run_id, path)
        view.cost = c.table()
        view.summary = f"Exported `{path.name}` ({fmt} layout). " + _summary(c)
    except CURATOR_ERRORS as e:
        view.error = str(e)
    except Exception as e:
        log.exception("Export failed")
        view.error = (
            f"Something unexpected went wrong ({type(e).__name__}); the details are in the studio's log."
        )
    return view


def measure_switch(studio: Studio, run_id: int | None) -> View:
    """Serve a mixed stream of queries with a LoRA bank of the run's teacher files, timing each switch."""
    try:
        if run_id is None:
            raise DistillError("Pick a finished distillation first.")
        teachers = {
            name: t
            for name, t in teacher_files(studio, int(run_id)).items()
            if preview_service.lora_path(studio, t).is_file()
        }
        switch = preview_service.measure_switch_cost(studio, teachers)
    except CURATOR_ERRORS as e:
        view = show(studio, run_id)
        view.error = view.error or str(e)
        return view
    return show(studio, run_id, switch)


# ---------------------------------------------------------------------------------------------
# Layout and wiring.


def build(studio: Studio, app: gr.Blocks) -> None:
    """The tab's components and events (call inside ``with gr.Tab(...)``)."""
    gr.Markdown(
        "Ship **one file** for every effect: a LoRA that diffusers and ComfyUI load like any other, "
        "with the effect catalog (trigger + student prompt per effect) in its metadata."
    )
    with gr.Row():
        run_in = gr.Dropdown(choices=[], value=None, label="Finished distillation", elem_id="deploy-run")
        fmt_in = gr.Radio(FORMAT_CHOICES, value="diffusers", label="Format", elem_id="deploy-format")
    with gr.Row():
        export_btn = gr.Button("Export", variant="primary", elem_id="deploy-export")
        switch_btn = gr.Button("Measure the LoRA-bank switch cost", elem_id="deploy-measure")
    error = gr.Textbox(label="Problem", lines=2, interactive=False, visible=False, elem_id="deploy-error")
    file_out = gr.File(label="CollectionLoRA file", interactive=False, elem_id="deploy-file")
    summary = gr.Markdown(elem_id="deploy-summary")
    cost_df = gr.Dataframe(
        value=pd.DataFrame(columns=COST_HEADERS),
        headers=COST_HEADERS,
        interactive=False,
        wrap=True,
        label="Deployment cost (measured from the files)",
        elem_id="deploy-cost",
    )
    catalog_df = gr.Dataframe(
        value=pd.DataFrame(columns=CATALOG_HEADERS),
        headers=CATALOG_HEADERS,
        interactive=False,
        wrap=True,
        label="Effect catalog (in the file's metadata)",
        elem_id="deploy-catalog",
    )
    outputs = [run_in, catalog_df, cost_df, summary, file_out, error]

    app.load(lambda: show(studio, None).updates(), outputs=outputs)
    runs_view.on_tab_selected(lambda r: show(studio, r).updates()[:4], [run_in], outputs[:4])
    run_in.input(lambda r: show(studio, r).updates(), run_in, outputs)
    export_btn.click(
        lambda r, f: export_file(studio, r, f).updates(), [run_in, fmt_in], outputs, concurrency_limit=1
    )
    switch_btn.click(lambda r: measure_switch(studio, r).updates(), run_in, outputs, concurrency_limit=1)
