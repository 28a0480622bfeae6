"""Underfit or overfit? A distilled student against its teachers on training and on test sources.

Scores, per effect, the 80-NFE teachers (Base) and the 8-NFE student of a finished
``bench/reproduce.py`` run on the effect's own training sources (the pairs the teacher learned from
and the distillation's TA-FM targets were drawn on) and on held-out test sources, as PSNR to the exact
ground truth. A student that trails its teachers as much on the sources it trained on as on test ones
is short of fitting (width, steps or lr); one that matches them on training sources only is short of
generalising (data). Reads the run's cache (``--work``: loras/, prompts.json) and trains nothing.

    OMP_NUM_THREADS=2 python bench/student_fit.py --work /root/clora-bench/20fx11 --effects 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.backbones import adapters  # noqa: E402
from distill.backbones.tiny import TinyEditor  # noqa: E402
from distill.effectbench.bench import BenchSpec, test_sources, train_scene  # noqa: E402
from distill.effectbench.effects import EFFECTS  # noqa: E402
from distill.effectbench.scenes import Scene  # noqa: E402
from distill.evaluation import (  # noqa: E402
    EffectEntry,
    System,
    ground_truths,
    run_system,
    student_system,
    teacher_system,
)
from distill.images import resize, to_tensor  # noqa: E402
from distill.metrics import psnr  # noqa: E402
from distill.prompts import student_condition  # noqa: E402

sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/distill.py must not shadow distill/
import reproduce as R  # noqa: E402


def mean_psnr(
    bb: TinyEditor, system: System, entry: EffectEntry, sources: torch.Tensor, truth: np.ndarray
) -> float:
    """The system's mean PSNR to ``truth`` for ``entry``'s edits of ``sources``."""
    out, _ = run_system(bb, system, entry, sources)
    return float(np.mean([psnr(o, t) for o, t in zip(out, truth)]))


def fit_rows(
    bb: TinyEditor, entries: list[EffectEntry], n_train: int, test: list[Scene], student: str, steps: int = 8
) -> list[dict]:
    base, ours = teacher_system(bb.teacher_cfg), student_system(steps=steps, adapter=student)
    rows = []
    for i, e in enumerate(entries):
        train = [train_scene(e.name, k, BenchSpec()) for k in range(n_train)]
        row = {"effect": e.name}
        for split, scenes in (("train", train), ("test", test)):
            # both systems edit the same sources against the same truths: make them once per split
            truth = ground_truths([e], scenes, bb.image_size)[e.name]
            sources = resize(to_tensor([s.image for s in scenes]), bb.image_size)
            row[f"base_{split}"] = mean_psnr(bb, base, e, sources, truth)
            row[f"ours_{split}"] = mean_psnr(bb, ours, e, sources, truth)
        rows.append(row)
        print(
            f"[{i + 1}/{len(entries)}] {e.name}: train {row['ours_train'] - row['base_train']:+.2f} dB, "
            f"test {row['ours_test'] - row['base_test']:+.2f} dB",
            file=sys.stderr,
            flush=True,
        )
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| Effect | Base train | Ours train | gap train | Base test | Ours test | gap test |\n"
        "|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows + [
        {"effect": "**mean**", **{k: np.mean([x[k] for x in rows]) for k in rows[0] if k != "effect"}}
    ]:
        gt, gs = r["ours_train"] - r["base_train"], r["ours_test"] - r["base_test"]
        lines.append(
            f"| {r['effect']} | {r['base_train']:.2f} | {r['ours_train']:.2f} | {gt:+.2f} | "
            f"{r['base_test']:.2f} | {r['ours_test']:.2f} | {gs:+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="a bench/reproduce.py run's cache folder")
    ap.add_argument("--effects", type=int, default=10)
    ap.add_argument("--names", default=None, help="these bench effects (comma list) instead of --effects")
    ap.add_argument("--train-sources", type=int, default=10, help="of each effect's 20 training pairs")
    ap.add_argument("--test-per-category", type=int, default=5)
    ap.add_argument("--student", default="ours", help="the student LoRA's file name under loras/")
    ap.add_argument(
        "--student-steps",
        type=int,
        default=8,
        help="sample the student with this many steps: more than its 8 tells few-step error from fit",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()

    names = args.names.split(",") if args.names else R.bench_effects(args.effects)
    student_file = args.work / "loras" / f"{args.student}.safetensors"
    prompts_file = args.work / "prompts.json"
    if not student_file.exists() or not prompts_file.exists():
        sys.exit(f"{args.work} holds no finished run (need {student_file.name} and prompts.json)")
    torch.set_grad_enabled(False)
    bb = R.load_backbone(quick=False)
    R.load_cached_teachers(bb, args.work, names)
    adapters.load_lora(bb.transformer, student_file, args.student)
    adapters.set_trainable(bb.transformer, [])
    prompts = json.loads(prompts_file.read_text())
    entries = [
        EffectEntry(
            n,
            next(e.teacher_prompt for e in EFFECTS if e.name == n),
            student_condition(prompts[n]["trigger"], prompts[n]["student_prompt"]),
            R.teacher_name(n),
        )
        for n in names
    ]
    test = test_sources("animal", args.test_per_category) + test_sources("portrait", args.test_per_category)
    rows = fit_rows(bb, entries, args.train_sources, test, args.student, args.student_steps)
    print(
        f"{len(names)} effects, {args.train_sources} training and {len(test)} test sources each, "
        f"Base at {teacher_system(bb.teacher_cfg).nfe} NFE, Ours at {args.student_steps}; PSNR dB\n"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
