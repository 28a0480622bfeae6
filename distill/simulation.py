"""How the student's samples are produced for distribution matching.

- Backward simulation (DMD2, eq. 1): run the student's own few-step sampler without grad from pure
  noise to a random exit step, then take one step with grad: the sample the student would really
  produce at inference, with a gradient path through its last step.
- Target simulation (eq. 7): diffuse the teacher's target y to a shallow level s_gen < tau_max and
  let the student denoise it: a sample near the teacher's domain, so the real and fake scores differ
  even while the student is still far from the effect (Appendix 8.1).

The student samples with plain Euler steps on its shifted schedule, the sampler it is served with
(Lightning's FlowMatchEulerDiscreteScheduler does the same), so training sees inference's states.
"""

from __future__ import annotations

import torch

from .flow import add_noise, x0_from_velocity
from .objectives import VelocityFn


def backward_simulation(
    student: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor, exit_step: int
) -> torch.Tensor:
    """x0 estimate at ``exit_step`` of the student's schedule; grad flows through that last call only."""
    if not 0 <= exit_step < len(sigmas) - 1:
        raise ValueError(f"exit_step must be in [0, {len(sigmas) - 2}]")
    x = noise
    b = noise.shape[0]
    with torch.no_grad():
        for i in range(exit_step):
            s = sigmas[i].expand(b)
            x = x + (sigmas[i + 1] - sigmas[i]) * student(x, s)
    return exit_step_x0(student, x, sigmas, exit_step)


def exit_step_x0(
    student: VelocityFn, state: torch.Tensor, sigmas: torch.Tensor, exit_step: int
) -> torch.Tensor:
    """The student's x0 estimate (with grad) from ``state``, its sampler's state at ``exit_step``."""
    s = sigmas[exit_step].expand(state.shape[0])
    return x0_from_velocity(state, s, student(state, s))


def target_simulation(
    student: VelocityFn, y: torch.Tensor, s_gen: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """The student's denoising of the teacher target y diffused to ``s_gen`` (with grad)."""
    y_t = add_noise(y, eps, s_gen)
    return x0_from_velocity(y_t, s_gen, student(y_t, s_gen))


def rollout(
    student: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's sampler from ``noise`` (no grad): its state entering every step and its x0
    estimate there, each stacked (steps, B, ...). Entry k of the estimates is what
    ``backward_simulation`` yields at exit step k; entry k of the states is where that call's
    gradient-carrying step starts (``exit_step_x0``)."""
    x, b, states, outs = noise, noise.shape[0], [], []
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            s = sigmas[i].expand(b)
            v = student(x, s)
            states.append(x)
            outs.append(x0_from_velocity(x, s, v))
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return torch.stack(states), torch.stack(outs)


def rollout_x0s(student: VelocityFn, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The student's x0 estimate at every step of its sampler from ``noise`` (no grad), stacked
    (steps, B, ...): entry k is what ``backward_simulation`` yields at exit step k."""
    return rollout(student, noise, sigmas)[1]
