"""teacher train / train-all / import / eval / list: effect teacher LoRAs from the terminal."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..context import Studio
from .follow import follow_run


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("teacher", help="train, import and evaluate effect teacher LoRAs")
    tsub = t.add_subparsers(dest="teacher_command", required=True, metavar="ACTION")

    p = tsub.add_parser("train", help="train an effect's teacher LoRA (a background run by default)")
    p.add_argument("effect")
    _train_options(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--wait", action="store_true", help="queue the run and follow it until it ends")
    how.add_argument(
        "--here", action="store_true", help="train in this process (no run is recorded; no background worker)"
    )
    p.set_defaults(handler=cmd_train)

    p = tsub.add_parser("train-all", help="train a teacher for every effect that has none")
    _train_options(p)
    p.add_argument(
        "--processes", type=int, default=1, help="how many effects train at once (each in its own process)"
    )
    p.set_defaults(handler=cmd_train_all)

    p = tsub.add_parser("import", help="register an existing LoRA file (.safetensors) as an effect's teacher")
    p.add_argument("effect")
    p.add_argument("file", type=Path)
    p.add_argument("--prompt", default=None, help="the instruction the LoRA was trained with")
    p.set_defaults(handler=cmd_import)

    p = tsub.add_parser("eval", help="an effect's teacher vs the base model, against the ground truth")
    p.add_argument("effect")
    p.add_argument("--n", type=int, default=8, help="test sources per category (bench effects)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cfg", type=float, default=None, help="true CFG (default: the backbone's teacher CFG)")
    p.set_defaults(handler=cmd_eval)

    p = tsub.add_parser("list", help="every effect and its teacher")
    p.set_defaults(handler=cmd_list)


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the backbone's preset)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (alpha follows it)")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument(
        "--mirror",
        choices=["x", "y", "xy"],
        default=None,
        help="also train on left-right (x) and/or upside-down (y) mirrored pairs: only for an effect "
        "that looks the same in that mirror",
    )


def _config(args: argparse.Namespace, studio: Studio):
    from .. import teachers_service

    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.rank is not None:
        overrides.update(rank=args.rank, alpha=float(args.rank))
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.mirror:
        overrides.update(flip_x="x" in args.mirror, flip_y="y" in args.mirror)
    return teachers_service.default_config(studio, **overrides)


def _train_here(studio: Studio, effect: str, config, backbone=None) -> int:
    from distill.callbacks import TqdmReporter

    from .. import teachers_service

    reporter = TqdmReporter(f"teacher {effect}")
    try:
        out = teachers_service.train_teacher_now(studio, effect, config, reporter, backbone=backbone)
    finally:
        reporter.close()
    r = out.result
    print(
        f"teacher of '{effect}' trained: {r.steps} steps in {r.seconds:.0f} s, final loss {r.final_loss:.4f}"
        f" (LoRA file #{out.lora.id}, {out.lora.bytes / 1e6:.1f} MB)"
    )
    return 0


def cmd_train(args: argparse.Namespace, studio: Studio) -> int:
    from .. import teachers_service

    config = _config(args, studio)
    if args.here:
        return _train_here(studio, args.effect, config)
    run_id = teachers_service.submit_training(studio, args.effect, config)
    print(f"queued run {run_id}: teacher of '{args.effect}' ({config.steps} steps)")
    return follow_run(studio, run_id) if args.wait else 0


def cmd_train_all(args: argparse.Namespace, studio: Studio) -> int:
    from .. import teachers_service

    todo = teachers_service.effects_without_teacher(studio)
    if not todo:
        print("every effect has a teacher")
        return 0
    print(f"{len(todo)} effects without a teacher: {', '.join(todo)}")
    config = _config(args, studio)
    if args.processes <= 1:
        backbone = teachers_service.open_backbone(studio)  # loaded once for all of them
        for effect in todo:
            _train_here(studio, effect, config, backbone)
        return 0
    return _train_in_processes(args, studio, todo)


def _train_in_processes(args: argparse.Namespace, studio: Studio, todo: list[str]) -> int:
    """``teacher train EFFECT --here`` in up to ``--processes`` child processes, one torch thread each."""
    base = [sys.executable, "-m", "studio", "--data-dir", str(studio.config.data_dir)]
    if studio.config.db_url:
        base += ["--db-url", studio.config.db_url]
    extra = []
    for flag in ("steps", "rank", "lr", "mirror"):
        if getattr(args, flag) is not None:
            extra += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if studio.config.backbone != "tiny" or studio.config.model_path:
        print(
            "note: child processes use the default backbone settings of `python -m studio`", file=sys.stderr
        )
    queue, running, failed = list(todo), {}, []
    while queue or running:
        while queue and len(running) < args.processes:
            effect = queue.pop(0)
            cmd = [*base, "teacher", "train", effect, "--here", *extra]
            running[effect] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for effect, proc in list(running.items()):
            if proc.poll() is None:
                continue
            out = proc.stdout.read().decode(errors="replace").strip().splitlines() if proc.stdout else []
            del running[effect]
            tail = out[-1] if out else ""
            if proc.returncode:
                failed.append(effect)
                print(f"{effect}: failed: {tail}", file=sys.stderr)
            else:
                print(tail)
        time.sleep(0.2)
    if failed:
        print(f"{len(failed)} teacher(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_import(args: argparse.Namespace, studio: Studio) -> int:
    from .. import teachers_service

    lora = teachers_service.import_teacher(studio, args.effect, args.file, args.prompt)
    print(
        f"imported {args.file.name} as the teacher of '{args.effect}' "
        f"({lora.format} layout, rank {lora.rank}, alpha {lora.alpha:g}, {lora.meta['matched_modules']} layers)"
    )
    return 0


def cmd_eval(args: argparse.Namespace, studio: Studio) -> int:
    from distill.backbones.registry import teacher_cfg

    from .. import teachers_service

    cfg = teacher_cfg(studio.config.backbone) if args.cfg is None else args.cfg
    res = teachers_service.evaluate(studio, args.effect, n_per_category=args.n, steps=args.steps, cfg=cfg)
    print(f"'{args.effect}' on {res.on}, {args.steps} steps x CFG {cfg:g}:")
    print("| system | PSNR mean (dB) | PSNR worst | SSIM mean | seconds |")
    print("|---|---|---|---|---|")
    for label, ev in (("teacher", res.teacher), ("base + same prompt", res.base)):
        print(
            f"| {label} | {ev.psnr_mean:.2f} | {ev.psnr_worst:.2f} | {ev.ssim_mean:.3f} | {ev.seconds:.1f} |"
        )
    print(res.verdict())
    return 0


def cmd_list(args: argparse.Namespace, studio: Studio) -> int:
    from .. import teachers_service

    for t in teachers_service.list_teachers(studio):
        if t.lora is None:
            what = "-"
        else:
            what = f"{t.lora.kind.value} #{t.lora.id} rank {t.lora.rank} {t.lora.format} {t.lora.bytes / 1e6:.1f} MB"
        print(f"{t.effect}\t{t.pairs} pairs\t{what}")
    return 0
