"""The background job that trains an effect's teacher LoRA (run kind "teacher").

Run config: ``effect`` (name), ``backbone`` and ``model_path`` (default: the studio's), ``train``
(a ``LoraTrainConfig`` as a dict; default: the backbone's preset). Checkpoints go to
``<run dir>/checkpoints``; a resumed run continues from the last one.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from distill.backbones.registry import load_backbone
from distill.lora_training import LoraTrainConfig

from . import teachers_service
from .context import Studio
from .runs import RunContext, register_kind


def run_teacher(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.config
    backbone_name = cfg.get("backbone") or ctx.studio.config.backbone
    model_path = cfg.get("model_path") or ctx.studio.config.model_path
    # The teacher is registered for the backbone it was trained on, whatever the opener's default.
    studio = Studio(
        replace(ctx.studio.config, backbone=backbone_name, model_path=model_path),
        ctx.studio.engine,
        ctx.studio.sessions,
        ctx.studio.blobs,
    )
    train = (
        LoraTrainConfig.from_dict(cfg["train"])
        if cfg.get("train")
        else LoraTrainConfig.for_backbone(backbone_name)
    )
    backbone = load_backbone(backbone_name, model_path, device=ctx.device)
    out = teachers_service.train_teacher_now(
        studio,
        cfg["effect"],
        train,
        ctx.reporter,
        backbone=backbone,
        run_id=ctx.run_id,
        resume_from=ctx.resume_from,
        checkpoint_dir=ctx.run_dir / "checkpoints",
    )
    metrics: dict[str, Any] = {
        "final_loss": out.result.final_loss,
        "steps": out.result.steps,
        "stopped": out.result.stopped,
    }
    if out.lora is not None:
        metrics["lora_file_id"] = out.lora.id
    return metrics


register_kind("teacher", run_teacher)
