"""Qwen-Image-Edit-2509 as a backbone: diffusers ``QwenImageEditPlusPipeline`` components.

Everything is done the way the pipeline does it, with the pipeline's own pieces where it has them:
the instruction is read by Qwen2.5-VL together with the source image resized to the pipeline's
``CONDITION_IMAGE_SIZE`` area (``pipe.encode_prompt``, one prompt and one image at a time, since the
Plus pipeline's template puts every image of a call into every prompt); images go through the
``AutoencoderKLQwenImage`` with its ``latents_mean`` / ``latents_std`` normalisation
(``pipe._encode_vae_image`` and the pipeline's decode path); the noisy latents are packed into 2x2
patches with the source latents appended after them, ``img_shapes`` lists both, the timestep is
``s`` (the pipeline passes t / 1000) and the prediction is sliced back to the target tokens.

Latents cross the interface as (B, z_dim, h, w): the VAE's single frame axis is dropped.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as edit_plus
import torch
from diffusers import QwenImageEditPlusPipeline

from ..flow import ScheduleConfig
from ..images import to_pil
from .base import Backbone, Condition
from .tiny import pack, unpack

log = logging.getLogger(__name__)

HUB_ID = "Qwen/Qwen-Image-Edit-2509"
PATCH = 2  # the transformer packs 2x2 latent patches into one token
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def schedule_from_scheduler_config(config) -> ScheduleConfig:
    """The ScheduleConfig that reproduces a FlowMatchEulerDiscreteScheduler's sigmas as the
    pipeline sets them (``sigmas=linspace(1, 1/N, N)`` and ``mu`` from the image sequence length)."""
    get = config.get
    if get("time_shift_type", "exponential") != "exponential" and get("use_dynamic_shifting", False):
        log.warning("scheduler uses a linear dynamic time shift; sampling uses the exponential one")
    return ScheduleConfig(
        base_image_seq_len=int(get("base_image_seq_len", 256)),
        max_image_seq_len=int(get("max_image_seq_len", 4096)),
        base_shift=float(get("base_shift", 0.5)),
        max_shift=float(get("max_shift", 1.15)),
        dynamic=bool(get("use_dynamic_shifting", False)),
        shift=float(get("shift", 1.0)),
        shift_terminal=float(get("shift_terminal")) if get("shift_terminal") else None,
    )


def check_model_source(path_or_hub_id: str) -> str:
    """A local diffusers folder or a hub id; a clear error for anything else."""
    path = Path(path_or_hub_id).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"The folder {path} is not a Qwen-Image-Edit model: it has no model_index.json. "
                f"Point to the folder downloaded from {HUB_ID} (diffusers layout)."
            )
        return str(path)
    if _HUB_ID_RE.match(path_or_hub_id) and not path_or_hub_id.startswith((".", "~")):
        return path_or_hub_id
    raise FileNotFoundError(
        f"No model folder at {path_or_hub_id}. Give the folder of a downloaded Qwen-Image-Edit model "
        f"(diffusers layout, with model_index.json) or a Hugging Face id such as {HUB_ID}."
    )


class QwenImageEditBackbone(Backbone):
    name = "qwen-image-edit"

    def __init__(
        self,
        pipe: QwenImageEditPlusPipeline,
        *,
        image_size: int = 1024,
        device: str | torch.device = "cuda",
        dtype: torch.dtype | None = None,
        cpu_offload: bool = False,
        gradient_checkpointing: bool = False,
    ):
        multiple = pipe.vae_scale_factor * PATCH
        if image_size % multiple:
            raise ValueError(f"image_size must be a multiple of {multiple}, got {image_size}")
        self.pipe = pipe
        self.image_size = image_size
        self.schedule = schedule_from_scheduler_config(pipe.scheduler.config)
        self._device = torch.device(device)
        if dtype is not None:
            pipe.to(dtype=dtype)
        self.freeze()
        if cpu_offload:
            # Each model moves to the GPU for its forward and back to CPU when the next one runs
            # (text encoder -> transformer -> VAE): peak memory is the largest model, not all three.
            pipe.enable_model_cpu_offload(device=self._device)
        else:
            pipe.to(self._device)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    # construction -------------------------------------------------------------------------------
    @classmethod
    def from_components(
        cls,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        processor,
        scheduler,
        **kwargs,
    ) -> QwenImageEditBackbone:
        """From already built components; ``kwargs`` as ``__init__`` (image_size, device, ...).

        ``text_encoder``, ``tokenizer`` and ``processor`` may be None (a transformer + VAE backbone for
        precomputed prompt embeddings, e.g. the GPU benchmark); ``encode_prompt`` then says so."""
        pipe = QwenImageEditPlusPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            processor=processor,
            transformer=transformer,
        )
        kwargs.setdefault("device", transformer.device)
        return cls(pipe, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str = HUB_ID,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        cpu_offload: bool = False,
        gradient_checkpointing: bool = False,
        image_size: int = 1024,
    ) -> QwenImageEditBackbone:
        source = check_model_source(str(path_or_hub_id))
        try:
            pipe = QwenImageEditPlusPipeline.from_pretrained(source, dtype=dtype)
        except OSError as e:
            raise OSError(
                f"Could not load Qwen-Image-Edit from {source}: {e}. If this machine is offline, "
                "download the model first and give its folder."
            ) from e
        return cls(
            pipe,
            image_size=image_size,
            device=device,
            cpu_offload=cpu_offload,
            gradient_checkpointing=gradient_checkpointing,
        )

    def freeze(self) -> None:
        for module in (self.pipe.transformer, self.pipe.text_encoder, self.pipe.vae):
            if module is not None:
                module.requires_grad_(False)
                module.eval()

    # components ----------------------------------------------------------------------------------
    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    # interface -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare_images(images).to(self.device, self.vae.dtype).unsqueeze(2)
        latents = self.pipe._encode_vae_image(x, generator=None)  # mode of the posterior, normalised
        return latents[:, :, 0].to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.device, self.vae.dtype).unsqueeze(2)
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        z = z / inv_std + mean  # the pipeline's decode path, written as it writes it
        images = self.vae.decode(z, return_dict=False)[0][:, :, 0]
        return images.clamp(-1.0, 1.0).float()

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], source_images: torch.Tensor) -> Condition:
        if self.pipe.text_encoder is None or self.pipe.processor is None:
            raise RuntimeError(
                "This Qwen-Image-Edit backbone was built without its text encoder; it can only use "
                "prompt embeddings computed elsewhere."
            )
        if len(prompts) != source_images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {source_images.shape[0]} source images")
        h, w = source_images.shape[-2:]
        # Read the module constant at call time so that it can be lowered (tests) or raised.
        cw, ch = edit_plus.calculate_dimensions(edit_plus.CONDITION_IMAGE_SIZE, w / h)
        source_latents = self.encode_images(source_images)
        rows = []
        for i, image in enumerate(to_pil(source_images)):
            cond_image = self.pipe.image_processor.resize(image, ch, cw)
            embeds, mask = self.pipe.encode_prompt(
                prompt=[prompts[i]], image=[cond_image], device=self.device
            )
            if mask is None:  # the pipeline drops an all-ones mask
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            rows.append(Condition(embeds, mask, source_latents[i : i + 1]))
        return Condition.cat(rows)  # pads the text to the longest row, mask 0 there

    def image_seq_len(self, latents_shape: tuple[int, ...]) -> int:
        return (latents_shape[-2] // PATCH) * (latents_shape[-1] // PATCH)

    def guidance_norm(self, v: torch.Tensor) -> torch.Tensor:
        """Per packed token (2x2 patch x channels), as the pipeline rescales true CFG."""
        b, _, h, w = v.shape
        norms = pack(v, PATCH).norm(dim=-1, keepdim=True)  # (B, tokens, 1)
        per_pixel = norms.view(b, h // PATCH, w // PATCH, 1, 1, 1).expand(
            b, h // PATCH, w // PATCH, 1, PATCH, PATCH
        )
        return per_pixel.permute(0, 3, 1, 4, 2, 5).reshape(b, 1, h, w)

    def predict_velocity(self, x_s: torch.Tensor, s: torch.Tensor, cond: Condition) -> torch.Tensor:
        cond = self._text_for_call(cond)
        b, _, h, w = x_s.shape
        dtype = self.dtype
        src = cond.source_latents.to(self.device, dtype)
        tokens = torch.cat([pack(x_s.to(self.device, dtype), PATCH), pack(src, PATCH)], dim=1)
        img_shapes = [[(1, h // PATCH, w // PATCH), (1, src.shape[-2] // PATCH, src.shape[-1] // PATCH)]] * b
        s = s.to(self.device, dtype).reshape(-1)
        s = s.expand(b) if s.numel() == 1 else s
        # As the pipeline does: no mask when every text token is real (lets fused attention run).
        mask = None if bool(cond.mask.all()) else cond.mask.to(self.device)
        out = self._transformer_call()(
            hidden_states=tokens,
            timestep=s,
            encoder_hidden_states=cond.embeds.to(self.device, dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        return unpack(out[:, : (h // PATCH) * (w // PATCH)], h, w, PATCH)
