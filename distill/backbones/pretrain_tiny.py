"""Pretrain the tiny backbone as a general instruction editor (the embedded default's checkpoint).

Trains the transformer and its T5 text encoder jointly with flow matching (logit-normal noise
levels) on the general-domain generator of EffectBench-mini: "keep it unchanged" plus general edits
in varied phrasings, never the bench's effects. 10% of instructions are dropped to "" so the model
also learns the unconditional velocity that true CFG needs. An EMA of the weights is what ships.

    python -m distill.backbones.pretrain_tiny --minutes 60 --out distill/backbones/weights/tiny

``--init DIR`` continues from a saved checkpoint (fresh optimizer and warmup), e.g. to teach the
shipped editor new general edits without paying again for what it already knows.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..checkpointing import atomic_dir
from ..effectbench.general import GENERAL_EDITS, general_sample
from ..flow import add_noise, sample_timesteps, velocity_target
from ..images import psnr, resize, to_tensor
from ..sampling import euler_sample
from .tiny import WEIGHTS_DIR, TinyConfig, TinyEditor


@dataclass
class PretrainConfig:
    seed: int = 1234
    steps: int = 100_000  # upper bound; --minutes usually stops first
    minutes: float = 60.0
    batch: int = 16
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 300
    ema: float = 0.999
    prompt_dropout: float = 0.1
    pool: int = 12_000  # pre-generated training triplets (64 px, downsampled to the working size)
    render_size: int = 64
    eval_every_min: float = 15.0
    eval_n: int = 8  # held-out samples per general edit
    eval_steps: int = 40
    eval_cfg: float = 4.0


def make_pool(
    n: int, seed: int, render: int, size: int
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    srcs, tgts, instr, names = [], [], [], []
    for i in tqdm(range(n), desc="generating general edits", mininterval=5):
        s = general_sample(seed * 1_000_003 + i, render)
        srcs.append(s.source)
        tgts.append(s.target)
        instr.append(s.instruction)
        names.append(s.edit)
    return resize(to_tensor(srcs), size), resize(to_tensor(tgts), size), instr, names


@torch.no_grad()
def evaluate(editor: TinyEditor, cfg: PretrainConfig) -> dict[str, float]:
    """PSNR to ground truth of 40-step CFG edits on held-out general samples, per edit."""
    out: dict[str, float] = {}
    for k, edit in enumerate(GENERAL_EDITS):
        samples = [
            general_sample(10**9 + 7919 * k + j, cfg.render_size, edits=(edit,)) for j in range(cfg.eval_n)
        ]
        src = resize(to_tensor([s.source for s in samples]), editor.image_size)
        tgt = resize(to_tensor([s.target for s in samples]), editor.image_size)
        cond = editor.encode_prompt([s.instruction for s in samples], src)
        uncond = editor.encode_prompt([""] * len(samples), src)
        res = euler_sample(editor, cond, uncond=uncond, cfg_scale=cfg.eval_cfg, steps=cfg.eval_steps, seed=k)
        out[edit.name] = float(psnr(res.images, tgt).mean())
    out["mean"] = float(np.mean([out[e.name] for e in GENERAL_EDITS]))
    return out


def save(editor: TinyEditor, out: Path, recipe: dict) -> None:
    """Atomic: write beside, then swap in."""
    with atomic_dir(out) as tmp:
        editor.save_pretrained(tmp)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--minutes", type=float, default=PretrainConfig.minutes)
    ap.add_argument("--steps", type=int, default=PretrainConfig.steps)
    ap.add_argument("--pool", type=int, default=PretrainConfig.pool)
    ap.add_argument("--seed", type=int, default=PretrainConfig.seed)
    ap.add_argument("--eval-n", type=int, default=PretrainConfig.eval_n)
    ap.add_argument("--init", type=Path, default=None, help="continue from this checkpoint folder")
    args = ap.parse_args(argv)
    cfg = PretrainConfig(
        minutes=args.minutes, steps=args.steps, pool=args.pool, seed=args.seed, eval_n=args.eval_n
    )
    tiny = TinyConfig()
    torch.manual_seed(cfg.seed)
    parent: dict | None = None
    if args.init is not None:
        editor = TinyEditor.from_pretrained(args.init)
        tiny = editor.config
        editor.transformer.train()  # as a fresh random model is (from_pretrained returns eval mode)
        editor.text_encoder.train()
        recipe_file = args.init / "recipe.json"
        parent = json.loads(recipe_file.read_text()) if recipe_file.exists() else {"path": str(args.init)}
        start = evaluate(editor, cfg)
        tqdm.write(json.dumps({"init": str(args.init), **start}))
    else:
        editor = TinyEditor.random(tiny, seed=cfg.seed)
    src, tgt, instr, _ = make_pool(cfg.pool, cfg.seed, cfg.render_size, tiny.image_size)
    params = list(editor.transformer.parameters()) + list(editor.text_encoder.parameters())
    for p in params:  # from_pretrained hands back a frozen editor
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema_editor = copy.deepcopy(editor)
    ema_params = list(ema_editor.transformer.parameters()) + list(ema_editor.text_encoder.parameters())
    g = torch.Generator().manual_seed(cfg.seed)
    t_start = time.time()
    last_eval = t_start
    history: list[dict] = []
    bar = tqdm(range(cfg.steps), desc="pretrain tiny", mininterval=10)
    step = 0
    for step in bar:
        idx = torch.randint(0, cfg.pool, (cfg.batch,), generator=g)
        prompts = [instr[i] if torch.rand((), generator=g) > cfg.prompt_dropout else "" for i in idx.tolist()]
        x0, source = tgt[idx], src[idx]
        eps = torch.randn(x0.shape, generator=g)
        s = sample_timesteps(cfg.batch, "logit_normal", generator=g)
        cond = editor.encode_prompt(prompts, source)
        v = editor.predict_velocity(add_noise(x0, eps, s), s, cond)
        loss = torch.nn.functional.mse_loss(v, velocity_target(x0, eps))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - cfg.ema)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        elapsed = (time.time() - t_start) / 60
        done = elapsed >= cfg.minutes or step == cfg.steps - 1
        if done or (time.time() - last_eval) / 60 >= cfg.eval_every_min:
            last_eval = time.time()
            quality = evaluate(ema_editor, cfg)
            history.append(
                {"step": step + 1, "minutes": round(elapsed, 1), "loss": round(loss.item(), 5), **quality}
            )
            tqdm.write(json.dumps(history[-1]))
            recipe = {
                "seed": cfg.seed,
                "steps": step + 1,
                "minutes": round(elapsed, 1),
                "pretrain_config": asdict(cfg),
                "tiny_config": asdict(tiny),
                "data": "distill.effectbench.general.general_sample (general edits only: "
                + ", ".join(e.name for e in GENERAL_EDITS)
                + ")",
                "quality_psnr_db": {
                    "eval": f"{cfg.eval_steps} steps, true CFG {cfg.eval_cfg}, {cfg.eval_n} held-out samples per edit",
                    **quality,
                },
                "history": history,
                "command": shlex.join(
                    [
                        "python",
                        "-m",
                        "distill.backbones.pretrain_tiny",
                        *(sys.argv[1:] if argv is None else argv),
                    ]
                ),
            }
            if parent is not None:  # continued training: keep the parent's recipe and where we began
                recipe["init"] = {"path": str(args.init), "quality_psnr_db": start, "recipe": parent}
            save(ema_editor, args.out, recipe)
        if done:
            break


if __name__ == "__main__":
    main()
