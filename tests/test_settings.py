"""Typed configs from JSON dicts: unknown keys are named, lists come back as tuples, round trips hold."""

from __future__ import annotations

import json
import math

import pytest

from distill.backbones.adapters import LoraSpec
from distill.config import DistillConfig, budget_steps, extension_steps
from distill.lora_training import LoraTrainConfig
from distill.settings import checked_settings


def test_checked_settings_names_unknown_keys_and_restores_tuples() -> None:
    d = {"rank": 4, "target_modules": ["to_q", "to_k"]}
    out = checked_settings(LoraSpec, d, "nope: {names}")
    assert out == {"rank": 4, "target_modules": ("to_q", "to_k")} and d["target_modules"] == ["to_q", "to_k"]
    with pytest.raises(ValueError, match=r"^nope: rnak, zeta$"):
        checked_settings(LoraSpec, {"zeta": 1, "rank": 4, "rnak": 4}, "nope: {names}")


def test_configs_survive_json_and_reject_typos() -> None:
    distill = DistillConfig.for_backbone("tiny", student_lora=LoraSpec(rank=8, target_modules=("to_q",)))
    assert DistillConfig.from_dict(json.loads(json.dumps(distill.to_dict()))) == distill
    lora = LoraTrainConfig.for_backbone("tiny", rank=4)
    assert LoraTrainConfig.from_dict(json.loads(json.dumps(lora.to_dict()))) == lora

    with pytest.raises(ValueError, match=r"unknown distillation setting\(s\): lr_teacher"):
        DistillConfig.from_dict({**distill.to_dict(), "lr_teacher": 1.0})
    with pytest.raises(ValueError, match=r"unknown student_lora setting\(s\): rnak"):
        DistillConfig.from_dict({**distill.to_dict(), "student_lora": {"rnak": 4}})
    with pytest.raises(ValueError, match=r"Unknown LoRA training setting\(s\): bogus\."):
        LoraTrainConfig.from_dict({"bogus": 1})


def test_a_student_lora_shape_given_alone_is_the_critics_too() -> None:
    preset_alpha = DistillConfig.for_backbone("tiny").student_lora.alpha
    assert preset_alpha != LoraSpec().alpha  # else the merge below could not be told from a reset
    c = DistillConfig.for_backbone("tiny", student_lora={"rank": 8})  # merged into the preset's shape
    assert (c.student_lora.rank, c.student_lora.alpha) == (8, preset_alpha) and c.fake_lora == c.student_lora
    odd = {"student_lora": {"rank": 8}, "fake_lora": {"rank": 8, "alpha": 4.0}}
    with pytest.raises(ValueError, match="one LoRA shape"):  # the critic starts as a copy of the student
        DistillConfig.for_backbone("tiny", **odd)
    c = DistillConfig.for_backbone("tiny", **odd, coarse_fake_init=False)
    assert c.fake_lora.alpha == 4.0 and c.student_lora.alpha == preset_alpha


def test_the_presets_step_budget_grows_with_the_effects() -> None:
    tiny = DistillConfig.for_backbone("tiny")
    assert DistillConfig.for_backbone("tiny", 8).steps == tiny.steps  # what the preset was sized for
    assert DistillConfig.for_backbone("tiny", 3).steps == tiny.steps  # never fewer
    assert DistillConfig.for_backbone("tiny", 20).steps == math.ceil(tiny.steps * 20 / 8 / 10) * 10
    grown = DistillConfig.for_backbone("tiny", 20)
    assert grown.coarse == round(grown.coarse_ratio * grown.steps)  # the coarse stage grows with it
    assert DistillConfig.for_backbone("tiny", 20, steps=300).steps == 300  # steps given: kept
    assert DistillConfig.for_backbone("qwen-image-edit", 50).steps == 5000  # the paper's, for its 50
    assert DistillConfig.for_backbone("qwen-image-edit", 54).steps == 5400
    assert budget_steps(100, 9, 4) == 230  # 225, up to tens


def test_an_extension_gets_one_effects_share_per_new_effect() -> None:
    paper = DistillConfig.for_backbone("qwen-image-edit", 50).steps
    assert extension_steps(paper, 50) == 100  # Tab. 5: 100 generator steps per added effect
    assert extension_steps(320, 10) == 32
    assert extension_steps(320, 10, n_new=4) == 128
    assert extension_steps(5, 10) == 1  # rounded up, never zero


def test_an_extension_config_takes_the_share_and_the_extension_lr() -> None:
    ours = DistillConfig.for_backbone("tiny", 10)
    ext = ours.for_extension(10)
    assert ext.steps == extension_steps(ours.steps, 10) and ext.coarse_ratio == ours.coarse_ratio
    assert ext.coarse_lr == ours.extension_coarse_lr != ours.coarse_lr
    assert ext.lr_student == ours.lr_student  # only the coarse stage's lr changes
    paper = DistillConfig.for_backbone("qwen-image-edit", 50)  # no extension lr: the run's own
    assert paper.for_extension(50, 4).coarse_lr == paper.coarse_lr and paper.for_extension(50, 4).steps == 400
    with pytest.raises(ValueError, match="extension_coarse_lr"):
        DistillConfig(extension_coarse_lr=2.0)
