"""LoRA training with the flow-matching loss of eq. 2 on the source-conditioned backbone.

One named PEFT adapter on the frozen transformer learns an edit from pairs ``(source, target,
prompt)``: ``x_s = (1 - s) x0 + s eps`` with ``x0`` the target's latents, the model conditioned on
the prompt and the source image regresses ``v = eps - x0``. Pairs carry their own prompt, so the same
loop trains a single-effect teacher and the "FM all-in-1" baseline (every effect's pairs at once).

The text encoder and the image codec are frozen, so each pair's condition (prompt + source) and
target latents are encoded once. Only the adapter's parameters train (AdamW). Checkpoints hold the
adapter weights, the optimizer state, the step, the loss history and the RNG state (safetensors +
JSON, written atomically), so a resumed run continues the very same trajectory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .backbones import adapters
from .backbones.adapters import DEFAULT_TARGETS, LoraSpec
from .backbones.base import Backbone, Condition
from .callbacks import NullReporter, Reporter
from .checkpointing import (
    flatten_optimizer,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
    unflatten_optimizer,
)
from .flow import TimestepSampling, add_noise, sample_timesteps, velocity_target
from .images import psnr, resize, to_pil, to_tensor
from .sampling import euler_sample
from .settings import checked_settings

CHECKPOINT_FORMAT = 2  # 2: one state.safetensors + meta.json, as distill.checkpointing writes

ImageLike = torch.Tensor | Image.Image
TrainPair = tuple[ImageLike, ImageLike, str]


@dataclass(frozen=True)
class LoraTrainConfig:
    """Everything that decides a LoRA training run (JSON-able: it goes into the run's config)."""

    rank: int = 32
    alpha: float = 32.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # attention + img/txt MLPs
    dropout: float = 0.0
    lr: float = 1e-4  # ai-toolkit's Qwen-Image-Edit recipe, the paper's teachers
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    grad_clip: float = 1.0
    steps: int = 2000
    batch: int = 1
    resolution: int | None = None  # None: the backbone's working resolution
    timestep_sampling: TimestepSampling = "logit_normal"
    shift: float = 3.0  # for "shifted"
    logit_mean: float = 0.0  # for "logit_normal"
    logit_std: float = 1.0
    caption_dropout: float = 0.05  # share of steps trained on the empty prompt (keeps CFG working)
    # Mirrored copies of every pair (source and target flipped together), as ai-toolkit's flip_x /
    # flip_y: more views of a small pair set, for effects that look the same in a mirror.
    flip_x: bool = False
    flip_y: bool = False
    seed: int = 0
    checkpoint_every: int = 250  # 0: only at the end and on stop
    keep_checkpoints: int = 2
    sample_every: int = 250  # 0: no preview grids
    sample_n: int = 4
    sample_steps: int = 20
    sample_cfg: float | None = None  # None: the backbone's teacher CFG
    gradient_checkpointing: bool = False

    @classmethod
    def for_backbone(cls, backbone: str, **overrides: Any) -> LoraTrainConfig:
        """The preset for ``"tiny"`` or ``"qwen-image-edit"``, with any field overridden."""
        try:
            base = _PRESETS[backbone]
        except KeyError:
            raise ValueError(
                f"No LoRA training preset for backbone '{backbone}' (known: {', '.join(_PRESETS)})."
            ) from None
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraTrainConfig:
        return cls(**checked_settings(cls, d, "Unknown LoRA training setting(s): {names}."))

    def spec(self) -> LoraSpec:
        return LoraSpec(
            rank=self.rank, alpha=self.alpha, target_modules=tuple(self.target_modules), dropout=self.dropout
        )


_PRESETS: dict[str, LoraTrainConfig] = {
    # Measured with bench/teachers.py on the pretrained tiny editor (2 CPU cores): see results/teachers.md.
    "tiny": LoraTrainConfig(
        rank=16,
        alpha=16.0,
        # sepia, 200 steps: lr 1e-4 -> 18.6 dB to ground truth, 2e-3 -> 25.2 dB (base model 11.8 dB)
        lr=2e-3,
        steps=400,
        batch=8,
        timestep_sampling="logit_normal",
        caption_dropout=0.05,
        warmup_steps=20,
        checkpoint_every=200,
        sample_every=200,
        sample_steps=20,
    ),
    # The paper's teachers: ai-toolkit, 1024 px, lr 1e-4, 2,000 steps, batch 1.
    "qwen-image-edit": LoraTrainConfig(
        rank=32,
        alpha=32.0,
        lr=1e-4,
        steps=2000,
        batch=1,
        resolution=1024,
        timestep_sampling="logit_normal",
        caption_dropout=0.05,
        checkpoint_every=250,
        sample_every=250,
        sample_n=2,
        sample_steps=20,
        gradient_checkpointing=True,
    ),
}


@dataclass
class TrainResult:
    adapter_name: str
    steps: int  # optimizer steps done in total (including those before a resume)
    total_steps: int
    stopped: bool  # True when the reporter asked to stop before the end
    seconds: float  # wall time of this call
    losses: list[float] = field(repr=False)  # per step, the whole trajectory
    checkpoint: Path | None  # the last checkpoint written, if any
    spec: LoraSpec

    @property
    def final_loss(self) -> float:
        tail = self.losses[-50:]
        return sum(tail) / len(tail) if tail else math.nan


# ------------------------------------------------------------------------------------------------
# data


def _as_image(x: ImageLike) -> torch.Tensor:
    """PIL or (3, H, W) / (1, 3, H, W) tensor in [-1, 1] -> (1, 3, H, W) float."""
    if isinstance(x, Image.Image):
        return to_tensor([x])
    t = x.detach().float()
    return t.unsqueeze(0) if t.dim() == 3 else t


@dataclass
class EncodedPairs:
    """Each pair's condition (prompt + source), its empty-prompt condition and target latents."""

    conds: list[Condition]
    unconds: list[Condition]
    targets: torch.Tensor  # (N, C, h, w)
    sources: torch.Tensor  # (N, 3, H, W) in [-1, 1], at the training resolution (for previews)
    target_images: torch.Tensor  # (N, 3, H, W) in [-1, 1]

    def __len__(self) -> int:
        return len(self.conds)

    def batch(self, idx: Sequence[int], drop: Sequence[bool] | None = None) -> tuple[torch.Tensor, Condition]:
        drop = drop or [False] * len(idx)
        cond = Condition.cat([self.unconds[i] if d else self.conds[i] for i, d in zip(idx, drop)])
        return self.targets[list(idx)], cond


def mirrored(pairs: Sequence[TrainPair], flip_x: bool, flip_y: bool) -> list[TrainPair]:
    """The pairs, then their left-right (``flip_x``) and upside-down (``flip_y``) mirror images (both:
    also the copy flipped both ways), source and target flipped together."""
    dims = [()]
    if flip_x:
        dims.append((-1,))
    if flip_y:
        dims += [(-2,)] + ([(-2, -1)] if flip_x else [])
    out: list[TrainPair] = []
    for d in dims:
        for source, target, prompt in pairs:
            out.append(
                (_as_image(source).flip(d), _as_image(target).flip(d), prompt)
                if d
                else (source, target, prompt)
            )
    return out


@torch.no_grad()
def encode_pairs(
    backbone: Backbone, pairs: Sequence[TrainPair], resolution: int | None = None
) -> EncodedPairs:
    """Encode every pair once (the text encoder and codec are frozen)."""
    if not pairs:
        raise ValueError("There are no training pairs: add some image pairs to the effect first.")
    size = resolution or backbone.image_size
    conds, unconds, targets, srcs, tgts = [], [], [], [], []
    for source, target, prompt in pairs:
        src = resize(_as_image(source), size).to(backbone.device, backbone.dtype)
        tgt = resize(_as_image(target), size).to(backbone.device, backbone.dtype)
        conds.append(backbone.encode_prompt([prompt], src))
        unconds.append(backbone.encode_prompt([backbone.negative_prompt], src))
        targets.append(backbone.encode_images(tgt))
        srcs.append(src)
        tgts.append(tgt)
    return EncodedPairs(conds, unconds, torch.cat(targets), torch.cat(srcs), torch.cat(tgts))


# ------------------------------------------------------------------------------------------------
# loss, previews


def flow_matching_loss(
    backbone: Backbone, x0: torch.Tensor, cond: Condition, eps: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    """Eq. 2 for the currently active adapters: ``|| v(x_s, s, c) - (eps - x0) ||^2`` (mean, fp32)."""
    v = backbone.predict_velocity(add_noise(x0, eps, s), s, cond)
    return torch.nn.functional.mse_loss(v.float(), velocity_target(x0, eps).float())


@torch.no_grad()
def preview(
    backbone: Backbone,
    adapter_name: str | None,
    data: EncodedPairs,
    n: int,
    steps: int,
    cfg_scale: float,
    seed: int,
) -> tuple[Image.Image, float]:
    """Sample the first ``n`` pairs with the adapter; a grid (rows: source, output, target) and the
    mean PSNR of the outputs to the targets."""
    n = min(n, len(data))
    idx = list(range(n))
    cond = Condition.cat([data.conds[i] for i in idx])
    uncond = Condition.cat([data.unconds[i] for i in idx])
    with adapters.using(backbone.transformer, [adapter_name] if adapter_name else []):
        out = euler_sample(backbone, cond, uncond=uncond, cfg_scale=cfg_scale, steps=steps, seed=seed).images
    target = data.target_images[:n].to(out)
    out = resize(out, target.shape[-1])
    return image_grid([data.sources[:n], out, target]), float(psnr(out, target).mean())


def image_grid(rows: Sequence[torch.Tensor], min_cell: int = 96) -> Image.Image:
    """Rows of (B, 3, H, W) images in [-1, 1] as one picture (small images scaled up, nearest)."""
    cells = [to_pil(r) for r in rows]
    h, w = rows[0].shape[-2:]
    scale = max(1, math.ceil(min_cell / max(h, w)))
    ch, cw = h * scale, w * scale
    pad = 2
    cols = max(len(r) for r in cells)
    grid = Image.new("RGB", (cols * (cw + pad) + pad, len(cells) * (ch + pad) + pad), (255, 255, 255))
    for y, row in enumerate(cells):
        for x, im in enumerate(row):
            grid.paste(
                im.resize((cw, ch), Image.Resampling.NEAREST), (pad + x * (cw + pad), pad + y * (ch + pad))
            )
    return grid


# ------------------------------------------------------------------------------------------------
# checkpoints


def _trainable(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


def _save_checkpoint(
    directory: Path,
    step: int,
    adapter_name: str,
    config: LoraTrainConfig,
    params: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
    losses: list[float],
) -> Path:
    """Write ``directory/step-NNNNNN/``: adapter weights, optimizer and RNG state, loss history."""
    tensors: dict[str, torch.Tensor] = {f"adapter/{n}": p for n, p in params.items()}
    opt_tensors, opt_meta = flatten_optimizer(opt, "opt")
    tensors.update(opt_tensors)
    tensors["rng/generator"] = generator.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "adapter_name": adapter_name,
        "config": config.to_dict(),
        "param_names": list(params),
        "optimizer": opt_meta,
        "losses": losses,
    }
    return save_checkpoint(step_dir(directory, step), tensors, meta)


def _load_checkpoint(
    path: Path,
    config: LoraTrainConfig,
    params: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    generator: torch.Generator,
) -> tuple[int, list[float]]:
    tensors, meta = load_checkpoint(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"The checkpoint {path} is not a LoRA training checkpoint this version can resume; "
            "start a new training."
        )
    saved = LoraTrainConfig.from_dict(meta["config"])
    same = ("rank", "alpha", "target_modules", "batch", "seed")
    changed = [k for k in same if getattr(saved, k) != getattr(config, k)]
    if changed or meta["param_names"] != list(params):
        raise ValueError(
            f"The checkpoint {path} was made with different LoRA settings ({', '.join(changed) or 'layers'}); "
            "resume with the settings it was trained with, or start a new training."
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"adapter/{n}"].to(p))
    unflatten_optimizer(opt, "opt", tensors, meta["optimizer"])
    generator.set_state(tensors["rng/generator"])
    torch.set_rng_state(tensors["rng/torch"])
    return int(meta["step"]), [float(x) for x in meta["losses"]]


# ------------------------------------------------------------------------------------------------
# training


def _lr_at(config: LoraTrainConfig, step: int) -> float:
    if config.warmup_steps <= 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def prepare_adapter(backbone: Backbone, adapter_name: str, config: LoraTrainConfig) -> LoraSpec:
    """A fresh adapter ``adapter_name`` (replacing one of that name), initialised from the config's
    seed, and the only trainable parameters of the transformer."""
    transformer = backbone.transformer
    if adapter_name in adapters.adapter_names(transformer):
        adapters.delete(transformer, adapter_name)
    spec = config.spec()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        adapters.add_lora(transformer, adapter_name, spec)
    adapters.set_trainable(transformer, [adapter_name])
    return spec


def train_lora(
    backbone: Backbone,
    adapter_name: str,
    pairs: Sequence[TrainPair],
    config: LoraTrainConfig,
    reporter: Reporter | None = None,
    resume_from: Path | None = None,
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Train adapter ``adapter_name`` on ``pairs`` with eq. 2 and leave it on the transformer.

    ``resume_from``: a checkpoint folder (or a folder of them: the newest is used) of the same
    settings; training continues from its step to ``config.steps``. Checkpoints go to
    ``checkpoint_dir`` every ``config.checkpoint_every`` steps, at the end and when the reporter asks
    to stop (then the call returns early with ``stopped=True``).
    """
    reporter = reporter or NullReporter()
    t0 = time.perf_counter()
    transformer = backbone.transformer
    data = encode_pairs(backbone, mirrored(pairs, config.flip_x, config.flip_y), config.resolution)
    spec = prepare_adapter(backbone, adapter_name, config)
    params = _trainable(transformer)
    if not params:
        raise ValueError(
            f"The LoRA settings adapt no layer of the model (target modules {config.target_modules})."
        )
    opt = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    if config.gradient_checkpointing and hasattr(transformer, "enable_gradient_checkpointing"):
        transformer.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(config.seed)
    step, losses = 0, []
    if resume_from is not None:
        ckpt = latest_checkpoint(Path(resume_from))
        if ckpt is None:
            raise FileNotFoundError(f"No checkpoint to resume from in {resume_from}.")
        step, losses = _load_checkpoint(ckpt, config, params, opt, g)

    last_ckpt: Path | None = None

    def checkpoint(at: int) -> None:
        nonlocal last_ckpt
        if checkpoint_dir is None:
            return
        last_ckpt = _save_checkpoint(Path(checkpoint_dir), at, adapter_name, config, params, opt, g, losses)
        prune_checkpoints(Path(checkpoint_dir), config.keep_checkpoints)
        reporter.checkpoint(at, last_ckpt)

    def result(stopped: bool) -> TrainResult:
        transformer.eval()
        return TrainResult(
            adapter_name, step, config.steps, stopped, time.perf_counter() - t0, losses, last_ckpt, spec
        )

    device, dtype = backbone.device, backbone.dtype
    with adapters.using(transformer, [adapter_name]):
        while step < config.steps:
            if reporter.should_stop():
                checkpoint(step)
                return result(stopped=True)
            transformer.train(config.dropout > 0)
            idx = torch.randint(0, len(data), (config.batch,), generator=g).tolist()
            drop = (torch.rand(config.batch, generator=g) < config.caption_dropout).tolist()
            x0, cond = data.batch(idx, drop)
            eps = torch.randn(x0.shape, generator=g).to(device, dtype)
            s = sample_timesteps(
                config.batch,
                config.timestep_sampling,
                generator=g,
                shift=config.shift,
                logit_mean=config.logit_mean,
                logit_std=config.logit_std,
            ).to(device, dtype)
            loss = flow_matching_loss(backbone, x0, cond, eps, s)
            lr = _lr_at(config, step)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), config.grad_clip or math.inf)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            metrics = {"loss": losses[-1], "lr": lr, "grad_norm": float(grad_norm)}
            if config.sample_every and (step % config.sample_every == 0 or step == config.steps):
                transformer.eval()
                grid, sample_psnr = preview(
                    backbone,
                    adapter_name,
                    data,
                    config.sample_n,
                    config.sample_steps,
                    backbone.teacher_cfg if config.sample_cfg is None else config.sample_cfg,
                    config.seed,
                )
                metrics["sample_psnr"] = sample_psnr
                reporter.samples(step, grid)
            reporter.progress(step, config.steps, metrics)
            if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                checkpoint(step)
    return result(stopped=False)
