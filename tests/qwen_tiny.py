"""Tiny random Qwen-Image-Edit-2509 components, built in code (no hub, no files).

The sizes are diffusers' own test config for QwenImageEditPlusPipeline. Its test tokenizer comes
from the hub; here a byte-level Qwen2Tokenizer is built from the 256 byte symbols (no merges, so
one token per byte: the prompt template's 64 dropped tokens are always there) plus the special
tokens Qwen2.5-VL needs, with the text encoder's token ids set to match.

Used by the backbone tests and by anything that needs a real ``QwenImageEditPlusPipeline`` offline
(e.g. loading an exported LoRA into plain diffusers)::

    pipe = QwenImageEditPlusPipeline(**tiny_qwen_components())
    with tiny_image_sizes():  # or patch_image_sizes(monkeypatch)
        pipe(image, prompt, num_inference_steps=2, height=32, width=32)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
import torch
from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from tokenizers import pre_tokenizers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Areas the pipeline resizes to (the real ones are 384*384 and 1024*1024). 56x56 is the smallest
# image Qwen2VLImageProcessor accepts (4 vision tokens after merging); 32x32 VAE images give 8x8
# latents (VAE factor 4), i.e. 16 packed tokens.
CONDITION_IMAGE_SIZE = 56 * 56
VAE_IMAGE_SIZE = 32 * 32
IMAGE_SIZE = 32
Z_DIM = 4
# Non-trivial latent statistics so that the normalisation is exercised.
LATENTS_MEAN = [0.1, -0.2, 0.05, 0.3]
LATENTS_STD = [0.5, 1.5, 0.8, 2.0]


def tiny_tokenizer() -> Qwen2Tokenizer:
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=list(SPECIAL_TOKENS[1:]))


def tiny_text_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "vocab_size": len(tokenizer),
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_components(seed: int = 0, scheduler_config: dict | None = None) -> dict:
    """The six QwenImageEditPlusPipeline components, random, float32, on CPU (keyword dict)."""
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * Z_DIM,
        out_channels=Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=Z_DIM * 6,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(tokenizer)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor()
    )
    # Qwen-Image's scheduler (dynamic exponential shift, base/max shift 0.5/0.9, seq 256..8192),
    # minus its shift_terminal, which the ScheduleConfig of distill.flow does not model.
    scheduler = FlowMatchEulerDiscreteScheduler(
        **(
            scheduler_config
            or dict(
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=0.9,
                base_image_seq_len=256,
                max_image_seq_len=8192,
                time_shift_type="exponential",
            )
        )
    )
    return dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        scheduler=scheduler,
    )


def patch_image_sizes(monkeypatch, condition: int = CONDITION_IMAGE_SIZE, vae: int = VAE_IMAGE_SIZE) -> None:
    """Lower the pipeline module's resize areas for the test (pytest monkeypatch)."""
    monkeypatch.setattr(edit_plus, "CONDITION_IMAGE_SIZE", condition)
    monkeypatch.setattr(edit_plus, "VAE_IMAGE_SIZE", vae)


@contextlib.contextmanager
def tiny_image_sizes(condition: int = CONDITION_IMAGE_SIZE, vae: int = VAE_IMAGE_SIZE) -> Iterator[None]:
    """The same as ``patch_image_sizes`` for code without pytest's monkeypatch."""
    old = edit_plus.CONDITION_IMAGE_SIZE, edit_plus.VAE_IMAGE_SIZE
    edit_plus.CONDITION_IMAGE_SIZE, edit_plus.VAE_IMAGE_SIZE = condition, vae
    try:
        yield
    finally:
        edit_plus.CONDITION_IMAGE_SIZE, edit_plus.VAE_IMAGE_SIZE = old
