"""The method's losses and simulations, checked against their definitions."""

from __future__ import annotations

import torch

from distill.flow import add_noise, sigma_schedule, x0_from_velocity
from distill.objectives import critic_loss, dmd_gradient, dmd_loss, dmd_step
from distill.simulation import backward_simulation, target_simulation


def test_dmd_gradient_is_dmd2_normalised_direction() -> None:
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    grad = dmd_gradient(x, real, fake)
    norm = (x - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(grad, (fake - real) / norm)
    # per-sample normalisation: scaling one sample's distance to the real estimate rescales only it
    x2 = x.clone()
    x2[0] = real[0] + 10 * (x[0] - real[0])
    assert torch.allclose(dmd_gradient(x2, real, fake)[1:], grad[1:])
    assert not torch.allclose(dmd_gradient(x2, real, fake)[0], grad[0])


def test_dmd_loss_gradient_equals_the_dmd_direction() -> None:
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    grad = torch.randn(2, 3, 4, 4)
    dmd_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / x.numel())


def test_dmd_step_moves_samples_from_fake_towards_real() -> None:
    """With a real score that denoises towards +1 and a fake one towards 0, descending the DMD loss
    pushes the sample towards the real mode."""
    x = torch.zeros(2, 3, 4, 4, requires_grad=True)

    def real(xs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # x0_real = 1
        return (xs - 1.0) / s.view(-1, 1, 1, 1)

    def fake(xs: torch.Tensor, s: torch.Tensor) -> torch.Tensor:  # x0_fake = 0
        return xs / s.view(-1, 1, 1, 1)

    loss, stats = dmd_step(x, torch.full((2,), 0.5), real, fake, torch.Generator().manual_seed(0))
    loss.backward()
    assert (x.grad < 0).all()  # gradient descent increases x towards 1
    assert abs(stats["real_fake_gap"] - 1.0) < 1e-5


def test_critic_loss_is_zero_for_the_exact_velocity() -> None:
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s = torch.tensor([0.3, 0.8])

    def exact(xs: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
        return eps - x0

    assert critic_loss(exact, x0, s, eps).item() < 1e-12
    assert critic_loss(lambda xs, ss: torch.zeros_like(xs), x0, s, eps).item() > 0.1


def test_backward_simulation_runs_the_students_schedule_with_grad_only_at_the_exit() -> None:
    sig = sigma_schedule(8, 64)
    calls: list[tuple[float, bool]] = []
    w = torch.ones((), requires_grad=True)

    def student(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append((float(s[0]), torch.is_grad_enabled()))
        return w * x * 0.1

    noise = torch.randn(2, 3, 4, 4)
    out = backward_simulation(student, noise, sig, exit_step=3)
    assert [c[0] for c in calls] == [float(v) for v in sig[:4]]
    assert [c[1] for c in calls] == [False, False, False, True]
    out.sum().backward()
    assert w.grad is not None
    # exit 0 is the one-step generator from pure noise
    calls.clear()
    one = backward_simulation(student, noise, sig, exit_step=0)
    torch.testing.assert_close(one, x0_from_velocity(noise, sig[0].expand(2), 0.1 * noise))


def test_target_simulation_denoises_the_diffused_target() -> None:
    y, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s = torch.tensor([0.2, 0.6])

    def perfect(x: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
        return eps - y

    torch.testing.assert_close(target_simulation(perfect, y, s, eps), y)
    y_t = add_noise(y, eps, s)
    torch.testing.assert_close(target_simulation(lambda x, ss: torch.zeros_like(x), y, s, eps), y_t)


def test_rollout_pool_holds_every_exit_of_backward_simulation() -> None:
    from distill.simulation import rollout_x0s

    sig = sigma_schedule(4, 64)
    noise = torch.randn(2, 3, 4, 4)

    def student(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return 0.3 * x + s.view(-1, 1, 1, 1)

    pool = rollout_x0s(student, noise, sig)
    assert pool.shape == (4, 2, 3, 4, 4)
    for k in range(4):
        torch.testing.assert_close(pool[k], backward_simulation(student, noise, sig, exit_step=k))
