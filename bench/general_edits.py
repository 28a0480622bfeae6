"""What PDSR's general stream keeps: the student's 8-step general edits against the base's.

Scores the pretrained base and the students of ``bench/student_curve.py`` runs (their last
checkpoint, EMA weights) on held-out general edits (flips, rotations, tone, blur, crops of
``distill/effectbench/general.py``, whose ground truth is exact), 8 Euler steps without CFG, as
PSNR to the edit's truth (and to the untouched source).

    OMP_NUM_THREADS=1 python bench/general_edits.py s4A s4V     # curve tags under runs/bench/10fx
    OMP_NUM_THREADS=1 python bench/general_edits.py --checkpoints runs/bench/8fx7/runs/ours/checkpoints/step-*
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from distill.backbones import adapters  # noqa: E402
from distill.backbones.tiny import TinyEditor  # noqa: E402
from distill.checkpointing import latest_checkpoint  # noqa: E402
from distill.effectbench.general import general_sample  # noqa: E402
from distill.images import resize, to_numpy, to_tensor  # noqa: E402
from distill.metrics import psnr  # noqa: E402
from distill.sampling import euler_sample  # noqa: E402
from distill.trainer import STUDENT, load_checkpoint_student  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tags", nargs="*", help="bench/student_curve.py run tags")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench" / "10fx")
    ap.add_argument("--n", type=int, default=48, help="held-out general samples")
    ap.add_argument("--checkpoints", nargs="*", type=Path, default=[], help="distillation checkpoint folders")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bb = TinyEditor.from_pretrained()
    # seeds far from the general stream's images (general_data draws from seed 0's stream)
    samples = [general_sample(10_000 + k) for k in range(args.n)]
    sources = to_tensor([s.source for s in samples])
    src = bb.prepare_images(sources)
    truth = to_numpy(resize(to_tensor([s.target for s in samples]), bb.image_size))
    source = to_numpy(resize(sources, bb.image_size))

    def score(names: list[str] | None) -> tuple[float, float]:
        with adapters.using(bb.transformer, names), torch.no_grad():
            cond = bb.encode_prompt([s.instruction for s in samples], src)
            out = to_numpy(euler_sample(bb, cond, steps=8, seed=0).images)
        return (
            float(np.mean([psnr(o, t) for o, t in zip(out, truth, strict=True)])),
            float(np.mean([psnr(o, t) for o, t in zip(out, source, strict=True)])),
        )

    print("| model | PSNR to the edit's truth | PSNR to the source |\n|---|---|---|")
    t, o = score(None)
    print(f"| base | {t:.2f} | {o:.2f} |", flush=True)
    runs: list[tuple[str, Path]] = []
    for tag in args.tags:
        ckpt = latest_checkpoint(args.work / "runs" / f"curve_{tag}" / "checkpoints")
        if ckpt is None:
            sys.exit(f"no checkpoint for curve run {tag!r} under {args.work}")
        runs.append((tag, ckpt))
    runs += [(c.parent.parent.name, c) for c in args.checkpoints]
    for label, ckpt in runs:
        load_checkpoint_student(bb.transformer, ckpt, STUDENT)
        t, o = score([STUDENT])
        print(f"| student {label} ({ckpt.name}) | {t:.2f} | {o:.2f} |", flush=True)


if __name__ == "__main__":
    main()
