"""Conversions between PIL / numpy images ([0, 1], H x W x 3) and model tensors ([-1, 1], B x 3 x H x W)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_tensor(images: list[np.ndarray] | np.ndarray | list[Image.Image]) -> torch.Tensor:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    arrs = [
        np.asarray(im.convert("RGB"), np.float32) / 255.0 if isinstance(im, Image.Image) else im
        for im in images
    ]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() * 2.0 - 1.0


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) float32 in [0, 1]."""
    return ((images.detach().float().clamp(-1, 1) + 1.0) / 2.0).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((a * 255.0 + 0.5).astype(np.uint8), "RGB") for a in to_numpy(images)]


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="area")


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (computed on the [0, 1] scale)."""
    mse = ((a.float() - b.float()) / 2.0).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)
