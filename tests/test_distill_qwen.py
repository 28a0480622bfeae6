"""The distillation loop on diffusers' Qwen-Image-Edit classes (tiny random components): a latent
backbone whose latents differ from its images in channels and size, on both PDSR streams."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from qwen_tiny import IMAGE_SIZE, Z_DIM, patch_image_sizes, tiny_qwen_components

from distill.backbones import adapters
from distill.backbones.qwen_image_edit import QwenImageEditBackbone
from distill.config import DistillConfig
from distill.targets import EffectSpec
from distill.trainer import STUDENT, CollectionDistiller, GeneralData, adapter_params


@pytest.fixture()
def bb(monkeypatch) -> QwenImageEditBackbone:
    patch_image_sizes(monkeypatch)
    return QwenImageEditBackbone.from_components(
        **tiny_qwen_components(), image_size=IMAGE_SIZE, device="cpu"
    )


@pytest.mark.parametrize("p_switch", [0.0, 1.0], ids=["general-stream", "effect-stream"])
def test_distiller_trains_the_student_on_the_qwen_backbone(tmp_path: Path, bb, p_switch) -> None:
    torch.manual_seed(0)
    for p in adapters.add_lora(bb.transformer, "teacher-a", adapters.LoraSpec(rank=4, alpha=4.0)):
        with torch.no_grad():
            p.normal_(0, 0.1)
    adapters.set_trainable(bb.transformer, [])
    g = torch.Generator().manual_seed(1)
    src = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g) * 2 - 1
    effects = [EffectSpec("a", "teacher-a", "Make it a.", "<a_Xq1> Apply effect a.", src)]
    general = GeneralData(src.flip(0), ["Keep it.", "Flip it.", "Keep it."])
    cfg = DistillConfig.for_backbone(
        "qwen-image-edit",
        steps=2,
        batch=1,
        critic_updates=2,
        target_steps=2,
        target_general_sources=1,
        target_refresh_every=0,
        student_steps=2,
        checkpoint_every=10,
        sample_every=0,
        coarse_ratio=1.0,  # two coarse TA-FM steps (general anchors included), then two full ones
        p_switch=p_switch,
        seed=0,
    )
    d = CollectionDistiller(bb, effects, general, cfg, tmp_path)
    assert bb.encode_images(src).shape[1] == Z_DIM != 3  # latents are not images here
    d.train()
    moved = [
        not torch.all(p == 0) for n, p in adapter_params(bb.transformer, STUDENT).items() if "lora_B" in n
    ]
    assert any(moved)
    assert all(torch.isfinite(p).all() for p in adapter_params(bb.transformer, STUDENT).values())


def test_student_schedule_is_the_samplers_on_latents(tmp_path: Path, bb) -> None:
    """The student trains on the sigmas its 8-step sampler will use: the dynamic shift is set by the
    number of latent tokens, not of pixels (at 1024 px the pixel count would shift every sigma to ~1)."""
    from distill.flow import sigma_schedule

    src = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cfg = DistillConfig.for_backbone(
        "qwen-image-edit", student_steps=8, coarse_ratio=0.0, sample_every=0, p_switch=0.0
    )
    d = CollectionDistiller(bb, [], GeneralData(src, ["Keep it.", "Flip it."]), cfg, tmp_path)
    latents = bb.encode_images(src)
    expected = sigma_schedule(8, bb.image_seq_len(tuple(latents.shape)), bb.schedule)
    assert torch.allclose(d.sigmas.cpu(), expected)
