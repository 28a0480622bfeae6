"""The background job of run kind "study_gen": generate a user study's candidate images.

Run config: ``{"study_id": ID}``; what to generate is pinned in the study's own config (see
``study_service.create_study``). Finished (system, effect) chunks are recorded in
``<run dir>/generated.json``, so a resumed run only makes what is still missing.
"""

from __future__ import annotations

from typing import Any

from . import study_service
from .runs import RunContext, register_kind


def run_study_gen(ctx: RunContext) -> dict[str, Any]:
    out = study_service.generate(
        ctx.studio,
        int(ctx.config["study_id"]),
        ctx.reporter,
        work_dir=ctx.run_dir,
        device=ctx.device,
    )
    return {"items": out.items, "images": out.images, "stopped": out.stopped}


register_kind(study_service.RUN_KIND, run_study_gen)
