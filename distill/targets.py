"""The teacher target cache: each effect teacher's own multi-step CFG outputs y.

For every effect, y is generated on the effect's source images and on a few general images (so the
student also learns what the effect does outside its 20 pairs), cached on disk, and a share of it is
regenerated with fresh noise every so often instead of every step (the teachers are the expensive
part: 40 steps x CFG = 80 NFE per target).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbones import adapters
from .backbones.base import Backbone
from .sampling import euler_sample


@dataclass
class EffectSpec:
    """One effect as the distiller sees it."""

    name: str
    teacher_adapter: str | None  # adapter on the backbone's transformer; None = the base model
    teacher_prompt: str  # c_teacher (the teacher keeps its own prompt)
    student_prompt: str  # c_student = trigger + VLM prompt (eq. 5), already joined
    sources: torch.Tensor  # (N, 3, H, W) in [-1, 1]: the effect pairs' sources
    new: bool = False  # incremental extension: one of the effects being added


def cfg_edits(
    backbone: Backbone,
    adapter_names: list[str] | None,
    sources: torch.Tensor,
    prompts: list[str],
    steps: int,
    cfg: float,
    seed: int,
    batch: int = 16,
) -> torch.Tensor:
    """``steps``-step true-CFG edits of ``sources`` (latents), each with its prompt, by the base with
    ``adapter_names`` active (None: the base alone)."""
    outs = []
    with adapters.using(backbone.transformer, adapter_names):
        for i in range(0, len(sources), batch):
            src = sources[i : i + batch].to(backbone.device)
            n = len(src)
            with torch.no_grad():
                cond = backbone.encode_prompt(prompts[i : i + n], src)
                uncond = backbone.encode_prompt([backbone.negative_prompt] * n, src)
            res = euler_sample(backbone, cond, uncond=uncond, cfg_scale=cfg, steps=steps, seed=seed + i)
            outs.append(res.latents)
    return torch.cat(outs)


def teacher_outputs(
    backbone: Backbone, effect: EffectSpec, sources: torch.Tensor, steps: int, cfg: float, seed: int
) -> torch.Tensor:
    """The teacher's ``steps``-step true-CFG edits of ``sources`` (latents)."""
    names = [effect.teacher_adapter] if effect.teacher_adapter else None
    return cfg_edits(backbone, names, sources, [effect.teacher_prompt] * len(sources), steps, cfg, seed)


def base_outputs(
    backbone: Backbone, sources: torch.Tensor, prompts: list[str], steps: int, cfg: float, seed: int
) -> torch.Tensor:
    """The base model's own edits of ``sources``, each with its prompt: the general stream's targets,
    the base being that stream's teacher."""
    return cfg_edits(backbone, None, sources, prompts, steps, cfg, seed)


def cached_base_outputs(
    backbone: Backbone,
    sources: torch.Tensor,
    prompts: list[str],
    steps: int,
    cfg: float,
    seed: int,
    file: Path | None,
) -> torch.Tensor:
    """``base_outputs``, read from ``file`` when it holds the same sources, else made (and written)."""
    out = read_targets(file, sources)
    if out is None:
        out = base_outputs(backbone, sources, prompts, steps, cfg, seed)
        write_targets(file, sources, out)
    return out


def read_targets(file: Path | None, sources: torch.Tensor) -> torch.Tensor | None:
    """The targets cached in ``file`` if it was made from exactly ``sources``, else None."""
    if file is None or not file.exists():
        return None
    data = load_file(str(file))
    if data["sources"].shape == sources.shape and torch.equal(data["sources"], sources):
        return data["targets"]
    return None


def write_targets(file: Path | None, sources: torch.Tensor, targets: torch.Tensor) -> None:
    """Cache ``targets`` of ``sources`` in ``file`` (atomically: a reader never sees half a file)."""
    if file is None:
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    save_file({"sources": sources.contiguous(), "targets": targets.contiguous()}, str(tmp))
    tmp.replace(file)


class TargetCache:
    def __init__(
        self,
        backbone: Backbone,
        effects: list[EffectSpec],
        general_images: torch.Tensor,
        *,
        steps: int,
        cfg: float,
        general_per_effect: int,
        root: Path | None,
        seed: int = 0,
    ):
        self.backbone = backbone
        self.effects = effects
        self.steps, self.cfg = steps, cfg
        self.root = Path(root) if root else None
        self.seed = seed
        self.version = 0
        g = torch.Generator().manual_seed(seed)
        self.sources: list[torch.Tensor] = []
        for e in effects:
            extra = general_images[torch.randperm(len(general_images), generator=g)[:general_per_effect]]
            self.sources.append(
                torch.cat([backbone.prepare_images(e.sources), backbone.prepare_images(extra)])
            )
        self.targets: list[torch.Tensor | None] = [None] * len(effects)

    def _file(self, i: int) -> Path | None:
        return self.root / f"{self.effects[i].name}.safetensors" if self.root else None

    def build(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Fill missing targets: from disk when present and matching, else generate them."""
        for i, e in enumerate(self.effects):
            if self.targets[i] is not None:  # restored from a checkpoint
                continue
            self.targets[i] = read_targets(self._file(i), self.sources[i])
            if self.targets[i] is not None:
                continue
            self.targets[i] = teacher_outputs(
                self.backbone, e, self.sources[i], self.steps, self.cfg, self.seed + 1000 * i
            )
            self._save(i)
            if progress:
                progress(i + 1, len(self.effects))

    def _save(self, i: int) -> None:
        write_targets(self._file(i), self.sources[i], self.targets[i])

    def refresh(self, fraction: float, generator: torch.Generator) -> int:
        """Regenerate a random share of every effect's targets with fresh noise; returns how many."""
        self.version += 1
        n_done = 0
        for i, e in enumerate(self.effects):
            n = len(self.sources[i])
            k = max(1, int(round(fraction * n)))
            idx = torch.randperm(n, generator=generator)[:k]
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            new = teacher_outputs(self.backbone, e, self.sources[i][idx], self.steps, self.cfg, seed)
            self.targets[i][idx] = new.to(self.targets[i].dtype)
            self._save(i)
            n_done += k
        return n_done

    def sample(self, i: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of (source images, teacher target latents) of effect ``i``."""
        n = len(self.sources[i])
        idx = torch.randint(0, n, (batch,), generator=generator)
        return self.sources[i][idx], self.targets[i][idx]
