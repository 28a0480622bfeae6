"""The distillation loop on a tiny random backbone: routing, bounds, 5:1, one base, resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import distill.trainer as trainer_mod
from distill.backbones import adapters
from distill.backbones.tiny import TinyConfig, TinyEditor
from distill.callbacks import NullReporter
from distill.checkpointing import list_checkpoints
from distill.config import DistillConfig
from distill.simulation import rollout_x0s
from distill.targets import EffectSpec
from distill.trainer import CollectionDistiller, GeneralData, adapter_params


def _backbone(seed: int = 0) -> TinyEditor:
    bb = TinyEditor.random(
        TinyConfig(num_layers=2, num_heads=2, head_dim=16, text_dim=32, text_layers=1), seed=seed
    )
    bb.freeze()
    torch.manual_seed(seed + 1)
    adapters.add_lora(bb.transformer, "teacher-red", adapters.LoraSpec(rank=4, alpha=4.0))
    with torch.no_grad():  # a teacher that really differs from the base
        for name, p in adapter_params(bb.transformer, "teacher-red").items():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapters.set_trainable(bb.transformer, [])
    return bb


def _data(n: int = 4) -> tuple[list[EffectSpec], GeneralData]:
    g = torch.Generator().manual_seed(7)
    src = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    effects = [
        EffectSpec("red", "teacher-red", "Make it red.", "<red_Xy1> Tint the whole image red.", src),
        EffectSpec("base", None, "Keep it.", "<base_Q7> Keep the image as it is.", src.flip(0)),
    ]
    general = GeneralData(torch.rand(6, 3, 32, 32, generator=g) * 2 - 1, ["Flip it.", "Keep it."] * 3)
    return effects, general


def _config(**kw) -> DistillConfig:
    base = dict(
        steps=4,
        batch=2,
        critic_updates=2,
        target_steps=2,
        checkpoint_every=2,
        sample_every=0,
        target_general_sources=2,
        target_refresh_every=3,
        student_steps=4,
        seed=3,
        coarse_ratio=0.0,  # the full objective from the first step unless a test asks for the stage
    )
    base.update(kw)
    return DistillConfig.for_backbone("tiny", **base)


class Recorder(NullReporter):
    def __init__(self, stop_at: int | None = None):
        self.metrics: list[dict[str, float]] = []
        self.checkpoints: list[int] = []
        self.stop_at = stop_at
        self.step = 0

    def progress(self, step: int, total: int, metrics: dict[str, float]) -> None:
        self.step = step
        self.metrics.append(dict(metrics))

    def checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append(step)

    def should_stop(self) -> bool:
        return self.stop_at is not None and self.step >= self.stop_at


def test_one_shared_base_and_frozen_teachers(tmp_path: Path) -> None:
    bb = _backbone()
    effects, general = _data()
    base_before = {n: p.clone() for n, p in bb.transformer.named_parameters() if "lora_" not in n}
    teacher_before = {n: p.clone() for n, p in adapter_params(bb.transformer, "teacher-red").items()}
    d = CollectionDistiller(bb, effects, general, _config(), tmp_path)
    assert d.tr is bb.transformer
    assert set(adapters.adapter_names(bb.transformer)) >= {"teacher-red", "student", "fake"}
    d.train()
    for n, p in bb.transformer.named_parameters():
        if "lora_" not in n:
            assert not p.requires_grad and torch.equal(p, base_before[n])
    for n, p in adapter_params(bb.transformer, "teacher-red").items():
        assert torch.equal(p, teacher_before[n])
    moved = [
        not torch.all(p == 0) for n, p in adapter_params(bb.transformer, "student").items() if "lora_B" in n
    ]
    assert any(moved)


def test_five_critic_updates_per_generator_update(tmp_path: Path) -> None:
    d = CollectionDistiller(_backbone(), *_data(), _config(critic_updates=5, steps=3), tmp_path)
    counts = {"g": 0, "f": 0}
    g_step, f_step = d.opt_g.step, d.opt_f.step
    d.opt_g.step = lambda *a, **k: (counts.__setitem__("g", counts["g"] + 1), g_step(*a, **k))[1]
    d.opt_f.step = lambda *a, **k: (counts.__setitem__("f", counts["f"] + 1), f_step(*a, **k))[1]
    d.train()
    assert counts == {"g": 3, "f": 15}


@pytest.mark.parametrize(("p_switch", "expected"), [(0.0, 0.0), (1.0, 1.0)])
def test_pdsr_routes_by_p_switch(tmp_path: Path, p_switch: float, expected: float) -> None:
    rec = Recorder()
    CollectionDistiller(_backbone(), *_data(), _config(p_switch=p_switch, steps=3), tmp_path, rec).train()
    assert [m["effect_stream"] for m in rec.metrics] == [expected] * 3
    if expected:
        assert all({"ta_fm", "dmd_ts", "dmd_bs"} <= set(m) for m in rec.metrics)
    else:
        assert all("dmd_bs_general" in m and "ta_fm" not in m for m in rec.metrics)


def test_target_simulation_respects_tau_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, list[float]] = {"gen": [], "critic": []}
    ts, dmd = trainer_mod.target_simulation, trainer_mod.dmd_step

    def spy_ts(student, y, s_gen, eps):
        if torch.is_grad_enabled():
            seen["gen"] += s_gen.tolist()
        return ts(student, y, s_gen, eps)

    def spy_dmd(x, s_critic, real, fake, generator=None):
        seen["critic"] += s_critic.tolist()
        return dmd(x, s_critic, real, fake, generator)

    monkeypatch.setattr(trainer_mod, "target_simulation", spy_ts)
    monkeypatch.setattr(trainer_mod, "dmd_step", spy_dmd)
    cfg = _config(p_switch=1.0, backward_simulation=False, ta_fm=False, steps=5, tau_max=300.0, tau_min=800.0)
    CollectionDistiller(_backbone(), *_data(), cfg, tmp_path).train()
    n = cfg.steps * cfg.batch * cfg.micro_batches  # every generator loss of every micro-batch
    assert len(seen["gen"]) == n and len(seen["critic"]) == n
    assert max(seen["gen"]) < 0.3 and min(seen["gen"]) >= cfg.s_min
    assert min(seen["critic"]) > 0.8 and max(seen["critic"]) <= cfg.s_max


@pytest.mark.parametrize("real_cfg", [None, 1.5])
def test_the_real_score_takes_its_own_guidance_when_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, real_cfg: float | None
) -> None:
    scales: list[float] = []
    guided = trainer_mod.guided_velocity

    def spy(bb, x, s, cond, uncond=None, cfg_scale=1.0, renorm=True):
        if uncond is not None:  # the real score: the only guided velocity the trainer builds
            scales.append(cfg_scale)
        return guided(bb, x, s, cond, uncond, cfg_scale, renorm)

    monkeypatch.setattr(trainer_mod, "guided_velocity", spy)
    cfg = _config(steps=2, teacher_cfg=3.0, real_cfg=real_cfg)
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path)
    d.train()
    assert scales and set(scales) == {3.0 if real_cfg is None else 1.5}
    assert d.cache.cfg == 3.0  # the teachers' targets keep their own guidance
    with pytest.raises(ValueError, match="real_cfg"):
        _config(real_cfg=0.0)


def test_ablation_switches_drop_their_losses(tmp_path: Path) -> None:
    rec = Recorder()
    cfg = _config(p_switch=1.0, ta_fm=False, target_simulation=False, aop=False, steps=2)
    CollectionDistiller(_backbone(), *_data(), cfg, tmp_path, rec).train()
    assert all("dmd_bs" in m and "ta_fm" not in m and "dmd_ts" not in m for m in rec.metrics)
    with pytest.raises(ValueError, match="at least one"):
        _config(ta_fm=False, target_simulation=False, backward_simulation=False)


@pytest.mark.parametrize(
    "extra",
    [
        {},  # the tiny preset
        {"ema_decay": 0.0, "lr_schedule": "constant", "ta_fm_batch": None},  # the paper's
    ],
)
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path: Path, extra: dict) -> None:
    full = CollectionDistiller(_backbone(), *_data(), _config(**extra), tmp_path / "a")
    full.train()
    want = {k: v.clone() for k, v in adapter_params(full.tr, "student").items()}

    rec = Recorder(stop_at=2)
    first = CollectionDistiller(_backbone(), *_data(), _config(**extra), tmp_path / "b", rec)
    res = first.train()
    assert res.stopped and res.steps == 2 and rec.checkpoints[-1] == 2
    second = CollectionDistiller(
        _backbone(), *_data(), _config(**extra), tmp_path / "b"
    )  # a fresh process would do this
    res = second.train()
    assert res.steps == 4 and not res.stopped
    got = adapter_params(second.tr, "student")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_micro_batches_route_independently_and_accumulate(tmp_path: Path) -> None:
    """Each micro-batch draws its own stream (as the paper's GPUs do); one optimizer step per update,
    five critic steps per update, whatever the number of micro-batches."""
    rec = Recorder()
    d = CollectionDistiller(
        _backbone(), *_data(), _config(micro_batches=4, p_switch=0.5, steps=6), tmp_path, rec
    )
    counts = {"g": 0, "f": 0, "routes": 0}
    g_step, f_step, route = d.opt_g.step, d.opt_f.step, d._route
    d.opt_g.step = lambda *a, **k: (counts.__setitem__("g", counts["g"] + 1), g_step(*a, **k))[1]
    d.opt_f.step = lambda *a, **k: (counts.__setitem__("f", counts["f"] + 1), f_step(*a, **k))[1]
    d._route = lambda: (counts.__setitem__("routes", counts["routes"] + 1), route())[1]
    d.train()
    assert counts["g"] == 6 and counts["f"] == 6 * d.cfg.critic_updates
    assert counts["routes"] == 6 * 4  # one draw per micro-batch: its critic pool and its generator loss
    shares = [m["effect_stream"] for m in rec.metrics]
    assert all(s in (0.0, 0.25, 0.5, 0.75, 1.0) for s in shares)
    assert any(0.0 < s < 1.0 for s in shares)  # both streams inside one update


def test_critic_draws_target_and_backward_simulation_samples_equally(tmp_path: Path) -> None:
    """The generator probes as many target-simulation samples as backward-simulation ones, so the
    critic must see both as often, although the rollout pool holds one TS sample per student step."""
    d = CollectionDistiller(_backbone(), *_data(), _config(p_switch=1.0, batch=3), tmp_path)
    d.cache.build()
    pool = d.critic_pools()[0]
    n_ts = d.cfg.batch
    assert len(pool.samples) == (d.cfg.student_steps + 1) * n_ts
    torch.testing.assert_close(pool.weights[-n_ts:].sum(), pool.weights[:-n_ts].sum())
    draws = torch.multinomial(
        pool.weights, 4000, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    assert 0.45 < (draws >= len(pool.samples) - n_ts).float().mean() < 0.55
    general = CollectionDistiller(_backbone(), *_data(), _config(p_switch=0.0, batch=3), tmp_path / "g")
    assert torch.allclose(general.critic_pools()[0].weights, torch.tensor(1.0 / d.cfg.student_steps))


def test_batched_critic_pools_match_each_micro_batch_rolled_out_alone(tmp_path: Path) -> None:
    """The micro-batches' rollouts share one batched forward per student step; prompts of different
    lengths are padded there, which must not change any micro-batch's samples."""
    d = CollectionDistiller(_backbone(), *_data(), _config(micro_batches=3, p_switch=0.5, seed=5), tmp_path)
    d.cache.build()
    noises: list[torch.Tensor] = []
    make_noise = d._noise
    d._noise = lambda batch: noises.append(make_noise(batch)) or noises[-1]
    routes = iter(["effect", "general", "effect"])
    d._route = lambda: next(routes)
    pools = d.critic_pools()
    assert len(pools) == 3 and len({p.cond.embeds.shape[1] for p in pools}) > 1  # lengths differ
    for pool, noise in zip(pools, noises, strict=True):
        n = d.cfg.student_steps * len(noise)
        cond = pool.cond.select(slice(0, len(noise)))
        alone = rollout_x0s(d._velocity([trainer_mod.STUDENT], cond), noise, d.sigmas)
        torch.testing.assert_close(pool.samples[:n], alone.flatten(0, 1), atol=1e-5, rtol=1e-4)


def test_generator_backward_simulation_resumes_the_critic_pools_rollout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generator update reuses its step's critic draws: its backward-simulation sample starts from
    the pool's rollout state at the exit step, which is what a fresh rollout of the (unchanged) student
    from the same noise reaches, and it runs no sampler steps of its own."""
    d = CollectionDistiller(_backbone(), *_data(), _config(micro_batches=2, p_switch=0.5, seed=4), tmp_path)
    d.cache.build()
    noises: list[torch.Tensor] = []
    make_noise = d._noise
    d._noise = lambda batch: noises.append(make_noise(batch)) or noises[-1]
    routes = iter(["effect", "general"])
    d._route = lambda: next(routes)
    d.critic_pools()
    draws = d._draws
    student = d._velocity([trainer_mod.STUDENT], draws[0][1]["c_fake"])
    for k in (0, 2, d.cfg.student_steps - 1):
        torch.testing.assert_close(
            trainer_mod.exit_step_x0(student, draws[0][1]["states"][k], d.sigmas, k),
            trainer_mod.backward_simulation(student, noises[0], d.sigmas, k),
            atol=1e-5,
            rtol=1e-4,
        )
    calls = {"bs": 0}
    bs = trainer_mod.backward_simulation
    monkeypatch.setattr(
        trainer_mod,
        "backward_simulation",
        lambda *a, **k: (calls.__setitem__("bs", calls["bs"] + 1), bs(*a, **k))[1],
    )
    d._route = lambda: pytest.fail("the generator must not draw again")
    m = d.generator_step()
    assert calls["bs"] == 0 and m["effect_stream"] == 0.5 and d._draws is None


def test_ta_fm_batch_draws_extra_targets_of_the_same_effect_for_the_anchor_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, list[int]] = {"fm": [], "dmd": []}
    fm, dmd = trainer_mod.flow_matching_loss, trainer_mod.dmd_step
    monkeypatch.setattr(
        trainer_mod, "flow_matching_loss", lambda v, x0, e: seen["fm"].append(len(v)) or fm(v, x0, e)
    )
    monkeypatch.setattr(
        trainer_mod, "dmd_step", lambda x, *a, **k: seen["dmd"].append(len(x)) or dmd(x, *a, **k)
    )
    cfg = _config(p_switch=1.0, batch=2, ta_fm_batch=5, steps=2)
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path)
    d.train()
    assert seen["fm"] and set(seen["fm"]) == {5}
    assert set(seen["dmd"]) == {2}  # target and backward simulation keep the batch
    with pytest.raises(ValueError, match="ta_fm_batch"):
        _config(ta_fm_batch=0)


def test_ta_fm_noise_levels_follow_the_configured_sampling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    levels: list[float] = []
    add = trainer_mod.add_noise
    monkeypatch.setattr(trainer_mod, "add_noise", lambda x, e, s: levels.extend(s.tolist()) or add(x, e, s))
    cfg = _config(p_switch=1.0, target_simulation=False, backward_simulation=False, ta_fm_timesteps="student")
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path)
    d.train()
    visited = {round(float(s), 5) for s in d.sigmas[:-1]}  # the student's sampler's levels, no final 0
    assert len(levels) >= cfg.steps * cfg.micro_batches * cfg.ta_fm_batch
    assert {round(s, 5) for s in levels} == visited
    levels.clear()
    cfg = _config(p_switch=1.0, target_simulation=False, backward_simulation=False, ta_fm_timesteps="uniform")
    CollectionDistiller(_backbone(), *_data(), cfg, tmp_path / "u").train()
    assert len({round(s, 5) for s in levels}) == len(levels) and min(levels) > 0.0 and max(levels) < 1.0
    with pytest.raises(ValueError, match="ta_fm_timesteps"):
        _config(ta_fm_timesteps="cubic")


def test_ta_fm_extra_any_anchors_other_effects_with_their_own_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _config(p_switch=1.0, batch=2, ta_fm_batch=12, ta_fm_extra="any", effect_sampling="loss", steps=1)
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path)
    d.cache.build()
    encoded: list[list[str]] = []
    enc = d._encode
    monkeypatch.setattr(d, "_encode", lambda prompts, src: encoded.append(list(prompts)) or enc(prompts, src))
    picks, y, _ = d._anchor_targets(0, 10)
    assert len(picks) == len(y) == 10 and set(picks) == {0, 1}  # both effects among 10 draws
    assert encoded[-1] == [d._student_prompt(j) for j in picks]  # each target with its effect's prompt
    for j in (0, 1):  # the targets are that effect's cached teacher outputs
        mine = y[torch.tensor(picks) == j]
        assert all(any(torch.equal(t, c) for c in d.cache.targets[j]) for t in mine)
    d.train()
    assert not d.effect_loss.isnan().any()
    with pytest.raises(ValueError, match="ta_fm_extra"):
        _config(ta_fm_extra="other")


def test_loss_based_effect_sampling_favours_the_effects_with_a_high_anchor_loss(tmp_path: Path) -> None:
    cfg = _config(p_switch=1.0, effect_sampling="loss", steps=3)
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path)
    d.train()
    assert not d.effect_loss.isnan().any()  # both effects were drawn and their TA-FM losses kept
    resumed = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path / "r")
    resumed.load(d.save(tmp_path / "ckpt"))  # the running losses travel with the checkpoint
    torch.testing.assert_close(resumed.effect_loss, d.effect_loss)
    d.effect_loss = torch.tensor([3.0, 1.0])
    draws = torch.tensor([d._pick_effect() for _ in range(4000)])
    assert abs(float((draws == 0).float().mean()) - (0.25 + 0.5 * 3 / 4)) < 0.03  # half uniform, half by loss
    d.effect_loss = torch.tensor([float("nan"), 1.0])  # not seen yet: counts as the worst seen
    draws = torch.tensor([d._pick_effect() for _ in range(4000)])
    assert abs(float((draws == 0).float().mean()) - 0.5) < 0.03
    with pytest.raises(ValueError, match="needs ta_fm"):
        _config(effect_sampling="loss", ta_fm=False)


def test_a_checkpoint_student_loads_as_it_would_be_exported(tmp_path: Path) -> None:
    cfg = _config(steps=3, ema_decay=0.5, student_lora={"rank": 6, "alpha": 6.0})
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path)
    d.train()  # finished: the student adapter now holds its EMA
    want = {k: v.detach().clone() for k, v in adapter_params(d.tr, "student").items()}
    bb = _backbone()
    meta = trainer_mod.load_checkpoint_student(bb.transformer, tmp_path / "checkpoints" / "step-000003", "x")
    assert meta["step"] == 3
    got = adapter_params(bb.transformer, "x")
    assert got["transformer_blocks.0.attn.to_q.lora_A"].shape[0] == 6  # the run's rank, from its config
    for k, v in want.items():
        torch.testing.assert_close(got[k], v)


def test_only_the_newest_checkpoints_stay_on_disk(tmp_path: Path) -> None:
    rec = Recorder()
    CollectionDistiller(
        _backbone(), *_data(), _config(steps=5, checkpoint_every=1, keep_checkpoints=2), tmp_path / "a", rec
    ).train()
    assert rec.checkpoints == [1, 2, 3, 4, 5]  # every one reported as it was written
    assert [p.name for p in list_checkpoints(tmp_path / "a" / "checkpoints")] == [
        "step-000004",
        "step-000005",
    ]
    CollectionDistiller(
        _backbone(), *_data(), _config(steps=3, checkpoint_every=1, keep_checkpoints=None), tmp_path / "b"
    ).train()
    assert len(list_checkpoints(tmp_path / "b" / "checkpoints")) == 3  # None: every one kept
    with pytest.raises(ValueError, match="keep_checkpoints"):
        _config(keep_checkpoints=0)


def test_cosine_lr_and_the_ema_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both optimizers follow the schedule; the EMA is an average of the live weights after each
    update, and the finished student (what is exported) is that EMA, not the last update."""
    cfg = _config(steps=3, ema_decay=0.5, lr_schedule="cosine", lr_min_ratio=0.2)
    assert cfg.lr_factor(0) == 1.0 and abs(cfg.lr_factor(3) - 0.2) < 1e-9
    assert cfg.lr_factor(1) > cfg.lr_factor(2) > 0.2
    assert _config(lr_schedule="constant").lr_factor(2) == 1.0
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path)
    lrs, lives, critic_lrs = [], [], []
    init = [p.detach().clone() for p in d.student_params]
    step, f_step = d.opt_g.step, d.opt_f.step
    d.opt_f.step = lambda *a, **k: critic_lrs.append(d.opt_f.param_groups[0]["lr"]) or f_step(*a, **k)

    def spy(*a, **k):
        lrs.append((d.opt_g.param_groups[0]["lr"], d.opt_f.param_groups[0]["lr"]))
        out = step(*a, **k)
        lives.append([p.detach().clone() for p in d.student_params])
        return out

    d.opt_g.step = spy
    d.train()
    for i, (g, f) in enumerate(lrs):
        assert g == pytest.approx(cfg.lr_student * cfg.lr_factor(i))
        assert f == pytest.approx(cfg.lr_fake * cfg.lr_factor(i))
    per_step = cfg.critic_updates  # the critic updates of step i run at step i's lr
    assert critic_lrs == pytest.approx(
        [cfg.lr_fake * cfg.lr_factor(i // per_step) for i in range(3 * per_step)]
    )
    ema = init  # decay min(0.5, (1 + step) / (10 + step)): 0.1 at step 0
    for i, live in enumerate(lives):
        dec = min(0.5, (1 + i) / (10 + i))
        ema = [dec * e + (1 - dec) * w for e, w in zip(ema, live, strict=True)]
    assert len(lives) == 3
    assert any(not torch.allclose(a, b) for a, b in zip(ema, lives[-1], strict=True))
    for got, want in zip(d.student_params, ema, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lr_schedule"):
        _config(lr_schedule="linear")


def test_coarse_stage_trains_the_anchor_alone_then_the_full_objective(tmp_path: Path) -> None:
    """``coarse_ratio`` x ``steps`` TA-FM-only updates (no critic work, the fake score untouched, targets of
    several effects per batch), then ``steps`` of the full objective on their own lr schedule."""
    cfg = _config(
        coarse_ratio=1.5,
        steps=2,
        p_switch=1.0,
        critic_updates=2,
        lr_schedule="cosine",
        coarse_lr=0.01,
        coarse_lr_schedule="constant",
    )
    assert cfg.total_steps == 5 and cfg.lr_factor(2) == 1.0 and cfg.lr_factor(3) == 1.0
    assert cfg.lr_factor(4) < 1.0
    assert [cfg.student_lr_at(i) for i in (0, 2, 3)] == [0.01, 0.01, cfg.lr_student]
    rec = Recorder()
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path, rec)
    fake0 = [p.detach().clone() for p in d.fake_params]
    counts = {"f": 0}
    f_step = d.opt_f.step
    d.opt_f.step = lambda *a, **k: (counts.__setitem__("f", counts["f"] + 1), f_step(*a, **k))[1]
    anchored: list[list[int]] = []
    anchor = d._anchor_targets
    d._anchor_targets = lambda i, n, mixed=False: (lambda r: anchored.append(r[0]) or r)(anchor(i, n, mixed))
    student0 = [p.detach().clone() for p in d.student_params]
    lrs: list[float] = []
    g_step = d.opt_g.step
    d.opt_g.step = lambda *a, **k: lrs.append(d.opt_g.param_groups[0]["lr"]) or g_step(*a, **k)
    d.train()
    assert lrs[:3] == [0.01] * 3 and lrs[3] == pytest.approx(cfg.lr_student)  # then the full step's lr
    coarse, full = rec.metrics[:3], rec.metrics[3:]
    assert all(m["coarse"] == 1.0 and "dmd_ts" not in m and "dmd_bs" not in m for m in coarse)
    assert all("coarse" not in m and {"ta_fm", "dmd_ts", "dmd_bs", "critic"} <= set(m) for m in full)
    assert counts["f"] == 2 * 2  # critic updates only before the full steps
    assert len(anchored) >= 3 and any(len(set(p)) > 1 for p in anchored[:3])  # effects mixed per batch
    assert any(not torch.equal(a, b) for a, b in zip(student0, d.student_params, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(fake0, d.fake_params, strict=True))
    assert rec.step == 5 and 3 in rec.checkpoints and 5 in rec.checkpoints


def test_a_cosine_coarse_stage_decays_its_own_lr_then_the_full_objective_starts_at_its_own(
    tmp_path: Path,
) -> None:
    cfg = _config(
        coarse_ratio=2.0,
        steps=2,
        critic_updates=1,
        coarse_lr=0.01,
        coarse_lr_schedule="cosine",
        lr_min_ratio=0.1,
        lr_schedule="constant",
    )
    want = [0.01 * f for f in (1.0, 0.868198, 0.55, 0.231802)]  # 0.1 + 0.9 x (1 + cos(pi k / 4)) / 2
    assert [cfg.lr_factor(i) * cfg.student_lr_at(i) for i in range(4)] == pytest.approx(want)
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path)
    lrs: list[float] = []
    g_step = d.opt_g.step
    d.opt_g.step = lambda *a, **k: lrs.append(d.opt_g.param_groups[0]["lr"]) or g_step(*a, **k)
    d.train()
    assert lrs[:4] == pytest.approx(want) and lrs[4:] == pytest.approx([cfg.lr_student] * 2)
    with pytest.raises(ValueError, match="coarse_lr_schedule"):
        _config(coarse_lr_schedule="step")


def test_the_coarse_stage_routes_general_draws_to_the_bases_own_edits(tmp_path: Path) -> None:
    from distill.targets import base_outputs

    rec = Recorder()
    cfg = _config(coarse_ratio=2.0, steps=4, p_switch=0.5)
    effects, general = _data()
    d = CollectionDistiller(_backbone(), effects, general, cfg, tmp_path, rec)
    d.train()
    coarse = [m for m in rec.metrics if m.get("coarse")]
    assert len(coarse) == 8
    assert any("ta_fm_general" in m for m in coarse) and any("ta_fm" in m for m in coarse)
    want = base_outputs(
        d.bb, d.general_images, general.instructions, cfg.target_steps, cfg.teacher_cfg, 3 + 7919
    )
    torch.testing.assert_close(d._general_targets, want)
    assert (tmp_path / "targets" / "_general.safetensors").exists()


@pytest.mark.parametrize("fake_init", [True, False])
def test_the_critic_starts_the_full_objective_as_a_copy_of_the_student(
    tmp_path: Path, fake_init: bool
) -> None:
    cfg = _config(coarse_ratio=1.0, steps=2, critic_updates=1, coarse_fake_init=fake_init)
    d = CollectionDistiller(_backbone(), *_data(), cfg, tmp_path)
    seen = []
    pools = d.critic_pools

    def spy():  # the critic work of each full step, with the weights it starts from
        seen.append(
            [(f.detach().clone(), s.detach().clone()) for f, s in zip(d.fake_params, d.student_params)]
        )
        return pools()

    d.critic_pools = spy
    d.train()
    assert len(seen) == 2  # none in the coarse stage
    first = seen[0]
    assert all(torch.equal(f, s) for f, s in first) == fake_init
    assert any(not torch.equal(f, s) for f, s in seen[1])  # then each trains on its own
    with pytest.raises(ValueError, match="one LoRA shape"):
        _config(coarse_ratio=1.0, fake_lora={"rank": 4, "alpha": 4.0})
    _config(coarse_ratio=1.0, coarse_fake_init=False, fake_lora={"rank": 4, "alpha": 4.0})


def test_no_coarse_stage_without_ta_fm_or_an_effect_stream() -> None:
    assert _config(coarse_ratio=2.0, ta_fm=False).total_steps == 4
    assert _config(coarse_ratio=2.0, p_switch=0.0).total_steps == 4  # Lightning: the general stream alone
    assert _config(coarse_ratio=2.0).total_steps == 12
    assert _config(coarse_ratio=0.5, steps=10).total_steps == 15
    with pytest.raises(ValueError, match="coarse_ratio"):
        _config(coarse_ratio=-1)


def test_a_run_stopped_in_the_coarse_stage_resumes_into_the_same_trajectory(tmp_path: Path) -> None:
    cfg = dict(coarse_ratio=1.5, steps=2)
    full = CollectionDistiller(_backbone(), *_data(), _config(**cfg), tmp_path / "a")
    full.train()
    want = {k: v.clone() for k, v in adapter_params(full.tr, "student").items()}
    rec = Recorder(stop_at=2)
    res = CollectionDistiller(_backbone(), *_data(), _config(**cfg), tmp_path / "b", rec).train()
    assert res.stopped and res.steps == 2
    second = CollectionDistiller(_backbone(), *_data(), _config(**cfg), tmp_path / "b")
    res = second.train()
    assert res.steps == 5 and not res.stopped
    got = adapter_params(second.tr, "student")
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_compile_coarse_defaults_to_long_coarse_stages_only() -> None:
    assert not _config(coarse_ratio=10.0, steps=100).compiles_coarse  # 1000 coarse steps: not worth it
    assert _config(coarse_ratio=20.0, steps=100).compiles_coarse
    assert not _config(coarse_ratio=20.0, steps=100, compile_coarse=False).compiles_coarse
    assert _config(coarse_ratio=1.0, steps=2, compile_coarse=True).compiles_coarse
    assert not _config(coarse_ratio=0.0, compile_coarse=True).compiles_coarse  # no coarse stage


def test_compiled_coarse_steps_update_the_student_as_eager_ones_do(tmp_path: Path) -> None:
    """The compiled TA-FM call is the same computation: from one state, with one RNG, two coarse
    steps land on the same student; the full objective after them runs eagerly."""
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    students = []
    for compiled in (False, True):
        cfg = _config(coarse_ratio=1.0, steps=2, p_switch=0.5, compile_coarse=compiled, critic_updates=1)
        bb = _backbone()
        d = CollectionDistiller(bb, *_data(), cfg, tmp_path / str(compiled))
        calls = {"compiled": 0}
        real = bb.compiled

        def counting(real=real, calls=calls):
            calls["compiled"] += 1
            return real()

        bb.compiled = counting
        d.train()
        assert calls["compiled"] == (2 if compiled else 0)  # the two coarse steps' micro-batches only
        assert not bb._use_compiled
        students.append([p.detach().clone() for p in d.student_params])
    # Adam moves each weight by ~lr (2e-3) a step whatever its gradient's size, so float noise between
    # the kernels can move a near-zero-gradient weight by ~1e-5; a different computation moves it by ~lr
    for a, b in zip(*students, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_a_failing_compile_falls_back_to_eager_for_the_rest_of_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _config(coarse_ratio=1.5, steps=2, p_switch=1.0, compile_coarse=True, critic_updates=1)
    bb = _backbone()
    d = CollectionDistiller(bb, *_data(), cfg, tmp_path)
    tries = {"n": 0}

    def broken():
        tries["n"] += 1
        raise RuntimeError("no C++ compiler")

    bb.compiled = broken
    student0 = [p.detach().clone() for p in d.student_params]
    with caplog.at_level("WARNING", logger="distill.trainer"):
        result = d.train()
    assert result.steps == cfg.total_steps == 5 and tries["n"] == 1  # tried once, then eager
    assert "runs eagerly" in caplog.text and "no C++ compiler" in caplog.text
    assert any(not torch.equal(a, b) for a, b in zip(student0, d.student_params, strict=True))


def test_offloaded_teachers_train_the_same_student(tmp_path: Path) -> None:
    """The paper-scale default keeps teachers in CPU memory between uses; on one device the run
    must be the same as with them resident."""
    students = []
    for offload in (False, True):
        bb = _backbone()
        effects, general = _data()
        cfg = _config(offload_teachers=offload)
        d = CollectionDistiller(bb, effects, general, cfg, tmp_path / str(offload))
        assert set(adapters.offloaded_devices(bb.transformer)) == ({"teacher-red"} if offload else set())
        d.train()
        students.append(adapter_params(bb.transformer, "student"))
    for name, p in students[0].items():
        assert torch.allclose(p, students[1][name], atol=1e-6), name
