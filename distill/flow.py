"""Flow-matching conventions shared by every part of the method.

As diffusers does it: ``x_s = (1 - s) * x0 + s * eps`` with s in [0, 1] (s = 1 is pure noise),
velocity target ``v = eps - x0`` and ``x0_hat = x_s - s * v_hat``. The model is given ``s`` itself
(the pipelines pass ``t / 1000``). Shifted sigma schedules follow FlowMatchEulerDiscreteScheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

TimestepSampling = Literal["uniform", "logit_normal", "shifted"]


def add_noise(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Diffuse clean ``x0`` to level ``s`` (one value per sample)."""
    s = _bcast(s, x0)
    return (1.0 - s) * x0 + s * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return eps - x0


def x0_from_velocity(x_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x_s - _bcast(s, x_s) * v


def renoise(x0: torch.Tensor, s: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh noise at level ``s`` around ``x0`` (used by backward and target simulation)."""
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    return add_noise(x0, eps, s)


def time_shift(s: torch.Tensor | np.ndarray | float, shift: float) -> torch.Tensor | np.ndarray | float:
    """Static SD3-style shift: larger ``shift`` spends more steps at high noise."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def exponential_time_shift(s: np.ndarray, mu: float) -> np.ndarray:
    """The dynamic (resolution-dependent) shift of FlowMatchEulerDiscreteScheduler."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))


def calculate_mu(
    image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float
) -> float:
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


@dataclass(frozen=True)
class ScheduleConfig:
    """Sigma schedule as the Qwen-Image pipelines configure FlowMatchEulerDiscreteScheduler."""

    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9
    dynamic: bool = True
    shift: float = 1.0  # used when dynamic is False
    shift_terminal: float | None = None  # stretch so the last non-zero sigma is this (Qwen-Image: 0.02)


def sigma_schedule(
    num_steps: int, image_seq_len: int, cfg: ScheduleConfig = ScheduleConfig()
) -> torch.Tensor:
    """Descending sigmas s_0 = shifted(1) > ... > s_{N-1}, followed by a final 0 (N + 1 values)."""
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    base = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if cfg.dynamic:
        mu = calculate_mu(
            image_seq_len, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
        )
        sig = exponential_time_shift(base, mu)
    else:
        sig = time_shift(base, cfg.shift)
    if cfg.shift_terminal:  # as FlowMatchEulerDiscreteScheduler.stretch_shift_to_terminal
        one_minus = 1.0 - sig
        sig = 1.0 - one_minus / (one_minus[-1] / (1.0 - cfg.shift_terminal))
    return torch.tensor(np.append(sig, 0.0), dtype=torch.float32)


def sample_timesteps(
    n: int,
    mode: TimestepSampling = "logit_normal",
    *,
    generator: torch.Generator | None = None,
    low: float = 0.0,
    high: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 3.0,
) -> torch.Tensor:
    """Training noise levels in (low, high): uniform, logit-normal (SD3) or shifted-uniform."""
    if mode == "uniform":
        u = torch.rand(n, generator=generator)
    elif mode == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    elif mode == "shifted":
        u = time_shift(torch.rand(n, generator=generator), shift)
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}")
    return low + (high - low) * u


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(s):
        s = torch.tensor(s)
    s = s.to(device=like.device, dtype=like.dtype)
    return s.reshape(-1, *([1] * (like.dim() - 1))) if s.dim() > 0 else s
