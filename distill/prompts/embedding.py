"""Text embeddings for the trigger check: a backbone's own text encoder, mean-pooled over real tokens.

AOP (§4.3) asks that trigger words be near-orthogonal *in the text encoder the student is conditioned
through*, so the embedding comes from the backbone, not from a separate sentence model.
"""

from __future__ import annotations

from typing import Any

import torch

from .triggers import EmbedFn


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(N, L, D) token states and an (N, L) mask of real tokens -> (N, D) mean over the real tokens."""
    hidden = hidden.detach().float()
    if mask is None:
        return hidden.mean(dim=1)
    m = mask.to(hidden.device, hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def embedder_for(backbone: Any) -> EmbedFn:
    """``embed(texts) -> (N, D)`` float32 CPU tensor of pooled text-encoder states of ``backbone``.

    The tiny backbone: its T5 encoder over ByT5 bytes (``encode_text``). Qwen-Image-Edit: the
    pipeline's Qwen2.5-VL prompt encoder with its chat template and no image (the template's system
    tokens are dropped by the pipeline, so the pooled states are those of the text itself).
    """
    if callable(getattr(backbone, "encode_text", None)):

        @torch.no_grad()
        def embed_tiny(texts: list[str]) -> torch.Tensor:
            hidden, mask = backbone.encode_text(list(texts))
            return mean_pool(hidden, mask).cpu()

        return embed_tiny

    pipe = getattr(backbone, "pipe", None)
    if pipe is not None and callable(getattr(pipe, "encode_prompt", None)):

        @torch.no_grad()
        def embed_qwen(texts: list[str]) -> torch.Tensor:
            # The mask comes back None when every token is real (one text, or equal lengths).
            hidden, mask = pipe.encode_prompt(prompt=list(texts), image=None, device=backbone.device)
            return mean_pool(hidden, mask).cpu()

        return embed_qwen

    name = getattr(backbone, "name", type(backbone).__name__)
    raise TypeError(
        f"The backbone '{name}' exposes no text encoder the trigger check can use "
        f"(it needs `encode_text` or a diffusers pipeline with `encode_prompt`)."
    )
