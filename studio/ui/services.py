"""Small helpers the UI needs on top of ``studio.library``: staging uploads, pair previews, the demo.

No Gradio here: plain functions over the studio, so they are testable and reusable.
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import library
from ..context import Studio
from ..library import LibraryError
from ..thumbnails import contact_row

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]
BenchImporter = Callable[..., list[str]]


def stage_upload(files: Sequence[str | Path] | None, folder: Path) -> Path:
    """The path to import from: a single uploaded .zip as it is, or image/caption files copied into
    `folder` under their own names (so `cat_source.png` still pairs with `cat_target.png`)."""
    paths = [Path(f) for f in files or []]
    if not paths:
        raise LibraryError(
            "No files uploaded: drop a .zip of the pair set, or the image files themselves "
            "(named like cat_01_source.png and cat_01_target.png)."
        )
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    if zips and len(paths) > 1:
        raise LibraryError(
            "Upload either one .zip or loose image files, not several zips or a zip with images."
        )
    if zips:
        return zips[0]
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for p in paths:
        if p.name.lower() in seen:
            raise LibraryError(f"Two uploaded files are both called {p.name}: rename one and upload again.")
        seen.add(p.name.lower())
        shutil.copyfile(p, folder / p.name)
    return folder


def suggest_name(files: Sequence[str | Path] | None) -> str:
    """An effect name from an uploaded zip's file name ('Warm Film.zip' -> 'warm-film'), or ''."""
    zips = [Path(f) for f in files or [] if Path(f).suffix.lower() == ".zip"]
    return library.slugify(zips[0].stem) if len(zips) == 1 else ""


@dataclass
class PairPreview:
    pair_id: int
    image: Image.Image  # source | target side by side
    caption: str
    excluded: bool


def pair_previews(studio: Studio, name: str) -> list[PairPreview]:
    """Every pair of an effect (excluded ones too, marked) as a source|target thumbnail row."""
    out = []
    for p in library.effect_pairs(studio, name, include_excluded=True):
        src_sha, tgt_sha = p.thumb_source_sha or p.source_sha, p.thumb_target_sha or p.target_sha
        with (
            Image.open(studio.blobs.path(src_sha, "png")) as s,
            Image.open(studio.blobs.path(tgt_sha, "png")) as t,
        ):
            row = Image.open(io.BytesIO(contact_row([s, t], size=128))).convert("RGB")
        if p.excluded:  # faded, so dropped pairs stand out in the grid
            row = Image.blend(row, Image.new("RGB", row.size, (255, 255, 255)), 0.65)
        label = p.original_name or p.source_sha[:12]
        out.append(
            PairPreview(p.id, row, f"#{p.id} {label}" + (" (excluded)" if p.excluded else ""), p.excluded)
        )
    return out


def bench_importer() -> BenchImporter | None:
    """``studio.bench_service.import_bench`` when EffectBench-mini can be loaded here, else None."""
    try:
        from .. import bench_service
    except ImportError as e:  # the bench's generators are optional for the UI
        log.debug("EffectBench-mini demo unavailable: %s", e)
        return None
    return bench_service.import_bench
