"""Which true-CFG scale should the teachers sample at? Bench teachers at several (steps, CFG) settings.

Loads the teachers ``bench/reproduce.py`` cached under ``--work`` and scores each one's edits of the
held-out test sources against the exact ground truth (PSNR, dB), one column per setting, plus the mean.
Chose ``TinyConfig.teacher_cfg`` (results/recipe_tiny.md, session 12).

    OMP_NUM_THREADS=1 python bench/teacher_cfg.py --work runs/bench/10fx10 --effects 10 \\
        --settings 40x4 40x3 40x2 40x1.5 40x1 8x1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distill.backbones.tiny import TinyEditor  # noqa: E402
from distill.effectbench.bench import test_sources  # noqa: E402
from distill.effectbench.effects import get_effect  # noqa: E402
from distill.teachers import evaluate_teacher  # noqa: E402

sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/distill.py must not shadow distill/
import reproduce as R  # noqa: E402


def setting(text: str) -> tuple[int, float]:
    """'40x2' -> (40 steps, CFG 2.0)."""
    try:
        steps, cfg = text.lower().split("x")
        return int(steps), float(cfg)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a setting is STEPSxCFG, e.g. 40x2 (got {text!r})") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "10fx10")
    ap.add_argument("--effects", type=int, default=10, help="the first K bench effects of reproduce.py")
    ap.add_argument("--settings", nargs="+", type=setting, default=[(40, 4.0), (40, 2.0), (8, 1.0)])
    ap.add_argument("--test-per-category", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bb = TinyEditor.from_pretrained()
    names = R.bench_effects(args.effects)
    R.load_cached_teachers(bb, args.work, names)
    scenes = test_sources("animal", args.test_per_category) + test_sources("portrait", args.test_per_category)
    head = [f"{s} steps x CFG {c:g}" for s, c in args.settings]
    print("| effect | " + " | ".join(head) + " |\n|" + "---|" * (len(head) + 1), flush=True)
    rows = []
    for n in names:
        prompt = get_effect(n).teacher_prompt
        row = [
            evaluate_teacher(
                bb, R.teacher_name(n), n, prompt, scenes, steps=s, cfg=c, batch=len(scenes)
            ).psnr_mean
            for s, c in args.settings
        ]
        rows.append(row)
        print(f"| {n} | " + " | ".join(f"{v:.2f}" for v in row) + " |", flush=True)
    means = [sum(col) / len(col) for col in zip(*rows, strict=True)]
    print("| mean | " + " | ".join(f"{v:.2f}" for v in means) + " |")


if __name__ == "__main__":
    main()
