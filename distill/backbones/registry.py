"""Backbones by name: what a run config or the CLI says (``tiny`` or ``qwen-image-edit``) -> a Backbone."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import Backbone

BACKBONES = ("tiny", "qwen-image-edit")


def load_backbone(
    name: str,
    model_path: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Backbone:
    """Load a backbone, frozen and ready for adapters.

    ``tiny``: the embedded checkpoint (default ``distill/backbones/weights/tiny``), float32, CPU by
    default. ``qwen-image-edit``: a local diffusers folder or a hub id (default
    Qwen/Qwen-Image-Edit-2509); CUDA in bfloat16 when a GPU is present, else CPU in float32.
    """
    if name == "tiny":
        from .tiny import WEIGHTS_DIR, TinyEditor

        path = Path(model_path).expanduser() if model_path else WEIGHTS_DIR
        if not path.is_dir():
            raise FileNotFoundError(
                f"The tiny backbone has no weights folder at {path}. Create it with "
                f"`python -m distill.backbones.pretrain_tiny --out {path}` (about an hour on a laptop CPU)."
            )
        if dtype not in (None, torch.float32):
            raise ValueError(f"The tiny backbone runs in float32 only, not {dtype}.")
        return TinyEditor.from_pretrained(path, device=device or "cpu")
    if name == "qwen-image-edit":
        from .qwen_image_edit import HUB_ID, QwenImageEditBackbone

        cuda = torch.cuda.is_available()
        device = device or ("cuda" if cuda else "cpu")
        dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
        return QwenImageEditBackbone.from_pretrained(model_path or HUB_ID, device=device, dtype=dtype)
    raise ValueError(f"Unknown backbone {name!r}. Choose one of: {', '.join(BACKBONES)}.")


def teacher_cfg(name: str) -> float:
    """The true-CFG scale a backbone's teachers sample at, without loading it."""
    if name == "tiny":
        from .tiny import TinyConfig

        return TinyConfig.teacher_cfg
    if name == "qwen-image-edit":
        return Backbone.teacher_cfg
    raise ValueError(f"Unknown backbone {name!r}. Choose one of: {', '.join(BACKBONES)}.")
