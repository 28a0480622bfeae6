"""The CollectionLoRA distillation config: one typed place for every knob of §4-5.1.

Noise levels are written as the paper writes them (timesteps out of 1000, 1000 = pure noise) and
converted to our s in [0, 1] where used. Every component can be switched off for Table 3's ablations
and for the baselines that share this code (Lightning = the general stream alone).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .backbones.adapters import LoraSpec
from .backbones.tiny import TinyConfig
from .settings import checked_settings

# coarse steps from which ``compile_coarse`` None compiles: its compile time back at ~25 ms a step
COMPILE_MIN_COARSE = 2000


@dataclass
class DistillConfig:
    # schedule (§5.1): 5000 generator steps, lr 1e-4 for student and fake, 5 critic updates each
    steps: int = 5000
    lr_student: float = 1e-4
    lr_fake: float = 1e-4
    critic_updates: int = 5  # the 5:1 two-time-scale ratio
    batch: int = 4  # per micro-batch
    # independent PDSR draws per update, gradients accumulated: the paper's 8 GPUs each route their
    # own batch, so one update mixes streams and effects; on one device this emulates it
    micro_batches: int = 1
    grad_clip: float = 1.0
    # lr over the run, for both optimizers: "constant" (the paper's) or "cosine" down to lr_min_ratio x lr
    lr_schedule: str = "constant"
    lr_min_ratio: float = 0.1
    # exponential moving average of the student's weights (0: off, the paper's); when on, the EMA is
    # what samples, checkpoints' previews and the exported CollectionLoRA use
    ema_decay: float = 0.0
    student_steps: int = 8  # the few-step student (NFE 8, no CFG)
    # PDSR (§4.2): effect stream with probability p_switch, else the general stream
    pdsr: bool = True
    p_switch: float = 0.5
    # AOP (§4.3): student condition = trigger + VLM prompt; off: the student sees the teacher prompt
    aop: bool = True
    # C2F-DO (§4.4)
    ta_fm: bool = True  # trajectory anchoring, eq. 6
    target_simulation: bool = True  # DMD with target simulation, eq. 7
    backward_simulation: bool = True  # DMD with backward simulation, eq. 1 (both streams)
    tau_max: float = 750.0  # generator upper bound: t_gen < tau_max
    tau_min: float = 500.0  # critic lower bound: t_critic > tau_min
    ta_fm_weight: float = 1.0
    # C2F-DO's coarse stage made explicit: coarse_ratio x ``steps`` generator steps of TA-FM alone (no
    # critic, rollouts or scores; PDSR-routed: general draws anchor on the base's own edits) run before
    # the ``steps`` of the full objective. TA-FM is the early-stage anchor across the teacher-student
    # gap (§4.4); where a full step costs ~40 forward-equivalents against a TA-FM step's 3 (the tiny
    # backbone on CPU), spending the coarse part of the run on it alone buys many more anchor updates
    # per minute. 0: the paper's
    # eq. 8 from the first step. A ratio, so one ``steps`` sizes a run (and an extension) whole. The lr
    # schedule, cache refreshes and checkpoint cadence count the full steps. Without TA-FM (Table 3's
    # ablations) or without an effect stream (Lightning) there is no coarse stage.
    coarse_ratio: float = 0.0
    # at the end of the coarse stage the fake critic starts as a copy of the student: both model the
    # student's distribution under its own condition, as DMD2 starts its fake score as a copy of the
    # real one; an untouched critic (the base) would drive the first DMD updates with the gap between
    # the base and the teachers, which undid the coarse stage's 25.4 dB (20.9 after 500 full steps)
    coarse_fake_init: bool = True
    # the student's lr in the coarse stage (None: lr_student); plain regression takes a higher one
    # than the distribution-matching updates that follow (results/recipe_tiny.md, session 7)
    coarse_lr: float | None = None
    # the coarse stage's lr over its steps: "constant", or "cosine" down to lr_min_ratio x coarse_lr by its
    # end (a regression at a high lr plateaus at its own noise; the full objective then starts low anyway)
    coarse_lr_schedule: str = "constant"
    # the coarse lr of an extension run (None: coarse_lr). A run that adds one effect to a CollectionLoRA
    # starts from a student that already holds the others; the full-run coarse lr moves it far from
    # them in a few hundred steps (10 -> 14 effects one at a time, tiny: the first 10 lost 0.81 dB at
    # 2e-3, 0.38 at 5e-4, for 0.6-1.6 dB less on three of the four new ones; results/table1_10fx28.md)
    extension_coarse_lr: float | None = None
    # which effect an effect-stream draw trains: "uniform", or "loss": half the draws uniform, half in
    # proportion to each effect's running TA-FM loss, to give unlearned effects more of the run
    # (no gain measured at 3 effects: results/recipe_tiny.md, session 4)
    effect_sampling: str = "uniform"
    # TA-FM's noise levels: "logit_normal" (SD3's, mostly mid-level), "uniform", or "student": the
    # levels the student's own few-step sampler visits (the same quality as logit-normal at 3 effects; at
    # 10 faster early, 0.2 dB lower at the end: results/recipe_tiny.md, session 13)
    ta_fm_timesteps: str = "logit_normal"
    # TA-FM's batch (None: ``batch``); larger draws extra cached targets of the same effect for the
    # anchor alone: one more student forward, where each DMD sample costs rollouts, scores and critic work
    ta_fm_batch: int | None = None
    # where those extra anchor targets come from: "same" (the routed effect) or "any": effects drawn as
    # the effect stream draws them, so each update anchors several effects (no gain measured)
    ta_fm_extra: str = "same"
    dmd_ts_weight: float = 1.0
    dmd_bs_weight: float = 1.0
    # the teachers' true CFG (uncond + w * (cond - uncond)): their cached targets and the real score
    teacher_cfg: float = 4.0
    # the real score's guidance in the DMD terms, where it differs from the targets' (None: teacher_cfg):
    # DMD2 sets its real guidance apart; a guided x0 at the critic's high noise levels overshoots the
    # guided sampler's outputs that TA-FM anchors to
    real_cfg: float | None = None
    s_min: float = 0.02  # DMD2 samples noise levels in [2%, 98%]
    s_max: float = 0.98
    # teacher target cache: the teachers' own multi-step CFG outputs y on source images
    target_steps: int = 40
    target_general_sources: int = 8  # general images per effect, beside the effect's own sources
    target_refresh_every: int = 250  # generator steps between refreshing a share of the cache
    target_refresh_fraction: float = 0.25
    # adapters
    student_lora: LoraSpec = field(default_factory=lambda: LoraSpec(rank=32, alpha=32.0))
    fake_lora: LoraSpec = field(default_factory=lambda: LoraSpec(rank=32, alpha=32.0))
    # torch.compile the transformer for the coarse stage's TA-FM calls (one adapter, one batch shape;
    # the full objective switches adapters on every call and stays eager). None: when that stage has
    # at least COMPILE_MIN_COARSE steps, which repay the compile (a few shapes, ~10-30 s on 2 CPU
    # cores; a 10-effect tiny coarse step there went from 170 to 146 ms, 600 steps each)
    compile_coarse: bool | None = None
    # teacher LoRAs live in CPU memory and go to the base's device only while one scores (at most
    # ``micro_batches`` there at once): 50 rank-64 Qwen-Image teachers are ~40 GB, which would not fit
    # beside the 38 GB base on one 80 GB GPU; a switch copies ~0.8 GB, against a ~22 s step (results/
    # cuda_h200.md). On CPU it is bookkeeping only, so the tiny preset turns it off.
    offload_teachers: bool = True
    # bookkeeping
    seed: int = 0
    checkpoint_every: int = 100
    # the newest checkpoints kept on disk (None: every one); each holds both adapters, the EMA and both
    # optimizers, so a long real-model run would otherwise fill the disk
    keep_checkpoints: int | None = 3
    sample_every: int = 250
    log_every: int = 1
    # incremental extension (Tab. 5): share of batches given to the new effects
    new_effect_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_switch <= 1.0:
            raise ValueError("p_switch must be in [0, 1]")
        if not 0.0 <= self.tau_min <= 1000.0 or not 0.0 <= self.tau_max <= 1000.0:
            raise ValueError("tau_min and tau_max are timesteps in [0, 1000]")
        if min(self.critic_updates, self.student_steps, self.steps, self.batch, self.micro_batches) < 1:
            raise ValueError("steps, batch, micro_batches, critic_updates and student_steps must be >= 1")
        if not {self.lr_schedule, self.coarse_lr_schedule} <= {"constant", "cosine"}:
            raise ValueError("lr_schedule and coarse_lr_schedule must be 'constant' or 'cosine'")
        if not 0.0 <= self.lr_min_ratio <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError("lr_min_ratio must be in [0, 1] and ema_decay in [0, 1)")
        if self.ta_fm_extra not in ("same", "any"):
            raise ValueError("ta_fm_extra must be 'same' or 'any'")
        if self.effect_sampling not in ("uniform", "loss"):
            raise ValueError("effect_sampling must be 'uniform' or 'loss'")
        if self.effect_sampling == "loss" and not self.ta_fm:
            raise ValueError("effect_sampling 'loss' follows the TA-FM loss: it needs ta_fm on")
        if self.ta_fm_timesteps not in ("logit_normal", "uniform", "student"):
            raise ValueError("ta_fm_timesteps must be 'logit_normal', 'uniform' or 'student'")
        if self.ta_fm_batch is not None and self.ta_fm_batch < 1:
            raise ValueError("ta_fm_batch must be >= 1 (or unset: the batch)")
        if self.real_cfg is not None and self.real_cfg <= 0:
            raise ValueError("real_cfg must be > 0 (or unset: teacher_cfg)")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1 (or unset: keep every checkpoint)")
        if self.coarse_ratio < 0:
            raise ValueError("coarse_ratio must be >= 0")
        if self.coarse_lr is not None and not 0 < self.coarse_lr < 1:
            raise ValueError("coarse_lr must be between 0 and 1 (or unset: lr_student)")
        if self.extension_coarse_lr is not None and not 0 < self.extension_coarse_lr < 1:
            raise ValueError("extension_coarse_lr must be between 0 and 1 (or unset: coarse_lr)")
        if (
            self.coarse_ratio
            and self.coarse_fake_init
            and _shape(self.fake_lora) != _shape(self.student_lora)
        ):
            raise ValueError("coarse_fake_init copies the student into the critic: give both one LoRA shape")
        if not (self.ta_fm or self.target_simulation or self.backward_simulation):
            raise ValueError("at least one of ta_fm, target_simulation, backward_simulation must be on")

    @property
    def coarse(self) -> int:
        """The coarse stage's steps in effect: none without TA-FM or without an effect stream."""
        has_effects = self.p_switch > 0 or not self.pdsr
        return round(self.coarse_ratio * self.steps) if self.ta_fm and has_effects else 0

    @property
    def compiles_coarse(self) -> bool:
        """Whether the coarse stage runs its TA-FM calls through torch.compile."""
        if self.compile_coarse is None:
            return self.coarse >= COMPILE_MIN_COARSE
        return self.compile_coarse and self.coarse > 0

    @property
    def total_steps(self) -> int:
        """Generator steps of the whole run: the coarse stage's, then the full objective's."""
        return self.coarse + self.steps

    def is_coarse(self, step: int) -> bool:
        return step < self.coarse

    def for_extension(self, n_effects: int, n_new: int = 1) -> DistillConfig:
        """The run that adds ``n_new`` effects to a CollectionLoRA this config distilled over
        ``n_effects``: one effect's share of the steps each (``extension_steps``), at the extension's
        coarse lr."""
        lr = self.extension_coarse_lr if self.extension_coarse_lr is not None else self.coarse_lr
        return replace(self, steps=extension_steps(self.steps, n_effects, n_new), coarse_lr=lr)

    def student_lr_at(self, step: int) -> float:
        """The student's base lr at ``step`` (before ``lr_factor``): ``coarse_lr`` in the coarse stage."""
        return self.coarse_lr if self.coarse_lr is not None and self.is_coarse(step) else self.lr_student

    def lr_factor(self, step: int) -> float:
        """The lr multiplier at generator step ``step`` (0-based, counted over the whole run, coarse
        stage first), from the step alone (resume-safe): ``coarse_lr_schedule`` over the coarse stage,
        ``lr_schedule`` over the full objective's steps."""
        if self.is_coarse(step):
            return self._schedule(self.coarse_lr_schedule, step, self.coarse)
        return self._schedule(self.lr_schedule, step - self.coarse, self.steps)

    def _schedule(self, kind: str, step: int, total: int) -> float:
        if kind == "constant":
            return 1.0
        cos = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        return self.lr_min_ratio + (1.0 - self.lr_min_ratio) * cos

    @property
    def real_guidance(self) -> float:
        """The real score's CFG scale in the DMD terms."""
        return self.teacher_cfg if self.real_cfg is None else self.real_cfg

    @property
    def s_gen_max(self) -> float:
        return self.tau_max / 1000.0

    @property
    def s_critic_min(self) -> float:
        return self.tau_min / 1000.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        d = checked_settings(cls, d, "unknown distillation setting(s): {names}")
        for key in ("student_lora", "fake_lora"):
            if isinstance(d.get(key), dict):
                d[key] = LoraSpec(
                    **checked_settings(LoraSpec, d[key], f"unknown {key} setting(s): {{names}}")
                )
        return cls(**d)

    @classmethod
    def for_backbone(cls, name: str, n_effects: int | None = None, **overrides: Any) -> DistillConfig:
        """The paper's defaults for Qwen-Image-Edit; for the tiny backbone, a recipe sized for 2 CPU
        cores (higher lr for a small model, fewer steps, a smaller cache). Given ``n_effects``, the
        preset's ``steps`` grow with the effects beyond those it was sized for (``budget_steps``) unless
        ``overrides`` set them."""
        if name == "tiny":
            # Measured on 3 bench effects (sepia, pastel, glitch), 300 generator steps, 8-NFE PSNR to
            # ground truth: lr 5e-4 learns too slowly (14 dB after 400 steps on 10 effects); lr 2e-3
            # with dmd_ts_weight 1 gives 20.2 dB, with 0.25 22.6 dB: in pixel space the DMD2-normalised
            # target-simulation gradient (|x - x0_real| is small near the teacher's domain) made its loss
            # 3-10 against TA-FM's 0.1-0.3 and drowned the coarse anchor early. Two micro-batches of 2 mix streams and
            # effects within an update (19.3 vs 18.8 dB at step 100 against one batch of 4). At 300 steps
            # (3 effects): 22.0 dB; + an EMA of 0.98 22.6; + TA-FM on 8 cached targets 22.8 (16: 22.4);
            # + cosine lr 23.0, for 9% more time per step (results/recipe_tiny.md). Per minute of
            # training, one micro-batch of 2 beats two (23.9 vs 23.1 dB at equal time: more, cheaper
            # updates; session 5), so the preset takes one.
            # Session 7 (8 effects): a full step was learning each effect from ~75 anchor updates in 20
            # min. A coarse stage of TA-FM alone (6 coarse steps per full step, ~0.2 s each against
            # ~1.1 s) reaches 25.4 dB / BCR 0.11 in 3000 steps (the full objective alone: 22.0 / 0.34
            # after 1200 steps); at lr 2e-3 the full objective then undid it (20.9 dB, 16.0 with the
            # critic copied from the student), at 5e-4 it dips and recovers (23.9 -> 24.4 dB at 400
            # steps of 600, BCR 0.09-0.11; results/recipe_tiny.md). Routing the coarse stage by PDSR
            # keeps general edits (24.2 dB vs 19.8 effect-only; base 27.7): 8 effects in 19.5 min, 23.84 dB /
            # BCR 0.125 (FM+Lightning 24.10 / 0.113; results/table1_8fx8.md).
            # Session 9 (20 effects, 3000 coarse steps, 8-NFE PSNR / BCR): a cosine over the coarse stage
            # 20.72 / 0.39 (at coarse lr 4e-3: 20.97 / 0.38) against the constant lr's 20.49 / 0.38; an
            # EMA of 0.995 20.58, coarse lr 1e-3 20.08, rank 64 no better per step and 24% slower
            # (results/recipe_tiny.md). The coarse stage is still gaining at 3000 steps: steps, not the
            # lr's noise, are what it lacks, hence ``budget_steps``.
            # Session 10: per minute of CPU the coarse stage buys the fidelity (two effects on TA-FM alone
            # match their teachers after ~1000 coarse steps each: 35.9 dB at 8 NFE against 35.5 / 36.6 at
            # 80), so ~1000 coarse steps per effect (32 per full step) and a short full objective (250
            # steps at 8 effects). From one 10-effect coarse end (22.54 dB / BCR 0.23), 320 full steps:
            # student lr 5e-4 21.37 / 0.24, 1e-4 21.96 / 0.23 (the paper's); with the real score unguided
            # in the DMD terms (real_cfg 1) 22.41 / 0.21 (real_cfg 2: 22.33 / 0.21): the CFG-4 real score's
            # x0 overshoots the guided targets TA-FM anchors to (pastel 33.3 -> 27.8 dB at lr 1e-4 with it,
            # 33.5 without; results/recipe_tiny.md, session 10).
            # Session 11 (10 effects, 20 test sources): ~2000 coarse steps per effect (64 per full step)
            # end the coarse stage at 23.19 dB / BCR 0.20 against the teachers' 23.35 / 0.225 (32: 22.54
            # / 0.23 on 8 sources); the full objective at student lr 1e-4 then dips to 22.16 and ends at
            # 22.76, at 3e-5 it keeps 23.15 / 0.21 (results/table1_10fx10.md, recipe_tiny.md).
            # Session 12: with the teachers at CFG 2 (TinyConfig.teacher_cfg) the Base rises to 24.34 and
            # Ours to 23.57 / 0.19, flat from coarse step 15,000 on (results/table1_10fx11.md).
            # Session 13: the flat end was partly width: a rank-64 student (and critic) reaches 23.93 /
            # 0.19 in the same 67 min compiled (results/table1_10fx12.md).
            # Session 14: the coarse stage ends at the teachers' fidelity (rank 64: 24.36 dB / BCR 0.18 at
            # its end; rank 128 at coarse lr 1e-3: 24.44, 18 min longer; 4e-3 at rank 64 diverges); the
            # full objective then costs 0.4 dB (rank 128: 1.4; results/recipe_tiny.md, session 14).
            # Session 15: that cost was the critic's lr. From the same rank-64 coarse end (24.36 dB), 320
            # full steps with the critic at 2e-3 / 5e-4 / 2e-4 / 1e-4 (the paper's) end at 23.93 / 24.01 /
            # 24.42 / 24.47 dB. Our reading: a critic at 67x the student's lr fits the student's small
            # fluctuations, which the DMD terms then push back into the student, away from the ground truth.
            base: dict[str, Any] = dict(
                teacher_cfg=TinyConfig.teacher_cfg,  # its teachers' own scale (see TinyConfig)
                steps=250,
                coarse_ratio=64.0,
                coarse_lr=2e-3,
                coarse_lr_schedule="cosine",
                extension_coarse_lr=5e-4,
                lr_student=3e-5,
                real_cfg=1.0,
                lr_fake=1e-4,  # the paper's; 2e-3 cost 0.4 dB (session 15)
                batch=2,
                micro_batches=1,
                dmd_ts_weight=0.25,
                ta_fm_batch=8,
                ema_decay=0.98,
                lr_schedule="cosine",
                target_steps=20,
                target_refresh_every=150,
                checkpoint_every=50,
                sample_every=100,
                student_lora=LoraSpec(rank=64, alpha=64.0),
                fake_lora=LoraSpec(rank=64, alpha=64.0),
                offload_teachers=False,
            )
        else:
            base = {}
        if n_effects is not None and "steps" not in overrides:
            base["steps"] = budget_steps(
                base.get("steps", cls.steps), n_effects, PRESET_EFFECTS.get(name, 50)
            )
        return cls.from_dict(merge_overrides(base, overrides))


# How many effects each preset's ``steps`` were sized for: the paper's 5000 steps hold 50 effects (§5.1);
# the tiny preset was calibrated on 8 (results/recipe_tiny.md).
PRESET_EFFECTS = {"tiny": 8}


def budget_steps(steps: int, n_effects: int, sized_for: int) -> int:
    """A preset's ``steps`` for ``n_effects``: above the ``sized_for`` effects the budget grows in
    proportion, so each effect keeps its share of anchor and distribution-matching updates. With a fixed
    budget every effect's updates fall as 1/N: at 20 effects twice the tiny preset's steps gave +1.1 dB
    and BCR 0.38 -> 0.31, the 10-effect level (results/table4_scaling.md). Rounded up to tens."""
    if n_effects <= sized_for:
        return steps
    return math.ceil(steps * n_effects / sized_for / 10) * 10


def extension_steps(steps: int, n_effects: int, n_new: int = 1) -> int:
    """Generator steps that add ``n_new`` effects to a CollectionLoRA distilled in ``steps`` over
    ``n_effects``: each new effect gets one effect's share of that run. The paper's 5000 steps over 50
    effects give its 100 steps per added effect (Tab. 5)."""
    return max(1, math.ceil(steps * n_new / n_effects))


def _shape(spec: LoraSpec) -> tuple[int, float, tuple[str, ...]]:
    """What must agree for one LoRA's weights to be copied into another."""
    return spec.rank, float(spec.alpha), tuple(spec.target_modules)


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` settings with ``overrides`` on top: a dict merges into a dict setting
    ({"student_lora": {"rank": 8}} changes the rank only), and a student LoRA shape given without a
    critic one is the critic's too (the critic models the student; ``coarse_fake_init`` copies it)."""
    d = dict(base)
    for k, v in overrides.items():
        old = d.get(k)
        if isinstance(v, dict) and isinstance(old, dict):
            d[k] = {**old, **v}
        elif isinstance(v, dict) and isinstance(old, LoraSpec):
            d[k] = {**asdict(old), **v}
        else:
            d[k] = v
    if "student_lora" in overrides and "fake_lora" not in overrides:
        d["fake_lora"] = d["student_lora"]
    return d
