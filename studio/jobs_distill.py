"""The background jobs of run kinds "distill" and "extend" (see ``distill_service`` for the config).

Checkpoints go to ``<run dir>/checkpoints`` and the teachers' target cache to ``<run dir>/targets``;
a resumed run continues from the last checkpoint with the cached targets.
"""

from __future__ import annotations

from typing import Any

from . import distill_service
from .runs import RunContext, register_kind


def run_distill(ctx: RunContext) -> dict[str, Any]:
    out = distill_service.run_distillation(
        ctx.studio,
        ctx.config,
        ctx.reporter,
        work_dir=ctx.run_dir,
        run_id=ctx.run_id,
        resume_from=ctx.resume_from,
        device=ctx.device,
    )
    r = out.result
    # the last losses are already in the run's metrics (the reporter wrote them)
    metrics: dict[str, Any] = {"steps": r.steps, "stopped": r.stopped, "seconds": round(r.seconds, 1)}
    if out.lora is not None:
        metrics["lora_file_id"] = out.lora.id
    return metrics


register_kind("distill", run_distill)
register_kind("extend", run_distill)
