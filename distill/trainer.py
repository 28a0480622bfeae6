"""The CollectionLoRA multi-teacher on-policy distillation loop (§4, eqs. 1, 5-9).

ONE frozen base carries every adapter: the teachers' effect LoRAs, ``student`` and ``fake``; each
forward activates the adapter it needs (never a model copy). Each generator step is preceded by
``critic_updates`` (5) updates of the fake critic on fresh, detached student samples.

Per step, PDSR draws p ~ U(0, 1):
- p < p_switch, the effect stream: effect i, real score = base + LoRA_i with c_teacher and true CFG;
  loss = TA-FM (eq. 6) + DMD with target simulation (eq. 7) + DMD with backward simulation (eq. 1).
- otherwise the general stream: general images and instructions, real score = the base alone;
  loss = DMD with backward simulation only.

An optional coarse stage (``coarse_ratio``) runs first: TA-FM alone on both streams (the general
stream's anchors are the base's own cached edits), no critic work; the critic then starts as a copy
of the student.

Runs as one process or under ``accelerate launch`` (each rank draws its own batches; the LoRA
gradients are averaged by hand because adapters switch per forward, which DDP's fixed-graph hooks
do not expect). Checkpoints hold student, fake, both optimizers, the RNG and the step, and a resumed
run continues the same trajectory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backbones import adapters
from .backbones.base import Backbone, Condition
from .callbacks import NullReporter, Reporter
from .checkpointing import (
    flatten_optimizer,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    unflatten_optimizer,
)
from .config import DistillConfig
from .flow import add_noise, sample_timesteps, sigma_schedule, velocity_target
from .images import to_pil
from .objectives import VelocityFn, critic_loss, dmd_step, flow_matching_loss
from .sampling import euler_sample, guided_velocity
from .simulation import backward_simulation, exit_step_x0, rollout, target_simulation
from .targets import EffectSpec, TargetCache, cached_base_outputs

log = logging.getLogger(__name__)

STUDENT, FAKE = "student", "fake"
# a coarse-stage step (one student forward and backward on ta_fm_batch targets) against a full one
# (rollouts, real and fake scores, five critic updates): 0.23 s : 1.1 s on the tiny preset, 2 cores;
# checkpoint and preview cadences, written in full steps, count coarse steps at this rate
COARSE_COST = 5


@dataclass
class GeneralData:
    """The general stream's unlabelled images and their (VLM- or offline-written) instructions."""

    images: torch.Tensor  # (M, 3, H, W) in [-1, 1]
    instructions: list[str]


@dataclass
class CriticPool:
    """Detached student samples, their conditions, and how likely the critic is to draw each."""

    samples: torch.Tensor
    cond: Condition
    weights: torch.Tensor


@dataclass
class DistillResult:
    steps: int
    stopped: bool
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


class CollectionDistiller:
    def __init__(
        self,
        backbone: Backbone,
        effects: list[EffectSpec],
        general: GeneralData,
        config: DistillConfig,
        work_dir: Path,
        reporter: Reporter | None = None,
        accelerator: Any | None = None,
        init_student: dict[str, torch.Tensor] | None = None,
        init_fake: dict[str, torch.Tensor] | None = None,
    ):
        if not effects and config.p_switch > 0 and config.pdsr:
            raise ValueError("no effects to distil")
        self.bb = backbone
        self.tr = backbone.transformer
        self.effects = effects
        self.general = general
        self.cfg = config
        self.work_dir = Path(work_dir)
        self.reporter = reporter or NullReporter()
        self.acc = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.is_main = self.rank == 0

        # identical adapter initialisation on every rank, then per-rank data randomness
        torch.manual_seed(config.seed)
        for name, spec, init in (
            (STUDENT, config.student_lora, init_student),
            (FAKE, config.fake_lora, init_fake),
        ):
            if name in adapters.adapter_names(self.tr):
                adapters.delete(self.tr, name)
            adapters.add_lora(self.tr, name, spec)
            if init is not None:
                self._load_adapter(name, init)
        adapters.set_trainable(self.tr, [STUDENT, FAKE])
        if config.offload_teachers:  # idempotent: callers offload each teacher as they load it
            teachers = sorted({e.teacher_adapter for e in effects if e.teacher_adapter})
            adapters.offload(self.tr, teachers, keep=config.micro_batches)
        self.student_params = list(adapter_params(self.tr, STUDENT).values())
        self.fake_params = list(adapter_params(self.tr, FAKE).values())
        self.opt_g = torch.optim.AdamW(self.student_params, lr=config.lr_student, weight_decay=0.0)
        self.opt_f = torch.optim.AdamW(self.fake_params, lr=config.lr_fake, weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.student_params] if config.ema_decay > 0 else None
        self.gen = torch.Generator().manual_seed(config.seed * 1009 + self.rank)
        self.step = 0
        # the dynamic shift counts latent tokens (as the sampler does), so ask the backbone for a latent
        h = backbone.image_size
        with torch.no_grad():
            latent_shape = tuple(backbone.encode_images(torch.zeros(1, 3, h, h)).shape)
        self.sigmas = sigma_schedule(
            config.student_steps, backbone.image_seq_len(latent_shape), backbone.schedule
        ).to(backbone.device)
        self.cache = TargetCache(
            backbone,
            effects,
            backbone.prepare_images(general.images),
            steps=config.target_steps,
            cfg=config.teacher_cfg,
            general_per_effect=config.target_general_sources,
            root=self.work_dir / "targets"
            if self.is_main
            else None,  # one writer; ranks build identical targets
            seed=config.seed,
        )
        self.general_images = backbone.prepare_images(general.images)
        new = [i for i, e in enumerate(effects) if e.new]
        old = [i for i, e in enumerate(effects) if not e.new]
        self._new, self._old = new, old
        # running TA-FM loss per effect (effect_sampling "loss"); unseen effects count as the worst seen
        self.effect_loss = torch.full((len(effects),), float("nan"))
        self._general_targets: torch.Tensor | None = None  # the coarse stage's general anchors
        # the micro-batch draws of the current step's critic pools, which its generator update reuses
        self._draws: list[tuple[str, dict[str, Any]]] | None = None
        self._compile = config.compiles_coarse  # off for the rest of the run if compiling fails

    # -- adapters and scores ---------------------------------------------------------------------
    def _load_adapter(self, name: str, sd: dict[str, torch.Tensor]) -> None:
        own = adapter_params(self.tr, name)
        with torch.no_grad():
            for k, v in sd.items():
                if k in own:
                    own[k].copy_(v)

    def _velocity(
        self, names: list[str] | None, cond: Condition, uncond: Condition | None = None, cfg: float = 1.0
    ) -> VelocityFn:
        def fn(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            adapters.activate(self.tr, names)
            return guided_velocity(self.bb, x, s, cond, uncond, cfg)

        return fn

    def _encode(self, prompts: list[str], sources: torch.Tensor) -> Condition:
        with torch.no_grad():
            return self.bb.encode_prompt(prompts, sources.to(self.bb.device))

    def _uniform(self, lo: float, hi: float, n: int) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=self.gen)).to(self.bb.device)

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.gen).to(like.device, like.dtype)

    def _exit_step(self) -> int:
        return int(torch.randint(0, self.cfg.student_steps, (1,), generator=self.gen))

    # -- PDSR ------------------------------------------------------------------------------------
    def _route(self) -> str:
        if not self.effects:
            return "general"
        if not self.cfg.pdsr:
            return "effect"
        return "effect" if float(torch.rand((), generator=self.gen)) < self.cfg.p_switch else "general"

    def _pick_effect(self) -> int:
        if self._new and self._old:  # extension: replay the old effects beside the new ones
            pool = (
                self._new
                if float(torch.rand((), generator=self.gen)) < self.cfg.new_effect_share
                else self._old
            )
        else:
            pool = list(range(len(self.effects)))
        if self.cfg.effect_sampling == "loss":
            loss = self.effect_loss[pool]
            seen = loss[~loss.isnan()]
            loss = loss.nan_to_num(float(seen.max()) if len(seen) else 1.0)
            p = 0.5 / len(pool) + 0.5 * loss / loss.sum().clamp_min(1e-12)
            return pool[int(torch.multinomial(p, 1, generator=self.gen))]
        return pool[int(torch.randint(0, len(pool), (1,), generator=self.gen))]

    def _record_effect_losses(
        self, owners: list[int], v: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
    ) -> None:
        """Update each anchored effect's running TA-FM loss with the mean over its own samples."""
        per = (v.float() - velocity_target(y, eps).float()).pow(2).flatten(1).mean(1).cpu()
        who = torch.tensor(owners)
        for j in set(owners) - {-1}:  # -1: a general-stream anchor (coarse stage)
            loss, old = float(per[who == j].mean()), float(self.effect_loss[j])
            self.effect_loss[j] = loss if math.isnan(old) else 0.9 * old + 0.1 * loss

    def _student_prompt(self, i: int) -> str:
        e = self.effects[i]
        return e.student_prompt if self.cfg.aop else e.teacher_prompt

    def _effect_batch(self, i: int) -> dict[str, Any]:
        e = self.effects[i]
        b = self.cfg.batch
        src, y = self.cache.sample(i, b, self.gen)
        c_student = self._encode([self._student_prompt(i)] * b, src)
        c_teacher = self._encode([e.teacher_prompt] * b, src)
        uncond = self._encode([self.bb.negative_prompt] * b, src)
        teacher = [e.teacher_adapter] if e.teacher_adapter else None
        return {
            "effect": i,
            "y": y.to(self.bb.device, self.bb.dtype),
            "c_fake": c_student,  # the critic models the student's distribution under its own condition
            "student": self._velocity([STUDENT], c_student),
            "fake": self._velocity([FAKE], c_student),
            "real": self._velocity(teacher, c_teacher, uncond, self.cfg.real_guidance),
        }

    def _general_batch(self) -> dict[str, Any]:
        b = self.cfg.batch
        idx = torch.randint(0, len(self.general_images), (b,), generator=self.gen)
        src = self.general_images[idx]
        instr = [self.general.instructions[j] for j in idx.tolist()]
        c = self._encode(instr, src)
        uncond = self._encode([self.bb.negative_prompt] * b, src)
        return {
            "c_fake": c,
            "student": self._velocity([STUDENT], c),
            "fake": self._velocity([FAKE], c),
            "real": self._velocity(None, c, uncond, self.cfg.real_guidance),
            # the noise's shape is the latents' (the source's), not the images' (latent backbones differ)
            "shape": tuple(c.source_latents.shape),
        }

    def _noise(self, batch: dict[str, Any]) -> torch.Tensor:
        shape = batch["y"].shape if "y" in batch else batch["shape"]
        return torch.randn(shape, generator=self.gen).to(self.bb.device, self.bb.dtype)

    # -- one update of each ------------------------------------------------------------------------
    def critic_pools(self) -> list[CriticPool]:
        """Detached student samples for the critic updates that precede one generator update: one
        pool per micro-batch, each its own PDSR draw.

        The student does not change between its updates (the 5:1 two-time-scale rule), so all of
        those critic updates see one distribution; one no-grad rollout of the student's few-step
        sampler gives its backward-simulation sample at every exit step at once (plus, on the
        effect stream, target-simulation samples), and each critic update draws its batch from
        that pool instead of re-running the sampler. Every micro-batch's rollout runs in one
        batched forward per student step (the student adapter is shared; only conditions differ).

        The critic must track the student where the DMD terms probe it: on the effect stream the
        generator scores as many target-simulation samples as backward-simulation ones, so the
        critic draws the two kinds equally often (not 1 : student_steps as the pool holds them).

        The following generator update reuses these draws (DMD2 trains its critic on the generator's
        own samples): its backward simulation starts from the rollout's state at its exit step, the
        same sample a fresh rollout would reach (the student has not changed), without re-running
        the sampler's no-grad steps."""
        draws = [self._draw() for _ in range(self.cfg.micro_batches)]
        conds = [b["c_fake"] for _, b in draws]
        noise = torch.cat([self._noise(b) for _, b in draws])
        states_all, xs_all = rollout(self._velocity([STUDENT], Condition.cat(conds)), noise, self.sigmas)
        sizes = [len(c) for c in conds]
        for (_, batch), states in zip(draws, states_all.split(sizes, dim=1), strict=True):
            batch["states"] = states
        self._draws = draws
        ts_k = [k for k, (st, _) in enumerate(draws) if st == "effect" and self.cfg.target_simulation]
        ts: dict[int, torch.Tensor] = {}  # micro-batch -> its target-simulation samples
        if ts_k:
            y = torch.cat([draws[k][1]["y"] for k in ts_k])
            s_gen = self._uniform(self.cfg.s_min, self.cfg.s_gen_max, len(y))
            student = self._velocity([STUDENT], Condition.cat([conds[k] for k in ts_k]))
            with torch.no_grad():
                out = target_simulation(student, y, s_gen, self._randn(y))
            ts = dict(zip(ts_k, out.split([len(draws[k][1]["y"]) for k in ts_k]), strict=True))
        pools = []
        for k, (cond, xs) in enumerate(zip(conds, xs_all.split(sizes, dim=1), strict=True)):
            samples, pool_conds = [xs.flatten(0, 1)], [Condition.cat([cond] * len(xs))]
            weights = [torch.full((xs.shape[0] * xs.shape[1],), 1.0 / len(xs))]
            if k in ts:
                samples.append(ts[k])
                pool_conds.append(cond)
                weights.append(torch.ones(len(cond)))
            pools.append(CriticPool(torch.cat(samples), Condition.cat(pool_conds), torch.cat(weights)))
        return pools

    def critic_step(self, pools: list[CriticPool]) -> float:
        """One update of the fake score: flow matching on a batch of detached student samples drawn
        from every micro-batch's pool, in one forward (equal draws: the mean of the pools' means)."""
        self.opt_f.zero_grad(set_to_none=True)
        xs, conds = [], []
        for pool in pools:
            idx = torch.multinomial(pool.weights, self.cfg.batch, replacement=True, generator=self.gen)
            xs.append(pool.samples[idx])
            conds.append(pool.cond.select(idx.to(pool.samples.device)))
        x = torch.cat(xs)
        s = self._uniform(self.cfg.s_min, self.cfg.s_max, len(x))
        loss = critic_loss(self._velocity([FAKE], Condition.cat(conds)), x, s, self._randn(x))
        loss.backward()
        self._sync(self.fake_params)
        torch.nn.utils.clip_grad_norm_(self.fake_params, self.cfg.grad_clip)
        self.opt_f.step()
        return loss.item()

    def generator_step(self) -> dict[str, float]:
        """One student update: ``micro_batches`` independently routed losses, gradients accumulated
        (on one device, what the paper's GPUs do when each draws its own stream). The draws are those
        of the preceding ``critic_pools`` (fresh ones when called alone)."""
        cfg = self.cfg
        self.opt_g.zero_grad(set_to_none=True)
        draws, self._draws = self._draws or [self._draw() for _ in range(cfg.micro_batches)], None
        parts = []
        for stream, batch in draws:
            loss, m = self._generator_loss(stream, batch)
            (loss / cfg.micro_batches).backward()
            m["loss"] = loss.item()
            parts.append(m)
        self._sync(self.student_params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student_params, cfg.grad_clip))
        self.opt_g.step()
        self._update_ema()
        keys = sorted(set().union(*parts) - ({"effect"} if len(parts) > 1 else set()))  # an index: no mean
        metrics = {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}
        metrics["grad_norm"] = grad_norm
        return metrics

    def _set_lr(self) -> None:
        f = self.cfg.lr_factor(self.step)
        for opt, lr in ((self.opt_g, self.cfg.student_lr_at(self.step)), (self.opt_f, self.cfg.lr_fake)):
            for group in opt.param_groups:
                group["lr"] = lr * f

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        # the usual warm-up: a short average while few steps exist, so early EMAs are not the init
        d = min(self.cfg.ema_decay, (1.0 + self.step) / (10.0 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.student_params], 1.0 - d)

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The student adapter holds the EMA weights inside the block (no-op without EMA)."""
        if self.ema is None:
            yield
            return
        live = [p.detach().clone() for p in self.student_params]
        with torch.no_grad():
            torch._foreach_copy_(self.student_params, self.ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.student_params, live)

    def _draw(self) -> tuple[str, dict[str, Any]]:
        """One micro-batch's PDSR draw: its stream and its batch (effect, sources, conditions, scores)."""
        stream = self._route()
        return stream, self._effect_batch(
            self._pick_effect()
        ) if stream == "effect" else self._general_batch()

    def _generator_loss(self, stream: str, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        m: dict[str, float] = {"effect_stream": float(stream == "effect")}
        if stream == "effect":
            i = batch["effect"]
            y = batch["y"]
            b = len(y)
            loss = torch.zeros((), device=self.bb.device)
            if cfg.ta_fm:  # eq. 6: anchor the student's trajectory on the teacher's target
                y_fm, student, owners = y, batch["student"], [i] * b
                extra = (cfg.ta_fm_batch or b) - b
                if extra > 0:
                    picks, y2, c2 = self._anchor_targets(i, extra)
                    y_fm = torch.cat([y, y2.to(y.device, y.dtype)])
                    student = self._velocity([STUDENT], Condition.cat([batch["c_fake"], c2]))
                    owners += picks
                l_fm = self._ta_fm_loss(student, y_fm, owners)
                loss = loss + cfg.ta_fm_weight * l_fm
                m["ta_fm"] = l_fm.item()
            if cfg.target_simulation:  # eq. 7: s_gen < tau_max, s_critic > tau_min
                s_gen = self._uniform(cfg.s_min, cfg.s_gen_max, b)
                y_hat = target_simulation(batch["student"], y, s_gen, self._randn(y))
                s_crit = self._uniform(cfg.s_critic_min, cfg.s_max, b)
                l_ts, st = dmd_step(y_hat, s_crit, batch["real"], batch["fake"], self.gen)
                loss = loss + cfg.dmd_ts_weight * l_ts
                m["dmd_ts"], m["ts_gap"] = l_ts.item(), st["real_fake_gap"]
            if cfg.backward_simulation:
                l_bs, st = self._dmd_bs(batch)
                loss = loss + cfg.dmd_bs_weight * l_bs
                m["dmd_bs"], m["bs_gap"] = l_bs.item(), st["real_fake_gap"]
            m["effect"] = float(i)
        else:
            loss, st = self._dmd_bs(batch)
            loss = cfg.dmd_bs_weight * loss
            m["dmd_bs_general"], m["bs_gap"] = loss.item(), st["real_fake_gap"]
        return loss, m

    def _ta_fm_loss(self, student: VelocityFn, y: torch.Tensor, owners: list[int]) -> torch.Tensor:
        """Eq. 6 on cached teacher targets ``y`` (``owners``: each target's effect)."""
        s = self._ta_fm_levels(len(y))
        eps = self._randn(y)
        v = student(add_noise(y, eps, s), s)
        if self.cfg.effect_sampling == "loss":
            self._record_effect_losses(owners, v.detach(), y, eps)
        return flow_matching_loss(v, y, eps)

    def coarse_step(self) -> dict[str, float]:
        """One student update of the coarse stage (``coarse_ratio`` x ``steps`` of them): TA-FM alone.
        PDSR routes each micro-batch: the effect stream anchors ``ta_fm_batch`` cached teacher targets
        of effects drawn as that stream draws them; the general stream anchors as many of the base's
        own edits of general images (its teacher is the base), which keeps general editing while the
        effects are learned. No critic update precedes it: nothing reads the fake score until the
        full objective starts."""
        if not self._compile:
            return self._coarse_update()
        try:
            return self._coarse_update()
        except Exception as e:  # no C++ compiler here, an op inductor cannot lower, ...: run eagerly
            log.warning("torch.compile failed (%s: %s); the coarse stage runs eagerly", type(e).__name__, e)
            self._compile = False
            return self._coarse_update()

    def _coarse_update(self) -> dict[str, float]:
        cfg = self.cfg
        self.opt_g.zero_grad(set_to_none=True)
        n = cfg.ta_fm_batch or cfg.batch
        losses: dict[str, list[float]] = {"ta_fm": [], "ta_fm_general": []}
        for _ in range(cfg.micro_batches):
            if self._route() == "effect":
                picks, y, cond = self._anchor_targets(-1, n, mixed=True)
                key = "ta_fm"
            else:
                picks, y, cond = self._general_anchor_targets(n)
                key = "ta_fm_general"
            y = y.to(self.bb.device, self.bb.dtype)
            with self.bb.compiled() if self._compile else nullcontext():
                loss = cfg.ta_fm_weight * self._ta_fm_loss(self._velocity([STUDENT], cond), y, picks)
                (loss / cfg.micro_batches).backward()
            losses[key].append(loss.item())
        self._sync(self.student_params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.student_params, cfg.grad_clip))
        self.opt_g.step()
        self._update_ema()
        m = {k: sum(v) / len(v) for k, v in losses.items() if v}
        loss = sum(sum(v) for v in losses.values()) / cfg.micro_batches
        return {"loss": loss, **m, "grad_norm": grad_norm, "coarse": 1.0}

    def _general_anchor_targets(self, n: int) -> tuple[list[int], torch.Tensor, Condition]:
        """``n`` of the base's cached edits of general images, with the student's conditions (the
        general instructions: no trigger). Made on first use (one ``target_steps`` CFG edit per image)."""
        if self._general_targets is None:
            root = self.work_dir / "targets" if self.is_main else None
            self._general_targets = cached_base_outputs(
                self.bb,
                self.general_images,
                self.general.instructions,
                self.cfg.target_steps,
                self.cfg.teacher_cfg,
                self.cfg.seed + 7919,
                root / "_general.safetensors" if root else None,
            )
        idx = torch.randint(0, len(self.general_images), (n,), generator=self.gen)
        cond = self._encode([self.general.instructions[j] for j in idx.tolist()], self.general_images[idx])
        return [-1] * n, self._general_targets[idx], cond

    def _fake_from_student(self) -> None:
        """The critic takes the student's live weights, at the first full step (``coarse_fake_init``)."""
        with torch.no_grad():
            torch._foreach_copy_(self.fake_params, [p.detach() for p in self.student_params])

    def _anchor_targets(
        self, i: int, n: int, mixed: bool = False
    ) -> tuple[list[int], torch.Tensor, Condition]:
        """``n`` extra TA-FM targets: of effect ``i``, or (ta_fm_extra "any", or ``mixed``) each of a
        drawn effect; returns each target's effect, the targets and the student's conditions."""
        mixed = mixed or self.cfg.ta_fm_extra == "any"
        picks = sorted(self._pick_effect() for _ in range(n)) if mixed else [i] * n
        srcs, ys = [], []
        for j in sorted(set(picks)):
            src, y = self.cache.sample(j, picks.count(j), self.gen)
            srcs.append(src)
            ys.append(y)
        src = torch.cat(srcs)
        return picks, torch.cat(ys), self._encode([self._student_prompt(j) for j in picks], src)

    def _ta_fm_levels(self, n: int) -> torch.Tensor:
        mode = self.cfg.ta_fm_timesteps
        if mode == "student":
            idx = torch.randint(0, len(self.sigmas) - 1, (n,), generator=self.gen)
            return self.sigmas[:-1][idx.to(self.sigmas.device)]
        return sample_timesteps(n, mode, generator=self.gen).to(self.bb.device)  # type: ignore[arg-type]

    def _dmd_bs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        k = self._exit_step()
        if "states" in batch:  # the critic pool's rollout of this draw already reached step k
            x_g = exit_step_x0(batch["student"], batch["states"][k], self.sigmas, k)
        else:
            x_g = backward_simulation(batch["student"], self._noise(batch), self.sigmas, k)
        s_crit = self._uniform(self.cfg.s_min, self.cfg.s_max, len(x_g))
        return dmd_step(x_g, s_crit, batch["real"], batch["fake"], self.gen)

    def _any_rank(self, flag: bool) -> bool:
        """Every rank must leave the loop together (a stop seen by the main rank's reporter)."""
        if self.world == 1:
            return flag
        return bool(
            self.acc.reduce(torch.tensor([float(flag)], device=self.bb.device), reduction="sum").item() > 0
        )

    def _sync(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.acc.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    # -- the loop --------------------------------------------------------------------------------
    def train(self, resume_from: Path | None = None) -> DistillResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        ckpt_dir = self.work_dir / "checkpoints"
        resume_from = resume_from or latest_checkpoint(ckpt_dir)
        if resume_from is not None:
            self.load(resume_from)
        self.cache.build()
        metrics: dict[str, float] = {}
        stopped = False
        total = cfg.total_steps
        while self.step < total:
            if self._any_rank(self.reporter.should_stop()):
                stopped = True
                break
            self._set_lr()  # before the critic updates too: they belong to this step
            if self.step == cfg.coarse > 0 and cfg.coarse_fake_init:
                self._fake_from_student()
            if cfg.is_coarse(self.step):
                metrics = self.coarse_step()
                # for ETAs: what a remaining step costs against the coarse steps timed so far
                left = cfg.coarse - self.step - 1
                metrics["eta_factor"] = (left + COARSE_COST * cfg.steps) / max(1, left + cfg.steps)
            else:
                pools = self.critic_pools()
                critic = [self.critic_step(pools) for _ in range(cfg.critic_updates)]
                metrics = self.generator_step()
                metrics["critic"] = sum(critic) / len(critic)
            self.step += 1
            # cadences count full steps; a coarse step counts as 1 / COARSE_COST of one
            done = self.step - cfg.coarse if self.step > cfg.coarse else self.step / COARSE_COST
            if cfg.target_refresh_every and self.step > cfg.coarse and self.step < total:
                if done % cfg.target_refresh_every == 0:
                    self.cache.refresh(cfg.target_refresh_fraction, self.gen)
            if self.is_main:
                self.reporter.progress(self.step, total, metrics)
                if cfg.sample_every and done % cfg.sample_every == 0:
                    self.reporter.samples(self.step, self.sample_grid())
                if done % cfg.checkpoint_every == 0 or self.step in (total, cfg.coarse):
                    self._checkpoint(ckpt_dir)
        if stopped and self.is_main:
            self._checkpoint(ckpt_dir)
        if not stopped and self.ema is not None:  # the finished student is its EMA (what is exported)
            with torch.no_grad():
                torch._foreach_copy_(self.student_params, self.ema)
        adapters.activate(self.tr, [STUDENT])
        return DistillResult(self.step, stopped, time.perf_counter() - t0, metrics)

    # -- previews and state --------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, per_effect: int = 2, max_effects: int = 8) -> Any:
        """Rows of (source, teacher target, student 8-step) for a few effects."""
        from PIL import Image

        rows = []
        for i in range(min(len(self.effects), max_effects)):
            src, y = self.cache.sources[i][:per_effect], self.cache.targets[i][:per_effect]
            cond = self._encode([self._student_prompt(i)] * len(src), src)
            with adapters.using(self.tr, [STUDENT]), self.ema_weights():
                out = euler_sample(self.bb, cond, steps=self.cfg.student_steps, seed=i).images
            for k in range(len(src)):
                rows.append([src[k], self.bb.decode_latents(y[k : k + 1])[0], out[k]])
        if not rows:
            return Image.new("RGB", (8, 8))
        tiles = [to_pil(torch.stack(r)) for r in rows]
        w, h = tiles[0][0].size
        grid = Image.new("RGB", (3 * w, len(tiles) * h), "white")
        for r, ims in enumerate(tiles):
            for c, im in enumerate(ims):
                grid.paste(im, (c * w, r * h))
        return grid

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name in (STUDENT, FAKE):
            for k, p in adapter_params(self.tr, name).items():
                tensors[f"{name}/{k}"] = p.detach().cpu()
        if self.ema is not None:
            for k, e in zip(adapter_params(self.tr, STUDENT), self.ema, strict=True):
                tensors[f"ema/{k}"] = e.detach().cpu()
        tg, mg = flatten_optimizer(self.opt_g, "opt_g")
        tf, mf = flatten_optimizer(self.opt_f, "opt_f")
        tensors.update(tg)
        tensors.update(tf)
        tensors["rng/generator"] = self.gen.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        tensors["effect_loss"] = self.effect_loss.clone()
        for i, t in enumerate(self.cache.targets):
            if t is not None:
                tensors[f"cache/{i}"] = t.cpu()
        meta = {
            "step": self.step,
            "opt_g": mg,
            "opt_f": mf,
            "config": self.cfg.to_dict(),
            "cache_version": self.cache.version,
        }
        return tensors, meta

    def _checkpoint(self, ckpt_dir: Path) -> None:
        """Save this step's checkpoint, report it, then drop the oldest beyond ``keep_checkpoints``."""
        self.reporter.checkpoint(self.step, self.save(ckpt_dir / f"step-{self.step:06d}"))
        if self.cfg.keep_checkpoints is not None:
            prune_checkpoints(ckpt_dir, self.cfg.keep_checkpoints)

    def save(self, path: Path) -> Path:
        tensors, meta = self.state_tensors()
        return save_checkpoint(path, tensors, meta)

    def load(self, path: Path) -> None:
        tensors, meta = load_checkpoint(path)
        for name in (STUDENT, FAKE):
            self._load_adapter(
                name, {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
            )
        if self.ema is not None:
            names = list(adapter_params(self.tr, STUDENT))
            with torch.no_grad():  # a checkpoint from before EMA was on starts the EMA at the student
                for k, e, p in zip(names, self.ema, self.student_params, strict=True):
                    e.copy_(tensors.get(f"ema/{k}", p.detach()))
        unflatten_optimizer(self.opt_g, "opt_g", tensors, meta["opt_g"])
        unflatten_optimizer(self.opt_f, "opt_f", tensors, meta["opt_f"])
        self.gen.set_state(tensors["rng/generator"])
        torch.set_rng_state(tensors["rng/torch"])
        self.cache.version = meta.get("cache_version", 0)
        if "effect_loss" in tensors and len(tensors["effect_loss"]) == len(self.effects):
            self.effect_loss = tensors["effect_loss"].clone()
        for i in range(len(self.effects)):
            if f"cache/{i}" in tensors:
                self.cache.targets[i] = tensors[f"cache/{i}"]
        self.step = int(meta["step"])

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        return adapters.lora_state_dict(self.tr, STUDENT)


def adapter_params(transformer: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """An adapter's parameters by stable name (module path + lora_A/lora_B), in module order."""
    suffix = f".{adapter}.weight"
    return {
        n[: -len(suffix)]: p
        for n, p in transformer.named_parameters()
        if n.endswith(suffix) and ".lora_" in n
    }


def load_checkpoint_student(transformer: torch.nn.Module, path: Path, adapter: str) -> dict[str, Any]:
    """Add ``adapter`` holding a checkpoint's student as it would be exported (its EMA when the run
    kept one, else the live weights), shaped by the run's own config; returns the checkpoint's meta."""
    tensors, meta = load_checkpoint(path)
    if adapter in adapters.adapter_names(transformer):
        adapters.delete(transformer, adapter)
    adapters.add_lora(transformer, adapter, DistillConfig.from_dict(meta["config"]).student_lora)
    with torch.no_grad():
        for name, p in adapter_params(transformer, adapter).items():
            p.copy_(tensors.get(f"ema/{name}", tensors[f"{STUDENT}/{name}"]))
    adapters.set_trainable(transformer, [])
    return meta


def estimate_eta(done: int, total: int, seconds: float) -> float:
    return math.inf if done == 0 else seconds / done * (total - done)
