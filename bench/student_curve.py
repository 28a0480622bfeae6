"""How fast does the student learn? 8-NFE quality of a distillation run every few generator steps.

Distils K bench effects (teachers cached by ``bench/reproduce.py`` under ``--work``) with the tiny
preset plus JSON overrides, and scores the student's 8-step edits on held-out test sources against
the exact ground truth every ``--every`` steps (PSNR, bad case rate, mean losses since the last
row). Used to choose the tiny preset in ``DistillConfig.for_backbone`` (see results/recipe_tiny.md).

    OMP_NUM_THREADS=1 python bench/student_curve.py --tag ts025 --steps 300 --every 100 \\
        --set '{"dmd_ts_weight": 0.25}' --names sepia,pastel,glitch --work runs/bench/10fx
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.backbones.tiny import TinyEditor  # noqa: E402
from distill.callbacks import NullReporter  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.effectbench.bench import test_sources  # noqa: E402
from distill.effectbench.effects import EFFECTS  # noqa: E402
from distill.evaluation import EffectEntry, evaluate_system, ground_truths, student_system  # noqa: E402
from distill.prompts import student_condition  # noqa: E402
from distill.trainer import CollectionDistiller  # noqa: E402

sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/distill.py must not shadow distill/
import reproduce as R  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument(
        "--every-full",
        type=int,
        default=None,
        help="in the full stage, a row every N full steps (default --every)",
    )
    ap.add_argument("--set", default="{}", help="DistillConfig overrides of the tiny preset (JSON)")
    ap.add_argument("--names", default="sepia,pastel,glitch")
    ap.add_argument("--test-per-category", type=int, default=4)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "10fx")
    ap.add_argument(
        "--resume", type=Path, default=None, help="start from this checkpoint (e.g. a coarse end)"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.names.split(",")
    bb = TinyEditor.from_pretrained()
    prompts = json.loads((args.work / "prompts.json").read_text())
    sp = {n: student_condition(prompts[n]["trigger"], prompts[n]["student_prompt"]) for n in names}
    R.load_cached_teachers(bb, args.work, names)
    entries = [
        EffectEntry(n, next(e.teacher_prompt for e in EFFECTS if e.name == n), sp[n], R.teacher_name(n))
        for n in names
    ]
    scenes = test_sources("animal", args.test_per_category) + test_sources("portrait", args.test_per_category)
    truths = ground_truths(entries, scenes, bb.image_size)
    setup = R.Setup(bb, args.work, ROOT / "results", False, 0)
    over = {"checkpoint_every": 10**9, "sample_every": 0, **json.loads(args.set), "steps": args.steps}
    cfg = DistillConfig.for_backbone("tiny", **over)
    work = args.work / "runs" / f"curve_{args.tag}"
    shutil.rmtree(work / "checkpoints", ignore_errors=True)  # from the start or --resume, nothing else
    if args.resume:
        shutil.copytree(args.resume, work / "checkpoints" / args.resume.name)

    class Curve(NullReporter):
        """Scores the student every ``--every`` steps, with the mean losses since the last row."""

        def __init__(self) -> None:
            self.agg: dict[str, list[float]] = {}
            self.t0 = time.perf_counter()

        def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
            for k, v in metrics.items():
                self.agg.setdefault(k, []).append(v)
            full = step - cfg.coarse
            if full > 0 and args.every_full:
                due = full % args.every_full == 0
            else:
                due = step % args.every == 0 or step == cfg.coarse
            if due or step == total:
                self.row(step)

        def row(self, step: int) -> None:
            with d.ema_weights():  # the student as it would be exported
                r = evaluate_system(bb, student_system(adapter="student"), entries, scenes, truths)
            per = " ".join(f"{k} {v.psnr:.1f}" for k, v in r.per_effect.items())
            losses = " ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in sorted(self.agg.items()))
            print(
                f"[{args.tag}] step {step} {time.perf_counter() - self.t0:.0f}s PSNR {r.summary.psnr:.2f}"
                f" BCR {r.summary.bad_case_rate:.2f} | {per} | {losses}",
                flush=True,
            )
            self.agg = {}

    curve = Curve()
    d = CollectionDistiller(
        bb,
        R.effect_specs(setup, names, sp),
        R.general_data(64, 0),
        cfg,
        work,
        curve,
    )
    d.cache.build()
    if args.resume:
        d.load(args.resume)
    curve.row(d.step)
    curve.t0 = time.perf_counter()  # training time, after the target cache
    d.train()


if __name__ == "__main__":
    main()
