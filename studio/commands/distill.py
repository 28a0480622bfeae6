"""distill run / resume / extend / export / status / stop: CollectionLoRA distillation from the terminal."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..context import Studio
from .follow import eta_text, follow_run


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("distill", help="distil every effect's teacher into one CollectionLoRA")
    dsub = d.add_subparsers(dest="distill_command", required=True, metavar="ACTION")

    p = dsub.add_parser("run", help="queue a distillation run (every effect by default)")
    p.add_argument("--effects", nargs="+", default=None, metavar="EFFECT", help="only these effects")
    _run_options(p, default_steps="the backbone's preset, grown with the number of effects")
    p.add_argument("--name", default="", help="a label for the run")
    p.set_defaults(handler=cmd_run)

    p = dsub.add_parser("resume", help="continue a stopped or failed run from its last checkpoint")
    p.add_argument("run_id", type=int)
    p.add_argument("--wait", action="store_true", help="follow the run until it ends")
    p.set_defaults(handler=cmd_resume)

    p = dsub.add_parser("extend", help="add new effects to an existing CollectionLoRA (a short run)")
    p.add_argument(
        "--from", dest="from_run", type=int, required=True, metavar="RUN", help="the run to extend"
    )
    p.add_argument("--effects", nargs="+", required=True, metavar="EFFECT", help="the new effects")
    _run_options(p, default_steps="one effect's share of the parent run's steps per new effect")
    p.set_defaults(handler=cmd_extend)

    p = dsub.add_parser("export", help="write a run's CollectionLoRA as one .safetensors file")
    p.add_argument("run_id", type=int)
    p.add_argument("--out", type=Path, required=True, help="the file to write (*.safetensors)")
    p.add_argument(
        "--format",
        choices=("diffusers", "kohya"),
        default="diffusers",
        help="diffusers (load_lora_weights) or kohya (ComfyUI) key layout",
    )
    p.set_defaults(handler=cmd_export)

    p = dsub.add_parser("status", help="a run's progress, losses and its CollectionLoRA")
    p.add_argument("run_id", type=int)
    p.set_defaults(handler=cmd_status)

    p = dsub.add_parser("stop", help="ask a run to stop (it writes a checkpoint first)")
    p.add_argument("run_id", type=int)
    p.set_defaults(handler=cmd_stop)


def _run_options(p: argparse.ArgumentParser, default_steps: str = "the backbone's preset") -> None:
    p.add_argument("--steps", type=int, default=None, help=f"generator steps (default: {default_steps})")
    p.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any DistillConfig setting, e.g. --set p_switch=0.3 --set aop=false --set student_lora.rank=8",
    )
    p.add_argument("--wait", action="store_true", help="follow the run until it ends")


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``["a=1", "aop=false", "student_lora.rank=8"]`` -> ``{"a": 1, "aop": False, "student_lora": {"rank": 8}}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE, got '{item}'.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = {"True": True, "False": False}.get(raw, raw)
        *parents, leaf = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_settings(args.settings)
    if args.steps is not None:
        overrides["steps"] = args.steps
    return overrides


def cmd_run(args: argparse.Namespace, studio: Studio) -> int:
    from .. import distill_service

    run_id = distill_service.start_distillation(studio, args.effects, _overrides(args), args.name)
    print(f"queued distillation run {run_id}")
    return follow_run(studio, run_id) if args.wait else 0


def cmd_resume(args: argparse.Namespace, studio: Studio) -> int:
    from .. import distill_service, runs

    pid = distill_service.resume(studio, args.run_id)
    ckpt = runs.last_checkpoint(studio, args.run_id)
    where = f"from step {ckpt.step}" if ckpt else "from the beginning"
    print(f"run {args.run_id} resumed {where} (worker process {pid})")
    return follow_run(studio, args.run_id) if args.wait else 0


def cmd_extend(args: argparse.Namespace, studio: Studio) -> int:
    from .. import distill_service

    overrides = _overrides(args)
    run_id = distill_service.extend_collection(
        studio,
        args.effects,
        from_run=args.from_run,
        steps=overrides.pop("steps", None),  # none given: one effect's share of the parent's per new effect
        config_overrides=overrides,
    )
    steps = distill_service.planned_steps(studio, run_id)
    print(f"queued extension run {run_id}: run {args.from_run} + {', '.join(args.effects)} ({steps} steps)")
    return follow_run(studio, run_id) if args.wait else 0


def cmd_export(args: argparse.Namespace, studio: Studio) -> int:
    from distill.export import read_catalog

    from .. import distill_service

    path = distill_service.export(studio, args.out, run_id=args.run_id, fmt=args.format)
    cat = read_catalog(path)
    print(
        f"wrote {path} ({args.format} layout, rank {cat.rank}, alpha {cat.alpha:g}, "
        f"{path.stat().st_size / 1e6:.1f} MB, {cat.student_steps} steps, {len(cat.entries)} effects)"
    )
    for e in cat.entries:
        print(f"  {e.name}\t{e.prompt}")
    return 0


def cmd_status(args: argparse.Namespace, studio: Studio) -> int:
    from .. import distill_service

    v = distill_service.status(studio, args.run_id)
    print(f"run {v.id} ({v.kind}) {v.name}".rstrip())
    print(f"status:   {v.status}, step {v.step}/{v.total or '?'} ({v.progress:.0%}), eta {eta_text(v.eta_s)}")
    losses = {k: x for k, x in v.metrics.items() if isinstance(x, int | float) and not k.startswith("eta")}
    if losses:
        print("metrics:  " + ", ".join(f"{k} {x:.4g}" for k, x in sorted(losses.items())))
    if v.checkpoint:
        print(f"checkpoint: step {v.checkpoint.step} ({v.checkpoint.path})")
    if v.error:
        print(f"error:    {v.error}")
    lora = distill_service.student_lora(studio, v.id)
    if lora is not None:
        effects = (lora.meta or {}).get("effects", [])
        print(
            f"student:  LoRA file #{lora.id}, rank {lora.rank}, {lora.bytes / 1e6:.1f} MB, "
            f"{len(effects)} effects: {', '.join(effects)}"
        )
    return 0


def cmd_stop(args: argparse.Namespace, studio: Studio) -> int:
    from .. import distill_service

    status = distill_service.stop(studio, args.run_id)
    print(
        f"run {args.run_id}: {'stop requested; it checkpoints and stops' if status == 'stopping' else status}"
    )
    return 0
