"""The loss maths on hand-computed cases (paper eqs. 1, 8–11; supplement eq. 1)."""

import pytest
import torch

from models.losses import (
    LossWeights,
    add_noise,
    iconface_loss,
    lambda_star,
    omega,
    predicted_clean,
    sample_sigma,
    velocity_target,
)


def test_noising_target_and_clean_estimate():
    z0, eps, s = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), torch.tensor([0.25])
    zs = add_noise(z0, eps, s)
    assert zs.item() == pytest.approx(0.75 * 2 - 0.25)
    u = velocity_target(z0, eps)
    assert u.item() == -3.0
    assert predicted_clean(zs, u, s).item() == pytest.approx(2.0)  # the exact velocity recovers z0


def test_omega_and_lambda_star():
    assert torch.allclose(
        omega(torch.tensor([0.0, 0.5, 0.9, 1.0])), torch.tensor([1.0, 0.25, 0.0625, 0.0625])
    )
    e_ref, e_gt = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert lambda_star(e_ref, e_gt).item() == pytest.approx(0.25)
    assert lambda_star(e_ref, e_ref).item() == pytest.approx(0.0)


def test_total_loss_hand_computed():
    u_hat = torch.zeros(2, 1, 1, 1)
    target = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # fm = 1, 4
    sigma = torch.tensor([0.5, 0.5])  # ω = 0.25
    e_out = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    e_ref = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # ref-id = 1
    e_gt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # hard = 0, λ* = 0.25
    has = torch.tensor([True, False])
    out = iconface_loss(u_hat, target, sigma, e_out, e_ref, e_gt, has)
    ident0 = 0.25 * ((1 - 0.25) * 1 + 0.25 * 0)
    want = (0.75 * 1 + 0.30 * ident0 + 0.75 * 4) / 2  # no identity term for the no-reference sample
    assert out["loss"].item() == pytest.approx(want)
    assert out["fm"].item() == pytest.approx(2.5) and out["lambda_star"].item() == pytest.approx(0.25)
    noid = iconface_loss(u_hat, target, sigma, None, None, None, torch.tensor([False, False]), LossWeights())
    assert noid["loss"].item() == pytest.approx(0.75 * 2.5) and noid["id"].item() == 0


def test_identity_targets_are_stop_gradient():
    e_out = torch.randn(3, 8, requires_grad=True)
    e_ref = torch.randn(3, 8, requires_grad=True)
    e_gt = torch.randn(3, 8, requires_grad=True)
    out = iconface_loss(
        torch.zeros(3, 1),
        torch.ones(3, 1),
        torch.rand(3),
        e_out,
        e_ref,
        e_gt,
        torch.ones(3, dtype=torch.bool),
    )
    out["loss"].backward()
    assert e_out.grad is not None and e_ref.grad is None and e_gt.grad is None


def test_sigma_schemes():
    g = torch.Generator().manual_seed(0)
    u = sample_sigma(20000, "uniform", g)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    ln = sample_sigma(20000, "logit_normal", g)
    assert abs(ln.median() - 0.5) < 0.02 and ln.std() < u.std()
    with pytest.raises(ValueError, match="valid: uniform"):
        sample_sigma(3, "cosine")


def test_shifted_sigma_is_flux_time_shift_of_the_uniform_draws():
    """`shifted` maps the uniform draw u to s·u/(1 + (s − 1)·u): s = 1 is `uniform` draw for draw, the
    median is s/(1 + s), s < 1 moves mass to low σ, s > 1 to high σ, and s <= 0 is refused."""
    u = sample_sigma(20000, "uniform", torch.Generator().manual_seed(3))
    assert torch.equal(sample_sigma(20000, "shifted", torch.Generator().manual_seed(3), shift=1.0), u)
    low = sample_sigma(20000, "shifted", torch.Generator().manual_seed(3), shift=0.5)
    high = sample_sigma(20000, "shifted", torch.Generator().manual_seed(3), shift=6.8)
    assert torch.allclose(low, 0.5 * u / (1 - 0.5 * u))
    assert abs(low.median() - 0.5 / 1.5) < 0.01 and abs(high.median() - 6.8 / 7.8) < 0.01
    assert 0 <= low.min() and high.max() < 1 and low.mean() < u.mean() < high.mean()
    with pytest.raises(ValueError, match="shift must be > 0"):
        sample_sigma(3, "shifted", shift=0.0)
