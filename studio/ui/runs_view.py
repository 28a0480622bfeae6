"""Run-progress pieces the Teachers and Distill tabs share: a progress bar, curves, sample grids,
history tables, and the re-attachment of runs that outlived the UI.

Plain functions from ``studio.runs`` views to HTML, DataFrames and images, so tabs and tests call the
same code (plus ``on_tab_selected``, one wiring helper). A run is its own process; the UI only reads
its row.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from gradio.context import Context
from PIL import Image

from storage import BlobNotFoundError, BlobStoreError, RunStatus

from .. import runs
from ..context import Studio
from ..runs import RunView

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often an open tab re-reads its run (gr.Timer)
HISTORY_HEADERS = ["run", "name", "status", "progress", "step", "loss", "started", "note"]
ACTIVE_STATUSES = {s.value for s in runs.ACTIVE}
SAMPLES_SEEN = "ui-samples.json"  # sample grids the UI saw while polling: [{"step", "sha"}, ...]
STATUS_WORDS = {
    "queued": "Queued",
    "running": "Running",
    "stopping": "Stopping (saving a checkpoint)",
    "stopped": "Stopped",
    "succeeded": "Done",
    "failed": "Failed",
}
STATUS_COLOURS = {
    "queued": "#6b7280",
    "running": "#2563eb",
    "stopping": "#d97706",
    "stopped": "#d97706",
    "succeeded": "#16a34a",
    "failed": "#dc2626",
}


class SettingsError(ValueError):
    """A setting the curator typed that cannot be used; the message says how to write it."""


def parse_extra(text: str | None) -> dict[str, Any]:
    """A "more settings" box: a JSON object of setting -> value, or empty."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SettingsError(
            f'"More settings" is not valid JSON ({e.msg} at character {e.pos}); write it like {{"batch": 4}}.'
        ) from None
    if not isinstance(value, dict):
        raise SettingsError('"More settings" must be a JSON object, like {"batch": 4}.')
    return value


def format_eta(seconds: float | None) -> str:
    """'1 h 02 min', '3 min 05 s', '12 s', or '' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def _number(v: object) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return ""
    return f"{v:.4g}"


def is_active(view: RunView | None) -> bool:
    return view is not None and view.status in ACTIVE_STATUSES


def queue_note(view: RunView) -> str:
    """'queued behind run 12' while the run waits for its device, else ''."""
    if view.status != RunStatus.QUEUED.value:
        return ""
    waiting = view.waiting_for
    return f"queued behind {waiting}" if waiting else "waiting for its worker to start"


def status_line(view: RunView, loss_keys: Iterable[str] = ("loss",)) -> str:
    """One line: status, step, losses, ETA (what a curator checks at a glance)."""
    parts = [STATUS_WORDS.get(view.status, view.status)]
    if view.total:
        parts.append(f"step {view.step} / {view.total}")
    for key in loss_keys:
        v = _number(view.metrics.get(key))
        if v:
            parts.append(f"{key} {v}")
    eta = format_eta(view.eta_s)
    if eta:
        parts.append(f"about {eta} left")
    note = queue_note(view)
    if note:
        parts.append(note)
    return " · ".join(parts)


def progress_html(view: RunView | None, loss_keys: Iterable[str] = ("loss",)) -> str:
    """A progress bar with percent, step, losses and ETA; the error for a failed run."""
    if view is None:
        return "<div class='run-progress run-none'>No run selected.</div>"
    pct = max(0.0, min(1.0, view.progress or 0.0)) * 100.0
    colour = STATUS_COLOURS.get(view.status, "#6b7280")
    title = html.escape(f"Run {view.id}" + (f" — {view.name}" if view.name else ""))
    line = html.escape(status_line(view, loss_keys))
    error = (
        f"<div class='run-error' style='color:#b91c1c;white-space:pre-wrap'>{html.escape(view.error)}</div>"
        if view.error
        else ""
    )
    return (
        f"<div class='run-progress' data-status='{html.escape(view.status)}' data-run='{view.id}'>"
        f"<div><b>{title}</b></div>"
        "<div style='background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden;margin:4px 0'>"
        f"<div class='run-bar' style='width:{pct:.1f}%;background:{colour};height:100%'></div></div>"
        f"<div class='run-line'><b class='run-percent'>{pct:.0f}%</b> · {line}</div>{error}</div>"
    )


def read_run(studio: Studio, run_id: int | None) -> RunView | None:
    """The run's current view, or None if there is no such run (deleted, or none chosen)."""
    if run_id is None:
        return None
    try:
        return runs.run_status(studio, int(run_id), log_lines=20)
    except runs.RunError:
        return None


# -- sample grids -------------------------------------------------------------------------------


def _blob_image(studio: Studio, sha: str) -> Image.Image | None:
    try:
        return Image.open(io.BytesIO(studio.blobs.read_bytes(sha, "png"))).convert("RGB")
    except (BlobNotFoundError, BlobStoreError, OSError):
        log.warning("sample grid %s is missing from the blob store", sha)
        return None


def latest_samples(studio: Studio, view: RunView | None) -> Image.Image | None:
    """The newest sample grid the run reported (``metrics["samples_sha"]``)."""
    sha = (view.metrics if view else {}).get("samples_sha")
    return _blob_image(studio, sha) if isinstance(sha, str) and sha else None


def _seen_path(view: RunView) -> Path:
    return Path(view.run_dir) / SAMPLES_SEEN


def sample_history(studio: Studio, view: RunView | None) -> list[tuple[int, str]]:
    """Every sample grid of the run as (step, sha), oldest first.

    The run's row only keeps its newest grid, so the grids the UI has seen are remembered in the
    run's folder as it polls (a ``samples_history`` list in the metrics is used where a job keeps one).
    """
    if view is None:
        return []
    found: dict[str, int] = {}
    path = _seen_path(view)
    try:
        for item in json.loads(path.read_text()):
            found[str(item["sha"])] = int(item["step"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable %s", path)
    for item in view.metrics.get("samples_history") or []:
        if isinstance(item, dict) and item.get("sha"):
            found.setdefault(str(item["sha"]), int(item.get("step") or 0))
    sha = view.metrics.get("samples_sha")
    if isinstance(sha, str) and sha and sha not in found:
        found[sha] = int(view.metrics.get("samples_step") or view.step)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps([{"step": s, "sha": h} for h, s in found.items()]))
            tmp.replace(path)
        except OSError:  # a read-only data dir still shows the grid
            log.warning("could not remember the sample grid in %s", path)
    return sorted(((s, h) for h, s in found.items()), key=lambda x: x[0])


def sample_gallery(studio: Studio, view: RunView | None) -> list[tuple[Image.Image, str]]:
    """The run's sample grids, newest first, captioned with their step."""
    out = []
    for step, sha in reversed(sample_history(studio, view)):
        im = _blob_image(studio, sha)
        if im is not None:
            out.append((im, f"step {step}"))
    return out


# -- curves and tables ----------------------------------------------------------------------------


def curves_frame(rows: list[tuple[int, float, str]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["step", "value", "metric"])
    return df.astype({"step": "int64", "value": "float64", "metric": "object"})


def curves(studio: Studio, run_id: int | None, names: Iterable[str]) -> pd.DataFrame:
    """Long-format curve points (step, value, metric) for a gr.LinePlot; empty when nothing yet."""
    rows: list[tuple[int, float, str]] = []
    if run_id is not None:
        for name in names:
            rows += [(step, value, name) for step, value in runs.metric_series(studio, int(run_id), name)]
    return curves_frame(rows)


def _when(view: RunView) -> str:
    t = view.started_at or view.created_at
    return t.astimezone().strftime("%Y-%m-%d %H:%M") if t else ""


def history_table(views: Iterable[RunView], loss_key: str = "loss") -> pd.DataFrame:
    """Runs as table rows, newest first."""
    rows = []
    for v in views:
        note = queue_note(v) or (v.error.splitlines()[0][:120] if v.error else "")
        loss = _number(v.metrics.get(loss_key))
        rows.append([v.id, v.name, v.status, f"{(v.progress or 0) * 100:.0f}%", v.step, loss, _when(v), note])
    return pd.DataFrame(rows, columns=HISTORY_HEADERS)


def run_choices(views: Iterable[RunView]) -> list[tuple[str, int]]:
    """Dropdown choices: ('#12 distill 3 effects', 12) (the status is in the progress bar)."""
    return [(f"#{v.id} {v.name or v.kind}", v.id) for v in views]


def default_run(views: list[RunView]) -> int | None:
    """The run a tab shows first: the newest active one, else the newest."""
    active = [v for v in views if is_active(v)]
    pick = active or views
    return pick[0].id if pick else None


# -- re-attaching on start ------------------------------------------------------------------------


def reattach(studio: Studio) -> list[RunView]:
    """Notice runs whose workers died while the UI was away, and return the ones still going.

    Runs are independent processes; the tabs simply poll their rows, so "re-attaching" is reading
    which runs are active."""
    dead = runs.reconcile(studio)
    if dead:
        log.info("runs whose worker disappeared (marked failed, resumable): %s", dead)
    return [v for v in runs.list_runs(studio) if is_active(v)]


def active_runs_markdown(studio: Studio) -> str:
    """'Running now: #3 teacher warm (running, 40%) …', or '' when nothing runs."""
    active = [v for v in runs.list_runs(studio) if is_active(v)]
    if not active:
        return ""
    items = [f"#{v.id} {v.name or v.kind} ({status_line(v)})" for v in active]
    return "**Runs in progress:** " + "; ".join(items)


def on_tab_selected(fn: Callable, inputs: Sequence[gr.components.Component], outputs: Sequence) -> None:
    """Re-read a tab when the curator switches to it (other tabs change the studio meanwhile).

    Call inside the tab's builder: the enclosing ``gr.Tab`` gets the select event."""
    tab = Context.block
    if isinstance(tab, gr.Tab):
        tab.select(fn, list(inputs), list(outputs), show_progress="hidden")
