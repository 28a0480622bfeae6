"""The losses of CollectionLoRA, each a small function (the shape of DMD2's ``sd_guidance.py``).

Scores are velocity predictions turned into clean-image estimates ``x0 = x_s - s * v``. The real
score is the teacher (base + LoRA_i with c_teacher and true CFG, or the base alone on the general
stream); the fake score is the ``fake`` LoRA, which tracks the student's own distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .flow import add_noise, velocity_target, x0_from_velocity

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_s, s) -> v


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Eq. 2 / eq. 6 / the critic's loss: regress the velocity ``eps - x0`` (fp32)."""
    return F.mse_loss(v_pred.float(), velocity_target(x0, eps).float())


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's normalised distribution-matching direction, in fp32:
    ``(x0_fake - x0_real) / mean|x - x0_real|`` per sample (its ``(p_real - p_fake) / |p_real|``)."""
    x, x0_real, x0_fake = x.float(), x0_real.float(), x0_fake.float()
    p_real = x - x0_real
    norm = p_real.abs().mean(dim=tuple(range(1, x.dim())), keepdim=True).clamp_min(1e-6)
    return torch.nan_to_num((x0_fake - x0_real) / norm)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * ||x - (x - grad).detach()||^2``: its gradient w.r.t. x is ``grad`` (times 1/numel)."""
    x = x.float()
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def score_x0(fn: VelocityFn, x_s: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return x0_from_velocity(x_s, s, fn(x_s, s))


def dmd_step(
    x: torch.Tensor,
    s_critic: torch.Tensor,
    real: VelocityFn,
    fake: VelocityFn,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 1 / eq. 7 for a generated sample ``x`` (carrying the student's graph): diffuse a detached
    copy to ``s_critic``, score it with the real and fake models, and return the DMD loss on ``x``."""
    eps = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    x_t = add_noise(x.detach(), eps, s_critic)
    x0_real = score_x0(real, x_t, s_critic)
    x0_fake = score_x0(fake, x_t, s_critic)
    grad = dmd_gradient(x.detach(), x0_real, x0_fake)
    stats = {"grad_norm": float(grad.abs().mean()), "real_fake_gap": float((x0_real - x0_fake).abs().mean())}
    return dmd_loss(x, grad), stats


def critic_loss(fake: VelocityFn, samples: torch.Tensor, s: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The fake score's denoising (flow-matching) loss on detached student samples."""
    x0 = samples.detach()
    return flow_matching_loss(fake(add_noise(x0, eps, s), s), x0, eps)
