"""The Evaluate tab: the committed bench results (results/*.md tables, results/*.png plots and grids)
and a quick check of a finished student on a few EffectBench-mini test sources.

The quick evaluation is short by construction (the student's 8 NFE on 2-4 sources per category per
effect: seconds on the tiny backbone), so it runs in the studio process through
``preview_service.quick_evaluate``, with a progress bar; the full bench is ``bench/reproduce.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from storage import BlobNotFoundError, BlobStoreError, DatabaseError

from .. import preview_service
from ..context import Studio
from ..preview_service import PreviewError, QuickEval
from ..runs import REPO_ROOT
from . import runs_view

log = logging.getLogger(__name__)

RESULTS_DIR = REPO_ROOT / "results"
SCORE_HEADERS = ["effect", "images", "PSNR (dB)", "bad-case rate"]
CURATOR_ERRORS = (PreviewError, BlobStoreError, BlobNotFoundError, DatabaseError)


@dataclass
class Results:
    tables: str  # every results/*.md, one after another, each under its file name
    images: list[tuple[str, str]]  # (path, caption) of results/*.png


def read_results(root: Path = RESULTS_DIR) -> Results:
    """The bench's committed tables and plots (sorted by name)."""
    root = Path(root)
    mds = sorted(root.glob("*.md")) if root.is_dir() else []
    pngs = sorted(root.glob("*.png")) if root.is_dir() else []
    if not mds and not pngs:
        return Results(
            f"No bench results under `{root}` yet: `python bench/reproduce.py` writes the tables "
            "and plots there.",
            [],
        )
    parts = []
    for p in mds:
        try:
            parts.append(f"---\n#### `results/{p.name}`\n\n{p.read_text(encoding='utf-8')}")
        except (OSError, UnicodeDecodeError) as e:
            parts.append(f"---\n#### `results/{p.name}`\n\n(could not be read: {e})")
    return Results("\n\n".join(parts), [(str(p), p.stem.replace("_", " ")) for p in pngs])


def _fmt(v: float, digits: int) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def scores_table(result: QuickEval) -> pd.DataFrame:
    rows = [[s.effect, s.n, _fmt(s.psnr, 2), _fmt(s.bad_case_rate, 2)] for s in result.scores]
    return pd.DataFrame(rows, columns=SCORE_HEADERS)


def summary_markdown(result: QuickEval) -> str:
    n = sum(s.n for s in result.scores) or 1
    psnr = sum(s.psnr * s.n for s in result.scores if math.isfinite(s.psnr)) / n
    bcr = sum(s.bad_case_rate * s.n for s in result.scores if math.isfinite(s.bad_case_rate)) / n
    lines = [
        f"**Student #{result.lora_id}**: {len(result.scores)} effects × {result.sources} test sources, "
        f"{result.nfe} NFE each, {result.seconds:.1f} s in all. "
        f"Mean PSNR **{psnr:.2f} dB**, bad-case rate **{bcr:.2f}** "
        "(share of outputs nearer another effect's ground truth, or the untouched source).",
    ]
    if result.skipped:
        lines.append(
            f"Not scored (no exact ground truth, not EffectBench-mini effects): {', '.join(result.skipped)}."
        )
    return "\n\n".join(lines)


@dataclass
class EvalView:
    table: pd.DataFrame
    summary: str
    error: str

    def updates(self) -> tuple:
        return self.table, self.summary, gr.update(value=self.error, visible=bool(self.error))


def quick_eval(
    studio: Studio,
    run_id: int | None,
    n_per_category: float | None = 2,
    progress: Callable[[int, int], None] | None = None,
) -> EvalView:
    """Score the run's student on ``n_per_category`` test sources per category, every bench effect."""
    empty = pd.DataFrame(columns=SCORE_HEADERS)
    try:
        if run_id is None:
            raise PreviewError("There is no finished distillation to evaluate yet.")
        n = int(n_per_category or 0)
        if n < 1 or n > 16:
            raise PreviewError("Use 1 to 16 test sources per category.")
        result = preview_service.quick_evaluate(studio, int(run_id), n, progress=progress)
        return EvalView(scores_table(result), summary_markdown(result), "")
    except CURATOR_ERRORS as e:
        return EvalView(empty, "", str(e))
    except Exception as e:
        log.exception("Quick evaluation failed")
        return EvalView(
            empty,
            "",
            f"Something unexpected went wrong ({type(e).__name__}); the details are in the studio's log.",
        )


def student_choices(studio: Studio) -> list[tuple[str, int]]:
    return [(c.label, c.run_id) for c in preview_service.finished_students(studio) if c.run_id is not None]


# ---------------------------------------------------------------------------------------------
# Layout and wiring.


def build(studio: Studio, app: gr.Blocks) -> None:
    """The tab's components and events (call inside ``with gr.Tab(...)``)."""
    with gr.Accordion("Quick evaluation of a student", open=True):
        gr.Markdown(
            "Runs the student on a few EffectBench-mini test sources for each of its bench effects and "
            "scores them against the exact expected output."
        )
        with gr.Row():
            run_in = gr.Dropdown(
                choices=[], value=None, label="Finished distillation", elem_id="evaluate-run"
            )
            n_in = gr.Number(value=2, label="Test sources per category", precision=0, elem_id="evaluate-n")
            go_btn = gr.Button("Evaluate", variant="primary", elem_id="evaluate-button")
        error = gr.Textbox(
            label="Problem", lines=2, interactive=False, visible=False, elem_id="evaluate-error"
        )
        summary = gr.Markdown(elem_id="evaluate-summary")
        table = gr.Dataframe(
            value=pd.DataFrame(columns=SCORE_HEADERS),
            headers=SCORE_HEADERS,
            interactive=False,
            label="Per effect",
            elem_id="evaluate-table",
        )
    gr.Markdown("### Bench results (committed under `results/`)")
    refresh_btn = gr.Button("Reload results", size="sm", elem_id="evaluate-refresh")
    tables = gr.Markdown(elem_id="evaluate-results")
    plots = gr.Gallery(
        label="Plots and grids", columns=2, height="auto", object_fit="contain", elem_id="evaluate-plots"
    )

    def on_load():
        choices = student_choices(studio)
        r = read_results()
        return gr.update(choices=choices, value=choices[0][1] if choices else None), r.tables, r.images

    def on_refresh():
        r = read_results()
        return r.tables, r.images

    def on_eval(run_id, n, progress=gr.Progress()):
        def report(i: int, total: int) -> None:
            progress(i / total if total else 1.0, desc=f"effect {i} of {total}")

        return quick_eval(studio, run_id, n, report).updates()

    def on_select(run_id):
        choices = student_choices(studio)
        ids = [r for _, r in choices]
        return gr.update(choices=choices, value=run_id if run_id in ids else (ids[0] if ids else None))

    app.load(on_load, outputs=[run_in, tables, plots])
    runs_view.on_tab_selected(on_select, [run_in], [run_in])
    refresh_btn.click(on_refresh, None, [tables, plots])
    go_btn.click(on_eval, [run_in, n_in], [table, summary, error], concurrency_limit=1)
