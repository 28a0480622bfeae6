"""The qwen-image-edit backbone against diffusers' own QwenImageEditPlusPipeline (tiny random components)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline
from qwen_tiny import IMAGE_SIZE, LATENTS_MEAN, LATENTS_STD, patch_image_sizes, tiny_qwen_components

from distill.backbones.qwen_image_edit import QwenImageEditBackbone, check_model_source
from distill.backbones.registry import load_backbone
from distill.flow import calculate_mu, sigma_schedule
from distill.images import to_pil, to_tensor
from distill.sampling import euler_sample

LATENT = IMAGE_SIZE // 4  # VAE factor 4


def smooth_images(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Quantised (exactly representable as PIL) smooth random images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(
        torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear"
    )
    return to_tensor(to_pil(x * 2 - 1))


@pytest.fixture()
def sizes(monkeypatch):
    patch_image_sizes(monkeypatch)


@pytest.fixture()
def components():
    return tiny_qwen_components()


@pytest.fixture()
def backbone(components, sizes):
    return QwenImageEditBackbone.from_components(**components, image_size=IMAGE_SIZE, device="cpu")


def test_encode_decode_shapes_and_normalisation(backbone):
    images = smooth_images(2)
    latents = backbone.encode_images(images)
    assert latents.shape == (2, 4, LATENT, LATENT)
    assert backbone.image_seq_len(latents.shape) == (LATENT // 2) ** 2

    # Reference: the raw VAE (posterior mode), normalised with the config's mean / std.
    mean = torch.tensor(LATENTS_MEAN).view(1, 4, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, 4, 1, 1)
    with torch.no_grad():
        raw = backbone.vae.encode(images.unsqueeze(2)).latent_dist.mode()[:, :, 0]
        torch.testing.assert_close(latents, (raw - mean) / std, rtol=1e-5, atol=1e-5)

        decoded = backbone.decode_latents(latents)
        assert decoded.shape == images.shape and decoded.dtype == torch.float32
        assert decoded.min() >= -1 and decoded.max() <= 1
        # Round trip: the normalisation cancels, leaving the VAE's own reconstruction.
        recon = backbone.vae.decode(raw.unsqueeze(2)).sample[:, :, 0].clamp(-1, 1)
        torch.testing.assert_close(decoded, recon, rtol=1e-4, atol=1e-4)


def test_encode_images_resizes_to_working_resolution(backbone):
    latents = backbone.encode_images(smooth_images(1, size=2 * IMAGE_SIZE))
    assert latents.shape == (1, 4, LATENT, LATENT)


def test_image_size_must_fit_the_patches(components, sizes):
    with pytest.raises(ValueError, match="multiple of 8"):
        QwenImageEditBackbone.from_components(**components, image_size=36, device="cpu")


def test_encode_prompt_reads_image_and_text_and_pads(backbone, monkeypatch):
    images = smooth_images(2)
    cond = backbone.encode_prompt(["Make it red.", "Turn the whole picture into a pencil sketch."], images)
    assert cond.embeds.shape[0] == 2 and cond.embeds.shape[2] == 16
    assert cond.source_latents.shape == (2, 4, LATENT, LATENT)
    lengths = cond.mask.sum(1)
    assert lengths[1] - lengths[0] == len("Turn the whole picture into a pencil sketch.") - len(
        "Make it red."
    )
    assert cond.embeds.shape[1] == lengths.max()
    assert (cond.embeds[0, lengths[0] :] == 0).all()

    # Each row is the pipeline's own encoding of that prompt with its image alone.
    alone = backbone.encode_prompt(["Make it red."], images[:1])
    torch.testing.assert_close(cond.embeds[0, : lengths[0]], alone.embeds[0], rtol=1e-5, atol=1e-5)

    # The text encoder sees the source image ...
    other = backbone.encode_prompt(["Make it red."], smooth_images(1, seed=5))
    assert not torch.allclose(other.embeds, alone.embeds, atol=1e-4)
    # ... at the pipeline's CONDITION_IMAGE_SIZE area (more pixels, more vision tokens).
    patch_image_sizes(monkeypatch, condition=112 * 112)
    larger = backbone.encode_prompt(["Make it red."], images[:1])
    assert larger.embeds.shape[1] > alone.embeds.shape[1]


def test_velocity_equals_the_pipeline_transformer_call(backbone, components):
    """Pack, append source tokens, img_shapes, t/1000, slice, unpack: as the pipeline does."""
    pipe = QwenImageEditPlusPipeline(**components)
    images = smooth_images(2)
    prompts = ["Make it red.", "Flip it upside down, please."]
    cond = backbone.encode_prompt(prompts, images)
    x = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([0.7, 0.3])
    with torch.no_grad():
        ours = backbone.predict_velocity(x, s, cond)
    assert ours.shape == x.shape

    vsf = pipe.vae_scale_factor
    for i, (prompt, pil) in enumerate(zip(prompts, to_pil(images), strict=True)):
        with torch.no_grad():
            # CONDITION_IMAGE_SIZE 56*56 -> calculate_dimensions rounds to 64x64
            embeds, mask = pipe.encode_prompt(
                prompt, image=[pipe.image_processor.resize(pil, 64, 64)], device="cpu"
            )
            vae_image = pipe.image_processor.preprocess(pil, IMAGE_SIZE, IMAGE_SIZE).unsqueeze(2)
            latents, image_latents = pipe.prepare_latents(
                [vae_image], 1, 4, IMAGE_SIZE, IMAGE_SIZE, torch.float32, "cpu", None, x[i : i + 1]
            )
            latents = pipe._pack_latents(latents, 1, 4, LATENT, LATENT)
            side = IMAGE_SIZE // vsf // 2
            ref = pipe.transformer(
                hidden_states=torch.cat([latents, image_latents], dim=1),
                timestep=s[i : i + 1],  # the pipeline's t / 1000
                encoder_hidden_states_mask=mask,
                encoder_hidden_states=embeds,
                img_shapes=[[(1, side, side), (1, side, side)]],
                return_dict=False,
            )[0][:, : latents.size(1)]
            ref = pipe._unpack_latents(ref, IMAGE_SIZE, IMAGE_SIZE, vsf)[:, :, 0]
        torch.testing.assert_close(ours[i : i + 1], ref, rtol=1e-4, atol=1e-5)


def test_schedule_matches_the_pipeline_scheduler(backbone, components):
    scheduler = components["scheduler"]
    seq = backbone.image_seq_len((1, 16, 128, 128))
    cfg = backbone.schedule
    mu = calculate_mu(seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=mu)
    torch.testing.assert_close(sigma_schedule(8, seq, cfg), scheduler.sigmas.float())


def test_euler_sample_equals_the_diffusers_pipeline(backbone, components):
    """Two steps without CFG through our interface give the pipeline's own output image."""
    pipe = QwenImageEditPlusPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    images = smooth_images(1, seed=3)
    noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(2))
    prompt = "Make the sky purple."
    ours = euler_sample(backbone, backbone.encode_prompt([prompt], images), steps=2, noise=noise)
    theirs = pipe(
        to_pil(images)[0],
        prompt,
        num_inference_steps=2,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        latents=pipe._pack_latents(noise, 1, 4, LATENT, LATENT),
        output_type="pt",
    ).images
    torch.testing.assert_close((ours.images + 1) / 2, theirs, rtol=1e-4, atol=1e-4)


def test_euler_sample_with_cfg(backbone):
    images = smooth_images(2, seed=4)
    cond = backbone.encode_prompt(["Make it red.", "Make it blue."], images)
    uncond = backbone.encode_prompt(["", ""], images)
    guided = euler_sample(backbone, cond, uncond=uncond, cfg_scale=4.0, steps=3, seed=0)
    plain = euler_sample(backbone, cond, steps=3, seed=0)
    assert guided.images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert guided.nfe == 6 and plain.nfe == 3
    assert torch.isfinite(guided.images).all()
    assert not torch.allclose(guided.latents, plain.latents, atol=1e-4)


def test_gradient_checkpointing_trains_through_velocity(components, sizes):
    bb = QwenImageEditBackbone.from_components(
        **components, image_size=IMAGE_SIZE, device="cpu", gradient_checkpointing=True
    )
    assert bb.transformer.is_gradient_checkpointing
    assert not any(p.requires_grad for p in bb.transformer.parameters())  # frozen base
    cond = bb.encode_prompt(["Make it red."], smooth_images(1))
    x = torch.randn(1, 4, LATENT, LATENT, requires_grad=True)
    bb.predict_velocity(x, torch.tensor([0.5]), cond).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_plain_pipeline_runs_with_tiny_components(components, sizes):
    pipe = QwenImageEditPlusPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = to_pil(smooth_images(1))[0]
    out = pipe(
        image,
        "Make it red.",
        negative_prompt=" ",
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=32,
        width=32,
    )
    assert out.images[0].size == (32, 32)


def test_load_from_a_local_folder(tmp_path, components, sizes):
    pipe = QwenImageEditPlusPipeline(**components)
    pipe.save_pretrained(tmp_path / "qwen")
    bb = load_backbone("qwen-image-edit", str(tmp_path / "qwen"), device="cpu", dtype=torch.float32)
    assert isinstance(bb, QwenImageEditBackbone) and bb.dtype == torch.float32
    assert bb.schedule.dynamic and bb.schedule.max_shift == 0.9


def test_registry_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown backbone 'sdxl'.*tiny, qwen-image-edit"):
        load_backbone("sdxl")
    with pytest.raises(FileNotFoundError, match="pretrain_tiny"):
        load_backbone("tiny", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="No model folder"):
        load_backbone("qwen-image-edit", str(tmp_path / "missing"), device="cpu")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        load_backbone("qwen-image-edit", str(tmp_path), device="cpu")
    assert check_model_source("Qwen/Qwen-Image-Edit-2509") == "Qwen/Qwen-Image-Edit-2509"


def test_registry_loads_tiny(tmp_path):
    from distill.backbones.tiny import TinyConfig, TinyEditor

    TinyEditor.random(TinyConfig(num_layers=1, head_dim=16, text_dim=32, text_layers=1)).save_pretrained(
        tmp_path
    )
    bb = load_backbone("tiny", str(tmp_path))
    assert isinstance(bb, TinyEditor) and bb.config.num_layers == 1
    with pytest.raises(ValueError, match="float32"):
        load_backbone("tiny", str(tmp_path), dtype=torch.bfloat16)


def test_without_text_encoder_uses_given_embeddings(components, sizes):
    full = QwenImageEditBackbone.from_components(**components, image_size=IMAGE_SIZE, device="cpu")
    cond = full.encode_prompt(["Make it red."], smooth_images(1))
    parts = {**components, "text_encoder": None, "tokenizer": None, "processor": None}
    bare = QwenImageEditBackbone.from_components(**parts, image_size=IMAGE_SIZE, device="cpu")
    x, s = torch.randn(1, 4, LATENT, LATENT), torch.tensor([0.4])
    with torch.no_grad():
        torch.testing.assert_close(bare.predict_velocity(x, s, cond), full.predict_velocity(x, s, cond))
    with pytest.raises(RuntimeError, match="without its text encoder"):
        bare.encode_prompt(["Make it red."], smooth_images(1))


def test_schedule_matches_the_scheduler_with_shift_terminal() -> None:
    """Qwen-Image's scheduler stretches its sigmas to end at shift_terminal=0.02: ours must too."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from distill.backbones.qwen_image_edit import schedule_from_scheduler_config
    from distill.flow import calculate_mu, sigma_schedule

    sched = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=8192,
        base_shift=0.5,
        max_shift=0.9,
        use_dynamic_shifting=True,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    cfg = schedule_from_scheduler_config(sched.config)
    steps, seq = 8, 1024
    mu = calculate_mu(seq, 256, 8192, 0.5, 0.9)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = sigma_schedule(steps, seq, cfg)
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-5, rtol=1e-5)
    assert abs(float(ours[-2]) - 0.02) < 1e-6


def test_cfg_renormalises_per_packed_token_like_the_pipeline() -> None:
    """The pipeline rescales true CFG by the norm of each packed 2x2 token: so does ours."""
    from distill.backbones.qwen_image_edit import PATCH, QwenImageEditBackbone
    from distill.backbones.tiny import pack

    v = torch.randn(2, 4, 8, 6)
    norm = QwenImageEditBackbone.guidance_norm(None, v)  # type: ignore[arg-type]
    want = pack(v, PATCH).norm(dim=-1)  # (B, tokens)
    got = pack(norm.expand(-1, 1, -1, -1), PATCH)[..., 0]  # one value per token, repeated over its pixels
    torch.testing.assert_close(got, want)
    assert torch.allclose(pack(norm, PATCH), got[..., None].expand(-1, -1, PATCH * PATCH))


def test_euler_sample_with_true_cfg_equals_the_diffusers_pipeline(backbone, components):
    """Two true-CFG steps (negative prompt " ", scale 4) give the pipeline's own image."""
    pipe = QwenImageEditPlusPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    images = smooth_images(1, seed=5)
    noise = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(6))
    prompt = "Turn it into a sketch."
    cond = backbone.encode_prompt([prompt], images)
    uncond = backbone.encode_prompt([backbone.negative_prompt], images)
    ours = euler_sample(backbone, cond, uncond=uncond, cfg_scale=4.0, steps=2, noise=noise)
    theirs = pipe(
        to_pil(images)[0],
        prompt,
        negative_prompt=backbone.negative_prompt,
        true_cfg_scale=4.0,
        num_inference_steps=2,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        latents=pipe._pack_latents(noise, 1, 4, LATENT, LATENT),
        output_type="pt",
    ).images
    torch.testing.assert_close((ours.images + 1) / 2, theirs, rtol=1e-4, atol=1e-4)
