"""Teacher LoRAs on the pretrained tiny backbone: does each bench effect's teacher learn its effect?

For K EffectBench-mini effects (evenly spaced over the main bench; ``--all`` for all 50), train a
teacher LoRA on the effect's 20 training pairs with the tiny preset, then sample it as the paper's
teachers are sampled (40 Euler steps, the backbone's true CFG) on held-out test sources and compare with the
exact ground truth; the base model given the same teacher prompt (no LoRA, same noise) and the
untouched source are the references. Prints a markdown table and writes it to results/teachers.md.

    OMP_NUM_THREADS=1 python bench/teachers.py [--k 8 | --all | --effects sepia tile_2x2] [--steps N] [--set JSON] [--resume]

``--mirror`` also trains each teacher on mirrored copies of its pairs, in the flips its effect is exactly
symmetric under (``distill.effectbench.bench.mirror_flips``): what a curator would tick for such an effect.

Each finished effect is also appended to ``<out>.jsonl``; ``--resume`` keeps the rows there that were
made with the same recipe and test set and trains only the missing effects (a long ``--all`` run can be
stopped and continued).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.backbones import adapters  # noqa: E402
from distill.backbones.registry import load_backbone  # noqa: E402
from distill.callbacks import TqdmReporter  # noqa: E402
from distill.effectbench.bench import BenchSpec, ground_truth, mirror_flips, test_sources, train_scene  # noqa: E402
from distill.effectbench.effects import MAIN_BENCH, get_effect  # noqa: E402
from distill.effectbench.scenes import CATEGORIES  # noqa: E402
from distill.images import to_tensor  # noqa: E402
from distill.lora_training import LoraTrainConfig, train_lora  # noqa: E402
from distill.teachers import evaluate_teacher, ground_truths, score  # noqa: E402

sys.path.append(str(ROOT / "bench"))  # after the repo root: bench/distill.py must not shadow distill/
from reproduce import teacher_name  # noqa: E402  (one naming of cached teachers)


def pick_effects(args: argparse.Namespace) -> list[str]:
    if args.effects:
        return [get_effect(n).name for n in args.effects]
    if args.all:
        return [e.name for e in MAIN_BENCH]
    step = max(1, len(MAIN_BENCH) // args.k)
    return [e.name for e in MAIN_BENCH[::step][: args.k]]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8, help="number of bench effects (evenly spaced)")
    ap.add_argument("--all", action="store_true", help="all 50 main-bench effects")
    ap.add_argument("--effects", nargs="*", default=None, help="these effects instead")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument(
        "--set",
        default="{}",
        help="other LoraTrainConfig overrides of the tiny preset (JSON), e.g. timestep_sampling",
    )
    ap.add_argument(
        "--mirror",
        action="store_true",
        help="train on mirrored copies of the pairs too, in the flips each effect is symmetric under",
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=BenchSpec().n_train_pairs,
        help="training pairs per effect (the bench's 20; more asks whether data or the model limits an effect)",
    )
    ap.add_argument("--n-test", type=int, default=8, help="test sources per category")
    ap.add_argument("--model-path", default=None, help="tiny weights folder (default: the committed ones)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "teachers.md")
    ap.add_argument("--resume", action="store_true", help="keep finished effects of <out>.jsonl")
    ap.add_argument(
        "--save-loras",
        type=Path,
        default=ROOT / "runs" / "bench" / "teachers" / "loras",
        help="keep each trained teacher here, named as bench/reproduce.py caches them (copy into a tag's loras/)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    overrides = {k: getattr(args, k) for k in ("steps", "lr", "batch") if getattr(args, k) is not None}
    overrides.update(json.loads(args.set))
    if args.rank is not None:
        overrides.update(rank=args.rank, alpha=float(args.rank))
    cfg = LoraTrainConfig.for_backbone("tiny", sample_every=0, checkpoint_every=0, **overrides)
    try:
        spec = BenchSpec(n_train_pairs=args.pairs)
    except ValueError as e:
        ap.error(str(e))
    backbone = load_backbone("tiny", args.model_path)
    scenes = [sc for cat in CATEGORIES for sc in test_sources(cat, args.n_test, seed=0)]
    sources = to_tensor([sc.image for sc in scenes])

    header = (
        "| effect | kind | train s | final loss | teacher PSNR mean | teacher worst | teacher SSIM "
        "| base PSNR mean | base worst | base SSIM | source PSNR | teacher - base |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print(header, flush=True)
    rows, gains, worst_gap, train_times = [], [], [], []
    log_file = args.out.with_suffix(".jsonl")
    # as it reads back from JSON (tuples become lists), so it compares equal to a logged key
    key = json.loads(
        json.dumps(
            {
                "recipe": cfg.to_dict(),
                "n_test": args.n_test,
                "model_path": args.model_path,
                "mirror": args.mirror,
                "pairs": args.pairs,
            }
        )
    )
    done = {}
    if args.resume and log_file.exists():
        for line in log_file.read_text().splitlines():
            rec = json.loads(line)
            if rec["key"] == key:
                done[rec["effect"]] = rec
    elif log_file.exists():
        log_file.unlink()
    for name in pick_effects(args):
        if name in done:  # finished by an earlier, stopped run with the same recipe
            rec = done[name]
            rows.append(rec["row"])
            gains.append(rec["gain"])
            worst_gap.append(rec["worst_gap"])
            train_times.append(rec["train_s"])
            print(rec["row"] + " (earlier run)", flush=True)
            continue
        effect = get_effect(name)
        pairs = []
        for i in range(spec.n_train_pairs):
            sc = train_scene(effect, i, spec)
            pairs.append((to_tensor(sc.image), to_tensor(ground_truth(effect, sc)), effect.teacher_prompt))
        adapter = teacher_name(name)
        flip_x, flip_y = mirror_flips(effect) if args.mirror else (False, False)
        with TqdmReporter(adapter) as reporter:
            res = train_lora(backbone, adapter, pairs, replace(cfg, flip_x=flip_x, flip_y=flip_y), reporter)
        teacher = evaluate_teacher(backbone, adapter, effect, effect.teacher_prompt, scenes)
        base = evaluate_teacher(backbone, None, effect, effect.teacher_prompt, scenes)
        src_psnr, _ = score(backbone.prepare_images(sources), ground_truths(effect, scenes))
        if args.save_loras:
            args.save_loras.mkdir(parents=True, exist_ok=True)
            f = args.save_loras / f"{adapter}.safetensors"
            adapters.save_lora(backbone.transformer, adapter, f)
            f.with_suffix(".json").write_text(json.dumps({"seconds": res.seconds}))
        adapters.delete(backbone.transformer, adapter)
        gain = teacher.psnr_mean - base.psnr_mean
        gains.append(gain)
        worst_gap.append(teacher.psnr_worst - base.psnr_mean)
        train_times.append(res.seconds)
        row = (
            f"| {name}{' (mirrored ' + 'x' * flip_x + 'y' * flip_y + ')' if flip_x or flip_y else ''} "
            f"| {effect.kind} | {res.seconds:.0f} | {res.final_loss:.4f} | {teacher.psnr_mean:.2f} "
            f"| {teacher.psnr_worst:.2f} | {teacher.ssim_mean:.3f} | {base.psnr_mean:.2f} | {base.psnr_worst:.2f} "
            f"| {base.ssim_mean:.3f} | {np.mean(src_psnr):.2f} | {gain:+.2f} |"
        )
        rows.append(row)
        print(row, flush=True)
        rec = {
            "effect": name,
            "key": key,
            "row": row,
            "gain": gain,
            "worst_gap": worst_gap[-1],
            "train_s": res.seconds,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with log_file.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        # partial results survive a stop
        write(args.out, header, rows, cfg, backbone.teacher_cfg, len(scenes), args, argv, "")

    summary = (
        f"\n{len(rows)} effects; teacher - base PSNR: mean {np.mean(gains):+.2f} dB, min {np.min(gains):+.2f} dB; "
        f"train time per teacher: mean {np.mean(train_times):.0f} s, max {np.max(train_times):.0f} s."
    )
    print(summary)
    write(args.out, header, rows, cfg, backbone.teacher_cfg, len(scenes), args, argv, summary)
    print(f"written to {args.out}")


def write(
    out: Path,
    header: str,
    rows: list[str],
    cfg: LoraTrainConfig,
    teacher_cfg: float,
    n_scenes: int,
    args: argparse.Namespace,
    argv: list[str] | None,
    summary: str,
) -> None:
    command = "OMP_NUM_THREADS=1 " + shlex.join(
        ["python", "bench/teachers.py", *(argv if argv is not None else sys.argv[1:])]
    )
    recipe = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if k != "target_modules")
    text = (
        "# Teacher LoRAs on the tiny backbone (EffectBench-mini)\n\n"
        f"`{command.strip()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{torch.get_num_threads()} torch thread)\n\n"
        f"Training: {args.pairs} pairs per effect, tiny preset ({recipe}).\n"
        f"Evaluation: {n_scenes} held-out test sources ({args.n_test} per category), 40 Euler steps, "
        f"true CFG {teacher_cfg:g}, PSNR/SSIM to the exact ground truth at 32 px. "
        "Base = the pretrained model with the same teacher prompt and noise, no LoRA; source = the untouched input as the output.\n\n"
        f"{header}\n" + "\n".join(rows) + "\n" + (summary or "\n(partial: still running)") + "\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
