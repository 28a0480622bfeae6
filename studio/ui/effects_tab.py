"""The Effects tab: upload pair sets, list effects, review pairs, rename, prompt, drop pairs, delete.

Handlers are plain functions of the studio and the inputs; each returns the whole view (``View``)
re-read from the database, so the page always shows what is stored. ``build`` only wires them to
Gradio components.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from storage import BlobNotFoundError, BlobStoreError, Category, DatabaseError

from .. import bank, library, preview_service
from ..bank import BankError
from ..context import Studio
from ..library import LibraryError
from ..pairsets import PairSetError
from . import services
from .common import error_view, guarded

log = logging.getLogger(__name__)

TABLE_HEADERS = ["name", "pairs", "trigger", "teacher prompt"]
CATEGORIES = [("(none)", ""), *((c.value, c.value) for c in Category)]
# Errors whose text is written for curators; anything else is a bug and goes to the log.
CURATOR_ERRORS = (PairSetError, LibraryError, BankError, BlobStoreError, BlobNotFoundError, DatabaseError)
DEMO_LABEL = "Load the demo (EffectBench-mini)"


@dataclass
class View:
    """Everything the tab shows, in the order of ``build``'s ``view_outputs``."""

    notice: str
    error: str
    table: pd.DataFrame
    names: list[str]
    selected: str | None
    demo_visible: bool
    summary: str
    gallery: list[tuple]
    pair_ids: list[int]
    teacher_prompt: str
    pair_count: int

    def updates(self) -> tuple:
        """Values for ``view_outputs``: the library part, then ``detail_updates``."""
        return (
            self.notice,
            gr.update(value=self.error, visible=bool(self.error)),
            self.table,
            gr.update(choices=self.names, value=self.selected),
            gr.update(visible=self.demo_visible),
            *self.detail_updates(),
        )

    def detail_updates(self) -> tuple:
        """Values for ``detail_outputs``: the selected effect's panel."""
        return (
            gr.update(visible=self.selected is not None),
            self.summary,
            self.gallery,
            self.pair_ids,
            self.teacher_prompt,
            self.selected or "",
            gr.update(visible=False),  # the delete confirmation closes on every refresh
        )


def render(studio: Studio, selected: str | None, notice: str = "", error: str = "") -> View:
    """The tab's state from the database, with `selected`'s pairs when it still exists."""
    effects = library.list_effects(studio)
    table = pd.DataFrame(
        [[e.name, e.pairs, e.trigger or "", e.teacher_prompt] for e in effects], columns=TABLE_HEADERS
    )
    names = [e.name for e in effects]
    demo = not effects and services.bench_importer() is not None
    view = View(notice, error, table, names, None, demo, "", [], [], "", 0)
    chosen = next((e for e in effects if e.name == selected), None)
    if chosen is None:
        return view
    previews = services.pair_previews(studio, chosen.name)
    view.selected = chosen.name
    view.gallery = [(p.image, p.caption) for p in previews]
    view.pair_ids = [p.pair_id for p in previews]
    view.teacher_prompt = chosen.teacher_prompt
    view.pair_count = chosen.pairs
    excluded = f", {chosen.excluded} excluded" if chosen.excluded else ""
    view.summary = (
        f"### {chosen.display_name}\n"
        f"`{chosen.name}` · {chosen.category or 'no category'} · {chosen.pairs} pairs used for training{excluded}"
        + (f" · trigger `{chosen.trigger}`" if chosen.trigger else "")
    )
    return view


def _guarded(studio: Studio, selected: str | None, action: Callable[[], tuple[str, str | None]]) -> View:
    """Run `action` (returns a notice and the effect to show); errors become the error box, not a traceback."""

    def run() -> View:
        nonlocal selected
        notice, selected = action()
        return render(studio, selected, notice=notice)

    return guarded(
        run, lambda m: _render_error(studio, selected, m), CURATOR_ERRORS, log, "Effects tab action"
    )


def _render_error(studio: Studio, selected: str | None, message: str) -> View:
    return error_view(
        lambda: render(studio, selected, error=message),
        lambda: View("", message, pd.DataFrame(columns=TABLE_HEADERS), [], None, False, "", [], [], "", 0),
        log,
        "Effects tab could not re-read the library",
    )


# ---------------------------------------------------------------------------------------------
# Handlers (plain functions; tests call them directly).


def import_upload(
    studio: Studio,
    files: Sequence[str | Path] | None,
    name: str,
    teacher_prompt: str,
    category: str | None,
    selected: str | None = None,
) -> View:
    def action() -> tuple[str, str | None]:
        effect = (name or "").strip() or services.suggest_name(files)
        if not effect:
            raise LibraryError("Give the effect a name (lowercase letters, digits, '-' or '_').")
        library.check_name(effect)
        existed = any(e.name == effect for e in library.list_effects(studio))
        with tempfile.TemporaryDirectory(prefix="studio-upload-") as tmp:
            path = services.stage_upload(files, Path(tmp) / "pairs")
            res = library.import_pairset(
                studio, effect, path, teacher_prompt=(teacher_prompt or "").strip(), category=category or None
            )
        if existed:
            head = f"Added {res.pairs} new pair{'s' if res.pairs != 1 else ''} to the existing effect **{effect}**."
        else:
            head = f"Imported **{effect}** with {res.pairs} pair{'s' if res.pairs != 1 else ''}."
        return "\n".join([head, *(f"- note: {w}" for w in res.warnings)]), effect

    return _guarded(studio, selected, action)


def import_bank_upload(
    studio: Studio,
    file: str | Path | None,
    selected: str | None = None,
    on_effect: Callable[[int, int, str], None] | None = None,
) -> View:
    """Import a whole bank uploaded as one .zip (``studio.bank``): a folder per effect; ``on_effect(i, n,
    name)`` reports progress."""

    def action() -> tuple[str, str | None]:
        if not file:
            raise BankError("Upload the bank as one .zip first.")
        with tempfile.TemporaryDirectory(prefix="studio-bank-") as tmp:
            root = bank.unpack_bank_zip(Path(file), Path(tmp))
            with preview_service.locked_backbone(studio) as bb:  # the studio's one copy of the model
                result = bank.import_bank(studio, root, on_effect, backbone=bb)
        n = len(result.imported)
        lines = [
            f"Imported {n} effect{'s' if n != 1 else ''} ({len(result.teachers)} with their LoRA as teacher)"
            + (f": {', '.join(result.imported)}." if n else ".")
        ]
        lines += [f"- note: **{name}**: {note}" for name, note in result.notes]
        lines += [f"- skipped `{folder}/`: {why}" for folder, why in result.skipped]
        return "\n".join(lines), (result.imported[0] if result.imported else selected)

    return _guarded(studio, selected, action)


def select_effect(studio: Studio, name: str | None) -> View:
    return _guarded(studio, name, lambda: ("", name))


def set_excluded(studio: Studio, name: str | None, pair_id: float | None, excluded: bool) -> View:
    def action() -> tuple[str, str | None]:
        if not name:
            raise LibraryError("Select an effect first.")
        if pair_id is None:
            raise LibraryError("Click a pair in the gallery (or type its number) first.")
        library.set_pair_excluded(studio, name, int(pair_id), excluded)
        verb = "excluded from training" if excluded else "restored"
        return f"Pair #{int(pair_id)} of **{name}** {verb}.", name

    return _guarded(studio, name, action)


def rename(studio: Studio, name: str | None, new_name: str) -> View:
    def action() -> tuple[str, str | None]:
        if not name:
            raise LibraryError("Select an effect first.")
        new = (new_name or "").strip()
        if new == name:
            return "The name is unchanged.", name
        library.rename_effect(studio, name, new)
        return f"Renamed **{name}** to **{new}**.", new

    return _guarded(studio, name, action)


def save_teacher_prompt(studio: Studio, name: str | None, prompt: str) -> View:
    def action() -> tuple[str, str | None]:
        if not name:
            raise LibraryError("Select an effect first.")
        library.set_teacher_prompt(studio, name, prompt or "")
        return f"Teacher prompt of **{name}** saved.", name

    return _guarded(studio, name, action)


def ask_delete(studio: Studio, name: str | None) -> tuple[str, dict]:
    """The confirmation text and the confirmation row's visibility."""
    if not name:
        return "", gr.update(visible=False)
    try:
        e = library.get_effect(studio, name)
    except LibraryError:
        return "", gr.update(visible=False)
    total = e.pairs + e.excluded
    return (
        f"Delete **{e.name}** and its {total} pair{'s' if total != 1 else ''}? This cannot be undone.",
        gr.update(visible=True),
    )


def delete(studio: Studio, name: str | None) -> View:
    def action() -> tuple[str, str | None]:
        if not name:
            raise LibraryError("Select an effect first.")
        library.delete_effect(studio, name)
        return f"Deleted **{name}**.", None

    return _guarded(studio, name, action)


def load_demo(
    studio: Studio, progress: Callable | None = None, importer: services.BenchImporter | None = None
) -> View:
    """Import EffectBench-mini's effects; `progress` is a gr.Progress (fraction, desc=...)."""

    def action() -> tuple[str, str | None]:
        run = importer or services.bench_importer()
        if run is None:
            raise LibraryError("The EffectBench-mini demo is not available in this installation.")

        def report(i: int, n: int, what: str) -> None:
            if progress is not None:
                progress(i / n if n else 1.0, desc=what)

        done = run(studio, progress=report)
        first = done[0] if done else None
        return (
            f"Loaded the demo: {len(done)} effect{'s' if len(done) != 1 else ''} from EffectBench-mini.",
            first,
        )

    return _guarded(studio, None, action)


def pair_id_at(pair_ids: list[int], index: int | None) -> int | None:
    """The pair id behind a gallery click."""
    if index is None or not 0 <= index < len(pair_ids):
        return None
    return pair_ids[index]


# ---------------------------------------------------------------------------------------------
# Layout and wiring.


def build(studio: Studio, app: gr.Blocks) -> None:
    """The tab's components and events (call inside ``with gr.Tab(...)``)."""
    with gr.Group(visible=False, elem_id="demo-box") as demo_box:
        gr.Markdown(
            "**Your effect library is empty.** Upload a pair set below, or load the demo: "
            "EffectBench-mini's procedural effects with exact ground truth."
        )
        demo_btn = gr.Button(DEMO_LABEL, variant="primary", elem_id="demo-button")

    with gr.Accordion("Add an effect", open=True):
        files = gr.File(
            label="Pair set: a .zip, or image files named like cat_01_source.png + cat_01_target.png",
            file_count="multiple",
            file_types=[".zip", "image", ".txt"],
            elem_id="pairset-upload",
        )
        with gr.Row():
            name_in = gr.Textbox(
                label="Effect name",
                placeholder="warm-film (from the zip name if empty)",
                elem_id="effect-name",
            )
            category_in = gr.Dropdown(CATEGORIES, value="", label="Category", elem_id="effect-category")
        prompt_in = gr.Textbox(
            label="Teacher prompt",
            placeholder="The instruction the effect's LoRA was trained with, e.g. 'Give the photo a warm film look.'",
            elem_id="effect-teacher-prompt",
        )
        import_btn = gr.Button("Import pair set", variant="primary", elem_id="import-button")

    with gr.Accordion("Import a whole LoRA bank", open=False):
        gr.Markdown(
            "One .zip with a folder per effect: its pairs in `pairs/` (or `pairs.zip`), its teacher prompt in "
            "`prompt.txt`, and its existing LoRA (`.safetensors`), which becomes its teacher. Folders with a "
            "problem are skipped with the reason; effects already here are left alone. Big banks: "
            "`python -m studio import-bank FOLDER`."
        )
        bank_file = gr.File(label="Bank (.zip)", file_types=[".zip"], elem_id="bank-upload")
        bank_btn = gr.Button("Import bank", elem_id="bank-import")

    notice = gr.Markdown(elem_id="effects-notice")
    error = gr.Textbox(label="Problem", lines=3, interactive=False, visible=False, elem_id="effects-error")

    table = gr.Dataframe(
        value=pd.DataFrame(columns=TABLE_HEADERS),
        headers=TABLE_HEADERS,
        datatype=["str", "number", "str", "str"],
        interactive=False,
        wrap=True,
        label="Effects (click a row to review it)",
        elem_id="effects-table",
    )
    selector = gr.Dropdown(choices=[], value=None, label="Selected effect", elem_id="effect-selector")
    pair_ids = gr.State([])

    with gr.Column(visible=False, elem_id="effect-details") as details:
        summary = gr.Markdown(elem_id="effect-summary")
        gallery = gr.Gallery(
            label="Pairs (source | target); click one to pick it",
            columns=4,
            height="auto",
            object_fit="contain",
            format="png",
            elem_id="pairs-gallery",
        )
        with gr.Row():
            pair_in = gr.Number(value=None, label="Pair #", precision=0, elem_id="pair-id")
            exclude_btn = gr.Button("Exclude pair from training", elem_id="exclude-pair")
            restore_btn = gr.Button("Restore pair", elem_id="restore-pair")
        with gr.Row():
            teacher_box = gr.Textbox(label="Teacher prompt", scale=4, elem_id="edit-teacher-prompt")
            save_prompt_btn = gr.Button("Save prompt", scale=1, elem_id="save-prompt")
        with gr.Row():
            rename_box = gr.Textbox(label="Name", scale=4, elem_id="rename-box")
            rename_btn = gr.Button("Rename", scale=1, elem_id="rename-button")
        delete_btn = gr.Button("Delete effect…", variant="stop", elem_id="delete-button")
        with gr.Row(visible=False, elem_id="delete-confirm") as confirm_row:
            confirm_text = gr.Markdown()
            confirm_btn = gr.Button("Yes, delete it", variant="stop", elem_id="delete-confirm-button")
            cancel_btn = gr.Button("Cancel", elem_id="delete-cancel")

    detail_outputs = [details, summary, gallery, pair_ids, teacher_box, rename_box, confirm_row]
    view_outputs = [notice, error, table, selector, demo_box, *detail_outputs]

    def out(view: View) -> tuple:
        return view.updates()

    def on_import(f, n, p, c, sel):
        view = import_upload(studio, f, n, p, c, sel)
        # Keep the upload when it failed (a typo in the name should not mean uploading again).
        return (*out(view), gr.update() if view.error else None)

    def on_demo(progress=gr.Progress()):
        return out(load_demo(studio, progress))

    def on_table_select(evt: gr.SelectData):
        row = evt.row_value or []
        return row[0] if row else gr.update()

    def on_gallery_select(ids: list[int], evt: gr.SelectData):
        return pair_id_at(ids, evt.index if isinstance(evt.index, int) else None)

    app.load(lambda: out(render(studio, None)), outputs=view_outputs)
    import_btn.click(
        on_import,
        [files, name_in, prompt_in, category_in, selector],
        [*view_outputs, files],
        concurrency_limit=1,
    )
    demo_btn.click(on_demo, None, view_outputs, concurrency_limit=1)

    def on_bank(f, sel, progress=gr.Progress()):
        def report(i: int, n: int, name: str) -> None:
            progress(i / n if n else 1.0, desc=f"effect {i + 1} of {n}: {name}")

        return out(import_bank_upload(studio, f, sel, report))

    bank_btn.click(
        on_bank,
        [bank_file, selector],
        view_outputs,
        concurrency_limit=1,
    )
    table.select(on_table_select, None, selector)
    # Fires on clicks and when an action selects another effect; it leaves the notice alone.
    selector.change(
        lambda n: select_effect(studio, n).detail_updates(),
        selector,
        detail_outputs,
        trigger_mode="always_last",
    )
    gallery.select(on_gallery_select, pair_ids, pair_in)
    exclude_btn.click(lambda n, i: out(set_excluded(studio, n, i, True)), [selector, pair_in], view_outputs)
    restore_btn.click(lambda n, i: out(set_excluded(studio, n, i, False)), [selector, pair_in], view_outputs)
    save_prompt_btn.click(
        lambda n, p: out(save_teacher_prompt(studio, n, p)), [selector, teacher_box], view_outputs
    )
    rename_btn.click(lambda n, new: out(rename(studio, n, new)), [selector, rename_box], view_outputs)
    delete_btn.click(lambda n: ask_delete(studio, n), selector, [confirm_text, confirm_row])
    cancel_btn.click(lambda: gr.update(visible=False), None, confirm_row)
    confirm_btn.click(lambda n: out(delete(studio, n)), selector, view_outputs)
