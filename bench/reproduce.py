"""Reproduce the paper's tables at small scale on EffectBench-mini with the tiny backbone.

    python bench/reproduce.py --effects 10                 # Table 1 at 10 effects (+ Fig. 7)
    python bench/reproduce.py --effects 10 --ablations     # + Table 3
    python bench/reproduce.py --effects 10 --extend 4      # + Table 5 (10 -> 14)
    python bench/reproduce.py --quick                      # a CI-sized smoke run

Every stage is cached under --work (teacher LoRAs, Lightning, FM all-in-1, students), so a rerun
only evaluates. Tables (markdown) and grids (PNG) go to --out with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.backbones import adapters  # noqa: E402
from distill.backbones.tiny import TinyConfig, TinyEditor  # noqa: E402
from distill.callbacks import NullReporter, TqdmReporter  # noqa: E402
from distill.checkpointing import latest_checkpoint  # noqa: E402
from distill.config import DistillConfig  # noqa: E402
from distill.effectbench.bench import BenchSpec, ground_truth, test_sources, train_scene  # noqa: E402
from distill.effectbench.effects import EFFECTS, MAIN_BENCH  # noqa: E402
from distill.effectbench.general import GENERAL_EDITS, general_images  # noqa: E402
from distill.evaluation import (  # noqa: E402
    EffectEntry,
    SystemResult,
    evaluate_composition,
    evaluate_system,
    ground_truths,
    stacked_system,
    student_system,
    teacher_system,
)
from distill.images import to_pil, to_tensor  # noqa: E402
from distill.launch import cpu_command  # noqa: E402
from distill.lora_training import LoraTrainConfig, train_lora  # noqa: E402
from distill.metrics import PairedGap, paired_gap  # noqa: E402
from distill.prompts import student_condition  # noqa: E402
from distill.prompts.describer import describe_effect  # noqa: E402
from distill.prompts.triggers import assign_triggers  # noqa: E402
from distill.targets import EffectSpec  # noqa: E402
from distill.trainer import CollectionDistiller, GeneralData  # noqa: E402


@dataclass
class Setup:
    bb: TinyEditor
    work: Path
    out: Path
    quick: bool
    seed: int
    processes: int = 1  # > 1: distillation runs as that many CPU processes under accelerate (gloo)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_backbone(quick: bool) -> TinyEditor:
    try:
        return TinyEditor.from_pretrained()
    except FileNotFoundError:
        if not quick:
            raise
        bb = TinyEditor.random(TinyConfig(num_layers=2))
        bb.freeze()
        return bb


def bench_effects(k: int) -> list[str]:
    """``k`` effects spread evenly over the main bench, so every kind (colour, style, filter,
    geometric, compositional) is represented at any size; all 50 at k = 50."""
    k = max(1, min(k, len(MAIN_BENCH)))
    return [MAIN_BENCH[int(i * len(MAIN_BENCH) / k)].name for i in range(k)]


def pairs_of(name: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """The bench's training pairs of an effect as (source, target, teacher prompt), tensors in [-1, 1]."""
    effect = next(e for e in EFFECTS if e.name == name)
    scenes = [train_scene(name, i, BenchSpec()) for i in range(n)]
    return [
        (to_tensor(s.image)[0], to_tensor(ground_truth(effect, s))[0], effect.teacher_prompt) for s in scenes
    ]


def _adapter_file(s: Setup, adapter: str) -> Path:
    return s.work / "loras" / f"{adapter}.safetensors"


def ensure_lora(s: Setup, adapter: str, train) -> float:
    """Load ``adapter`` from the cache, else train it with ``train()`` and cache it; returns seconds."""
    f = _adapter_file(s, adapter)
    if adapter in adapters.adapter_names(s.bb.transformer):
        return 0.0
    if f.exists():
        adapters.load_lora(s.bb.transformer, f, adapter)
        return json.loads(f.with_suffix(".json").read_text()).get("seconds", 0.0)
    t0 = time.perf_counter()
    train()
    sec = time.perf_counter() - t0
    f.parent.mkdir(parents=True, exist_ok=True)
    adapters.save_lora(s.bb.transformer, adapter, f)
    f.with_suffix(".json").write_text(json.dumps({"seconds": sec}))
    return sec


def teacher_name(effect: str) -> str:
    return "teacher_" + effect.replace("-", "_")


def load_cached_teachers(bb: TinyEditor, work: Path, names: list[str]) -> None:
    """The teachers an earlier run cached under ``work``, loaded frozen (exits naming a missing one)."""
    for n in names:
        f = work / "loras" / f"{teacher_name(n)}.safetensors"
        if not f.exists():
            sys.exit(f"no cached teacher for {n} under {work} (run bench/reproduce.py first)")
        adapters.load_lora(bb.transformer, f, teacher_name(n))
    adapters.set_trainable(bb.transformer, [])


def _train_lora(s: Setup, adapter: str, pairs: list, cfg: LoraTrainConfig) -> None:
    """eq. 2 training of ``adapter`` on ``pairs``, with a progress bar outside --quick."""
    with nullcontext() if s.quick else TqdmReporter(adapter) as reporter:
        train_lora(s.bb, adapter, pairs, cfg, reporter)


def train_teachers(s: Setup, names: list[str], steps: int | None) -> dict[str, float]:
    cfg = LoraTrainConfig.for_backbone("tiny", **({"steps": steps} if steps else {}), seed=s.seed)
    secs = {}
    for k, name in enumerate(names):
        log(f"teacher {k + 1}/{len(names)}: {name}")
        secs[name] = ensure_lora(
            s, teacher_name(name), lambda n=name: _train_lora(s, teacher_name(n), pairs_of(n, 20), cfg)
        )
    adapters.set_trainable(s.bb.transformer, [])
    return secs


def student_prompts(s: Setup, names: list[str]) -> dict[str, str]:
    """AOP: orthogonal triggers in the backbone's text encoder + offline-described student prompts."""
    f = s.work / "prompts.json"
    have = json.loads(f.read_text()) if f.exists() else {}
    todo = [n for n in names if n not in have]
    if todo:

        def embed(texts: list[str]) -> torch.Tensor:
            with torch.no_grad():
                h, m = s.bb.encode_text(texts)
            return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)

        existing = {n: v["trigger"] for n, v in have.items()}
        assignment = assign_triggers(names, embed, existing=existing, seed=s.seed)
        for n in todo:
            pairs = [tuple(to_pil(torch.stack([a, b]))) for a, b, _ in pairs_of(n, 2)]
            prompt = describe_effect(pairs, next(e.teacher_prompt for e in EFFECTS if e.name == n)).text
            have[n] = {"trigger": assignment.triggers[n], "student_prompt": prompt}
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(have, indent=1))
    return {n: student_condition(have[n]["trigger"], have[n]["student_prompt"]) for n in names}


def general_data(n: int, seed: int) -> GeneralData:
    rng = random.Random(seed)
    imgs = general_images(n, seed)
    phr = [p for e in GENERAL_EDITS for p in e.phrasings]
    return GeneralData(to_tensor(imgs), [rng.choice(phr) for _ in range(n)])


def distill_adapter(
    s: Setup, adapter: str, effects: list[EffectSpec], cfg: DistillConfig, init: str | None = None
) -> float:
    def train() -> None:
        run = s.work / "runs" / adapter
        run.mkdir(parents=True, exist_ok=True)
        if not latest_checkpoint(run / "checkpoints"):  # a resumed run keeps its start, for --curve's minutes
            (run / "started.json").write_text(json.dumps({"t": time.time()}))
        if s.processes > 1 and init is None:
            launch_distill(s, run, effects, cfg)
            adapters.load_lora(s.bb.transformer, run / "student.safetensors", adapter)
            return
        init_sd = None
        if init:
            init_sd = {k: v for k, v in _adapter_sd(s, init).items()}
        d = CollectionDistiller(
            s.bb,
            effects,
            general_data(64, s.seed),
            cfg,
            s.work / "runs" / adapter,
            TqdmReporter(adapter) if not s.quick else NullReporter(),
            init_student=init_sd,
        )
        d.train()
        sd = adapters.lora_state_dict(s.bb.transformer, "student")
        adapters.delete(s.bb.transformer, "student")
        adapters.delete(s.bb.transformer, "fake")
        adapters.load_lora(s.bb.transformer, sd, adapter)

    sec = ensure_lora(s, adapter, train)
    adapters.set_trainable(s.bb.transformer, [])
    return sec


def launch_distill(s: Setup, run: Path, effects: list[EffectSpec], cfg: DistillConfig) -> None:
    """The same distillation as ``CollectionDistiller`` in this process, run as ``s.processes`` CPU
    processes of one thread each (``accelerate launch``, gloo; distill/launch.py): each rank draws
    ``micro_batches / processes`` of every update's micro-batches and the gradients are averaged, so
    an update sees as many independent draws as the in-process run, on every core at once."""
    n = s.processes
    if cfg.micro_batches % n:
        raise SystemExit(f"--processes {n} must divide the preset's micro_batches ({cfg.micro_batches})")
    src_dir = run / "spec_sources"
    src_dir.mkdir(parents=True, exist_ok=True)
    spec_effects = []
    for e in effects:
        paths = []
        for k, im in enumerate(to_pil(e.sources)):
            paths.append(str(src_dir / f"{e.name}_{k:03d}.png"))
            im.save(paths[-1])
        teacher = str(_adapter_file(s, e.teacher_adapter)) if e.teacher_adapter else None
        spec_effects.append(
            dict(
                name=e.name,
                teacher_lora=teacher,
                teacher_prompt=e.teacher_prompt,
                student_prompt=e.student_prompt,
                sources=paths,
            )
        )
    general = general_data(64, s.seed)
    spec = {
        "backbone": "tiny",
        "cpu": True,
        "general_images": len(general.instructions),
        "general_instructions": general.instructions,
        "effects": spec_effects,
        "config": {**cfg.to_dict(), "micro_batches": cfg.micro_batches // n},
    }
    (run / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    subprocess.run(cpu_command(run / "spec.json", run, n), env=env, cwd=ROOT, check=True)


def _adapter_sd(s: Setup, adapter: str) -> dict[str, torch.Tensor]:
    """The trainer's parameter naming for an adapter cached as a file (for init_student)."""
    from distill.trainer import adapter_params

    if adapter not in adapters.adapter_names(s.bb.transformer):
        adapters.load_lora(s.bb.transformer, _adapter_file(s, adapter), adapter)
    return {k: v.detach().clone() for k, v in adapter_params(s.bb.transformer, adapter).items()}


def effect_specs(
    s: Setup, names: list[str], prompts: dict[str, str], new: set[str] = frozenset()
) -> list[EffectSpec]:
    out = []
    for n in names:
        e = next(x for x in EFFECTS if x.name == n)
        src = torch.stack([a for a, _, _ in pairs_of(n, 20)])
        out.append(EffectSpec(n, teacher_name(n), e.teacher_prompt, prompts[n], src, new=n in new))
    return out


def learning_curve(
    s: Setup, entries: list[EffectEntry], scenes: list, truths: dict, k: int, adapter: str = "ours"
) -> str:
    """Ours at ``k`` evenly spaced checkpoints of its run: 8-NFE quality against wall-clock minutes
    since the run started (target cache included), read from the checkpoint folders' times."""
    from distill.trainer import load_checkpoint_student

    run = s.work / "runs" / adapter
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    start = run / "started.json"
    if not ckpts or not start.exists():
        return "(no checkpoints of a timed run for the learning curve)\n"
    t0 = json.loads(start.read_text())["t"]
    pick = sorted({ckpts[round(i * (len(ckpts) - 1) / max(1, k - 1))] for i in range(k)})
    lines = [
        f"### {adapter}: quality against training time ({len(entries)} effects, 8 NFE)",
        "",
        "| Generator step | Minutes | PSNR (dB) | Accuracy | BCR |",
        "|---|---|---|---|---|",
    ]
    tr = s.bb.transformer
    for c in pick:
        meta = load_checkpoint_student(tr, c, "curve")  # what would be exported
        r = evaluate_system(s.bb, student_system(adapter="curve"), entries, scenes, truths).summary
        minutes = ((c / "meta.json").stat().st_mtime - t0) / 60
        lines.append(
            f"| {meta['step']} | {minutes:.1f} | {r.psnr:.2f} | {r.accuracy:.2f} | {r.bad_case_rate:.2f} |"
        )
        log(lines[-1])
    adapters.delete(tr, "curve")
    return "\n".join(lines) + "\n"


def command_line(args: list[str]) -> str:
    """The command that made a run, as a shell takes it back (quoted: ``--set`` carries JSON)."""
    return shlex.join(["python", "bench/reproduce.py", *args])


def extension_table(
    s: Setup,
    names: list[str],
    entries: list[EffectEntry],
    table1: list[SystemResult],
    prompts: dict[str, str],
    scenes: list,
    teacher_steps: int | None,
    ours: dict[str, Any],
    summary: dict[str, Any],
    n_new: int,
) -> str:
    """Table 5: the extension effects added to Ours one at a time, each by a short run from the previous
    CollectionLoRA with one effect's share of Ours' steps (the paper's 100 of 5000 at 50 effects). After
    each, Base+Lightning and the extended student on every effect so far, and the student on the first
    ``len(names)`` alone: that column shows forgetting."""
    new = [e.name for e in EFFECTS[len(MAIN_BENCH) : len(MAIN_BENCH) + n_new]]  # the extension set
    train_teachers(s, new, teacher_steps)
    prompts.update(student_prompts(s, names + new))
    ours_cfg = DistillConfig.for_backbone("tiny", len(names), **ours)  # as Ours ran, N-scaled
    add_cfg = ours_cfg.for_extension(len(names))
    all_entries = entries + [
        EffectEntry(n, next(e.teacher_prompt for e in EFFECTS if e.name == n), prompts[n], teacher_name(n))
        for n in new
    ]
    all_truths = ground_truths(all_entries, scenes, s.bb.image_size)
    first = {n: all_truths[n] for n in ["source", *names]}
    by_name = {r.system: r for r in table1}
    stages = [(len(names), by_name["Base+Lightning"], by_name["Ours"], by_name["Ours"])]
    parent = "ours"
    for k, name in enumerate(new, 1):
        adapter = f"ours_ext{k}"
        log(f"extension {k}/{len(new)}: + {name} ({add_cfg.steps} steps, {add_cfg.coarse} coarse)")
        specs = effect_specs(s, names + new[:k], prompts, new={name})
        distill_adapter(s, adapter, specs, add_cfg, init=parent)
        parent = adapter
        sofar = all_entries[: len(names) + k]
        truths = {n: all_truths[n] for n in ["source", *(e.name for e in sofar)]}
        student = student_system(adapter=adapter, name=f"Ours +{k}")
        stages.append(
            (
                len(sofar),
                evaluate_system(s.bb, stacked_system("Base+Lightning", True, ""), sofar, scenes, truths),
                evaluate_system(s.bb, student, sofar, scenes, truths),
                evaluate_system(s.bb, student, entries, scenes, first),
            )
        )
    summary["extension"] = {
        "new_effects": new,
        "steps_per_effect": add_cfg.steps,
        "coarse_steps_per_effect": add_cfg.coarse,
        "coarse_lr": add_cfg.coarse_lr,
        "stages": [
            {
                "effects": n,
                "base_lightning": b.summary.as_dict(),
                "ours": o.summary.as_dict(),
                "ours_on_first": f.summary.as_dict(),
            }
            for n, b, o, f in stages
        ],
    }

    def cells(pick: Callable[[tuple], SystemResult]) -> str:
        return " | ".join(
            f"{pick(st).summary.psnr:.2f} / {pick(st).summary.bad_case_rate:.3f}" for st in stages
        )

    head = " | ".join(f"{n} effects" for n, *_ in stages)
    return "\n".join(
        [
            f"### Table 5 analogue: {len(names)} -> {len(names) + len(new)} effects, one at a time",
            "",
            f"Each of {', '.join(new)} added in turn to the previous CollectionLoRA by {add_cfg.steps} "
            f"generator steps (after {add_cfg.coarse} coarse TA-FM steps): one effect's share of Ours' "
            f"{ours_cfg.steps}, at coarse lr {add_cfg.coarse_lr:g}. PSNR (dB) / BCR over every effect so far.",
            "",
            f"| System | {head} |",
            "|---" * (len(stages) + 1) + "|",
            f"| Base+Lightning | {cells(lambda st: st[1])} |",
            f"| Ours | {cells(lambda st: st[2])} |",
            f"| Ours on the first {len(names)} | {cells(lambda st: st[3])} |",
            "",
            per_effect_table([stages[-1][1], stages[-1][2]], f"Per effect at {stages[-1][0]} effects"),
        ]
    )


def table(rows: list[SystemResult], title: str) -> str:
    lines = [
        f"### {title}",
        "",
        "| System | PSNR (dB) ↑ | SSIM ↑ | Consistency ↑ | Accuracy ↑ | BCR ↓ | NFE | s/image |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r.summary
        lines.append(
            f"| {r.system} | {m.psnr:.2f} | {m.ssim:.3f} | {m.consistency:.3f} | {m.accuracy:.3f} | "
            f"{m.bad_case_rate:.3f} | {r.nfe} | {r.seconds_per_image:.3f} |"
        )
    return "\n".join(lines) + "\n"


def headline(rows: list[SystemResult]) -> dict[str, dict[str, float]]:
    """Each system's overall scores, as the JSON summary keeps them."""
    return {
        r.system: {**r.summary.as_dict(), "nfe": r.nfe, "seconds_per_image": r.seconds_per_image}
        for r in rows
    }


def gaps_to_base(rows: list[SystemResult]) -> dict[str, PairedGap]:
    """Each system's paired PSNR difference to the first row (Base): same sources, same noise."""
    base = rows[0]
    return {
        r.system: paired_gap([x.psnr for x in r.scores], [x.psnr for x in base.scores], r.requested)
        for r in rows[1:]
    }


def gap_table(rows: list[SystemResult]) -> str:
    lines = [
        f"PSNR against {rows[0].system}, paired per image (same sources and noise; 95% bootstrap interval, "
        "images resampled within each effect):",
        "",
        f"| System | PSNR - {rows[0].system} (dB) | 95% interval |",
        "|---|---|---|",
    ]
    for name, g in gaps_to_base(rows).items():
        lines.append(f"| {name} | {g.mean:+.2f} | [{g.low:+.2f}, {g.high:+.2f}] |")
    return "\n".join(lines) + "\n"


def per_effect_table(rows: list[SystemResult], title: str = "Per effect") -> str:
    names = list(rows[0].per_effect)
    head = "| Effect | " + " | ".join(f"{r.system} PSNR / BCR" for r in rows) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (len(rows) + 1)]
    for n in names:
        cells = [f"{r.per_effect[n].psnr:.1f} / {r.per_effect[n].bad_case_rate:.2f}" for r in rows]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_grid(rows: list[SystemResult], names: list[str], scenes, path: Path, n_src: int = 2) -> None:
    from PIL import Image

    size = 64
    cols = 1 + len(rows) + 1
    grid = Image.new("RGB", (cols * size, len(names) * n_src * size), "white")
    truths = {n: [ground_truth(n, sc) for sc in scenes[:n_src]] for n in names}
    r = 0
    for n in names:
        for j in range(n_src):
            tiles = [scenes[j].image, truths[n][j]] + [res.outputs[n][j] for res in rows]
            for c, t in enumerate(tiles):
                im = Image.fromarray((np.clip(t, 0, 1) * 255).astype(np.uint8)).resize(
                    (size, size), Image.Resampling.NEAREST
                )
                grid.paste(im, (c * size, r * size))
            r += 1
    grid.save(path)


def model_metrics_table(results: list[SystemResult], entries: list[EffectEntry], scenes, truths) -> str:
    """CLIP, DINO, DreamSim, EditReward and the MLLM judge on every system's outputs, where the
    STUDIO_* variables of distill/judges.py point at weights or an endpoint; "n/a" and why, else.
    The judge's reference pair (Fig. 11) is the effect's first training pair."""
    from distill.judges import JudgeRecord, ModelJudges, judges_table

    judges = ModelJudges()
    templates = {}
    for e in entries:
        sc = train_scene(e.name, 0, BenchSpec())
        templates[e.name] = (sc.image, ground_truth(e.name, sc))
    rows = []
    try:
        for r in results:
            log(f"model-based metrics: {r.system}")
            recs = [
                JudgeRecord(
                    r.outputs[e.name][j],
                    truths["source"][j],
                    truths[e.name][j],
                    e.name,
                    e.teacher_prompt,
                    template=templates[e.name],
                )
                for e in entries
                for j in range(len(scenes))
            ]
            rows.append((r.system, judges.score(recs)))
    finally:
        judges.close()
    return judges_table(rows, "Table 1, model-based metrics (where configured)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--effects", type=int, default=10)
    ap.add_argument("--names", default=None, help="these bench effects (comma list) instead of --effects")
    ap.add_argument("--test-per-category", type=int, default=10)
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--distill-steps", type=int, default=None)
    ap.add_argument(
        "--coarse-ratio",
        type=float,
        default=None,
        help="Ours' coarse stage (TA-FM alone), in steps per full step; default: the preset's",
    )
    ap.add_argument("--lightning-steps", type=int, default=None)
    ap.add_argument("--fm-steps", type=int, default=None)
    ap.add_argument(
        "--distill-lr", type=float, default=None, help="student and fake lr (default: the tiny preset's)"
    )
    ap.add_argument(
        "--full-lr",
        type=float,
        default=None,
        help="Ours' student lr in the full objective (default: the preset's)",
    )
    ap.add_argument(
        "--real-cfg",
        type=float,
        default=None,
        help="Ours' real-score guidance in the full objective's DMD terms (default: the preset's)",
    )
    ap.add_argument(
        "--coarse-lr", type=float, default=None, help="Ours' coarse-stage student lr (default: the preset's)"
    )
    ap.add_argument(
        "--ta-fm-timesteps",
        choices=("logit_normal", "uniform", "student"),
        default=None,
        help="Ours' TA-FM noise levels (student: the generator's own sampling levels; default: the preset's)",
    )
    ap.add_argument(
        "--student-rank",
        type=int,
        default=None,
        help="rank (= alpha) of the distilled LoRAs and their critics (default: the tiny preset's)",
    )
    ap.add_argument(
        "--set",
        default=None,
        metavar="JSON",
        help="more of Ours' distillation settings, e.g. '{\"ta_fm_weight\": 4}' (DistillConfig names)",
    )
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--extend", type=int, default=0, help="Table 5: add this many extension effects")
    ap.add_argument(
        "--curve",
        type=int,
        default=0,
        metavar="K",
        help="also evaluate K evenly spaced checkpoints of Ours (quality against minutes of training)",
    )
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run each distillation as N one-thread CPU processes (accelerate, gloo) instead of in-process",
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--tag", default=None)
    ap.add_argument(
        "--only",
        default=None,
        help="train only these cached stages (comma list of lightning, fm, ours), then stop",
    )
    ap.add_argument(
        "--teachers-only",
        default=None,
        metavar="I/N",
        help="only train shard I of N of the teachers (run N of these in parallel first)",
    )
    args = ap.parse_args()
    if args.set:
        try:
            extra = json.loads(args.set)
        except json.JSONDecodeError as e:
            ap.error(f"--set is not JSON: {e}")
        if not isinstance(extra, dict):
            ap.error("--set takes a JSON object, e.g. '{\"ta_fm_weight\": 4}'")
        try:
            DistillConfig.for_backbone("tiny", **extra)
        except (TypeError, ValueError) as e:
            ap.error(f"--set: {e}")
    else:
        extra = {}
    torch.manual_seed(args.seed)
    q = args.quick
    if q:
        args.effects, args.test_per_category = min(args.effects, 2), 2
        args.teacher_steps = args.teacher_steps or 4
        args.distill_steps = args.distill_steps or 2
        args.lightning_steps = args.lightning_steps or 2
        args.fm_steps = args.fm_steps or 4
    if q and args.processes > 1:
        ap.error("--processes runs the committed tiny backbone; --quick builds a random one in this process")
    tag = args.tag or ("quick" if q else f"{args.effects}fx")
    s = Setup(load_backbone(q), args.work / tag, args.out, q, args.seed, args.processes)
    s.out.mkdir(parents=True, exist_ok=True)
    names = args.names.split(",") if args.names else bench_effects(args.effects)
    unknown = [n for n in names if n not in {e.name for e in EFFECTS}]
    if unknown:
        ap.error(f"unknown effect(s): {', '.join(unknown)}")
    t_start = time.time()

    if args.teachers_only:
        i, n = (int(x) for x in args.teachers_only.split("/"))
        train_teachers(s, names[i::n], args.teacher_steps)
        return
    secs = train_teachers(s, names, args.teacher_steps)
    prompts = student_prompts(s, names)
    dcfg: dict[str, Any] = dict(steps=args.distill_steps) if args.distill_steps else {}
    dcfg["keep_checkpoints"] = None  # --curve and later probes (student_curve --resume) read them all
    if args.coarse_ratio is not None:
        dcfg["coarse_ratio"] = args.coarse_ratio
    if args.distill_lr:
        dcfg.update(lr_student=args.distill_lr, lr_fake=args.distill_lr)
    if args.student_rank:
        dcfg["student_lora"] = {"rank": args.student_rank, "alpha": float(args.student_rank)}
    if q:
        dcfg.setdefault("coarse_ratio", 4.0)  # a few coarse steps, not the preset's 64 per full step
        dcfg.update(
            batch=2, critic_updates=1, target_steps=2, target_general_sources=1, checkpoint_every=1000
        )
    # Ours' settings (its ablations and extension too): the shared ones, then its own flags, then --set
    flags = dict(
        real_cfg=args.real_cfg,
        lr_student=args.full_lr,
        coarse_lr=args.coarse_lr,
        ta_fm_timesteps=args.ta_fm_timesteps,
    )
    ours = {**dcfg, **{k: v for k, v in flags.items() if v is not None}, **extra}
    only = set(args.only.split(",")) if args.only else None

    def want(stage: str) -> bool:
        return only is None or stage in only

    log("Lightning (DMD on the general stream only)")
    # Lightning is DMD alone (no anchor): it keeps the guided real score and the student and critic lrs
    # it was measured with (results/table1_10fx8.md on), where the tiny preset's full objective follows
    # a long TA-FM stage at a lower lr with an unguided real score and a slower critic
    lightning = {"lr_student": 5e-4, "lr_fake": 2e-3, "real_cfg": None, **dcfg, "p_switch": 0.0}
    if args.lightning_steps:
        lightning["steps"] = args.lightning_steps
    lcfg = DistillConfig.for_backbone("tiny", **lightning)
    if want("lightning"):
        distill_adapter(s, "lightning", [], lcfg)
    log("FM all-in-1 (eq. 2 on every pair at once)")
    fm_cfg = LoraTrainConfig.for_backbone(
        "tiny", steps=args.fm_steps or 4 * LoraTrainConfig.for_backbone("tiny").steps, seed=s.seed
    )
    if want("fm"):
        ensure_lora(
            s,
            "fm_all",
            lambda: _train_lora(s, "fm_all", [p for n in names for p in pairs_of(n, 20)], fm_cfg),
        )
    log("Ours (CollectionLoRA)")
    specs = effect_specs(s, names, prompts)
    ours_sec = (
        distill_adapter(s, "ours", specs, DistillConfig.for_backbone("tiny", len(names), **ours))
        if want("ours")
        else 0
    )
    adapters.set_trainable(s.bb.transformer, [])
    if only is not None:
        return

    entries = [
        EffectEntry(n, next(e.teacher_prompt for e in EFFECTS if e.name == n), prompts[n], teacher_name(n))
        for n in names
    ]
    scenes = test_sources("animal", args.test_per_category) + test_sources("portrait", args.test_per_category)
    truths = ground_truths(entries, scenes, s.bb.image_size)
    systems = [
        teacher_system(s.bb.teacher_cfg),
        stacked_system("Base+Lightning", True, ""),
        stacked_system("FM+Lightning", False, "fm_all"),
        student_system(adapter="ours"),
    ]
    results = []
    for sysm in systems:
        log(f"evaluating {sysm.name}")
        results.append(evaluate_system(s.bb, sysm, entries, scenes, truths))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    cmd = command_line(sys.argv[1:])
    md = [
        f"# EffectBench-mini, {len(names)} effects ({tag})",
        "",
        f"Command: `{cmd}` at commit `{commit}`; {len(scenes)} test sources per effect "
        f"({args.test_per_category} animal + {args.test_per_category} portrait), tiny backbone, 2 CPU cores.",
        "",
        f"Teacher training: mean {np.mean(list(secs.values())):.0f} s per effect (cached runs show their original time); "
        f"CollectionLoRA distillation: {ours_sec:.0f} s.",
        "",
        table(results, f"Table 1 analogue: {len(names)} effects in 1"),
        gap_table(results),
        per_effect_table(results),
        model_metrics_table(results, entries, scenes, truths),
    ]
    table_md = s.out / f"table1_{tag}.md"

    def flush(done: bool = False) -> None:
        tail = [f"Total wall time: {(time.time() - t_start) / 60:.1f} min.\n"] if done else ["(running)\n"]
        table_md.write_text("\n".join(md + tail))

    flush()
    # the grid lands with Table 1, not after the ablations and the extension, which can run for hours more
    save_grid(results, names[: min(6, len(names))], scenes, s.out / f"grid_{tag}.png")
    summary_json = s.out / f"table1_{tag}.json"  # for bench/scaling.py
    summary = {
        "tag": tag,
        "effects": names,
        "command": cmd,
        "commit": commit,
        "distill_seconds": ours_sec,
        "systems": headline(results),
        "psnr_vs_base": {k: asdict(g) for k, g in gaps_to_base(results).items()},
    }
    summary_json.write_text(json.dumps(summary, indent=1))

    ours_entry = {e.name: e for e in entries}
    if len(names) >= 2:
        a, b = ours_entry[names[0]], ours_entry[names[1]]
        comp = []
        for sysm in (student_system(adapter="ours"), teacher_system(s.bb.teacher_cfg)):
            p, _ = evaluate_composition(s.bb, sysm, a, b, scenes[: min(8, len(scenes))])
            comp.append(f"| {sysm.name} | {a.name} then {b.name} | {p:.2f} |")
        md += [
            "### Fig. 7 analogue: zero-shot composition (one pass, PSNR vs A-then-B ground truth)",
            "",
            "| System | Composition | PSNR (dB) |",
            "|---|---|---|",
            *comp,
            "",
        ]
        flush()

    if args.curve:
        md.append(learning_curve(s, entries, scenes, truths, args.curve))
        flush()

    if args.ablations:
        abl = []
        variants = [
            ("(1) PDSR", dict(aop=False, target_simulation=False, ta_fm=False)),
            ("(2) PDSR+AOP", dict(target_simulation=False, ta_fm=False)),
            ("(3) PDSR+AOP+TS", dict(ta_fm=False)),
            ("(4) AOP+TS+TA-FM", dict(pdsr=False)),
            ("(5) full", {}),
        ]
        for label, over in variants:
            adapter = "abl_" + label.split(")")[0].strip("(")
            log(f"ablation {label}")
            if over:
                cfg = DistillConfig.for_backbone("tiny", len(names), **{**ours, **over})
                distill_adapter(s, adapter, specs, cfg)
            else:  # the full method is Ours, trained above with the same settings
                adapter = "ours"
            aop = over.get("aop", True)
            sysm = student_system(adapter=adapter, name=label)
            if not aop:
                sysm.prompt = lambda e: e.teacher_prompt
            abl.append(evaluate_system(s.bb, sysm, entries, scenes, truths))
        md.append(table(abl, "Table 3 analogue: ablations"))
        flush()

    if args.extend:
        md.append(
            extension_table(
                s, names, entries, results, prompts, scenes, args.teacher_steps, ours, summary, args.extend
            )
        )
        summary_json.write_text(json.dumps(summary, indent=1))

    flush(done=True)
    print(table_md.read_text())


if __name__ == "__main__":
    main()
