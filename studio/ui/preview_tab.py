"""The Preview tab: the student of a finished distillation beside the teacher(s) and baselines.

Pick one effect, or two to compose ("A, then B"), and an image (upload one, or pick an
EffectBench-mini test source, which also shows the exact expected output). Every image says how many
network evaluations (NFE) it took and its wall time. The inference runs in the studio process through
``studio.preview_service`` (the backbone loaded once, LoRAs switched by name).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import gradio as gr
from PIL import Image

from distill.backbones.registry import teacher_cfg
from distill.serving import ServingError
from storage import BlobNotFoundError, BlobStoreError, DatabaseError

from .. import preview_service
from ..context import Studio
from ..library import LibraryError
from ..preview_service import PreviewError, PreviewResult
from . import runs_view

log = logging.getLogger(__name__)

NONE = "(none: one effect)"
CURATOR_ERRORS = (PreviewError, ServingError, LibraryError, BlobStoreError, BlobNotFoundError, DatabaseError)


@dataclass
class View:
    students: list[tuple[str, int]]
    run_id: int | None
    effects: list[str]
    effect_a: str | None
    effect_b: str | None
    gallery: list[tuple[Image.Image, str]] = field(default_factory=list)
    notes: str = ""
    error: str = ""

    def updates(self) -> tuple:
        return (
            gr.update(choices=self.students, value=self.run_id),
            gr.update(choices=self.effects, value=self.effect_a),
            gr.update(choices=[NONE, *self.effects], value=self.effect_b or NONE),
            self.gallery,
            self.notes,
            gr.update(value=self.error, visible=bool(self.error)),
        )


def _catalog_names(studio: Studio, run_id: int | None) -> list[str]:
    if run_id is None:
        return []
    lora = preview_service.student_file(studio, int(run_id))
    return preview_service.catalog_of(studio, lora).names()


def render(
    studio: Studio, run_id: int | None = None, effect_a: str | None = None, effect_b: str | None = None
) -> View:
    """The choices: finished students (newest first) and the chosen one's effects."""
    students = [
        (c.label, c.run_id) for c in preview_service.finished_students(studio) if c.run_id is not None
    ]
    ids = [r for _, r in students]
    if run_id not in ids:
        run_id = ids[0] if ids else None
    names = _catalog_names(studio, run_id)
    if effect_a not in names:
        effect_a = names[0] if names else None
    if effect_b not in names or effect_b == effect_a:
        effect_b = None
    return View(students, run_id, names, effect_a, effect_b)


def choose_run(studio: Studio, run_id: int | None) -> View:
    try:
        return render(studio, run_id)
    except CURATOR_ERRORS as e:
        return View([], None, [], None, None, error=str(e))


def source_labels() -> list[str]:
    return list(preview_service.bench_sources())


def run_preview(
    studio: Studio,
    run_id: int | None,
    effect_a: str | None,
    effect_b: str | None,
    image: Image.Image | None,
    bench_source: str | None,
    seed: float | None = 0,
) -> View:
    """Student, teacher(s) and baselines on the image (an upload wins over a bench source)."""
    b = None if effect_b in (None, "", NONE) else effect_b
    try:
        view = render(studio, run_id, effect_a, b)
        view.run_id, view.effect_a, view.effect_b = run_id, effect_a, b
        if run_id is None:
            raise PreviewError("There is no finished distillation yet: distil in the Distill tab first.")
        if not effect_a:
            raise PreviewError("Pick an effect.")
        truth = None
        if image is None:
            if not bench_source:
                raise PreviewError("Upload an image, or pick an EffectBench-mini test source.")
            scenes = preview_service.bench_sources()
            if bench_source not in scenes:
                raise PreviewError(f"Unknown test source '{bench_source}'.")
            scene = scenes[bench_source]
            image = preview_service.as_pil(scene.image)
            truth = preview_service.ground_truth([effect_a, *([b] if b else [])], scene)
        effects = [effect_a, *([b] if b else [])]
        result = preview_service.preview(
            studio, int(run_id), effects, image, seed=int(seed or 0), truth=truth
        )
        view.gallery = [(im.image, im.caption) for im in result.images]
        view.notes = notes_markdown(result, effects)
        return view
    except CURATOR_ERRORS as e:
        message = str(e)
    except Exception as e:
        log.exception("Preview failed")
        message = (
            f"Something unexpected went wrong ({type(e).__name__}); the details are in the studio's log."
        )
    try:
        view = render(studio, run_id, effect_a, b)
    except Exception:
        view = View([], None, [], None, None)
    view.error = message
    return view


def notes_markdown(result: PreviewResult, effects: list[str]) -> str:
    what = effects[0] if len(effects) == 1 else f"{effects[0]}, then {effects[1]}"
    lines = [f"**{what}**", ""]
    lines += [
        f"- {im.caption}" + (f" — prompt: `{im.prompt}`" if im.prompt else "")
        for im in result.images
        if im.nfe
    ]
    lines += [f"- {n}" for n in result.notes]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Layout and wiring.


def build(studio: Studio, app: gr.Blocks) -> None:
    """The tab's components and events (call inside ``with gr.Tab(...)``)."""
    cfg = teacher_cfg(studio.config.backbone)
    gr.Markdown(
        f"The distilled student (8 steps) beside the teacher (40 steps × CFG {cfg:g}) and baselines. "
        "Pick two effects to try a composition the student never saw in training."
    )
    run_in = gr.Dropdown(choices=[], value=None, label="Finished distillation", elem_id="preview-run")
    with gr.Row():
        a_in = gr.Dropdown(choices=[], value=None, label="Effect", elem_id="preview-effect-a")
        b_in = gr.Dropdown(
            choices=[NONE], value=NONE, label="Then apply (optional)", elem_id="preview-effect-b"
        )
    with gr.Row():
        image_in = gr.Image(
            label="Your image", type="pil", sources=["upload"], height=220, elem_id="preview-image"
        )
        with gr.Column():
            bench_in = gr.Dropdown(
                choices=[],
                value=None,
                label="…or an EffectBench-mini test source (shows the exact expected output)",
                elem_id="preview-bench",
            )
            seed_in = gr.Number(value=0, label="Seed", precision=0, elem_id="preview-seed")
            go_btn = gr.Button("Preview", variant="primary", elem_id="preview-run-button")
    error = gr.Textbox(label="Problem", lines=3, interactive=False, visible=False, elem_id="preview-error")
    gallery = gr.Gallery(
        label="Results (NFE and wall time under each image)",
        columns=5,
        height="auto",
        object_fit="contain",
        format="png",
        elem_id="preview-gallery",
    )
    notes = gr.Markdown(elem_id="preview-notes")
    outputs = [run_in, a_in, b_in, gallery, notes, error]

    def on_load():
        labels = source_labels()
        return (
            *choose_run(studio, None).updates(),
            gr.update(choices=labels, value=labels[0] if labels else None),
        )

    def on_select(run_id, a, b):
        try:
            view = render(studio, run_id, a, None if b == NONE else b)
        except CURATOR_ERRORS as e:
            view = View([], None, [], None, None, error=str(e))
        return view.updates()[:3]

    app.load(on_load, outputs=[*outputs, bench_in])
    runs_view.on_tab_selected(on_select, [run_in, a_in, b_in], [run_in, a_in, b_in])
    run_in.input(lambda r: choose_run(studio, r).updates(), run_in, outputs)
    go_btn.click(
        lambda r, a, b, im, src, sd: run_preview(studio, r, a, b, im, src, sd).updates(),
        [run_in, a_in, b_in, image_in, bench_in, seed_in],
        outputs,
        concurrency_limit=1,
    )
