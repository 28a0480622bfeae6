"""The Evaluate tab: the committed bench results (an overview of the full runs, then any results/*.md
table with its run's plots) and a quick check of a finished student on a few EffectBench-mini test sources.

The quick evaluation is short by construction (the student's 8 NFE on 2-4 sources per category per
effect: seconds on the tiny backbone), so it runs in the studio process through
``preview_service.quick_evaluate``, with a progress bar; the full bench is ``bench/reproduce.py``.
"""

from __future__ import annotations

import json
import logging
import math
import re
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


OVERVIEW_HEADERS = [
    "run",
    "effects",
    "Base (80 NFE)",
    "FM+Lightning (8 NFE)",
    "Ours (8 NFE)",
    "Ours - Base (dB)",
]


def _natural(name: str) -> list:
    """Sort key: numbers by value (10fx7 before 10fx10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _tag(stem: str) -> str:
    """What a result file is about: ``table1_10fx25`` and ``grid_10fx25`` are both run ``10fx25``."""
    return stem.split("_", 1)[1] if "_" in stem else stem


@dataclass
class Results:
    """The committed bench results: one overview row per full run, and every file to read on its own."""

    overview: pd.DataFrame  # a row per results/table1_<tag>.json: PSNR / BCR of each system
    files: list[str]  # results/*.md, then plots no table claims, naturally sorted
    message: str  # what to tell a curator when there is nothing to show


def _cell(systems: dict, name: str) -> str:
    m = systems.get(name)
    return f"{m['psnr']:.2f} / {m['bcr']:.3f}" if m else ""


def _overview_row(path: Path) -> list | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        systems = d["systems"]
        gap = d.get("psnr_vs_base", {}).get("Ours")
        return [
            d.get("tag", _tag(path.stem)),
            len(d.get("effects", [])),
            _cell(systems, "Base"),
            _cell(systems, "FM+Lightning"),
            _cell(systems, "Ours"),
            f"{gap['mean']:+.2f} [{gap['low']:+.2f}, {gap['high']:+.2f}]" if gap else "",
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a half-written or foreign JSON is left out of the overview; its .md still reads


def read_results(root: Path = RESULTS_DIR) -> Results:
    """The overview of the bench's full runs and the list of result files under ``root``."""
    root = Path(root)
    if not root.is_dir():
        return Results(pd.DataFrame(columns=OVERVIEW_HEADERS), [], _nothing(root))
    rows = [r for p in root.glob("table1_*.json") if (r := _overview_row(p)) is not None]
    rows.sort(key=lambda r: (r[1], _natural(str(r[0]))))
    mds = sorted((p.name for p in root.glob("*.md")), key=_natural)
    claimed = {_tag(Path(m).stem) for m in mds}
    loose = sorted((p.name for p in root.glob("*.png") if _tag(p.stem) not in claimed), key=_natural)
    files = mds + loose
    return Results(
        pd.DataFrame(rows, columns=OVERVIEW_HEADERS),
        files,
        "" if files else _nothing(root),
    )


def _nothing(root: Path) -> str:
    return (
        f"No bench results under `{root}` yet: `python bench/reproduce.py` writes the tables and plots there."
    )


def read_result(name: str | None, root: Path = RESULTS_DIR) -> tuple[str, list[tuple[str, str]]]:
    """One result file as (markdown, plots): a table with the plots of the same run (``grid_<tag>.png``
    beside ``table1_<tag>.md``), or a plot on its own."""
    root = Path(root)
    if not name:
        return "Pick a result file to read it.", []
    path = root / name
    if path.parent != root or not path.is_file():
        return f"There is no result file `results/{name}`.", []
    if path.suffix == ".png":
        return f"`results/{name}`", [(str(path), path.stem.replace("_", " "))]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        text = f"(could not be read: {e})"
    plots = sorted(
        (p for p in root.glob("*.png") if _tag(p.stem) == _tag(path.stem)), key=lambda p: _natural(p.name)
    )
    return f"`results/{name}`\n\n{text}", [(str(p), p.stem.replace("_", " ")) for p in plots]


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
    gr.Markdown(
        "### Bench results (committed under `results/`)\n"
        "Each full run of `bench/reproduce.py`: PSNR (dB) / bad-case rate of each system against the exact "
        "ground truth, and Ours' PSNR difference to the 80-NFE teachers, paired per image (95% interval)."
    )
    overview = gr.Dataframe(
        value=pd.DataFrame(columns=OVERVIEW_HEADERS),
        headers=OVERVIEW_HEADERS,
        interactive=False,
        label="Full bench runs",
        elem_id="evaluate-overview",
    )
    with gr.Row():
        file_in = gr.Dropdown(choices=[], value=None, label="Read a result file", elem_id="evaluate-file")
        refresh_btn = gr.Button("Reload results", size="sm", elem_id="evaluate-refresh")
    tables = gr.Markdown(elem_id="evaluate-results")
    plots = gr.Gallery(
        label="Plots and grids", columns=2, height="auto", object_fit="contain", elem_id="evaluate-plots"
    )

    def results_view(chosen: str | None) -> tuple:
        r = read_results()
        chosen = chosen if chosen in r.files else None
        text, images = read_result(chosen) if r.files else (r.message, [])
        return r.overview, gr.update(choices=r.files, value=chosen), text, images

    def on_load():
        choices = student_choices(studio)
        return gr.update(choices=choices, value=choices[0][1] if choices else None), *results_view(None)

    def on_eval(run_id, n, progress=gr.Progress()):
        def report(i: int, total: int) -> None:
            progress(i / total if total else 1.0, desc=f"effect {i} of {total}")

        return quick_eval(studio, run_id, n, report).updates()

    def on_select(run_id):
        choices = student_choices(studio)
        ids = [r for _, r in choices]
        return gr.update(choices=choices, value=run_id if run_id in ids else (ids[0] if ids else None))

    results_outputs = [overview, file_in, tables, plots]
    app.load(on_load, outputs=[run_in, *results_outputs])
    runs_view.on_tab_selected(on_select, [run_in], [run_in])
    refresh_btn.click(results_view, file_in, results_outputs)
    file_in.input(lambda name: read_result(name), file_in, [tables, plots])
    go_btn.click(on_eval, [run_in, n_in], [table, summary, error], concurrency_limit=1)
