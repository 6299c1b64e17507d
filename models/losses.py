"""IConFace's training maths as small pure functions (paper eqs. 1, 8–11; supplement eq. 1).

L = α_fm·L_fm + λ_id·ω(σ)·[(1 − λ*)·L_ref-id + λ*·L_hard]
with α_fm = 0.75, λ_id = 0.30, λ* = λ_h·(1 − cos(e_ref, e_gt)), λ_h = 0.25, ω(σ) = max(1 − σ, ω_min)²,
ω_min = 0.25, w(σ) = 1 inside L_fm. The identity terms are zero for samples without references.

`LossWeights.id_loss = "hard_example"` puts seed 002's Hard Example Identity loss (Composite Context, arXiv:2505.21905,
eq. 3) in the bracket instead: L_HID = (1 − λ)·L_ID(x_HQ, x̂) + λ·L_ID(x_REF, x̂) with the paper's
fixed λ = 0.6 (`hei_lambda`), where 002's "hard example" is the REFERENCE (weight λ) and IConFace's
L_hard is the ground truth (weight λ*): the two mixes weight the same two cosines, with the reference
term at 1 − λ* (≈ 0.75–1) in IConFace and at λ = 0.6 in 002. The timestep factor stays IConFace's ω(σ)
(002 scales by √ᾱ_t, whose flow-matching counterpart would be 1 − σ) and its weight λ_id (002:
w_HID = 0.1), so that an ablation changes λ alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    alpha_fm: float = 0.75
    lambda_id: float = 0.30
    lambda_h: float = 0.25
    omega_min: float = 0.25
    id_loss: str = "adaptive"  # adaptive (IConFace's λ*) | hard_example (seed 002's eq. 3, fixed λ)
    hei_lambda: float = 0.6  # λ of seed 002's eq. 3 (the reference's weight)

    def __post_init__(self) -> None:
        if self.id_loss not in ID_LOSSES:
            raise ValueError(f"unknown id_loss {self.id_loss!r}; valid: {', '.join(ID_LOSSES)}")


ID_LOSSES = ("adaptive", "hard_example")


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """σ = s·t / (1 + (s − 1)·t): FLUX.2's time shift (s = e^μ in the sampler's schedule,
    `models.sampler.flux2_sigmas`; training's `shifted` draws in `sample_sigma`). s = 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def _on(generator: torch.Generator | None) -> torch.device | None:
    """The device a draw from `generator` must be made on: the generator's own (a draw under a device
    context, `with torch.device("cuda")`, would otherwise land there and refuse a CPU generator)."""
    return None if generator is None else generator.device


def sample_sigma(
    n: int, scheme: str = "uniform", generator: torch.Generator | None = None, **kw
) -> torch.Tensor:
    """σ ∈ (0, 1) for training: `uniform` (the supplement), `logit_normal` (SD3; kw mean, std),
    `shifted` (ours; kw shift): σ = s·u / (1 + (s − 1)·u) with u uniform, the time shift that FLUX.2's
    sampler applies to its schedule (`models.sampler.flux2_sigmas`, s = e^μ) used here on training's
    draws. s = 1 is `uniform` draw for draw; s < 1 puts more of training at low σ (median s / (1 + s)),
    s > 1 at high σ (measurements: docs/results.md)."""
    if scheme == "uniform":
        return torch.rand(n, generator=generator, device=_on(generator))
    if scheme == "logit_normal":
        return torch.sigmoid(
            torch.randn(n, generator=generator, device=_on(generator)) * kw.get("std", 1.0)
            + kw.get("mean", 0.0)
        )
    if scheme == "shifted":
        s = float(kw.get("shift", 1.0))
        if not s > 0:
            raise ValueError(f"sigma shift must be > 0, got {s}")
        return time_shift(torch.rand(n, generator=generator, device=_on(generator)), s)
    raise ValueError(f"unknown sigma scheme {scheme!r}; valid: uniform, logit_normal, shifted")


def add_noise(z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z_σ = (1 − σ) z0 + σ ε (eq. 1); σ (B,) broadcast over (B, C, H, W)."""
    s = sigma.view(-1, *([1] * (z0.ndim - 1)))
    return (1 - s) * z0 + s * noise


def velocity_target(z0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u* = ε − z0 (eq. 1)."""
    return noise - z0


def predicted_clean(z_sigma: torch.Tensor, u_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """ẑ0 = z_σ − σ û."""
    return z_sigma - sigma.view(-1, *([1] * (z_sigma.ndim - 1))) * u_hat


def flow_matching_loss(u_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_fm per sample (B,): mean squared error, w(σ) = 1 (eq. 8)."""
    return ((u_hat - target) ** 2).flatten(1).mean(1)


def omega(sigma: torch.Tensor, omega_min: float = 0.25) -> torch.Tensor:
    """ω(σ) = max(1 − σ, ω_min)²."""
    return torch.clamp(1 - sigma, min=omega_min) ** 2


def lambda_star(e_ref: torch.Tensor, e_gt: torch.Tensor, lambda_h: float = 0.25) -> torch.Tensor:
    """λ* = λ_h (1 − cos(e_ref, e_gt)) per sample (B,), no gradient (both are targets)."""
    return lambda_h * (1 - F.cosine_similarity(e_ref.detach(), e_gt.detach(), dim=-1))


def identity_terms(
    e_out: torch.Tensor, e_ref: torch.Tensor, e_gt: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_ref-id = 1 − cos(A(Î), sg(e_ref)) (eq. 9), L_hard = 1 − cos(A(Î), sg(e_gt)) (eq. 10), per sample."""
    return (
        1 - F.cosine_similarity(e_out, e_ref.detach(), dim=-1),
        1 - F.cosine_similarity(e_out, e_gt.detach(), dim=-1),
    )


def hard_example_identity(
    e_out: torch.Tensor, e_ref: torch.Tensor, e_gt: torch.Tensor, lam: float = 0.6
) -> torch.Tensor:
    """L_HID = (1 − λ)·(1 − cos(A(x̂), e_gt)) + λ·(1 − cos(A(x̂), e_ref)) per sample (B,) (seed 002's eq. 3
    without eq. 2's timestep factor, which the caller applies); targets without gradient."""
    ref_id, gt_id = identity_terms(e_out, e_ref, e_gt)
    return (1 - lam) * gt_id + lam * ref_id


def iconface_loss(
    u_hat: torch.Tensor,
    target: torch.Tensor,
    sigma: torch.Tensor,
    e_out: torch.Tensor | None,
    e_ref: torch.Tensor | None,
    e_gt: torch.Tensor | None,
    has_ref: torch.Tensor,
    w: LossWeights = LossWeights(),
) -> dict[str, torch.Tensor]:
    """The total loss (supplement eq. 1) and its terms, each averaged over the batch.

    `has_ref` (B,) bool: the identity loss applies only to samples with references (eq. 11 is zero
    otherwise). `e_out` is the frozen identity encoder's embedding of the decoded ẑ0. The logged
    `lambda_star` is the ground-truth term's weight: λ* (adaptive) or 1 − λ (hard_example).
    """
    fm = flow_matching_loss(u_hat, target)  # (B,)
    zero = torch.zeros_like(fm)
    if e_out is None or not bool(has_ref.any()):
        ref_id = hard = lam = mix = zero
    elif w.id_loss == "hard_example":
        ref_id, hard = identity_terms(e_out, e_ref, e_gt)
        mix = hard_example_identity(e_out, e_ref, e_gt, w.hei_lambda)  # seed 002's eq. 3
        lam = torch.full_like(fm, 1 - w.hei_lambda)
    else:
        ref_id, hard = identity_terms(e_out, e_ref, e_gt)
        lam = lambda_star(e_ref, e_gt, w.lambda_h)
        mix = (1 - lam) * ref_id + lam * hard
    ident = omega(sigma, w.omega_min) * mix * has_ref.to(fm.dtype)  # eq. 11
    total = w.alpha_fm * fm + w.lambda_id * ident
    n_ref = has_ref.sum().clamp_min(1)
    return {
        "loss": total.mean(),
        "fm": fm.mean(),
        "id": ident.mean(),
        "ref_id": (ref_id * has_ref).sum() / n_ref,
        "hard": (hard * has_ref).sum() / n_ref,
        "lambda_star": (lam * has_ref).sum() / n_ref,
    }


# ==================================================================================================
# Draws and the network's parameterisation (pure functions; pipelines.module calls them)
# ==================================================================================================


def noise_generator(seed: int, step: int, rank: int, batch_idx: int) -> torch.Generator:
    """The generator of one training batch's σ and ε: a pure function of (seed, global step, rank,
    batch index). Every DDP rank draws its own σ and noise for its own samples; a rerun of a rank (or
    a resume at that step) draws the same."""
    return _keyed_generator(f"{seed}/{step}/{rank}/{batch_idx}")


def dropout_generator(seed: int, step: int, rank: int, batch_idx: int) -> torch.Generator:
    """The generator of one training batch's classifier-free-guidance drops (composite conditioning): a
    pure function of the same (seed, step, rank, batch index), independent of the noise draws."""
    return _keyed_generator(f"cfg-drop/{seed}/{step}/{rank}/{batch_idx}")


def _keyed_generator(key: str) -> torch.Generator:
    import hashlib

    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def draw_sigma_noise(
    shape: tuple[int, ...],
    scheme: str,
    sigma_max: float,
    generator: torch.Generator,
    shift: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ (B,), ε (shape)) for one batch: σ ∈ (0, sigma_max) by `scheme` (`shift` for `shifted`),
    ε ~ N(0, I) (eq. 1)."""
    sigma = sample_sigma(shape[0], scheme, generator, shift=shift) * sigma_max
    return sigma, torch.randn(shape, generator=generator, device=generator.device)


def parameterise(
    out: torch.Tensor, z_sigma: torch.Tensor, sigma: torch.Tensor, z_deg: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(û, ẑ0) from the network output under a parameterisation.

    * ``velocity`` (the recipe): û = out, ẑ0 = z_σ − σ û.
    * ``x0_residual`` (ours, for random CPU backbones): ẑ0 = z_deg + out, û = (z_σ − ẑ0) / σ.
    """
    s = sigma.view(-1, *([1] * (z_sigma.ndim - 1)))
    if prediction == "x0_residual":
        x0 = z_deg + out
        return (z_sigma - x0) / s.clamp_min(1e-4), x0
    if prediction == "velocity":
        return out, z_sigma - s * out
    raise ValueError(f"unknown prediction {prediction!r}; valid: velocity, x0_residual")


def fm_operands(
    u_hat: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """What L_fm (eq. 8) compares: (û, u*) for ``velocity``; (σ·û, σ·u*) for ``x0_residual``, i.e. the
    loss is taken in ẑ0 space (σ·(û − u*) = z0 − ẑ0), so that it does not blow up as σ → 0."""
    if prediction == "x0_residual":
        s = sigma.view(-1, *([1] * (u_hat.ndim - 1)))
        return s * u_hat, s * target
    return u_hat, target
