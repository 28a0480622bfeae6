"""The Prompts tab (AOP): trigger words, student prompts and the trigger similarity matrix.

As in the Effects tab, handlers are plain functions of the studio and the inputs that return the
whole view (``View``) re-read from the database; ``build`` only wires them to Gradio components.
The heatmap is drawn with PIL (no plotting library needed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from distill.prompts import PromptWriterConfig, VLMError
from distill.prompts.triggers import EmbedFn
from storage import BlobNotFoundError, BlobStoreError, DatabaseError

from .. import prompts_service as ps
from ..context import Studio
from ..library import LibraryError
from ..prompts_service import PromptsError
from .common import error_view, guarded

log = logging.getLogger(__name__)

TABLE_HEADERS = ["effect", "trigger", "student prompt", "written by", "updated"]
# Errors whose text is written for curators; anything else is a bug and goes to the log.
CURATOR_ERRORS = (PromptsError, LibraryError, VLMError, BlobStoreError, BlobNotFoundError, DatabaseError)
GENERATE_LABEL = "Generate missing prompts"


@dataclass
class View:
    """Everything the tab shows, in the order of ``build``'s outputs."""

    notice: str
    error: str
    table: pd.DataFrame
    names: list[str]
    selected: str | None
    detail: str
    trigger: str
    student: str
    heatmap: Image.Image | None
    matrix_text: str
    writer: str

    def updates(self) -> tuple:
        return (
            self.notice,
            gr.update(value=self.error, visible=bool(self.error)),
            self.table,
            gr.update(choices=self.names, value=self.selected),
            self.writer,
            self.heatmap,
            self.matrix_text,
            *self.detail_updates(),
        )

    def detail_updates(self) -> tuple:
        return (gr.update(visible=self.selected is not None), self.detail, self.trigger, self.student)


# ---------------------------------------------------------------------------------------------
# The heatmap.

_NEG = np.array([49, 104, 189], dtype=np.float32)  # dissimilar (cosine -1)
_MID = np.array([247, 247, 247], dtype=np.float32)  # unrelated (0)
_POS = np.array([200, 40, 40], dtype=np.float32)  # same direction (+1)


def _colour(v: float) -> tuple[int, int, int]:
    v = float(np.clip(v, -1.0, 1.0))
    rgb = _MID + (_POS - _MID) * v if v >= 0 else _MID + (_NEG - _MID) * -v
    return tuple(int(c) for c in rgb)  # type: ignore[return-value]


def heatmap_layout(names: list[str]) -> tuple[int, int, int]:
    """Where ``heatmap_image`` puts the grid: (left edge, top edge, cell side) in pixels."""
    font = ImageFont.load_default(size=11)
    label_w = max((int(font.getlength(f"{i + 1} {nm[:28]}")) for i, nm in enumerate(names)), default=0) + 10
    return label_w, 20, int(np.clip(520 // max(len(names), 1), 10, 48))


def heatmap_image(names: list[str], matrix: np.ndarray, threshold: float) -> Image.Image:
    """The trigger cosine matrix as a picture: blue dissimilar, white unrelated, red similar; pairs
    above ``threshold`` get a black outline. Rows are labelled "i name", columns "i"."""
    n = len(names)
    font = ImageFont.load_default(size=11)
    labels = [f"{i + 1} {nm[:28]}" for i, nm in enumerate(names)]
    label_w, top, cell = heatmap_layout(names)
    pad = 8
    legend_h = 22
    width = label_w + n * cell + pad
    height = top + n * cell + pad + legend_h
    img = Image.new("RGB", (max(width, 320), height), "white")
    draw = ImageDraw.Draw(img)
    for j in range(n):
        x = label_w + j * cell + cell // 2
        draw.text((x, top - 4), str(j + 1), fill="black", font=font, anchor="ms")
    for i in range(n):
        y0 = top + i * cell
        draw.text((4, y0 + cell // 2), labels[i], fill="black", font=font, anchor="lm")
        for j in range(n):
            x0 = label_w + j * cell
            box = (x0, y0, x0 + cell - 1, y0 + cell - 1)
            if i == j:
                draw.rectangle(box, fill=(200, 200, 200))
                continue
            v = float(matrix[i, j])
            draw.rectangle(box, fill=_colour(v))
            if v > threshold:
                draw.rectangle(box, outline="black", width=2)
            if cell >= 30:
                draw.text((x0 + cell // 2, y0 + cell // 2), f"{v:.2f}", fill="black", font=font, anchor="mm")
    y = top + n * cell + pad
    for k in range(101):  # the colour scale, -1 .. 1
        draw.rectangle((4 + 2 * k, y, 5 + 2 * k, y + 8), fill=_colour(-1 + k / 50))
    draw.text((4, y + 10), "-1", fill="black", font=font)
    draw.text((200, y + 10), "+1", fill="black", font=font, anchor="ra")
    draw.text((212, y), f"outlined: above {threshold:.2f}", fill="black", font=font)
    return img


def matrix_view(studio: Studio, rows: list[ps.PromptRow]) -> tuple[Image.Image | None, str]:
    stored = ps.stored_matrix(studio)
    if stored is None:
        return None, "The trigger words have not been checked yet: press **Check triggers**."
    worst = stored.max_offdiag
    lines = [f"Measured in the {stored.encoder} on {stored.checked_at}."]
    if worst is None:
        lines.append("Fewer than two triggers: nothing to compare yet.")
    elif stored.ok:
        lines.append(f"**Pass**: highest similarity {worst:.2f}, limit {stored.threshold:.2f}.")
    else:
        lines.append(
            f"**Fail**: highest similarity {worst:.2f} is above the limit {stored.threshold:.2f}; "
            "the student may mix these effects up. Give one of each pair a new trigger:"
        )
        for a, b, c in stored.failing_pairs()[:10]:
            lines.append(f"- {a} `{stored.triggers[a]}` and {b} `{stored.triggers[b]}`: {c:.2f}")
    if not stored.is_current(rows):
        lines.append("_Triggers changed since this check: press **Check triggers** to measure again._")
    return heatmap_image(stored.names, stored.matrix, stored.threshold), "\n\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Rendering and handlers (plain functions; tests call them directly).


def writer_line() -> str:
    try:
        return f"Student prompts are written by {ps.describe_writer(ps.writer_config_from_env())}."
    except PromptsError as e:
        return f"The prompt writer is misconfigured: {e}"


def _detail(row: ps.PromptRow) -> str:
    edited = (
        " · edited by a curator (kept when prompts are generated)" if row.student_edited_by_curator else ""
    )
    when = row.student_updated_at.strftime("%Y-%m-%d %H:%M UTC") if row.student_updated_at else "never"
    condition = f"`{row.condition}`" if row.condition else "_needs a trigger and a student prompt_"
    return (
        f"### {row.display_name}\n"
        f"**Teacher prompt** (the teacher keeps it): {row.teacher_prompt or '_none_'}\n\n"
        f"Trigger: {row.trigger_source or 'none yet'} · student prompt: {row.student_source or 'none yet'}"
        f"{edited} · updated {when}\n\n"
        f"**Student condition**: {condition}"
    )


def render(studio: Studio, selected: str | None, notice: str = "", error: str = "") -> View:
    rows = ps.prompt_rows(studio)
    table = pd.DataFrame(
        [
            [
                r.effect,
                r.trigger or "",
                r.student_prompt or "",
                (r.student_source or "") + (" (edited)" if r.student_edited_by_curator else ""),
                r.student_updated_at.strftime("%Y-%m-%d %H:%M") if r.student_updated_at else "",
            ]
            for r in rows
        ],
        columns=TABLE_HEADERS,
    )
    heatmap, matrix_text = matrix_view(studio, rows)
    view = View(notice, error, table, [r.effect for r in rows], None, "", "", "", heatmap, matrix_text, "")
    view.writer = writer_line()
    chosen = next((r for r in rows if r.effect == selected), None)
    if chosen is not None:
        view.selected = chosen.effect
        view.detail = _detail(chosen)
        view.trigger = chosen.trigger or ""
        view.student = chosen.student_prompt or ""
    return view


def _guarded(studio: Studio, selected: str | None, action: Callable[[], tuple[str, str | None]]) -> View:
    """Run `action` (returns a notice and the effect to show); errors become the error box, not a traceback."""

    def run() -> View:
        nonlocal selected
        notice, selected = action()
        return render(studio, selected, notice=notice)

    return guarded(
        run, lambda m: _render_error(studio, selected, m), CURATOR_ERRORS, log, "Prompts tab action"
    )


def _render_error(studio: Studio, selected: str | None, message: str) -> View:
    return error_view(
        lambda: render(studio, selected, error=message),
        lambda: View("", message, pd.DataFrame(columns=TABLE_HEADERS), [], None, "", "", "", None, "", ""),
        log,
        "Prompts tab could not re-read the library",
    )


def _report(progress: Callable | None) -> ps.Progress | None:
    if progress is None:
        return None

    def report(done: int, total: int, what: str) -> None:
        progress(
            done / total if total else 1.0, desc=f"Writing the prompt of {what}" if done < total else what
        )

    return report


def _summary(results: list[ps.StudentPromptResult]) -> list[str]:
    written = [r for r in results if r.status == "written"]
    lines = [f"Wrote {len(written)} student prompt{'s' if len(written) != 1 else ''}."]
    sources = sorted({r.source for r in written if r.source})
    if sources:
        lines[0] = lines[0][:-1] + f" with {', '.join(sources)}."
    edited = [r.effect for r in results if r.status == "kept" and r.message]
    if edited:
        lines.append(f"- kept your edits of {', '.join(edited)}")
    lines += [f"- skipped {r.effect}: {r.message}" for r in results if r.status == "skipped"]
    return lines


def generate(
    studio: Studio,
    selected: str | None,
    only_missing: bool = True,
    progress: Callable | None = None,
    embed: EmbedFn | None = None,
    writer_config: PromptWriterConfig | None = None,
) -> View:
    """Draw missing triggers, then write student prompts (missing ones, or all but curator edits)."""

    def action() -> tuple[str, str | None]:
        rows = ps.prompt_rows(studio)
        if not rows:
            raise PromptsError("There are no effects yet: import a pair set in the Effects tab first.")
        lines = []
        if any(not r.trigger for r in rows):
            lines.append(ps.assign_triggers(studio, embed).report())
        results = ps.generate_student_prompts(
            studio, None, writer_config, progress=_report(progress), only_missing=only_missing
        )
        return "\n".join(_summary(results) + lines), selected

    return _guarded(studio, selected, action)


def rewrite(
    studio: Studio,
    name: str | None,
    progress: Callable | None = None,
    writer_config: PromptWriterConfig | None = None,
) -> View:
    """Write the selected effect's student prompt again, replacing a curator's edit too."""

    def action() -> tuple[str, str | None]:
        if not name:
            raise PromptsError("Select an effect first.")
        [result] = ps.generate_student_prompts(
            studio, [name], writer_config, overwrite_curator_edits=True, progress=_report(progress)
        )
        if result.status != "written":
            raise PromptsError(f"Could not write the student prompt of '{name}': {result.message}")
        return f"New student prompt of **{name}** by {result.source}.", name

    return _guarded(studio, name, action)


def select_effect(studio: Studio, name: str | None) -> View:
    return _guarded(studio, name, lambda: ("", name))


def save_student(studio: Studio, name: str | None, text: str) -> View:
    def action() -> tuple[str, str | None]:
        if not name:
            raise PromptsError("Select an effect first.")
        ps.set_student_prompt(studio, name, text or "")
        return f"Student prompt of **{name}** saved; generating prompts will keep it.", name

    return _guarded(studio, name, action)


def save_trigger(studio: Studio, name: str | None, trigger: str, embed: EmbedFn | None = None) -> View:
    def action() -> tuple[str, str | None]:
        if not name:
            raise PromptsError("Select an effect first.")
        check = ps.set_trigger(studio, name, trigger or "", embed)
        head = f"Trigger of **{name}** set to `{check.triggers[name]}`."
        if not check.ok:
            head = "⚠ " + head
        return f"{head}\n\n{check.report()}", name

    return _guarded(studio, name, action)


def check(studio: Studio, selected: str | None, embed: EmbedFn | None = None) -> View:
    """Measure all triggers again (drawing any missing ones)."""
    return _guarded(studio, selected, lambda: (ps.assign_triggers(studio, embed).report(), selected))


# ---------------------------------------------------------------------------------------------
# Layout and wiring.


def build(studio: Studio, app: gr.Blocks) -> None:
    """The tab's components and events (call inside ``with gr.Tab(...)``)."""
    gr.Markdown(
        "Each effect gets a unique **trigger word** and a descriptive **student prompt**; the distilled "
        "LoRA is conditioned on `trigger + student prompt`, while each teacher keeps its own prompt."
    )
    writer = gr.Markdown(elem_id="prompts-writer")
    with gr.Row():
        gen_btn = gr.Button(GENERATE_LABEL, variant="primary", elem_id="prompts-generate")
        all_btn = gr.Button("Rewrite all (keeps your edits)", elem_id="prompts-rewrite-all")
        check_btn = gr.Button("Check triggers", elem_id="prompts-check")
        refresh_btn = gr.Button("Refresh", elem_id="prompts-refresh")
    notice = gr.Markdown(elem_id="prompts-notice")
    error = gr.Textbox(label="Problem", lines=3, interactive=False, visible=False, elem_id="prompts-error")
    table = gr.Dataframe(
        value=pd.DataFrame(columns=TABLE_HEADERS),
        headers=TABLE_HEADERS,
        datatype=["str"] * len(TABLE_HEADERS),
        interactive=False,
        wrap=True,
        label="Prompts (click a row to edit it)",
        elem_id="prompts-table",
    )
    selector = gr.Dropdown(choices=[], value=None, label="Selected effect", elem_id="prompts-selector")
    with gr.Column(visible=False, elem_id="prompts-details") as details:
        detail = gr.Markdown(elem_id="prompts-detail")
        with gr.Row():
            trigger_box = gr.Textbox(label="Trigger word", scale=4, elem_id="prompts-trigger")
            trigger_btn = gr.Button("Save trigger", scale=1, elem_id="prompts-save-trigger")
        with gr.Row():
            student_box = gr.Textbox(label="Student prompt", lines=3, scale=4, elem_id="prompts-student")
            student_btn = gr.Button("Save student prompt", scale=1, elem_id="prompts-save-student")
        rewrite_btn = gr.Button("Rewrite with the writer (replaces your edit)", elem_id="prompts-rewrite")
    with gr.Accordion("Trigger similarity in the text encoder", open=True):
        heatmap = gr.Image(
            label="Centred cosine of trigger pairs", type="pil", interactive=False, elem_id="prompts-heatmap"
        )
        matrix_md = gr.Markdown(elem_id="prompts-matrix")

    detail_outputs = [details, detail, trigger_box, student_box]
    outputs = [notice, error, table, selector, writer, heatmap, matrix_md, *detail_outputs]

    def out(view: View) -> tuple:
        return view.updates()

    def on_generate(sel, progress=gr.Progress()):
        return out(generate(studio, sel, only_missing=True, progress=progress))

    def on_all(sel, progress=gr.Progress()):
        return out(generate(studio, sel, only_missing=False, progress=progress))

    def on_rewrite(sel, progress=gr.Progress()):
        return out(rewrite(studio, sel, progress=progress))

    def on_table_select(evt: gr.SelectData):
        row = evt.row_value or []
        return row[0] if row else gr.update()

    app.load(lambda: out(render(studio, None)), outputs=outputs)
    gen_btn.click(on_generate, selector, outputs, concurrency_limit=1)
    all_btn.click(on_all, selector, outputs, concurrency_limit=1)
    check_btn.click(lambda sel: out(check(studio, sel)), selector, outputs, concurrency_limit=1)
    refresh_btn.click(lambda sel: out(render(studio, sel)), selector, outputs)
    table.select(on_table_select, None, selector)
    selector.change(
        lambda n: select_effect(studio, n).detail_updates(),
        selector,
        detail_outputs,
        trigger_mode="always_last",
    )
    trigger_btn.click(lambda n, t: out(save_trigger(studio, n, t)), [selector, trigger_box], outputs)
    student_btn.click(lambda n, t: out(save_student(studio, n, t)), [selector, student_box], outputs)
    rewrite_btn.click(on_rewrite, selector, outputs, concurrency_limit=1)
